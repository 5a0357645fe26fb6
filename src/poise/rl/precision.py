r"""Engine precision for the train-inference mismatch study: FP16 against BF16 sampling.

"Defeating the Training-Inference Mismatch via FP16" (Qi et al., arXiv 2510.26788): the
mismatch between the inference engine's ``mu`` and the trainer's ``pi`` on the same weights comes
from rounding in each engine's low-precision arithmetic. BF16 keeps 8 significand bits (unit
roundoff ``u = 2^-8``), FP16 keeps 11 (``u = 2^-11``), so running the engines in FP16 rather than
BF16 shrinks each rounding error about 8x and with it

    |Delta logp|_t = |log pi(y_t) - log mu(y_t)|,   KL(mu || pi) ~ mean_t (rho_t - 1 - log rho_t)
    (k3, rho_t = pi(y_t)/mu(y_t))

as measured by :func:`poise.rl.rollout_diagnostics` (``kl``, ``k3_kl``) and
:func:`poise.rl.completion_stats` (``mismatch/abs_log_ratio``). The paper runs both engines in the
same 16-bit format (vLLM sampler, FSDP trainer with FP32 master weights and loss scaling);
reference code: the authors' ``sail-sg/Precision-RL`` (a one-line ``dtype`` switch in verl /
oat). Symbols -> arguments: the sampler's format = ``sampler`` and the trainer's = ``trainer``
of :func:`engine_dtypes`; each is applied as ``torch.autocast`` around the forward (weights and
optimizer stay float32).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

__all__ = ["PRECISIONS", "autocast", "engine_dtypes", "unit_roundoff"]

PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, key: str) -> torch.dtype | None:
    if name not in PRECISIONS:
        raise ValueError(f"{key}={name!r}; valid choices: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def engine_dtypes(sampler: str = "bfloat16", trainer: str = "float32") -> tuple[torch.dtype | None, torch.dtype | None]:
    """The autocast dtypes ``(sampler, trainer)`` for precision names (``"float32"`` -> ``None``:
    no autocast). Unknown names raise ``ValueError`` listing :data:`PRECISIONS`.

    >>> engine_dtypes("float16", "float32")
    (torch.float16, None)
    """
    return _dtype(sampler, "sampler"), _dtype(trainer, "trainer")


def autocast(dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on CPU in ``dtype`` (``None`` = disabled, float32)."""
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def unit_roundoff(name: str) -> float:
    """``2^-p`` for a format with ``p`` significand bits: float32 ``2^-24``, bfloat16 ``2^-8``,
    float16 ``2^-11`` (the ratio bfloat16/float16 = 8 is the paper's argument).

    >>> unit_roundoff("bfloat16") / unit_roundoff("float16")
    8.0
    """
    dt = _dtype(name, "precision") or torch.float32
    return float(torch.finfo(dt).eps) / 2

"""Masked reductions and the explicit aggregation step.

Every objective in :mod:`poise.rl` returns per-token values ``[B, T]``; turning them into a
scalar is this module's job, and it takes the *global* token and sequence counts as
arguments. Summing per-micro-batch losses aggregated with global counts gives exactly the
full-batch loss, for every mode (the normalisation bug class of verl#5625 / Liger#1082).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AGG_MODES", "EMPTY_ROWS", "LossOut", "aggregate", "broadcast", "check_shapes", "masked_mean",
           "masked_sum", "masked_whiten", "masked_zero", "stats"]

AGG_MODES = ("token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_norm")
EMPTY_ROWS = ("skip", "count")


class LossOut(NamedTuple):
    """Per-token values ``[B, T]`` (zero where the mask is 0) and detached 0-d metrics."""

    values: Tensor
    metrics: dict[str, Tensor]


def masked_zero(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with every position where ``mask == 0`` set to exactly 0, whatever it held (+-inf,
    NaN): ``torch.where``, so the gradient there is exactly 0 too (``x * mask`` would give
    ``NaN * 0 = NaN``). Masked positions contribute nothing, in value and in gradient."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def check_shapes(mask: Tensor, *, adv: Tensor | None = None, **tokens: Tensor | None) -> None:
    """Raise ``ValueError`` naming the tensor whose shape does not fit the ``[B, T]`` ``mask``:
    every ``tokens`` tensor must have the mask's shape, ``adv`` ``[B]`` or ``[B, T]``. Shape
    checks only (no host synchronisation)."""
    if mask.dim() != 2:
        raise ValueError(f"mask has shape {_shape(mask)}; expected 2 dimensions [B, T]")
    for name, x in tokens.items():
        if x is not None and tuple(x.shape) != tuple(mask.shape):
            raise ValueError(f"{name} has shape {_shape(x)}; expected {_shape(mask)} (the mask's)")
    if adv is not None and tuple(adv.shape) not in ((mask.shape[0],), tuple(mask.shape)):
        raise ValueError(f"adv has shape {_shape(adv)}; expected ({mask.shape[0]},) or {_shape(mask)}")


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum x * mask``; positions with ``mask == 0`` add exactly 0 whatever ``x`` holds there."""
    xm = masked_zero(x, mask) * mask
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over masked entries; 0 (not NaN) where the mask is empty."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp_min(1) if dim is not None else \
        masked_sum(x, mask) / mask.sum().clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over masked entries (biased variance); the mean is
    added back when ``shift_mean`` is False."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    """A per-sequence advantage ``[B]`` as per-token ``[B, T]`` (exactly zero on masked tokens)."""
    a = adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv
    return masked_zero(a, mask) * mask


def stats(prefix: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Detached ``mean/min/max/std`` of ``x`` over the mask (0 when the mask is empty)."""
    x = x.detach()
    m = mask.bool()
    if not m.any():
        z = torch.zeros((), dtype=x.dtype, device=x.device)
        return {f"{prefix}/mean": z, f"{prefix}/min": z, f"{prefix}/max": z, f"{prefix}/std": z}
    v = x[m]
    return {f"{prefix}/mean": v.mean(), f"{prefix}/min": v.min(), f"{prefix}/max": v.max(),
            f"{prefix}/std": v.std(unbiased=False)}


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", *, num_tokens: Tensor | float | None = None,
              num_seqs: Tensor | float | None = None, horizon: int | None = None,
              empty_rows: str = "skip") -> Tensor:
    r"""Reduce per-token values ``[B, T]`` to a scalar.

    With ``n_tok`` = ``num_tokens`` and ``n_seq`` = ``num_seqs`` the **global** counts (over
    all micro-batches and ranks of the optimizer step; default: this batch's own, which is
    only right when the batch is the whole step):

    * ``token_mean``: ``sum_{i,t} v m / n_tok`` (DAPO, TRL ``dapo``/``bnpo``, verl ``token-mean``);
    * ``token_sum``: ``sum_{i,t} v m``;
    * ``seq_mean_token_mean``: ``sum_i (sum_t v m / |y_i|) / n_seq`` (GRPO, TRL ``grpo``);
    * ``seq_mean_token_sum``: ``sum_i sum_t v m / n_seq``;
    * ``seq_sum_norm``: ``sum_{i,t} v m / (n_seq * horizon)`` (Dr. GRPO, TRL ``dr_grpo``:
      ``horizon`` = the maximum completion length).

    Empty rows (a sequence whose mask is all 0) add 0. Whether they count in the *default*
    ``n_seq`` is ``empty_rows``: ``"skip"`` (default; verl's ``seq-mean-*`` modes: the number of
    non-empty rows) or ``"count"`` (TRL ``grpo``/``dr_grpo``/``luspo``: ``B``, every row). A
    given ``num_seqs`` is used as is.

    Positions with ``mask == 0`` contribute exactly 0, in value and gradient, whatever
    ``values`` holds there (``inf``, ``NaN``): see :func:`masked_zero`. ``mask`` may be a
    float weight (e.g. ``mask * top``); a row's token count is then its weight sum.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode={mode!r}; valid choices: {', '.join(AGG_MODES)}")
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"empty_rows={empty_rows!r}; valid choices: {', '.join(EMPTY_ROWS)}")
    check_shapes(mask, values=values)
    m = mask.to(values.dtype)
    values = masked_zero(values, m)
    if num_tokens is None:
        num_tokens = m.sum()
    if num_seqs is None:
        num_seqs = (m.sum(-1) > 0).sum() if empty_rows == "skip" else m.shape[0]
    if mode == "token_mean":
        return (values * m).sum() / torch.as_tensor(num_tokens, dtype=values.dtype).clamp_min(1)
    if mode == "token_sum":
        return (values * m).sum()
    n_seq = torch.as_tensor(num_seqs, dtype=values.dtype).clamp_min(1)
    if mode == "seq_mean_token_mean":
        return ((values * m).sum(-1) / m.sum(-1).clamp_min(1)).sum() / n_seq
    if mode == "seq_mean_token_sum":
        return (values * m).sum() / n_seq
    if horizon is None:
        raise ValueError("mode='seq_sum_norm' needs horizon (the maximum completion length)")
    return (values * m).sum() / (n_seq * horizon)


def completion_stats(entropy: Tensor, mask: Tensor, mismatch_log_ratio: Tensor | None = None) -> dict[str, float]:
    """Plain-float summary of one batch for logging: mean token entropy and, given
    ``log(pi_old / mu)``, the mean absolute mismatch log-ratio (host-side; for logs only)."""
    out = {"entropy/mean": float(masked_mean(entropy.detach(), mask))}
    if mismatch_log_ratio is not None:
        out["mismatch/abs_log_ratio"] = float(masked_mean(mismatch_log_ratio.detach().abs(), mask))
    return out

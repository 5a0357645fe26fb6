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

__all__ = ["AGG_MODES", "LossOut", "aggregate", "broadcast", "masked_mean", "masked_sum", "masked_whiten", "stats"]

AGG_MODES = ("token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_norm")


class LossOut(NamedTuple):
    """Per-token values ``[B, T]`` (zero where the mask is 0) and detached 0-d metrics."""

    values: Tensor
    metrics: dict[str, Tensor]


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


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
    """A per-sequence advantage ``[B]`` as per-token ``[B, T]`` (zero on masked tokens)."""
    return adv[:, None] * mask if adv.dim() == 1 else adv * mask


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
              num_seqs: Tensor | float | None = None, horizon: int | None = None) -> Tensor:
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

    Sequences whose mask is empty count as nothing (they add 0 and are not in the default
    ``n_seq``).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"mode={mode!r}; valid choices: {', '.join(AGG_MODES)}")
    m = mask.to(values.dtype)
    if num_tokens is None:
        num_tokens = m.sum()
    if num_seqs is None:
        num_seqs = (m.sum(-1) > 0).sum()
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

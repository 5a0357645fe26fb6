"""Advantage estimators for outcome rewards: one scalar reward per sequence, ``[B]``, and a
group id per sequence (the prompt it answers), ``[B]`` int64."""

from __future__ import annotations

import torch
from torch import Tensor

from poise._registry import register

__all__ = ["batch_normalized_advantage", "dr_grpo_advantage", "global_stat_advantage", "group_advantage",
           "reinforce_advantage", "rloo_advantage"]

CENTERS = ("mean", "loo")
SCALES = ("group", "batch", "none")


def _group_stats(x: Tensor, group_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence group size ``n``, group mean and group sum of squared deviations
    ``sum_j (x_j - mean)^2``, two-pass: the mean first, then the deviations (a one-pass
    ``sum x^2 - n mean^2`` cancels catastrophically when the spread is small against the mean:
    float32 rewards 0.9 +- 0.002 lose ~6e-2 of their advantages)."""
    if group_id.shape != x.shape:
        raise ValueError(f"group_id has shape {tuple(group_id.shape)}; expected {tuple(x.shape)} (the rewards')")
    ids, inv = torch.unique(group_id, return_inverse=True)
    n = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(x))
    mean = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inv, x) / n
    dev = x - mean[inv]
    ss = torch.zeros(len(ids), dtype=x.dtype, device=x.device).index_add_(0, inv, dev * dev)
    return n[inv], mean[inv], ss[inv]


@register("advantage", "reinforce")
def reinforce_advantage(rewards: Tensor, baseline: Tensor | float = 0.0) -> Tensor:
    """REINFORCE with a baseline: ``A_i = r_i - b`` (``b`` a scalar or per sequence)."""
    return rewards - baseline


@register("advantage", "grpo")
def group_advantage(rewards: Tensor, group_id: Tensor, *, center: str = "mean", scale: str = "group",
                    eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    r"""Group-relative advantages.

    * ``center="mean"``: ``r_i - mean_g``; ``"loo"`` (RLOO): ``r_i - mean_{j != i, j in g}``
      ``= n/(n-1) (r_i - mean_g)``; a group of one gets 0.
    * ``scale="group"`` (GRPO, DeepSeekMath): divide by ``std_g + eps`` (unbiased std, as
      ``torch.std`` in verl and TRL; ``eps`` 1e-6 as verl, TRL uses 1e-4);
      ``"batch"`` (TRL ``scale_rewards="batch"``): by the std over the whole batch;
      ``"none"`` (Dr. GRPO, arXiv 2503.20783): no division.

    A group whose rewards are all equal gets advantage 0, never NaN; a group of one has
    std 0 (so advantage 0 with ``center="mean"``). Group statistics are two-pass (mean, then
    squared deviations), in float32 for float32 rewards, as ``torch.std`` in TRL and verl.
    """
    if center not in CENTERS:
        raise ValueError(f"center={center!r}; valid choices: {', '.join(CENTERS)}")
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; valid choices: {', '.join(SCALES)}")
    r = rewards.to(torch.float64) if rewards.dtype == torch.float64 else rewards.float()
    n, mean, ss = _group_stats(r, group_id)
    if center == "mean":
        a = r - mean
    else:
        a = torch.where(n > 1, (r - mean) * n / (n - 1).clamp_min(1), torch.zeros_like(r))
    if scale == "group":
        var = ss / ((n - 1).clamp_min(1) if unbiased else n)
        a = a / (var.sqrt() + eps)
    elif scale == "batch":
        batch_std = r.std(unbiased=unbiased) if len(r) > 1 else torch.zeros((), dtype=r.dtype)
        a = a / (batch_std + eps)
    return a.to(rewards.dtype) if rewards.is_floating_point() else a


@register("advantage", "dr_grpo")
def dr_grpo_advantage(rewards: Tensor, group_id: Tensor) -> Tensor:
    """Dr. GRPO (arXiv 2503.20783): ``r_i - mean_g``, no std division."""
    return group_advantage(rewards, group_id, scale="none")


@register("advantage", "rloo")
def rloo_advantage(rewards: Tensor, group_id: Tensor) -> Tensor:
    """RLOO (Ahmadian et al., arXiv 2402.14740): ``r_i - mean_{j != i} r_j``; 0 for a group of one."""
    return group_advantage(rewards, group_id, center="loo", scale="none")


@register("advantage", "batch_norm")
def batch_normalized_advantage(rewards: Tensor, group_id: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-mean baseline, batch std (TRL ``scale_rewards="batch"``, "PPO-Lite")."""
    return group_advantage(rewards, group_id, scale="batch", eps=eps)


@register("advantage", "reinforce_ada")
def global_stat_advantage(rewards: Tensor, group_id: Tensor, pos_count: Tensor, neg_count: Tensor,
                          eps: float = 1e-6) -> Tensor:
    r"""Reinforce-Ada's global-statistics baseline (arXiv 2510.04996; RLHFlow/Reinforce-Ada,
    ``compute_grpo_outcome_advantage(..., grpo_uid_to_pos_count, grpo_uid_to_neg_count)``):
    for binary rewards, the group's mean and unbiased std are taken over *all* samples drawn
    for the prompt (``pos_count`` positives, ``neg_count`` negatives, per sequence), not only
    the kept ones: ``mean = p/(p+q)``, ``std = sqrt(p q / ((p+q)(p+q-1)))`` (the unbiased std of
    ``{1}^p U {0}^q``), ``A = (r - mean)/(std + eps)``; all-equal prompts give 0."""
    p, q = pos_count.to(rewards.dtype), neg_count.to(rewards.dtype)
    n = p + q
    mean = p / n.clamp_min(1)
    std = torch.sqrt((p * q / (n * (n - 1)).clamp_min(1)).clamp_min(0))
    return (rewards - mean) / (std + eps)

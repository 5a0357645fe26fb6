"""Sampling helpers: DAPO's dynamic sampling and overlong shaping."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dynamic_sampling_keep", "overlong_penalty"]


def dynamic_sampling_keep(rewards: Tensor, group_id: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO's dynamic sampling (arXiv 2503.14476): keep only groups whose rewards are not all
    equal (a constant group has zero advantage and no gradient). Returns the bool keep-mask
    per sequence and ``zero_adv_group_frac``."""
    ids, inv = torch.unique(group_id, return_inverse=True)
    lo = torch.full((len(ids),), float("inf"), dtype=rewards.dtype).scatter_reduce(0, inv, rewards, "amin")
    hi = torch.full((len(ids),), float("-inf"), dtype=rewards.dtype).scatter_reduce(0, inv, rewards, "amax")
    varied = hi > lo
    return varied[inv], {"zero_adv_group_frac": 1 - varied.float().mean()}


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    r"""DAPO's soft overlong punishment (verl ``reward_manager/dapo.py``): with
    ``L_exp = max_len - buffer``, ``penalty = min(-(|y| - L_exp) / buffer * factor, 0)``, added
    to the score."""
    if buffer <= 0:
        raise ValueError(f"buffer={buffer} must be > 0")
    return (-(lengths.to(torch.float32) - (max_len - buffer)) / buffer * factor).clamp(max=0.0)

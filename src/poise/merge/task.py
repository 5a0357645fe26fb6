"""Task vectors and the plain merges: a task's update as a parameter delta of a state dict.

``task_vector(finetuned, base)`` = ``theta_ft - theta_0`` over the floating tensors;
``task_arithmetic(deltas, scale)`` = ``scale * sum_t w_t tau_t`` (Ilharco et al., arXiv 2212.04089);
``average(deltas)`` = ``sum_t w_t tau_t / sum_t w_t`` (weight averaging of models fine-tuned from one
base, "model soups", arXiv 2203.05482); ``apply_task_vector(base, delta, scale)`` =
``theta_0 + scale * delta``. All are pure functions of state dicts of any ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["apply_task_vector", "average", "task_arithmetic", "task_vector"]


def task_vector(finetuned: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tau = theta_ft - theta_0`` for every floating tensor of ``base`` (integer buffers skipped);
    a key of ``base`` missing from ``finetuned`` or a shape mismatch raises."""
    out = {}
    for k, b in base.items():
        if not torch.is_floating_point(b):
            continue
        if k not in finetuned:
            raise ValueError(f"key {k!r} of base is missing from finetuned")
        if finetuned[k].shape != b.shape:
            raise ValueError(f"key {k!r}: shape {tuple(finetuned[k].shape)} != base {tuple(b.shape)}")
        out[k] = finetuned[k].detach() - b.detach()
    return out


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if n == 0:
        raise ValueError("need at least one delta")
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n or any(not math.isfinite(x) for x in w):
        raise ValueError(f"weights={list(weights)} must be {n} finite numbers")
    return w


def _keys(deltas: Sequence[Mapping[str, Tensor]]) -> list[str]:
    keys = list(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if set(d) != set(keys):
            raise ValueError(f"delta {i} has keys {sorted(set(d) ^ set(keys))} that delta 0 does not share")
    return keys


def task_arithmetic(deltas: Sequence[Mapping[str, Tensor]], scale: float = 1.0,
                    weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """``scale * sum_t w_t tau_t`` (``w_t = 1`` by default)."""
    w = _weights(weights, len(deltas))
    return {k: scale * sum(wi * d[k] for wi, d in zip(w, deltas, strict=True)) for k in _keys(deltas)}


def average(deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """``sum_t w_t tau_t / sum_t w_t`` (the uniform mean by default)."""
    w = _weights(weights, len(deltas))
    if sum(w) == 0:
        raise ValueError(f"weights={w} sum to 0")
    return task_arithmetic(deltas, 1.0 / sum(w), w)


def apply_task_vector(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """``theta_0 + scale * delta`` (keys of ``base`` without a delta are copied); load the result with
    ``model.load_state_dict``. A delta key that ``base`` lacks raises."""
    extra = [k for k in delta if k not in base]
    if extra:
        raise ValueError(f"delta keys {extra} are not in base")
    return {k: (v + scale * delta[k].to(v.dtype) if k in delta else v.clone()) for k, v in base.items()}

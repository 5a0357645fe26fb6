"""Update pruning applied to the realised update: ignore-k."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from poise._nn import trainable
from poise._registry import register
from poise.continual._base import Strategy
from poise.transforms import ignore_top_k

__all__ = ["IgnoreK", "prune_top"]


def prune_top(delta: Tensor, k: float) -> Tensor:
    r"""``delta`` with its ``\lceil k n \rceil`` largest-magnitude coordinates zeroed (a new tensor;
    ``delta`` is unchanged): :func:`poise.transforms.ignore_top_k` applied to one tensor."""
    return ignore_top_k(k).update([delta.clone()], [{}], [delta], {})[0]


@register("strategy", "ignore_k")
class IgnoreK(Strategy):
    r"""Ignore-k update pruning (Sun et al., "How new data permeates LLM knowledge and how to
    dilute it", arXiv 2504.09522).

    After each optimizer step, per trainable tensor, the realised update
    ``\Delta = \theta_{after} - \theta_{before}`` loses its ``\lceil k n \rceil``
    largest-magnitude coordinates (``n`` = the tensor's size) and the rest is applied:
    ``\theta \leftarrow \theta_{before} + \mathrm{ignore\_top\_k}(\Delta)``
    (:func:`prune_top`, the :func:`poise.transforms.ignore_top_k` transform). It prunes what
    the optimizer actually did (after momentum, adaptive scaling and weight decay), which is
    what the paper prunes; chaining ``ignore_top_k`` last in an optimizer prunes the same
    quantity for poise's optimizers, and this strategy does it for any optimizer (torch's
    included). ``k`` in [0, 1); ``k = 0`` leaves the step untouched (no snapshot is taken).
    The priming recipe uses ``k = 0.08``. Implements :meth:`Strategy.transform_update`; keeps
    no state.
    """

    name = "ignore_k"

    def __init__(self, k: float = 0.08):
        if not 0 <= k < 1:
            raise ValueError(f"k={k} is out of range; valid: [0, 1)")
        self.k = k

    @property
    def needs_update_snapshot(self) -> bool:  # type: ignore[override]
        return self.k > 0

    @torch.no_grad()
    def transform_update(self, model: nn.Module, before: dict[str, Tensor]) -> None:
        if self.k == 0:
            return
        for n, p in trainable(model):
            if n in before:
                b = before[n]
                p.copy_(b + prune_top(p - b, self.k))

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless: the pruning depends on the current update only

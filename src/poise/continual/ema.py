"""Exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from poise._registry import register
from poise.continual._base import Batch, Strategy

__all__ = ["EMA"]


@register("strategy", "ema")
class EMA(Strategy):
    r"""Weight EMA: after every step ``\bar\theta \leftarrow \beta \bar\theta + (1-\beta)\theta``
    (``decay`` = ``\beta``); buffers are copied. The averaged copy is the model that is
    evaluated (:meth:`eval_model`); training continues on the raw weights (Polyak-Ruppert
    averaging with a constant weight; the adaptive-weight form of CoIN is not this).
    """

    name = "ema"

    def __init__(self, decay: float = 0.99):
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.decay = decay
        self.shadow: nn.Module | None = None

    def _init(self, model: nn.Module) -> nn.Module:
        if self.shadow is None:
            self.shadow = copy.deepcopy(model)
            for p in self.shadow.parameters():
                p.requires_grad_(False)
        return self.shadow

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        shadow = self._init(model)
        for ps, p in zip(shadow.parameters(), model.parameters(), strict=True):
            ps.lerp_(p, 1.0 - self.decay)
        for bs, b in zip(shadow.buffers(), model.buffers(), strict=True):
            bs.copy_(b)
        return {}

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.shadow if self.shadow is not None else model

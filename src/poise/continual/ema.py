"""Exponential moving average of the weights."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

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
        self._pending: dict[str, torch.Tensor] | None = None  # a loaded average, built at the next hook

    def _init(self, model: nn.Module) -> nn.Module:
        if self.shadow is None:
            self.shadow = copy.deepcopy(model)
            if self._pending is not None:
                self.shadow.load_state_dict(self._pending)
                self._pending = None
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
        if self._pending is not None:
            return self._init(model)
        return self.shadow if self.shadow is not None else model

    def state_dict(self) -> dict[str, Any]:
        """The averaged copy's ``state_dict`` (None before the first step)."""
        shadow = self._pending if self._pending is not None else (
            None if self.shadow is None else self.shadow.state_dict())
        return {"shadow": shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The averaged copy is rebuilt (a copy of the trained model with the saved weights) at
        the next hook that sees the model."""
        self.shadow = None
        self._pending = None if state["shadow"] is None else {k: v.clone() for k, v in state["shadow"].items()}

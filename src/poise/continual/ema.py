"""Exponential moving average of the weights: constant weight (``ema``) and CoIN's adaptive
weight (``ema_adaptive``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from poise._registry import register
from poise.continual._base import Batch, Strategy

__all__ = ["EMA", "AdaptiveEMA", "coin_alpha"]


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


def coin_alpha(theta: torch.Tensor, theta_star: torch.Tensor, grad: torch.Tensor, prev_grad: torch.Tensor,
               fallback: float = 0.01) -> torch.Tensor:
    r"""CoIN's adaptive EMA weight for one tensor (Qiao et al., "Large Continual Instruction
    Assistant", ICML 2025, arXiv 2410.10868; the Taylor-expansion condition of their Sec. 3).

    .. math::

        \alpha_t = \frac{2\,(1 + \lVert g_t \rVert_1)}
                        {\lVert \theta_t - \theta^*_{t-1} \rVert_1 \,\lVert g_t - g_{t-1} \rVert_1},
        \qquad \alpha_t \leftarrow \text{fallback if } \alpha_t \notin (0, 1)

    Symbols: ``theta`` = :math:`\theta_t` (the weights after the optimizer step), ``theta_star``
    = :math:`\theta^*_{t-1}` (the EMA weights before this update), ``grad`` = :math:`g_t` (the
    gradient of this step), ``prev_grad`` = :math:`g_{t-1}`; :math:`\lVert g_t\rVert_1` stands for
    the loss's first derivative and :math:`\lVert g_t - g_{t-1}\rVert_1` for its second (their
    ``L'`` and ``L''``). Matches ``CoIN/peft/tuners/lora.py::ema_update`` (JingyangQiao/CoIN):
    whole-tensor L1 norms, ``alpha = float((1 + b) / (a * c) * 2)``, kept only when
    ``0 < alpha < 1``, else 0.01. A zero denominator gives ``inf`` and so the fallback.
    Returns a 0-d tensor.
    """
    a = (theta - theta_star).abs().sum()
    b = grad.abs().sum()
    c = (grad - prev_grad).abs().sum()
    alpha = 2 * (1 + b) / (a * c)
    ok = (alpha > 0) & (alpha < 1)
    return torch.where(ok, alpha, torch.full_like(alpha, fallback))


@register("strategy", "ema_adaptive")
class AdaptiveEMA(Strategy):
    r"""CoIN's EMA with a per-step, per-tensor adaptive weight (arXiv 2410.10868; code
    JingyangQiao/CoIN ``peft/tuners/lora.py::ema_update`` / ``ema_replace``).

    After every optimizer step, for every trainable tensor,
    ``\theta^* \leftarrow (1-\alpha_t)\theta^* + \alpha_t\theta_t`` with :math:`\alpha_t` from
    :func:`coin_alpha` (``fallback`` when it leaves (0, 1), and at a tensor's first step of a
    task or when it has no gradient). As in the authors' trainer, :math:`\theta^*` starts as a
    copy of the weights after the first step of each task (a fresh trainer per task), and at
    the end of each task the trained weights are replaced by :math:`\theta^*` (``ema_replace``),
    so the next task starts from the average. During a task the averaged copy is the model
    evaluated (:meth:`eval_model`). Buffers are copied.

    Logs per step: ``alpha_mean``, ``alpha_min``, ``alpha_max`` (over tensors) and
    ``alpha_fallback`` (the fraction of tensors that used ``fallback``).
    """

    name = "ema_adaptive"

    def __init__(self, fallback: float = 0.01):
        if not 0 < fallback < 1:
            raise ValueError(f"fallback={fallback} must be in (0, 1)")
        self.fallback = fallback
        self.shadow: nn.Module | None = None
        self.prev_grads: dict[str, torch.Tensor | None] = {}
        self._pending: dict[str, torch.Tensor] | None = None

    def _restore(self, model: nn.Module) -> None:
        if self.shadow is None and self._pending is not None:
            self.shadow = copy.deepcopy(model)
            self.shadow.load_state_dict(self._pending)
            self._pending = None
            for p in self.shadow.parameters():
                p.requires_grad_(False)

    def before_task(self, model: nn.Module, data: Batch) -> None:
        self.shadow, self._pending, self.prev_grads = None, None, {}  # a fresh average per task

    @torch.no_grad()
    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        self._restore(model)
        if self.shadow is None:  # theta* = the weights after the task's first step
            self.shadow = copy.deepcopy(model)
            for p in self.shadow.parameters():
                p.requires_grad_(False)
        shadow = dict(self.shadow.named_parameters())
        alphas, fallbacks = [], 0
        for n, p in model.named_parameters():
            ps = shadow[n]
            if not p.requires_grad:
                ps.copy_(p)
                continue
            g, g_prev = p.grad, self.prev_grads.get(n)
            if g is None or g_prev is None:
                alpha = torch.tensor(self.fallback, dtype=p.dtype)
                fallbacks += 1
            else:
                alpha = coin_alpha(p, ps, g, g_prev, self.fallback)
                fallbacks += int(alpha == self.fallback)
            ps.mul_(1 - alpha).add_(alpha * p)
            self.prev_grads[n] = None if g is None else g.detach().clone()
            alphas.append(alpha.to(torch.float64))
        for bs, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            bs.copy_(b)
        if not alphas:
            return {}
        a = torch.stack(alphas)
        return {"alpha_mean": a.mean().float(), "alpha_min": a.min().float(), "alpha_max": a.max().float(),
                "alpha_fallback": torch.tensor(fallbacks / len(alphas))}

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Batch) -> None:
        self._restore(model)
        if self.shadow is not None:  # ema_replace: the next task starts from the average
            shadow = dict(self.shadow.named_parameters())
            for n, p in model.named_parameters():
                p.copy_(shadow[n])

    def eval_model(self, model: nn.Module) -> nn.Module:
        self._restore(model)
        return self.shadow if self.shadow is not None else model

    def state_dict(self) -> dict[str, Any]:
        """The averaged copy's ``state_dict`` (None before the task's first step) and the previous
        step's gradient per tensor (None where it had none)."""
        shadow = self._pending if self._pending is not None else (
            None if self.shadow is None else self.shadow.state_dict())
        return {"shadow": shadow, "prev_grads": dict(self.prev_grads)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.shadow = None
        self._pending = None if state["shadow"] is None else {k: v.clone() for k, v in state["shadow"].items()}
        self.prev_grads = {k: None if v is None else v.clone() for k, v in state["prev_grads"].items()}

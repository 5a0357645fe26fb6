"""Adam scaling, learning rate, decoupled weight decay, bias correction."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise.transforms._base import Hyper, State, Transform, Updates

__all__ = ["add_decayed_weights", "scale_by_adam", "scale_by_bias_correction", "scale_by_learning_rate"]

CONVENTIONS = ("torch", "hf")


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; valid choices: {', '.join(choices)}")


def scale_by_adam(convention: str = "torch", bias_correction: bool = True) -> Transform:
    r"""Adam's direction, without the learning rate (Kingma & Ba, arXiv 1412.6980).

    ``m <- b1 m + (1-b1) u``, ``v <- b2 v + (1-b2) u^2``, with ``t`` = the shared step and
    ``(b1, b2)`` = ``hyper["betas"]``, ``eps`` = ``hyper["eps"]``:

    * ``convention="torch"`` (torch.optim.AdamW, optax): ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``;
    * ``convention="hf"`` (the transformers AdamW that SOAP, SPAM and GaLore copy):
      ``sqrt(bc2) / bc1 * m / (sqrt(v) + eps)``, an effective eps of ``eps / sqrt(bc2)``;

    where ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``; ``b1`` is multiplied by the shared
    ``momentum_scale`` when a schedule sets one. ``bias_correction=False`` (or
    ``hyper["correct_bias"] = False``) drops both corrections. State: ``exp_avg``,
    ``exp_avg_sq``, in the update's shape (created on first use, so the transform also
    works on projected, lower-rank updates).
    """
    _check("convention", convention, CONVENTIONS)

    def init(param: Tensor, hyper: Hyper) -> dict[str, Tensor]:
        return {}

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        b1_base, b2 = hyper["betas"]
        eps = hyper["eps"]
        correct = bias_correction and hyper.get("correct_bias", True)
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None:
                out.append(None)
                continue
            b1 = b1_base * float(s["momentum_scale"]) if "momentum_scale" in s else b1_base
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(u)
                s["exp_avg_sq"] = torch.zeros_like(u)
            m, v = s["exp_avg"], s["exp_avg_sq"]
            t = float(s["step"])
            m.mul_(b1).add_(u, alpha=1 - b1)
            v.mul_(b2).addcmul_(u, u, value=1 - b2)
            bc1 = 1 - b1**t if correct else 1.0
            bc2 = 1 - b2**t if correct else 1.0
            if convention == "torch":
                out.append((m / bc1) / (v.sqrt() / math.sqrt(bc2)).add_(eps))
            else:
                out.append((m / v.sqrt().add_(eps)).mul_(math.sqrt(bc2) / bc1))
        return out

    return Transform(init, update, "adam")


def scale_by_bias_correction(step_offset: int = 0) -> Transform:
    r"""Multiply by ``sqrt(1 - b2^t) / (1 - b1^t)`` with ``t = step - step_offset`` (the
    HF-style correction, applied outside the moments; SOAP uses ``step_offset=1`` because
    its first call only initialises the preconditioner). No-op when
    ``hyper["correct_bias"]`` is False."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        if not hyper.get("correct_bias", True):
            return updates
        b1, b2 = hyper["betas"]
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None:
                out.append(None)
                continue
            t = float(s["step"]) - step_offset
            out.append(u * (math.sqrt(1 - b2**t) / (1 - b1**t)))
        return out

    return Transform(lambda p, h: {}, update, "bias_correction")


def scale_by_learning_rate() -> Transform:
    """``u <- -lr * u`` with ``lr = hyper["lr"]`` (a float or a 0-d tensor)."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        lr = hyper["lr"]
        return [None if u is None else u * (-lr) for u in updates]

    return Transform(lambda p, h: {}, update, "lr")


def add_decayed_weights(when: str = "before") -> Transform:
    r"""Decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101), with
    ``lr`` = ``hyper["lr"]`` and ``wd`` = ``hyper["weight_decay"]``; put it after the
    learning-rate scaling.

    * ``when="before"`` (torch.optim.AdamW): ``p <- p (1 - lr wd)`` then the update, i.e.
      ``u <- u - lr wd p``;
    * ``when="after"`` (HF AdamW, SOAP, GaLore): the update, then ``p <- p (1 - lr wd)`` on
      the updated weights, i.e. ``u <- u - lr wd (p + u)``.
    """
    _check("when", when, ("before", "after"))

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        wd = hyper.get("weight_decay", 0.0)
        if not wd:
            return updates
        c = hyper["lr"] * wd
        if when == "before":
            return [None if u is None else u - c * p for u, p in zip(updates, params, strict=True)]
        return [None if u is None else u - c * (p + u) for u, p in zip(updates, params, strict=True)]

    return Transform(lambda p, h: {}, update, "weight_decay")

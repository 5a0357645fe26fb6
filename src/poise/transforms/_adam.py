"""Adam scaling, learning rate, decoupled weight decay, bias correction."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise.transforms._base import (
    BETAS,
    CORRECT_BIAS,
    EPS,
    LR,
    WEIGHT_DECAY,
    Hyper,
    State,
    Transform,
    Updates,
    compiling,
    declare,
)

__all__ = [
    "add_decayed_weights", "fused_adamw", "scale_by_adam", "scale_by_bias_correction", "scale_by_learning_rate",
]

CONVENTIONS = ("torch", "hf")


Scalar = float | Tensor


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; valid choices: {', '.join(choices)}")


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _tensor_coefficients(s: State, b1_base: float, b2: float, correct: bool) -> tuple[Scalar, Scalar, Scalar]:
    """``(b1, 1 - b1^t, 1 - b2^t)`` as 0-d tensors of the shared step (no host sync: the
    torch.compile path)."""
    b1 = b1_base * s["momentum_scale"] if "momentum_scale" in s else b1_base
    if not correct:
        return b1, 1.0, 1.0
    t = s["step"]
    return b1, 1 - torch.pow(b1, t), 1 - torch.pow(b2, t)


def scale_by_adam(convention: str = "torch", bias_correction: bool = True, foreach: bool = True) -> Transform:
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

    ``foreach=True`` runs the same arithmetic with ``torch._foreach_*`` kernels over the
    group (fewer Python round trips); ``foreach=False`` is the readable per-tensor
    reference it is tested equal to. Under torch.compile the per-tensor form runs with the
    coefficients as 0-d tensors of the step (no host sync; Inductor fuses the loop itself).
    """
    _check("convention", convention, CONVENTIONS)

    def coefficients(s: State, b1_base: float, b2: float, correct: bool) -> tuple[float, float, float]:
        b1 = b1_base * float(s["momentum_scale"]) if "momentum_scale" in s else b1_base
        t = float(s["step"])
        return b1, (1 - b1**t if correct else 1.0), (1 - b2**t if correct else 1.0)

    def single(u: Tensor, s: State, b1: Scalar, b2: float, bc1: Scalar, bc2: Scalar, eps: float) -> Tensor:
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m.lerp_(u, 1 - b1)
        v.mul_(b2).addcmul_(u, u, value=1 - b2)
        if convention == "torch":
            denom = v.sqrt().div_(_sqrt(bc2)).add_(eps)
            return torch.div(m, denom, out=denom).div_(bc1)
        denom = v.sqrt().add_(eps)
        return torch.div(m, denom, out=denom).mul_(_sqrt(bc2) / bc1)

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        b1_base, b2 = hyper["betas"]
        eps = hyper["eps"]
        correct = bias_correction and hyper.get("correct_bias", True)
        live = [i for i, u in enumerate(updates) if u is not None]
        for i in live:
            s = states[i]
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(updates[i])
                s["exp_avg_sq"] = torch.zeros_like(updates[i])
        out: Updates = list(updates)
        if compiling():
            for i in live:
                b1, bc1, bc2 = _tensor_coefficients(states[i], b1_base, b2, correct)
                out[i] = single(updates[i], states[i], b1, b2, bc1, bc2, eps)
            return out
        coef = [coefficients(states[i], b1_base, b2, correct) for i in live]
        if not foreach or len(live) < 2:
            for i, (b1, bc1, bc2) in zip(live, coef, strict=True):
                out[i] = single(updates[i], states[i], b1, b2, bc1, bc2, eps)
            return out
        us = [updates[i] for i in live]
        ms = [states[i]["exp_avg"] for i in live]
        vs = [states[i]["exp_avg_sq"] for i in live]
        torch._foreach_lerp_(ms, us, [1 - b1 for b1, _, _ in coef])
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, us, us, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        if convention == "torch":
            torch._foreach_div_(denom, [math.sqrt(bc2) for _, _, bc2 in coef])
            torch._foreach_add_(denom, eps)
            res = torch._foreach_div(ms, denom)
            torch._foreach_div_(res, [bc1 for _, bc1, _ in coef])
        else:
            torch._foreach_add_(denom, eps)
            res = torch._foreach_div(ms, denom)
            torch._foreach_mul_(res, [math.sqrt(bc2) / bc1 for _, bc1, bc2 in coef])
        for i, r in zip(live, res, strict=True):
            out[i] = r
        return out

    return Transform(lambda p, h: {}, update, "adam", True,
                     declare("adam", betas=BETAS, eps=EPS, correct_bias=CORRECT_BIAS))


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
            out.append(u.mul_(math.sqrt(1 - b2**t) / (1 - b1**t)))
        return out

    return Transform(lambda p, h: {}, update, "bias_correction", True,
                     declare("bias_correction", betas=BETAS, correct_bias=CORRECT_BIAS))


def scale_by_learning_rate() -> Transform:
    """``u <- -lr * u`` with ``lr = hyper["lr"]`` (a float or a 0-d tensor)."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        lr = hyper["lr"]
        return [None if u is None else u.mul_(-lr) for u in updates]

    return Transform(lambda p, h: {}, update, "lr", True, declare("lr", lr=LR))


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
        if isinstance(c, Tensor):
            c = float(c)
        if when == "before":
            return [None if u is None else u.add_(p, alpha=-c) for u, p in zip(updates, params, strict=True)]
        return [None if u is None else u.mul_(1 - c).add_(p, alpha=-c) for u, p in zip(updates, params, strict=True)]

    return Transform(lambda p, h: {}, update, "weight_decay", True,
                     declare("weight_decay", lr=LR, weight_decay=WEIGHT_DECAY))


def fused_adamw() -> Transform:
    r"""Terminal fast path of ``chain(scale_by_adam("torch"), scale_by_learning_rate(),
    add_decayed_weights("before"))``: applies the AdamW step to the parameters itself with
    torch's fused kernel (``torch._fused_adamw_``, one pass over each tensor) and returns
    ``None`` for every parameter it updated. Same state (``exp_avg``, ``exp_avg_sq``, the
    shared ``step``), same hyperparameters (``lr, betas, eps, weight_decay`` and the shared
    ``momentum_scale``). Parameters the kernel cannot take (a dtype other than the update's,
    sparse) go through the per-tensor reference arithmetic instead. Tested equal to the
    chain it replaces (tests/transforms/test_fast_paths.py). Under torch.compile every
    parameter takes the reference arithmetic with tensor coefficients (Inductor generates the
    fused kernel; ``torch._fused_adamw_`` does not trace), so a compiled step has no graph break.
    """
    reference = scale_by_adam("torch", foreach=False)

    def compiled(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper, lr: Scalar,
                 wd: float) -> Updates:
        live = [i for i, u in enumerate(updates) if u is not None]
        sub = reference.update([updates[i] for i in live], [states[i] for i in live], [params[i] for i in live],
                               hyper)
        out: Updates = list(updates)
        for i, u in zip(live, sub, strict=True):
            p = params[i]
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(u.to(p.dtype).mul_(-lr))
            out[i] = None
        return out

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        b1_base, b2 = hyper["betas"]
        lr, wd, eps = hyper["lr"], hyper.get("weight_decay", 0.0), hyper["eps"]
        out: Updates = list(updates)
        if compiling():
            return compiled(updates, states, params, hyper, lr, wd)
        lr_f = float(lr) if isinstance(lr, Tensor) else lr
        groups: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            if u is None:
                continue
            s = states[i]
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(u)
                s["exp_avg_sq"] = torch.zeros_like(u)
            b1 = b1_base * float(s["momentum_scale"]) if "momentum_scale" in s else b1_base
            ok = (u.dtype == params[i].dtype and u.device == params[i].device and not u.is_sparse
                  and u.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
                  and s["step"].device.type == "cpu")
            groups.setdefault((b1, ok, u.dtype, u.device), []).append(i)
        for (b1, ok, _, _), idx in groups.items():
            if ok:
                torch._fused_adamw_(
                    [params[i] for i in idx], [updates[i] for i in idx],
                    [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx], [],
                    [states[i]["step"] for i in idx], amsgrad=False, lr=lr_f, beta1=b1, beta2=b2,
                    weight_decay=wd, eps=eps, maximize=False, grad_scale=None, found_inf=None)
            else:
                sub = reference.update([updates[i] for i in idx], [states[i] for i in idx],
                                       [params[i] for i in idx], hyper)
                for i, u in zip(idx, sub, strict=True):
                    params[i].mul_(1 - lr_f * wd).add_(u.to(params[i].dtype), alpha=-lr_f)
            for i in idx:
                out[i] = None
        return out

    return Transform(lambda p, h: {}, update, "adam", True,
                     declare("fused_adamw", lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY))

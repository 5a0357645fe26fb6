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
from poise.transforms._base import state_roots as _roots

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
        lr = hyper["lr"]
        c = (float(lr) if isinstance(lr, Tensor) else lr) * wd  # in double: a float32 lr * wd loses digits
        if when == "before":
            return [None if u is None else u.add_(p, alpha=-c) for u, p in zip(updates, params, strict=True)]
        return [None if u is None else u.mul_(1 - c).add_(p, alpha=-c) for u, p in zip(updates, params, strict=True)]

    return Transform(lambda p, h: {}, update, "weight_decay", True,
                     declare("weight_decay", lr=LR, weight_decay=WEIGHT_DECAY))


_KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})


def kernel_ok(u: Tensor, p: Tensor, step: Tensor, *moments: Tensor) -> bool:
    """Whether torch's fused AdamW kernel can step ``p`` with update ``u`` (and the moments, when
    they exist): same dtype (a float type), a CPU step counter (the kernel reads it on the host), and
    one memory layout: the CPU kernel pairs entries by their place in memory, ignoring strides, so a
    gradient laid out otherwise than its parameter (transposed, broadcast with ``expand``, sliced: any
    gradient set by hand) would be paired with the wrong weights. ``p`` must be dense (contiguous, or
    channels-last for a 4-D tensor) and ``u`` and the moments must have its strides; anything else
    takes the reference arithmetic."""
    dt = u.dtype
    if not (dt is p.dtype and dt in _KERNEL_DTYPES and not u.is_sparse and step.is_cpu):
        return False
    return _one_layout(u, p, *moments)


def _one_layout(u: Tensor, p: Tensor, *moments: Tensor) -> bool:
    """``p`` dense and ``u`` and the moments laid out as it is (see :func:`kernel_ok`)."""
    if p.is_contiguous() and u.is_contiguous() and all(m.is_contiguous() for m in moments):
        return True  # the common case, without building stride tuples
    st = p.stride()
    if u.stride() != st or any(m.stride() != st for m in moments):
        return False
    return p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)


def hf_adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, update_scale: float = 1.0) -> bool:
    r"""The Hugging Face AdamW step (``scale_by_adam("hf")``, times ``update_scale`` (SPAM's warm-up),
    ``-lr``, then ``add_decayed_weights("after")``) in torch's one-pass fused kernel, on parameters
    whose counters already count this step::

        p <- (p - lr s sqrt(bc2)/bc1 m / (sqrt(v) + eps)) (1 - lr wd)

    is torch's ``p <- p (1 - lr' wd') - lr'/bc1 m / (sqrt(v)/sqrt(bc2) + eps')`` with
    ``lr' = lr s (1 - lr wd)``, ``wd' = lr wd / lr'`` and ``eps' = eps / sqrt(bc2)`` (so one call
    per distinct step count). Equal to the chain up to float rounding (tested). Returns False, doing
    nothing, when ``lr' <= 0`` (``lr wd >= 1``, or a zero learning rate or scale: no such ``lr'``)."""
    keep = 1.0 - lr * weight_decay
    lr_k = lr * update_scale * keep
    if keep <= 0.0 or lr_k <= 0.0:
        return False
    by_step: dict[float, list[int]] = {}
    for i, st in enumerate(steps):
        by_step.setdefault(float(st), []).append(i)
    for t, idx in by_step.items():
        torch._fused_adamw_([params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                            [exp_avg_sqs[i] for i in idx], [], [steps[i] for i in idx], amsgrad=False,
                            lr=lr_k, beta1=beta1, beta2=beta2, weight_decay=lr * weight_decay / lr_k,
                            eps=eps / math.sqrt(1.0 - beta2**t), maximize=False, grad_scale=None, found_inf=None)
    return True


def apply_hf_adamw(updates: Updates, states: list[State], params: list[Tensor], idx: list[int], hyper: Hyper,
                   scales: list[float] | None = None) -> set[int]:
    """:func:`hf_adamw_step` for the parameters ``idx`` the kernel can take (:func:`kernel_ok`, no
    ``momentum_scale``, ``correct_bias`` on), with their moments at ``states[i]["exp_avg"]`` and
    ``["exp_avg_sq"]`` (zeros when missing) and ``scales[i]`` multiplying the update (SPAM's warm-up;
    one kernel call per distinct scale). Returns the indices it applied; the rest is the caller's."""
    if not hyper.get("correct_bias", True):  # the kernel always corrects the bias
        return set()
    lr = float(hyper["lr"]) if isinstance(hyper["lr"], Tensor) else hyper["lr"]
    b1, b2 = hyper["betas"]
    by_scale: dict[float, list[int]] = {}
    for i in idx:
        u, s = updates[i], states[i]
        moments = (s["exp_avg"], s["exp_avg_sq"]) if "exp_avg" in s else ()
        if "momentum_scale" in s or not kernel_ok(u, params[i], s["step"], *moments):
            continue
        if not moments:
            s["exp_avg"] = torch.zeros_like(u)
            s["exp_avg_sq"] = torch.zeros_like(u)
        by_scale.setdefault(1.0 if scales is None else scales[i], []).append(i)
    applied: set[int] = set()
    for scale, group in by_scale.items():
        if hf_adamw_step([params[i] for i in group], [updates[i] for i in group],
                         [states[i]["exp_avg"] for i in group], [states[i]["exp_avg_sq"] for i in group],
                         [states[i]["step"] for i in group], lr=lr, beta1=b1, beta2=b2, eps=hyper["eps"],
                         weight_decay=hyper.get("weight_decay", 0.0), update_scale=scale):
            applied.update(group)
    return applied


def fused_adamw(convention: str = "torch") -> Transform:
    r"""Terminal fast path of ``chain(scale_by_adam(convention), scale_by_learning_rate(),
    add_decayed_weights("before" for torch, "after" for hf))``: applies the AdamW step to the
    parameters itself with torch's fused kernel (``torch._fused_adamw_``, one pass over each
    tensor) and returns ``None`` for every parameter it updated. ``convention="hf"`` (the
    transformers AdamW) maps its eps and decay placement onto the kernel's arguments
    (:func:`hf_adamw_step`). Same state (``exp_avg``, ``exp_avg_sq``, the shared ``step``),
    same hyperparameters (``lr, betas, eps, weight_decay`` and the shared ``momentum_scale``;
    ``correct_bias=False`` under hf takes the reference arithmetic). Parameters the kernel
    cannot take (a dtype other than the update's, sparse) go through the per-tensor reference
    arithmetic instead. Tested equal to the chain it replaces (tests/transforms/test_fast_paths.py).
    Under torch.compile every parameter takes the reference arithmetic with tensor coefficients
    (Inductor generates the fused kernel; ``torch._fused_adamw_`` does not trace), so a compiled
    step has no graph break.
    """
    _check("convention", convention, CONVENTIONS)
    reference = scale_by_adam(convention, foreach=False)
    hf = convention == "hf"

    def apply(p: Tensor, u: Tensor, lr: Scalar, wd: float) -> None:
        """``p`` after the update ``u`` (the direction, before ``-lr``) and the decoupled decay."""
        if wd and not hf:
            p.mul_(1 - lr * wd)
        if isinstance(lr, Tensor):  # compiled: a 0-d tensor learning rate cannot be an alpha
            p.add_(u.to(p.dtype).mul_(-lr))
        else:
            p.add_(u.to(p.dtype), alpha=-lr)
        if wd and hf:
            p.mul_(1 - lr * wd)

    def compiled(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper, lr: Scalar,
                 wd: float) -> Updates:
        live = [i for i, u in enumerate(updates) if u is not None]
        sub = reference.update([updates[i] for i in live], [states[i] for i in live], [params[i] for i in live],
                               hyper)
        out: Updates = list(updates)
        for i, u in zip(live, sub, strict=True):
            apply(params[i], u, lr, wd)
            out[i] = None
        return out

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        b1_base, b2 = hyper["betas"]
        lr, wd, eps = hyper["lr"], hyper.get("weight_decay", 0.0), hyper["eps"]
        out: Updates = list(updates)
        if compiling():
            return compiled(updates, states, params, hyper, lr, wd)
        lr_f = float(lr) if isinstance(lr, Tensor) else lr
        # one pass per parameter, reading the state dicts directly (through a Scoped view every
        # read is a Python call; on a model of many small tensors that costs more than the kernel)
        roots, pre = _roots(states)
        k_m, k_v = pre + "exp_avg", pre + "exp_avg_sq"
        kernel_hf = not hf or hyper.get("correct_bias", True)  # the kernel always corrects the bias
        groups: dict[tuple, tuple[list[int], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]] = {}
        for i, u in enumerate(updates):
            if u is None:
                continue
            s = roots[i]
            m = s.get(k_m)
            if m is None:
                m = s[k_m] = torch.zeros_like(u)
                s[k_v] = torch.zeros_like(u)
            ms = s.get("momentum_scale")
            b1 = b1_base if ms is None else b1_base * float(ms)
            p = params[i]
            step = s["step"]
            v = s[k_v]
            # kernel_ok, inlined (this loop runs once per parameter per step; the call costs ~0.5 us). The
            # kernel's own checks raise on a device mismatch, as the reference arithmetic would
            dt = u.dtype
            ok = (kernel_hf and dt is p.dtype and dt in _KERNEL_DTYPES and step.is_cpu and not u.is_sparse
                  and ((p.is_contiguous() and u.is_contiguous() and m.is_contiguous() and v.is_contiguous())
                       or _one_layout(u, p, m, v)))
            key = (b1, ok, dt, u.device)
            g = groups.get(key)
            if g is None:
                g = groups[key] = ([], [], [], [], [], [])
            g[0].append(i)
            g[1].append(p)
            g[2].append(u)
            g[3].append(m)
            g[4].append(v)
            g[5].append(step)
        for (b1, ok, _, _), (idx, ps, us, ms_, vs, steps) in groups.items():
            if ok and not hf:
                torch._fused_adamw_(ps, us, ms_, vs, [], steps, amsgrad=False, lr=lr_f, beta1=b1, beta2=b2,
                                    weight_decay=wd, eps=eps, maximize=False, grad_scale=None, found_inf=None)
            elif not (ok and hf_adamw_step(ps, us, ms_, vs, steps, lr=lr_f, beta1=b1, beta2=b2, eps=eps,
                                           weight_decay=wd)):
                sub = reference.update(us, [states[i] for i in idx], ps, hyper)
                for p, u in zip(ps, sub, strict=True):
                    apply(p, u, lr_f, wd)
            for i in idx:
                out[i] = None
        return out

    return Transform(lambda p, h: {}, update, "adam", True,
                     declare("fused_adamw", lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             **({"correct_bias": CORRECT_BIAS} if hf else {})))

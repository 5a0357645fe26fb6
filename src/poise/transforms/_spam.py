"""SPAM: spike-aware clipping against Adam's second moment, periodic momentum reset, and a
cosine warm-up after each reset."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise.transforms._adam import apply_hf_adamw
from poise.transforms._base import (
    LR,
    WEIGHT_DECAY,
    Hyper,
    State,
    Transform,
    Updates,
    compiling,
    declare,
    merge_reads,
    scoped,
)

__all__ = ["spam", "spam_warmup_scale"]


def spam_warmup_scale(warmup_step: float, warmup_steps: int) -> float:
    r"""``1 - d`` with the authors' ``CosineDecay(0.99, warmup_steps).get_dr``:
    ``d = 0.99 (1 + cos(pi s / (W + 1))) / 2`` for ``s < W``, else 0. So 0.01 right after a
    reset, rising to 1 over ``W`` steps."""
    if warmup_step >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1 + math.cos(math.pi * warmup_step / (warmup_steps + 1))) / 2


def _warmup_scale_tensor(warmup_step: Tensor, warmup_steps: int) -> Tensor:
    """:func:`spam_warmup_scale` of a 0-d tensor counter, branch-free (the torch.compile path)."""
    ramp = 1.0 - 0.99 * (1 + torch.cos(math.pi * warmup_step / (warmup_steps + 1))) / 2
    return torch.where(warmup_step >= warmup_steps, torch.ones_like(ramp), ramp)


def spam(inner: Transform, apply_hf: bool = False) -> Transform:
    r"""SPAM around an Adam transform ``inner`` (Huang et al., "SPAM: Spike-Aware Adam with
    Momentum Reset for Stable LLM Training", arXiv 2501.06842; TianjinYellow/SPAM-Optimizer).

    With ``c`` the shared clock, ``T`` = ``hyper["DeltaT"]``, ``theta`` = ``hyper["threshold"]``,
    ``A`` = ``hyper["grad_accu_steps"]``, ``W`` = ``hyper["warmup_steps"]``:

    * momentum reset: when ``c % T == 0`` the moments of ``inner`` are zeroed (the shared step
      is *not* reset: the authors keep bias-correcting from the old count);
    * spike clipping: when ``theta > 0``, ``c >= A`` and ``c % T >= A``, entries with
      ``g^2 > theta v`` (``v`` = ``inner``'s second moment before this step) become
      ``sign(g) sqrt(theta v)``; records ``clipped_frac``;
    * warm-up: ``inner``'s output is multiplied by :func:`spam_warmup_scale` of a counter that
      restarts at 0 on the step before each reset (state ``warmup_step``, starting at
      ``W + 1``: no warm-up at the start of training).

    Dense only: the authors' sparse-momentum ``density`` masks are not implemented. Declared
    defaults are the authors' (``DeltaT=500, threshold=5000, grad_accu_steps=20,
    warmup_steps=150``). ``threshold`` is also CLASSP's gate: to chain both, alias one with
    :func:`poise.transforms.rename`. Under torch.compile the same rules run as 0-d tensor
    arithmetic and masks (no host sync, no graph break).

    ``apply_hf=True`` (with ``inner = scale_by_adam("hf")``) is the fast path of ``chain(spam(inner),
    scale_by_learning_rate(), add_decayed_weights("after"))``: the clipped gradient, the moments,
    the warm-up factor, ``-lr`` and the decay go through torch's one-pass fused AdamW kernel
    (:func:`poise.transforms._adam.hf_adamw_step`, one call per warm-up factor) and those
    parameters yield ``None``; the rest (``correct_bias=False``, a dtype the kernel refuses, a
    compiled step) take the chain. Same state. Tested equal to the chain to float rounding.
    """

    def update_compiled(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        T, theta = hyper["DeltaT"], hyper["threshold"]
        A, W = hyper["grad_accu_steps"], hyper["warmup_steps"]
        inner_states = scoped(states, "inner.")
        scales: list[Tensor | None] = []
        for u, s, si in zip(updates, states, inner_states, strict=True):
            if u is None:
                scales.append(None)
                continue
            c = s["clock"]
            phase = torch.remainder(c, T)
            if "warmup_step" not in s:
                s["warmup_step"] = torch.tensor(float(W + 1))
            if "exp_avg" in si:
                si["exp_avg"].masked_fill_(phase == 0, 0)
                si["exp_avg_sq"].masked_fill_(phase == 0, 0)
            if theta and "exp_avg_sq" in si:
                bound = (theta * si["exp_avg_sq"]).sqrt_()
                mask = (u.abs() > bound) & (c >= A) & (phase >= A)
                s["clipped_frac"] = mask.float().mean()
                u.copy_(torch.where(mask, u.sign() * bound, u))
            else:
                s["clipped_frac"] = torch.zeros(())
            scales.append(_warmup_scale_tensor(s["warmup_step"], W))
        out = inner.update(updates, inner_states, params, hyper)
        for u, s, scale in zip(out, states, scales, strict=True):
            if scale is None:
                continue
            if u is not None:
                u.mul_(scale)
            s["warmup_step"] += 1
            s["warmup_step"].masked_fill_(torch.remainder(s["clock"] + 1, T) == 0, 0)
        return out

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        if compiling():
            return update_compiled(updates, states, params, hyper)
        T, theta = hyper["DeltaT"], hyper["threshold"]
        A, W = hyper["grad_accu_steps"], hyper["warmup_steps"]
        inner_states = scoped(states, "inner.")
        scales = [1.0] * len(updates)
        live = [i for i, u in enumerate(updates) if u is not None]
        zeros = torch.zeros(len(live), device=updates[live[0]].device).unbind() if live else ()
        for j, i in enumerate(live):
            u, s, si = updates[i], states[i], inner_states[i]
            c = int(s["clock"])
            if "warmup_step" not in s:
                s["warmup_step"] = torch.tensor(float(W + 1))
            if c % T == 0 and "exp_avg" in si:
                si["exp_avg"].zero_()
                si["exp_avg_sq"].zero_()
            if theta and c >= A and c % T >= A and "exp_avg_sq" in si:
                bound = torch.mul(si["exp_avg_sq"], theta).sqrt_()
                # the count before the clamp; clamping to [-b, b] is sign(g) b where |g| > b, bit for bit
                s["clipped_frac"] = torch.gt(u.abs(), bound).sum().float().div_(u.numel())
                u.clamp_(min=bound.neg(), max=bound)
            else:
                s["clipped_frac"] = zeros[j]  # one allocation for every tensor that was not clipped
            scales[i] = spam_warmup_scale(float(s["warmup_step"]), W)
        applied = apply_hf_adamw(updates, inner_states, params, live, hyper, scales) if apply_hf else set()
        pending = [None if i in applied else u for i, u in enumerate(updates)] if applied else updates
        out = inner.update(pending, inner_states, params, hyper)
        scaled = [i for i in live if out[i] is not None]
        if scaled:  # the warm-up factor and the counters of the group in one call each
            torch._foreach_mul_([out[i] for i in scaled], [scales[i] for i in scaled])
        if live:
            torch._foreach_add_([states[i]["warmup_step"] for i in live], 1.0)
        for i in live:
            if (int(states[i]["clock"]) + 1) % T == 0:
                states[i]["warmup_step"].zero_()
        return out

    own = declare("spam", DeltaT=(500, "SPAM momentum-reset interval"),
                  threshold=(5000, "SPAM spike bound theta (g^2 > theta v)"),
                  grad_accu_steps=(20, "SPAM steps without clipping after a reset"),
                  warmup_steps=(150, "SPAM warm-up length after a reset"),
                  **({"lr": LR, "weight_decay": WEIGHT_DECAY} if apply_hf else {}))
    return Transform(lambda p, h: {}, update, "spam", inner.shard_safe, merge_reads(inner.reads, own))

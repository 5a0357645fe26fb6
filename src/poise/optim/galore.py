"""GaLore-AdamW as a chain of transforms."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._lowrank import LowRankOptimizer
from poise.transforms import add_decayed_weights, chain, project_low_rank, scale_by_adam, scale_by_learning_rate
from poise.transforms._adam import apply_hf_adamw
from poise.transforms._base import Hyper, State, Transform, Updates, compiling, scoped
from poise.transforms._lowrank import PROJ_TYPES, _side

__all__ = ["GaLoreAdamW", "fused_galore_adamw"]


def fused_galore_adamw() -> Transform:
    r"""Terminal fast path of ``chain(project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(),
    add_decayed_weights("after"))`` (GaLore-AdamW, arXiv 2403.03507): for each projected matrix
    ``G`` (``m x n``) with projector ``P`` and HF-Adam moments ``M, V`` of ``R``::

        R = G P^T  (right; left: P^T G)                       one product, G read once
        M <- b1 M + (1-b1) R,  V <- b2 V + (1-b2) R^2         foreach over the group's matrices
        W <- W - lr * scale * sqrt(bc2)/bc1 * (M / (sqrt(V) + eps)) P   one addmm_ into W
        W <- W (1 - lr wd)

    The full-rank update is never formed (the back projection is accumulated into the weight by
    ``addmm_``, the bias correction and ``-lr * scale`` ride in its ``alpha``), the moments of all
    projected matrices of a group are updated by ``torch._foreach_*`` kernels, and nothing of full
    rank is allocated. Tensors that are not projected (1-D tensors, groups without ``rank``) take
    HF AdamW in torch's one-pass kernel (:func:`poise.transforms._adam.apply_hf_adamw`). Same state
    keys (``proj``, ``refreshed``, ``inner.exp_avg``, ``inner.exp_avg_sq``), same refresh schedule
    and hyperparameters as ``project_low_rank`` (to which it hands anything else: ``full``
    projections, Q-GaLore's quantized projectors, a parameter whose dtype differs from its
    gradient's, ``correct_bias=False``, a compiled step), so checkpoints move between the two.
    Tested equal to the chain to float32 rounding (the bias correction folded into ``alpha`` rounds
    once less) and replaying the authors' trajectory.
    """
    reference = project_low_rank(scale_by_adam("hf"), apply=True)

    def fast(u: Tensor | None, s: State, p: Tensor, proj_type: str) -> bool:
        if u is None or u.dim() < 2 or p.dtype != u.dtype or not p.is_contiguous() or "momentum_scale" in s:
            return False
        if "proj_codes" in s or "gap" in s:
            return False
        return _side((u.shape[0], u.numel() // u.shape[0]), proj_type) in ("right", "left")

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        proj_type = hyper.get("proj_type", "std")
        if hyper.get("proj_bits") is not None or compiling() or proj_type not in PROJ_TYPES:
            return reference.update(updates, states, params, hyper)
        projected = hyper.get("rank") is not None
        idx, plain, rest = [], [], []
        for i, (u, s, p) in enumerate(zip(updates, states, params, strict=True)):
            if u is None:
                continue
            if projected and fast(u, s, p, proj_type):
                idx.append(i)
            elif not projected or u.dim() < 2:
                plain.append(i)  # not projected: HF AdamW, in torch's fused kernel where it takes them
            else:
                rest.append(i)
        out: Updates = list(updates)
        lr = float(hyper["lr"]) if isinstance(hyper["lr"], Tensor) else hyper["lr"]
        applied = apply_hf_adamw(updates, scoped(states, "inner."), params, plain, hyper) if plain else set()
        for i in plain:
            if i in applied:
                out[i] = None
            else:
                rest.append(i)
        rest.sort()
        if rest:
            sub = reference.update([updates[i] for i in rest], [states[i] for i in rest], [params[i] for i in rest],
                                   hyper)
            for i, r in zip(rest, sub, strict=True):
                out[i] = r
        if not idx:
            return out
        rank, gap, scale = hyper["rank"], hyper["update_proj_gap"], hyper["scale"]
        b1, b2 = hyper["betas"]
        eps, correct = hyper["eps"], hyper.get("correct_bias", True)
        decay = lr * hyper.get("weight_decay", 0.0)
        lows, sides, projs = [], [], []
        for i in idx:
            u, s = updates[i], states[i]
            g = u.reshape(u.shape[0], -1)
            side = _side((g.shape[0], g.shape[1]), proj_type)
            refresh = "proj" not in s or (int(s["clock"]) - 1) % gap == 0  # steps 1, gap+1, ... (the authors')
            s["refreshed"] = torch.tensor(float(refresh))
            if refresh:
                U, _, Vh = torch.linalg.svd(g.float(), full_matrices=False)
                s["proj"] = (U[:, :rank] if side == "left" else Vh[:rank, :]).to(g.dtype, copy=True).contiguous()
            P = s["proj"]
            lows.append(torch.mm(g, P.t()) if side == "right" else torch.mm(P.t(), g))
            sides.append(side)
            projs.append(P)
            if "inner.exp_avg" not in s:
                s["inner.exp_avg"] = torch.zeros_like(lows[-1])
                s["inner.exp_avg_sq"] = torch.zeros_like(lows[-1])
        ms = [states[i]["inner.exp_avg"] for i in idx]
        vs = [states[i]["inner.exp_avg_sq"] for i in idx]
        torch._foreach_lerp_(ms, lows, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, lows, lows, value=1 - b2)
        den = torch._foreach_sqrt(vs)
        torch._foreach_add_(den, eps)
        directions = torch._foreach_div(ms, den)
        for i, n, side, P in zip(idx, directions, sides, projs, strict=True):
            t = float(states[i]["step"])
            c = math.sqrt(1 - b2**t) / (1 - b1**t) if correct else 1.0
            p = params[i]
            w = p.view(p.shape[0], -1)
            if side == "right":
                w.addmm_(n, P, alpha=-lr * scale * c)
            else:
                w.addmm_(P, n, alpha=-lr * scale * c)
            if decay:
                p.mul_(1 - decay)
            out[i] = None
        return out

    return Transform(lambda p, h: {}, update, "galore", reads=reference.reads)


@register("optimizer", "galore_adamw")
class GaLoreAdamW(LowRankOptimizer):
    r"""GaLore-AdamW (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection", arXiv 2403.03507), replaying ``galore_torch.GaLoreAdamW``
    (jiaweizzhao/GaLore, pip galore-torch 1.0)::

        chain(project_low_rank(scale_by_adam("hf")),   # Adam on P^T G (or G P^T), projected back x scale
              scale_by_learning_rate(),
              add_decayed_weights("after"))

    Projected parameters are the tensors of 2 or more dims in param groups with ``rank`` (and
    ``update_proj_gap``, ``scale``, ``proj_type``), as in the authors' API; other groups, and
    1-D tensors in a projected group, get plain (HF-style) AdamW. The group keys are declared
    in ``group_keys`` and are also keyword arguments, defaults for every projected group:
    ``GaLoreAdamW(model.parameters(), rank=8)`` projects every matrix (the way Hugging Face's
    ``Trainer(optimizer_cls_and_kwargs=(GaLoreAdamW, {"rank": 8}))`` builds it);
    :func:`poise.optim.low_rank_groups` builds the groups from a model (linear weights only).
    With no projected tensor the constructor raises ``ValueError`` (it would be plain AdamW)
    unless ``allow_unprojected=True``, which warns. ``projected_summary()`` says what is
    projected.

    Defaults are the authors': ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0,
    update_proj_gap=200, scale=1.0, proj_type="std"``. ``fused=True`` (default) runs
    :func:`fused_galore_adamw`: projection, moments (foreach) and back projection with the bias
    correction, ``-lr * scale`` and the addition in one ``addmm_`` (no full-rank temporary),
    tested equal to the chain; ``fused=False`` runs the chain as written.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered
    group_keys: ClassVar[dict[str, Any]] = {"rank": None, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, fused: bool = True,
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", allow_unprojected: bool = False):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        self._init_low_rank(dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type))
        t = chain(fused_galore_adamw() if fused else project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(),
                  add_decayed_weights("after"), name="galore_adamw")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias), t, nonfinite, diagnostics, max_consecutive_skips)
        self._refuse_unprojected(allow_unprojected)

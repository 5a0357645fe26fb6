"""Low-rank gradient projection (GaLore)."""

from __future__ import annotations

import torch
from torch import Tensor

from poise.transforms._base import LR, WEIGHT_DECAY, Hyper, State, Transform, Updates, declare, merge_reads, scoped

__all__ = ["PROJ_TYPES", "dequantize", "project_low_rank", "quantize"]


def quantize(x: Tensor, bits: int, group_size: int, stochastic: bool = False,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Asymmetric min-max uniform quantization per group of ``group_size`` consecutive
    entries (Q-GaLore's ``proj_bits``/``weight_bits``): ``s = (max - min) / (2^b - 1)``,
    ``q = clamp(round((x - min) / s), 0, 2^b - 1)`` stored as uint8 (one code a byte, no
    packing, as the authors); ``stochastic`` rounds up with probability equal to the
    fractional part. Returns ``(codes, scales, mins)``; :func:`dequantize` inverts it."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; valid: 1..8")
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    g = torch.cat([flat, flat.new_zeros(pad)]).view(-1, group_size)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    t = (g - lo) / scale
    if stochastic:
        t = torch.floor(t + torch.rand(t.shape, generator=generator, device=t.device))
    else:
        t = torch.round(t)
    return t.clamp_(0, 2**bits - 1).to(torch.uint8), scale.squeeze(1), lo.squeeze(1)


def dequantize(codes: Tensor, scale: Tensor, lo: Tensor, shape: torch.Size | tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> Tensor:
    g = codes.float() * scale[:, None] + lo[:, None]
    n = 1
    for d in shape:
        n *= d
    return g.reshape(-1)[:n].view(shape).to(dtype)

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def _side(shape: tuple[int, int], proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def project_low_rank(inner: Transform, apply: bool = False) -> Transform:
    r"""GaLore (Zhao et al., arXiv 2403.03507): run ``inner`` on a rank-``r`` projection of
    each matrix gradient and project its output back, times ``alpha``. Replays
    jiaweizzhao/GaLore ``galore_projector.py`` (pip ``galore-torch`` 1.0).

    For ``G`` (``m x n``) with SVD ``G = U S V^T``: right projection ``P = V[:, :r]^T``,
    ``R = G P^T`` (``m x r``), back ``inner(R) P``; left ``P = U[:, :r]``, ``R = P^T G``,
    back ``P inner(R)``; ``full`` does both. ``proj_type`` ``std`` projects the larger side
    away (right when ``m >= n``), ``reverse_std`` the other. ``P`` is recomputed from the
    current gradient (SVD in float32) on the first step and every ``update_proj_gap`` steps
    after (the official timing: steps ``1, gap+1, 2 gap+1, ...`` of the shared ``clock``, so a
    momentum reset inside ``inner`` does not move it); ``inner``'s state
    (Adam's moments) is *not* reprojected when ``P`` changes, as in the official code.

    Q-GaLore (Zhang et al., arXiv 2407.08296; VITA-Group/Q-GaLore): with
    ``hyper["proj_bits"]`` the projector is stored quantized (uint8 codes of
    ``proj_bits`` bits per ``proj_group_size`` group, see :func:`quantize`) and used
    dequantized; with ``hyper["cos_threshold"]`` each refresh pushes the cosine between the
    new and the previous first singular vector into a queue of ``queue_size``; once it is
    full and its mean is at least ``cos_threshold``, this tensor's gap is multiplied by
    ``gamma_proj`` (the queue is kept, so the gap can keep growing, as the authors').

    Applies to parameters of groups whose ``hyper["rank"]`` is set (not None); other groups
    pass straight to ``inner``. In a projected group, tensors of fewer than two dims (biases,
    norm gains) are not projected either: they get ``inner``'s update as it is, without
    ``scale`` (the authors' projector would fail on them). Tensors of more than two dims are
    projected as ``(shape[0], -1)`` matrices (the official ``GaLoreProjectorTensor`` is
    broken; see docs/algorithms/galore.md). Reads ``rank`` and, where it is set,
    ``update_proj_gap`` (200), ``scale`` (1.0), ``proj_type`` ("std") and Q-GaLore's
    ``proj_bits``, ``proj_group_size``, ``cos_threshold``, ``gamma_proj``, ``queue_size``
    (declared in ``reads``). State: ``proj`` (and ``proj_b`` for ``full``) as plain tensors,
    so checkpoints load with ``weights_only=True``.

    ``apply=True`` is the fused fast path of ``chain(project_low_rank(inner),
    scale_by_learning_rate(), add_decayed_weights("after"))`` for the projected
    parameters: the back projection, ``-lr * scale`` and the addition to the parameter are
    one ``addmm_``, then ``p <- p (1 - lr wd)``; those parameters yield ``None``. Tested
    equal to the unfused chain.
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        if hyper.get("rank") is None:
            return inner.update(updates, scoped(states, "inner."), params, hyper)
        rank, gap, scale = hyper["rank"], hyper["update_proj_gap"], hyper["scale"]
        proj_type = hyper.get("proj_type", "std")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={proj_type!r}; valid choices: {', '.join(PROJ_TYPES)}")
        low: Updates = []
        sides: list[str | None] = []
        for u, s in zip(updates, states, strict=True):
            if u is None or u.dim() < 2:
                low.append(u)
                sides.append(None)
                continue
            g = u.reshape(u.shape[0], -1)
            side = _side((g.shape[0], g.shape[1]), proj_type)
            gap = int(s["gap"]) if "gap" in s else gap
            # the clock, not the bias-correction step: a momentum reset (which sets the step back)
            # must not move the refresh schedule; the two are equal when nothing resets
            refresh = ("proj" not in s and "proj_codes" not in s) or (int(s["clock"]) - 1) % gap == 0
            s["refreshed"] = torch.tensor(float(refresh))
            if refresh:
                U, _, Vh = torch.linalg.svd(g.float(), full_matrices=False)
                # own contiguous copies: a slice would keep the whole SVD alive and is slower in matmul
                if side in ("left", "full"):
                    s["proj"] = U[:, :rank].to(g.dtype, copy=True).contiguous()
                if side == "right":
                    s["proj"] = Vh[:rank, :].to(g.dtype, copy=True).contiguous()
                if side == "full":
                    s["proj_b"] = Vh[:rank, :].to(g.dtype, copy=True).contiguous()
                if hyper.get("proj_bits") is not None:
                    _q_galore_refresh(s, hyper, U, Vh, side, gap)
            P = _projector(s, g.dtype)
            if side == "right":
                low.append(g @ P.t())
            elif side == "left":
                low.append(P.t() @ g)
            else:
                low.append((P.t() @ g) @ s["proj_b"].t())
            sides.append(side)
        res = inner.update(low, scoped(states, "inner."), params, hyper)
        out: Updates = []
        lr = float(hyper["lr"]) if apply else 0.0
        decay = lr * hyper.get("weight_decay", 0.0)
        for r, u, s, side, p in zip(res, updates, states, sides, params, strict=True):
            if r is None or side is None:
                out.append(r)
                continue
            P = _projector(s, r.dtype)
            if apply and side in ("right", "left") and p.dtype == r.dtype and p.is_contiguous():
                p2 = p.view(p.shape[0], -1)
                if side == "right":
                    p2.addmm_(r, P, alpha=-lr * scale)
                else:
                    p2.addmm_(P, r, alpha=-lr * scale)
                if decay:
                    p.mul_(1 - decay)
                out.append(None)
                continue
            if side == "right":
                full = r @ P
            elif side == "left":
                full = P @ r
            else:
                full = (P @ r) @ s["proj_b"]
            full = full.mul_(scale).reshape(u.shape)
            if apply:
                p.add_(full.to(p.dtype), alpha=-lr)
                if decay:
                    p.mul_(1 - decay)
                full = None
            out.append(full)
        return out

    own = declare(
        "galore", rank=(None, "GaLore projection rank (None: not projected)"),
        update_proj_gap=(200, "GaLore projector refresh interval", "rank"),
        scale=(1.0, "GaLore scale alpha of the projected update", "rank"),
        proj_type=("std", "GaLore projection side", "rank"),
        proj_bits=(None, "Q-GaLore projector bits (None: float projector)", "rank"),
        proj_group_size=(256, "Q-GaLore projector quantization group size", "proj_bits"),
        cos_threshold=(None, "Q-GaLore adaptive-gap cosine threshold (None: fixed gap)", "proj_bits"),
        gamma_proj=(2, "Q-GaLore gap growth factor", "cos_threshold"),
        queue_size=(5, "Q-GaLore cosine queue length", "cos_threshold"),
        **({"lr": LR, "weight_decay": WEIGHT_DECAY} if apply else {}))
    return Transform(lambda p, h: {}, update, "galore", reads=merge_reads(inner.reads, own))


def _q_galore_refresh(s: State, hyper: Hyper, U: Tensor, Vh: Tensor, side: str, gap: int) -> None:
    """Quantize the fresh projector and adapt this tensor's refresh gap (Q-GaLore)."""
    bits, gs = hyper["proj_bits"], hyper.get("proj_group_size", 256)
    P = s.pop("proj")
    codes, scale, lo = quantize(P, bits, gs)
    s["proj_codes"], s["proj_scales"], s["proj_mins"] = codes, scale, lo
    s["proj_shape"] = torch.tensor(list(P.shape))
    if hyper.get("cos_threshold") is None:
        return
    vec = (Vh[0] if side == "right" else U[:, 0]).float()
    if "last_vec" in s and s["last_vec"].shape == vec.shape:
        cos = torch.dot(vec, s["last_vec"]) / (vec.norm() * s["last_vec"].norm()).clamp_min(1e-30)
        q = torch.cat([s.get("cos_queue", torch.zeros(0)), cos.reshape(1)])[-hyper.get("queue_size", 5):]
        s["cos_queue"] = q
        if len(q) == hyper.get("queue_size", 5) and float(q.mean()) >= hyper["cos_threshold"]:
            s["gap"] = torch.tensor(int(gap * hyper.get("gamma_proj", 2)))
    s["last_vec"] = vec


def _projector(s: State, dtype: torch.dtype) -> Tensor:
    """The projector: stored as is, or dequantized from its codes (Q-GaLore)."""
    if "proj" in s:
        return s["proj"]
    shape = tuple(int(d) for d in s["proj_shape"])
    return dequantize(s["proj_codes"], s["proj_scales"], s["proj_mins"], shape, dtype)

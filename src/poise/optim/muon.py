"""Muon (orthogonalised momentum for hidden matrices) with AdamW for the rest, as transforms."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import add_decayed_weights, chain, fused_adamw, scale_by_adam, scale_by_learning_rate
from poise.transforms._base import LR, WEIGHT_DECAY, Hyper, State, Transform, Updates, declare, merge_reads

__all__ = ["NS_COEFFICIENTS", "Muon", "muon_by_group", "newton_schulz", "scale_by_muon"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon's quintic (a, b, c)
CONVENTIONS = ("keller", "torch")
ADJUST_LR = ("original", "match_rms_adamw")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; valid choices: {', '.join(choices)}")


def newton_schulz(G: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16, convention: str = "keller") -> Tensor:
    r"""Approximate orthogonalisation ``U V^T`` of a matrix ``G = U S V^T`` by the quintic
    Newton–Schulz iteration of Muon (Jordan et al. 2024, kellerjordan.github.io/posts/muon;
    Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982)::

        X_0 = G / (||G||_F + eps)            (transposed first when G has more rows than columns)
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,   A_k = X_k X_k^T,   k < steps

    ``(a, b, c)`` = ``coefficients`` (default (3.4445, -4.7750, 2.0315)), run in ``dtype``
    (bfloat16, as the reference). It does not converge to ``U V^T`` exactly: the singular values
    end in about [0.7, 1.2], by design. Returns a tensor of ``dtype`` and ``G``'s shape. A batch
    ``(n, rows, cols)`` is orthogonalised matrix by matrix in one pass of batched products (on CPU the
    result is bit for bit the matrices' one by one; tested); :func:`scale_by_muon` batches the matrices
    of one shape this way.

    ``convention="keller"`` is KellerJordan/Muon ``muon.py`` ``zeropower_via_newtonschulz5``
    (three separate products and sums per iteration, ``X / (||X|| + eps)``);
    ``convention="torch"`` is ``torch.optim._muon._zeropower_via_newtonschulz`` (the two sums
    fused into ``addmm``, ``X / max(||X||, eps)``). They are the same polynomial; in bfloat16 they
    round differently.
    """
    if G.dim() not in (2, 3):
        raise ValueError(f"newton_schulz takes a matrix (or a batch of matrices); got a tensor of shape "
                         f"{tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    if convention == "keller":
        X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
        for _ in range(steps):
            A = X @ X.mT
            B = b * A + c * A @ A
            X = a * X + B @ X
    elif convention == "torch":
        if X.dim() == 3:
            X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
            for _ in range(steps):
                A = X @ X.mT
                X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
        else:
            X = X / X.norm().clamp(min=eps)
            for _ in range(steps):
                A = X @ X.T
                X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    else:
        _choice("convention", convention, CONVENTIONS)
    return X.mT if tall else X


def _shape_factor(rows: int, cols: int, adjust_lr: str) -> float:
    """The per-matrix update scale: ``sqrt(max(1, rows/cols))`` ("original", Keller Jordan) or
    ``0.2 sqrt(max(rows, cols))`` ("match_rms_adamw", Moonshot; arXiv 2502.16982)."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def scale_by_muon(convention: str = "keller", ns_dtype: torch.dtype = torch.bfloat16, apply: bool = False) -> Transform:
    r"""Muon's direction for a matrix gradient ``G`` (``p``: ``m x n``; a tensor of more dims is
    viewed as ``(shape[0], -1)``, as the reference does for convolution filters)::

        B <- mu B + (1 - mu) G                  (buf.lerp_(G, 1 - mu))
        M  = (1 - mu) G + mu B   if nesterov    (G.lerp(B, mu)), else B
        O  = NS_k(M) * s(m, n)                  (:func:`newton_schulz`, s from ``adjust_lr``)

    Symbols -> group keys: ``mu`` = ``momentum`` (0.95), ``nesterov`` (True), ``k`` = ``ns_steps``
    (5), ``(a, b, c)`` = ``ns_coefficients``, the normalisation's eps = ``ns_eps`` (1e-7),
    ``s`` = ``adjust_lr``: ``"original"`` ``sqrt(max(1, m/n))`` or ``"match_rms_adamw"``
    ``0.2 sqrt(max(m, n))``. State: ``momentum_buffer`` (shape of ``p``).

    ``convention``: ``"keller"`` replays KellerJordan/Muon ``muon.py`` ``muon_update`` (the
    Nesterov blend written into the incoming update, i.e. ``p.grad``; ``O *= s`` in ``ns_dtype``);
    ``"torch"`` replays ``torch.optim.Muon`` (the blend in a new tensor; ``s`` folded into the
    learning rate). The output has the parameter's dtype (``ns_dtype`` only inside the iteration).

    ``apply=True`` is the fused fast path of ``chain(scale_by_muon(...), scale_by_learning_rate(),
    add_decayed_weights("before"))``: it applies ``p <- p (1 - lr wd) - lr O`` itself in the
    references' order of operations (``p.mul_``, then ``p.add_(O, alpha=-lr)`` with ``O`` still in
    ``ns_dtype``, so the result is theirs bit for bit) and yields ``None``; tested equal to the chain.
    """
    _choice("convention", convention, CONVENTIONS)

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        mu, nesterov = hyper["momentum"], hyper["nesterov"]
        steps, coef, eps, adjust = hyper["ns_steps"], tuple(hyper["ns_coefficients"]), hyper["ns_eps"], \
            hyper["adjust_lr"]
        out: Updates = []
        lr = hyper["lr"] if apply else 0.0
        lr = float(lr) if isinstance(lr, Tensor) else lr
        decay = lr * hyper.get("weight_decay", 0.0) if apply else 0.0
        mats: list[Tensor | None] = []  # per parameter: the momentum matrix to orthogonalise (None: no gradient)
        for g, s in zip(updates, states, strict=True):
            if g is None:
                mats.append(None)
                continue
            if g.dim() < 2:
                raise ValueError(f"scale_by_muon takes matrices (2 or more dims); got shape {tuple(g.shape)}: "
                                 "route it to AdamW (use_muon=False)")
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = torch.zeros_like(g)
            buf = s["momentum_buffer"]
            buf.lerp_(g, 1 - mu)
            if nesterov:
                m = g.lerp_(buf, mu) if convention == "keller" else g.lerp(buf, mu)
            else:
                m = buf
            mats.append(m.reshape(m.shape[0], -1))
        # matrices of one shape go through Newton-Schulz together (batched products: the same bits, fewer calls)
        orth: list[Tensor | None] = [None] * len(mats)
        same: dict[tuple[Any, ...], list[int]] = {}
        for i, mat in enumerate(mats):
            if mat is not None:
                same.setdefault((tuple(mat.shape), mat.device), []).append(i)
        for idx in same.values():
            if len(idx) == 1:
                orth[idx[0]] = newton_schulz(mats[idx[0]], steps, coef, eps, ns_dtype, convention)  # type: ignore[arg-type]
            else:
                batch = newton_schulz(torch.stack([mats[i].to(ns_dtype) for i in idx]),  # type: ignore[union-attr]
                                      steps, coef, eps, ns_dtype, convention)
                for j, i in enumerate(idx):
                    orth[i] = batch[j]
        for o, mat, p in zip(orth, mats, params, strict=True):
            if o is None or mat is None:
                out.append(None)
                continue
            factor = _shape_factor(mat.shape[0], mat.shape[1], adjust)
            if convention == "keller":
                o.mul_(factor)  # in ns_dtype, as the reference (the iteration's output is a new tensor)
                step_lr = lr
            else:
                step_lr = lr * factor
            if o.shape != p.shape:
                o = o.reshape(p.shape)
            if apply:
                if decay:
                    p.mul_(1 - decay)
                p.add_(o, alpha=-step_lr)
                out.append(None)
                continue
            u = o.to(p.dtype, copy=True)
            if convention == "torch":
                u.mul_(factor)
            out.append(u)
        return out

    reads = declare("muon", momentum=(0.95, "Muon momentum mu"), nesterov=(True, "Muon Nesterov momentum on/off"),
                    ns_steps=(5, "Newton-Schulz iterations"),
                    ns_coefficients=(NS_COEFFICIENTS, "Newton-Schulz quintic coefficients (a, b, c)"),
                    ns_eps=(1e-7, "Newton-Schulz normalisation epsilon"),
                    adjust_lr=("original", "Muon per-matrix update scale rule"),
                    **({"lr": LR, "weight_decay": WEIGHT_DECAY} if apply else {}))
    return Transform(lambda p, h: {}, update, "muon", False, reads)


def muon_by_group(muon: Transform, adam: Transform, key: str = "use_muon") -> Transform:
    """Route each param group to one of two transforms by its ``key`` (True: ``muon``, False:
    ``adam``; KellerJordan's ``MuonWithAuxAdam`` ``use_muon`` flag), each keeping its state under
    its own names. A group without the key (None) is routed per tensor: 2 or more dims to
    ``muon``, the rest to ``adam``. Reads what either branch reads, and ``key``."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        flag = hyper.get(key)
        if flag is not None:
            return (muon if flag else adam).update(updates, states, params, hyper)
        out: Updates = list(updates)
        for t, want in ((muon, True), (adam, False)):
            idx = [i for i, p in enumerate(params) if (p.dim() >= 2) == want]
            if idx:
                sub = t.update([updates[i] for i in idx], [states[i] for i in idx], [params[i] for i in idx], hyper)
                for i, u in zip(idx, sub, strict=True):
                    out[i] = u
        return out

    own = declare("route", **{key: (None, "Muon routing (True: Muon, False: AdamW, None: by ndim)")})
    return Transform(lambda p, h: {}, update, "route", False, merge_reads(muon.reads, adam.reads, own))


def _tensor(p: Any) -> Tensor:
    return p[1] if isinstance(p, tuple) else p


@register("optimizer", "muon")
class Muon(TransformOptimizer):
    r"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
    kellerjordan.github.io/posts/muon; Liu et al., arXiv 2502.16982) for the matrices, AdamW for
    everything else: KellerJordan/Muon ``muon.py`` ``SingleDeviceMuonWithAuxAdam``, with the
    routing automatic::

        use_muon groups:  chain(scale_by_muon(convention),       # O = NS_5(nesterov(B)) * s(m, n)
                                scale_by_learning_rate(),         # - lr O
                                add_decayed_weights("before"))    # p <- p (1 - lr wd) - lr O
        other groups:     AdamW (torch.optim.AdamW's arithmetic; the reference's ``adam_update``)

    **Routing.** A param group with ``use_muon`` is taken as given (True: every tensor must have 2
    or more dims; False: AdamW). A group without it is split: its tensors of 2 or more dims form a
    ``use_muon=True`` group, the rest (biases, gains) a ``use_muon=False`` group, each keeping the
    group's other settings. Embeddings and output heads are matrices too, and the reference
    recommends AdamW for them: give them a group with ``"use_muon": False``.

    Arguments (the reference's names; Muon's defaults are its defaults): ``lr`` (0.02, in units of
    spectral norm per step), ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5),
    ``weight_decay`` (0); AdamW groups: ``betas`` (0.9, 0.95), ``eps`` (1e-10), ``adam_lr`` (None:
    the group's ``lr``; the reference's AdamW default is 3e-4), ``adam_weight_decay`` (None: the
    group's ``weight_decay``). ``adjust_lr``: ``"original"`` (scale ``sqrt(max(1, m/n))``) or
    ``"match_rms_adamw"`` (``0.2 sqrt(max(m, n))``, Moonshot's, so one ``lr`` serves both kinds
    of groups). ``convention``: ``"keller"`` (KellerJordan/Muon, default) or ``"torch"``
    (``torch.optim.Muon``: the sums of the iteration fused in ``addmm``, the shape scale in the
    learning rate; torch's ``eps`` is ``ns_eps`` here). ``ns_coefficients``, ``ns_eps`` (1e-7) and
    ``ns_dtype`` (bfloat16) set the Newton–Schulz iteration (:func:`newton_schulz`).
    ``fused=True`` (default) applies each update in the reference's order of operations (bit for
    bit); ``fused=False`` runs the chains as written (equal to float32 rounding).

    State: ``muon.momentum_buffer`` (4 bytes per entry in float32) for Muon matrices,
    ``adam.exp_avg`` / ``adam.exp_avg_sq`` for the rest.
    """

    shard_safe = False  # Newton-Schulz reads the whole matrix: DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-10, adam_lr: float | None = None,
                 adam_weight_decay: float | None = None, adjust_lr: str = "original", convention: str = "keller",
                 ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS, ns_eps: float = 1e-7,
                 ns_dtype: torch.dtype = torch.bfloat16, fused: bool = True, nonfinite: str = "raise",
                 diagnostics: bool = False, max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        _check.in_range("momentum", momentum, 0.0, 1.0)
        _check.positive_int("ns_steps", ns_steps)
        _check.in_range("ns_eps", ns_eps, 0.0, float("inf"))
        if adam_lr is not None:
            _check.in_range("adam_lr", adam_lr, 0.0, float("inf"))
        if adam_weight_decay is not None:
            _check.in_range("adam_weight_decay", adam_weight_decay, 0.0, float("inf"))
        _choice("adjust_lr", adjust_lr, ADJUST_LR)
        _choice("convention", convention, CONVENTIONS)
        if not (isinstance(ns_coefficients, (tuple, list)) and len(ns_coefficients) == 3):
            raise ValueError(f"ns_coefficients={ns_coefficients!r} must be three numbers (a, b, c)")
        if ns_dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"ns_dtype={ns_dtype}; valid choices: torch.bfloat16, torch.float16, torch.float32, "
                             "torch.float64")
        self.adam_lr, self.adam_weight_decay = adam_lr, adam_weight_decay
        if fused:
            orth = chain(scale_by_muon(convention, ns_dtype, apply=True), name="muon")
            adam = chain(fused_adamw(), name="adamw")
        else:
            orth = chain(scale_by_muon(convention, ns_dtype), scale_by_learning_rate(),
                         add_decayed_weights("before"), name="muon")
            adam = chain(scale_by_adam("torch"), scale_by_learning_rate(), add_decayed_weights("before"),
                         name="adamw")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps, adjust_lr=adjust_lr, ns_coefficients=tuple(ns_coefficients),
                        ns_eps=ns_eps)
        super().__init__(params, defaults, muon_by_group(orth, adam), nonfinite, diagnostics, max_consecutive_skips)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, routed: a group without ``use_muon`` is split into its
        matrices (``use_muon=True``) and the rest (``use_muon=False``); see the class docstring."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        self._check_dtypes(param_group)  # names the parameter by its place in the group as given
        for piece in self._split(param_group):
            where = f"param_groups[{len(self.param_groups)}]"
            if piece["use_muon"]:
                flat = [_tensor(p) for p in piece["params"]]
                bad = [i for i, p in enumerate(flat) if p.dim() < 2]
                if bad:
                    raise ValueError(f"{where}.params[{bad[0]}] has shape {tuple(flat[bad[0]].shape)}: a "
                                     "use_muon=True group takes matrices (2 or more dims); put it in a "
                                     "use_muon=False group (AdamW)")
            else:
                if self.adam_lr is not None and "lr" not in piece:
                    piece["lr"] = self.adam_lr
                if self.adam_weight_decay is not None and "weight_decay" not in piece:
                    piece["weight_decay"] = self.adam_weight_decay
            super().add_param_group(piece)

    def _split(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        if "use_muon" in group:
            if not isinstance(group["use_muon"], bool):
                raise ValueError(f"use_muon={group['use_muon']!r} must be True or False")
            return [group]
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        names = group.get("param_names")
        out = []
        for flag in (True, False):
            idx = [i for i, p in enumerate(params) if (_tensor(p).dim() >= 2) == flag]
            if not idx:
                continue
            piece = {**group, "params": [params[i] for i in idx], "use_muon": flag}
            if not flag:  # the AdamW piece takes adam_lr / adam_weight_decay over the group's own
                if self.adam_lr is not None:
                    piece["lr"] = self.adam_lr
                if self.adam_weight_decay is not None:
                    piece["weight_decay"] = self.adam_weight_decay
            if names is not None:
                piece["param_names"] = [names[i] for i in idx]
            out.append(piece)
        return out or [{**group, "params": params, "use_muon": False}]

"""Optimizer benchmark suite: poise against every peer that implements the same optimizer,
on three model shapes at three sizes, with the hardware floor of each step beside it.

    python benchmarks/suite.py --out benchmarks/results/suite-<date>      # the full run (quiet machine)
    python benchmarks/suite.py --tiny --out /tmp/suite-tiny               # plumbing check, < 60 s
    python benchmarks/suite.py --families soap,muon --shapes mlp --sizes S,M --repeats 15

Families (poise class vs peers; see docs/benchmarks.md for the hyper-parameters and how each
peer was aligned): AdamW (torch fused / foreach), SOAP (pytorch-optimizer, heavyball),
Stable-SPAM (pytorch-optimizer), GaLore-AdamW (pytorch-optimizer, galore-torch), Muon
(torch.optim.Muon, pytorch-optimizer, heavyball), SPAM (pytorch-optimizer) and PSGD-Kron
(pytorch-optimizer, heavyball; only when ``poise.optim`` exports a PSGD-Kron class).

Protocol: for each (shape, size, family) every implementation gets its own copy of the same
model and steps on the same fixed gradients; after ``--warmup`` steps each, the implementations
step round-robin (the starting one rotating every round) for ``--repeats`` rounds, one timed
``step()`` each. A peer that raises is reported with its error, not fatal.

Floors: bandwidth floor = bytes the step must read and write (parameters, gradients, state,
counted from the algorithm) / streaming bandwidth measured once in this process (large
``torch.add``/``copy_``); matmul floor = the step's necessary matrix products (and amortised
decompositions), each timed alone at its own shape in this process. floor = max of the two.

Writes ``suite.json`` (everything), ``suite.md`` (tables) and ``suite.png`` (step time vs
parameters, log-log, one panel per family and shape, the floor dashed) under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import importlib
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _suite_models import SHAPES, SIZES, TINY_SIZES, ModelSpec, build_spec, low_rank_names  # noqa: E402

import poise.optim as P  # noqa: E402

FAMILIES = ("adamw", "soap", "stable_spam", "galore_adamw", "muon", "spam", "psgd_kron")
PSGD_NAMES = ("PSGDKron", "Kron", "PSGD_Kron", "KronPSGD")
F32 = 4  # bytes per float32 entry

# ---- hyper-parameters: one set per family, given to every implementation -------------------------------------------

HYPER: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "soap": dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=1e-2,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False),
    "stable_spam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, gamma1=0.7, gamma2=0.9,
                        gamma3=0.999, total_T=None, eta_min=0.5, update_proj_gap=1000),
    "galore_adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank="width // 4",
                         update_proj_gap=200, scale=0.25, proj_type="std"),
    "muon": dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, adam_lr=3e-4,
                 adam_betas=(0.9, 0.95), adam_eps=1e-10),
    "spam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, warmup_steps=150, threshold=5000,
                 DeltaT=500, grad_accu_steps=20),
    "psgd_kron": dict(lr=1e-3, momentum=0.9, weight_decay=0.0, update_probability=1.0, max_size_triangular=8192,
                      min_ndim_triangular=2),
}

# where a peer's name or default differs, and what was done about it (printed into the JSON and the docs)
ALIGNMENT: dict[str, list[str]] = {
    "adamw": ["torch.optim.AdamW: same arguments; fused=True and foreach=True are two implementations"],
    "soap": ["pytorch_optimizer.SOAP: max_precond_dim -> max_precondition_dim, shampoo_beta=None (= betas[1])",
             "heavyball.SOAP: defaults differ (betas (0.9, 0.95), precondition_frequency 2, max_precond_dim 2048, "
             "merge_dims True, a precondition schedule): set to the family's values, use_precond_schedule=False; "
             "torch.compile off (heavyball.utils.compile_mode=None, eager like the others)"],
    "stable_spam": ["pytorch_optimizer.StableSPAM: gamma3 -> theta, total_T -> t_max; its default foreach=False and "
                    "foreach=True are two implementations"],
    "galore_adamw": ["the same param groups for all: 2-D body weights projected (rank min(width//4, min dim)), "
                     "the rest plain AdamW; pytorch_optimizer.GaLore: proj_type -> projection_type, plus a "
                     "foreach=True variant; galore_torch.GaLoreAdamW (transformers' AdamW, correct_bias=True)"],
    "muon": ["Muon on every tensor of 2+ dims (reshaped to (shape[0], -1)), AdamW (lr 3e-4, betas (0.9, 0.95), "
             "eps 1e-10) on the rest, in every implementation",
             "torch: torch.optim.Muon (matrices, adjust_lr_fn='original', weight_decay=0) + torch.optim.AdamW("
             "fused=True) stepped together; torch's Muon takes 2-D tensors only, so it fails on the conv net",
             "pytorch_optimizer.Muon: use_muon groups, adamw_lr/adamw_betas/adamw_eps, ns_coeffs='original'; "
             "plus a foreach=True variant",
             "heavyball.MuonAdamW: routes 2+ dims to Muon itself; its one betas pair serves both parts, set to "
             "(0.95, 0.95) so Muon's momentum is 0.95 (its Adam beta1 differs: timing-neutral); lr per group; "
             "its Newton-Schulz uses five per-iteration coefficient sets (same products); eager"],
    "spam": ["pytorch_optimizer.SPAM: warmup_steps -> warmup_epoch (default 50 set to 150), DeltaT -> "
             "update_proj_gap, density=1.0 (dense, as poise's); plus a foreach=True variant"],
    "psgd_kron": ["preconditioner updated every step (probability 1.0: what the default schedules give for the "
                  "first hundreds of steps), triangular factors up to 8192 per dim, momentum 0.9, no weight decay",
                  "pytorch_optimizer.Kron: pre_conditioner_update_probability=1.0",
                  "heavyball.PSGDKron: preconditioner_update_probability=1.0, max_size_triangular 2048 -> 8192, "
                  "betas[0]=0.9; its caching/storage defaults kept; eager"],
}


# ---- peers ----------------------------------------------------------------------------------------------------------

def _import(name: str) -> Any | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:  # an absent or broken peer is skipped, not fatal
        return None


def _galore_torch() -> Any | None:
    """galore-torch 1.0's GaLoreAdamW (its adamw module imports transformers only for a version check)."""
    mod = _import("galore_torch")
    if mod is not None and hasattr(mod, "GaLoreAdamW"):
        return mod.GaLoreAdamW
    return None


def poise_psgd_kron() -> type | None:
    """poise's PSGD-Kron class, if ``poise.optim`` exports one under any of ``PSGD_NAMES``."""
    for name in PSGD_NAMES:
        cls = getattr(P, name, None)
        if isinstance(cls, type):
            return cls
    return None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "poise", "pytorch_optimizer", "heavyball", "galore-torch", "numpy", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


class Pair:
    """Two optimizers stepped as one (torch.optim.Muon for matrices + torch.optim.AdamW for the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _kw(cls: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``wanted`` that ``cls.__init__`` accepts by name."""
    names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in wanted.items() if k in names}


Named = list[tuple[str, nn.Parameter]]
Factory = Callable[[Named, "Context"], Any]


@dataclass
class Context:
    """What a factory needs besides the parameters: the model's shape and width."""

    shape: str
    width: int
    low_rank: set[str]


def _mats(named: Named) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    return [p for _, p in named if p.dim() >= 2], [p for _, p in named if p.dim() < 2]


def galore_rank(width: int, p: torch.Tensor) -> int:
    """Rank of a projected matrix: width // 4, capped by the matrix's smaller side."""
    return max(1, min(width // 4, p.shape[0], p.numel() // p.shape[0]))


def galore_groups(named: Named, ctx: Context, key: str = "proj_type") -> list[dict[str, Any]]:
    h = HYPER["galore_adamw"]
    by_rank: dict[int, list[nn.Parameter]] = {}
    rest = []
    for n, p in named:
        if n in ctx.low_rank:
            by_rank.setdefault(galore_rank(ctx.width, p), []).append(p)
        else:
            rest.append(p)
    groups: list[dict[str, Any]] = [{"params": ps, "rank": r, "update_proj_gap": h["update_proj_gap"],
                                     "scale": h["scale"], key: h["proj_type"]} for r, ps in sorted(by_rank.items())]
    if rest:
        groups.append({"params": rest})
    return groups


def implementations(families: Iterable[str]) -> tuple[dict[str, dict[str, Factory]], dict[str, str]]:
    """family -> implementation name -> factory(named parameters, context); and notes on what was skipped."""
    po, hb = _import("pytorch_optimizer"), _import("heavyball")
    gt = _galore_torch()
    if hb is not None:
        hu = importlib.import_module("heavyball.utils")
        hu.compile_mode = None  # eager, as every other implementation here
    skipped: dict[str, str] = {}

    def build(fam: str, h: dict[str, Any]) -> dict[str, Factory] | None:
        """The factories of one family (a function, so that each closure sees its own ``h``)."""
        d: dict[str, Factory] = {}
        if fam == "adamw":
            kw = dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])
            d["poise"] = lambda nm, c, kw=kw: P.AdamW([p for _, p in nm], **kw)
            d["torch_fused"] = lambda nm, c, kw=kw: torch.optim.AdamW([p for _, p in nm], fused=True, **kw)
            d["torch_foreach"] = lambda nm, c, kw=kw: torch.optim.AdamW([p for _, p in nm], foreach=True, **kw)
        elif fam == "soap":
            base = dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                        precondition_frequency=h["precondition_frequency"], merge_dims=h["merge_dims"],
                        precondition_1d=h["precondition_1d"])
            d["poise"] = lambda nm, c: P.SOAP([p for _, p in nm], shampoo_beta=-1,
                                              max_precond_dim=h["max_precond_dim"], **base)
            if po is not None:
                d["pytorch_optimizer"] = lambda nm, c: po.SOAP([p for _, p in nm], shampoo_beta=None,
                                                               max_precondition_dim=h["max_precond_dim"], **base)
            if hb is not None:
                d["heavyball"] = lambda nm, c: hb.SOAP([p for _, p in nm], shampoo_beta=h["shampoo_beta"],
                                                       max_precond_dim=h["max_precond_dim"],
                                                       use_precond_schedule=False, **base)
        elif fam == "stable_spam":
            base = {k: h[k] for k in ("lr", "betas", "eps", "weight_decay", "gamma1", "gamma2", "eta_min",
                                      "update_proj_gap")}
            d["poise"] = lambda nm, c: P.StableSPAM([p for _, p in nm], gamma3=h["gamma3"], total_T=h["total_T"],
                                                    **base)
            if po is not None:
                for name, fe in (("pytorch_optimizer", False), ("pytorch_optimizer_foreach", True)):
                    d[name] = lambda nm, c, fe=fe: po.StableSPAM([p for _, p in nm], theta=h["gamma3"],
                                                                 t_max=h["total_T"], foreach=fe, **base)
        elif fam == "galore_adamw":
            base = dict(lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])
            d["poise"] = lambda nm, c: P.GaLoreAdamW(galore_groups(nm, c), **base)
            if po is not None:
                for name, fe in (("pytorch_optimizer", None), ("pytorch_optimizer_foreach", True)):
                    d[name] = lambda nm, c, fe=fe: po.GaLore(galore_groups(nm, c, "projection_type"), foreach=fe,
                                                             **base)
            if gt is not None:
                d["galore_torch"] = lambda nm, c: gt(galore_groups(nm, c), no_deprecation_warning=True, **base)
        elif fam == "muon":
            d["poise"] = lambda nm, c: P.Muon([p for _, p in nm], lr=h["lr"], momentum=h["momentum"],
                                              nesterov=h["nesterov"], ns_steps=h["ns_steps"],
                                              weight_decay=h["weight_decay"], betas=h["adam_betas"],
                                              eps=h["adam_eps"], adam_lr=h["adam_lr"])
            if hasattr(torch.optim, "Muon"):
                def torch_muon(nm: Named, c: Context) -> Pair:
                    mats, rest = _mats(nm)
                    opts = [torch.optim.Muon(mats, lr=h["lr"], weight_decay=h["weight_decay"],
                                             momentum=h["momentum"], nesterov=h["nesterov"], ns_steps=h["ns_steps"],
                                             adjust_lr_fn="original")]
                    if rest:
                        opts.append(torch.optim.AdamW(rest, lr=h["adam_lr"], betas=h["adam_betas"],
                                                      eps=h["adam_eps"], weight_decay=h["weight_decay"], fused=True))
                    return Pair(*opts)
                d["torch"] = torch_muon
            if po is not None:
                for name, fe in (("pytorch_optimizer", None), ("pytorch_optimizer_foreach", True)):
                    def po_muon(nm: Named, c: Context, fe: bool | None = fe) -> Any:
                        mats, rest = _mats(nm)
                        groups = [{"params": mats, "use_muon": True}] + \
                            ([{"params": rest, "use_muon": False}] if rest else [])
                        return po.Muon(groups, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                                       ns_steps=h["ns_steps"], weight_decay=h["weight_decay"], ns_coeffs="original",
                                       use_adjusted_lr=False, adamw_lr=h["adam_lr"], adamw_betas=h["adam_betas"],
                                       adamw_eps=h["adam_eps"], adamw_wd=h["weight_decay"], foreach=fe)
                    d[name] = po_muon
            if hb is not None and hasattr(hb, "MuonAdamW"):
                def hb_muon(nm: Named, c: Context) -> Any:
                    mats, rest = _mats(nm)
                    groups = [{"params": mats, "lr": h["lr"]}] + ([{"params": rest, "lr": h["adam_lr"]}] if rest
                                                                  else [])
                    return hb.MuonAdamW(groups, lr=h["lr"], betas=(h["momentum"], h["adam_betas"][1]),
                                        eps=h["adam_eps"], weight_decay=h["weight_decay"], nesterov=h["nesterov"])
                d["heavyball"] = hb_muon
        elif fam == "spam":
            d["poise"] = lambda nm, c: P.SPAM([p for _, p in nm], lr=h["lr"], betas=h["betas"], eps=h["eps"],
                                              weight_decay=h["weight_decay"], warmup_steps=h["warmup_steps"],
                                              threshold=h["threshold"], DeltaT=h["DeltaT"],
                                              grad_accu_steps=h["grad_accu_steps"])
            if po is not None and hasattr(po, "SPAM"):
                for name, fe in (("pytorch_optimizer", None), ("pytorch_optimizer_foreach", True)):
                    d[name] = lambda nm, c, fe=fe: po.SPAM(
                        [p for _, p in nm], lr=h["lr"], betas=h["betas"], eps=h["eps"], density=1.0,
                        weight_decay=h["weight_decay"], warmup_epoch=h["warmup_steps"], threshold=h["threshold"],
                        grad_accu_steps=h["grad_accu_steps"], update_proj_gap=h["DeltaT"], foreach=fe)
        elif fam == "psgd_kron":
            cls = poise_psgd_kron()
            if cls is None:
                skipped[fam] = f"poise.optim exports no PSGD-Kron class (looked for {', '.join(PSGD_NAMES)})"
                return None
            wanted = dict(lr=h["lr"], weight_decay=h["weight_decay"], momentum=h["momentum"], b1=h["momentum"],
                          beta=h["momentum"], max_size_triangular=h["max_size_triangular"],
                          min_ndim_triangular=h["min_ndim_triangular"],
                          preconditioner_update_probability=h["update_probability"],
                          pre_conditioner_update_probability=h["update_probability"],
                          update_probability=h["update_probability"],
                          precond_update_prob=h["update_probability"])
            d["poise"] = lambda nm, c, cls=cls: cls([p for _, p in nm], **_kw(cls, wanted))
            if po is not None and hasattr(po, "Kron"):
                d["pytorch_optimizer"] = lambda nm, c: po.Kron(
                    [p for _, p in nm], lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"],
                    pre_conditioner_update_probability=h["update_probability"],
                    max_size_triangular=h["max_size_triangular"], min_ndim_triangular=h["min_ndim_triangular"])
            if hb is not None and hasattr(hb, "PSGDKron"):
                d["heavyball"] = lambda nm, c: hb.PSGDKron(
                    [p for _, p in nm], lr=h["lr"], betas=(h["momentum"], 0.999), weight_decay=h["weight_decay"],
                    preconditioner_update_probability=h["update_probability"],
                    max_size_triangular=h["max_size_triangular"], min_ndim_triangular=h["min_ndim_triangular"])
        else:
            raise ValueError(f"family={fam!r}; valid choices: {', '.join(FAMILIES)}")
        return d

    out: dict[str, dict[str, Factory]] = {}
    for fam in families:
        if fam not in HYPER:
            raise ValueError(f"family={fam!r}; valid choices: {', '.join(FAMILIES)}")
        d = build(fam, HYPER[fam])
        if d is not None:
            if "poise" in d:  # the same work as the peers: no finiteness check (no peer makes one)
                d = {"poise": d["poise"], "poise_unchecked": _unchecked(d["poise"]),
                     **{k: v for k, v in d.items() if k != "poise"}}
            out[fam] = d
    return out, skipped


def _unchecked(factory: Factory) -> Factory:
    """poise's optimizer with ``nonfinite="ignore"``: its default checks every gradient for NaN/Inf
    each step (one more read of the gradients and a host sync), which no peer does."""
    def make(nm: Named, c: Context) -> Any:
        opt = factory(nm, c)
        opt.nonfinite = "ignore"
        return opt
    return make


# ---- state bytes ----------------------------------------------------------------------------------------------------

from _common import state_bytes  # noqa: E402  (re-exported: tests use suite.state_bytes)

# ---- floors ---------------------------------------------------------------------------------------------------------

@dataclass
class Work:
    """The necessary work of one step: bytes moved, matrix products ``(M, K, N, count, dtypes)``
    (``count`` may be fractional: amortised or triangular), decompositions ``(kind, shape, count)``."""

    bytes: float
    matmuls: list[tuple[int, int, int, float, tuple[str, ...]]]
    decomps: list[tuple[str, tuple[int, int], float]]
    theory_state_bytes: float


def _dims(p: torch.Tensor) -> list[int]:
    return list(p.shape)


def step_work(family: str, named: Named, ctx: Context) -> Work:
    """Bytes, matrix products and decompositions one step of ``family`` cannot avoid (fp32 state).

    Bytes per entry: a read or write of a float32 tensor the size of the parameter is 4 B.
    AdamW/SPAM read p, g, m, v and write p, m, v (7 accesses); Stable-SPAM reads g once more
    (its max and norm precede the update: 8); Muon matrices read g, read+write the momentum and
    the parameter (5); SOAP adds per preconditioned dim d its factor read+written and its basis
    read (3 d^2); GaLore's projected matrices read g, read+write W, read P and read+write the two
    low-rank moments; PSGD-Kron reads g, read+writes momentum and parameter (5) and reads and
    writes each Kronecker factor (2 d^2).
    """
    h = HYPER[family]
    nbytes = 0.0
    state = 0.0
    mm: list[tuple[int, int, int, float, tuple[str, ...]]] = []
    dec: list[tuple[str, tuple[int, int], float]] = []
    f32 = ("float32",)
    for name, p in named:
        n = p.numel()
        if family in ("adamw", "spam"):
            nbytes += 7 * F32 * n
            state += 2 * F32 * n
        elif family == "stable_spam":
            nbytes += 8 * F32 * n
            state += 2 * F32 * n
        elif family == "muon":
            if p.dim() < 2:
                nbytes += 7 * F32 * n
                state += 2 * F32 * n
                continue
            nbytes += 5 * F32 * n
            state += F32 * n
            rows, cols = p.shape[0], n // p.shape[0]
            m, k = min(rows, cols), max(rows, cols)
            for _ in range(h["ns_steps"]):  # A = X X^T, A @ A, B @ X (X: m x k, m <= k)
                mm += [(m, k, m, 1.0, ("bfloat16", "float32")), (m, m, m, 1.0, ("bfloat16", "float32")),
                       (m, m, k, 1.0, ("bfloat16", "float32"))]
        elif family == "soap":
            nbytes += 7 * F32 * n
            state += 2 * F32 * n
            if p.dim() < 2 and not h["precondition_1d"]:
                continue
            freq = h["precondition_frequency"]
            for d in _dims(p):
                if d > h["max_precond_dim"]:
                    continue
                nbytes += 3 * F32 * d * d
                state += 2 * F32 * d * d  # factor GG and basis Q
                rest = n // d
                # rotate in, rotate back (tensordot along this dim), the factor's gram product
                mm += [(rest, d, d, 2.0, f32), (d, rest, d, 1.0, f32)]
                # every `freq` steps: GG @ Q (power step), QR, and the momentum's round trip (2 rotations)
                mm += [(d, d, d, 1.0 / freq, f32), (rest, d, d, 2.0 / freq, f32)]
                dec.append(("qr", (d, d), 1.0 / freq))
        elif family == "galore_adamw":
            if name not in ctx.low_rank:
                nbytes += 7 * F32 * n
                state += 2 * F32 * n
                continue
            rows, cols = p.shape[0], n // p.shape[0]
            r = galore_rank(ctx.width, p)
            right = rows >= cols  # "std": project the longer side away
            low = rows * r if right else r * cols
            proj = r * cols if right else rows * r
            nbytes += F32 * (3 * n + proj + 4 * low)
            state += F32 * (2 * low + proj)
            if right:
                mm += [(rows, cols, r, 1.0, f32), (rows, r, cols, 1.0, f32)]  # G P^T, then N P
            else:
                mm += [(r, rows, cols, 1.0, f32), (rows, r, cols, 1.0, f32)]  # P^T G, then P N
            dec.append(("svd", (rows, cols), 1.0 / h["update_proj_gap"]))
        elif family == "psgd_kron":
            nbytes += 5 * F32 * n
            state += F32 * n
            dims = _dims(p)
            if p.dim() < h["min_ndim_triangular"]:
                nbytes += 2 * F32 * n  # diagonal factor, read and written
                state += F32 * n
                continue
            prob = h["update_probability"]
            for d in dims:
                if d > h["max_size_triangular"]:
                    nbytes += 2 * F32 * d
                    state += F32 * d
                    continue
                nbytes += 2 * F32 * d * d
                state += F32 * d * d
                rest = n // d
                mm += [(rest, d, d, 1.0, f32)]  # precondition with the cached P = Q^T Q
                # update: A = Q-apply (triangular), conj B = triangular solve, grams A A^T and B B^T,
                # Q <- Q - lr (.) Q (triangular), P = Q^T Q (triangular)
                mm += [(rest, d, d, 0.5 * prob, f32), (rest, d, d, 0.5 * prob, f32), (d, rest, d, 2.0 * prob, f32),
                       (d, d, d, 0.5 * prob, f32), (d, d, d, 0.5 * prob, f32)]
        else:
            raise ValueError(f"family={family!r}; valid choices: {', '.join(FAMILIES)}")
    return Work(nbytes, mm, dec, state)


class Floors:
    """Measures, once per process, the streaming bandwidth and the time of each matrix-product
    shape and decomposition the floors need (cached by shape)."""

    def __init__(self, stream_entries: int, budget_s: float = 0.05):
        self.stream_entries = stream_entries
        self.budget_s = budget_s
        self.mm_cache: dict[tuple[int, int, int, str], float] = {}
        self.dec_cache: dict[tuple[str, tuple[int, int]], float] = {}
        self.bandwidth = self._bandwidth()

    def _best(self, fn: Callable[[], Any], min_reps: int = 3, max_reps: int = 20) -> float:
        fn()
        best, spent, reps = float("inf"), 0.0, 0
        while reps < min_reps or (spent < self.budget_s and reps < max_reps):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best, spent, reps = min(best, dt), spent + dt, reps + 1
        return best

    def _bandwidth(self) -> dict[str, float]:
        n = self.stream_entries
        a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
        add = 3 * F32 * n / self._best(lambda: torch.add(a, b, out=c), min_reps=5)
        cp = 2 * F32 * n / self._best(lambda: c.copy_(a), min_reps=5)
        return {"add_GBps": add / 1e9, "copy_GBps": cp / 1e9, "used_GBps": max(add, cp) / 1e9,
                "bytes_per_array": F32 * n}

    def matmul_s(self, m: int, k: int, n: int, dtype: str) -> float:
        key = (m, k, n, dtype)
        if key not in self.mm_cache:
            dt = getattr(torch, dtype)
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            out = torch.empty(m, n, dtype=dt)
            self.mm_cache[key] = self._best(lambda: torch.mm(a, b, out=out))
        return self.mm_cache[key]

    def decomp_s(self, kind: str, shape: tuple[int, int]) -> float:
        key = (kind, shape)
        if key not in self.dec_cache:
            x = torch.randn(*shape)
            if kind == "qr":
                fn: Callable[[], Any] = lambda: torch.linalg.qr(x)  # noqa: E731
            elif kind == "svd":
                fn = lambda: torch.linalg.svd(x, full_matrices=False)  # noqa: E731
            else:
                raise ValueError(f"kind={kind!r}; valid choices: qr, svd")
            self.dec_cache[key] = self._best(fn, min_reps=2, max_reps=3)
        return self.dec_cache[key]

    def floor(self, work: Work, n_params: int) -> dict[str, Any]:
        bw_s = work.bytes / (self.bandwidth["used_GBps"] * 1e9)
        mm_s, flops, dtypes = 0.0, 0.0, set()
        for m, k, n, count, cands in work.matmuls:
            times = {d: self.matmul_s(m, k, n, d) for d in cands}
            best = min(times, key=times.__getitem__)
            dtypes.add(best)
            mm_s += count * times[best]
            flops += count * 2.0 * m * k * n
        dec_s = sum(count * self.decomp_s(kind, shape) for kind, shape, count in work.decomps)
        compute_s = mm_s + dec_s
        return {"bytes": work.bytes, "bandwidth_ms": bw_s * 1e3, "matmul_ms": mm_s * 1e3, "decomp_ms": dec_s * 1e3,
                "matmul_flops": flops, "matmul_GFLOPs": flops / mm_s / 1e9 if mm_s > 0 else None,
                "matmul_dtypes": sorted(dtypes), "floor_ms": max(bw_s, compute_s) * 1e3,
                "sum_ms": (bw_s + compute_s) * 1e3, "bound": "bandwidth" if bw_s >= compute_s else "matmul",
                "theory_state_bpp": work.theory_state_bytes / n_params}


# ---- timing ---------------------------------------------------------------------------------------------------------

def _stats(ts: list[float]) -> dict[str, float | int | None]:
    if not ts:
        return {"n": 0, "median_ms": None, "q1_ms": None, "q3_ms": None, "min_ms": None, "max_ms": None,
                "mean_ms": None}
    ms = sorted(t * 1e3 for t in ts)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"n": len(ms), "median_ms": statistics.median(ms), "q1_ms": q[0], "q3_ms": q[2], "min_ms": ms[0],
            "max_ms": ms[-1], "mean_ms": statistics.fmean(ms)}


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def bench_family(spec: ModelSpec, family: str, impls: dict[str, Factory], repeats: int, warmup: int
                 ) -> list[dict[str, Any]]:
    """Every implementation of ``family`` on its own copy of ``spec``'s model, the same fixed
    gradients, round-robin; one dict per implementation."""
    base = spec.build(seed=0)
    named0 = list(base.named_parameters())
    ctx = Context(spec.shape, spec.width, low_rank_names(spec.shape, base))
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for _, p in named0]
    runs = []
    for name, factory in impls.items():
        model = copy.deepcopy(base)
        named = list(model.named_parameters())
        run = {"impl": name, "params": [p for _, p in named], "opt": None, "times": [], "error": None}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run["opt"] = factory(named, ctx)
        except Exception as e:  # a peer that cannot be built is reported, not fatal
            run["error"] = _err(e)
        runs.append(run)

    def step(run: dict[str, Any]) -> float:
        for p, g in zip(run["params"], grads, strict=True):
            p.grad = g.clone()
        t0 = time.perf_counter()
        run["opt"].step()
        return time.perf_counter() - t0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in runs:  # warm-up (and the preconditioner-only first step of SOAP)
            if run["error"] is None:
                try:
                    for _ in range(warmup):
                        step(run)
                except Exception as e:
                    run["error"] = _err(e)
        live = [r for r in runs if r["error"] is None]
        gc.collect()
        gc.disable()
        try:
            for i in range(repeats if live else 0):
                k = i % len(live)  # the starting implementation rotates every round
                for run in live[k:] + live[:k]:
                    if run["error"] is not None:
                        continue
                    try:
                        run["times"].append(step(run))
                    except Exception as e:
                        run["error"] = _err(e)
        finally:
            gc.enable()
    out = []
    for run in runs:
        row: dict[str, Any] = {"impl": run["impl"], "error": run["error"], **_stats(run["times"] if not run["error"]
                                                                                   else [])}
        row["state_bytes"] = state_bytes(run["opt"], run["params"]) if run["opt"] is not None else None
        row["state_bpp"] = row["state_bytes"] / spec.n_params if row["state_bytes"] is not None else None
        out.append(row)
    del runs
    return out


# ---- reports --------------------------------------------------------------------------------------------------------

def summarise(rows: list[dict[str, Any]], floors: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, shape, size): poise, the fastest peer, and the floor."""
    out = []
    keys = dict.fromkeys((r["family"], r["shape"], r["size"]) for r in rows)
    for fam, shape, size in keys:
        rs = [r for r in rows if (r["family"], r["shape"], r["size"]) == (fam, shape, size)]
        ours = next((r for r in rs if r["impl"] == "poise"), None)
        bare = next((r for r in rs if r["impl"] == "poise_unchecked" and r["median_ms"] is not None), None)
        peers = [r for r in rs if not r["impl"].startswith("poise") and r["median_ms"] is not None]
        best = min(peers, key=lambda r: r["median_ms"]) if peers else None
        fl = floors[f"{fam}/{shape}/{size}"]
        pm = ours["median_ms"] if ours else None
        out.append({
            "family": fam, "shape": shape, "size": size, "n_params": rs[0]["n_params"],
            "poise_ms": pm, "poise_q1_ms": ours["q1_ms"] if ours else None,
            "poise_q3_ms": ours["q3_ms"] if ours else None, "poise_error": ours["error"] if ours else "not run",
            "fastest_peer": best["impl"] if best else None, "peer_ms": best["median_ms"] if best else None,
            "poise_over_peer": pm / best["median_ms"] if (pm and best) else None,
            "unchecked_ms": bare["median_ms"] if bare else None,
            "unchecked_over_peer": bare["median_ms"] / best["median_ms"] if (bare and best) else None,
            "floor_ms": fl["floor_ms"], "bound": fl["bound"],
            "poise_over_floor": pm / fl["floor_ms"] if (pm and fl["floor_ms"] > 0) else None,
            "state_bpp": ours["state_bpp"] if ours else None, "theory_state_bpp": fl["theory_state_bpp"],
            "peer_errors": {r["impl"]: r["error"] for r in rs if r["error"]},
        })
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(meta: dict[str, Any], summary: list[dict[str, Any]], rows: list[dict[str, Any]],
             floors: dict[str, dict[str, Any]]) -> str:
    bw = meta["bandwidth"]
    lines = [
        "# Optimizer benchmark suite", "",
        f"{meta['date']} · torch {meta['versions']['torch']} · {meta['threads']} threads · {meta['cpu']} · "
        f"repeats {meta['repeats']} (warm-up {meta['warmup']}) · bandwidth {bw['used_GBps']:.1f} GB/s",
        "", f"Command: `{meta['command']}`", "",
        "Times are medians of one `step()` in ms; IQR in brackets. poise/peer < 1: poise is faster "
        "(the issue-18 goal is <= 0.83, i.e. 1.2x faster). floor = max(bandwidth floor, matmul floor); "
        "poise/floor >= 1 (goal <= 1.3). State B/param: measured for poise (from the algorithm). "
        "unchecked/peer: poise with nonfinite=\"ignore\", the same work as the peers (poise's default "
        "checks every gradient for NaN/Inf each step; no peer does).", "",
        "| family | shape | size | params | poise ms [IQR] | fastest peer | peer ms | poise/peer | "
        "unchecked/peer | floor ms (bound) | poise/floor | state B/param |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        pm = "failed" if s["poise_ms"] is None else \
            f"{s['poise_ms']:.3g} [{s['poise_q1_ms']:.3g}–{s['poise_q3_ms']:.3g}]"
        lines.append(
            f"| {s['family']} | {s['shape']} | {s['size']} | {s['n_params'] / 1e6:.3f}M | {pm} | "
            f"{s['fastest_peer'] or '-'} | {_f(s['peer_ms'], '.3g')} | {_f(s['poise_over_peer'])} | "
            f"{_f(s.get('unchecked_over_peer'))} | {s['floor_ms']:.3g} ({s['bound'][:2]}) | "
            f"{_f(s['poise_over_floor'])} | "
            f"{_f(s['state_bpp'], '.1f')} ({s['theory_state_bpp']:.1f}) |")
    lines += ["", "## Every implementation", "",
              "| family | shape | size | implementation | median ms | IQR ms | min–max ms | vs poise | "
              "state B/param |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    poise_ms = {(r["family"], r["shape"], r["size"]): r["median_ms"] for r in rows if r["impl"] == "poise"}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['family']} | {r['shape']} | {r['size']} | {r['impl']} | failed: "
                         f"{r['error'][:90].replace('|', '/')} | | | | |")
            continue
        ours = poise_ms.get((r["family"], r["shape"], r["size"]))
        lines.append(f"| {r['family']} | {r['shape']} | {r['size']} | {r['impl']} | {r['median_ms']:.3g} | "
                     f"{r['q1_ms']:.3g}–{r['q3_ms']:.3g} | {r['min_ms']:.3g}–{r['max_ms']:.3g} | "
                     f"{_f(r['median_ms'] / ours if ours else None)} | {_f(r['state_bpp'], '.1f')} |")
    lines += ["", "## Floors", "", "| family | shape | size | MB moved | bandwidth ms | matmul ms | decomp ms | "
              "GFLOP | GEMM GFLOP/s | floor ms |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, fl in floors.items():
        fam, shape, size = key.split("/")
        lines.append(f"| {fam} | {shape} | {size} | {fl['bytes'] / 1e6:.2f} | {fl['bandwidth_ms']:.3g} | "
                     f"{fl['matmul_ms']:.3g} | {fl['decomp_ms']:.3g} | {fl['matmul_flops'] / 1e9:.3g} | "
                     f"{_f(fl['matmul_GFLOPs'], '.1f')} | {fl['floor_ms']:.3g} |")
    if meta["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in meta["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], floors: dict[str, dict[str, Any]], path: Path) -> bool:
    """Step time vs parameters, log-log: one panel per (shape, family), one line per
    implementation, the floor dashed. Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import NullFormatter

    fams = list(dict.fromkeys(r["family"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    peers = sorted({r["impl"] for r in rows} - {"poise", "poise_unchecked"})
    palette = plt.get_cmap("tab10")
    colors = {"poise": "black", "poise_unchecked": "black", **{name: palette(i % 10) for i, name in enumerate(peers)}}
    fig, axes = plt.subplots(len(shapes), len(fams), figsize=(3.2 * len(fams), 2.8 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            rs = [r for r in rows if r["family"] == fam and r["shape"] == shape]
            for impl in dict.fromkeys(r["impl"] for r in rs):
                pts = sorted((r["n_params"], r["median_ms"]) for r in rs if r["impl"] == impl and r["median_ms"])
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", lw=2.2 if impl.startswith("poise") else 1.2,
                            ls=":" if impl == "poise_unchecked" else "-", label=impl, color=colors[impl])
            fl = sorted((r["n_params"], floors[f"{fam}/{shape}/{r['size']}"]["floor_ms"]) for r in rs
                        if r["impl"] == "poise")
            if fl:
                ax.plot(*zip(*fl, strict=True), ls="--", color="gray", label="floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{fam} · {shape}", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(shapes) - 1:
                ax.set_xlabel("parameters", fontsize=8)
            if j == 0:
                ax.set_ylabel("step ms", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _list(text: str, valid: Iterable[str], what: str) -> list[str]:
    valid = list(valid)
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}={text!r}; valid choices: {', '.join(valid)}")
    return items


def _sizes(text: str, table: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in (s.strip() for s in text.split(",") if s.strip()):
        if x in table:
            out[x] = table[x]
            continue
        try:
            n = int(float(x))
        except ValueError:
            n = 0
        if n <= 0:
            raise argparse.ArgumentTypeError(f"size {x!r}; valid: {', '.join(table)} or a parameter count (3e5)")
        out[f"{n / 1e6:g}M" if n >= 10**6 else f"{n / 1e3:g}k" if n >= 1000 else str(n)] = n
    if not out:
        raise argparse.ArgumentTypeError(f"sizes={text!r}: none given; valid: {', '.join(table)}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/suite-<date>[-tiny])")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, 2 repeats, 1 warm-up: a plumbing check")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--sizes", default=None, help="comma list of S,M,L or parameter counts (default S,M,L)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; --tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per implementation (default 3; tiny 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stream-mib", type=float, default=None,
                    help="MiB per array of the bandwidth measurement (default 256; --tiny 16)")
    a = ap.parse_args(argv)
    try:
        a.families = _list(a.families, FAMILIES, "families")
        a.shapes = _list(a.shapes, SHAPES, "shapes")
        a.sizes = _sizes(a.sizes or ",".join(SIZES), TINY_SIZES if a.tiny else SIZES)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    for name, lo in (("repeats", 1), ("warmup", 1), ("threads", 1)):
        v = getattr(a, name)
        if v is not None and v < lo:
            ap.error(f"--{name}={v}; must be >= {lo}")
    a.repeats = a.repeats or (2 if a.tiny else 10)
    a.warmup = a.warmup or (1 if a.tiny else 3)
    a.stream_mib = a.stream_mib or (16.0 if a.tiny else 256.0)
    if a.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
        a.out = f"benchmarks/results/suite-{stamp}{'-tiny' if a.tiny else ''}"
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; write suite.json, suite.md and suite.png under ``--out``; return the JSON dict."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    impls, skipped = implementations(a.families)
    gc.collect()
    gc.freeze()  # the imported libraries' objects: out of the per-task collections (each would take ~1 s)
    floors_m = Floors(int(a.stream_mib * 2**20 / F32))
    specs = [build_spec(shape, size, target) for shape in a.shapes for size, target in a.sizes.items()]
    tasks = [(spec, fam) for spec in specs for fam in impls]
    try:
        from tqdm import tqdm

        bar: Any = tqdm(total=len(tasks), desc="suite", file=sys.stderr)
    except ImportError:
        bar = None
    rows: list[dict[str, Any]] = []
    floors: dict[str, dict[str, Any]] = {}
    for spec, fam in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{fam} {spec.shape} {spec.size}")
        else:
            print(f"[suite] {fam} {spec.shape} {spec.size} ({spec.n_params} params)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        for r in bench_family(spec, fam, impls[fam], a.repeats, a.warmup):
            rows.append({"family": fam, "shape": spec.shape, "size": spec.size, "width": spec.width,
                         "n_params": spec.n_params, **r})
        t1 = time.perf_counter()
        model = spec.build()
        ctx = Context(spec.shape, spec.width, low_rank_names(spec.shape, model))
        fl = floors_m.floor(step_work(fam, list(model.named_parameters()), ctx), spec.n_params)
        fl["bench_s"], fl["floor_s"] = t1 - t0, time.perf_counter() - t1  # wall time of this task's parts
        floors[f"{fam}/{spec.shape}/{spec.size}"] = fl
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = summarise(rows, floors)
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else
        "suite.py " + " ".join(argv),
        "argv": sys.argv if argv is None else argv,
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "versions": _versions(),
        "repeats": a.repeats, "warmup": a.warmup, "tiny": a.tiny, "families": list(impls), "shapes": a.shapes,
        "sizes": a.sizes, "skipped": skipped, "hyper": HYPER, "alignment": {f: ALIGNMENT[f] for f in impls},
        "implementations": {f: list(d) for f, d in impls.items()},
        "models": [{"shape": s.shape, "size": s.size, "target": s.target, "width": s.width,
                    "n_params": s.n_params} for s in specs],
        "bandwidth": floors_m.bandwidth,
        "gemm_ms": {f"{m}x{k}x{n}:{d}": t * 1e3 for (m, k, n, d), t in floors_m.mm_cache.items()},
        "decomp_ms": {f"{kind}:{shape[0]}x{shape[1]}": t * 1e3 for (kind, shape), t in floors_m.dec_cache.items()},
        "floor_rule": "max(bandwidth floor, matmul + decomposition floor)",
    }
    meta["wall_s"] = time.perf_counter() - t_start
    result = {"meta": meta, "summary": summary, "rows": rows, "floors": floors}
    (out / "suite.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "suite.md").write_text(markdown(meta, summary, rows, floors))
    plotted = plot(rows, floors, out / "suite.png")
    print(markdown(meta, summary, [], {}).split("\n## Every")[0])
    print(f"wrote {out}/suite.json, suite.md{', suite.png' if plotted else ' (no matplotlib: no plot)'} "
          f"in {meta['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()

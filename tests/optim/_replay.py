"""Helpers to replay gradient sequences through two optimizers and compare."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

REFERENCE_DIR = Path(os.environ.get("POISE_REFERENCE_DIR",
                                    Path(__file__).resolve().parents[3] / "shared" / "reference" / "optim"))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def replay_file(name: str, make) -> tuple[float, tuple[int, int]]:
    """Worst ``max|p - ref| / max|ref|`` over every step and parameter of a reference file."""
    d = np.load(REFERENCE_DIR / f"{name}.npz")
    meta = json.loads(str(d["meta"]))
    params = [torch.nn.Parameter(torch.from_numpy(d[f"init_{i}"]).clone()) for i in range(len(meta["shapes"]))]
    opt = make(params, meta["hparams"])
    worst, where = 0.0, (-1, -1)
    for t in range(meta["steps"]):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(d[f"grad_{t}_{i}"]).clone()
        opt.step()
        for i, p in enumerate(params):
            e = rel_err(p.detach(), torch.from_numpy(d[f"param_{t}_{i}"]))
            if e > worst:
                worst, where = e, (t, i)
    return worst, where


def gradient_stream(shapes, steps: int, seed: int = 0, spikes=((7, 0, 50.0),)):
    """Fixed gradients that grow over time, with injected spikes ``(step, param, factor)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        gs = [torch.randn(s, generator=g) * (1 + 0.05 * t) for s in shapes]
        for st, i, f in spikes:
            if st == t and i < len(gs):
                gs[i] = gs[i] * f
        out.append(gs)
    return out


def replay_pair(shapes, make_a, make_b, steps: int = 25, seed: int = 0, spikes=((7, 0, 50.0),), dtype=torch.float32):
    """Worst relative error between two optimizers fed the same gradients (parameters and
    gradients in ``dtype``)."""
    torch.manual_seed(seed)
    init = [torch.randn(s, dtype=dtype) for s in shapes]
    pa = [torch.nn.Parameter(x.clone()) for x in init]
    pb = [torch.nn.Parameter(x.clone()) for x in init]
    oa, ob = make_a(pa), make_b(pb)
    worst = 0.0
    for gs in gradient_stream(shapes, steps, seed, spikes):
        for p, q, g in zip(pa, pb, gs, strict=True):
            p.grad, q.grad = g.to(dtype, copy=True), g.to(dtype, copy=True)
        oa.step()
        ob.step()
        for p, q in zip(pa, pb, strict=True):
            worst = max(worst, rel_err(p.detach(), q.detach()))
    return worst

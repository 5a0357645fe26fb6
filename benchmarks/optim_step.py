"""Optimizer step time and state memory: poise against its peers, side by side.

    python benchmarks/optim_step.py [--repeats 15] [--models mlp,transformer] [--heavyball-compile]

For each model (a 3-layer MLP with 1024-wide layers; a small transformer) and each family
(SOAP, Stable-SPAM, GaLore-AdamW), every implementation steps on the same fixed gradients.
Implementations are timed round-robin in one process (so machine noise hits all alike);
each figure is the median over ``--repeats`` rounds of one ``step()``, after warm-up. The
ratio column divides by poise's time (> 1: the peer is slower). torch.optim.AdamW(fused=True)
is the baseline every row is also divided by.

It also prints the optimizer state in bytes per parameter against the theoretical figure,
and for SOAP the cost of its extra matrix multiplications, timed alone, to say what
SOAP/AdamW ratio to expect.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import poise.optim as P

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _common import round_robin  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
    return nn.Sequential(nn.Embedding(2048, 256), encoder)


def peers() -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        import pytorch_optimizer as po

        out["pytorch_optimizer"] = po
    except ImportError:
        pass
    try:
        import heavyball

        out["heavyball"] = heavyball
    except ImportError:
        pass
    return out


def families(compile_hb: bool) -> dict[str, dict[str, object]]:
    """family -> implementation name -> factory(params)."""
    pe = peers()
    po, hb = pe.get("pytorch_optimizer"), pe.get("heavyball")
    fam: dict[str, dict[str, object]] = {}

    def galore_groups(params):
        mats = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        return [{"params": mats, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
                {"params": rest}]

    fam["soap"] = {"poise": lambda ps: P.SOAP(ps, precondition_frequency=10)}
    if po is not None:
        fam["soap"]["pytorch_optimizer"] = lambda ps: po.SOAP(ps, precondition_frequency=10)
    if hb is not None:
        def hb_soap(ps):
            import heavyball.utils as hu

            hu.compile_mode = "max-autotune-no-cudagraphs" if compile_hb else None
            return hb.SOAP(ps, betas=(0.95, 0.95), precondition_frequency=10, merge_dims=False,
                           max_precond_dim=10000, use_precond_schedule=False)
        fam["soap"]["heavyball"] = hb_soap
    fam["stable_spam"] = {"poise": lambda ps: P.StableSPAM(ps)}
    if po is not None:
        fam["stable_spam"]["pytorch_optimizer"] = lambda ps: po.StableSPAM(ps)
    fam["galore_adamw"] = {"poise": lambda ps: P.GaLoreAdamW(galore_groups(ps))}
    if po is not None:
        def po_galore(ps):
            groups = galore_groups(ps)
            groups[0]["projection_type"] = groups[0].pop("proj_type")
            return po.GaLore(groups)
        fam["galore_adamw"]["pytorch_optimizer"] = po_galore
    return fam


def theoretical(family: str, params: list[torch.Tensor]) -> float:
    """State bytes per parameter in fp32, from the algorithm (shared/research/optim.md 1.13)."""
    n = sum(p.numel() for p in params)
    b = 0.0
    for p in params:
        if family in ("adamw", "stable_spam"):
            b += 8 * p.numel()
        elif family == "soap":
            b += 8 * p.numel() + (8 * sum(d * d for d in p.shape) if p.dim() >= 2 else 0)
        elif family == "galore_adamw":
            if p.dim() == 2:
                m, k = max(p.shape), min(p.shape)
                b += 8 * 128 * m + 4 * 128 * k  # moments r x max(m,n), projector r x min(m,n)
            else:
                b += 8 * p.numel()
    return b / n


def soap_matmul_seconds(params: list[torch.Tensor], repeats: int) -> float:
    """Time of SOAP's extra matrix products per step, alone: for each matrix G (m x n) with
    bases QL (m x m), QR (n x n): project G and the Adam ratio (2 x QL^T G QR) and the
    factor updates G G^T, G^T G. Six products of m x n by a square matrix per weight."""
    mats = [(torch.randn(p.shape), torch.linalg.qr(torch.randn(p.shape[0], p.shape[0]))[0],
             torch.linalg.qr(torch.randn(p.shape[1], p.shape[1]))[0]) for p in params if p.dim() == 2]

    def once():
        for g, ql, qr in mats:
            _ = ql.T @ g @ qr
            _ = ql @ g @ qr.T
            _ = g @ g.T
            _ = g.T @ g

    once()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(model_fn, fams, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    base = model_fn()
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    impls = [("adamw", "torch_fused", lambda ps: torch.optim.AdamW(ps, fused=True))]
    impls += [(f, name, fn) for f, d in fams.items() for name, fn in d.items()]
    runs = []
    for fam, name, fn in impls:
        m = model_fn()
        m.load_state_dict(base.state_dict())
        ps = list(m.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = fn(ps)
        runs.append({"family": fam, "impl": name, "params": ps, "opt": opt, "times": [], "error": None})

    round_robin(runs, grads, warmup, repeats)  # warm-up includes SOAP's preconditioner-only first step
    for r in runs:
        r["theory_bpp"] = theoretical(r["family"], r["params"])
    return runs


def report(title: str, runs: list[dict], matmul_s: float | None) -> None:
    adamw = next(r for r in runs if r["impl"] == "torch_fused")["median"]
    print(f"\n## {title}  ({sum(p.numel() for p in runs[0]['params']) / 1e6:.2f}M parameters)")
    print(f"{'family':<14}{'implementation':<20}{'median ms':>10}{'vs poise':>10}{'vs AdamW fused':>16}"
          f"{'state B/param':>15}{'theory':>8}")
    for fam in dict.fromkeys(r["family"] for r in runs):
        rs = [r for r in runs if r["family"] == fam]
        ours = next((r["median"] for r in rs if r["impl"] == "poise"), None)
        for r in rs:
            if r["error"]:
                print(f"{fam:<14}{r['impl']:<20}  failed: {r['error']}")
                continue
            vs = f"{r['median'] / ours:.2f}x" if ours else "-"
            print(f"{fam:<14}{r['impl']:<20}{r['median'] * 1e3:>10.1f}{vs:>10}{r['median'] / adamw:>15.1f}x"
                  f"{r['state_bpp']:>15.1f}{r['theory_bpp']:>8.1f}")
    if matmul_s is not None:
        soap = next((r["median"] for r in runs if r["family"] == "soap" and r["impl"] == "poise"), None)
        if soap:
            print(f"SOAP's extra matmuls alone: {matmul_s * 1e3:.1f} ms -> expected SOAP/AdamW >= "
                  f"{(adamw + matmul_s) / adamw:.1f}x; measured {soap / adamw:.1f}x "
                  f"({soap / (adamw + matmul_s):.2f} of the expectation)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heavyball-compile", action="store_true", help="let heavyball torch.compile its steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fams = families(a.heavyball_compile)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {a.repeats}; peers: "
          f"{', '.join(sorted({n for d in fams.values() for n in d} - {'poise'})) or 'none installed'}")
    models = {"mlp": ("3-layer MLP, 1024 wide", mlp), "transformer": ("transformer, d=256, 4 layers", transformer)}
    for key in a.models.split(","):
        title, fn = models[key]
        runs = bench(fn, fams, a.repeats, a.warmup)
        ps = [p for p in runs[0]["params"]]
        report(title, runs, soap_matmul_seconds(ps, max(3, a.repeats // 3)))


if __name__ == "__main__":
    main()

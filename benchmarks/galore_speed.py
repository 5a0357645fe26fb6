"""GaLore-AdamW step time: poise against galore-torch and pytorch-optimizer, side by side.

    python benchmarks/galore_speed.py [--repeats 40] [--rounds 3] [--rank 128] [--threads 2]

Model: an MLP 512 -> 1024 -> 1024 -> 256 (weights 1024x512, 1024x1024, 256x1024 projected at
``--rank``, ``update_proj_gap=200``, ``scale=0.25``, ``proj_type="std"``; biases plain AdamW).
Every implementation steps on the same fixed gradients (fresh ``.grad`` copies each step, set
outside the timer). Implementations are timed round-robin in one process, the order rotated
every repeat, so machine noise (other processes on the cores) hits all alike; each figure is the
median over ``--repeats`` steps after warm-up (which includes the SVD step; a refresh does not
fall inside the timed steps). ``--rounds`` repeats the whole measurement to show how stable the
ratios are. Reported, for the median and for the fastest step (the least disturbed estimate on
a shared machine): ratios only (absolute times on a shared machine mean little), each peer's
median divided by poise's (> 1: poise is faster), and poise over its matmul floor: the two
products per projected weight (``G P^T`` and ``N P`` added into the weight) timed alone in the
same rotation.

poise is run with its default ``nonfinite="raise"`` (one finiteness check of every gradient per
step, which the peers do not do) and with ``nonfinite="ignore"``, so the check's cost shows.

``--nonfinite-cost`` measures instead what each ``nonfinite`` policy adds to a fused AdamW step on
the same MLP (``raise``: a sum per gradient and one host read; ``raise_async``: one
``_foreach_norm(inf)`` and no host read until the next step; ``ignore``: nothing), as ratios to
``ignore``. On CPU a host read costs nothing extra (the values are already on the host); on a
GPU it waits for the queue to drain, which this CPU figure cannot show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
import warnings

import torch
from torch import nn

import poise.optim as P


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256))


def _galore_torch():
    """galore-torch 1.0's AdamW; its package imports transformers/bitsandbytes, which a stub spares."""
    try:
        from galore_torch.adamw import AdamW

        return AdamW
    except Exception:
        pass
    stub = types.ModuleType("transformers.utils.versions")
    stub.require_version = lambda *a, **k: None
    sys.modules.setdefault("transformers", types.ModuleType("transformers"))
    sys.modules.setdefault("transformers.utils", types.ModuleType("transformers.utils"))
    sys.modules["transformers.utils.versions"] = stub
    try:
        from galore_torch.adamw import AdamW

        return AdamW
    except Exception:
        return None


def impls(rank: int) -> dict[str, object]:
    def groups(ps, key="proj_type"):
        return [{"params": [p for p in ps if p.dim() == 2], "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                 key: "std"}, {"params": [p for p in ps if p.dim() != 2]}]

    out: dict[str, object] = {
        "poise": lambda ps: P.GaLoreAdamW(groups(ps)),
        "poise (nonfinite=ignore)": lambda ps: P.GaLoreAdamW(groups(ps), nonfinite="ignore"),
        "poise (fused=False chain)": lambda ps: P.GaLoreAdamW(groups(ps), fused=False),
    }
    gt = _galore_torch()
    if gt is not None:
        out["galore-torch"] = lambda ps: gt(groups(ps), no_deprecation_warning=True)
    try:
        import pytorch_optimizer as po

        out["pytorch-optimizer"] = lambda ps: po.GaLore(groups(ps, "projection_type"))
    except ImportError:
        pass
    return out


class Floor:
    """The two matrix products per projected weight, in poise's layout, into kept buffers."""

    def __init__(self, params: list[torch.Tensor], rank: int):
        self.work = []
        for p in params:
            if p.dim() != 2:
                continue
            m, n = p.shape
            g = torch.randn(m, n)
            if m >= n:  # right: R = G P^T (m x r), W += N P
                proj = torch.linalg.qr(torch.randn(n, rank))[0].t().contiguous()
                self.work.append(("right", g, proj, torch.empty(m, rank), p.detach().clone()))
            else:  # left: R = P^T G (r x n), W += P N
                proj = torch.linalg.qr(torch.randn(m, rank))[0].contiguous()
                self.work.append(("left", g, proj, torch.empty(rank, n), p.detach().clone()))

    def step(self) -> None:
        for side, g, proj, r, w in self.work:
            if side == "right":
                torch.mm(g, proj.t(), out=r)
                w.addmm_(r, proj, alpha=-1e-6)
            else:
                torch.mm(proj.t(), g, out=r)
                w.addmm_(proj, r, alpha=-1e-6)


def measure(rank: int, repeats: int, warmup: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    base = mlp()
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    runs = {}
    for name, fn in impls(rank).items():
        m = mlp()
        m.load_state_dict(base.state_dict())
        ps = list(m.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[name] = (ps, fn(ps), [])
    floor = Floor(list(base.parameters()), rank)
    floor_t: list[float] = []

    def step(ps, opt) -> float:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    for ps, opt, _ in runs.values():
        for _ in range(warmup):
            step(ps, opt)
    names = list(runs)
    for k in range(repeats):
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            ps, opt, ts = runs[name]
            ts.append(step(ps, opt))
        t0 = time.perf_counter()
        floor.step()
        floor_t.append(time.perf_counter() - t0)
    out = {name: statistics.median(ts) for name, (_, _, ts) in runs.items()}
    out["matmul floor"] = statistics.median(floor_t)
    # the fastest step: on a machine shared with other work, the least disturbed estimate
    out.update({f"{name} [fastest]": min(ts) for name, (_, _, ts) in runs.items()})
    out["matmul floor [fastest]"] = min(floor_t)
    return out


def nonfinite_cost(repeats: int, rounds: int) -> None:
    torch.manual_seed(0)
    base = mlp()
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    print(f"\n{'nonfinite policy (AdamW)':<28}" + "".join(f"{'round ' + str(i + 1):>10}" for i in range(rounds))
          + "   (median step / ignore's; fastest / fastest)")
    table: dict[str, list[float]] = {}
    for _ in range(rounds):
        runs = {}
        for policy in ("ignore", "raise", "raise_async"):
            m = mlp()
            m.load_state_dict(base.state_dict())
            ps = list(m.parameters())
            runs[policy] = (ps, P.AdamW(ps, lr=1e-3, nonfinite=policy), [])
        for k in range(repeats + 3):
            for name in list(runs)[k % 3:] + list(runs)[:k % 3]:
                ps, opt, ts = runs[name]
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g.clone()
                t0 = time.perf_counter()
                opt.step()
                if k >= 3:
                    ts.append(time.perf_counter() - t0)
        ref = statistics.median(runs["ignore"][2])
        low = min(runs["ignore"][2])
        for name, (_, _, ts) in runs.items():
            table.setdefault(name, []).append(statistics.median(ts) / ref)
            table.setdefault(name + " (fastest step)", []).append(min(ts) / low)
    for name, rs in table.items():
        print(f"{name:<28}" + "".join(f"{x:>10.2f}" for x in rs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nonfinite-cost", action="store_true", help="time the nonfinite policies on AdamW instead")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.nonfinite_cost:
        nonfinite_cost(a.repeats, a.rounds)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rank {a.rank}, "
          f"{a.repeats} steps x {a.rounds} rounds; MLP 512-1024-1024-256")
    rounds = [measure(a.rank, a.repeats, a.warmup, seed) for seed in range(a.rounds)]
    names = list(rounds[0])
    print(f"\n{'implementation':<28}" + "".join(f"{'round ' + str(i + 1):>10}" for i in range(a.rounds))
          + "   (median step / poise's; > 1: poise faster)")
    for tag in ("", " [fastest]"):
        print(f"-- {'median step' if not tag else 'fastest step'}")
        own = "poise" + tag
        for name in [n for n in names if n.endswith(tag) and (tag or not n.endswith("[fastest]"))]:
            print(f"{name.removesuffix(tag):<28}" + "".join(f"{r[name] / r[own]:>10.2f}" for r in rounds))
        peers = [n for n in names if n.endswith(tag) and (tag or not n.endswith("[fastest]"))
                 and not n.startswith("poise") and not n.startswith("matmul floor")]
        if peers:
            fastest = [min(r[n] for n in peers) / r[own] for r in rounds]
            print(f"{'fastest peer / poise':<28}" + "".join(f"{x:>10.2f}" for x in fastest))
        floor = "matmul floor" + tag
        print(f"{'poise / matmul floor':<28}" + "".join(f"{r[own] / r[floor]:>10.2f}" for r in rounds))


if __name__ == "__main__":
    main()

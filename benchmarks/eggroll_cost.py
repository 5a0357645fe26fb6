"""EGGROLL's cost against naive (full-rank) evolution strategies: noise memory and forward time.

    python benchmarks/eggroll_cost.py [--width 512] [--population 32] [--batch 16] [--ranks 1,4] [--threads 1]

Memory: the perturbation numbers one member needs per ``m x n`` layer, ``r (m + n)`` against ``m n``,
for a few layer shapes, and the bytes ``EGGROLL.noise()`` actually allocates for a whole
population of a 3-layer MLP against the dense noise a naive ES would hold.

Time (median of ``--repeats`` rounds, after warm-up, round-robin): one population forward of the
MLP on a batch, (a) EGGROLL: a shared ``x W^T`` plus ``(x B_i) A_i^T`` per member
(``EGGROLL.population_forward``), (b) naive ES, batched: every member's ``W + E_i`` materialised and
applied with one ``bmm``, (c) naive ES, looped: one forward per member with ``W + E_i`` formed on
the fly. The naive rows start from stored ``E_i`` (the add ``W + E_i`` is timed, the draw is not);
all three compute the same outputs (checked). Noise generation is timed separately (low-rank
factors vs a dense ``m x n`` draw per member).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from poise.optim.eggroll import EGGROLL


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width))


def timeit(fns: dict[str, object], repeats: int) -> dict[str, float]:
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_rank(model: nn.Module, x: torch.Tensor, layers: list[nn.Linear], r: int, N: int, B: int, d: int,
               repeats: int) -> None:
    es = EGGROLL(model, sigma=0.01, rank=r, population=N)
    noise = es.noise()
    held = sum(t.numel() * t.element_size() for v in noise.values() for t in v if t is not None)
    dense = sum(N * (m.weight.numel() + m.bias.numel()) * 4 for m in layers)
    print(f"\n== population N={N}, 3 layers {d}x{d}, rank r={r}, batch {B} ==")
    print(f"noise held for the population: EGGROLL {held / 2**20:.2f} MiB, naive ES {dense / 2**20:.2f} MiB "
          f"({dense / held:.0f}x)")

    Es = {i: [(noise[str(j)][0][i] @ noise[str(j)][1][i].T) for j in (0, 2, 4)] for i in range(N)}
    bias_e = [noise[str(j)][2] for j in (0, 2, 4)]

    def eggroll() -> torch.Tensor:
        return es.population_forward(x)

    @torch.no_grad()
    def naive_batched() -> torch.Tensor:
        h = x.expand(N, B, d)
        for k, lin in enumerate(layers):
            W = lin.weight + torch.stack([Es[i][k] for i in range(N)])  # (N, out, in) materialised
            h = torch.baddbmm((lin.bias + bias_e[k])[:, None, :], h, W.transpose(1, 2))
            if k < 2:
                h = torch.relu(h)
        return h

    @torch.no_grad()
    def naive_loop() -> torch.Tensor:
        outs = []
        for i in range(N):
            h = x
            for k, lin in enumerate(layers):
                h = torch.nn.functional.linear(h, lin.weight + Es[i][k], lin.bias + bias_e[k][i])
                if k < 2:
                    h = torch.relu(h)
            outs.append(h)
        return torch.stack(outs)

    assert torch.allclose(eggroll(), naive_batched(), atol=1e-4) and torch.allclose(eggroll(), naive_loop(),
                                                                                     atol=1e-4)

    def gen_lowrank() -> None:
        es._noise = None
        es.noise()

    def gen_dense() -> None:
        g = torch.Generator().manual_seed(0)
        for _ in range(N // 2):  # antithetic: one draw per pair
            for lin in layers:
                torch.randn(lin.weight.shape, generator=g)
                torch.randn(lin.bias.shape, generator=g)

    t = timeit({"eggroll": eggroll, "naive_batched": naive_batched, "naive_loop": naive_loop,
                "gen_lowrank": gen_lowrank, "gen_dense": gen_dense}, repeats)
    print(f"forward, whole population: EGGROLL {t['eggroll'] * 1e3:.2f} ms | naive batched (bmm, W+E_i "
          f"materialised) {t['naive_batched'] * 1e3:.2f} ms ({t['naive_batched'] / t['eggroll']:.1f}x) | "
          f"naive loop {t['naive_loop'] * 1e3:.2f} ms ({t['naive_loop'] / t['eggroll']:.1f}x)")
    print(f"noise generation per step: EGGROLL factors {t['gen_lowrank'] * 1e3:.2f} ms | dense "
          f"{t['gen_dense'] * 1e3:.2f} ms ({t['gen_dense'] / t['gen_lowrank']:.1f}x)")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ranks", default="1,4")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    N, B, d = a.population, a.batch, a.width

    print("== noise numbers per member and layer: r(m+n) vs m*n ==")
    print(f"{'m x n':>12} {'r':>3} {'low-rank':>10} {'dense':>12} {'ratio':>8}")
    for m, n in [(512, 512), (1024, 1024), (4096, 1024), (4096, 4096)]:
        for r in (1, 4, 16):
            lr_, dn = r * (m + n), m * n
            print(f"{m:>5}x{n:<6} {r:>3} {lr_:>10,} {dn:>12,} {dn / lr_:>7.0f}x")

    model = mlp(d)
    x = torch.randn(B, d)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    for r in (int(s) for s in a.ranks.split(",")):
        bench_rank(model, x, layers, r, N, B, d, a.repeats)


if __name__ == "__main__":
    main()

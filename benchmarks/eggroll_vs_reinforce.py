"""EGGROLL against REINFORCE on a non-differentiable reward: exact-match addition of two digits.

    python benchmarks/eggroll_vs_reinforce.py [--seeds 5] [--steps 300] [--threads 1]

Task: ``a, b`` in 0..9 (one-hot, 20 inputs) -> ``a + b`` as one of 19 answers; a tiny MLP
(20 -> 64 -> 19). Reward = 1 if the answer is exactly right, else 0 (no gradient through it).

* EGGROLL (backprop-free): population ``N`` (antithetic), rank ``r``; member ``i``'s fitness is its
  exact-match rate of the *greedy* (argmax) answer on a batch of ``B`` random pairs; the estimate
  goes into ``p.grad`` and Adam steps.
* REINFORCE (backprop): on ``N B`` random pairs per step (the same number of example forwards),
  sample an answer from the softmax, reward 1/0, advantage = reward - batch mean, loss
  ``-mean(A log pi(answer))``, Adam steps.

Both see ``N B`` example forwards per step; REINFORCE also runs a backward pass. Reported: greedy
exact-match accuracy on all 100 pairs after ``--steps`` steps, mean and 95% t-interval over seeds,
and wall time per run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from poise.optim.eggroll import EGGROLL

T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def encode(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.one_hot(a, 10), F.one_hot(b, 10)], -1).float()


def model_for(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 19))


ALL_A, ALL_B = torch.arange(100) // 10, torch.arange(100) % 10


@torch.no_grad()
def accuracy(model: nn.Module) -> float:
    return float((model(encode(ALL_A, ALL_B)).argmax(-1) == ALL_A + ALL_B).float().mean())


def run_eggroll(seed: int, steps: int, n: int, b: int, rank: int, sigma: float, lr: float) -> float:
    model = model_for(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    es = EGGROLL(model, sigma=sigma, rank=rank, population=n, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        a, c = torch.randint(0, 10, (b,), generator=g), torch.randint(0, 10, (b,), generator=g)
        es.step(opt, encode(a, c), lambda out, t=a + c: (out.argmax(-1) == t).float().mean(1))
    return accuracy(model)


def run_reinforce(seed: int, steps: int, n: int, b: int, lr: float) -> float:
    model = model_for(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        a, c = torch.randint(0, 10, (n * b,), generator=g), torch.randint(0, 10, (n * b,), generator=g)
        logp = F.log_softmax(model(encode(a, c)), -1)
        ans = torch.multinomial(logp.exp().detach(), 1, generator=g).squeeze(1)
        reward = (ans == a + c).float()
        loss = -((reward - reward.mean()) * logp.gather(1, ans[:, None]).squeeze(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return accuracy(model)


def summary(xs: list[float]) -> str:
    m = statistics.mean(xs)
    half = T95.get(len(xs), 1.96) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{m:.3f} +/- {half:.3f} (95% t, n={len(xs)}; runs: {', '.join(f'{x:.2f}' for x in xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.1)
    ap.add_argument("--es-lr", type=float, default=0.03)
    ap.add_argument("--pg-lr", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res: dict[str, list[float]] = {"eggroll": [], "reinforce": []}
    secs: dict[str, list[float]] = {"eggroll": [], "reinforce": []}
    init = [accuracy(model_for(s)) for s in range(a.seeds)]
    for s in range(a.seeds):
        t = time.perf_counter()
        res["eggroll"].append(run_eggroll(s, a.steps, a.population, a.batch, a.rank, a.sigma, a.es_lr))
        secs["eggroll"].append(time.perf_counter() - t)
        t = time.perf_counter()
        res["reinforce"].append(run_reinforce(s, a.steps, a.population, a.batch, a.pg_lr))
        secs["reinforce"].append(time.perf_counter() - t)
    print(f"exact-match addition of two digits, MLP 20-64-19, {a.steps} steps x {a.population * a.batch} example "
          f"forwards per step; greedy accuracy on all 100 pairs")
    print(f"  initial     {summary(init)}")
    print(f"  EGGROLL     {summary(res['eggroll'])}   N={a.population} r={a.rank} sigma={a.sigma} lr={a.es_lr}, "
          f"{statistics.mean(secs['eggroll']):.1f} s/run")
    print(f"  REINFORCE   {summary(res['reinforce'])}   lr={a.pg_lr}, {statistics.mean(secs['reinforce']):.1f} s/run")


if __name__ == "__main__":
    main()

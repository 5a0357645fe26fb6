"""ReLoop2's error memory on a drifting stream: how fast accuracy recovers after each drift, with
and without the fast error-compensation path (Zhu et al., KDD 2023, arXiv 2306.08717).

    python benchmarks/reloop_drift.py [--kind label rotate] [--seeds 0 1 2 3 4] [--steps 150]

Protocol (prequential, "test then train"): the stream is ``drift-digits`` (``poise.tasks.drift``),
``--tasks`` segments of ``--steps`` steps; a drift happens at the first step of every segment after
the first. At each step a batch of ``--batch`` training samples of the current segment arrives;
the slow model (an MLP, SGD) predicts it first, and so does the slow model compensated by the
:class:`poise.continual.reloop.ErrorMemory` (``p' = p + lam * ê(h(x))``, ``h`` the slow model's
embedding, or the raw input with ``--keys input``); both accuracies on that batch are recorded;
then the batch's errors ``onehot(y) - p`` are written to the memory and the slow model takes one
SGD step. Both predictions come from the same slow model, so the comparison is paired within a run.

Recovery after a drift at step D: ``pre`` = the method's mean accuracy over the ``--pre`` steps
before D; recovery = the number of steps after D until the trailing ``--window``-step mean accuracy
(inside the segment) is back at ``pre - eps``; a drift never recovered within the segment counts
as the segment's length (censored; the count is printed). Per seed the recoveries of all drifts
are averaged; the difference slow - compensated is summarised over seeds with a 95% t-interval
(``poise.runs.verdict.evaluate_claim``). Also printed: the mean accuracy over the first 30 steps
after each drift.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poise.continual.fscil import embed
from poise.continual.reloop import ErrorMemory, classification_error
from poise.models import build_model
from poise.runs.verdict import ClaimConfig, Side, evaluate_claim
from poise.tasks.drift import drift_digits


def run(kind: str, seed: int, a: argparse.Namespace) -> dict[str, np.ndarray]:
    stream = drift_digits(n_tasks=a.tasks, kind=kind)
    torch.manual_seed(seed)
    model = build_model("mlp", 64, 10, a.hidden, 2)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    mem = ErrorMemory(a.capacity, a.k, a.lam, a.temperature)
    gen = torch.Generator().manual_seed(1000 + seed)
    slow, fast = [], []
    for task in stream.tasks:
        x_all, y_all = task.x_train, task.y_train
        for _ in range(a.steps):
            idx = torch.randint(len(y_all), (a.batch,), generator=gen)
            x, y = x_all[idx], y_all[idx]
            model.eval()
            with torch.no_grad():
                emb, logits = embed(model, x)
                keys = emb if a.keys == "embedding" else x.flatten(1)
                p = torch.softmax(logits, -1)
                slow.append(float((p.argmax(-1) == y).float().mean()))
                fast.append(float((mem.compensate(keys, p).argmax(-1) == y).float().mean()))
                mem.update(keys, classification_error(logits, y))
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"slow": np.array(slow), "fast": np.array(fast)}


def recovery(acc: np.ndarray, drift: int, seg: int, pre: int, window: int, eps: float) -> tuple[int, bool]:
    """Steps after ``drift`` until the trailing ``window``-mean accuracy is within ``eps`` of the mean
    over the ``pre`` steps before it; ``(seg, False)`` if that never happens inside the segment."""
    target = acc[drift - pre:drift].mean() - eps
    for t in range(drift + window - 1, drift + seg):
        if acc[t - window + 1:t + 1].mean() >= target:
            return t - drift + 1, True
    return seg, False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", nargs="+", default=["label", "rotate"], choices=["label", "rotate"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--tasks", type=int, default=4, help="segments (drifts = tasks - 1)")
    ap.add_argument("--steps", type=int, default=150, help="steps per segment")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--keys", choices=["embedding", "input"], default="embedding")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--pre", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.pre > a.steps or a.window > a.steps:
        ap.error(f"--pre {a.pre} and --window {a.window} must be <= --steps {a.steps}")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    print(f"drift-digits, {a.tasks} segments x {a.steps} steps, batch {a.batch}; memory capacity {a.capacity}, "
          f"k {a.k}, lam {a.lam}, tau {a.temperature}, keys {a.keys}; eps {a.eps}, window {a.window}\n")
    for kind in a.kind:
        results: list[dict[str, Any]] = []
        censored = {"slow": 0, "fast": 0}
        early = {"slow": [], "fast": []}
        overall = {"slow": [], "fast": []}
        for seed in a.seeds:
            acc = run(kind, seed, a)
            for name, series in acc.items():
                recs = []
                for i in range(1, a.tasks):
                    d = i * a.steps
                    r, ok = recovery(series, d, a.steps, a.pre, a.window, a.eps)
                    recs.append(r)
                    censored[name] += not ok
                    early[name].append(float(series[d:d + 30].mean()))
                overall[name].append(float(series.mean()))
                results.append({"variant": name, "seed": seed,
                                "metrics": {"recovery": statistics.mean(recs),
                                            "early_acc": statistics.mean(early[name][-(a.tasks - 1):]),
                                            "acc": float(series.mean())}})
        print(f"== kind={kind} ({len(a.seeds)} seeds, {a.tasks - 1} drifts each)")
        print(f"{'':22}{'slow model':>14}{'+ error memory':>16}")
        for metric, label in [("recovery", "recovery (steps)"), ("early_acc", "acc, 30 steps after"),
                              ("acc", "acc, whole stream")]:
            vals = {n: [r["metrics"][metric] for r in results if r["variant"] == n] for n in ("slow", "fast")}
            print(f"{label:22}" + "".join(f"{statistics.mean(v):>9.3f} ±{statistics.stdev(v):.3f}"
                                          for v in vals.values()))
        print(f"{'never recovered':22}{censored['slow']:>14}{censored['fast']:>16}")
        for metric, better, than, margin, text in [
                ("recovery", "slow", "fast", 0.0, "the error memory recovers in fewer steps"),
                ("early_acc", "fast", "slow", 0.0, "the error memory is more accurate right after a drift")]:
            c = ClaimConfig(text=text, paper="arXiv 2306.08717", better=Side(better, metric), than=Side(than, metric),
                            margin=margin)
            v = evaluate_claim(c, results)
            lo, hi = v["interval"] or (float("nan"), float("nan"))
            print(f"  {text}: {better}-{than} {metric} = {v['estimate']:.3f}, 95% CI [{lo:.3f}, {hi:.3f}] "
                  f"-> {v['verdict']}")
        print()
    print(f"wall time {time.perf_counter() - t0:.1f} s ({a.threads} thread{'s' * (a.threads != 1)})")


if __name__ == "__main__":
    main()

"""Does GCWM's geometry conflict predict forgetting? Split-digits, a tiny MLP, several task orders.

    python benchmarks/merge_conflict.py [--seeds 5] [--orders 8] [--threads 1]

Base: an MLP (64-64-64-10) trained briefly on a small all-class subset of the digits train split
(the "pre-trained" model). Tasks: the 5 tasks of split-digits, task-incremental (each task trains and
predicts on its own two output units). Per seed, ``--orders`` random task orders.

A. Sequential fine-tuning (the paper's Sec. 3 setting). At step ``i >= 2`` of an order the state is
   ``theta_{i-1} - theta_0``, the update ``u_i = theta_i - theta_{i-1}``; the state-relative conflict
   ``c_i`` = :func:`poise.merge.state_conflict` (mean over the weight matrices) and the forgetting
   ``f_i`` = mean over earlier tasks of ``acc_j(theta_{i-1}) - acc_j(theta_i)``. Per seed, Spearman's
   rho of ``c`` vs ``f`` over all (order, step) pairs, and the same for the update norm ``||u_i||``.
B. Continual merging of base-relative task vectors ``tau_k`` (GCWM's continual mode with the
   ``current_anchor`` memory): ``Delta <- merge(Delta, tau_k)`` for task arithmetic (sum), GCWM and
   GCWM with the gate held at 0 (its plain branch alone); per step the conflict of ``(Delta, tau_k)``
   and the forgetting of the merged tasks; final mean accuracy over the 5 tasks.

Claims (``poise.runs.verdict``: mean over seeds with a 95% Student-t interval): rho(conflict,
forgetting) > 0 in A and in B, and rho(conflict) > rho(norm) in A.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poise.merge import apply_task_vector, gcwm_merge, state_conflict, task_arithmetic, task_vector
from poise.models.classifiers import MLP
from poise.runs.verdict import ClaimConfig, Side, evaluate_claim
from poise.tasks.digits import split_digits


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def task_acc(model: nn.Module, t) -> float:
    with torch.no_grad():
        logits = model(t.x_test)[:, t.classes]
        pred = torch.tensor(t.classes)[logits.argmax(1)]
    return float((pred == t.y_test).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[int] | None, steps: int, lr: float,
          g: torch.Generator) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        logits = model(x[idx])
        if classes is not None:
            cls = torch.tensor(classes)
            loss = F.cross_entropy(logits[:, cls], (y[idx].unsqueeze(1) == cls).float().argmax(1))
        else:
            loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_seed(seed: int, n_orders: int, ft_steps: int, lr: float) -> dict:
    stream = split_digits(5, "task")
    tasks = stream.tasks
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(64, 10, hidden=64, depth=2)
    x_all = torch.cat([t.x_train for t in tasks])
    y_all = torch.cat([t.y_train for t in tasks])
    sub = torch.randperm(len(x_all), generator=g)[:150]
    train(model, x_all[sub], y_all[sub], None, 150, 0.05, g)
    base = sd(model)
    rng = np.random.default_rng(seed)
    orders = [list(rng.permutation(5)) for _ in range(n_orders)]

    # A: sequential fine-tuning
    conf_a, norm_a, forg_a = [], [], []
    for order in orders:
        model.load_state_dict(base)
        prev = sd(model)
        for i, k in enumerate(order):
            before = {j: task_acc(model, tasks[j]) for j in order[:i]}
            train(model, tasks[k].x_train, tasks[k].y_train, tasks[k].classes, ft_steps, lr, g)
            cur = sd(model)
            if i >= 1:
                state = task_vector(prev, base)
                upd = task_vector(cur, prev)
                conf_a.append(state_conflict(state, upd)["mean"])
                norm_a.append(float(torch.sqrt(sum(v.pow(2).sum() for v in upd.values()))))
                forg_a.append(float(np.mean([before[j] - task_acc(model, tasks[j]) for j in order[:i]])))
            prev = cur

    # B: continual merging of base-relative task vectors
    taus = []
    for t in tasks:
        model.load_state_dict(base)
        train(model, t.x_train, t.y_train, t.classes, ft_steps, lr, g)
        taus.append(task_vector(sd(model), base))
    methods = {
        "task_arithmetic": lambda d, t: (task_arithmetic([d, t]), None),
        "gcwm": lambda d, t: gcwm_merge([d, t]),
        "gcwm_plain": lambda d, t: gcwm_merge([d, t], gate_min=0.0, gate_max=0.0),
    }
    merge_out: dict[str, dict[str, list[float]]] = {m: {"conf": [], "forg": [], "final": []} for m in methods}
    for order in orders:
        for name, merge in methods.items():
            delta = taus[order[0]]
            for i, k in enumerate(order[1:], 1):
                model.load_state_dict(apply_task_vector(base, delta))
                before = {j: task_acc(model, tasks[j]) for j in order[:i]}
                c = state_conflict(delta, taus[k])["mean"]
                delta, _ = merge(delta, taus[k])
                model.load_state_dict(apply_task_vector(base, delta))
                merge_out[name]["conf"].append(c)
                merge_out[name]["forg"].append(float(np.mean([before[j] - task_acc(model, tasks[j])
                                                              for j in order[:i]])))
            merge_out[name]["final"].append(float(np.mean([task_acc(model, t) for t in tasks])))
    model.load_state_dict(base)
    res = {
        "seed": seed,
        "base_acc": float(np.mean([task_acc(model, t) for t in tasks])),
        "seq": {"rho_conflict": spearman(conf_a, forg_a), "rho_norm": spearman(norm_a, forg_a),
                "mean_conflict": float(np.mean(conf_a)), "mean_forgetting": float(np.mean(forg_a))},
        "merge": {m: {"rho_conflict": spearman(v["conf"], v["forg"]), "final_acc": float(np.mean(v["final"])),
                      "mean_forgetting": float(np.mean(v["forg"]))} for m, v in merge_out.items()},
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--orders", type=int, default=8)
    ap.add_argument("--ft-steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="write per-seed results and verdicts here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    per_seed = [run_seed(s, a.orders, a.ft_steps, a.lr) for s in range(a.seeds)]
    rows = []
    for r in per_seed:
        rows.append({"variant": "seqft", "seed": r["seed"], "metrics": r["seq"]})
        for m, v in r["merge"].items():
            rows.append({"variant": m, "seed": r["seed"], "metrics": v})
    claims = [
        ClaimConfig("sequential FT: state-relative geometry conflict rank-correlates with forgetting (rho > 0)",
                    "arXiv 2605.09608", "conflict tracks forgetting; norm does not (Sec. 3, Qwen3 0.6B-14B)",
                    Side("seqft", "rho_conflict"), Side(value=0.0)),
        ClaimConfig("sequential FT: conflict predicts forgetting better than the update norm",
                    "arXiv 2605.09608", "update norm is insufficient to explain forgetting",
                    Side("seqft", "rho_conflict"), Side("seqft", "rho_norm")),
        ClaimConfig("continual merging (task arithmetic): conflict of (state, new task vector) predicts the "
                    "merge's forgetting (rho > 0)", "arXiv 2605.09608", "",
                    Side("task_arithmetic", "rho_conflict"), Side(value=0.0)),
        ClaimConfig("GCWM retains more than task arithmetic (final mean accuracy)", "arXiv 2605.09608",
                    "GCWM beats data-free baselines on retention and final performance",
                    Side("gcwm", "final_acc"), Side("task_arithmetic", "final_acc")),
        ClaimConfig("the geometry-aware branch helps: GCWM vs its plain branch alone (final mean accuracy)",
                    "arXiv 2605.09608", "ablation: removing the geometry correction hurts",
                    Side("gcwm", "final_acc"), Side("gcwm_plain", "final_acc")),
    ]
    verdicts = [evaluate_claim(c, rows) for c in claims]
    print(f"split-digits (task-IL), MLP 64-64-64-10, {a.seeds} seeds x {a.orders} orders, "
          f"{a.ft_steps} SGD steps per task; {time.perf_counter() - t0:.0f} s")
    print(f"  base mean task accuracy {np.mean([r['base_acc'] for r in per_seed]):.3f}")
    for key in ("rho_conflict", "rho_norm", "mean_conflict", "mean_forgetting"):
        vals = [r["seq"][key] for r in per_seed]
        print(f"  seqFT {key:16s} per seed {np.round(vals, 3).tolist()}")
    for m in ("task_arithmetic", "gcwm", "gcwm_plain"):
        for key in ("rho_conflict", "final_acc", "mean_forgetting"):
            vals = [r["merge"][m][key] for r in per_seed]
            print(f"  merge {m:15s} {key:16s} per seed {np.round(vals, 3).tolist()}")
    for v in verdicts:
        est = "n/a" if v["estimate"] is None else f"{v['estimate']:+.3f}"
        iv = "" if v["interval"] is None else f" [{v['interval'][0]:+.3f}, {v['interval'][1]:+.3f}]"
        print(f"  CLAIM {v['text']}\n    {v['better']} - {v['than']} = {est}{iv} -> {v['verdict']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"per_seed": per_seed, "verdicts": verdicts}, f, indent=1)


if __name__ == "__main__":
    main()

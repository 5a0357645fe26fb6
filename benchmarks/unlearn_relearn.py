"""Unlearning that resists relearning: forget a digit class, then attack with a few of its samples.

    python benchmarks/unlearn_relearn.py [--seeds 3] [--threads 1]

Per seed: an MLP (64-64-64-10) trained on the digits train split; the forget set is every training
image of one class (``seed % 10``), the retain set the rest. Each method unlearns from a copy:
``ga`` (gradient ascent), ``graddiff``, ``npo`` (+ retain NLL), ``stableun`` (NPO forget objective
with neighbourhood probes and projected retain feedback), ``fit`` (one FIT request: filter,
importance-selected algorithm, targeted layers), ``acu`` (analytic ridge head on the frozen
penultimate features, exact unlearning) and ``retrain`` (trained from scratch without the class: the
gold standard). Then the relearning attack (:func:`poise.edit.relearn_attack`): ``--attack-n``
forgotten training images, ``--attack-steps`` Adam steps. Measured on the test split: forget
accuracy (the class) and retain accuracy (the other classes), before and after the attack.

Claims (papers: StableUN arXiv 2509.20230, FIT arXiv 2601.21682 -- both resist relearning better than
GA/NPO), as paired differences over seeds with ``poise.runs.verdict``: forget accuracy after the
attack of GA (or NPO) minus that of StableUN (or FIT) > 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poise.edit import (
    FIT,
    AnalyticClassifier,
    grad_ascent_loss,
    grad_diff_loss,
    npo_loss,
    relearn_attack,
    stableun_backward,
)
from poise.models.classifiers import MLP
from poise.runs.verdict import ClaimConfig, Side, evaluate_claim
from poise.tasks.digits import split_digits


def acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def fit_model(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 400) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLP(64, 10, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def logp(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(x), -1).gather(1, y[:, None]).squeeze(1)


def gradient_unlearn(model: nn.Module, method: str, xf, yf, xr, yr, steps: int, lr: float, seed: int) -> nn.Module:
    m = copy.deepcopy(model).train()
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref_lp = logp(ref, xf, yf)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ridx = torch.randint(0, len(xr), (128,), generator=g)

        def forget() -> torch.Tensor:
            if method in ("ga", "graddiff"):
                return grad_ascent_loss(F.cross_entropy(m(xf), yf))
            return npo_loss(logp(m, xf, yf), ref_lp, beta=0.1)

        def retain(ridx: torch.Tensor = ridx) -> torch.Tensor:
            return F.cross_entropy(m(xr[ridx]), yr[ridx])

        opt.zero_grad()
        if method == "stableun":
            stableun_backward(list(m.parameters()), forget, retain, inner_lr=lr, rho=0.5, sigma=0.01, n_noise=1,
                              alpha=1.0, generator=g)
        else:
            if method == "ga":
                loss = forget()
            elif method == "graddiff":
                loss = grad_diff_loss(F.cross_entropy(m(xf), yf), retain())
            else:  # npo with retain NLL
                loss = forget() + retain()
            loss.backward()
        opt.step()
    return m.eval()


def acu_model(model: nn.Module, xtr, ytr, forget_mask) -> nn.Module:
    feat = nn.Sequential(*list(model.net.children())[:-1])
    with torch.no_grad():
        X = feat(xtr).double()
    acu = AnalyticClassifier(X.shape[1], 10, gamma=1.0)
    Y = F.one_hot(ytr, 10).double()
    acu.learn(X, Y)
    acu.unlearn(X[forget_mask], Y[forget_mask])
    head = nn.Linear(X.shape[1], 10, bias=False)
    with torch.no_grad():
        head.weight.copy_(acu.W.T.float())
    return nn.Sequential(copy.deepcopy(feat), head).eval()


def run_seed(seed: int, a: argparse.Namespace) -> list[dict]:
    task = split_digits(1).tasks[0]
    xtr, ytr, xte, yte = task.x_train, task.y_train, task.x_test, task.y_test
    c = seed % 10
    fm = ytr == c
    xf, yf, xr, yr = xtr[fm], ytr[fm], xtr[~fm], ytr[~fm]
    tf, tr = yte == c, yte != c
    model = fit_model(xtr, ytr, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    att = torch.randperm(len(xf), generator=g)[: a.attack_n]
    rows = []
    methods = ["ga", "graddiff", "npo", "stableun", "fit", "acu", "retrain", "original"]
    for name in methods:
        info: dict = {}
        if name in ("ga", "graddiff", "npo", "stableun"):
            m = gradient_unlearn(model, name, xf, yf, xr, yr, a.steps, a.lr, seed)
        elif name == "fit":
            m = copy.deepcopy(model)
            fit = FIT(m, learned=(xtr, ytr), steps=a.steps, lr=a.lr, top_k=2, seed=seed)
            info = fit.request(xf, yf, retain=(xr[:256], yr[:256]))
            m.eval()
        elif name == "acu":
            m = acu_model(model, xtr, ytr, fm)
        elif name == "retrain":
            m = fit_model(xr, yr, seed)
        else:
            m = model
        attacked = relearn_attack(m, xf[att], yf[att], steps=a.attack_steps, lr=a.attack_lr)
        rows.append({"variant": name, "seed": seed, "metrics": {
            "forget_acc": acc(m, xte[tf], yte[tf]), "retain_acc": acc(m, xte[tr], yte[tr]),
            "forget_acc_attacked": acc(attacked, xte[tf], yte[tf]),
            "retain_acc_attacked": acc(attacked, xte[tr], yte[tr])},
            "fit": {k: v for k, v in info.items() if k in ("kept", "score", "algorithm", "layers")}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="unlearning steps per method")
    ap.add_argument("--lr", type=float, default=1e-3, help="unlearning Adam learning rate")
    ap.add_argument("--attack-n", type=int, default=5)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--attack-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = [r for s in range(a.seeds) for r in run_seed(s, a)]
    print(f"digits, MLP 64-64-64-10, forget one class; {a.steps} unlearning steps (Adam {a.lr}); attack: "
          f"{a.attack_n} forgotten images, {a.attack_steps} Adam steps ({a.attack_lr}); {a.seeds} seeds; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"  {'method':9s} {'forget':>15s} {'retain':>15s} {'forget|attack':>15s} {'retain|attack':>15s}"
          "   (mean ± sd over seeds)")
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for k in ("forget_acc", "retain_acc", "forget_acc_attacked", "retain_acc_attacked"):
            v = [r["metrics"][k] for r in rows if r["variant"] == name]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
        print(f"  {name:9s} " + " ".join(f"{c:>15s}" for c in cells))
    print("  FIT per seed:", [r["fit"] for r in rows if r["variant"] == "fit"])
    claims = [ClaimConfig(f"{robust} resists relearning better than {base}: forget acc after the attack, {base} - "
                          f"{robust} > 0", paper, "more robust to relearning than GA/NPO (WMDP/MUSE, PCH)",
                          Side(base, "forget_acc_attacked"), Side(robust, "forget_acc_attacked"))
              for robust, paper in (("stableun", "arXiv 2509.20230"), ("fit", "arXiv 2601.21682"))
              for base in ("ga", "npo")]
    verdicts = [evaluate_claim(cl, rows) for cl in claims]
    for v in verdicts:
        est = "n/a" if v["estimate"] is None else f"{v['estimate']:+.3f}"
        iv = "" if v["interval"] is None else f" [{v['interval'][0]:+.3f}, {v['interval'][1]:+.3f}]"
        print(f"  CLAIM {v['text']}\n    = {est}{iv} -> {v['verdict']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "verdicts": verdicts}, f, indent=1)


if __name__ == "__main__":
    main()

"""SSO: expensive gradient evaluations saved at equal loss (classification and an RL policy).

    python benchmarks/sso_grad_evals.py [--seeds 5] [--inner 1,2,5,10] [--threads 1]

Each run counts the *expensive* gradients ``nabla h(z)`` (one per outer step: one minibatch of
labels for classification, one batch of rollouts for the policy) until the model first reaches a
target; ``m = 1`` is plain SGD (SSO with one inner step is exactly an SGD step, tests/optim/test_sso.py).
Inner steps use SGD with the same learning rate as the baseline and re-use the outer step's batch.

* classification: scikit-learn digits (1,797 images, 10 classes), MLP 64-64-10, minibatch 64,
  ``eta = 128`` (= 2B = 1/L_h, the largest eta for which the surrogate majorises the mean cross-entropy,
  whose Hessian in the logits is at most 1/(2B)), SGD lr 0.05; target: full training loss <= ``--cls-target``.
* RL policy: a contextual bandit (32 contexts, 8 features, 6 actions, rewards in [0, 1]); each outer
  step samples one action per context from the policy (the "rollouts"), ``h`` is the REINFORCE loss
  ``-mean((R - mean R) log pi(a|s))`` over the logits; ``eta = 64`` (= 2B / max|A|), SGD lr 0.5; target: exact expected
  reward >= ``--rl-target`` of the optimum.

Reported per m: expensive gradients to target (mean, 95% t-interval over seeds), the ratio to m = 1,
and the backward passes through the model (``m`` per outer step) that buy the saving.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from poise.optim.sso import SSO

T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def ci(xs: list[float], digits: int = 1) -> str:
    m = statistics.mean(xs)
    half = T95.get(len(xs), 1.96) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{m:7.{digits}f} +/- {half:5.{digits}f}"


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def run_cls(seed: int, m: int, X: torch.Tensor, Y: torch.Tensor, target: float, cap: int) -> float:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    sso = SSO(model, torch.optim.SGD(model.parameters(), lr=0.05), eta=128.0, inner_steps=m)
    g = torch.Generator().manual_seed(seed)
    for t in range(1, cap + 1):
        idx = torch.randint(0, len(X), (64,), generator=g)
        y = Y[idx]
        sso.step(X[idx], lambda logits, y=y: F.cross_entropy(logits, y))
        if t % 5 == 0:
            with torch.no_grad():
                if float(F.cross_entropy(model(X), Y)) <= target:
                    return float(sso.target_grad_evals)
    return float("inf")


def bandit(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(32, 8, generator=g), torch.rand(32, 6, generator=g)


def run_rl(seed: int, m: int, target: float, cap: int) -> float:
    S, R = bandit(seed)
    best = float(R.max(1).values.mean())
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 6))
    sso = SSO(policy, torch.optim.SGD(policy.parameters(), lr=0.5), eta=64.0, inner_steps=m)
    g = torch.Generator().manual_seed(seed)
    for _ in range(cap):
        with torch.no_grad():
            probs = F.softmax(policy(S), -1)
            if float((probs * R).sum(1).mean()) >= target * best:
                return float(sso.target_grad_evals)
            a = torch.multinomial(probs, 1, generator=g).squeeze(1)  # one rollout per context
            r = R.gather(1, a[:, None]).squeeze(1)
            adv = r - r.mean()
        sso.step(S, lambda logits, a=a, adv=adv: -(adv * F.log_softmax(logits, -1).gather(1, a[:, None]).squeeze(1))
                 .mean())
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--inner", default="1,2,5,10")
    ap.add_argument("--cls-target", type=float, default=0.2)
    ap.add_argument("--rl-target", type=float, default=0.85)
    ap.add_argument("--cap", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ms = [int(s) for s in a.inner.split(",")]
    X, Y = digits()
    for name, fn in ((f"classification (digits, loss <= {a.cls_target:g})",
                      lambda s, m: run_cls(s, m, X, Y, a.cls_target, a.cap)),
                     (f"RL policy (bandit, reward >= {a.rl_target:g} of optimum)",
                      lambda s, m: run_rl(s, m, a.rl_target, a.cap))):
        print(f"== {name}: expensive gradients to target, {a.seeds} seeds ==")
        base: list[float] | None = None
        base_m = ms[0]
        for m in ms:
            xs = [fn(s, m) for s in range(a.seeds)]
            if any(math.isinf(x) for x in xs):
                print(f"  m={m:<3} did not reach the target within {a.cap} outer steps in "
                      f"{sum(math.isinf(x) for x in xs)} of {a.seeds} seeds")
                continue
            if base is None:
                base, base_m = xs, m
            ratio = [b / x for b, x in zip(base, xs, strict=True)]
            print(f"  m={m:<3} grad evals {ci(xs)}   saving vs m={base_m}: {ci(ratio, 2).strip()}x   "
                  f"model backwards {statistics.mean(xs) * m:8.0f}")


if __name__ == "__main__":
    main()

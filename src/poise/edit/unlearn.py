"""Analytic continual unlearning, and gradient-based unlearning losses."""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AnalyticClassifier", "grad_ascent_loss", "grad_diff_loss", "npo_loss", "relearn_attack"]


def _row_keys(X: Tensor, Y: Tensor) -> list[str]:
    data = torch.cat([X, Y.to(X.dtype)], 1).detach().cpu().contiguous()
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in data]


class AnalyticClassifier:
    r"""ACU, analytic continual unlearning (Tang et al., arXiv 2505.12239): a ridge classifier
    on frozen features, learned and unlearned exactly by recursive least squares.

    ``W = (X^T X + gamma I)^{-1} X^T Y`` over the rows learned so far; only
    ``R = (X^T X + gamma I)^{-1}`` and ``W`` are kept. Learning rows ``(X_k, Y_k)``:
    ``R <- R - R X_k^T (I + X_k R X_k^T)^{-1} X_k R``, ``W <- W + R X_k^T (Y_k - X_k W)``.
    Unlearning rows ``(X_u, Y_u)``: ``R <- R + R X_u^T (I - X_u R X_u^T)^{-1} X_u R``,
    ``W <- W - R X_u^T (Y_u - X_u W)`` with the updated ``R``: exactly the classifier refitted
    without them. ``X`` ``[n, d]`` features (from any frozen extractor), ``Y`` ``[n, c]``
    targets (one-hot for classes). Unlearning a row that was never learned raises.
    """

    def __init__(self, d: int, c: int, gamma: float = 1.0, dtype: torch.dtype = torch.float64):
        if gamma <= 0:
            raise ValueError(f"gamma={gamma} must be > 0")
        self.R = torch.eye(d, dtype=dtype) / gamma
        self.W = torch.zeros(d, c, dtype=dtype)
        self.gamma = gamma
        self._rows: dict[str, int] = {}

    def _check(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        if X.dim() != 2 or X.shape[1] != self.R.shape[0]:
            raise ValueError(f"X must be [n, d={self.R.shape[0]}], got {tuple(X.shape)}")
        if Y.dim() != 2 or Y.shape != (X.shape[0], self.W.shape[1]):
            raise ValueError(f"Y must be [n={X.shape[0]}, c={self.W.shape[1]}], got {tuple(Y.shape)}")
        return X.to(self.R.dtype), Y.to(self.R.dtype)

    def learn(self, X: Tensor, Y: Tensor) -> None:
        X, Y = self._check(X, Y)
        RX = self.R @ X.T
        S = torch.eye(len(X), dtype=X.dtype) + X @ RX
        self.R = self.R - RX @ torch.linalg.solve(S, RX.T)
        self.W = self.W + self.R @ X.T @ (Y - X @ self.W)
        for k in _row_keys(X, Y):
            self._rows[k] = self._rows.get(k, 0) + 1

    def unlearn(self, X: Tensor, Y: Tensor) -> None:
        X, Y = self._check(X, Y)
        keys = _row_keys(X, Y)
        counts: dict[str, int] = {}
        for i, k in enumerate(keys):
            counts[k] = counts.get(k, 0) + 1
            if counts[k] > self._rows.get(k, 0):
                raise ValueError(f"row {i} of the unlearning request was never learned (or is asked twice); "
                                 "nothing was changed")
        RX = self.R @ X.T
        S = torch.eye(len(X), dtype=X.dtype) - X @ RX
        if torch.linalg.matrix_rank(S) < len(X):
            raise ValueError("I - X R X^T is singular for this request; nothing was changed")
        R = self.R + RX @ torch.linalg.solve(S, RX.T)
        self.W = self.W - R @ X.T @ (Y - X @ self.W)
        self.R = R
        for k in keys:
            self._rows[k] -= 1

    def predict(self, X: Tensor) -> Tensor:
        return (X.to(self.W.dtype) @ self.W).argmax(-1)


def grad_ascent_loss(forget_nll: Tensor) -> Tensor:
    """Gradient ascent on the forget set: ``-NLL(D_f)`` (open-unlearning ``GradAscent``)."""
    return -forget_nll


def grad_diff_loss(forget_nll: Tensor, retain_nll: Tensor, gamma: float = 1.0, alpha: float = 1.0) -> Tensor:
    """Gradient difference: ``gamma (-NLL(D_f)) + alpha NLL(D_r)`` (open-unlearning ``GradDiff``)."""
    return -gamma * forget_nll + alpha * retain_nll


def npo_loss(forget_logp: Tensor, ref_forget_logp: Tensor, beta: float = 0.1, retain_nll: Tensor | None = None,
             alpha: float = 1.0) -> Tensor:
    r"""NPO (Zhang et al., arXiv 2404.05868): ``-(2/beta) E[log sigmoid(-beta (log pi - log pi_ref))]``
    on sequence log-probabilities of the forget set, plus ``alpha NLL(D_r)`` when given
    (open-unlearning ``NPO``, beta 0.1)."""
    loss = -(2.0 / beta) * F.logsigmoid(-beta * (forget_logp - ref_forget_logp)).mean()
    return loss if retain_nll is None else loss + alpha * retain_nll


def relearn_attack(model: nn.Module, x: Tensor, y: Tensor, steps: int = 10, lr: float = 0.01,
                   optimizer: str = "adam") -> nn.Module:
    """Relearning attack (Hu et al., arXiv 2406.13356; the attack of StableUN arXiv 2509.20230 and FIT
    arXiv 2601.21682): fine-tune a copy of an unlearned classifier on a few forgotten samples
    ``(x, y)`` for ``steps`` full-batch steps of cross-entropy (``optimizer`` ``"adam"`` or ``"sgd"``,
    learning rate ``lr``). Returns the attacked copy; ``model`` is not changed. Forget quality before
    and after the attack, measured on forgotten data the attack did not see, tells how much of the
    forgetting was only a sharp, easily undone minimum."""
    if len(x) == 0:
        raise ValueError("relearn_attack needs at least one sample")
    if steps < 0 or lr <= 0:
        raise ValueError(f"steps={steps} must be >= 0 and lr={lr} > 0")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}; valid choices: adam, sgd")
    attacked = copy.deepcopy(model).train()
    for p in attacked.parameters():
        p.requires_grad_(True)
    opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = opt_cls(attacked.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(attacked(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return attacked.eval()

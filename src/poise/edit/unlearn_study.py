r"""The parts of the relearning study (a classifier that forgets classes, then a relearning attack) that
both ``benchmarks/unlearn_relearn.py`` and the ``unlearn`` study kind (``poise run unlearn-relearn``) use.

* :func:`train_classifier`: the MLP the study unlearns from (Adam on cross-entropy, seeded).
* :func:`gradient_unlearn`: one deletion request unlearned by a gradient method --
  ``ga`` (gradient ascent, ``-NLL(D_f)``), ``graddiff`` (``-NLL(D_f) + NLL(D_r)``), ``npo``
  (NPO, arXiv 2404.05868, plus the retain NLL) or ``stableun`` (StableUN, arXiv 2509.20230: NPO's forget
  objective at neighbourhood probes with the retain gradient projected, :func:`~poise.edit.stableun_backward`);
  Adam, a fresh optimizer per request, the reference of NPO the model at the request's start.
* :func:`acu_features` / :func:`acu_model`: ACU (arXiv 2505.12239), an analytic ridge head on the frozen
  penultimate features, learned on everything and unlearned exactly per request.
* :func:`attack_candidates` / :func:`choose_attack`: the calibration rule of the relearning attack
  (:func:`~poise.edit.relearn_attack`): the attack must make a model that never saw the forgotten class
  (the ``retrain`` reference) recover it *partially* while it keeps its other classes.

The losses are those of :mod:`poise.edit.unlearn` (open-unlearning's GradAscent / GradDiff / NPO); see
docs/algorithms/stableun.md and docs/algorithms/fit.md for the measured study.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.edit.unlearn import AnalyticClassifier, grad_ascent_loss, grad_diff_loss, npo_loss
from poise.edit.unlearn_stableun import stableun_backward
from poise.models.classifiers import MLP

__all__ = ["GRADIENT_METHODS", "accuracy", "acu_features", "acu_head_model", "acu_model", "attack_candidates",
           "choose_attack", "class_logp", "forget_relapse", "gradient_unlearn", "mean_nll", "retention_gap",
           "train_classifier"]

GRADIENT_METHODS = ("ga", "graddiff", "npo", "stableun")


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``; NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mean_nll(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y)`` (how deep a class is forgotten); NaN for an empty set."""
    if len(x) == 0:
        return float("nan")
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def class_logp(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``log p(y_i | x_i)`` per row (with gradients): the sequence log-probability NPO takes, for a classifier."""
    return F.log_softmax(model(x), -1).gather(1, y[:, None]).squeeze(1)


def train_classifier(x: Tensor, y: Tensor, seed: int, steps: int = 400, hidden: int = 64, depth: int = 2,
                     lr: float = 3e-3, batch_size: int = 64, n_classes: int = 10) -> nn.Module:
    """An :class:`~poise.models.MLP` (``in -> hidden x depth -> n_classes``) trained by ``steps`` Adam steps
    (``lr``) on minibatches of ``batch_size`` rows drawn with replacement; ``torch.manual_seed(seed)`` sets
    the initialisation and a generator seeded ``seed`` the batches. Returned in eval mode."""
    if len(x) == 0:
        raise ValueError("train_classifier needs at least one training row")
    if steps < 0 or lr <= 0 or batch_size < 1:
        raise ValueError(f"steps={steps} must be >= 0, lr={lr} > 0 and batch_size={batch_size} >= 1")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLP(int(x[0].numel()), n_classes, hidden=hidden, depth=depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def gradient_unlearn(model: nn.Module, method: str, xf: Tensor, yf: Tensor, xr: Tensor, yr: Tensor, steps: int,
                     lr: float, seed: int, *, retain_batch: int = 128, beta: float = 0.1, rho: float = 0.5,
                     sigma: float = 0.01, n_noise: int = 1, alpha: float = 1.0, inner_lr: float | None = None,
                     on_step: Callable[[int, nn.Module], None] | None = None, inplace: bool = False) -> nn.Module:
    r"""Unlearn the forget set ``(xf, yf)`` by ``steps`` Adam steps (``lr``) of ``method``:

    * ``ga``: ``L = -NLL(D_f)`` (full forget batch);
    * ``graddiff``: ``L = -NLL(D_f) + NLL(B_r)``;
    * ``npo``: ``L = -(2/beta) mean log sigmoid(-beta (log p_theta(y|x) - log p_ref(y|x))) + NLL(B_r)``
      with ``p_ref`` the model before this call;
    * ``stableun``: the gradient of :func:`~poise.edit.stableun_backward` with NPO's forget term as ``L_f``,
      ``NLL(B_r)`` as ``L_r`` and ``inner_lr`` (default ``lr``), ``rho``, ``sigma``, ``n_noise``, ``alpha``.

    ``B_r``: ``retain_batch`` rows of ``(xr, yr)`` drawn per step by a generator seeded ``seed`` (which also
    draws StableUN's Gaussian probes). Returns the unlearned model in eval mode: a copy, or ``model`` itself
    when ``inplace``. ``on_step(i, model)`` is called after optimizer step ``i`` (1-based); an exception it
    raises stops the loop. An empty forget set is a documented no-op: the model comes back unchanged and
    ``on_step`` is never called. An unknown ``method`` raises ``ValueError`` listing the choices."""
    if method not in GRADIENT_METHODS:
        raise ValueError(f"method={method!r}; valid choices: {', '.join(GRADIENT_METHODS)}")
    if steps < 0 or lr <= 0 or retain_batch < 1:
        raise ValueError(f"steps={steps} must be >= 0, lr={lr} > 0 and retain_batch={retain_batch} >= 1")
    if len(xf) != len(yf) or len(xr) != len(yr):
        raise ValueError(f"forget set has {len(xf)} inputs and {len(yf)} labels, retain set {len(xr)} and {len(yr)}")
    m = model if inplace else copy.deepcopy(model)
    if len(xf) == 0:  # nothing to forget: documented no-op
        return m.eval()
    if len(xr) == 0 and method != "ga":
        raise ValueError(f"method={method!r} needs retain data; the retain set is empty")
    m.train()
    with torch.no_grad():
        ref_lp = class_logp(m, xf, yf)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        ridx = torch.randint(0, len(xr), (retain_batch,), generator=g) if len(xr) else None

        def forget() -> Tensor:
            if method in ("ga", "graddiff"):
                return grad_ascent_loss(F.cross_entropy(m(xf), yf))
            return npo_loss(class_logp(m, xf, yf), ref_lp, beta=beta)

        def retain(ridx: Tensor | None = ridx) -> Tensor:
            return F.cross_entropy(m(xr[ridx]), yr[ridx])

        opt.zero_grad()
        if method == "stableun":
            stableun_backward(list(m.parameters()), forget, retain, inner_lr=lr if inner_lr is None else inner_lr,
                              rho=rho, sigma=sigma, n_noise=n_noise, alpha=alpha, generator=g)
        else:
            if method == "ga":
                loss = forget()
            elif method == "graddiff":
                loss = grad_diff_loss(F.cross_entropy(m(xf), yf), retain())
            else:  # npo with retain NLL
                loss = forget() + retain()
            loss.backward()
        opt.step()
        if on_step is not None:
            on_step(i + 1, m)
    return m.eval()


def _penultimate(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential) or not isinstance(net[-1], nn.Linear):
        raise ValueError("ACU needs a model whose .net is an nn.Sequential ending in nn.Linear (poise's MLP); got "
                         f"{type(model).__name__}")
    return nn.Sequential(*list(net.children())[:-1])


def acu_features(model: nn.Module, x: Tensor, y: Tensor, n_classes: int = 10,
                 gamma: float = 1.0) -> tuple[nn.Module, AnalyticClassifier, Tensor, Tensor]:
    """ACU's start: the frozen feature extractor (``model`` without its last linear layer), an
    :class:`~poise.edit.AnalyticClassifier` that has learned every row ``(x, y)`` (one-hot targets),
    and the float64 features and targets of those rows (what a class request unlearns)."""
    feat = copy.deepcopy(_penultimate(model)).eval()
    with torch.no_grad():
        X = feat(x).double()
    acu = AnalyticClassifier(X.shape[1], n_classes, gamma=gamma)
    Y = F.one_hot(y, n_classes).double()
    acu.learn(X, Y)
    return feat, acu, X, Y


def acu_head_model(feat: nn.Module, acu: AnalyticClassifier) -> nn.Module:
    """``feat -> head`` (eval mode) with the head's weight ACU's current ``W^T`` (float32, no bias)."""
    head = nn.Linear(acu.W.shape[0], acu.W.shape[1], bias=False)
    with torch.no_grad():
        head.weight.copy_(acu.W.T.float())
    return nn.Sequential(copy.deepcopy(feat), head).eval()


def acu_model(model: nn.Module, xtr: Tensor, ytr: Tensor, forget_mask: Tensor | Sequence[Tensor],
              n_classes: int = 10, gamma: float = 1.0) -> nn.Module:
    """The model with its head replaced by ACU's ridge head learned on ``(xtr, ytr)`` and then unlearned,
    exactly, on the rows of ``forget_mask`` (one boolean mask, or a sequence of masks: one request each,
    in order). Returns ``feat -> head`` in eval mode."""
    feat, acu, X, Y = acu_features(model, xtr, ytr, n_classes, gamma)
    masks = [forget_mask] if isinstance(forget_mask, Tensor) else list(forget_mask)
    for mask in masks:
        if bool(mask.any()):
            acu.unlearn(X[mask], Y[mask])
    return acu_head_model(feat, acu)


def attack_candidates(mixes: Sequence[int] = (0, 25), steps_grid: Sequence[int] = (10, 20, 40),
                      lr_grid: Sequence[float] = (1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 5e-3, 7e-3, 1e-2)) -> list[dict]:
    """Every ``{"mix", "steps", "lr"}`` of the grid, per mix by increasing strength ``steps * lr`` (ties: fewer
    steps first), the mixes in the given order."""
    out = []
    for mix in mixes:
        grid = sorted(itertools.product(steps_grid, lr_grid), key=lambda t: (t[0] * t[1], t[0]))
        out += [{"mix": mix, "steps": s, "lr": lr} for s, lr in grid]
    return out


def choose_attack(table: list[dict], mixes: Sequence[int] = (0, 25), target_forget: tuple[float, float] = (0.2, 0.6),
                  target_retain: float = 0.8) -> tuple[dict, bool]:
    """The calibration rule on ``table`` (rows ``{"mix", "steps", "lr", "forget", "retain"}``, the reference's
    mean forget / retain accuracy after each candidate attack, in increasing strength within a mix): the first
    mix with a qualifying row (forget in ``target_forget``, retain >= ``target_retain``), and in it the
    qualifying row nearest the middle of ``target_forget`` (ties: the earlier, weaker row). Returns the
    setting and whether the target was met; when no row qualifies, the row with retain >= target nearest
    the middle (any row if none keeps retain) and ``False``."""
    if not table:
        raise ValueError("choose_attack needs at least one candidate row")
    mid = sum(target_forget) / 2
    for mix in mixes:
        ok = [r for r in table if r["mix"] == mix and target_forget[0] <= r["forget"] <= target_forget[1]
              and r["retain"] >= target_retain]
        if ok:  # min keeps the first (weaker) of equally near candidates
            best = min(ok, key=lambda r: abs(r["forget"] - mid))
            return {k: best[k] for k in ("mix", "steps", "lr")}, True
    ok = [r for r in table if r["retain"] >= target_retain] or table
    best = min(ok, key=lambda r: abs(r["forget"] - mid))
    return {k: best[k] for k in ("mix", "steps", "lr")}, False


def retention_gap(steps: Sequence[int], retain: Sequence[float], eps: float = 0.02) -> dict[str, float | None]:
    r"""The stability gap of retained knowledge over a sequence of unlearning requests, from the continual
    evaluation ``retain[i]`` (accuracy on data never asked to be forgotten) at unlearning step ``steps[i]``
    (``steps[0]`` the start, before any request):

    * ``retain_start = a_0``, ``retain_final = a_{-1}``, ``retain_min = min_i a_i``;
    * ``retain_drop = a_0 - min_i a_i`` (the gap's depth, >= 0);
    * ``retain_recovered = a_{-1} - min_i a_i`` (how much of the drop came back by the end);
    * ``retain_recovery_steps``: steps from the (first) minimum to the first later evaluation with
      ``a_j >= a_0 - eps``; ``0`` when the minimum is itself within ``eps``; ``None`` if never.

    The same quantities as the continual kind's gap depth and recovery (De Lange et al., arXiv 2205.13452),
    for one curve. Raises ``ValueError`` on an empty or mismatched curve."""
    if len(steps) != len(retain) or not retain:
        raise ValueError(f"retention_gap needs one accuracy per step; got {len(steps)} steps, {len(retain)} values")
    a0, i_min = retain[0], min(range(len(retain)), key=lambda i: retain[i])
    lo = retain[i_min]
    rec: float | None = None
    for j in range(i_min, len(retain)):
        if retain[j] >= a0 - eps:
            rec = float(steps[j] - steps[i_min])
            break
    return {"retain_start": float(a0), "retain_final": float(retain[-1]), "retain_min": float(lo),
            "retain_drop": float(a0 - lo), "retain_recovered": float(retain[-1] - lo), "retain_recovery_steps": rec}


def forget_relapse(at_own_end: Sequence[float], final: Sequence[float]) -> float | None:
    r"""Whether later deletion requests undo earlier forgetting: the mean over every request but the last of
    ``final_k - at_own_end_k`` (forget accuracy of request ``k``'s data at the end of the sequence minus right
    after request ``k`` was served). Positive: earlier forgetting came back. ``None`` for fewer than two
    requests (no later request)."""
    if len(at_own_end) != len(final):
        raise ValueError(f"forget_relapse: {len(at_own_end)} values at each request's end but {len(final)} final")
    if len(final) < 2:
        return None
    d = [f - a for a, f in zip(at_own_end[:-1], final[:-1], strict=True)]
    return float(sum(d) / len(d))

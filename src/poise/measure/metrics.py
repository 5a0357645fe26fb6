"""Continual-learning metrics as pure numpy functions.

Notation (De Lange, van de Ven, Tuytelaars, "Continual evaluation for lifelong learning:
identifying the stability gap", ICLR 2023, arXiv 2205.13452): tasks ``T_0 .. T_{N-1}``
trained in order; ``f_t`` the model after optimizer step ``t``; ``A(E_i, f_t)`` its accuracy
on task ``i``'s evaluation set; ``|T_i|`` the global step at which training on task ``i``
ends (``boundaries[i]``).

Two inputs recur:

* ``R``: the boundary matrix, shape ``(N, N)``, ``R[k, i] = A(E_i, f_{|T_k|})``; entries for
  tasks not yet seen (``i > k``) are ignored and may be NaN.
* a curve: ``steps`` (shape ``(n,)``, increasing) and ``acc`` (shape ``(n, N)``), the
  accuracy of every task at every evaluation, NaN where a task was not evaluated.

Every function is written for a higher-is-better score (accuracy). For a lower-is-better one
(an LM's loss or perplexity, see :func:`higher_is_better`) pass its negative: the differences
(forgetting, windowed forgetting, gap depth) then come out as rises, and the levels (min-ACC,
WC-ACC) as the negative of the worst value; :func:`stability_gap` takes ``higher_is_better``
directly. :meth:`poise.measure.ContinualEvaluator.metrics` does all of this for you.

Indices are 0-based: after training task ``k`` the learner has seen ``k + 1`` tasks. The
reference implementation of the windowed and worst-case metrics is
Mattdl/ContinualEvaluation ``src/eval/continual_eval_metrics.py``; the window ``w`` counts
*evaluations*, not optimizer steps, as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from poise._registry import register

__all__ = [
    "DIRECTIONS",
    "GapStats",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "higher_is_better",
    "max_window_drop",
    "min_acc",
    "stability_gap",
    "wc_acc",
    "windowed_forgetting",
    "windowed_plasticity",
]


DIRECTIONS = {"acc": True, "token_acc": True, "loss": False, "ppl": False}
"""Whether each evaluation metric the evaluator records is better when higher."""


def higher_is_better(metric: str) -> bool:
    """True for accuracies (``acc``, ``token_acc``), False for ``loss`` and ``ppl``; an unknown
    name raises ``ValueError`` listing the known ones."""
    if metric not in DIRECTIONS:
        raise ValueError(f"unknown metric {metric!r}; valid choices: {', '.join(DIRECTIONS)}")
    return DIRECTIONS[metric]


def _last(R: np.ndarray, k: int | None) -> int:
    n = R.shape[0]
    k = n - 1 if k is None else k
    if not 0 <= k < n:
        raise ValueError(f"task index k={k} out of range 0..{n - 1}")
    return k


@register("metric", "acc")
def average_accuracy(R: ArrayLike, k: int | None = None) -> float:
    r"""Final average accuracy. ``ACC_k = 1/(k+1) \sum_{i<=k} R[k, i]``.

    ``R`` is the boundary matrix, ``k`` the task after which to measure (default: last).
    """
    R = np.asarray(R, dtype=float)
    k = _last(R, k)
    return float(np.mean(R[k, : k + 1]))


@register("metric", "forgetting")
def forgetting(R: ArrayLike, k: int | None = None) -> float:
    r"""Forgetting. ``FORG_k = 1/k \sum_{i<k} (R[i, i] - R[k, i])``; 0 when ``k = 0``.

    The drop of each earlier task from the end of its own training to the end of task
    ``k`` (De Lange et al.'s definition; Chaudhry et al. use the maximum over earlier
    rows instead of ``R[i, i]``).
    """
    R = np.asarray(R, dtype=float)
    k = _last(R, k)
    if k == 0:
        return 0.0
    i = np.arange(k)
    return float(np.mean(R[i, i] - R[k, i]))


@register("metric", "bwt")
def backward_transfer(R: ArrayLike, k: int | None = None) -> float:
    r"""Backward transfer. ``BWT_k = 1/k \sum_{i<k} (R[k, i] - R[i, i]) = -FORG_k``."""
    return 0.0 - forgetting(R, k)  # 0.0 - ...: no -0.0 when there is nothing to forget


def _check_curve(steps: ArrayLike, acc: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=float)
    acc = np.asarray(acc, dtype=float)
    if acc.ndim == 1:
        acc = acc[:, None]
    if steps.ndim != 1 or acc.shape[0] != steps.shape[0]:
        raise ValueError(
            f"steps has shape {steps.shape} and acc {acc.shape}: need (n,) and (n, tasks)"
        )
    if np.any(np.diff(steps) < 0):
        raise ValueError("steps must be non-decreasing")
    return steps, acc


@register("metric", "min_acc")
def min_acc(
    steps: ArrayLike,
    acc: ArrayLike,
    boundaries: ArrayLike,
    k: int | None = None,
    t: float | None = None,
) -> float:
    r"""Average minimum accuracy of earlier tasks (min-ACC).

    ``min-ACC_{T_k} = 1/k \sum_{i<k} \min_{|T_i| < n <= t} A(E_i, f_n)``: the worst accuracy
    each earlier task reached after its own training ended, up to step ``t``.

    ``boundaries[i] = |T_i|``; ``k`` is the current task (default: the last one in
    ``boundaries``); ``t`` the current step (default: the last evaluation). NaN when
    ``k = 0`` (no earlier task) or when no evaluation of a task falls in ``(|T_i|, t]``.
    """
    steps, acc = _check_curve(steps, acc)
    b = np.asarray(boundaries, dtype=float)
    k = len(b) - 1 if k is None else k
    t = steps[-1] if t is None else t
    if k == 0:
        return float("nan")
    mins = []
    for i in range(k):
        sel = (steps > b[i]) & (steps <= t) & ~np.isnan(acc[:, i])
        mins.append(np.min(acc[sel, i]) if sel.any() else np.nan)
    return float(np.mean(mins))


@register("metric", "wc_acc")
def wc_acc(
    steps: ArrayLike,
    acc: ArrayLike,
    boundaries: ArrayLike,
    k: int | None = None,
    t: float | None = None,
) -> float:
    r"""Worst-case accuracy. ``WC-ACC_t = 1/(k+1) A(E_k, f_t) + (1 - 1/(k+1)) min-ACC_{T_k}``.

    The current task ``k`` counts at its accuracy at step ``t``; every earlier task at its
    worst since it was learned. ``WC-ACC = A(E_0, f_t)`` when ``k = 0``. At the end of a
    stream ``WC-ACC <= ACC``.
    """
    steps, acc = _check_curve(steps, acc)
    b = np.asarray(boundaries, dtype=float)
    k = len(b) - 1 if k is None else k
    t = steps[-1] if t is None else t
    sel = (steps <= t) & ~np.isnan(acc[:, k])
    if not sel.any():
        return float("nan")
    current = acc[sel, k][-1]
    if k == 0:
        return float(current)
    n = k + 1
    return float(current / n + (1 - 1 / n) * min_acc(steps, acc, b, k, t))


def max_window_drop(seq: ArrayLike, w: int) -> float:
    r"""``max_t \Delta^{w,-}_t`` for one task: the largest ``a_m - a_n`` with ``m < n`` and
    both inside a window of ``w`` consecutive evaluations (``n - m <= w - 1``); 0 if none.

    Matches ``max_consec_delta_from_window`` of the official code applied to every window
    and maximised over time.
    """
    a = np.asarray(seq, dtype=float)
    a = a[~np.isnan(a)]
    if w < 1:
        raise ValueError(f"window w={w} must be >= 1")
    best = 0.0
    for lag in range(1, min(w, len(a))):
        best = max(best, float(np.max(a[:-lag] - a[lag:])))
    return best


@register("metric", "wf")
def windowed_forgetting(acc: ArrayLike, w: int) -> float:
    r"""Windowed forgetting. ``WF^w = mean_i \max_t \Delta^{w,-}_{t,E_i}`` with
    ``\Delta^{w,-}_{t,E_i} = \max_{m<n;\ m,n \in [t-w+1, t]} (A(E_i,f_m) - A(E_i,f_n))``.

    ``acc`` is the ``(n, tasks)`` curve (NaN where not evaluated); ``w`` counts evaluations.
    Non-decreasing in ``w``; 0 for curves that never fall.
    """
    acc = np.asarray(acc, dtype=float)
    if acc.ndim == 1:
        acc = acc[:, None]
    return float(np.mean([max_window_drop(acc[:, i], w) for i in range(acc.shape[1])]))


@register("metric", "wp")
def windowed_plasticity(acc: ArrayLike, w: int) -> float:
    r"""Windowed plasticity ``WP^w``: as :func:`windowed_forgetting` with the largest
    *increase* ``A(E_i,f_n) - A(E_i,f_m)`` inside a window."""
    return windowed_forgetting(-np.asarray(acc, dtype=float), w)


@dataclass(frozen=True)
class GapStats:
    """The stability gap of one task at one task switch.

    ``reference``: the score at the switch; ``depth``: how far it gets worse afterwards (for
    accuracy, the reference minus the minimum that follows; for a lower-is-better score such as
    a loss, the maximum that follows minus the reference; 0 if it never gets worse);
    ``min_step``: where that worst value is; ``recovery_steps``: steps from the switch until the
    score is back within ``eps`` of the reference after the worst value (0 if it never left that
    band, NaN if it does not recover within the span).
    """

    reference: float
    depth: float
    min_step: float
    recovery_steps: float


@register("metric", "stability_gap")
def stability_gap(
    steps: ArrayLike,
    acc_i: ArrayLike,
    switch_step: float,
    end_step: float | None = None,
    eps: float = 0.02,
    higher_is_better: bool = True,
) -> GapStats:
    r"""Depth and recovery time of the stability gap of one task after one switch.

    With ``s = switch_step`` (``|T_j|``, the end of the task before the switch) and
    ``a_n = A(E_i, f_n)``: ``depth = a_s - \min_{s < n <= e} a_n`` and
    ``recovery = \min\{n - s : n >= n^*, a_n >= a_s - eps\}`` where ``n^*`` is the argmin and
    ``e = end_step`` (default: the last evaluation). ``acc_i`` is task ``i``'s curve;
    NaN entries are skipped.

    ``higher_is_better=False`` (a loss, a perplexity): ``depth = \max_{s < n <= e} a_n - a_s``
    (the rise) and recovery is the first ``n >= n^*`` with ``a_n <= a_s + eps``, ``n^*`` the
    argmax; ``reference`` is ``a_s`` in the score's own units.
    """
    if not higher_is_better:
        g = stability_gap(steps, -np.asarray(acc_i, dtype=float), switch_step, end_step, eps)
        return GapStats(-g.reference, g.depth, g.min_step, g.recovery_steps)
    steps, acc = _check_curve(steps, acc_i)
    a = acc[:, 0]
    ok = ~np.isnan(a)
    steps, a = steps[ok], a[ok]
    e = steps[-1] if end_step is None else end_step
    at = np.nonzero(steps <= switch_step)[0]
    if len(at) == 0:
        raise ValueError(f"no evaluation at or before switch step {switch_step}")
    ref = float(a[at[-1]])
    span = (steps > switch_step) & (steps <= e)
    if not span.any():
        return GapStats(ref, float("nan"), float("nan"), float("nan"))
    idx = np.nonzero(span)[0]
    j = idx[np.argmin(a[idx])]
    depth = max(0.0, ref - float(a[j]))
    if a[j] >= ref - eps:  # never left the band: nothing to recover from
        return GapStats(ref, depth, float(steps[j]), 0.0)
    back = [n for n in idx if n > j and a[n] >= ref - eps]
    rec = float(steps[back[0]] - switch_step) if back else float("nan")
    return GapStats(ref, depth, float(steps[j]), rec)

"""A non-stationary digits stream whose distribution drifts at known points (the task boundaries).

``drift-digits`` cuts the run into ``n_tasks`` segments of the same ten digit classes (domain
scenario: one head, no task id); segment ``i`` differs from segment ``i-1`` by one drift:

* ``kind="label"`` (concept drift): ``swaps`` more pairs of classes exchange their labels
  (cumulative; the pairs are drawn by ``numpy.random.default_rng(drift_seed)``), so the same image
  means another class after the drift while most classes stay put;
* ``kind="rotate"`` (covariate drift): every image is rotated by ``angle * i`` degrees
  (``scipy.ndimage.rotate``, bilinear, same 8x8 frame), a gradual rotation in steps of ``angle``.

In :func:`poise.continual.fit_stream` each segment is one task, so the drifts happen at steps
``steps_per_task * i``; the test split of segment ``i`` carries the same drift as its training split.
The split is the one of the other digits streams (70/30 stratified, ``split_seed``).
"""

from __future__ import annotations

import numpy as np

from poise._registry import register
from poise.tasks.digits import Stream, Task, _digits, _t

__all__ = ["drift_digits", "label_maps"]

_KINDS = ("label", "rotate")


def label_maps(n_tasks: int, swaps: int = 2, drift_seed: int = 0, n_classes: int = 10) -> list[np.ndarray]:
    """Segment ``i``'s label map ``m_i`` (``y -> m_i[y]``): ``m_0`` is the identity and ``m_i`` is
    ``m_{i-1}`` with ``swaps`` more pairs of distinct classes exchanged."""
    rng = np.random.default_rng(drift_seed)
    maps = [np.arange(n_classes)]
    for _ in range(n_tasks - 1):
        m = maps[-1].copy()
        for _ in range(swaps):
            a, b = rng.choice(n_classes, 2, replace=False)
            m[[a, b]] = m[[b, a]]
        maps.append(m)
    return maps


@register("stream", "drift-digits")
def drift_digits(n_tasks: int = 4, scenario: str = "domain", kind: str = "label", swaps: int = 2,
                 angle: float = 30.0, split_seed: int = 0, drift_seed: int = 0) -> Stream:
    """``n_tasks`` segments of all ten digits with a drift between consecutive segments (see the
    module docstring). Raises ``ValueError`` for ``scenario != "domain"``, an unknown ``kind``,
    ``n_tasks < 1``, ``swaps`` outside 1..5, or a non-finite ``angle``."""
    if scenario != "domain":
        raise ValueError(f"drift-digits scenario={scenario!r}; valid choices: domain")
    if kind not in _KINDS:
        raise ValueError(f"drift-digits kind={kind!r}; valid choices: {', '.join(_KINDS)}")
    if not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"drift-digits n_tasks={n_tasks!r} must be an int >= 1")
    if kind == "label" and (not isinstance(swaps, int) or not 1 <= swaps <= 5):
        raise ValueError(f"drift-digits swaps={swaps!r}; valid range: 1..5 (pairs of the 10 classes per drift)")
    if kind == "rotate" and not np.isfinite(angle):
        raise ValueError(f"drift-digits angle={angle!r} must be finite (degrees per drift)")
    xtr, xte, ytr, yte = _digits(split_seed)
    tasks = []
    if kind == "label":
        for i, m in enumerate(label_maps(n_tasks, swaps, drift_seed)):
            moved = [int(c) for c in np.flatnonzero(m != np.arange(10))]
            tasks.append(Task(i, f"labels swapped {moved}", _t(xtr), _t(m[ytr]), _t(xte), _t(m[yte]),
                              list(range(10)), False))
    else:
        from scipy.ndimage import rotate

        def rot(x: np.ndarray, deg: float) -> np.ndarray:
            if deg == 0:
                return x
            return rotate(x, deg, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0).astype(np.float32)

        for i in range(n_tasks):
            tasks.append(Task(i, f"rotated {angle * i:g} deg", _t(rot(xtr, angle * i)), _t(ytr),
                              _t(rot(xte, angle * i)), _t(yte), list(range(10)), False))
    return Stream(f"drift-digits/{kind}", tasks, 10, (8, 8))

"""A few-shot class-incremental (FSCIL) stream built from scikit-learn's bundled digits.

The FSCIL protocol (Tao et al., arXiv 2004.10956; used by Roy et al., "A Bag of Tricks for
Few-Shot Class-Incremental Learning", arXiv 2403.14392): a **base session** with every training
sample of ``B`` classes, then ``n_tasks - 1`` **incremental sessions** of ``ways`` new classes with
only ``shots`` training samples each (the "N-way K-shot" sessions; CIFAR-100 uses 60 base classes and
8 sessions of 5-way 5-shot). Every session is tested on *all* test samples of its own classes; the
paper's per-session accuracy (accuracy on the pooled test data of every class seen so far) is
:func:`poise.continual.fscil.session_accuracy` of the evaluator's accuracy matrix.

Here the ten digits give ``B = 10 - ways * (n_tasks - 1)`` base classes ``0..B-1`` and session ``s``
adds classes ``B + (s-1) ways .. B + s ways - 1``. The split is the one of the other digits streams
(70/30 stratified, ``split_seed``); the ``shots`` samples per new class are drawn without
replacement from its training split by ``numpy.random.default_rng(shot_seed)``. The defaults
(``n_tasks=5, ways=1, shots=5``) give 6 base classes and 4 one-way 5-shot sessions.
"""

from __future__ import annotations

import numpy as np

from poise._registry import register
from poise.tasks.digits import Stream, Task, _digits, _t

__all__ = ["fscil_digits"]


@register("stream", "fscil-digits")
def fscil_digits(n_tasks: int = 5, scenario: str = "class", shots: int = 5, ways: int = 1, split_seed: int = 0,
                 shot_seed: int = 0) -> Stream:
    """Base session of ``10 - ways (n_tasks - 1)`` digit classes (all their training samples), then
    ``n_tasks - 1`` sessions of ``ways`` new classes with ``shots`` training samples each.

    ``scenario`` must be ``"class"`` (one head over all ten classes; the task id is not known).
    Raises ``ValueError`` naming the valid range when the base session would have fewer than two
    classes, or ``shots`` is outside ``1..`` the smallest number of training samples of a class."""
    if scenario != "class":
        raise ValueError(f"fscil-digits scenario={scenario!r}; valid choices: class")
    if not isinstance(ways, int) or ways < 1:
        raise ValueError(f"fscil-digits ways={ways!r} must be an int >= 1")
    max_tasks = (10 - 2) // ways + 1  # the base session keeps at least two classes
    if not isinstance(n_tasks, int) or not 1 <= n_tasks <= max_tasks:
        raise ValueError(f"fscil-digits n_tasks={n_tasks!r} with ways={ways}; valid range: 1..{max_tasks} "
                         "(the base session needs at least 2 of the 10 classes)")
    xtr, xte, ytr, yte = _digits(split_seed)
    smallest = int(np.bincount(ytr, minlength=10).min())
    if not isinstance(shots, int) or not 1 <= shots <= smallest:
        raise ValueError(f"fscil-digits shots={shots!r}; valid range: 1..{smallest} (training samples per class)")
    base = 10 - ways * (n_tasks - 1)
    rng = np.random.default_rng(shot_seed)
    sessions = [list(range(base))] + [list(range(base + s * ways, base + (s + 1) * ways))
                                      for s in range(n_tasks - 1)]
    tasks = []
    for i, cls in enumerate(sessions):
        if i == 0:
            tr = np.flatnonzero(np.isin(ytr, cls))
            name = f"base {cls}"
        else:
            tr = np.sort(np.concatenate([rng.choice(np.flatnonzero(ytr == c), shots, replace=False) for c in cls]))
            name = f"session {i}: {ways}-way {shots}-shot {cls}"
        te = np.isin(yte, cls)
        tasks.append(Task(i, name, _t(xtr[tr]), _t(ytr[tr]), _t(xte[te]), _t(yte[te]), cls, False))
    return Stream(f"fscil-digits/{ways}way{shots}shot", tasks, 10, (8, 8))

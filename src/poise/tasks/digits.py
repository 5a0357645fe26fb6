"""Continual-learning streams built from scikit-learn's bundled digits (no download).

``load_digits`` ships 1,797 8x8 grey images of the digits 0-9 inside scikit-learn. Every
stream splits them 70/30 (stratified, fixed split seed) into train and test, scales pixels
to [0, 1], and cuts them into tasks:

* ``split-digits``: 5 tasks of 2 classes, (0,1), (2,3), ... ``scenario="class"`` is
  class-incremental (one head, prediction over all 10 classes); ``"task"`` is
  task-incremental (the task id is known: training and prediction restricted to the
  task's classes).
* ``rotated-digits``: domain-incremental; task ``i`` shows every class rotated by
  ``90 * i`` degrees (``np.rot90``).
* ``permuted-digits``: domain-incremental; task 0 is the identity, task ``i`` a fixed
  random permutation of the 64 pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from poise._registry import register

__all__ = ["Stream", "Task", "load_stream"]


@dataclass
class Task:
    """One task of a stream: its training and test data, and the output units it uses."""

    id: int
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[int]
    restrict: bool  # task-incremental: restrict training and prediction to ``classes``


@dataclass
class Stream:
    name: str
    tasks: list[Task]
    n_classes: int
    input_shape: tuple[int, ...]


def _digits(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``: a stratified 70/30 split, ``split_seed`` its seed. Each call
    gets its own copies (a stream may change its arrays); the file is parsed and split once per process
    (a study builds its stream once to check the config and once per run)."""
    return tuple(a.copy() for a in _digits_split(split_seed))  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _digits_split(split_seed: int) -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the digits streams need scikit-learn: pip install 'poise[workbench]'"
        ) from e
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.3, stratify=y, random_state=split_seed))


def _t(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


@register("stream", "split-digits")
def split_digits(n_tasks: int = 5, scenario: str = "class", split_seed: int = 0) -> Stream:
    if scenario not in ("class", "task"):
        raise ValueError(f"scenario={scenario!r}; valid choices: class, task")
    if n_tasks not in (1, 2, 5, 10):
        raise ValueError(f"split-digits n_tasks={n_tasks}; valid choices: 1, 2, 5, 10")
    xtr, xte, ytr, yte = _digits(split_seed)
    per = 10 // n_tasks
    tasks = []
    for i in range(n_tasks):
        cls = list(range(i * per, (i + 1) * per))
        mtr, mte = np.isin(ytr, cls), np.isin(yte, cls)
        tasks.append(
            Task(i, f"classes {cls}", _t(xtr[mtr]), _t(ytr[mtr]), _t(xte[mte]), _t(yte[mte]),
                 cls, scenario == "task")
        )
    return Stream(f"split-digits/{scenario}", tasks, 10, (8, 8))


def _domain(name: str, n_tasks: int, split_seed: int, f: Callable[[int, np.ndarray], np.ndarray]) -> Stream:
    xtr, xte, ytr, yte = _digits(split_seed)
    tasks = [
        Task(i, f"{name} {i}", _t(f(i, xtr)), _t(ytr), _t(f(i, xte)), _t(yte), list(range(10)), False)
        for i in range(n_tasks)
    ]
    return Stream(name, tasks, 10, (8, 8))


@register("stream", "rotated-digits")
def rotated_digits(n_tasks: int = 4, scenario: str = "domain", split_seed: int = 0) -> Stream:
    if scenario != "domain":
        raise ValueError(f"rotated-digits scenario={scenario!r}; valid choices: domain")
    if not 1 <= n_tasks <= 4:
        raise ValueError(f"rotated-digits n_tasks={n_tasks}; valid range: 1..4 (0/90/180/270 deg)")
    return _domain("rotated-digits", n_tasks, split_seed, lambda i, x: np.rot90(x, i, axes=(1, 2)))


@register("stream", "permuted-digits")
def permuted_digits(n_tasks: int = 5, scenario: str = "domain", split_seed: int = 0) -> Stream:
    if scenario != "domain":
        raise ValueError(f"permuted-digits scenario={scenario!r}; valid choices: domain")
    if n_tasks < 1:
        raise ValueError(f"permuted-digits n_tasks={n_tasks} must be >= 1")
    rng = np.random.default_rng(1234)
    perms = [np.arange(64)] + [rng.permutation(64) for _ in range(n_tasks - 1)]

    def permute(i: int, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), 64)[:, perms[i]].reshape(x.shape)

    return _domain("permuted-digits", n_tasks, split_seed, permute)


def load_stream(name: str, **kwargs: object) -> Stream:
    """Build a registered stream by name (``poise list`` shows them)."""
    from poise._registry import get

    return get("stream", name)(**kwargs)

"""Construction-time checks of hyperparameters: the error names the value and the range."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def in_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> None:
    if isinstance(value, Tensor):
        value = float(value)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}={value} is out of range; valid: {left}{lo}, {hi}{right}")


def betas(value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"betas={value!r} must be a pair (beta1, beta2)")
    in_range("betas[0]", value[0], 0.0, 1.0)
    in_range("betas[1]", value[1], 0.0, 1.0)


def positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name}={value!r} must be an integer >= {0 if allow_zero else 1}")


def common(lr: Any, eps: float, weight_decay: float) -> None:
    in_range("lr", lr, 0.0, float("inf"))
    in_range("eps", eps, 0.0, float("inf"))
    in_range("weight_decay", weight_decay, 0.0, float("inf"))

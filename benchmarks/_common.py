"""Helpers shared by the benchmark scripts (each script puts this folder on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["round_robin", "state_bytes"]


def state_bytes(opt: Any, params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of every tensor held in the optimizer state (nested dicts, lists and objects; an object
    with ``.optimizers`` is walked per optimizer; a tensor subclass that wraps others, such as torchao's
    quantised state, counts its inner tensors), each storage counted once and ``params`` excluded."""
    skip = {p.data_ptr() for p in params}
    seen: set[tuple[int, int]] = set()
    total = 0
    for o in getattr(opt, "optimizers", (opt,)):
        stack: list[Any] = [v for v in getattr(o, "state", {}).values()]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                flatten = getattr(type(v), "__tensor_flatten__", None)
                if flatten is not None and type(v) is not torch.Tensor and not isinstance(v, torch.nn.Parameter):
                    names, _ = v.__tensor_flatten__()  # a wrapper subclass (torchao's 8-bit state): its inner tensors
                    stack.extend(getattr(v, n) for n in names)
                    continue
                key = (v.data_ptr(), v.numel() * v.element_size())
                if v.data_ptr() in skip or (v.data_ptr() != 0 and key in seen):
                    continue
                seen.add(key)
                total += key[1]
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif hasattr(v, "__dict__") and not isinstance(v, type):
                stack.extend(x for x in vars(v).values() if isinstance(x, (torch.Tensor, list, tuple, dict)))
    return total


def round_robin(runs: list[dict[str, Any]], grads: list[torch.Tensor], warmup: int, repeats: int,
                quiet: bool = False) -> list[dict[str, Any]]:
    """Time one ``step()`` of each run's optimizer (``run["opt"]`` over ``run["params"]``) on the same
    gradients: ``warmup`` untimed steps each (a run that raises gets ``run["error"]``, is reported and
    left out), then ``repeats`` rounds in which every run steps once in turn. Adds ``times`` and their
    ``median`` (seconds) and ``state_bpp`` (state bytes per parameter) to every run."""

    def step(r: dict[str, Any]) -> float:
        for p, g in zip(r["params"], grads, strict=True):
            p.grad = g.clone()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            r["opt"].step()
        return time.perf_counter() - t0

    for r in runs:
        r.setdefault("times", [])
        r.setdefault("error", None)
        if r["error"] is None:
            try:
                for _ in range(warmup):
                    step(r)
            except Exception as e:  # a peer that crashes is reported, not fatal
                r["error"] = f"{type(e).__name__}: {e}"[:100]
    for _ in range(repeats):
        for r in runs:
            if r["error"] is None:
                r["times"].append(step(r))
    for r in runs:
        r["median"] = statistics.median(r["times"]) if r["times"] else float("nan")
        n = sum(p.numel() for p in r["params"])
        r["state_bpp"] = state_bytes(r["opt"]) / n if r.get("opt") is not None and n else float("nan")
    return runs

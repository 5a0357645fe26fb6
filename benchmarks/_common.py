"""Helpers shared by the benchmark scripts (each script puts this folder on ``sys.path``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["state_bytes"]


def state_bytes(opt: Any, params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of every tensor held in the optimizer state (nested dicts, lists and objects; an object
    with ``.optimizers`` is walked per optimizer), each storage counted once and ``params`` excluded."""
    skip = {p.data_ptr() for p in params}
    seen: set[tuple[int, int]] = set()
    total = 0
    for o in getattr(opt, "optimizers", (opt,)):
        stack: list[Any] = [v for v in getattr(o, "state", {}).values()]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
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

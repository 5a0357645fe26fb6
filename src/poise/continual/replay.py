"""Experience replay with a reservoir buffer, and fine-tuning (no strategy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poise._registry import register
from poise.continual._base import Batch, LossFn, Strategy, classification_loss
from poise.continual._state import load_np_rng, np_rng_state

__all__ = ["FineTune", "Replay", "ReservoirBuffer"]


@register("strategy", "finetune")
class FineTune(Strategy):
    """Plain sequential fine-tuning: the lower bound every strategy is compared with."""

    name = "finetune"

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing learnt besides the model


def reservoir_slot(buf: Any) -> int:
    """Reservoir sampling (Vitter's algorithm R) for a buffer with ``size``, ``capacity``, ``seen`` and a
    numpy ``rng``: the slot the next item of the stream takes, or -1 when it is not kept. The buffer
    fills first; afterwards item ``seen`` replaces a uniform slot with probability
    ``capacity / (seen + 1)``. Counts the fill (``size``); the caller counts ``seen``."""
    if buf.size < buf.capacity:
        buf.size += 1
        return buf.size - 1
    j = int(buf.rng.integers(0, buf.seen + 1))
    return j if j < buf.capacity else -1


class ReservoirBuffer:
    r"""Reservoir sampling (Vitter's algorithm R): after ``n`` samples offered, each is in
    the buffer with probability ``min(1, capacity / n)``.

    The ``n``-th sample offered (1-based) is stored if the buffer is not full, else it
    replaces slot ``j ~ U{0..n-1}`` when ``j < capacity``. Has its own seeded generator.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = capacity
        self.seen = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._mask: Tensor | None = None
        self.ids = np.full(capacity, -1, dtype=np.int64)  # which offered sample sits where

    def add(self, batch: Batch) -> None:
        x, y, mask = batch.x.detach(), batch.y.detach(), batch.mask
        if self._x is None:
            self._x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self._y = torch.zeros((self.capacity, *y.shape[1:]), dtype=y.dtype)
            if mask is not None:
                self._mask = torch.zeros((self.capacity, *mask.shape[1:]), dtype=mask.dtype)
        for i in range(len(y)):
            slot = reservoir_slot(self)
            if slot >= 0:
                self._put(slot, x[i], y[i], None if mask is None else mask[i])
            self.seen += 1

    def _put(self, slot: int, x: Tensor, y: Tensor, mask: Tensor | None) -> None:
        """Store one offered sample in ``slot`` (a subclass stores more per item)."""
        self._x[slot] = x  # type: ignore[index]
        self._y[slot] = y  # type: ignore[index]
        if self._mask is not None and mask is not None:
            self._mask[slot] = mask
        self.ids[slot] = self.seen

    def sample(self, k: int) -> Batch:
        if self.size == 0:
            raise RuntimeError("sampling from an empty buffer")
        idx = torch.as_tensor(self.rng.choice(self.size, size=min(k, self.size), replace=False))
        return Batch(self._x[idx], self._y[idx], None if self._mask is None else self._mask[idx])  # type: ignore[index]

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, Any]:
        """Counters, the stored samples (None before the first ``add``), which offered sample
        sits in each slot, and the generator."""
        return {"capacity": self.capacity, "seen": self.seen, "size": self.size, "rng": np_rng_state(self.rng),
                "x": self._x, "y": self._y, "mask": self._mask, "ids": torch.from_numpy(self.ids.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer state has capacity {state['capacity']}, this buffer {self.capacity}")
        self.seen, self.size = int(state["seen"]), int(state["size"])
        load_np_rng(self.rng, state["rng"])
        self._x, self._y, self._mask = (None if state[k] is None else state[k].clone() for k in ("x", "y", "mask"))
        self.ids = state["ids"].numpy().astype(np.int64, copy=True)


@register("strategy", "replay")
class Replay(Strategy):
    r"""Experience replay (ER) from a reservoir buffer.

    ``L = L_new(B) + weight \cdot L(M)``: each step adds the loss on a batch ``M`` of
    ``batch_size`` samples drawn from a reservoir of ``mem_size`` past samples (all tasks
    seen so far, the current one included); after the step the current batch is offered to
    the reservoir. Chaudhry et al., "On tiny episodic memories in continual learning",
    arXiv 1902.10486; matches Avalanche ``ReplayPlugin`` with a reservoir storage policy.
    Logs ``replay`` (the replay loss term) and ``mem_size`` (samples stored).
    """

    name = "replay"

    def __init__(self, mem_size: int = 200, batch_size: int = 32, weight: float = 1.0,
                 seed: int = 0, loss_fn: LossFn = classification_loss):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.buffer = ReservoirBuffer(mem_size, seed)
        self.batch_size = batch_size
        self.weight = weight
        self.loss_fn = loss_fn

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if len(self.buffer) == 0:
            return {}
        return {"replay": self.weight * self.loss_fn(model, self.buffer.sample(self.batch_size))}

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        self.buffer.add(batch)
        return {"mem_size": torch.tensor(float(len(self.buffer)))}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])

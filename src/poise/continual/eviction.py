"""StableWorld's dynamic eviction (arXiv 2601.15281) as a replay-buffer policy, and a storage-fault
injector to test it: stored items are scored for consistency with their initial clean state and
the degraded ones are evicted, while consistent ones are kept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poise._registry import register
from poise.continual._base import Batch, LossFn, Strategy, classification_loss
from poise.continual._state import load_np_rng, np_rng_state
from poise.continual.replay import ReservoirBuffer

__all__ = ["ConsistencyBuffer", "FaultyReplay", "StableEvictionReplay", "consistency_scores"]


def consistency_scores(current: Tensor, anchors: Tensor, proj: Tensor) -> Tensor:
    r"""Consistency of stored items with their initial clean state, in [-1, 1]:
    ``s_i = cos(P x_i, a_i)`` with ``a_i = P x_i^{(0)}`` the sketch taken when item ``i`` was
    stored and ``P`` a fixed random projection (``proj``, ``(D, k)``). An unchanged item scores
    exactly 1 (the analogue of StableWorld's geometric-consistency score between a frame and the
    clean early frame, ``orb_ransac_score_chw`` in xbyym/StableWorld, higher = more similar).
    ``current`` ``(n, ...)``, ``anchors`` ``(n, k)``; returns ``(n,)``."""
    s = current.reshape(len(current), -1).to(proj.dtype) @ proj
    num = (s * anchors).sum(1)
    den = s.norm(dim=1) * anchors.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), (s - anchors).abs().sum(1).eq(0).to(s.dtype))


class ConsistencyBuffer(ReservoirBuffer):
    r"""A reservoir buffer (Vitter's R, as :class:`poise.continual.ReservoirBuffer`) whose items
    keep a sketch of their clean state, with StableWorld-style eviction of degraded items.

    :meth:`evict` scores every stored item (:func:`consistency_scores`) and removes those with
    score ``< threshold`` (the last items move into the freed slots); the next offered samples
    fill free slots before reservoir replacement resumes. :meth:`corrupt` is a fault injector for
    studies: each stored, still-clean item independently becomes corrupted with probability
    ``rate`` (``x <- x + scale * N(0, 1)``, label kept); ``faulty`` records which items are
    (ground truth for measurement only, never read by :meth:`evict`).
    """

    def __init__(self, capacity: int, sketch_dim: int = 16, seed: int = 0):
        super().__init__(capacity, seed)  # checks capacity; the reservoir's counters and generator
        if sketch_dim < 1:
            raise ValueError(f"sketch_dim={sketch_dim} must be >= 1")
        self.sketch_dim, self.seed = sketch_dim, seed
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.anchors: Tensor | None = None
        self.proj: Tensor | None = None
        self.faulty = torch.zeros(capacity, dtype=torch.bool)

    def add(self, batch: Batch) -> None:
        if self.proj is None:  # the sketch of each item's clean state, fixed at the first batch
            d = int(np.prod(batch.x.shape[1:]))
            g = torch.Generator().manual_seed(self.seed + 2)
            self.proj = torch.randn(d, self.sketch_dim, generator=g) / self.sketch_dim ** 0.5
            self.anchors = torch.zeros(self.capacity, self.sketch_dim)
        super().add(batch)

    def _put(self, slot: int, x: Tensor, y: Tensor, mask: Tensor | None) -> None:
        super()._put(slot, x, y, mask)
        self.anchors[slot] = x.reshape(-1).to(self.proj.dtype) @ self.proj  # type: ignore[index,operator,union-attr]
        self.faulty[slot] = False

    def scores(self) -> Tensor:
        if self.size == 0:
            return torch.zeros(0)
        return consistency_scores(self._x[: self.size], self.anchors[: self.size], self.proj)  # type: ignore[index,arg-type]

    def evict(self, threshold: float) -> tuple[int, int]:
        """Remove the items scoring below ``threshold``; returns ``(evicted, of which faulty)``."""
        if self.size == 0:
            return 0, 0
        keep = self.scores() >= threshold
        n_out = int((~keep).sum())
        if n_out == 0:
            return 0, 0
        bad_faulty = int((~keep & self.faulty[: self.size]).sum())
        idx = torch.nonzero(keep).flatten()
        k = len(idx)
        for t in (self._x, self._y, self._mask, self.anchors, self.faulty):
            if t is not None:
                t[:k] = t[idx].clone()
        self.ids[:k] = self.ids[idx.numpy()]
        self.ids[k: self.size] = -1
        self.faulty[k: self.size] = False
        self.size = k
        return n_out, bad_faulty

    def corrupt(self, rate: float, scale: float) -> int:
        """Fault injection: each stored clean item becomes corrupted with probability ``rate``."""
        if self.size == 0 or rate <= 0:
            return 0
        hit = (torch.rand(self.size, generator=self.gen) < rate) & ~self.faulty[: self.size]
        rows = torch.nonzero(hit).flatten()
        if len(rows):
            x = self._x[rows]  # type: ignore[index]
            noise = torch.randn(x.shape, generator=self.gen).to(x.dtype)
            self._x[rows] = x + scale * noise  # type: ignore[index]
            self.faulty[rows] = True
        return len(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "size": self.size, "rng": np_rng_state(self.rng),
                "gen": self.gen.get_state(), "x": self._x, "y": self._y, "mask": self._mask,
                "anchors": self.anchors, "proj": self.proj, "faulty": self.faulty,
                "ids": torch.from_numpy(self.ids.copy())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"buffer state has capacity {state['capacity']}, this buffer {self.capacity}")
        self.seen, self.size = int(state["seen"]), int(state["size"])
        load_np_rng(self.rng, state["rng"])
        self.gen.set_state(state["gen"].clone())
        self._x, self._y, self._mask, self.anchors, self.proj = (
            None if state[k] is None else state[k].clone() for k in ("x", "y", "mask", "anchors", "proj"))
        self.faulty = state["faulty"].clone()
        self.ids = state["ids"].numpy().astype(np.int64, copy=True)


@register("strategy", "faulty_replay")
class FaultyReplay(Strategy):
    r"""Reservoir replay whose stored items degrade: the baseline of :class:`StableEvictionReplay`.

    Experience replay (``L = L_new(B) + weight \cdot L(M)``, as :class:`poise.continual.Replay`)
    from a :class:`ConsistencyBuffer`; after each step the batch is offered to the reservoir and
    then every stored clean item becomes corrupted with probability ``fault_rate``
    (``x <- x + fault_scale * N(0, 1)``, the label kept). No eviction: corrupted items stay until
    the reservoir happens to replace them. Logs ``mem_size``, ``faulty`` (corrupted items
    stored), ``faulty_frac``.
    """

    name = "faulty_replay"

    def __init__(self, mem_size: int = 200, batch_size: int = 32, weight: float = 1.0, fault_rate: float = 0.0,
                 fault_scale: float = 1.0, sketch_dim: int = 16, seed: int = 0,
                 loss_fn: LossFn = classification_loss):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= fault_rate <= 1:
            raise ValueError(f"fault_rate={fault_rate} must be in [0, 1]")
        if fault_scale < 0:
            raise ValueError(f"fault_scale={fault_scale} must be >= 0")
        self.buffer = ConsistencyBuffer(mem_size, sketch_dim, seed)
        self.batch_size, self.weight, self.loss_fn = batch_size, weight, loss_fn
        self.fault_rate, self.fault_scale = fault_rate, fault_scale

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if len(self.buffer) == 0:
            return {}
        return {"replay": self.weight * self.loss_fn(model, self.buffer.sample(self.batch_size))}

    def _evict(self) -> dict[str, Tensor]:
        return {}

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        self.buffer.add(batch)
        self.buffer.corrupt(self.fault_rate, self.fault_scale)
        out = self._evict()
        n = len(self.buffer)
        bad = float(self.buffer.faulty[:n].sum())
        out.update({"mem_size": torch.tensor(float(n)), "faulty": torch.tensor(bad),
                    "faulty_frac": torch.tensor(bad / max(1, n))})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])


@register("strategy", "stable_eviction")
class StableEvictionReplay(FaultyReplay):
    r"""StableWorld's dynamic eviction ("StableWorld: Towards Stable and Consistent Long Interactive
    Video Generation", arXiv 2601.15281; code xbyym/StableWorld
    ``StableWorld/Matrix-game2.0/pipeline/causal_inference.py::decide_and_update_window_ids_tri_9``)
    as a replay-buffer policy.

    StableWorld keeps a sliding window of past frames and, before each new block, scores a frame
    against the clean early frame (ORB+RANSAC inlier ratio); frames consistent with it are kept,
    degraded ones evicted. Here each stored item is scored against its own clean state,
    ``s_i = cos(P x_i, P x_i^{(0)})`` (:func:`consistency_scores`), after every ``evict_every``-th
    step, and items with ``s_i < threshold`` are evicted (their slots refilled by the next
    samples); otherwise the buffer is the same reservoir with the same faults as
    :class:`FaultyReplay`. Extra logs: ``evicted`` (this step) and ``evicted_faulty`` (of which
    were corrupted: the rest are false evictions).
    """

    name = "stable_eviction"

    def __init__(self, mem_size: int = 200, batch_size: int = 32, weight: float = 1.0, fault_rate: float = 0.0,
                 fault_scale: float = 1.0, threshold: float = 0.9, evict_every: int = 1, sketch_dim: int = 16,
                 seed: int = 0, loss_fn: LossFn = classification_loss):
        if not -1 <= threshold <= 1:
            raise ValueError(f"threshold={threshold} must be in [-1, 1] (a cosine)")
        if evict_every < 1:
            raise ValueError(f"evict_every={evict_every} must be >= 1")
        super().__init__(mem_size, batch_size, weight, fault_rate, fault_scale, sketch_dim, seed, loss_fn)
        self.threshold, self.evict_every = threshold, evict_every
        self.steps = 0

    def _evict(self) -> dict[str, Tensor]:
        self.steps += 1
        if self.steps % self.evict_every:
            return {"evicted": torch.tensor(0.0), "evicted_faulty": torch.tensor(0.0)}
        n, bad = self.buffer.evict(self.threshold)
        return {"evicted": torch.tensor(float(n)), "evicted_faulty": torch.tensor(float(bad))}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.steps = int(state["steps"])

r"""ReLoop2's error memory: a fast, non-parametric error-compensation path beside a slow model.

Zhu et al., "ReLoop2: Building Self-Adaptive Recommendation Models via Responsive Error Compensation
Loop" (KDD 2023, arXiv 2306.08717). The slow model ``f`` keeps training as usual; recent samples'
errors are written into an error memory keyed by the model's hidden representation, and at serving
time the prediction is compensated by the errors stored for similar inputs:

.. math:: \hat y'(x) = \hat y(x) + \lambda\,\hat e(x),\qquad
          \hat e(x) = \sum_{i\in \mathrm{top}_k(x)} w_i\, e_i,\quad
          w = \operatorname{softmax}_{i\in\mathrm{top}_k}\big(\cos(h(x), h_i)/\tau\big),\quad e_i = y_i - \hat y_i

Symbols -> arguments: ``h(x)`` = ``keys`` (any ``(B, d)`` representation: the slow model's
embedding in the paper), ``e_i`` = ``errors`` (``(B, C)``, in the space of the prediction that is
compensated: for a classifier the probability residual :func:`classification_error` =
``onehot(y) - softmax(z)``), ``k`` = ``k``, λ = ``lam``, τ = ``temperature``; the memory keeps the
``capacity`` most recent entries (a ring buffer), optionally only those whose error norm exceeds
``min_error``. With λ = 0, or an empty memory, the prediction is returned unchanged.

Departures: the paper stores the memory in a locality-sensitive-hashing sketch (constant-time
access, approximate neighbours); here the neighbours are exact (a dense cosine top-k over at most
``capacity`` rows), which is the quantity the sketch approximates. No reference code was published
with the paper; this follows its equations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._registry import register
from poise.continual._base import Batch, Strategy
from poise.continual.fscil import embed

__all__ = ["CompensatedClassifier", "ErrorMemory", "ReLoop", "classification_error"]


def classification_error(logits: Tensor, y: Tensor) -> Tensor:
    """The probability residual ``onehot(y) - softmax(logits)`` (``(B, C)``): the error ``e = y - ŷ`` of
    a classifier whose prediction ``ŷ`` is its class probabilities."""
    return F.one_hot(y, logits.shape[-1]).to(logits.dtype) - torch.softmax(logits, dim=-1)


class ErrorMemory:
    """A ring buffer of ``(key, error)`` pairs with similarity-weighted top-k retrieval; see the module
    docstring for the equation.

    ``capacity`` >= 1 rows; ``k`` >= 1 neighbours (when the memory holds fewer than ``k`` rows, all of
    them are used: documented, not an error); ``lam`` >= 0; ``temperature`` > 0; ``min_error`` >= 0 (rows
    whose error L2 norm is at most this are not written). The key and error widths are fixed by the
    first :meth:`update`; a later batch of other widths raises ``ValueError`` and changes nothing.
    """

    def __init__(self, capacity: int, k: int = 8, lam: float = 1.0, temperature: float = 0.1,
                 min_error: float = 0.0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ErrorMemory capacity={capacity!r} must be an int >= 1")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ErrorMemory k={k!r} must be an int >= 1")
        for key, val, lo in [("lam", lam, 0.0), ("min_error", min_error, 0.0)]:
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= lo):
                raise ValueError(f"ErrorMemory {key}={val!r} must be a finite number >= {lo:g}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"ErrorMemory temperature={temperature!r} must be a finite number > 0")
        self.capacity, self.k, self.lam = capacity, k, float(lam)
        self.temperature, self.min_error = float(temperature), float(min_error)
        self.keys: Tensor | None = None  # (capacity, d), allocated at the first update
        self.errors: Tensor | None = None  # (capacity, C)
        self.size = 0  # rows filled
        self.ptr = 0  # next row to write (the oldest once full)
        self.written = 0  # rows ever written

    def __len__(self) -> int:
        return self.size

    @torch.no_grad()
    def update(self, keys: Tensor, errors: Tensor) -> int:
        """Write ``(keys[i], errors[i])`` rows (the most recent ``capacity`` of them when the batch is
        larger), overwriting the oldest; returns the number written."""
        if keys.ndim != 2 or errors.ndim != 2 or len(keys) != len(errors):
            raise ValueError(f"ErrorMemory.update: keys {tuple(keys.shape)} and errors {tuple(errors.shape)} must be "
                             "(B, d) and (B, C) with the same B")
        if self.keys is not None and self.errors is not None and (
                keys.shape[1] != self.keys.shape[1] or errors.shape[1] != self.errors.shape[1]):
            raise ValueError(f"ErrorMemory.update: keys of width {keys.shape[1]} and errors of width "
                             f"{errors.shape[1]}; this memory holds widths {self.keys.shape[1]} and "
                             f"{self.errors.shape[1]}")
        if not (torch.isfinite(keys).all() and torch.isfinite(errors).all()):
            raise ValueError("ErrorMemory.update: keys and errors must be finite")
        if self.min_error > 0:
            keep = errors.norm(dim=1) > self.min_error
            keys, errors = keys[keep], errors[keep]
        keys, errors = keys[-self.capacity:].detach(), errors[-self.capacity:].detach()
        n = len(keys)
        if self.keys is None or self.errors is None:
            self.keys = torch.zeros(self.capacity, keys.shape[1], dtype=keys.dtype, device=keys.device)
            self.errors = torch.zeros(self.capacity, errors.shape[1], dtype=errors.dtype, device=errors.device)
        if n == 0:
            return 0
        rows = (self.ptr + torch.arange(n, device=self.keys.device)) % self.capacity
        self.keys[rows] = keys.to(self.keys)
        self.errors[rows] = errors.to(self.errors)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.written += n
        return n

    @torch.no_grad()
    def retrieve(self, keys: Tensor, n_out: int | None = None) -> Tensor:
        """``ê(x)`` for each row of ``keys``: the softmax(cos/τ)-weighted mean of the errors of its
        ``min(k, len(self))`` most similar stored keys; zeros (``(B, n_out)``) when the memory is empty."""
        if keys.ndim != 2:
            raise ValueError(f"ErrorMemory.retrieve: keys must be (B, d), got {tuple(keys.shape)}")
        if self.size == 0 or self.keys is None or self.errors is None:
            if n_out is None:
                raise ValueError("ErrorMemory.retrieve on an empty memory needs n_out (the error width)")
            return torch.zeros(len(keys), n_out, dtype=keys.dtype, device=keys.device)
        if keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"ErrorMemory.retrieve: keys of width {keys.shape[1]}; stored keys have width "
                             f"{self.keys.shape[1]}")
        stored, errs = self.keys[: self.size], self.errors[: self.size]
        sim = F.normalize(keys.to(stored), dim=-1) @ F.normalize(stored, dim=-1).T  # (B, size)
        top, idx = sim.topk(min(self.k, self.size), dim=1)
        w = torch.softmax(top / self.temperature, dim=1)  # (B, k)
        return (w.unsqueeze(-1) * errs[idx]).sum(1).to(keys.dtype)

    def compensate(self, keys: Tensor, logits: Tensor) -> Tensor:
        """``logits + lam * ê(keys)``: the fast path. ``logits`` is the slow model's prediction in the
        space of the stored errors (class probabilities for :func:`classification_error`). Returned
        unchanged (the same tensor) when ``lam == 0`` or the memory is empty."""
        if logits.ndim != 2 or len(logits) != len(keys):
            raise ValueError(f"ErrorMemory.compensate: logits {tuple(logits.shape)} must be (B, C) with B = "
                             f"{len(keys)} rows of keys")
        if self.errors is not None and self.size and logits.shape[1] != self.errors.shape[1]:
            raise ValueError(f"ErrorMemory.compensate: predictions of width {logits.shape[1]}; stored errors have "
                             f"width {self.errors.shape[1]}")
        if self.lam == 0 or self.size == 0:
            return logits
        return logits + self.lam * self.retrieve(keys).to(logits)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "errors": self.errors, "size": self.size, "ptr": self.ptr, "written": self.written}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        want = {"keys", "errors", "size", "ptr", "written"}
        if set(state) != want:
            raise ValueError(f"ErrorMemory state has keys {sorted(state)}; expected {sorted(want)}")
        keys, errors = state["keys"], state["errors"]
        if keys is not None and (len(keys) != self.capacity or errors is None or len(errors) != self.capacity):
            raise ValueError(f"ErrorMemory state of {len(keys)} rows; this memory has capacity {self.capacity}")
        self.keys = None if keys is None else keys.clone()
        self.errors = None if errors is None else errors.clone()
        self.size, self.ptr, self.written = int(state["size"]), int(state["ptr"]), int(state["written"])


class CompensatedClassifier(nn.Module):
    """Wraps a classifier: returns ``log(clamp(softmax(z) + lam ê(f(x)), 1e-6))``, whose argmax is the
    compensated prediction (``f(x)`` the input of the last ``nn.Linear``)."""

    def __init__(self, model: nn.Module, memory: ErrorMemory):
        super().__init__()
        self.model, self.memory = model, memory

    def forward(self, x: Tensor) -> Tensor:
        emb, logits = embed(self.model, x)
        p = self.memory.compensate(emb, torch.softmax(logits, dim=-1))
        return p.clamp_min(1e-6).log()


@register("strategy", "reloop")
class ReLoop(Strategy):
    """ReLoop2 in the continual loop. At every step, before the optimizer step (test-then-train, as
    errors arise in serving), the batch's embeddings and probability residuals
    (:func:`classification_error`, from an eval-mode forward without gradient) are written to an
    :class:`ErrorMemory`; the evaluated model is :class:`CompensatedClassifier`. The slow model trains
    unchanged (no loss term is added). Logs ``mem_size``. State: the memory's."""

    name = "reloop"

    def __init__(self, capacity: int = 256, k: int = 8, lam: float = 1.0, temperature: float = 0.1,
                 min_error: float = 0.0):
        self.memory = ErrorMemory(capacity, k, lam, temperature, min_error)

    @torch.no_grad()
    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        was = model.training
        model.eval()
        try:
            emb, out = embed(model, batch.x)
        finally:
            model.train(was)
        self.memory.update(emb, classification_error(out, batch.y))
        return {}

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return {"mem_size": torch.tensor(float(len(self.memory)))}

    def eval_model(self, model: nn.Module) -> nn.Module:
        return CompensatedClassifier(model, self.memory) if len(self.memory) else model

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state)

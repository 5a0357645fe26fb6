"""Gradient projection strategies: A-GEM, OGD, OGPSA.

Each edits ``p.grad`` in place in ``transform_grads``, after ``backward`` and before the
optimizer step. The *gradient* is projected; an adaptive optimizer then rescales it, so the
*update* is exactly orthogonal to the reference directions only under plain SGD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poise._nn import logits_of, trainable
from poise._registry import register
from poise.continual._base import Batch, LossFn, Strategy, classification_loss
from poise.continual._state import batch_from_state, batch_state, load_np_rng, np_rng_state
from poise.transforms._projection import project_out

__all__ = ["AGEM", "OGD", "OGPSA", "EpisodicMemory", "agem_project", "project_out"]


class EpisodicMemory:
    """Keeps ``per_task`` random training samples of every finished task."""

    def __init__(self, per_task: int, seed: int = 0):
        if per_task < 1:
            raise ValueError(f"per_task={per_task} must be >= 1")
        self.per_task = per_task
        self.rng = np.random.default_rng(seed)
        self.tasks: list[Batch] = []

    def add_task(self, data: Batch) -> None:
        k = min(self.per_task, len(data))
        idx = torch.as_tensor(np.sort(self.rng.choice(len(data), size=k, replace=False)))
        b = data.index(idx)
        self.tasks.append(Batch(b.x.detach().clone(), b.y.detach().clone(),
                                None if b.mask is None else b.mask.clone()))

    def all(self) -> Batch:
        return Batch.cat(self.tasks)

    def sample(self, k: int) -> Batch:
        data = self.all()
        idx = torch.as_tensor(self.rng.choice(len(data), size=min(k, len(data)), replace=False))
        return data.index(idx)

    def __len__(self) -> int:
        return sum(len(b) for b in self.tasks)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": np_rng_state(self.rng), "tasks": [batch_state(b) for b in self.tasks]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_np_rng(self.rng, state["rng"])
        self.tasks = [batch_from_state(b) for b in state["tasks"]]


def _grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _set_grads(params: list[nn.Parameter], flat: Tensor) -> None:
    i = 0
    for p in params:
        n = p.numel()
        g = flat[i : i + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        i += n


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(gs, params, strict=True)])


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    r"""A-GEM's projection (Chaudhry et al., arXiv 1812.00420, eq. 11):
    ``\tilde g = g - \frac{\min(0, g^\top g_{ref})}{g_{ref}^\top g_{ref}} g_{ref}``, i.e.
    ``g`` unchanged when ``g^\top g_{ref} >= 0``, else its component along ``g_ref`` removed.
    Branch-free (no ``.item()``); a zero ``g_ref`` leaves ``g`` unchanged."""
    dot = torch.dot(g, g_ref)
    sq = torch.dot(g_ref, g_ref).clamp_min(torch.finfo(g_ref.dtype).tiny)
    return g - (dot.clamp(max=0) / sq) * g_ref


def _orthonormal_rows(vectors: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows spanning ``vectors`` (shape ``(r, n)``), by reduced QR; directions
    whose residual norm is below ``tol`` times the largest are dropped."""
    q, r = torch.linalg.qr(vectors.T)
    d = r.diagonal().abs()
    keep = d > tol * d.max().clamp_min(1e-30)
    return q[:, keep].T.contiguous()


@register("strategy", "agem")
class AGEM(Strategy):
    r"""Averaged gradient episodic memory (Chaudhry et al., arXiv 1812.00420).

    Memory: ``per_task`` samples of every finished task. Each step, ``g_ref`` is the
    gradient of the loss on ``sample_size`` memory samples, and the full (all-parameter)
    gradient becomes :func:`agem_project` ``(g, g_ref)``. Matches Avalanche ``AGEMPlugin``
    (``patterns_per_experience``, ``sample_size``). Logs ``dot`` (``g^\top g_ref`` before)
    and ``projected`` (1 when the projection fired).
    """

    name = "agem"

    def __init__(self, per_task: int = 100, sample_size: int = 64, seed: int = 0,
                 loss_fn: LossFn = classification_loss):
        self.memory = EpisodicMemory(per_task, seed)
        self.sample_size = sample_size
        self.loss_fn = loss_fn

    def transform_grads(self, model: nn.Module) -> dict[str, Tensor]:
        if len(self.memory) == 0:
            return {}
        params = [p for _, p in trainable(model)]
        g = torch.cat([t.reshape(-1) for t in _grads(params)])
        g_ref = _flat_grad(self.loss_fn(model, self.memory.sample(self.sample_size)), params)
        dot = torch.dot(g, g_ref)
        _set_grads(params, agem_project(g, g_ref))
        return {"dot": dot.detach(), "projected": (dot < 0).float()}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        self.memory.add_task(data)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])


@register("strategy", "ogd")
class OGD(Strategy):
    r"""Orthogonal gradient descent (Farajtabar et al., arXiv 1910.07104), GTL variant.

    After each task, for ``samples_per_task`` of its samples, the gradient of the
    ground-truth logit ``\nabla_\theta f_{y}(x; \theta)`` is orthonormalised against the
    stored basis ``S`` (Gram-Schmidt) and added to it. Each step
    ``\tilde g = g - \sum_{v \in S} \langle g, v \rangle v`` over all parameters
    (:func:`project_out`). The basis grows by ``samples_per_task`` vectors of the model's
    size per task. Logs ``basis`` (its size) and ``removed`` (``\|g - \tilde g\|/\|g\|``).
    """

    name = "ogd"

    def __init__(self, samples_per_task: int = 20, seed: int = 0):
        self.samples_per_task = samples_per_task
        self.rng = np.random.default_rng(seed)
        self.basis: Tensor | None = None

    def transform_grads(self, model: nn.Module) -> dict[str, Tensor]:
        if self.basis is None:
            return {}
        params = [p for _, p in trainable(model)]
        g = torch.cat([t.reshape(-1) for t in _grads(params)])
        g2 = project_out(g, self.basis)
        _set_grads(params, g2)
        return {"basis": torch.tensor(float(len(self.basis))),
                "removed": (g - g2).norm() / g.norm().clamp_min(1e-30)}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        params = [p for _, p in trainable(model)]
        idx = self.rng.choice(len(data), size=min(self.samples_per_task, len(data)), replace=False)
        vecs = []
        for i in idx:
            out = logits_of(model(data.x[int(i)][None]))[0, int(data.y[int(i)])]
            vecs.append(_flat_grad(out, params))
        new = torch.stack(vecs)
        if self.basis is not None:  # Gram-Schmidt against the stored basis, then within
            new = new - (new @ self.basis.T) @ self.basis
            new = _orthonormal_rows(new)
            self.basis = torch.cat([self.basis, new])
        else:
            self.basis = _orthonormal_rows(new)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": np_rng_state(self.rng), "basis": self.basis}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_np_rng(self.rng, state["rng"])
        self.basis = None if state["basis"] is None else state["basis"].clone()


@register("strategy", "ogpsa")
class OGPSA(Strategy):
    r"""Orthogonal gradient projection onto a refreshed reference subspace (OGPSA;
    Sun et al., arXiv 2602.07892; reference code SunGL001/OGPSA
    ``src/llamafactory/train/sft_pg/trainer.py``).

    Per parameter tensor ``k``, ``U_k`` (``r x n_k``, orthonormal rows) spans the gradients
    of the reference loss, and every step ``\tilde g_k = (I - U_k^\top U_k) g_k``, so to
    first order the reference loss does not change under SGD:
    ``\Delta L_{ref} \approx -\eta \nabla L_{ref}^\top \tilde g = 0``. ``rank=1``: ``U_k``
    is the unit-normalised gradient of the mean loss over the whole reference set (the
    official code's summed gradient, normalised); ``rank=r``: the reference set is cut
    into ``r`` chunks and their gradients orthonormalised (QR). The basis is recomputed
    every ``refresh_every`` steps (official: 30 for SFT, 5 for DPO) and at the start of
    each task.

    The reference set is ``reference`` if given (the paper's general-capability set), else
    ``per_task`` stored samples of every finished task, at most ``ref_size`` in all.
    Logs ``removed`` (``\|g - \tilde g\| / \|g\|``) and ``refreshed``.
    """

    name = "ogpsa"

    def __init__(self, ref_size: int = 200, per_task: int = 100, refresh_every: int = 30,
                 rank: int = 1, reference: Batch | None = None, seed: int = 0,
                 loss_fn: LossFn = classification_loss):
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        if refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every} must be >= 1")
        self.ref_size, self.refresh_every, self.rank = ref_size, refresh_every, rank
        self.reference = reference
        self.memory = EpisodicMemory(per_task, seed)
        self.rng = np.random.default_rng(seed + 1)
        self.loss_fn = loss_fn
        self.bases: dict[str, Tensor] = {}
        self._since = 0

    def reference_set(self) -> Batch | None:
        if self.reference is not None:
            return self.reference
        if len(self.memory) == 0:
            return None
        data = self.memory.all()
        if len(data) > self.ref_size:
            data = data.index(torch.as_tensor(np.sort(self.rng.choice(len(data), self.ref_size, replace=False))))
        return data

    def refresh(self, model: nn.Module) -> None:
        ref = self.reference_set()
        if ref is None:
            self.bases = {}
            return
        named = trainable(model)
        params = [p for _, p in named]
        chunks = torch.arange(len(ref)).chunk(min(self.rank, len(ref)))
        per_chunk = []
        for c in chunks:
            gs = torch.autograd.grad(self.loss_fn(model, ref.index(c)), params, allow_unused=True)
            per_chunk.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)])
        self.bases = {}
        for j, (n, _) in enumerate(named):
            vecs = torch.stack([pc[j].reshape(-1) for pc in per_chunk])
            if vecs.abs().max() > 0:
                self.bases[n] = _orthonormal_rows(vecs)

    def before_task(self, model: nn.Module, data: Batch) -> None:
        self._since = 0

    def transform_grads(self, model: nn.Module) -> dict[str, Tensor]:
        refreshed = self._since % self.refresh_every == 0
        if refreshed:
            self.refresh(model)
        self._since += 1
        if not self.bases:
            return {}
        num = torch.zeros(())
        den = torch.zeros(())
        for n, p in trainable(model):
            if p.grad is None or n not in self.bases:
                continue
            g = p.grad.reshape(-1)
            g2 = project_out(g, self.bases[n])
            num = num + (g - g2).pow(2).sum()
            den = den + g.pow(2).sum()
            p.grad.copy_(g2.view_as(p.grad))
        return {"removed": num.sqrt() / den.sqrt().clamp_min(1e-30),
                "refreshed": torch.tensor(float(refreshed))}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        self.memory.add_task(data)

    def state_dict(self) -> dict[str, Any]:
        """The stored samples, both generators, the current bases and the steps since the last
        refresh (the fixed ``reference`` set is an argument, not state)."""
        return {"memory": self.memory.state_dict(), "rng": np_rng_state(self.rng), "bases": dict(self.bases),
                "since": self._since}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        load_np_rng(self.rng, state["rng"])
        self.bases = {n: b.clone() for n, b in state["bases"].items()}
        self._since = int(state["since"])

"""Penalties that hold parameters or outputs near what earlier tasks learned: EWC, LwF."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of, trainable
from poise._registry import register
from poise.continual._base import Batch, LossFn, Strategy, classification_loss

__all__ = ["EWC", "LwF", "diagonal_fisher"]


def diagonal_fisher(
    model: nn.Module, data: Batch, loss_fn: LossFn = classification_loss, batch_size: int = 64
) -> dict[str, Tensor]:
    r"""Empirical diagonal Fisher ``F_k = 1/N \sum_n (\partial_k \log p(y_n|x_n))^2`` from
    per-sample gradients (not squared minibatch means, which Avalanche uses and which is
    biased low by the batch size). ``loss_fn`` must be the per-sample negative
    log-likelihood when given a batch of one.

    Per-sample gradients come from ``torch.func.vmap(grad(...))``; a model whose forward
    cannot be vmapped (data-dependent Python branches, as some Hugging Face models have)
    falls back to one backward pass per sample, with the same result."""
    params = dict(trainable(model))
    was = model.training
    model.eval()
    try:
        try:
            fisher = _fisher_vmap(model, params, data, loss_fn, batch_size)
        except RuntimeError as e:
            if "vmap" not in str(e):
                raise
            fisher = _fisher_loop(model, params, data, loss_fn)
    finally:
        model.train(was)
    return {n: f / max(1, len(data)) for n, f in fisher.items()}


def _fisher_vmap(model: nn.Module, params: dict[str, nn.Parameter], data: Batch, loss_fn: LossFn,
                 batch_size: int) -> dict[str, Tensor]:
    from torch.func import grad, vmap

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor, m: Tensor | None) -> Tensor:
        b = Batch(x[None], y[None], None if m is None else m[None])
        return loss_fn(_Bound(model, p), b)

    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    detached = {n: p.detach() for n, p in params.items()}
    for i in range(0, len(data), batch_size):
        b = data.index(torch.arange(i, min(i + batch_size, len(data))))
        in_dims = (None, 0, 0, None if b.mask is None else 0)
        g = vmap(grad(one), in_dims=in_dims)(detached, b.x, b.y, b.mask)
        for n in fisher:
            fisher[n] += g[n].pow(2).sum(0)
    return fisher


def _fisher_loop(model: nn.Module, params: dict[str, nn.Parameter], data: Batch, loss_fn: LossFn) -> dict[str, Tensor]:
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    names, ps = list(params), list(params.values())
    for i in range(len(data)):
        gs = torch.autograd.grad(loss_fn(model, data.index(torch.tensor([i]))), ps, allow_unused=True)
        for n, g in zip(names, gs, strict=True):
            if g is not None:
                fisher[n] += g.pow(2)
    return fisher


class _Bound(nn.Module):
    """Calls ``model`` with the given parameter tensors (torch.func.functional_call)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_params", params)

    def forward(self, *args: object, **kwargs: object) -> object:
        from torch.func import functional_call

        return functional_call(self._model, self._params, args, kwargs)


@register("strategy", "ewc")
class EWC(Strategy):
    r"""Elastic weight consolidation, online form (Kirkpatrick et al., arXiv 1612.00796;
    online variant: Schwarz et al., "Progress & Compress", arXiv 1805.06370).

    ``L = L_new + (\lambda/2) \sum_k F_k (\theta_k - \theta^*_k)^2``. After each task
    ``F <- \gamma F + F_{new}`` (``gamma`` = ``decay``; ``decay=1`` sums the Fishers) and the
    anchor ``\theta^*`` becomes the current parameters. ``F_new`` is the empirical diagonal
    Fisher on up to ``fisher_samples`` of the task's training samples
    (:func:`diagonal_fisher`). ``lam`` is ``\lambda``. Logs ``ewc`` (the penalty).
    """

    name = "ewc"

    def __init__(self, lam: float = 100.0, decay: float = 1.0, fisher_samples: int = 500,
                 seed: int = 0, loss_fn: LossFn = classification_loss):
        if lam < 0:
            raise ValueError(f"lam={lam} must be >= 0")
        if not 0 <= decay <= 1:
            raise ValueError(f"decay={decay} must be in [0, 1]")
        self.lam, self.decay, self.fisher_samples = lam, decay, fisher_samples
        self.loss_fn = loss_fn
        self.gen = torch.Generator().manual_seed(seed)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: nn.Module) -> Tensor:
        terms = [
            (self.fisher[n] * (p - self.anchor[n]).pow(2)).sum()
            for n, p in trainable(model) if n in self.fisher
        ]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.lam * torch.stack(terms).sum()

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        return {"ewc": self.penalty(model)} if self.fisher else {}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        if len(data) > self.fisher_samples:
            data = data.index(torch.randperm(len(data), generator=self.gen)[: self.fisher_samples])
        new = diagonal_fisher(model, data, self.loss_fn)
        for n, f in new.items():
            self.fisher[n] = self.decay * self.fisher[n] + f if n in self.fisher else f
        self.anchor = {n: p.detach().clone() for n, p in trainable(model)}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "fisher": dict(self.fisher), "anchor": dict(self.anchor)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gen.set_state(state["gen"].clone())
        self.fisher = {n: f.clone() for n, f in state["fisher"].items()}
        self.anchor = {n: a.clone() for n, a in state["anchor"].items()}


@register("strategy", "lwf")
class LwF(Strategy):
    r"""Learning without forgetting (Li & Hoiem, arXiv 1606.09282).

    ``L = L_new + \alpha T^2 KL(softmax(z_{old}/T) \| softmax(z/T))`` over the output units
    of the classes seen in earlier tasks, where ``z_old`` are the logits of a frozen copy
    taken at the end of the previous task (``alpha``, ``temperature`` = T). ``batchmean``
    reduction, as Avalanche's ``LwFPlugin``. Logs ``lwf``.
    """

    name = "lwf"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.alpha, self.temperature = alpha, temperature
        self.old: nn.Module | None = None
        self.old_units: list[int] = []
        self._pending: dict[str, Tensor] | None = None  # a loaded frozen copy, built at the next hook

    def _freeze(self, model: nn.Module, state: Mapping[str, Tensor] | None = None) -> None:
        self.old = copy.deepcopy(model).eval()
        if state is not None:
            self.old.load_state_dict(state)
        for p in self.old.parameters():
            p.requires_grad_(False)
        self._pending = None

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if self._pending is not None:
            self._freeze(model, self._pending)
        if self.old is None or not self.old_units:
            return {}
        with torch.no_grad():
            z_old = logits_of(self.old(batch.x))[..., self.old_units]
        z = logits[..., self.old_units]
        T = self.temperature
        kl = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(z_old / T, -1),
                      log_target=True, reduction="batchmean")
        return {"lwf": self.alpha * T * T * kl}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        self._freeze(model)
        seen = set(self.old_units) | {int(c) for c in data.y.unique()}
        self.old_units = sorted(seen)

    def state_dict(self) -> dict[str, Any]:
        """The frozen copy's ``state_dict`` (None before the first task ends) and the output
        units it distils."""
        old = self._pending if self._pending is not None else (None if self.old is None else self.old.state_dict())
        return {"old": old, "old_units": list(self.old_units)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The frozen copy is rebuilt (a copy of the trained model with the saved weights) at
        the next hook that sees the model."""
        self.old = None
        self._pending = None if state["old"] is None else {k: v.clone() for k, v in state["old"].items()}
        self.old_units = [int(u) for u in state["old_units"]]

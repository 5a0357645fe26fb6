r"""SSO: stochastic surrogate optimization in target space.

Lavington, Vaswani, Babanezhad, Schmidt & Le Roux, *Target-based Surrogates for Stochastic
Optimization*, ICML 2023, arXiv 2302.02607 (Algorithm 1, "SSO"); reference code
WilderLavington/Target-Based-Surrogates-For-Stochastic-Optimization ``optimizers/sgd_fmdopt.py``
(``SGD_FMDOpt.step``).

The loss is split as ``L(theta) = h(f(theta))``: ``f`` maps parameters to targets (the logits of
a minibatch), ``h`` is the loss in target space, the expensive part when its gradient needs a
simulator, rollouts or an expert (RL, imitation). At ``theta_t``, with ``z_t = f(theta_t)`` and one
gradient ``nabla h(z_t)``, SSO minimises the surrogate

    ``g_t(theta) = h(z_t) + <nabla h(z_t), f(theta) - z_t> + (1 / (2 eta)) ||f(theta) - z_t||^2``

(equivalently: regress ``f(theta)`` onto ``z_t - eta nabla h(z_t)``) with ``m`` cheap inner steps of
any optimizer, each needing only ``f`` and its backward. One expensive ``nabla h`` is amortised over
``m`` parameter updates. At ``theta = theta_t`` the surrogate's gradient is ``J^T nabla h(z_t)``, the
loss's own, so ``m = 1`` is exactly one plain step of the optimizer on ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SSO", "sso_step", "sso_surrogate"]


def sso_surrogate(f: Tensor, z: Tensor, grad_h: Tensor, eta: float) -> Tensor:
    r"""``<nabla h(z_t), f - z_t> + ||f - z_t||^2 / (2 eta)`` summed over every target entry (the
    surrogate without its constant ``h(z_t)``); its gradient in ``f`` is ``nabla h + (f - z_t)/eta``,
    exactly ``nabla h`` at ``f = z_t``."""
    diff = f - z
    return (grad_h * diff).sum() + (0.5 / eta) * diff.pow(2).sum()


def _check(eta: Any, inner_steps: Any) -> None:
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(f"inner_steps={inner_steps!r} is out of range; valid: an integer >= 1")
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta={eta!r} is out of range; valid: (0, inf)")


def sso_step(model: nn.Module | Callable[[Tensor], Tensor], batch_x: Any, loss_of_logits: Callable[[Tensor], Tensor],
             optimizer: torch.optim.Optimizer, eta: float, inner_steps: int) -> dict[str, Tensor]:
    r"""One SSO outer step (arXiv 2302.02607, Algorithm 1) on a minibatch.

    ``model(batch_x)`` is ``f(theta)`` (any output tensor: logits, values); ``loss_of_logits`` is
    ``h`` (a scalar; it may close over labels, actions, advantages); ``optimizer`` takes the inner
    steps (the paper uses SGD or a line search; any ``torch.optim`` works); ``eta``: the target-space
    step ``eta``; ``inner_steps``: ``m``. The norm is summed over every target entry, so when ``h``
    is a batch *mean* (``nabla h`` carries ``1/B``) each example's target moves by ``(eta/B)`` times
    its own loss gradient: scale ``eta`` with the batch size (``eta = B`` is a per-example step of 1).

    1. ``z_t = f(theta_t)``; ``nabla h(z_t)`` by one autograd call on ``h`` alone (the expensive gradient);
    2. ``m`` times: ``optimizer.zero_grad()``, ``g_t(theta).backward()``, ``optimizer.step()``; the first
       inner step reuses the forward of step 1, so ``m`` inner steps cost ``m`` forwards of ``f``.

    Returns detached 0-d metrics: ``loss`` (``h(z_t)``, before the step), ``surrogate_first`` and
    ``surrogate_last`` (``g_t`` at the first and last inner iterate, ``h(z_t)`` included),
    ``target_grad_evals`` (1) and ``inner_steps``. A model with dropout should be in eval mode
    for ``m = 1`` to equal a plain step bit for bit (the surrogate is built at ``z_t``).
    """
    _check(eta, inner_steps)
    f = model(batch_x)
    z = f.detach().requires_grad_(True)
    with torch.enable_grad():
        h = loss_of_logits(z)
        if h.ndim != 0:
            raise ValueError(f"loss_of_logits must return a scalar; got shape {tuple(h.shape)}")
        (grad_h,) = torch.autograd.grad(h, z)
    z, grad_h, h = z.detach(), grad_h.detach(), h.detach()
    first = last = None
    for k in range(inner_steps):
        if k:
            f = model(batch_x)
        optimizer.zero_grad(set_to_none=True)
        s = sso_surrogate(f, z, grad_h, eta)
        s.backward()
        optimizer.step()
        last = s.detach() + h
        if first is None:
            first = last
    assert first is not None and last is not None
    return {"loss": h, "surrogate_first": first, "surrogate_last": last,
            "target_grad_evals": torch.tensor(1), "inner_steps": torch.tensor(inner_steps)}


class SSO:
    r"""A training-loop helper around :func:`sso_step`: holds ``model, loss_of_logits, optimizer,
    eta, inner_steps`` and counts the expensive target-space gradients (``target_grad_evals``) and
    the inner backward passes through ``f`` (``inner_backwards``).

    ``step(batch_x, loss_of_logits=None)`` runs one outer step; pass ``loss_of_logits`` per batch
    when ``h`` depends on the batch (labels, sampled actions, advantages)."""

    def __init__(self, model: nn.Module | Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, *,
                 eta: float, inner_steps: int, loss_of_logits: Callable[[Tensor], Tensor] | None = None):
        _check(eta, inner_steps)
        self.model, self.optimizer, self.eta, self.inner_steps = model, optimizer, float(eta), inner_steps
        self.loss_of_logits = loss_of_logits
        self.target_grad_evals = 0
        self.inner_backwards = 0

    def step(self, batch_x: Any, loss_of_logits: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        h = loss_of_logits or self.loss_of_logits
        if h is None:
            raise ValueError("SSO.step: no loss_of_logits (give one here or to the constructor)")
        out = sso_step(self.model, batch_x, h, self.optimizer, self.eta, self.inner_steps)
        self.target_grad_evals += 1
        self.inner_backwards += self.inner_steps
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "inner_steps": self.inner_steps, "target_grad_evals": self.target_grad_evals,
                "inner_backwards": self.inner_backwards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check(state["eta"], state["inner_steps"])
        self.eta, self.inner_steps = float(state["eta"]), int(state["inner_steps"])
        self.target_grad_evals, self.inner_backwards = int(state["target_grad_evals"]), int(state["inner_backwards"])

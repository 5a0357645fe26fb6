"""The hook protocol every continual-learning strategy implements.

One optimizer step of a training loop goes through the hooks in a fixed order::

    logits = model(x); loss = task_loss + sum(strategy.loss_terms(model, batch, logits))
    loss.backward()
    strategy.transform_grads(model)        # edit p.grad in place (A-GEM, OGD, OGPSA)
    before = {n: p.clone() ...}            # only if strategy.needs_update_snapshot
    optimizer.step()
    strategy.transform_update(model, before)   # edit the realised update theta_after - theta_before
    strategy.after_step(model, batch)      # reservoir insert, EMA, ...

and around each task ``before_task(model, task_data)`` / ``after_task(model, task_data)``.
``state_dict()`` / ``load_state_dict(state)`` save and restore everything a strategy has
learnt (buffers, Fishers, anchors, frozen copies, random generators) as a plain dict of
tensors and Python scalars/lists, loadable with ``torch.load(weights_only=True)``, so a
run can be checkpointed and resumed mid-task (:func:`poise.continual.fit_stream`).
A strategy works on any ``nn.Module``: the loss it needs for its own computations is
``loss_fn(model, batch)`` (default: cross-entropy of the model's logits, restricted to the
batch's class mask when there is one), so a Hugging Face model or a custom loss plugs in by
passing ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of, trainable

__all__ = ["Batch", "Compose", "LossFn", "Strategy", "classification_loss", "overrides", "trainable"]


class Batch(NamedTuple):
    """Inputs, integer targets, and an optional ``(B, n_classes)`` bool mask of the output
    units each sample may use (task-incremental learning); None means all units."""

    x: Tensor
    y: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.y)

    def index(self, idx: Tensor) -> Batch:
        return Batch(self.x[idx], self.y[idx], None if self.mask is None else self.mask[idx])

    @staticmethod
    def cat(batches: Sequence[Batch]) -> Batch:
        masks = [b.mask for b in batches]
        mask = None if any(m is None for m in masks) else torch.cat(masks)  # type: ignore[arg-type]
        return Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]), mask)


LossFn = Callable[[nn.Module, Batch], Tensor]


def masked_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    return logits if mask is None else logits.masked_fill(~mask, float("-inf"))


def classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy of ``model(batch.x)`` against ``batch.y`` over the allowed units."""
    return F.cross_entropy(masked_logits(logits_of(model(batch.x)), batch.mask), batch.y)


class Strategy:
    """Base class: every hook is a no-op. Subclasses override what they need.

    ``loss_terms`` returns named extra loss terms (summed into the loss by the loop);
    ``transform_grads`` and ``after_step`` may return named 0-d tensors as metrics.

    A strategy that keeps state overrides :meth:`state_dict` and :meth:`load_state_dict`;
    the base's are for a strategy with none (an empty dict; loading a non-empty one raises).
    The hyperparameters are not part of the state: load into a strategy built with the same
    arguments.
    """

    name = "strategy"
    needs_update_snapshot = False

    def before_task(self, model: nn.Module, data: Batch) -> None:
        pass

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        return {}

    def transform_grads(self, model: nn.Module) -> dict[str, Tensor]:
        return {}

    def transform_update(self, model: nn.Module, before: dict[str, Tensor]) -> None:
        pass

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        return {}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        pass

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate (EMA evaluates its averaged copy)."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """The strategy's learnt state (tensors, Python scalars and lists; tensors may be
        shared with the strategy, as in ``torch.optim``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (copied, never aliased)."""
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state; got keys {sorted(state)}")


class Compose(Strategy):
    """Run several strategies' hooks in order; loss terms and metrics are merged with the
    strategy's name as prefix; the last strategy that swaps the evaluated model wins."""

    name = "compose"

    def __init__(self, strategies: Iterable[Strategy]):
        self.strategies = list(strategies)

    @property
    def needs_update_snapshot(self) -> bool:  # type: ignore[override]
        return any(s.needs_update_snapshot for s in self.strategies)

    def before_task(self, model: nn.Module, data: Batch) -> None:
        for s in self.strategies:
            s.before_task(model, data)

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s in self.strategies:
            out.update({f"{s.name}/{k}": v for k, v in s.loss_terms(model, batch, logits).items()})
        return out

    def transform_grads(self, model: nn.Module) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s in self.strategies:
            out.update({f"{s.name}/{k}": v for k, v in s.transform_grads(model).items()})
        return out

    def transform_update(self, model: nn.Module, before: dict[str, Tensor]) -> None:
        for s in self.strategies:
            s.transform_update(model, before)

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s in self.strategies:
            out.update({f"{s.name}/{k}": v for k, v in s.after_step(model, batch).items()})
        return out

    def after_task(self, model: nn.Module, data: Batch) -> None:
        for s in self.strategies:
            s.after_task(model, data)

    def eval_model(self, model: nn.Module) -> nn.Module:
        for s in self.strategies:
            model = s.eval_model(model)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"strategies": [{"name": s.name, "state": s.state_dict()} for s in self.strategies]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state["strategies"])
        names = [s.name for s in self.strategies]
        if [d["name"] for d in saved] != names:
            raise ValueError(f"Compose state is for strategies {[d['name'] for d in saved]}, this Compose has "
                             f"{names}")
        for s, d in zip(self.strategies, saved, strict=True):
            s.load_state_dict(d["state"])


def overrides(strategy: Strategy, hook: str) -> bool:
    """Whether ``strategy`` (or any part of a :class:`Compose`) implements ``hook`` itself."""
    if isinstance(strategy, Compose):
        return any(overrides(c, hook) for c in strategy.strategies)
    return getattr(type(strategy), hook) is not getattr(Strategy, hook)

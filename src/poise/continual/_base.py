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
A strategy works on any ``nn.Module``: the loss it needs for its own computations is
``loss_fn(model, batch)`` (default: cross-entropy of the model's logits, restricted to the
batch's class mask when there is one), so a Hugging Face model or a custom loss plugs in by
passing ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.measure.evaluator import logits_of

__all__ = ["Batch", "Compose", "LossFn", "Strategy", "classification_loss", "trainable"]


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


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs that require grad, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Strategy:
    """Base class: every hook is a no-op. Subclasses override what they need.

    ``loss_terms`` returns named extra loss terms (summed into the loss by the loop);
    ``transform_grads`` and ``after_step`` may return named 0-d tensors as metrics.
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

"""A readable continual-learning loop: tasks in order, one optimizer step at a time, with a
strategy's hooks and continual evaluation. Use it as is, or copy it into your own loop:
every call it makes is public."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from poise.continual._base import Batch, Strategy, masked_logits
from poise.measure.evaluator import ContinualEvaluator, logits_of

__all__ = ["fit_stream", "task_batch"]


def task_batch(task: Any, n_classes: int) -> Batch:
    """A task's whole training set as a :class:`Batch`, with a class mask when the task is
    task-incremental (``task.restrict``)."""
    mask = None
    if getattr(task, "restrict", False):
        mask = torch.zeros(len(task.y_train), n_classes, dtype=torch.bool)
        mask[:, task.classes] = True
    return Batch(task.x_train, task.y_train, mask)


def fit_stream(
    model: nn.Module,
    tasks: list[Any],
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    evaluator: ContinualEvaluator,
    *,
    steps_per_task: int,
    batch_size: int,
    n_classes: int,
    seed: int = 0,
    log: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``tasks`` in order and return ``evaluator.metrics()``.

    Each step draws ``batch_size`` samples of the current task (its own seeded generator),
    computes the task loss plus ``strategy.loss_terms``, back-propagates, applies
    ``strategy.transform_grads``, steps the optimizer, applies ``transform_update`` and
    ``after_step``, then ``evaluator.maybe_eval`` on ``strategy.eval_model(model)``. ``log``
    receives one dict per step (floats), ``progress`` the number of steps done.
    """
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for task in tasks:
        data = task_batch(task, n_classes)
        strategy.before_task(model, data)
        evaluator.begin_task(task.id)
        for _ in range(steps_per_task):
            batch = data.index(torch.randint(len(data), (batch_size,), generator=gen))
            model.train()
            logits = logits_of(model(batch.x))
            task_loss = torch.nn.functional.cross_entropy(masked_logits(logits, batch.mask), batch.y)
            terms = strategy.loss_terms(model, batch, logits)
            loss = task_loss + sum(terms.values(), torch.zeros(()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gmetrics = strategy.transform_grads(model)
            before = (
                {n: p.detach().clone() for n, p in model.named_parameters()}
                if strategy.needs_update_snapshot else {}
            )
            optimizer.step()
            if before:
                strategy.transform_update(model, before)
            smetrics = strategy.after_step(model, batch)
            accs = evaluator.maybe_eval(strategy.eval_model(model), n_samples=len(batch))
            step += 1
            if log is not None:
                rec: dict[str, Any] = {"step": step, "task": task.id, "loss": _f(loss),
                                       "task_loss": _f(task_loss)}
                rec.update({f"loss/{k}": _f(v) for k, v in terms.items()})
                rec.update({f"grad/{k}": _f(v) for k, v in gmetrics.items()})
                rec.update({f"step/{k}": _f(v) for k, v in smetrics.items()})
                if accs is not None:
                    rec.update({f"acc/{t}": a for t, a in accs.items()})
                log(rec)
            if progress is not None:
                progress(1)
        strategy.after_task(model, data)
        accs = evaluator.end_task(strategy.eval_model(model))
        if log is not None:
            log({"step": step, "task": task.id, "boundary": True,
                 **{f"acc/{t}": a for t, a in accs.items()}})
    return evaluator.metrics()


def _f(t: Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, Tensor) else float(t)



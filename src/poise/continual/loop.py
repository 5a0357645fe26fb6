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
    guard: Any = None,
    shard: bool | str = "auto",
) -> dict[str, Any]:
    """Train ``model`` on ``tasks`` in order and return ``evaluator.metrics()``.

    Each step draws ``batch_size`` samples of the current task (its own seeded generator),
    computes the task loss plus ``strategy.loss_terms``, back-propagates, applies
    ``strategy.transform_grads``, steps the optimizer, applies ``transform_update`` and
    ``after_step``, then ``evaluator.maybe_eval`` on ``strategy.eval_model(model)``. ``log``
    receives one dict per step (floats), ``progress`` the number of steps done.

    ``guard`` (a :class:`poise.guards.RollbackGuard` over this model and optimizer) is checked
    after each evaluation with the mean accuracy on the *earlier* tasks (the current task's
    own accuracy is expected to move); its reference is reset at each task's start. A
    rollback restores the last accepted weights and optimizer state and is logged as
    ``guard/rolled_back``.

    Under ``torch.distributed`` (``torchrun``; ``shard="auto"`` and more than one rank) every
    rank draws the same global batch and trains on its ``rank::world_size`` rows: wrap the
    model in ``DistributedDataParallel`` and the averaged gradient is the global batch's
    (for ``batch_size`` divisible by the world size). The evaluator shards its evaluation the
    same way. Strategies with data-dependent state (replay buffers, reference gradients)
    then keep one state per rank.
    """
    gen = torch.Generator().manual_seed(seed)
    rank, world = _world(shard)
    step = 0
    for task in tasks:
        data = task_batch(task, n_classes)
        strategy.before_task(model, data)
        evaluator.begin_task(task.id)
        earlier = [t.id for t in tasks[: tasks.index(task)]]
        if guard is not None:
            guard.best = None
            guard._accept()
        for _ in range(steps_per_task):
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            batch = data.index(idx[rank::world] if world > 1 else idx)
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
            rolled = None
            if guard is not None and accs is not None and earlier:
                rolled = not guard.check(sum(accs[t] for t in earlier) / len(earlier), step)
            if log is not None:
                rec: dict[str, Any] = {"step": step, "task": task.id, "loss": _f(loss),
                                       "task_loss": _f(task_loss)}
                rec.update({f"loss/{k}": _f(v) for k, v in terms.items()})
                rec.update({f"grad/{k}": _f(v) for k, v in gmetrics.items()})
                rec.update({f"step/{k}": _f(v) for k, v in smetrics.items()})
                if accs is not None:
                    rec.update({f"acc/{t}": a for t, a in accs.items()})
                if rolled is not None:
                    rec["guard/rolled_back"] = float(rolled)
                log(rec)
            if progress is not None:
                progress(1)
        strategy.after_task(model, data)
        accs = evaluator.end_task(strategy.eval_model(model))
        if log is not None:
            log({"step": step, "task": task.id, "boundary": True,
                 **{f"acc/{t}": a for t, a in accs.items()}})
    return evaluator.metrics()


def _world(shard: bool | str) -> tuple[int, int]:
    import torch.distributed as dist

    if shard not in ("auto", True, False):
        raise ValueError(f"shard={shard!r}; valid choices: 'auto', True, False")
    if shard is False or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _f(t: Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, Tensor) else float(t)



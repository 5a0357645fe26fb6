"""A readable continual-learning loop: tasks in order, one optimizer step at a time, with a
strategy's hooks and continual evaluation. Use it as is, or copy it into your own loop:
every call it makes is public."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from poise._nn import logits_of
from poise.continual._base import Batch, Strategy, masked_logits
from poise.continual._state import clone_tree
from poise.distributed import rank_world
from poise.guards import RollbackGuard
from poise.measure.evaluator import ContinualEvaluator

__all__ = ["CHECKPOINT_VERSION", "fit_stream", "task_batch"]

CHECKPOINT_VERSION = 1


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
    guard: RollbackGuard | None = None,
    shard: bool | str = "auto",
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``tasks`` in order and return ``evaluator.metrics()``.

    Each step draws ``batch_size`` samples of the current task (its own seeded generator),
    computes the task loss plus ``strategy.loss_terms``, back-propagates, applies
    ``strategy.transform_grads``, steps the optimizer, applies ``transform_update`` and
    ``after_step``, then ``evaluator.maybe_eval`` on ``strategy.eval_model(model)``. ``log``
    receives one dict per step (floats), ``progress`` the number of steps done (in this call).

    ``guard`` (a :class:`poise.guards.RollbackGuard` over this model and optimizer) is checked
    after each evaluation with the mean accuracy on the *earlier* tasks (the current task's
    own accuracy is expected to move); it is reset at each task's start. A rollback restores
    the last accepted weights and optimizer state and is logged as ``guard/rolled_back``.

    Checkpoint and resume. With ``checkpoint_every = n > 0``, after every ``n``-th step (its
    evaluation, guard check, ``log`` and ``progress`` done) ``on_checkpoint(state)`` receives
    a snapshot (every tensor cloned) that is a plain dict of tensors and Python values,
    loadable with ``torch.load(weights_only=True)``::

        {"version": 1, "task_index": i, "step_in_task": k, "step": global step,
         "task_ids": [...], "steps_per_task": ..., "batch_size": ..., "seed": ...,
         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
         "strategy": strategy.state_dict(), "evaluator": evaluator.state_dict(),
         "guard": guard.state_dict() or None,
         "rng": {"data": <the batch generator's state>, "torch": torch.get_rng_state(),
                 "cuda": [per-device states] (only when CUDA is initialised)}}

    Passing that dict as ``resume`` (to a fresh model, optimizer, strategy and evaluator
    built with the same arguments) restores all of it and continues at step ``k + 1`` of task
    ``i`` without calling ``before_task``/``begin_task`` again (``k = steps_per_task``: only
    the task's end runs), so the resumed run's weights, strategy state, evaluator curves and
    logged records equal the uninterrupted run's. A state from other tasks, step counts,
    batch size or seed raises ``ValueError`` naming the key.

    Under ``torch.distributed`` (``torchrun``; ``shard="auto"`` and more than one rank) every
    rank draws the same global batch and trains on its ``rank::world_size`` rows: wrap the
    model in ``DistributedDataParallel`` and the averaged gradient is the global batch's
    (for ``batch_size`` divisible by the world size). The evaluator shards its evaluation the
    same way. Strategies with data-dependent state (replay buffers, reference gradients)
    then keep one state per rank, and ``on_checkpoint`` is called on every rank with its own.
    """
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: never)")
    if checkpoint_every and on_checkpoint is None:
        raise ValueError(f"checkpoint_every={checkpoint_every} needs on_checkpoint (a callable taking the state)")
    gen = torch.Generator().manual_seed(seed)
    rank, world = rank_world(shard)
    config = {"task_ids": [t.id for t in tasks], "steps_per_task": steps_per_task, "batch_size": batch_size,
              "seed": seed}
    step, start_task, start_k = 0, 0, 0
    if resume is not None:
        step, start_task, start_k = _restore(resume, config, model, optimizer, strategy, evaluator, guard, gen)
    for ti in range(start_task, len(tasks)):
        task = tasks[ti]
        data = task_batch(task, n_classes)
        resumed = resume is not None and ti == start_task
        if not resumed:
            strategy.before_task(model, data)
            evaluator.begin_task(task.id)
            if guard is not None:
                guard.reset()
        earlier = [t.id for t in tasks[:ti]]
        for in_task in range(start_k if resumed else 0, steps_per_task):
            idx = torch.randint(len(data), (batch_size,), generator=gen)
            batch = data.index(idx[rank::world] if world > 1 else idx)
            model.train()
            logits = logits_of(model(batch.x))
            task_loss = torch.nn.functional.cross_entropy(masked_logits(logits, batch.mask), batch.y)
            terms = strategy.loss_terms(model, batch, logits)
            # no extra add (and graph node) without terms; with terms, the sum starts from a float32 zero as it
            # always did (a half-precision loss is promoted, not summed in its own precision)
            loss = task_loss + sum(terms.values(), torch.zeros(())) if terms else task_loss
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
            if checkpoint_every and step % checkpoint_every == 0:
                snapshot = clone_tree({
                    "version": CHECKPOINT_VERSION, "task_index": ti, "step_in_task": in_task + 1, "step": step,
                    **config,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "strategy": strategy.state_dict(), "evaluator": None,
                    "guard": None if guard is None else guard.state_dict(),
                    "rng": _rng_state(gen),
                })
                # plain Python values built afresh by each call: walking its every record to copy it again cost
                # more than the rest of the snapshot (22-250 ms at the default study's last checkpoint)
                snapshot["evaluator"] = evaluator.state_dict()
                on_checkpoint(snapshot)  # type: ignore[misc]
        before_end = strategy.eval_model(model) if evaluator.evaluated_now() else None
        mark = None if before_end is None else _fingerprint(before_end)
        strategy.after_task(model, data)
        evaluated = strategy.eval_model(model)
        # the last step's scheduled evaluation is the boundary one only if after_task left the evaluated model as it was
        same = before_end is not None and evaluated is before_end and _fingerprint(evaluated) == mark
        accs = evaluator.end_task(evaluated, reuse=same)
        if log is not None:
            log({"step": step, "task": task.id, "boundary": True,
                 **{f"acc/{t}": a for t, a in accs.items()}})
    return evaluator.metrics()


@torch.no_grad()
def _fingerprint(model: nn.Module) -> list[tuple[float, float, float]]:
    """Per floating state tensor, its sum, sum of squares and position-weighted sum (float64): equal
    before and after a hook unless the hook changed the weights (the weighted sum catches a permutation
    of entries, which keeps the other two). One pass over the parameters, once per task."""
    out = []
    for v in model.state_dict().values():
        if torch.is_floating_point(v):
            d = v.detach().double().flatten()
            pos = torch.arange(1, d.numel() + 1, dtype=torch.float64)
            out.append((float(d.sum()), float((d * d).sum()), float((d * pos).sum())))
    return out


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _restore(state: Mapping[str, Any], config: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             strategy: Strategy, evaluator: ContinualEvaluator, guard: RollbackGuard | None,
             gen: torch.Generator) -> tuple[int, int, int]:
    """Load a checkpoint of :func:`fit_stream` in place; returns ``(step, task_index, step_in_task)``."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"resume: checkpoint version {state.get('version')!r}; valid choices: {CHECKPOINT_VERSION}")
    for key, want in config.items():
        if state[key] != want:
            raise ValueError(f"resume: the checkpoint has {key}={state[key]!r}, this run {key}={want!r}")
    if (state["guard"] is None) != (guard is None):
        raise ValueError(f"resume: the checkpoint was taken {'without' if state['guard'] is None else 'with'} a "
                         f"guard, this run has {'none' if guard is None else 'one'}")
    ti, k = int(state["task_index"]), int(state["step_in_task"])
    if not (0 <= ti < len(config["task_ids"]) and 0 < k <= config["steps_per_task"]):
        raise ValueError(f"resume: task_index={ti}, step_in_task={k} out of range for "
                         f"{len(config['task_ids'])} tasks of {config['steps_per_task']} steps")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    strategy.load_state_dict(state["strategy"])
    evaluator.load_state_dict(state["evaluator"])
    if guard is not None:
        guard.load_state_dict(state["guard"])
    rng = state["rng"]
    gen.set_state(rng["data"].clone())
    torch.set_rng_state(rng["torch"].clone())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.clone() for s in rng["cuda"]])
    return int(state["step"]), ti, k


def _f(t: Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, Tensor) else float(t)

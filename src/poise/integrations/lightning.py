"""Lightning callback: continual evaluation and poise strategies inside ``Trainer.fit``, with
:func:`poise.continual.fit_stream`'s guarantees.

>>> from poise.integrations.lightning import ContinualCallback
>>> cb = ContinualCallback(evaluator, strategy=Replay(...), sink=make_sinks(["tensorboard"], "runs/x", "replay"))
>>> for task in tasks:                               # one fit per task, as continual Lightning code does
...     cb.start_task(task.id, (task.x_train, task.y_train))
...     trainer = L.Trainer(max_steps=500, callbacks=[cb], logger=logger)
...     trainer.fit(module, loader(task))
>>> cb.metrics()["min_acc"]

and in the module's ``training_step``, when the strategy adds loss terms (EWC, LwF, replay)::

    logits = self(x)
    return self.poise.loss(self, batch, logits, F.cross_entropy(logits, y))  # self.poise = cb

What it guarantees:

* **one global step across tasks**: the callback counts optimizer steps itself (``cb.step``), so
  curves of several ``fit`` calls do not overlap the way ``trainer.global_step`` (reset by
  each new ``Trainer``) makes them;
* **no dropped evaluations**: every evaluation is written at that step to ``sink`` (any callable
  taking a record dict, e.g. :func:`poise.integrations.trackers.make_sinks`), to every logger
  of the trainer with ``logger.log_metrics(..., step=cb.step)`` (not ``self.log``, whose
  ``log_every_n_steps`` throttle drops the dense evaluations right after a task switch,
  exactly where the stability gap is), and to ``cb.records``; records have
  ``fit_stream``'s format (``step, task, loss, loss/<term>, grad/<k>, step/<k>, acc/<task>``,
  and ``boundary: True`` for the task-end evaluation);
* **the strategy's hooks in fit_stream's order**: ``before_task`` at the task's first
  ``on_train_start``, ``transform_grads`` (and the update snapshot) in
  ``on_before_optimizer_step`` (once per optimizer step, on the accumulated gradient),
  ``transform_update``, ``after_step`` and ``evaluator.maybe_eval(strategy.eval_model(model))``
  after each optimizer step, ``after_task`` and ``evaluator.end_task`` in ``on_train_end``;
* **checkpointed through Lightning**: :meth:`state_dict` holds the strategy's and the
  evaluator's ``state_dict``, the step and the task position, saved in every Lightning
  checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``) and restored by
  ``trainer.fit(..., ckpt_path=...)``; resuming mid-task does not call ``before_task`` /
  ``begin_task`` again, so the resumed run's curves equal the uninterrupted run's (for data
  that resumes in order, e.g. a checkpoint at an epoch's end or a stateful loader).

Needs ``lightning`` (``pip install 'poise[lightning]'``); falls back to ``pytorch_lightning``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError("poise.integrations.lightning needs Lightning: pip install 'poise[lightning]' "
                          "(or: pip install lightning)") from e

from poise.continual._base import Batch, Strategy, overrides
from poise.continual._state import clone_tree
from poise.integrations.trackers import scalars
from poise.measure.evaluator import ContinualEvaluator

__all__ = ["STATE_VERSION", "ContinualCallback", "to_batch"]

STATE_VERSION = 1
Record = dict[str, Any]


def to_batch(batch: Any) -> Batch:
    """A Lightning batch as a poise :class:`~poise.continual.Batch`: a ``Batch`` as is, an
    ``(x, y)`` or ``(x, y, mask)`` tuple/list, or a mapping with ``x`` and ``y`` (and ``mask``).
    Anything else raises ``TypeError``: pass ``batch_fn=`` to :class:`ContinualCallback`."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, tuple | list) and len(batch) in (2, 3):
        return Batch(*batch)
    if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
        return Batch(batch["x"], batch["y"], batch.get("mask"))
    raise TypeError(f"cannot read a poise Batch from a {type(batch).__name__} batch; valid: Batch, (x, y), "
                    f"(x, y, mask), {{'x': ..., 'y': ...}}; or pass batch_fn=<your batch -> Batch>")


def _has_loss_terms(strategy: Strategy | None) -> bool:
    if strategy is None:
        return False
    children = getattr(strategy, "strategies", None)
    if children is not None:
        return any(_has_loss_terms(s) for s in children)
    return type(strategy).loss_terms is not Strategy.loss_terms


def _f(t: Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, Tensor) else float(t)


class ContinualCallback(pl.Callback):
    """Continual evaluation and a poise strategy in Lightning (see the module docstring).

    Args:
        evaluator: a :class:`~poise.measure.evaluator.ContinualEvaluator` (None: only the strategy).
        strategy: a :class:`~poise.continual.Strategy` (None: only the evaluation).
        batch_fn: the training batch -> :class:`~poise.continual.Batch` (default :func:`to_batch`).
        sink: called with each record, as ``fit_stream``'s ``log=`` (e.g. tracker sinks); named
            ``sink`` because Lightning overwrites every callback's ``log`` attribute.
        log_to_loggers: also write each record to the trainer's loggers at ``cb.step``.
    """

    def __init__(self, evaluator: ContinualEvaluator | None = None, strategy: Strategy | None = None, *,
                 batch_fn: Callable[[Any], Batch] | None = None,
                 sink: Callable[[Record], None] | None = None, log_to_loggers: bool = True):
        super().__init__()
        self.evaluator = evaluator
        self.strategy = strategy
        self.batch_fn = batch_fn or to_batch
        self.sink = sink
        self.log_to_loggers = log_to_loggers
        self.step = 0
        self.records: list[Record] = []
        self.tasks_done: list[Any] = []
        self.task: Any = None  # the task in progress (begun, not ended)
        self._pending: tuple[Any, Batch | None] | None = None
        self._data: Batch | None = None
        self._batch: Batch | None = None
        self._before: dict[str, Tensor] = {}
        self._grad_metrics: dict[str, Tensor] = {}
        self._terms: dict[str, Tensor] = {}
        self._loss_called = False
        self._stepped = False
        self._step_in_fit = 0

    # -- the user's calls ---------------------------------------------------------------
    def start_task(self, task_id: Any, data: Batch | tuple[Tensor, ...] | None = None) -> None:
        """Announce the task the next ``trainer.fit`` trains on; ``data`` (its training set, a
        ``Batch`` or ``(x, y[, mask])``) is what the strategy's ``before_task``/``after_task``
        see (required with a strategy). Call it again with the same task before a
        ``fit(..., ckpt_path=...)`` that resumes that task."""
        if data is None and self.strategy is not None:
            raise ValueError(f"start_task({task_id!r}): the strategy {self.strategy.name!r} needs the task's data "
                             f"(a Batch or (x, y)) for before_task/after_task")
        if task_id in self.tasks_done:
            raise ValueError(f"start_task({task_id!r}): that task is already done; done: {self.tasks_done}")
        self._pending = (task_id, None if data is None else to_batch(data))

    def loss(self, model: nn.Module, batch: Any, logits: Tensor, task_loss: Tensor) -> Tensor:
        """``task_loss + sum(strategy.loss_terms(model, batch, logits))``: return this from
        ``training_step`` (the terms are logged as ``loss/<name>``)."""
        self._loss_called = True
        if self.strategy is None:
            self._terms = {}
            return task_loss
        self._terms = self.strategy.loss_terms(model, self.batch_fn(batch), logits)
        return task_loss + sum(self._terms.values(), torch.zeros((), device=task_loss.device))

    def metrics(self) -> dict[str, Any]:
        """``evaluator.metrics()`` (the continual metrics so far)."""
        if self.evaluator is None:
            raise RuntimeError("metrics(): this callback has no evaluator")
        return self.evaluator.metrics()

    # -- Lightning hooks ----------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step_in_fit = 0
        if self._pending is None:
            if self.task is None:
                raise RuntimeError("ContinualCallback: call cb.start_task(task_id, data) before trainer.fit")
            return  # a fit that continues the task in progress (e.g. resumed without start_task)
        tid, data = self._pending
        self._pending = None
        if self.task is not None:
            if tid != self.task:
                raise ValueError(f"start_task({tid!r}) but the restored checkpoint is inside task {self.task!r}: "
                                 f"resume that task first")
            if data is not None:
                self._data = data
            return  # resumed inside this task: before_task/begin_task already ran
        self.task, self._data = tid, data
        if self.strategy is not None:
            self.strategy.before_task(pl_module, data)  # type: ignore[arg-type]
        if self.evaluator is not None:
            self.evaluator.begin_task(tid)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = self.batch_fn(batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True
        if self.strategy is None:
            return
        self._grad_metrics = self.strategy.transform_grads(pl_module)
        self._before = ({n: p.detach().clone() for n, p in pl_module.named_parameters()}
                        if self.strategy.needs_update_snapshot else {})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:  # gradient accumulation: no optimizer step in this batch
            return
        self._stepped = False
        if _has_loss_terms(self.strategy) and not self._loss_called:
            raise RuntimeError(f"strategy {self.strategy.name!r} adds loss terms: return "  # type: ignore[union-attr]
                               f"cb.loss(self, batch, logits, task_loss) from training_step")
        self._loss_called = False
        smetrics: dict[str, Tensor] = {}
        if self.strategy is not None:
            if self._before:
                self.strategy.transform_update(pl_module, self._before)
                self._before = {}
            smetrics = self.strategy.after_step(pl_module, self._batch)  # type: ignore[arg-type]
        accs = None
        if self.evaluator is not None:
            n = None if self._batch is None else len(self._batch)
            accs = self.evaluator.maybe_eval(self._eval_model(pl_module), n_samples=n)
        self.step += 1
        self._step_in_fit += 1
        rec: Record = {"step": self.step, "task": self.task}
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor | float):
            rec["loss"] = _f(loss)
        rec.update({f"loss/{k}": _f(v) for k, v in self._terms.items()})
        rec.update({f"grad/{k}": _f(v) for k, v in self._grad_metrics.items()})
        rec.update({f"step/{k}": _f(v) for k, v in smetrics.items()})
        if accs is not None:
            rec.update({f"{self._metric}/{t}": a for t, a in accs.items()})
        self._terms, self._grad_metrics = {}, {}
        self._emit(trainer, rec)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.task is None:
            return
        if self.strategy is not None:
            self.strategy.after_task(pl_module, self._data)  # type: ignore[arg-type]
        rec: Record = {"step": self.step, "task": self.task, "boundary": True}
        if self.evaluator is not None:
            # after_task may have changed the evaluated model (merging, recalibration): evaluate afresh then
            fresh = self.strategy is not None and overrides(self.strategy, "after_task")
            accs = self.evaluator.end_task(self._eval_model(pl_module), reuse=not fresh)
            rec.update({f"{self._metric}/{t}": a for t, a in accs.items()})
        self.tasks_done.append(self.task)
        self.task, self._data = None, None
        self._emit(trainer, rec)

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning into every checkpoint (``checkpoint["callbacks"][state_key]``):
        tensors and Python values only (loadable with ``weights_only=True``)."""
        return clone_tree({
            "version": STATE_VERSION, "step": self.step, "task": self.task, "tasks_done": list(self.tasks_done),
            "records": list(self.records),
            "strategy": None if self.strategy is None else self.strategy.state_dict(),
            "evaluator": None if self.evaluator is None else self.evaluator.state_dict(),
        })

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"ContinualCallback state version {state_dict.get('version')!r}; valid choices: "
                             f"{STATE_VERSION}")
        for key, obj in (("strategy", self.strategy), ("evaluator", self.evaluator)):
            if (state_dict[key] is None) != (obj is None):
                raise ValueError(f"the checkpoint was saved {'without' if state_dict[key] is None else 'with'} a "
                                 f"{key}, this callback has {'none' if obj is None else 'one'}")
        if self.strategy is not None:
            self.strategy.load_state_dict(state_dict["strategy"])
        if self.evaluator is not None:
            self.evaluator.load_state_dict(state_dict["evaluator"])
        self.step = int(state_dict["step"])
        self.task = state_dict["task"]
        self.tasks_done = list(state_dict["tasks_done"])
        self.records = [dict(r) for r in state_dict["records"]]

    # -- internals ----------------------------------------------------------------------
    @property
    def _metric(self) -> str:
        return getattr(self.evaluator, "metric", "acc")

    def _eval_model(self, model: nn.Module) -> nn.Module:
        return model if self.strategy is None else self.strategy.eval_model(model)

    def _emit(self, trainer: pl.Trainer, rec: Record) -> None:
        self.records.append(rec)
        if not trainer.is_global_zero:
            return
        if self.sink is not None:
            self.sink(rec)
        if self.log_to_loggers and trainer.loggers:
            step, values = scalars(rec)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

"""Hugging Face ``Trainer`` pack: continual evaluation, optimizer diagnostics and continual-learning
strategies inside ``Trainer``, logged through the Trainer to every tracker it reports to.

>>> from poise.continual import Replay
>>> from poise.integrations.hf import PoiseTrainer, causal_lm_loss
>>> from poise.measure import ContinualEvaluator, EvalSchedule, LMEvalSet
>>> ev = ContinualEvaluator({t: LMEvalSet.from_pairs(p, r) for t, (p, r) in heldout.items()},
...                         schedule=EvalSchedule(dense_steps=10, every=5))
>>> trainer = PoiseTrainer(model=model, args=args, strategy=Replay(mem_size=256, loss_fn=causal_lm_loss),
...                        evaluator=ev, optimizer_cls_and_kwargs=(StableSPAM, {"lr": 1e-3, "diagnostics": True}))
>>> for task_id, dataset in tasks.items():
...     trainer.train_task(task_id, dataset)       # before_task, train(), after_task, boundary evaluation
>>> ev.metrics("loss")                            # forgetting, stability gap, ... on the held-out loss

The pieces also work alone with a plain ``Trainer``:

* :class:`ContinualEvalCallback` runs a :class:`~poise.measure.ContinualEvaluator`: one task per
  ``train()`` call, ``maybe_eval`` after every optimizer step (dense right after each task switch,
  as its schedule says), the boundary evaluation at the end of the call. It logs every metric of
  every evaluation through ``trainer.log`` at the evaluator's own global step, which runs on across
  ``train()`` calls (the Trainer's restarts at 0 for each task): while it logs,
  ``trainer.state.global_step`` reads that step, so TensorBoard, W&B, MLflow, trackio and every
  other ``report_to`` integration put the point on one continuous axis (the value is also logged as
  ``cl/step``); the Trainer's step is restored right after. ``logging_steps`` does not thin it out.
* :class:`OptimizerDiagnosticsCallback` logs a poise optimizer's ``last_diagnostics`` (update ratio,
  clipped fraction, spike tensors, moment resets, projection refreshes) and running totals of the
  spikes and resets, on the same continuous step.
* :class:`PoiseTrainerMixin` (``class MyTrainer(PoiseTrainerMixin, SFTTrainer)``; :class:`PoiseTrainer`
  is it mixed into ``Trainer``) runs a :class:`poise.continual.Strategy`'s hooks in the order of
  :func:`poise.continual.fit_stream`: ``loss_terms`` added to the Trainer's loss (scaled for gradient
  accumulation as the Trainer scales its own), ``transform_grads`` after the gradients are
  accumulated (and clipped, if ``max_grad_norm > 0``) and before ``optimizer.step()``,
  ``transform_update`` and ``after_step`` (with the whole accumulated batch) right after it, and
  ``before_task`` / ``after_task`` around each ``train()`` call.
* :func:`low_rank_groups` (:func:`poise.optim.low_rank_groups`) builds GaLore's param groups for
  ``optimizer_cls_and_kwargs=(GaLoreAdamW, {"params": low_rank_groups(model, rank=8), "lr": 1e-3})``.

Batches reach a strategy as :class:`poise.continual.Batch` ``(input_ids, labels)`` (labels ``-100``
where not trained on; without ``labels``, the input ids where the attention mask is 1) by
:func:`hf_batch`; give strategies that compute a loss ``loss_fn=causal_lm_loss``. A replay buffer
stores fixed-size rows: pad every example to one length (``padding="max_length"``) or pass
``pad_to=`` to the mixin. Needs ``transformers`` (``pip install 'poise[hf]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of
from poise.continual._base import Batch, Strategy, overrides
from poise.measure.evaluator import ContinualEvaluator
from poise.measure.lm import IGNORE_INDEX
from poise.optim import low_rank_groups

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("poise.integrations.hf needs transformers: pip install 'poise[hf]'") from e

__all__ = ["ContinualEvalCallback", "OptimizerDiagnosticsCallback", "PoiseTrainer", "PoiseTrainerMixin",
           "causal_lm_loss", "hf_batch", "log_at", "low_rank_groups"]


# -- batches and losses ------------------------------------------------------------------------
def hf_batch(inputs: Mapping[str, Any]) -> Batch:
    """A Trainer batch (``input_ids``, optional ``labels`` and ``attention_mask``) as a
    :class:`~poise.continual.Batch` ``(input_ids, labels)``; without labels, the input ids where the
    attention mask is 1 and ``-100`` elsewhere (a causal LM's own targets)."""
    if "input_ids" not in inputs:
        raise ValueError(f"the batch has no 'input_ids' (keys: {', '.join(inputs)}): pass batch_fn= to turn it "
                         "into a poise Batch")
    x = inputs["input_ids"]
    y = inputs.get("labels")
    if y is None:
        am = inputs.get("attention_mask")
        y = x if am is None else x.masked_fill(am == 0, IGNORE_INDEX)
    if y.shape != x.shape:
        raise ValueError(f"labels have shape {tuple(y.shape)}, input_ids {tuple(x.shape)}: a causal LM batch "
                         "needs one label per token")
    return Batch(x.detach(), y.detach())


def causal_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy of ``model(batch.x)`` over the labels ``batch.y`` that are not
    ``-100`` (``y[:, t]`` predicted from the logits at ``t - 1``), the Hugging Face causal-LM loss;
    the ``loss_fn`` for strategies (replay, EWC, ...) on a causal LM."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = batch.x.device
    x, y = batch.x.to(device), batch.y.to(device)
    logits = logits_of(model(x))
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)} for input_ids {tuple(x.shape)}: causal_lm_loss "
                         "needs a causal LM's [batch, seq, vocab]")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def _pad_cat(batches: list[Batch], pad_to: int | None = None) -> Batch:
    """Concatenate token batches, right-padding ``x`` with 0 and ``y`` with -100 to one length."""
    T = max(b.x.shape[1] for b in batches) if pad_to is None else pad_to
    xs, ys = [], []
    for b in batches:
        n = b.x.shape[1]
        if n > T:
            raise ValueError(f"a batch has {n} tokens per row, more than pad_to={T}")
        xs.append(F.pad(b.x, (0, T - n), value=0))
        ys.append(F.pad(b.y, (0, T - n), value=IGNORE_INDEX))
    return Batch(torch.cat(xs), torch.cat(ys))


# -- logging through the Trainer ---------------------------------------------------------------------
def log_at(trainer: Any, logs: Mapping[str, float], step: int) -> None:
    """``trainer.log(logs)`` with ``trainer.state.global_step`` reading ``step`` during the call, so
    every reporting integration (TensorBoard, W&B, MLflow, trackio, ...) puts the values at ``step``;
    the Trainer's own step is restored afterwards, and so is a pending ``control.should_log`` (the
    Trainer's handler clears it on every log, which would drop the Trainer's own training log of
    this step)."""
    state = trainer.state
    saved = state.global_step
    pending = bool(getattr(getattr(trainer, "control", None), "should_log", False))
    state.global_step = int(step)
    try:
        trainer.log(dict(logs))
    finally:
        state.global_step = saved
        if pending:
            trainer.control.should_log = True


def _need_trainer(cb: Any) -> Any:
    if cb.trainer is None:
        raise RuntimeError(f"{type(cb).__name__} logs through the Trainer and has none: build it with trainer=... "
                           f"(trainer.add_callback({type(cb).__name__}(..., trainer=trainer))), or use PoiseTrainer")
    return cb.trainer


class ContinualEvalCallback(TrainerCallback):
    """Continual evaluation inside ``Trainer`` (see the module docstring).

    Args:
        evaluator: the :class:`~poise.measure.ContinualEvaluator` (its schedule decides when
            evaluations run, dense right after each task switch).
        trainer: the Trainer to log through (``trainer.log``); :class:`PoiseTrainer` binds itself.
        task_order: the task of each successive ``train()`` call (default: ``evaluator.task_ids``);
            :meth:`next_task` (or ``PoiseTrainer.train_task``) names the next one explicitly.
        prefix: the logged keys are ``{prefix}/{metric}/{task}`` for every metric of every
            evaluation, ``{prefix}/step``, ``{prefix}/boundary`` (1 on a task's boundary evaluation),
            and after each task ``{prefix}/summary/{metric}/{name}`` for the continual metrics so far
            (``acc``, ``forgetting``, ``min_acc``, ``wc_acc``, ``gap_depth``, ...; those still NaN,
            such as the gap before a second task, are left out).
        eval_model: maps the trained model to the one evaluated (a strategy's ``eval_model``: EMA).
        fresh_boundary: evaluate every task boundary afresh even when the last step's scheduled
            evaluation covered it (set when a strategy's ``after_task`` may change the model, as
            merging and prototype recalibration do; :class:`PoiseTrainer` sets it then).
    """

    def __init__(self, evaluator: ContinualEvaluator, trainer: Any = None, *, task_order: list[Any] | None = None,
                 prefix: str = "cl", eval_model: Callable[[nn.Module], nn.Module] | None = None,
                 fresh_boundary: bool = False):
        if not isinstance(evaluator, ContinualEvaluator):
            raise TypeError(f"evaluator must be a poise.measure.ContinualEvaluator, got {type(evaluator).__name__}")
        order = list(evaluator.task_ids if task_order is None else task_order)
        unknown = [t for t in order if t not in evaluator.sets]
        if unknown:
            raise ValueError(f"task_order has tasks without an evaluation set: {unknown}; evaluator tasks: "
                             f"{evaluator.task_ids}")
        self.evaluator, self.trainer, self.prefix = evaluator, trainer, prefix
        self.task_order = order
        self.eval_model = eval_model or (lambda m: m)
        self.fresh_boundary = fresh_boundary
        self._next: Any = None
        self._calls = 0

    def next_task(self, task_id: Any) -> None:
        """The task of the next ``train()`` call (instead of the next one in ``task_order``)."""
        if task_id not in self.evaluator.sets:
            raise KeyError(f"unknown task {task_id!r}; tasks with eval sets: {self.evaluator.task_ids}")
        self._next = task_id

    def _log(self, boundary: bool) -> None:
        ev = self.evaluator
        logs = {f"{self.prefix}/{m}/{t}": v for m, per in ev.last_scores().items() for t, v in per.items()}
        logs[f"{self.prefix}/step"] = float(ev.step)
        logs[f"{self.prefix}/boundary"] = float(boundary)
        log_at(_need_trainer(self), logs, ev.step)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _need_trainer(self)
        if self._next is not None:
            task = self._next
        else:
            if self._calls >= len(self.task_order):
                raise RuntimeError(f"train() call {self._calls + 1} but task_order has {len(self.task_order)} tasks "
                                   f"({self.task_order}): name the task with next_task(...)")
            task = self.task_order[self._calls]
        self._next = None
        self._calls += 1
        self.evaluator.begin_task(task)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        n = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        if self.evaluator.maybe_eval(self.eval_model(model), n_samples=n) is not None:  # type: ignore[arg-type]
            self._log(boundary=False)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        ev = self.evaluator
        before = len(ev.records)
        ev.end_task(self.eval_model(model), reuse=not self.fresh_boundary)  # type: ignore[arg-type]
        if len(ev.records) > before:
            self._log(boundary=True)
        summary: dict[str, float] = {}
        for m in ev.metric_names:
            for k, v in ev.metrics(m).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    summary[f"{self.prefix}/summary/{m}/{k}"] = float(v)  # NaN (no gap yet, ...) left out
        log_at(_need_trainer(self), summary, ev.step)


def _poise_optimizer(opt: Any) -> Any:
    seen = 0
    while not hasattr(opt, "last_diagnostics") and hasattr(opt, "optimizer") and seen < 5:  # accelerate's wrapper
        opt, seen = opt.optimizer, seen + 1
    return opt


class OptimizerDiagnosticsCallback(TrainerCallback):
    """Log a poise optimizer's ``last_diagnostics`` through the Trainer (see the module docstring).

    The optimizer must be a poise optimizer built with ``diagnostics=True`` (e.g.
    ``optimizer_cls_and_kwargs=(StableSPAM, {"lr": 1e-3, "diagnostics": True})``); anything else
    raises at the start of training. Every ``every`` optimizer steps (None: ``args.logging_steps``)
    it logs ``{prefix}/update_ratio``, ``clipped_frac``, ``spike_tensors``, ``resets``, ``refreshes``
    (those the optimizer reports) of that step, and ``{prefix}/spikes_total`` / ``resets_total``
    summed over every step since the start (on device between logs: no host sync per step), at its
    own optimizer-step count, which runs on across ``train()`` calls.
    """

    def __init__(self, trainer: Any = None, *, every: int | None = None, prefix: str = "opt"):
        if every is not None and every < 1:
            raise ValueError(f"every={every} must be >= 1 or None")
        self.trainer, self.every, self.prefix = trainer, every, prefix
        self.step = 0
        self.totals: dict[str, Tensor] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        _need_trainer(self)
        opt = _poise_optimizer(optimizer)
        if not hasattr(opt, "last_diagnostics"):
            raise TypeError(f"OptimizerDiagnosticsCallback needs a poise optimizer (with last_diagnostics), got "
                            f"{type(opt).__name__}: optimizer_cls_and_kwargs=(poise.optim.AdamW, "
                            "{'lr': ..., 'diagnostics': True})")
        if not getattr(opt, "diagnostics", False):
            raise ValueError(f"{type(opt).__name__} was built with diagnostics=False: pass 'diagnostics': True in "
                             "its keyword arguments")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        d = _poise_optimizer(optimizer).last_diagnostics
        self.step += 1
        for key, total in (("spike_tensors", "spikes_total"), ("resets", "resets_total")):
            if key in d:
                self.totals[total] = self.totals.get(total, torch.zeros((), device=d[key].device)) + d[key].detach()
        every = self.every or max(1, int(args.logging_steps if args.logging_steps >= 1 else 1))
        if self.step % every == 0 and d:
            logs = {f"{self.prefix}/{k}": float(v) for k, v in d.items()}
            logs.update({f"{self.prefix}/{k}": float(v) for k, v in self.totals.items()})
            log_at(_need_trainer(self), logs, self.step)


# -- strategies inside Trainer ---------------------------------------------------------------------------
class _StrategyHooks(TrainerCallback):
    """The optimizer-step and task hooks of the mixin's strategy (loss terms are in compute_loss)."""

    def __init__(self, trainer: PoiseTrainerMixin):
        self.trainer = trainer
        self._before: dict[str, Tensor] = {}
        self._data: Batch | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        tr = self.trainer
        tr._poise_micro.clear()
        self._data = tr._poise_task_data()
        tr.strategy.before_task(model, self._data)  # type: ignore[union-attr, arg-type]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              **kwargs: Any) -> None:
        s = self.trainer.strategy
        g = s.transform_grads(model)  # type: ignore[union-attr, arg-type]
        self.trainer._poise_metrics.update({f"grad/{k}": v for k, v in g.items()})
        self._before = ({n: p.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
                        if s.needs_update_snapshot else {})  # type: ignore[union-attr]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                          **kwargs: Any) -> None:
        tr = self.trainer
        if self._before:
            tr.strategy.transform_update(model, self._before)  # type: ignore[union-attr, arg-type]
            self._before = {}
        if tr._poise_micro:
            batch = _pad_cat(tr._poise_micro, tr.poise_pad_to)
            tr._poise_micro.clear()
            m = tr.strategy.after_step(model, batch)  # type: ignore[union-attr, arg-type]
            tr._poise_metrics.update({f"step/{k}": v for k, v in m.items()})

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        self.trainer.strategy.after_task(model, self._data)  # type: ignore[union-attr, arg-type]
        self._data = None


def _empty_batch() -> Batch:
    return Batch(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long))


class PoiseTrainerMixin:
    """Mix into a ``transformers.Trainer`` (subclass first): runs a poise strategy's hooks, and
    optionally continual evaluation and optimizer diagnostics, inside the Trainer's own loop.

    Keyword arguments (the rest go to the Trainer):
        strategy: a :class:`poise.continual.Strategy` (or ``Compose``); None: plain training.
        evaluator: a :class:`~poise.measure.ContinualEvaluator`: adds a :class:`ContinualEvalCallback`
            bound to this trainer (evaluating ``strategy.eval_model(model)``), as
            ``self.continual_eval``.
        diagnostics: add an :class:`OptimizerDiagnosticsCallback` (``self.optimizer_diagnostics``).
        batch_fn: Trainer inputs -> :class:`~poise.continual.Batch` (default :func:`hf_batch`).
        pad_to: right-pad every batch a strategy sees to this many tokens (a replay buffer needs one
            row length); None: as collated.

    Call :meth:`train_task` once per task (or ``train()``, the task then being the next one in the
    evaluator's order). Strategy metrics (``loss/...``, ``grad/...``, ``step/...``, the latest step's)
    join the Trainer's own training logs as ``strategy/...``.
    """

    def __init__(self, *args: Any, strategy: Strategy | None = None, evaluator: ContinualEvaluator | None = None,
                 diagnostics: bool = False, batch_fn: Callable[[Mapping[str, Any]], Batch] = hf_batch,
                 pad_to: int | None = None, **kwargs: Any):
        if strategy is not None and not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a poise.continual.Strategy, got {type(strategy).__name__}")
        super().__init__(*args, **kwargs)
        self.strategy = strategy
        self.poise_batch_fn = batch_fn
        self.poise_pad_to = pad_to
        self._poise_micro: list[Batch] = []
        self._poise_metrics: dict[str, Tensor] = {}
        self._poise_task_batch: Batch | None = None
        self.continual_eval: ContinualEvalCallback | None = None
        self.optimizer_diagnostics: OptimizerDiagnosticsCallback | None = None
        handler = self.callback_handler  # type: ignore[attr-defined]
        if strategy is not None:
            # first: after_task runs before the evaluator's boundary evaluation, as in fit_stream
            handler.callbacks.insert(0, _StrategyHooks(self))
        if evaluator is not None:
            self.continual_eval = ContinualEvalCallback(
                evaluator, self, eval_model=strategy.eval_model if strategy is not None else None,
                fresh_boundary=strategy is not None and overrides(strategy, "after_task"))
            handler.add_callback(self.continual_eval)
        if diagnostics:
            self.optimizer_diagnostics = OptimizerDiagnosticsCallback(self)
            handler.add_callback(self.optimizer_diagnostics)

    def train_task(self, task_id: Any, train_dataset: Any = None, *, task_data: Batch | None = None,
                   **train_kwargs: Any) -> Any:
        """Train on one task: ``train_dataset`` (None: the current one) becomes the training set, the
        strategy's ``before_task``/``after_task`` get ``task_data`` (None: the whole dataset through
        the data collator, built only when the strategy uses it), the evaluator evaluates it as
        ``task_id``. Returns ``train()``'s output."""
        if train_dataset is not None:
            self.train_dataset = train_dataset
        if self.continual_eval is not None:
            self.continual_eval.next_task(task_id)
        self._poise_task_batch = task_data
        try:
            return self.train(**train_kwargs)  # type: ignore[attr-defined]
        finally:
            self._poise_task_batch = None

    def _poise_task_data(self) -> Batch:
        if self._poise_task_batch is not None:
            return self._poise_task_batch
        s = self.strategy
        if s is None or not (overrides(s, "before_task") or overrides(s, "after_task")):
            return _empty_batch()
        ds = self.train_dataset  # type: ignore[attr-defined]
        if ds is None or not hasattr(ds, "__len__"):
            raise ValueError(f"strategy {s.name!r} uses the task's data in before_task/after_task and the training "
                             "set has no length: pass train_task(..., task_data=Batch(input_ids, labels))")
        remove = getattr(self, "_remove_unused_columns", None)
        if remove is not None and type(ds).__module__.startswith("datasets"):
            ds = remove(ds, description="poise task data")
        rows = [ds[i] for i in range(len(ds))]
        return self.poise_batch_fn(self.data_collator(rows))  # type: ignore[attr-defined]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.strategy is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                        num_items_in_batch=num_items_in_batch)
        batch = self.poise_batch_fn(inputs)  # before the Trainer may pop the labels
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,  # type: ignore[misc]
                                             num_items_in_batch=num_items_in_batch)
        terms = self.strategy.loss_terms(model, batch, logits_of(outputs))
        self._poise_micro.append(batch if self.poise_pad_to is None else _pad_cat([batch], self.poise_pad_to))
        if terms:
            total = sum(terms.values(), torch.zeros((), device=loss.device))
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or \
                    getattr(self, "compute_loss_func", None) is not None
            if scaled:  # the Trainer will not divide this loss by the accumulation steps: do it for the terms
                total = total / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + total
            self._poise_metrics.update({f"loss/{k}": v.detach() for k, v in terms.items()})
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._poise_metrics:  # the Trainer's own training log: add the strategy's
            logs.update({f"strategy/{k}": float(v) for k, v in self._poise_metrics.items()})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class PoiseTrainer(PoiseTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`PoiseTrainerMixin`."""

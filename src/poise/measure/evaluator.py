"""Continual evaluation around any PyTorch training loop.

>>> ev = ContinualEvaluator({0: (x0, y0), 1: (x1, y1)}, schedule=EvalSchedule(dense_steps=50, every=10))
>>> for task in (0, 1):
...     ev.begin_task(task)
...     for x, y in loader(task):
...         loss(model(x), y).backward(); opt.step(); opt.zero_grad()
...         ev.maybe_eval(model, n_samples=len(x))   # a no-op unless due and within budget
...     ev.end_task(model)                           # the boundary evaluation always runs
>>> ev.metrics()["min_acc"]

Evaluation never disturbs training: it runs under ``torch.no_grad``, puts the model in
``eval()`` mode and restores every module's ``training`` flag afterwards, forks the global
torch RNG (so dropout or sampling inside ``predict`` leaves the training stream
unchanged), draws its subsets from its own seeded generator, and never sees the optimizer.

Language models: give :class:`~poise.measure.lm.LMEvalSet` sets (token ids, attention mask,
labels with ``-100`` outside the response) instead of ``(x, y)`` pairs; every evaluation then
records the token accuracy, the loss and the perplexity of each task (token averages, the loss
on the response only), and :meth:`ContinualEvaluator.metrics` computes the continual metrics
on any of them (``metrics("loss")``), lower-is-better ones included.

Nothing non-finite is scored as a number: an empty evaluation set is refused at construction
(``ValueError`` naming the task); a model whose logits are NaN or ``+inf`` (or all ``-inf``) on a
task's samples gets NaN for that task (never the argmax of NaN logits), the evaluation is counted in
:attr:`ContinualEvaluator.nonfinite_evals`, and :meth:`ContinualEvaluator.metrics` then reports every
aggregate as NaN with ``nonfinite_evals``, ``nonfinite_tasks`` and ``first_nonfinite_step``.

Its cost is bounded three ways: each task is evaluated on a fixed seeded subset of at
most ``subset_size`` samples; the :class:`EvalSchedule` evaluates densely right after a
task boundary (where the stability gap lives) and sparsely after; and ``budget`` caps the
scheduled evaluation samples at ``budget`` times the training samples seen (boundary
evaluations always run and are counted too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poise._nn import logits_of, scorable
from poise.distributed import rank_world
from poise.measure import metrics as M
from poise.measure.lm import LM_METRICS, LMEvalSet, _as_logits, lm_logits, lm_sums, lm_values

__all__ = ["ContinualEvaluator", "EvalSchedule", "EvalSet", "LMEvalSet", "logits_of"]  # logits_of: poise._nn


@dataclass(frozen=True)
class EvalSchedule:
    """When :meth:`ContinualEvaluator.maybe_eval` evaluates, counted in steps into a task.

    Every step for the first ``dense_steps`` steps of each task, then every ``every`` steps.
    ``EvalSchedule(dense_steps=0, every=1)`` is per-iteration evaluation.
    """

    dense_steps: int = 50
    every: int = 10

    def __post_init__(self) -> None:
        if self.dense_steps < 0:
            raise ValueError(f"dense_steps={self.dense_steps} must be >= 0")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")

    def due(self, step_in_task: int) -> bool:
        return step_in_task <= self.dense_steps or step_in_task % self.every == 0


@dataclass
class EvalSet:
    """One task's evaluation data. ``classes`` restricts the prediction to those output units
    (task-incremental evaluation with a shared head); None means all of them. Any sequence of ints
    or a 1-D tensor: :class:`ContinualEvaluator` keeps it as a list of ints and refuses an empty one."""

    x: Tensor
    y: Tensor
    classes: Sequence[int] | None = None

    def __len__(self) -> int:
        return len(self.y)


def _checked_predict(model: nn.Module, x: Tensor, classes: Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """The default prediction (argmax of the logits, restricted to ``classes``) and, per sample, whether
    its scored logits (those of ``classes``, or all) are scorable (:func:`scorable`)."""
    logits = logits_of(model(x))
    if classes is None:
        return logits.argmax(-1), scorable(logits)
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[list(classes)] = True
    ok = scorable(logits, keep)
    return torch.where(keep, logits, float("-inf")).argmax(-1), ok  # a NaN outside ``classes`` cannot win


def _default_predict(model: nn.Module, x: Tensor, classes: Sequence[int] | None) -> Tensor:
    return _checked_predict(model, x, classes)[0]


@dataclass
class _Record:
    step: int
    task: Any
    acc: dict[Any, float] = field(default_factory=dict)  # the evaluator's primary metric
    extra: dict[str, dict[Any, float]] = field(default_factory=dict)  # its other metrics (LM sets)
    nonfinite: list[Any] = field(default_factory=list)  # tasks whose model output was not finite (scored NaN)


class ContinualEvaluator:
    """Evaluate every seen task during training and compute the continual metrics.

    Args:
        eval_sets: task id -> :class:`EvalSet` or ``(x, y)`` (classification: the metric is
            ``"acc"``), or task id -> :class:`~poise.measure.lm.LMEvalSet` (causal LM: the metrics
            are ``"token_acc"``, ``"loss"`` and ``"ppl"``, all recorded at every evaluation); the
            columns of every curve follow this order. The two kinds cannot be mixed.
        schedule: when scheduled evaluations happen (:class:`EvalSchedule`).
        subset_size: evaluate each task on a fixed seeded subset of this many samples
            (None: all of them).
        seed: seeds the subset choice; the evaluator has its own generator.
        budget: scheduled evaluation samples <= ``budget`` x training samples seen
            (None: no cap). Needs ``n_samples`` in :meth:`maybe_eval`.
        batch_size: evaluation forward-pass batch size.
        batched: with the default prediction and one process, score every task from one pass over
            their concatenated inputs (cached) instead of task by task: the same numbers, less
            per-task overhead (in the default study: evaluation 0.7x the time). False: task by task.
        predict: for :class:`EvalSet`: ``predict(model, x, classes) -> labels``; default: argmax
            of the logits, restricted to ``classes``. For :class:`~poise.measure.lm.LMEvalSet`:
            ``predict(model, input_ids, attention_mask) -> logits [B, T, vocab]`` (or an output
            with ``.logits``); default: :func:`~poise.measure.lm.lm_logits` (any Hugging Face
            causal LM).
        metric: the primary metric: what :meth:`maybe_eval`, :meth:`end_task`, :meth:`evaluate`
            return and :meth:`curves`, :meth:`boundary_matrix`, :meth:`metrics` use by default.
            ``"acc"`` for classification sets; for LM sets one of ``"token_acc"`` (default),
            ``"loss"``, ``"ppl"``.
        include_unseen: also evaluate tasks whose training has not begun.
        shard: under ``torch.distributed`` (e.g. ``torchrun``), each rank evaluates every
            ``world_size``-th sample and the correct counts are summed across ranks (all
            ranks must call the evaluator together, as the DDP training loop does); the
            accuracies equal one process's. ``"auto"`` (default) shards when a process group
            with more than one rank is initialised; False never does.
        windows: the ``w`` of the windowed forgetting/plasticity metrics reported.
        gap_eps: tolerance for the stability gap's recovery time.

    Non-finite evaluation: an empty evaluation set raises ``ValueError`` naming its task. When the
    logits scored on a task contain NaN or ``+inf`` (or a sample's are all ``-inf``), that task's
    value is NaN (an LM set: all three metrics), the (evaluation, task) pair is counted in
    :attr:`nonfinite_evals` and listed in the record, and :meth:`metrics` reports every aggregate as
    NaN. With the default ``predict`` this is checked on the logits; a custom classification
    ``predict`` returns labels, so only a floating prediction that is NaN/inf is caught.
    """

    def __init__(
        self,
        eval_sets: Mapping[Any, EvalSet | tuple[Tensor, Tensor]],
        *,
        schedule: EvalSchedule | None = None,
        subset_size: int | None = None,
        seed: int = 0,
        budget: float | None = None,
        batch_size: int = 1024,
        predict: Callable[[nn.Module, Tensor, Sequence[int] | None], Tensor] | None = None,
        include_unseen: bool = False,
        windows: Sequence[int] = (10,),
        gap_eps: float = 0.02,
        shard: bool | str = "auto",
        metric: str | None = None,
        batched: bool = True,
    ) -> None:
        if not eval_sets:
            raise ValueError("eval_sets is empty: give at least one task's (x, y)")
        lm = [isinstance(s, LMEvalSet) for s in eval_sets.values()]
        if any(lm) and not all(lm):
            raise ValueError("eval_sets mixes LMEvalSet and classification (x, y) sets: use one kind; tasks with an "
                             f"LMEvalSet: {[t for t, f in zip(eval_sets, lm, strict=True) if f]}")
        self.lm = all(lm)
        self.metric_names: tuple[str, ...] = LM_METRICS if self.lm else ("acc",)
        self.metric = metric if metric is not None else self.metric_names[0]
        if self.metric not in self.metric_names:
            raise ValueError(f"metric={metric!r}; valid choices for {'LMEvalSet' if self.lm else 'EvalSet'} "
                             f"sets: {', '.join(self.metric_names)}")
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"subset_size={subset_size} must be >= 1 or None")
        if budget is not None and budget <= 0:
            raise ValueError(f"budget={budget} must be > 0 or None")
        self.schedule = schedule or EvalSchedule()
        self.budget = budget
        self.batch_size = batch_size
        self.batched = batched
        self._cat_key: Any = None
        self._cat: Any = None
        self.predict = predict or (lm_logits if self.lm else _default_predict)
        self.include_unseen = include_unseen
        self.windows = tuple(windows)
        self.gap_eps = gap_eps
        if shard not in ("auto", True, False):
            raise ValueError(f"shard={shard!r}; valid choices: 'auto', True, False")
        self.shard = shard
        rng = np.random.default_rng(seed)
        self.sets: dict[Any, EvalSet | LMEvalSet] = {}
        for tid, s in eval_sets.items():
            if isinstance(s, LMEvalSet):
                if len(s) == 0:
                    raise ValueError(f"task {tid!r}: the LMEvalSet is empty (0 sequences): give every task at least "
                                     "one sequence with a scored token")
                if subset_size is not None and len(s) > subset_size:
                    s = s.index(torch.as_tensor(np.sort(rng.choice(len(s), subset_size, replace=False))))
                self.sets[tid] = s
                continue
            s = s if isinstance(s, EvalSet) else EvalSet(*s)
            if len(s.x) != len(s.y):
                raise ValueError(f"task {tid!r}: {len(s.x)} inputs but {len(s.y)} labels")
            if len(s.y) == 0:
                raise ValueError(f"task {tid!r}: the evaluation set is empty (0 samples): give every task at least one "
                                 "sample (an empty set has no accuracy, and a 0 would lower every average)")
            if s.classes is not None:  # a list of ints whatever was given (a tensor, a tuple, numpy ints)
                classes = [int(c) for c in s.classes]
                if not classes:
                    raise ValueError(f"task {tid!r}: classes=[] restricts the prediction to no class, so nothing can "
                                     "be predicted; give the task's classes, or None for all of them")
                s = EvalSet(s.x, s.y, classes)
            if subset_size is not None and len(s.y) > subset_size:
                idx = torch.as_tensor(np.sort(rng.choice(len(s.y), subset_size, replace=False)))
                s = EvalSet(s.x[idx], s.y[idx], s.classes)
            self.sets[tid] = s
        self.task_ids = list(self.sets)
        self.step = 0
        self.train_samples = 0
        self.eval_samples = 0
        self.boundary_eval_samples = 0
        self.eval_seconds = 0.0
        self.seen: list[Any] = []
        self.boundaries: dict[Any, int] = {}
        self.records: list[_Record] = []
        self._task: Any = None
        self._task_start = 0
        self._dense = [0, 0]  # dense evaluations after this task's switch: [due, skipped by the budget]
        self._budget_warned = False

    # -- the loop API ------------------------------------------------------------------
    def begin_task(self, task_id: Any) -> None:
        if task_id not in self.sets:
            raise KeyError(f"unknown task {task_id!r}; tasks with eval sets: {self.task_ids}")
        if self._task is not None:
            raise RuntimeError(f"begin_task({task_id!r}) before end_task of {self._task!r}")
        self._task = task_id
        self._task_start = self.step
        self._dense = [0, 0]
        if task_id not in self.seen:
            self.seen.append(task_id)

    def maybe_eval(
        self, model: nn.Module, n_samples: int | None = None
    ) -> dict[Any, float] | None:
        """Call once after each optimizer step. Evaluates when the schedule says so and the
        budget allows; returns the primary metric of each task then (the accuracies), else None;
        :meth:`last_scores` has every metric of that evaluation."""
        if self._task is None:
            raise RuntimeError("maybe_eval outside a task: call begin_task first")
        self.step += 1
        if n_samples is not None:
            self.train_samples += int(n_samples)
        elif self.budget is not None:
            raise ValueError("a budget is set: pass n_samples (training samples in this step)")
        into = self.step - self._task_start
        if not self.schedule.due(into):
            return None
        dense = into <= self.schedule.dense_steps and len(self.seen) > 1  # right after a switch: the gap's window
        self._dense[0] += dense
        if self.budget is not None:
            cost = self._cost()
            if self.eval_samples - self.boundary_eval_samples + cost > self.budget * self.train_samples:
                self._dense[1] += dense
                return None
        return self._evaluate(model, boundary=False)

    def evaluated_now(self) -> bool:
        """Whether the latest step already has a recorded evaluation of every task due (which
        :meth:`end_task` reuses unless told the evaluated model has changed since)."""
        last = self.records[-1] if self.records else None
        return last is not None and last.step == self.step and set(last.acc) >= set(self._targets())

    def end_task(self, model: nn.Module, reuse: bool = True) -> dict[Any, float]:
        """Close the current task with a boundary evaluation (always run, counted). When this step's
        scheduled evaluation already covered every task it is the boundary one (``reuse``); pass
        ``reuse=False`` when the model changed after it (a strategy that merges or recalibrates at the
        end of a task), and the boundary is evaluated afresh, recorded at the same step after it."""
        if self._task is None:
            raise RuntimeError("end_task without begin_task")
        last = self.records[-1] if self.records else None
        if reuse and self.evaluated_now():
            accs = last.acc  # the scheduled evaluation of this very step is the boundary one
        else:
            accs = self._evaluate(model, boundary=True)
        due, skipped = self._dense
        if self.budget is not None and due and 2 * skipped > due and not self._budget_warned:
            import warnings

            self._budget_warned = True  # once per evaluator
            warnings.warn(f"budget={self.budget} skipped {skipped} of the {due} dense evaluations due after the switch "
                          f"to task {self._task!r}: the stability gap there is measured from {due - skipped} points "
                          "and will look shallower than it is; raise the budget or set budget=None",
                          UserWarning, stacklevel=2)
        self.boundaries[self._task] = self.step
        self._task = None
        return dict(accs)

    def evaluate(self, model: nn.Module, task_ids: Sequence[Any] | None = None) -> dict[Any, float]:
        """The primary metric (accuracy) of ``model`` on the given tasks now (default: all); records nothing."""
        if not self.lm:
            return {t: self._accuracy(model, self.sets[t]) for t in (task_ids or self.task_ids)}  # type: ignore[arg-type]
        return {t: self._lm_scores(model, self.sets[t])[self.metric] for t in (task_ids or self.task_ids)}  # type: ignore[arg-type]

    def scores(self, model: nn.Module, task_ids: Sequence[Any] | None = None) -> dict[str, dict[Any, float]]:
        """Every metric of ``model`` on the given tasks now (default: all), ``{metric: {task: value}}``;
        records nothing."""
        if not self.lm:
            return {"acc": self.evaluate(model, task_ids)}
        per_task = {t: self._lm_scores(model, self.sets[t]) for t in (task_ids or self.task_ids)}  # type: ignore[arg-type]
        return {m: {t: v[m] for t, v in per_task.items()} for m in self.metric_names}

    def last_scores(self) -> dict[str, dict[Any, float]]:
        """Every metric of the latest recorded evaluation, ``{metric: {task: value}}`` (empty before the first)."""
        if not self.records:
            return {}
        r = self.records[-1]
        return {m: dict(self._values(r, m)) for m in self.metric_names}

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`maybe_eval`, :meth:`end_task` and :meth:`metrics` depend on, as
        plain Python values (counters, the task order, the boundaries and every recorded
        evaluation), built afresh at each call (no container is shared with the evaluator, so a
        checkpoint may keep it without copying); loadable with ``torch.load(weights_only=True)``.
        The evaluation sets are not in it: a fresh evaluator built with the same arguments (and
        seed) has the same subsets, and :meth:`load_state_dict` checks the task ids."""
        return {
            "task_ids": list(self.task_ids),
            "step": self.step,
            "train_samples": self.train_samples,
            "eval_samples": self.eval_samples,
            "boundary_eval_samples": self.boundary_eval_samples,
            "eval_seconds": self.eval_seconds,
            "seen": list(self.seen),
            "boundaries": [[t, s] for t, s in self.boundaries.items()],
            "records": [{"step": r.step, "task": r.task, "acc": [[t, a] for t, a in r.acc.items()],
                         **({"extra": {m: [[t, a] for t, a in v.items()] for m, v in r.extra.items()}}
                            if r.extra else {}),
                         **({"nonfinite": list(r.nonfinite)} if r.nonfinite else {})}
                        for r in self.records],
            "task": self._task,
            "task_start": self._task_start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (into an evaluator built with the same
        evaluation sets); a different list of task ids raises ``ValueError``."""
        if list(state["task_ids"]) != self.task_ids:
            raise ValueError(f"evaluator state is for tasks {list(state['task_ids'])}, this evaluator has "
                             f"{self.task_ids}")
        self.step = int(state["step"])
        self.train_samples = int(state["train_samples"])
        self.eval_samples = int(state["eval_samples"])
        self.boundary_eval_samples = int(state["boundary_eval_samples"])
        self.eval_seconds = float(state["eval_seconds"])
        self.seen = list(state["seen"])
        self.boundaries = {t: int(s) for t, s in state["boundaries"]}
        self.records = [_Record(int(r["step"]), r["task"], {t: float(a) for t, a in r["acc"]},
                                {m: {t: float(a) for t, a in v} for m, v in r.get("extra", {}).items()},
                                list(r.get("nonfinite", [])))
                        for r in state["records"]]
        self._task = state["task"]
        self._task_start = int(state["task_start"])

    @property
    def nonfinite_evals(self) -> int:
        """How many (recorded evaluation, task) pairs scored NaN because the model's output was not finite."""
        return sum(len(r.nonfinite) for r in self.records)

    # -- internals -----------------------------------------------------------------------
    def _targets(self) -> list[Any]:
        return self.task_ids if self.include_unseen else [t for t in self.task_ids if t in self.seen]

    def _cost(self) -> int:
        return sum(len(self.sets[t]) for t in self._targets())

    def _evaluate(self, model: nn.Module, boundary: bool) -> dict[Any, float]:
        t0 = time.perf_counter()
        extra: dict[str, dict[Any, float]] = {}
        if self.lm:
            per_task = {t: self._lm_scores(model, self.sets[t]) for t in self._targets()}  # type: ignore[arg-type]
            accs = {t: v[self.metric] for t, v in per_task.items()}
            extra = {m: {t: v[m] for t, v in per_task.items()} for m in self.metric_names if m != self.metric}
            bad = [t for t, v in per_task.items() if math.isnan(v["token_acc"])]
        elif self.batched and self.predict is _default_predict and rank_world(self.shard)[1] == 1:
            accs = self._accuracy_all(model, self._targets())  # every task in one pass of forwards
            bad = [t for t, a in accs.items() if math.isnan(a)]
        else:
            accs = {t: self._accuracy(model, self.sets[t]) for t in self._targets()}  # type: ignore[arg-type]
            bad = [t for t, a in accs.items() if math.isnan(a)]
        cost = self._cost()
        self.eval_samples += cost
        if boundary:
            self.boundary_eval_samples += cost
        self.eval_seconds += time.perf_counter() - t0
        self.records.append(_Record(self.step, self._task, accs, extra, bad))
        return accs

    def _values(self, r: _Record, metric: str) -> dict[Any, float]:
        return r.acc if metric == self.metric else r.extra.get(metric, {})

    def _lm_scores(self, model: nn.Module, s: LMEvalSet) -> dict[str, float]:
        """Token accuracy, loss and perplexity of ``model`` on ``s`` (sums over every scored token;
        under sharding each rank scores its rows and the sums are all-reduced). All three are NaN when
        the logits at a scored position are not finite (:func:`~poise.measure.lm.lm_sums`)."""
        rank, world = rank_world(self.shard)
        model = getattr(model, "module", model)
        flags = {m: m.training for m in model.modules()}
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        sums = torch.zeros(3, dtype=torch.float64)
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                part = s if world == 1 else s.index(slice(rank, None, world))
                for i in range(0, len(part), self.batch_size):
                    x = part.input_ids[i : i + self.batch_size].to(device)
                    am = part.attention_mask[i : i + self.batch_size].to(device)  # type: ignore[index]
                    logits = _as_logits(self.predict(model, x, am), x)
                    sums += lm_sums(logits, part.labels[i : i + self.batch_size])  # type: ignore[index]
        finally:
            for m, f in flags.items():
                m.training = f
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        return lm_values(sums)

    def _accuracy_all(self, model: nn.Module, tasks: list[Any]) -> dict[Any, float]:
        """:meth:`_accuracy` of every task in ``tasks`` at once: their inputs concatenated once (cached per
        task list and device, with each row's task index and, when a task restricts its classes, each row's
        class mask), forwarded in ``batch_size`` chunks, then scored for all tasks together: one masked
        argmax, one per-task sum of hits and one read back to the host. Logits that are all finite (the
        usual case, checked in that same read) are scorable everywhere; otherwise each row is checked as
        :func:`scorable` does. The same numbers as task by task (a test checks it)."""
        model = getattr(model, "module", model)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        key = (tuple(tasks), str(device))
        if self._cat_key != key:
            sets = [self.sets[t] for t in tasks]
            sizes = torch.tensor([len(s.y) for s in sets])  # type: ignore[union-attr]
            self._cat = {"x": torch.cat([s.x for s in sets]).to(device),  # type: ignore[union-attr]
                         "y": torch.cat([s.y for s in sets]).to(device),  # type: ignore[union-attr]
                         "n": sizes.tolist(),
                         "row_task": torch.repeat_interleave(torch.arange(len(sets)), sizes).to(device),
                         "classes": [s.classes for s in sets],  # type: ignore[union-attr]
                         "keep": None}  # [rows, classes] bool, built at the first forward (when classes is known)
            self._cat_key = key
        c = self._cat
        x, y = c["x"], c["y"]
        flags = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                chunks = [logits_of(model(x[i : i + self.batch_size])) for i in range(0, len(y), self.batch_size)]
        finally:
            for m, f in flags.items():
                m.training = f
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if logits.dim() != 2 or y.dim() != 1 or logits.shape[0] != len(y):
            raise ValueError(
                f"predictions compared with labels {tuple(y.shape)} give shape {tuple(logits.shape[:-1])}: an "
                "EvalSet takes one label per sample (y of shape (n,)); for a language model give an "
                "LMEvalSet (token accuracy, loss and perplexity averaged over tokens)")
        keep = c["keep"]
        if keep is not None and (keep.shape[-1] != logits.shape[-1] or keep.device != logits.device):
            keep = None  # another model (a wider head, another device) since the mask was built
        if keep is None and any(k is not None for k in c["classes"]):
            keep = torch.ones(len(y), logits.shape[-1], dtype=torch.bool, device=logits.device)
            start = 0
            for n, classes in zip(c["n"], c["classes"], strict=True):
                if classes is not None:
                    keep[start : start + n] = False
                    keep[start : start + n, classes] = True
                start += n
            c["keep"] = keep
        # a NaN outside a task's ``classes`` cannot win its argmax
        scored = logits if keep is None else torch.where(keep, logits, float("-inf"))  # (integer logits: promoted)
        row_task = c["row_task"]
        hits = torch.zeros(len(c["n"]), dtype=torch.long, device=logits.device)
        hits.index_add_(0, row_task, (scored.argmax(-1) == y).long())
        *correct, finite = torch.cat([hits, torch.isfinite(logits).all().long().view(1)]).tolist()
        if not finite:  # some logit is NaN or +-inf: which tasks have a row that cannot be scored
            unscorable = ~scorable(logits, keep)
            bad = torch.zeros_like(hits).index_add_(0, row_task, unscorable.long()).tolist()
        else:
            bad = [0] * len(correct)
        return {t: math.nan if b else k / n for t, k, b, n in zip(tasks, correct, bad, c["n"], strict=True)}

    def _accuracy(self, model: nn.Module, s: EvalSet) -> float:
        """The fraction of ``s`` predicted right; NaN when the model's output on any sample is not finite."""
        rank, world = rank_world(self.shard)
        model = getattr(model, "module", model)  # DDP: its forward may talk to other ranks; the module does not
        flags = {m: m.training for m in model.modules()}
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        correct = nonfinite = 0
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                xs, ys = (s.x, s.y) if world == 1 else (s.x[rank::world], s.y[rank::world])
                for i in range(0, len(ys), self.batch_size):
                    x = xs[i : i + self.batch_size].to(device)
                    y = ys[i : i + self.batch_size].to(device)
                    if self.predict is _default_predict:
                        pred, ok = _checked_predict(model, x, s.classes)
                    else:
                        pred = self.predict(model, x, s.classes)
                        ok = torch.isfinite(pred) if pred.is_floating_point() else torch.ones_like(y, dtype=torch.bool)
                    nonfinite += int((~ok).sum())
                    hit = pred == y
                    if y.dim() != 1 or pred.shape != y.shape:  # (1-D logits: a 0-d argmax broadcast to every label)
                        raise ValueError(
                            f"predictions compared with labels {tuple(y.shape)} give shape {tuple(pred.shape)}: an "
                            "EvalSet takes one label per sample (y of shape (n,)); for a language model give an "
                            "LMEvalSet (token accuracy, loss and perplexity averaged over tokens)")
                    correct += int(hit.sum())
        finally:
            for m, f in flags.items():
                m.training = f
        if world > 1:
            import torch.distributed as dist

            total = torch.tensor([correct, nonfinite], dtype=torch.float64)
            dist.all_reduce(total)
            correct, nonfinite = int(total[0].item()), int(total[1].item())
        if nonfinite:
            return math.nan  # no accuracy: the argmax of NaN logits is no prediction
        return correct / len(s.y)

    # -- results -------------------------------------------------------------------------
    def _metric(self, metric: str | None) -> str:
        metric = self.metric if metric is None else metric
        if metric not in self.metric_names:
            raise ValueError(f"metric={metric!r}; valid choices for this evaluator: {', '.join(self.metric_names)}")
        return metric

    def curves(self, metric: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` (n,) and ``acc`` (n, tasks): every recorded evaluation of ``metric`` (default:
        the primary one), NaN where a task was not evaluated; columns in ``task_ids`` order."""
        metric = self._metric(metric)
        steps = np.array([r.step for r in self.records], dtype=float)
        acc = np.full((len(self.records), len(self.task_ids)), np.nan)
        col = {t: j for j, t in enumerate(self.task_ids)}
        for i, r in enumerate(self.records):
            for t, a in self._values(r, metric).items():
                acc[i, col[t]] = a
        return steps, acc

    def boundary_matrix(self, metric: str | None = None) -> np.ndarray:
        """``R[k, i]``: ``metric`` (default: the primary one, the accuracy) on task i at the end of
        the k-th finished task."""
        finished = [t for t in self.seen if t in self.boundaries]
        steps, acc = self.curves(metric)
        col = {t: j for j, t in enumerate(self.task_ids)}
        R = np.full((len(finished), len(finished)), np.nan)
        for k, tk in enumerate(finished):
            row = np.nonzero(steps == self.boundaries[tk])[0][-1]
            for i, ti in enumerate(finished[: k + 1]):
                R[k, i] = acc[row, col[ti]]
        return R

    def metrics(self, metric: str | None = None) -> dict[str, Any]:
        """All continual metrics over the finished tasks, in training order, computed on ``metric``
        (default: the primary one; an LM evaluator also takes ``"loss"`` or ``"ppl"``).

        For a lower-is-better metric (loss, perplexity) every key keeps its name and means the same
        thing with "worse" for "lower": ``acc`` is the average final value, ``min_acc``/``min_after``
        the *worst* (largest) value after a task, ``wc_acc`` mixes the current value with that,
        ``forgetting``/``wf*``/``gap_depth`` are rises (positive = worse), ``bwt = -forgetting``,
        ``wp*`` the largest fall, and the gap's recovery is the time until the value is back
        within ``gap_eps`` *above* its value at the switch. An LM evaluator's result also carries
        ``metric`` and ``higher_is_better``.

        Every result has ``nonfinite_evals`` (the (evaluation, task) pairs scored NaN because the
        model's output was not finite), ``nonfinite_tasks`` (those tasks, as strings) and
        ``first_nonfinite_step`` (None when there were none). When ``nonfinite_evals > 0``, every
        aggregate (``acc``, ``forgetting``, ``bwt``, ``min_acc``, ``wc_acc``, ``wf*``, ``wp*``, the gap
        keys) and every per-task value of a flagged task is NaN: no accuracy is computed over a model
        that produced NaN, and the NaN propagates to any average taken downstream.
        """
        metric = self._metric(metric)
        hib = M.higher_is_better(metric)
        finished = [t for t in self.seen if t in self.boundaries]
        if not finished:
            raise RuntimeError("no task finished yet: call end_task first")
        steps, acc_all = self.curves(metric)
        col = [self.task_ids.index(t) for t in finished]
        acc = acc_all[:, col]
        b = np.array([self.boundaries[t] for t in finished], dtype=float)
        R = self.boundary_matrix(metric)
        # a lower-is-better metric is scored as its negative (the formulas compare "higher"), and
        # the levels are turned back into the metric's units
        sacc, sR = (acc, R) if hib else (-acc, -R)
        sgn = 1.0 if hib else -1.0
        out: dict[str, Any] = {
            "acc": M.average_accuracy(R),
            "forgetting": M.forgetting(sR),
            "bwt": M.backward_transfer(sR),
            "min_acc": M.min_acc(steps, sacc, b) if hib else sgn * M.min_acc(steps, sacc, b),
            "wc_acc": M.wc_acc(steps, sacc, b) if hib else sgn * M.wc_acc(steps, sacc, b),
        }
        for w in self.windows:
            out[f"wf{w}"] = M.windowed_forgetting(sacc, w)
            out[f"wp{w}"] = M.windowed_plasticity(sacc, w)
        per_task = {}
        depths, recs = [], []
        for i, t in enumerate(finished):
            after = (steps > b[i]) & ~np.isnan(acc[:, i])
            info: dict[str, Any] = {
                "acc_at_end": float(R[i, i]),
                "acc_final": float(R[-1, i]),
                "min_after": (float(np.min(acc[after, i])) if hib else float(np.max(acc[after, i])))
                if after.any() else math.nan,
            }
            if i + 1 < len(finished) and not np.any((steps <= b[i]) & ~np.isnan(acc[:, i])):
                depths.append(math.nan)  # the task's switch was scored non-finite: no gap to measure (flagged below)
                recs.append(math.nan)
            elif i + 1 < len(finished):
                g = M.stability_gap(steps, acc[:, i], b[i], b[i + 1], self.gap_eps, higher_is_better=hib)
                info.update(gap_depth=g.depth, gap_min_step=g.min_step, gap_recovery=g.recovery_steps)
                depths.append(g.depth)
                recs.append(g.recovery_steps)
            per_task[str(t)] = info
        out["gap_depth"] = float(np.mean(depths)) if depths else math.nan
        rec = np.array(recs, dtype=float)
        out["gap_recovery"] = float(np.nanmean(rec)) if np.any(~np.isnan(rec)) else math.nan
        out["gap_unrecovered"] = int(np.sum(np.isnan(rec)))
        out["per_task"] = per_task
        out["eval_samples"] = self.eval_samples
        out["train_samples"] = self.train_samples
        out["eval_seconds"] = self.eval_seconds
        out["n_evals"] = len(self.records)
        if self.lm:
            out["metric"] = metric
            out["higher_is_better"] = hib
        flagged = [r for r in self.records if r.nonfinite]
        bad_tasks = list(dict.fromkeys(t for r in flagged for t in r.nonfinite))
        out["nonfinite_evals"] = self.nonfinite_evals
        out["nonfinite_tasks"] = [str(t) for t in bad_tasks]
        out["first_nonfinite_step"] = flagged[0].step if flagged else None
        if flagged:
            for k in ("acc", "forgetting", "bwt", "min_acc", "wc_acc", "gap_depth", "gap_recovery", "gap_unrecovered",
                      *[f"wf{w}" for w in self.windows], *[f"wp{w}" for w in self.windows]):
                out[k] = math.nan
            for t in bad_tasks:
                if str(t) in per_task:
                    per_task[str(t)] = {k: math.nan for k in per_task[str(t)]}
        return out

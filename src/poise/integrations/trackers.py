"""Send poise's step records to experiment trackers: TensorBoard, Weights & Biases, MLflow, trackio.

A *sink* takes the records :func:`poise.continual.fit_stream` (and every ``poise run`` study)
produces, one dict per step (``{"step": 12, "task": 1, "loss": 0.4, "acc/0": 0.91, ...}``), and
writes their numbers to one tracker **at the record's own ``step``** (the evaluator's global
step, one axis across tasks; never the tracker's own counter)::

    from poise.integrations.trackers import make_sinks
    sinks = make_sinks(["tensorboard", "mlflow"], run_dir="runs/demo", run_name="replay-s0")
    fit_stream(model, tasks, strategy, opt, evaluator, ..., log=sinks)   # several trackers at once
    sinks.close()

    export_run("runs/demo", to="tensorboard")   # an existing run directory, replayed

What is written: every ``int``/``float``/``bool`` value (and 0-d tensor) of a record except
``step``; a task-boundary record (``"boundary": True``, the evaluation at a task's end) has its
keys prefixed ``boundary/`` so they do not collide with the last in-task evaluation at the same
step; strings (task names) are skipped. :meth:`TrackerSink.summary` writes end-of-run values under
``final/<key>`` (nested dicts flattened with ``/``).

A failing sink never breaks the training run: with ``on_error="warn"`` (the default) the first
exception (a directory that cannot be created, a package that fails to import when the writer
opens, a tracker error) is reported once as a ``RuntimeWarning`` naming the tracker and the
cause, and that sink writes nothing more; the others go on. ``on_error="raise"`` (what
:func:`export_run` uses) re-raises it. A tracker whose package is missing raises ``ImportError``
with the install hint at construction.

Extras: ``poise[tensorboard]``, ``poise[wandb]``, ``poise[mlflow]``, ``poise[trackio]``
(``poise[trackers]`` for all four).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TRACKERS", "MLflowSink", "Sinks", "TensorBoardSink", "TrackerSink", "TrackioSink", "WandbSink", "export_run",
    "flatten", "make_sinks", "scalars",
]

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
ON_ERROR = ("warn", "raise")
_HINT = {
    "tensorboard": "pip install 'poise[tensorboard]' (or: pip install tensorboard)",
    "wandb": "pip install 'poise[wandb]' (or: pip install wandb)",
    "mlflow": "pip install 'poise[mlflow]' (or: pip install mlflow-skinny sqlalchemy alembic)",
    "trackio": "pip install 'poise[trackio]' (or: pip install trackio)",
}


def _require(tracker: str, *modules: str) -> None:
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ImportError(f"the {tracker} sink needs the '{m}' package: {_HINT[tracker]}")


def _number(v: Any) -> float | None:
    if isinstance(v, numbers.Real):  # bool, int, float, numpy scalars
        return float(v)
    if type(v).__name__ == "Tensor" and v.numel() == 1:
        return float(v.detach())
    return None


def scalars(record: Mapping[str, Any]) -> tuple[int | None, dict[str, float]]:
    """``(step, {key: value})`` of one record: its ``step`` (None if absent) and its numbers
    (``int``/``float``/``bool``/one-element tensors; ``step`` and the ``boundary`` flag left out;
    ``boundary/`` before every key of a boundary record)."""
    step = record.get("step")
    boundary = bool(record.get("boundary", False))
    out: dict[str, float] = {}
    for k, v in record.items():
        if k in ("step", "boundary"):
            continue
        x = _number(v)
        if x is not None:
            out[f"boundary/{k}" if boundary else str(k)] = x
    return (None if step is None else int(step)), out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts of numbers as one flat ``{"a/b/c": x}`` dict; non-numbers (strings, lists,
    None) are dropped."""
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
            continue
        x = _number(v)
        if x is not None:
            out[key] = x
    return out


class TrackerSink:
    """One tracker run. Call it (or :meth:`write`) with each record; :meth:`summary` for
    end-of-run values; :meth:`close` once at the end (also a context manager).

    Subclasses implement ``_open()`` (create the tracker's run; called at the first write, so
    a tracker that cannot start costs the training run nothing but a warning), ``_write(step,
    values)``, ``_summary(step, values)`` and ``_close()``. A record without ``step`` is
    written at the step after the last one seen."""

    tracker = "sink"

    def __init__(self, on_error: str = "warn"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}; valid choices: {', '.join(ON_ERROR)}")
        self.on_error = on_error
        self.failed: BaseException | None = None
        self.last_step = 0
        self._open_done = False
        self._closed = False

    def __call__(self, record: Mapping[str, Any]) -> None:
        self.write(record)

    def __enter__(self) -> TrackerSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, record: Mapping[str, Any]) -> None:
        step, values = scalars(record)
        step = self.last_step + 1 if step is None else step
        self.last_step = step
        if values:
            self._guard("write", self._write, step, values)

    def summary(self, values: Mapping[str, Any]) -> None:
        """End-of-run values (nested dicts flattened), written as ``final/<key>``."""
        flat = {f"final/{k}": v for k, v in flatten(values).items()}
        if flat:
            self._guard("write the summary", self._summary, self.last_step, flat)

    def close(self) -> None:
        if self._closed:
            return
        if self._open_done and self.failed is None:
            self._guard("close", self._close)
        self._closed = True

    def _guard(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        if self.failed is not None or self._closed:
            return
        try:
            if not self._open_done:
                self._open_done = True
                self._open()
            fn(*args)
        except Exception as e:  # a tracker must never break the training run
            self.failed = e
            if self.on_error == "raise":
                raise
            warnings.warn(f"poise: the {self.tracker} sink failed to {what} ({type(e).__name__}: {e}); it writes "
                          f"nothing more in this run, training goes on", RuntimeWarning, stacklevel=4)

    def _open(self) -> None:
        pass

    def _write(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _summary(self, step: int, values: dict[str, float]) -> None:
        self._write(step, values)

    def _close(self) -> None:
        pass


class TensorBoardSink(TrackerSink):
    """Scalars into TensorBoard event files under ``log_dir`` (``torch.utils.tensorboard``);
    ``config`` (if given) is written once as text ``config`` (JSON). Needs ``tensorboard``."""

    tracker = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike[str], config: Mapping[str, Any] | None = None,
                 on_error: str = "warn"):
        _require(self.tracker, "tensorboard")
        super().__init__(on_error)
        self.log_dir = Path(log_dir)
        self.config = None if config is None else dict(config)
        self.writer: Any = None

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if self.config is not None:
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=1, default=str) + "\n```", 0)

    def _write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def _close(self) -> None:
        self.writer.close()


class WandbSink(TrackerSink):
    """A Weights & Biases run (``wandb.init(..., reinit="create_new")``; several may be open at
    once); ``run.log(values, step=step)``, summary into ``run.summary``. ``mode=None`` takes
    ``WANDB_MODE`` from the environment, else ``"offline"`` (no login, no network; upload later
    with ``wandb sync <dir>/wandb/offline-run-*``). Extra ``init`` keywords go to ``wandb.init``.
    W&B needs non-decreasing steps: records of an earlier step are written at the last one."""

    tracker = "wandb"

    def __init__(self, project: str, name: str | None = None, dir: str | os.PathLike[str] | None = None,
                 mode: str | None = None, config: Mapping[str, Any] | None = None, on_error: str = "warn",
                 **init: Any):
        _require(self.tracker, "wandb")
        super().__init__(on_error)
        self.project, self.name = project, name
        self.dir = None if dir is None else Path(dir)
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.config = None if config is None else dict(config)
        self.init = init
        self.run: Any = None
        self._max_step = 0

    def _open(self) -> None:
        import wandb

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, name=self.name, dir=None if self.dir is None else str(self.dir),
                              mode=self.mode, config=self.config, reinit="create_new", **self.init)

    def _write(self, step: int, values: dict[str, float]) -> None:
        self._max_step = max(self._max_step, step)
        self.run.log(values, step=self._max_step)

    def _summary(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def _close(self) -> None:
        self.run.finish()


class MLflowSink(TrackerSink):
    """An MLflow run through ``MlflowClient`` (no global active run): metrics with
    ``log_batch(..., step)``, ``config`` flattened into params. ``tracking_uri=None`` uses
    ``MLFLOW_TRACKING_URI`` if set, else MLflow's default. (MLflow 3 refuses the old ``./mlruns``
    file backend unless ``MLFLOW_ALLOW_FILE_STORE=true``; :func:`make_sinks` defaults to a local
    SQLite file, ``sqlite:///<run_dir>/mlflow.db``, which needs ``sqlalchemy`` and ``alembic``.)"""

    tracker = "mlflow"

    def __init__(self, experiment: str, run_name: str | None = None, tracking_uri: str | None = None,
                 config: Mapping[str, Any] | None = None, on_error: str = "warn"):
        _require(self.tracker, "mlflow")
        if tracking_uri is not None and tracking_uri.startswith("sqlite:"):
            _require(self.tracker, "sqlalchemy", "alembic")
        super().__init__(on_error)
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.config = None if config is None else dict(config)
        self.client: Any = None
        self.run_id: str | None = None

    def _open(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.tracking_uri and self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
        if self.config:
            params = [Param(k, json.dumps(v, default=str)[:6000]) for k, v in _flat_config(self.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _write(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioSink(TrackerSink):
    """A trackio run (``trackio.init(project, name=..., config=...)``, then ``run.log(values,
    step=step)``), stored where trackio keeps its projects (``TRACKIO_DIR``, default the Hugging
    Face cache; ``trackio show`` opens them). Extra ``init`` keywords go to ``trackio.init``
    (``space_id=...`` to log to a Space instead)."""

    tracker = "trackio"

    def __init__(self, project: str, name: str | None = None, config: Mapping[str, Any] | None = None,
                 on_error: str = "warn", **init: Any):
        _require(self.tracker, "trackio")
        super().__init__(on_error)
        self.project, self.name = project, name
        self.config = None if config is None else dict(config)
        self.init = init
        self.run: Any = None

    def _open(self) -> None:
        import trackio

        self.run = trackio.init(project=self.project, name=self.name, config=self.config, **self.init)

    def _write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def _close(self) -> None:
        self.run.finish()


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Sinks:
    """Several sinks as one: ``Sinks([a, b])(record)`` writes to each (a failing one is
    skipped, see :class:`TrackerSink`); usable as ``fit_stream``'s ``log=``; also a context
    manager that closes them all."""

    def __init__(self, sinks: Iterable[TrackerSink | Callable[[Mapping[str, Any]], None]] = ()):
        self.sinks = list(sinks)

    def __call__(self, record: Mapping[str, Any]) -> None:
        self.write(record)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sinks)

    def __len__(self) -> int:
        return len(self.sinks)

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def write(self, record: Mapping[str, Any]) -> None:
        for s in self.sinks:
            s(record)

    def summary(self, values: Mapping[str, Any]) -> None:
        for s in self.sinks:
            if hasattr(s, "summary"):
                s.summary(values)

    def close(self) -> None:
        for s in self.sinks:
            if hasattr(s, "close"):
                s.close()


def _names(names: str | Sequence[str]) -> list[str]:
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for n in items:
        if n not in TRACKERS:
            raise ValueError(f"unknown tracker {n!r}; valid choices: {', '.join(TRACKERS)}")
        if n not in out:
            out.append(n)
    return out


def make_sinks(names: str | Sequence[str], run_dir: str | os.PathLike[str], run_name: str, *,
               project: str | None = None, config: Mapping[str, Any] | None = None,
               on_error: str = "warn") -> Sinks:
    """One sink per tracker in ``names`` (any of :data:`TRACKERS`; unknown names raise
    ``ValueError`` listing them; a missing package raises ``ImportError`` with the install
    hint, before anything runs) for the training run ``run_name`` of the run directory
    ``run_dir``. ``project`` (default: the run directory's name) groups the runs of one study.

    Where each writes:

    * ``tensorboard``: ``<run_dir>/tensorboard/<run_name>/`` (``tensorboard --logdir <run_dir>/tensorboard``);
    * ``wandb``: ``<run_dir>/wandb/`` (offline unless ``WANDB_MODE`` says otherwise), run ``run_name``;
    * ``mlflow``: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<run_dir>/mlflow.db``; experiment
      ``project``, run ``run_name`` (``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``);
    * ``trackio``: trackio's own store (``TRACKIO_DIR``), project ``project``, run ``run_name``.
    """
    run_dir = Path(run_dir)
    project = project or run_dir.resolve().name
    sinks: list[TrackerSink] = []
    for n in _names(names):
        if n == "tensorboard":
            sinks.append(TensorBoardSink(run_dir / "tensorboard" / run_name, config=config, on_error=on_error))
        elif n == "wandb":
            sinks.append(WandbSink(project, run_name, dir=run_dir, config=config, on_error=on_error))
        elif n == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            sinks.append(MLflowSink(project, run_name, tracking_uri=uri, config=config, on_error=on_error))
        else:
            sinks.append(TrackioSink(project, run_name, config=config, on_error=on_error))
    return Sinks(sinks)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # the torn last line of an interrupted run
                warnings.warn(f"{path}:{i + 1}: not JSON, skipped", RuntimeWarning, stacklevel=2)


def export_run(run_dir: str | os.PathLike[str], to: str | Sequence[str], *, project: str | None = None,
               runs: Sequence[str] | None = None) -> dict[str, int]:
    """Replay a poise run directory into trackers (``to``: one name or several of
    :data:`TRACKERS`): for each ``metrics/<run>.jsonl`` one tracker run named ``<run>``, every
    record at its own ``step``, then ``results/<run>.json``'s ``metrics`` as the summary
    (``final/...``) and ``config.json`` as the run's config. ``runs`` picks some by name (an
    unknown one raises ``ValueError`` listing those present). Returns ``{run: records
    written}``. Writes go where :func:`make_sinks` says; a tracker error raises (this is not a
    training run: nothing to protect)."""
    run_dir = Path(run_dir)
    metrics_dir = run_dir / "metrics"
    if not metrics_dir.is_dir():
        raise ValueError(f"{run_dir} is not a poise run directory (no metrics/ folder)")
    present = sorted(p.stem for p in metrics_dir.glob("*.jsonl"))
    if runs is not None:
        unknown = [r for r in runs if r not in present]
        if unknown:
            raise ValueError(f"export_run: no run {unknown[0]!r} in {run_dir}; valid choices: {', '.join(present)}")
        present = [r for r in present if r in runs]
    cfg_path = run_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    written: dict[str, int] = {}
    for name in present:
        with make_sinks(to, run_dir, name, project=project, config=config, on_error="raise") as sinks:
            n = 0
            for rec in _read_jsonl(metrics_dir / f"{name}.jsonl"):
                sinks.write(rec)
                n += 1
            res = run_dir / "results" / f"{name}.json"
            if res.is_file():
                result = json.loads(res.read_text())
                sinks.summary(result.get("metrics", {}))
            written[name] = n
    return written

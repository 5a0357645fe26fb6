"""The continual study kind: update rules (strategies) compared on a stream of tasks, with
continual evaluation that exposes the stability gap.

One module holds the kind: its config dataclasses and validation, one run
(:func:`run_one`: :func:`poise.continual.fit_stream` with a :class:`ContinualEvaluator`),
the summary over seeds, the report's tables and plots, and ``KIND``.
"""

from __future__ import annotations

import html
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise import _registry
from poise.continual.loop import fit_stream
from poise.measure.evaluator import ContinualEvaluator, EvalSchedule, EvalSet
from poise.models import build_model
from poise.optim import ConsecutiveSkipsError
from poise.runs.checkpoint import CheckpointError
from poise.runs.components import OptimizerSpec, build_optimizer, describe_optimizer
from poise.runs.config import (
    DEFAULT_RECIPE,
    ConfigError,
    _check_variants,
    _choices,
    _help,
    claims_field,
    quick_field,
    sweep_field,
    tracking_field,
)
from poise.runs.engine import _stats, by_variant, execute
from poise.runs.kinds._protocol import StudyKind
from poise.runs.report import _fmt
from poise.runs.store import JsonlWriter, truncate_jsonl
from poise.runs.verdict import ClaimConfig

__all__ = ["EvalConfig", "StudyConfig", "TrainConfig", "VariantConfig", "WorkloadConfig", "KIND", "run_one",
           "run_study", "summarize", "strategy_params", "validate"]


# -- config --------------------------------------------------------------------------------
@dataclass
class WorkloadConfig:
    stream: str = _help("continual stream (registry 'stream')", default="split-digits")
    scenario: str = _help("split-digits: 'class' (one head) or 'task' (task id known); "
                          "rotated/permuted: 'domain'", default="class")
    n_tasks: int = _help("number of tasks in the stream", default=5)
    model: str = _help("classifier (registry 'model')", default="mlp")
    hidden: int = _help("hidden width of the model", default=256)
    depth: int = _help("hidden layers of the MLP", default=2)
    stream_params: dict[str, Any] = _help("further keyword arguments of the stream (fscil-digits: shots, ways; "
                                          "drift-digits: kind, swaps, angle; `poise list streams`)",
                                          default_factory=dict)


@dataclass
class TrainConfig:
    optimizer: str = _help("optimizer of every variant: a registered poise optimizer (poise list optimizers), "
                           "torch's 'sgd' or 'adam', or an import path 'pkg.mod:Class'", default="sgd")
    lr: float = _help("learning rate", default=0.05)
    momentum: float = _help("SGD momentum", default=0.0)
    weight_decay: float = _help("weight decay", default=0.0)
    batch_size: int = _help("training samples per step (current task)", default=32)
    steps_per_task: int = _help("optimizer steps on each task", default=300)
    optimizer_params: dict[str, Any] = _help("more keyword arguments of the optimizer (betas, eps, ...) and its "
                                             "declared group keys (galore_adamw: rank, update_proj_gap, scale, "
                                             "proj_type)", default_factory=dict)
    divergence_factor: float = _help("a run has diverged when its training loss is non-finite or above this "
                                     "factor times its first step's loss; it stops there, is flagged and left out "
                                     "of the means", default=100.0)
    checkpoint_every: int = _help("write a mid-task checkpoint (model, optimizer, strategy, evaluator, RNG) every "
                                  "this many steps; poise run --resume RUN_DIR continues an interrupted run from it "
                                  "(0 = never: an interrupted run restarts from its start)", default=100)


@dataclass
class EvalConfig:
    dense_steps: int = _help("evaluate every step for this many steps after each task "
                             "boundary", default=0)
    every: int = _help("then evaluate every this many steps (1 = per-iteration)", default=1)
    subset_size: int = _help("evaluate each task on a fixed seeded subset of this many "
                             "samples (0 = all)", default=0)
    budget: float = _help("cap scheduled evaluation samples at budget x training samples "
                          "(0 = no cap)", default=0.0)
    windows: list[int] = _help("window sizes w of WF^w / WP^w, in evaluations",
                               default_factory=lambda: [10])
    gap_eps: float = _help("stability-gap recovery tolerance (accuracy)", default=0.02)


@dataclass
class VariantConfig:
    name: str = _help("label of this variant in tables and plots", default="")
    strategy: str = _help("continual strategy (registry 'strategy')", default="finetune")
    params: dict[str, Any] = _help("keyword arguments of the strategy", default_factory=dict)
    optimizer: str = _help("this variant's optimizer ('' = train.optimizer)", default="")
    optimizer_params: dict[str, Any] = _help("this variant's optimizer arguments (with optimizer set: instead of "
                                             "train.optimizer_params; else merged over them)", default_factory=dict)


def _default_variants() -> list[VariantConfig]:
    return [VariantConfig(n, n) for n in ("finetune", "replay", "ewc", "agem", "ogpsa")]


@dataclass
class StudyConfig:
    name: str = _help("study name (names the run directory)", default=DEFAULT_RECIPE)
    description: str = _help("one paragraph shown at the top of the report", default="")
    seeds: list[int] = _help("seeds; every variant runs once per seed",
                             default_factory=lambda: [0, 1, 2])
    threads: int = _help("torch intra-op threads (tiny models run fastest on 1)", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    workload: WorkloadConfig = _help("the stream and model", default_factory=WorkloadConfig)
    train: TrainConfig = _help("the optimizer and steps", default_factory=TrainConfig)
    eval: EvalConfig = _help("continual evaluation", default_factory=EvalConfig)
    variants: list[VariantConfig] = _help("the update rules compared ([[variants]] tables)",
                                          default_factory=_default_variants)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()
    kind: str = _help("'continual' (the default kind): update rules compared on a stream of tasks",
                      default="continual")


_NOT_FROM_RECIPE = {"loss_fn", "reference", "seed"}


def strategy_params(name: str) -> dict[str, inspect.Parameter]:
    cls = _registry.get("strategy", name)
    sig = inspect.signature(cls.__init__)
    return {k: p for k, p in list(sig.parameters.items())[1:] if k not in _NOT_FROM_RECIPE}


def validate(cfg: StudyConfig) -> StudyConfig:
    """Check registry names, ranges and strategy parameters; raise :class:`ConfigError`."""
    _choices("stream", cfg.workload.stream, "workload.stream")
    _choices("model", cfg.workload.model, "workload.model")
    for key, v in [("train.lr", cfg.train.lr), ("train.batch_size", cfg.train.batch_size),
                   ("train.steps_per_task", cfg.train.steps_per_task), ("eval.every", cfg.eval.every),
                   ("workload.n_tasks", cfg.workload.n_tasks), ("workload.hidden", cfg.workload.hidden),
                   ("threads", cfg.threads)]:
        if v <= 0:
            raise ConfigError(f"{key}={v} must be > 0")
    for key, v in [("train.checkpoint_every", cfg.train.checkpoint_every),
                   ("eval.dense_steps", cfg.eval.dense_steps), ("eval.subset_size", cfg.eval.subset_size),
                   ("eval.budget", cfg.eval.budget)]:
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0")
    for i, v in enumerate(_check_variants(cfg, "strategy")):
        key = f"variants[{i}]"
        allowed = strategy_params(v.strategy)
        for p, val in v.params.items():
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown parameter of strategy {v.strategy!r}; "
                                  f"valid: {', '.join(allowed) or '(none)'}")
            default = allowed[p].default
            if default is not inspect.Parameter.empty and default is not None:
                want = type(default)
                ok = isinstance(val, want) and not (isinstance(val, bool) and want is not bool)
                if want is float and isinstance(val, int) and not isinstance(val, bool):
                    v.params[p] = float(val)
                    ok = True
                if not ok:
                    raise ConfigError(f"{key}.params.{p}: expected {want.__name__}, "
                                      f"got {type(val).__name__} {val!r}")
    for i, w_ in enumerate(cfg.eval.windows):
        if w_ <= 0:
            raise ConfigError(f"eval.windows[{i}]={w_} must be > 0 (a window of evaluations)")
    total = cfg.train.steps_per_task * cfg.workload.n_tasks
    if total > MAX_STEPS:
        raise ConfigError(f"train.steps_per_task x workload.n_tasks = {total} steps; at most {MAX_STEPS:,} per run "
                          "(the evaluator keeps one row per evaluation)")
    for i, v in enumerate(cfg.variants):  # each strategy's own checks (mem_size >= 1, lam >= 0, ...) run now
        try:
            _strategy(v.strategy, v.params, 0)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"variants[{i}].params: {v.strategy}: {e}") from None
    # the stream's own checks (scenario, n_tasks) run when it is built: build it now
    try:
        from poise.runs.config import check_kwargs

        make = _registry.get("stream", cfg.workload.stream)
        check_kwargs(make, cfg.workload.stream_params, "workload.stream_params", f"stream {cfg.workload.stream!r}",
                     skip=("n_tasks", "scenario"))
        stream = make(n_tasks=cfg.workload.n_tasks, scenario=cfg.workload.scenario, **cfg.workload.stream_params)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"workload: {e}") from None
    # every variant's optimizer is built once on the study's model, so its own checks run now
    model = _model(cfg, stream)
    for i in range(len(cfg.variants)):
        _optimizer(cfg, i, model)
    return cfg


def optimizer_spec(cfg: StudyConfig, variant_index: int) -> tuple[OptimizerSpec, str, str]:
    """The optimizer of variant ``variant_index`` and the config keys that name it."""
    v, t = cfg.variants[variant_index], cfg.train
    if v.optimizer:
        return (OptimizerSpec(v.optimizer, dict(v.optimizer_params)), f"variants[{variant_index}].optimizer",
                f"variants[{variant_index}].optimizer_params")
    key = f"variants[{variant_index}].optimizer_params" if v.optimizer_params else "train.optimizer_params"
    return OptimizerSpec(t.optimizer, {**t.optimizer_params, **v.optimizer_params}), "train.optimizer", key


def _optimizer(cfg: StudyConfig, variant_index: int, model: torch.nn.Module) -> torch.optim.Optimizer:
    spec, name_key, params_key = optimizer_spec(cfg, variant_index)
    return build_optimizer(spec, model, name_key, params_key, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                           momentum=cfg.train.momentum)


def _model(cfg: StudyConfig, stream: Any) -> torch.nn.Module:
    w = cfg.workload
    return build_model(w.model, int(np.prod(stream.input_shape)), stream.n_classes, w.hidden, w.depth)


def resolve(cfg: StudyConfig) -> dict[str, Any]:
    """What each variant's optimizer was built as (class, groups, projected matrices)."""
    w = cfg.workload
    stream = _registry.get("stream", w.stream)(n_tasks=w.n_tasks, scenario=w.scenario, **w.stream_params)
    model = _model(cfg, stream)
    return {"optimizers": {v.name: describe_optimizer(_optimizer(cfg, i, model), model)
                           for i, v in enumerate(cfg.variants)}}




# -- one run --------------------------------------------------------------------------------
MAX_STEPS = 10_000_000
SCALARS = ("acc", "forgetting", "bwt", "min_acc", "wc_acc", "gap_depth", "gap_recovery")


def _strategy(name: str, params: dict[str, Any], seed: int) -> Any:
    cls = _registry.get("strategy", name)
    kwargs = dict(params)
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs["seed"] = seed
    return cls(**kwargs)


def run_one(cfg: StudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
            progress: Any = None) -> dict[str, Any]:
    """Train one variant with one seed; returns metrics and curves."""
    w = cfg.workload
    stream = _registry.get("stream", w.stream)(n_tasks=w.n_tasks, scenario=w.scenario, **w.stream_params)
    v = cfg.variants[variant_index]
    torch.manual_seed(seed)
    model = _model(cfg, stream)
    strategy = _strategy(v.strategy, v.params, seed)
    opt = _optimizer(cfg, variant_index, model)
    e = cfg.eval
    evaluator = ContinualEvaluator(
        {t.id: EvalSet(t.x_test, t.y_test, t.classes if t.restrict else None) for t in stream.tasks},
        schedule=EvalSchedule(e.dense_steps, e.every),
        subset_size=e.subset_size or None,
        budget=e.budget or None,
        seed=seed,
        windows=e.windows,
        gap_eps=e.gap_eps,
    )
    from poise.distributed import is_main, rank_world

    main = is_main()
    # mid-task checkpoints (one process only: under torchrun each rank's sharded evaluator differs, and a
    # study there restarts an unfinished run from its start)
    every = cfg.train.checkpoint_every if rank_world()[1] == 1 else 0
    ckpt = metrics_path.parent.parent / "checkpoints" / f"{metrics_path.stem}.pt" if metrics_path and every else None
    resume = _load_checkpoint(ckpt) if ckpt is not None else None
    if main and metrics_path is not None:
        if resume is None:
            metrics_path.unlink(missing_ok=True)  # a fresh run: no stale lines from an earlier attempt
        else:  # lines after the checkpoint are written again (a task's boundary line follows its last step)
            truncate_jsonl(metrics_path, resume["step"], drop_at_max=lambda r: bool(r.get("boundary")))
    if resume is not None and progress is not None:
        progress(resume["step"])
    writer = JsonlWriter(metrics_path) if metrics_path and main else None
    # under nonfinite="skip" the optimizer's own guard handles non-finite steps (and stops the study
    # when max_consecutive_skips run out); a loss above the bound is still divergence
    watch = _DivergenceWatch(cfg.train.divergence_factor, writer.write if writer else None,
                             nonfinite_ok=getattr(opt, "nonfinite", None) == "skip")
    t0 = time.perf_counter()
    diverged_at = None
    try:
        metrics = fit_stream(
            model, stream.tasks, strategy, opt, evaluator,
            steps_per_task=cfg.train.steps_per_task, batch_size=cfg.train.batch_size,
            n_classes=stream.n_classes, seed=seed,
            log=watch, progress=progress,
            shard=False,  # under torchrun every rank trains the same model on the whole batch; evaluation is sharded
            checkpoint_every=every if ckpt is not None and main else 0,
            on_checkpoint=(lambda st: _save_checkpoint(ckpt, st)) if ckpt is not None and main else None,
            resume=resume,
        )
    except _Diverged as e:
        diverged_at, metrics = e.step, {}
        if progress is not None:
            progress(cfg.train.steps_per_task * w.n_tasks - e.step)
    except FloatingPointError as e:  # the optimizer refused a non-finite gradient: a diverged run
        if isinstance(e, ConsecutiveSkipsError):  # the user's guard gave up: the study stops (exit 3)
            raise
        diverged_at, metrics = watch.last_step + 1, {"diverged_reason": str(e)}
        if writer:
            writer.write({"step": diverged_at, "diverged": True, "reason": str(e)})
        if progress is not None:
            progress(cfg.train.steps_per_task * w.n_tasks - watch.last_step)
    finally:
        if writer:
            writer.close()
    if ckpt is not None and main:
        ckpt.unlink(missing_ok=True)  # the run's result file is about to be written: it supersedes the checkpoint
        if ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
            ckpt.parent.rmdir()
    if diverged_at is None and metrics.get("nonfinite_evals", 0) > 0:  # a safety net (e.g. across a resume)
        diverged_at = metrics.get("first_nonfinite_step") or watch.last_step
        metrics = {"diverged_reason": f"non-finite evaluation on tasks {metrics.get('nonfinite_tasks')}"}
    steps, acc = evaluator.curves()
    if watch.strategy and diverged_at is None:  # e.g. MBC's compression, eviction's counts: claims may name them
        metrics = {**metrics, "strategy": dict(watch.strategy)}
    return {
        "variant": v.name, "strategy": v.strategy, "seed": seed, "diverged_at": diverged_at,
        "wall_seconds": time.perf_counter() - t0,
        "metrics": metrics,
        "boundaries": [evaluator.boundaries[t] for t in evaluator.seen if t in evaluator.boundaries],
        "task_names": [t.name for t in stream.tasks],
        "curves": {"steps": steps.tolist(), "acc": acc.tolist()},
    }


class _Diverged(Exception):
    def __init__(self, step: int):
        self.step = step


class _DivergenceWatch:
    """The ``log`` of :func:`fit_stream`: writes each record, and stops the run (raising
    :class:`_Diverged`) at the first step whose loss is non-finite or above ``factor`` times the
    first step's loss. That record is written first, marked ``diverged``."""

    def __init__(self, factor: float, write: Any, nonfinite_ok: bool = False):
        self.factor, self.write, self.first, self.last_step = factor, write, None, 0
        self.nonfinite_ok = nonfinite_ok
        self.strategy: dict[str, float] = {}  # the last value of each strategy metric (``step/<name>``)

    def __call__(self, rec: dict[str, Any]) -> None:
        self.last_step = int(rec.get("step", self.last_step))
        self.strategy.update({k[5:]: v for k, v in rec.items() if k.startswith("step/")})
        loss = rec.get("loss")
        bad = False
        if isinstance(loss, float):
            if not math.isfinite(loss):
                bad = not self.nonfinite_ok
            else:
                bad = self.first is not None and loss > self.factor * self.first
            if self.first is None and not bad:
                self.first = max(loss, 1e-12)
        if any(isinstance(v, float) and math.isnan(v) for k, v in rec.items() if k.startswith("acc/")):
            bad = True  # the evaluator scored a non-finite model: NaN is a diverged run, never an accuracy
            rec = {**rec, "reason": "non-finite evaluation"}
        if bad:
            rec = {**rec, "diverged": True}
        if self.write is not None:
            self.write(rec)
        if bad:
            raise _Diverged(int(rec["step"]))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``fit_stream``'s state, written atomically (a crash mid-write keeps the previous one)."""
    from poise.runs.store import check_inside

    check_inside(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk (torch raises RuntimeError), a kill: no half-written file stays
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            from poise.runs.checkpoint import write_error

            raise write_error(e, path) from e
        raise


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say which, never run pickled code
        from poise.runs.checkpoint import load_reason

        raise CheckpointError(f"checkpoint {path} cannot be read ({load_reason(e)}); delete it to restart "
                              "this run from its start") from None


def summarize(results: list[dict[str, Any]], windows: list[int]) -> dict[str, Any]:
    """Mean and sample std over seeds of every scalar metric, per variant; plus the first
    task's accuracy at its end, its minimum afterwards, and its gap."""
    names = ([*SCALARS, *[f"wf{w}" for w in windows]])
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        row = {k: _stats([r["metrics"].get(k) for r in rs]) for k in names}
        t0 = [r["metrics"]["per_task"].get("0", {}) for r in rs]
        for k in ("acc_at_end", "min_after", "acc_final", "gap_depth", "gap_recovery"):
            row[f"task0_{k}"] = _stats([t.get(k) for t in t0])
        for k in sorted({k for r in rs for k in r["metrics"].get("strategy", {})}):  # the strategy's own figures
            row[f"strategy.{k}"] = _stats([r["metrics"].get("strategy", {}).get(k) for r in rs])
        row["seeds"] = [r["seed"] for r in rs]
        row["wall_seconds"] = _stats([r["wall_seconds"] for r in rs])
        out[variant] = row
    return out




def run_study(cfg: StudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
              report: bool = True) -> Path:
    """Run every variant x seed of a continual study; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- report --------------------------------------------------------------------------------
def _curve_mean(results: list[dict[str, Any]], col: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and spread over seeds of task ``col``'s accuracy, or of the mean over seen tasks."""
    per_seed = []
    for r in results:
        steps = np.array(r["curves"]["steps"], dtype=float)
        acc = np.array([[np.nan if a is None else a for a in row] for row in r["curves"]["acc"]], dtype=float)
        y = acc[:, col] if col is not None else np.nanmean(acc, axis=1)
        per_seed.append((steps, y))
    grid = per_seed[0][0]
    ys = np.array([np.interp(grid, s, y, left=np.nan) if len(s) else grid * np.nan
                   for s, y in per_seed])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a task not yet seen
        return grid, np.nanmean(ys, 0), np.nanstd(ys, 0)


def _accuracy_matrix(result: dict[str, Any]) -> np.ndarray:
    """``R[i, j]``: accuracy on task j at the last evaluation at or before the end of task i (NaN where
    never evaluated), from one run's curves."""
    steps = np.array(result["curves"]["steps"], dtype=float)
    acc = np.array([[np.nan if a is None else a for a in row] for row in result["curves"]["acc"]], dtype=float)
    b = result["boundaries"]
    n = acc.shape[1] if acc.ndim == 2 else len(b)
    mat = np.full((len(b), n), np.nan)
    for i, end in enumerate(b):
        idx = np.flatnonzero(steps <= end)
        if idx.size:
            mat[i] = acc[idx[-1]]
    return mat


def _plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    results = [r for r in results if r.get("diverged_at") is None]  # flagged in the report's notice instead
    if not results:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_v = by_variant(results)
    variants = list(by_v)
    colors = plt.get_cmap("tab10")
    boundaries = results[0]["boundaries"]
    out: list[tuple[str, Path]] = []

    def bounds(ax: Any) -> None:
        for b in boundaries[:-1]:
            ax.axvline(b, color="#999", ls="--", lw=0.8)

    styles = ["-", "--", "-.", ":"]

    def style(i: int) -> dict[str, Any]:  # colour and dash both vary, so no line hides another
        return {"color": colors(i % 10), "ls": styles[i % len(styles)]}

    # 1. first task's accuracy over the whole stream, with a zoom (both axes) on the first switch where each
    #    seed is drawn thin: a mean over seeds smooths each seed's dip away
    fig, (ax, az) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    lo_y = 1.0
    window = None
    if len(boundaries) > 1:
        b0 = boundaries[0]
        span = boundaries[1] - b0
        window = (b0 - 0.1 * span, b0 + 0.6 * span)
    for i, v in enumerate(variants):
        x, m, sd = _curve_mean(by_v[v], 0)
        ax.plot(x, m, lw=1.3, label=v, **style(i))
        ax.fill_between(x, m - sd, m + sd, color=colors(i % 10), alpha=0.12)
        az.plot(x, m, lw=1.8, label=v, **style(i))
        for r in by_v[v]:
            steps = np.array(r["curves"]["steps"], dtype=float)
            acc = np.array([np.nan if row[0] is None else row[0] for row in r["curves"]["acc"]], dtype=float)
            az.plot(steps, acc, color=colors(i % 10), lw=0.6, alpha=0.5)
            if window is not None:
                after = (steps > boundaries[0]) & (steps <= window[1]) & np.isfinite(acc)
                if after.any():  # each seed's own minimum after the switch: the depth a mean would hide
                    j = np.flatnonzero(after)[np.argmin(acc[after])]
                    az.plot(steps[j], acc[j], marker="v", ms=6, color=colors(i % 10), ls="none")
                inside = acc[(steps >= window[0]) & (steps <= window[1])]
                # a variant that forgets everything (fine-tuning) would flatten the zoom: it stays in view
                # on the left panel, the zoom's y range follows the others
                if inside.size and np.nanmin(inside) > 0.05:
                    lo_y = min(lo_y, float(np.nanmin(inside)))
    bounds(ax)
    bounds(az)
    ax.set(xlabel="optimizer step", ylabel="accuracy on task 0", ylim=(-0.02, 1.02),
           title="Task 0 accuracy during the whole stream (mean ± std over seeds)")
    if window is not None:
        az.set_xlim(*window)
    az.set(xlabel="optimizer step", ylim=(max(-0.02, lo_y - 0.08), 1.02),
           title="Zoom on the first switch (thin: seeds; ▼ minima)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    p = run_dir / "task0_accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(("Accuracy on the first task: the dip after each switch is the stability gap", p))

    # 2. every task's curve, one panel per variant (the figure of De Lange et al.)
    n_tasks = len(boundaries)
    cols = min(3, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False, sharey=True)
    tcolors = plt.get_cmap("viridis")
    for k, v in enumerate(variants):
        ax = axes[k // cols][k % cols]
        for t in range(n_tasks):
            x, m, _ = _curve_mean(by_v[v], t)
            ax.plot(x, m, color=tcolors(t / max(1, n_tasks - 1)), lw=1.0, label=f"task {t}")
        bounds(ax)
        ax.set(title=v, ylim=(-0.02, 1.02), xlabel="optimizer step")
        if k % cols == 0:
            ax.set_ylabel("accuracy")
    for k in range(len(variants), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    p = run_dir / "task_curves.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    out.append(("Every task's accuracy, per variant (mean over seeds)", p))

    # 2b. the accuracy matrix: accuracy on task j (column) at the end of task i (row), mean over seeds
    if n_tasks > 1:
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
        for k, v in enumerate(variants):
            ax = axes[k // cols][k % cols]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a task not yet seen: NaN in every seed
                mat = np.nanmean(np.stack([_accuracy_matrix(r) for r in by_v[v]]), axis=0) \
                    if by_v[v] else np.full((n_tasks, n_tasks), np.nan)
            ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            for (a, b), val in np.ndenumerate(mat):
                if np.isfinite(val):
                    ax.text(b, a, f"{val:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if val < 0.5 else "black")
            ax.set(title=v, xticks=range(n_tasks), yticks=range(n_tasks))
            if k % cols == 0:
                ax.set_ylabel("after training task")
            if k // cols == rows - 1:
                ax.set_xlabel("accuracy on task")
        for k in range(len(variants), rows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.tight_layout()
        p = run_dir / "accuracy_matrix.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(("Accuracy matrix: row i, column j = accuracy on task j at the end of task i (mean over seeds; "
                    "below the diagonal: what is kept; blank: a task not yet seen)", p))

    # 3. average accuracy over seen tasks
    fig, ax = plt.subplots(figsize=(13, 3.8))
    for i, v in enumerate(variants):
        x, m, s = _curve_mean(by_v[v], None)
        ax.plot(x, m, color=colors(i), lw=1.2, label=v)
        ax.fill_between(x, m - s, m + s, color=colors(i), alpha=0.15)
    bounds(ax)
    ax.set(xlabel="optimizer step", ylabel="mean accuracy over seen tasks", ylim=(-0.02, 1.02),
           title="Average accuracy on the tasks seen so far")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    p = run_dir / "average_accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(("Average accuracy over the tasks seen so far", p))

    # 4. final metrics side by side, split by direction: higher is better | lower is better
    groups = [("higher is better", ["acc", "min_acc", "wc_acc"], ["ACC", "min-ACC", "WC-ACC"]),
              ("lower is better", ["forgetting", "gap_depth"], ["FORG", "gap depth"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(variants))
    for axb, (title, names, labels) in zip(axes, groups, strict=True):
        for i, v in enumerate(variants):
            vals = [[r["metrics"].get(k) for r in by_v[v]] for k in names]
            vals = [[np.nan if a is None else a for a in row] for row in vals]
            axb.bar(np.arange(len(names)) + i * width, [np.nanmean(a) for a in vals], width,
                    yerr=[np.nanstd(a) for a in vals], color=colors(i % 10), label=v, capsize=2)
        axb.set_xticks(np.arange(len(names)) + 0.4 - width / 2, labels)
        axb.set(ylim=(0, 1.05), title=f"Final metrics: {title}")
    axes[0].legend(fontsize=8, ncol=min(3, len(variants)))
    fig.tight_layout()
    p = run_dir / "metrics.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(("Final metrics per variant (mean ± std over seeds); left: higher is better, right: lower is better",
                p))
    return out


METRICS_NOTE = (
    "Mean ± sample std over seeds; ↑ higher is better, ↓ lower is better. ACC: final average accuracy; "
    "FORG: forgetting; min-ACC: mean over earlier "
    "tasks of their worst accuracy after being learned; WC-ACC: worst-case accuracy; WF<sup>w</sup>: windowed "
    "forgetting over w evaluations; gap depth: accuracy of a task at the switch minus its minimum during the next "
    "task, averaged over switches; recovery: steps after the switch until accuracy is back within ε of its switch "
    "value (mean over recovered switches). All accuracies on held-out data.")
GAP_NOTE = ("Accuracy on task 0 at the end of its own training, its minimum at any evaluation after that, its "
            "final value, and the depth and recovery time of the dip right after the first switch.")


def _continual_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    windows = config["eval"]["windows"]
    table = summarize(results, windows)
    metric_keys = ["acc", "forgetting", "bwt", "min_acc", "wc_acc", *[f"wf{w}" for w in windows],
                   "gap_depth", "gap_recovery"]
    metric_heads = ["ACC ↑", "FORG ↓", "BWT ↑", "min-ACC ↑", "WC-ACC ↑", *[f"WF<sup>{w}</sup> ↓" for w in windows],
                    "gap depth ↓", "recovery (steps) ↓"]
    gap_keys = ["task0_acc_at_end", "task0_min_after", "task0_acc_final", "task0_gap_depth", "task0_gap_recovery"]
    gap_heads = ["acc at end of task 0 ↑", "min after ↑", "final ↑", "gap depth ↓", "recovery (steps) ↓"]
    return [
        {"title": "Metrics per variant", "note": METRICS_NOTE, "heads": metric_heads,
         "rows": [[html.escape(v)] + [_fmt(row[k]) for k in metric_keys] for v, row in table.items()]},
        {"title": "The stability gap on the first task", "note": GAP_NOTE, "heads": gap_heads,
         "rows": [[html.escape(v)] + [_fmt(row[k]) for k in gap_keys] for v, row in table.items()]},
    ]




KIND = StudyKind(
    name="continual",
    Config=StudyConfig,
    example="stability-gap",
    variant_key="strategy",
    validate=validate,
    steps_per_run=lambda cfg: cfg.train.steps_per_task * cfg.workload.n_tasks,
    describe=lambda cfg: f"{cfg.workload.n_tasks} tasks x {cfg.train.steps_per_task} steps",
    run_one=run_one,
    summarize=lambda results, config: summarize(results, config["eval"]["windows"]),
    tables=_continual_tables,
    plots=_plots,
    columns=(("acc", "ACC"), ("forgetting", "FORG"), ("min_acc", "min-ACC"), ("wc_acc", "WC-ACC"),
             ("gap_depth", "gap"), ("task0_acc_at_end", "t0 end"), ("task0_min_after", "t0 min")),
    quick=("seeds=[0]", "train.steps_per_task=100"),
    resumable=True,
    resolve=resolve,
)

"""Run a study: every variant x seed of a recipe, continually evaluated, into a run dir.

Layout of a run directory::

    config.json                 the resolved config (after overrides and defaults)
    metrics/<variant>-s<seed>.jsonl   one line per optimizer step, flushed as written
    results/<variant>-s<seed>.json    final metrics and evaluation curves of that run
    summary.json                mean and std over seeds per variant (rewritten after each run)
    *.png, report.html          the report (``poise report RUN_DIR`` rebuilds it)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise import _registry
from poise.continual.loop import fit_stream
from poise.measure.evaluator import ContinualEvaluator, EvalSchedule, EvalSet
from poise.runs.config import StudyConfig
from poise.runs.store import JsonlWriter, atomic_write_json, new_run_dir
from poise.tasks.models import build_model

__all__ = ["run_study", "summarize"]

SCALARS = ("acc", "forgetting", "bwt", "min_acc", "wc_acc", "gap_depth", "gap_recovery")


def _optimizer(cfg: StudyConfig, params: Any) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def _strategy(name: str, params: dict[str, Any], seed: int) -> Any:
    cls = _registry.get("strategy", name)
    kwargs = dict(params)
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs["seed"] = seed
    return cls(**kwargs)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_one(cfg: StudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
            progress: Any = None) -> dict[str, Any]:
    """Train one variant with one seed; returns metrics and curves."""
    w = cfg.workload
    stream = _registry.get("stream", w.stream)(n_tasks=w.n_tasks, scenario=w.scenario)
    v = cfg.variants[variant_index]
    torch.manual_seed(seed)
    in_features = int(np.prod(stream.input_shape))
    model = build_model(w.model, in_features, stream.n_classes, w.hidden, w.depth)
    strategy = _strategy(v.strategy, v.params, seed)
    opt = _optimizer(cfg, model.parameters())
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
    from poise.distributed import is_main

    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    t0 = time.perf_counter()
    try:
        metrics = fit_stream(
            model, stream.tasks, strategy, opt, evaluator,
            steps_per_task=cfg.train.steps_per_task, batch_size=cfg.train.batch_size,
            n_classes=stream.n_classes, seed=seed,
            log=writer.write if writer else None, progress=progress,
            shard=False,  # under torchrun every rank trains the same model on the whole batch; evaluation is sharded
        )
    finally:
        if writer:
            writer.close()
    steps, acc = evaluator.curves()
    return {
        "variant": v.name, "strategy": v.strategy, "seed": seed,
        "wall_seconds": time.perf_counter() - t0,
        "metrics": metrics,
        "boundaries": [evaluator.boundaries[t] for t in evaluator.seen],
        "task_names": [t.name for t in stream.tasks],
        "curves": {"steps": steps.tolist(), "acc": acc.tolist()},
    }


def _stats(values: list[float]) -> dict[str, float | int]:
    a = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                 dtype=float)
    if len(a) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarize(results: list[dict[str, Any]], windows: list[int]) -> dict[str, Any]:
    """Mean and sample std over seeds of every scalar metric, per variant; plus the first
    task's accuracy at its end, its minimum afterwards, and its gap."""
    names = ([*SCALARS, *[f"wf{w}" for w in windows]])
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        row = {k: _stats([r["metrics"].get(k) for r in rs]) for k in names}
        t0 = [r["metrics"]["per_task"].get("0", {}) for r in rs]
        for k in ("acc_at_end", "min_after", "acc_final", "gap_depth", "gap_recovery"):
            row[f"task0_{k}"] = _stats([t.get(k) for t in t0])
        row["seeds"] = [r["seed"] for r in rs]
        row["wall_seconds"] = _stats([r["wall_seconds"] for r in rs])
        out[variant] = row
    return out


def execute(cfg: Any, run_dir: str | Path | None, progress: bool | None, report: bool, steps_per_run: int,
            run_one_fn: Any, summarize_fn: Any, kind: str, resumable: bool = False) -> Path:
    """Run every variant x seed of ``cfg`` with ``run_one_fn(cfg, i, seed, metrics_path,
    progress)``, write each result and a fresh ``summary.json`` (``summarize_fn(results)``)
    after every run, then the report. Shared by every study kind. Runs whose result file
    already exists are not run again (``poise run --resume``); an unfinished run starts again
    from scratch (its partial metrics file is replaced) unless ``resumable``: then the run
    function resumes from its own checkpoints and truncates its metrics file to them (the RL
    study does)."""
    from poise.distributed import is_main

    main = is_main()  # under torchrun every rank runs every run; rank 0 writes the files
    torch.set_num_threads(cfg.threads)
    path = Path(run_dir) if run_dir else new_run_dir(cfg.out_dir, cfg.name)
    if main:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / "config.json", dataclasses.asdict(cfg))
    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("CI") != "true"
    bar = _Progress(steps_per_run * len(cfg.variants) * len(cfg.seeds), progress and main)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def summary(complete: bool) -> dict[str, Any]:
        return {"study": cfg.name, "kind": kind, "complete": complete, "wall_seconds": time.perf_counter() - t0,
                "runs": len(results), "variants": summarize_fn(results)}

    try:
        for seed in cfg.seeds:
            for i, v in enumerate(cfg.variants):
                bar.describe(f"{v.name} seed {seed}")
                tag = f"{v.name}-s{seed}"
                done = path / "results" / f"{tag}.json"
                if _agreed(done.is_file()):  # resuming: this run finished before
                    results.append(json.loads(done.read_text()) if main else {})
                    bar.update(steps_per_run)
                    continue
                metrics = path / "metrics" / f"{tag}.jsonl"
                if main and not resumable and metrics.exists():
                    metrics.unlink()  # a partial run from an interrupted attempt: it starts again
                r = run_one_fn(cfg, i, seed, metrics, bar.update)
                results.append(r)
                if main:
                    atomic_write_json(done, r)
                    atomic_write_json(path / "summary.json", summary(False))
    finally:
        bar.close()
    if main:
        atomic_write_json(path / "summary.json", summary(True))
    if report and main:
        from poise.runs.report import build_report

        build_report(path)
    return path


def _agreed(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one run directory, maybe not shared by all machines)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def run_study(cfg: StudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
              report: bool = True) -> Path:
    """Run every variant x seed of a continual study; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, cfg.train.steps_per_task * cfg.workload.n_tasks, run_one,
                   lambda rs: summarize(rs, cfg.eval.windows), "continual")

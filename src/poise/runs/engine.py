"""Run a study: every variant x seed of a recipe, into a run directory. Kind-agnostic.

Layout of a run directory::

    config.json                 the resolved config (after overrides and defaults)
    metrics/<variant>-s<seed>.jsonl   one line per step, flushed as written
    results/<variant>-s<seed>.json    final metrics and curves of that run
    summary.json                mean and std over seeds per variant (rewritten after each run)
    *.png, report.html          the report (``poise report RUN_DIR`` rebuilds it)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from poise.runs.kinds import StudyKind, kind_of
from poise.runs.store import atomic_write_json, new_run_dir

__all__ = ["RunDirError", "config_hash", "execute", "run", "stats", "total_steps"]


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


def stats(values: list[float]) -> dict[str, float | int]:
    """Mean, sample std and count of the finite values (None and NaN left out)."""
    a = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                 dtype=float)
    if len(a) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


_stats = stats  # the name the study modules used


def by_variant(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each variant, variants in the order they first appear in ``results``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["variant"], []).append(r)
    return out


class RunDirError(ValueError):
    """A run directory that cannot be used as asked: it holds another study, or another process uses it."""


_STUDY_FILES = ("config.json", "run.json", "results", "metrics", "checkpoints", "summary.json")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of a study's config (``resolved`` aside) as canonical JSON: what ``run.json`` records."""
    import hashlib

    from poise.runs.store import _clean

    body = {k: v for k, v in config.items() if k != "resolved"}
    return hashlib.sha256(json.dumps(_clean(body), sort_keys=True).encode()).hexdigest()


def _claim_run_dir(path: Path, config: dict[str, Any], resume: bool) -> Any:
    """Check that ``path`` may take this study and lock it for this process (the lock is held
    until the returned file is closed). A new run needs an empty or new folder; ``resume`` needs
    the folder's own study: its ``config.json`` equal to ``config`` (``resolved`` aside) and
    unchanged since the study began (the hash in ``run.json``)."""
    import fcntl

    held = [n for n in _STUDY_FILES if (path / n).exists()]
    if held == ["run.json"]:  # killed between run.json and config.json: nothing of a study was written
        held = []
    if resume:
        stored_path = path / "config.json"
        if not stored_path.is_file():
            raise RunDirError(f"{path} is not a run directory (no config.json): nothing to resume")
        try:
            stored = {k: v for k, v in json.loads(stored_path.read_text()).items() if k != "resolved"}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{stored_path} is not readable JSON ({e}); the run cannot be resumed") from None
        run_json = path / "run.json"
        if run_json.is_file():
            try:
                recorded = json.loads(run_json.read_text()).get("config_sha256")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise RunDirError(f"{run_json} is not readable JSON; the run cannot be resumed") from None
            if recorded and recorded != config_hash(stored):
                raise RunDirError(f"{stored_path} was changed after the study began (its hash is not the one in "
                                  f"{run_json}): results made with two configs would mix; start a new --run-dir")
        diff = sorted(k for k in stored if stored[k] != config.get(k))  # fields added since: their defaults
        if diff:
            raise RunDirError(f"{path} holds a study with another config (differs in: {', '.join(diff)}); "
                              "resume it with its own config (poise run --resume RUN_DIR) or use a new --run-dir")
    elif held:
        raise RunDirError(f"{path} already holds a study ({', '.join(held)}): continue it with "
                          f"`poise run --resume {path}`, or give a new or empty --run-dir (results of two studies "
                          "are never mixed)")
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / ".lock", "a+")  # noqa: SIM115 - held for the run, closed by the caller
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        who = lock.read().strip() or "?"
        lock.close()
        raise RunDirError(f"{path} is in use by another poise process (pid {who}); wait for it or use another "
                          "--run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    for tmp in path.rglob(".*.tmp"):  # temporaries of a killed write (we hold the lock: nobody else writes)
        tmp.unlink(missing_ok=True)
    return lock


def total_steps(cfg: Any, kind: StudyKind | None = None) -> int:
    """Progress steps of the whole study: each variant's (its own config, for a sweep) times the seeds."""
    from poise.runs.config import variant_config

    kind = kind or kind_of(cfg)
    return sum(kind.steps_per_run(variant_config(cfg, i)) for i in range(len(cfg.variants))) * len(cfg.seeds)


def check_size(cfg: Any, kind: StudyKind, allow_large: bool) -> None:
    """Refuse (``ConfigError``) a study above its kind's ``large`` steps unless ``allow_large``."""
    from poise.runs.config import ConfigError

    n_steps = total_steps(cfg, kind)
    if n_steps > kind.large and not allow_large:
        raise ConfigError(f"this study has {n_steps:,} steps over {len(cfg.variants)} variants x {len(cfg.seeds)} "
                          f"seeds, above the {kind.large:,} a {kind.name} study runs without confirmation: check the "
                          "sizes, or confirm with --allow-large (run(..., allow_large=True))")


def execute(cfg: Any, run_dir: str | Path | None, progress: bool | None, report: bool,
            kind: StudyKind | None = None, resume: bool = False, allow_large: bool = False,
            command: str | None = None, jobs: int = 1) -> Path:
    """Run every variant x seed of ``cfg`` with its kind's ``run_one(cfg, i, seed, metrics_path,
    progress)``, write each result and a fresh ``summary.json`` (the kind's ``summarize``) after
    every run, then ``summary.csv``, ``runs.csv``, ``summary.md`` and the report. Runs whose result file
    already exists are not run again (``poise run --resume``); an unfinished run starts again from
    scratch (its partial metrics file is replaced) unless the kind is ``resumable``: then the run
    function resumes from its own checkpoints and truncates its metrics file to them (the RL and
    continual studies do).

    ``run_dir`` must be new or empty, unless ``resume``: then it must hold this very study (its
    ``config.json``, unchanged since the study began: ``run.json`` records its hash); the folder is
    locked while the study runs, so two processes never write into one, and every file written is
    checked to lie inside it. A study above the kind's ``large`` steps needs ``allow_large``.
    Without a progress bar (output not a terminal), one line per finished run goes to stderr.
    An interrupt (Ctrl-C) carries the run directory as ``KeyboardInterrupt.run_dir``. ``command``
    (the command line that started it) is recorded in ``run.json`` and shown in the report.

    ``jobs > 1`` runs that many runs at once, each in its own process (spawned) with
    ``max(1, threads // jobs)`` torch threads; results, files and summaries are those of one process
    running the same runs with that many threads, in the same order (every run seeds itself). The
    progress bar then advances by whole runs. Not under torchrun (one process per rank already)."""
    import torch

    from poise.distributed import is_main
    from poise.runs.config import ConfigError
    from poise.runs.store import writing_into

    kind = kind or kind_of(cfg)
    check_size(cfg, kind, allow_large)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r}; valid: an integer >= 1 (runs at once)")
    main = is_main()  # under torchrun every rank runs every run; rank 0 writes the files
    if jobs > 1 and _world() > 1:
        raise ConfigError(f"jobs={jobs}: under torchrun every rank is already a process; use jobs=1")
    torch.set_num_threads(cfg.threads)
    path = Path(run_dir) if run_dir else new_run_dir(cfg.out_dir, cfg.name)
    config = dataclasses.asdict(cfg)
    lock = None
    if main:
        lock = _claim_run_dir(path, config, resume)
    try:
        with writing_into(path):
            return _execute(cfg, path, progress, report, kind, config, main, resume, command, jobs)
    except (KeyboardInterrupt, OSError) as e:  # the CLI names the folder and the resume command
        e.run_dir = path  # type: ignore[union-attr]
        raise
    finally:
        if lock is not None:
            lock.close()


def _execute(cfg: Any, path: Path, progress: bool | None, report: bool, kind: StudyKind, config: dict[str, Any],
             main: bool, resume: bool = False, command: str | None = None, jobs: int = 1) -> Path:
    if main:
        resolved = kind.resolve(cfg) if kind.resolve else None
        atomic_write_json(path / "config.json", {**config, "resolved": resolved} if resolved else config)
        if not (resume and (path / "run.json").is_file()):  # after config.json: a folder with one has the other
            import poise

            atomic_write_json(path / "run.json", {"config_sha256": config_hash(config), "command": command,
                                                  "poise": poise.__version__,
                                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if progress is None:
        progress = sys.stderr.isatty() and os.environ.get("CI") != "true"
    from poise.runs.config import variant_config

    total = len(cfg.variants) * len(cfg.seeds)
    cfgs = [variant_config(cfg, i) for i in range(len(cfg.variants))]  # a sweep's variants carry their own values
    steps = [kind.steps_per_run(c) for c in cfgs]
    bar = _Progress(sum(steps) * len(cfg.seeds), progress and main)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def summary(complete: bool) -> dict[str, Any]:
        return {"study": cfg.name, "kind": kind.name, "complete": complete, "quick": bool(getattr(cfg, "quick", False)),
                "wall_seconds": time.perf_counter() - t0, "runs": len(results),
                **summarize_results(kind, config, results, getattr(cfg, "claims", []))}

    order = [(seed, i) for seed in cfg.seeds for i in range(len(cfg.variants))]
    by_run: dict[tuple[int, int], dict[str, Any]] = {}

    def finished(seed: int, i: int, r: dict[str, Any], seconds: float) -> None:
        by_run[(seed, i)] = r
        results[:] = [by_run[k] for k in order if k in by_run]  # the order of a one-process run, always
        v = cfg.variants[i]
        if main and not (progress and bar.bar is not None):  # no bar: a line per run, so logs show life
            how = f"diverged at step {r['diverged_at']}" if r.get("diverged_at") is not None else "done"
            print(f"[{len(results)}/{total}] {v.name} seed {seed}: {how} in {seconds:.0f} s", file=sys.stderr,
                  flush=True)
        if main:
            atomic_write_json(path / "results" / f"{v.name}-s{seed}.json", r)
            atomic_write_json(path / "summary.json", summary(False))
            _track(getattr(cfg, "tracking", []), path, f"{v.name}-s{seed}")

    todo = []
    for seed, i in order:
        v = cfg.variants[i]
        tag = f"{v.name}-s{seed}"
        done = path / "results" / f"{tag}.json"
        if _agreed(done.is_file()):  # resuming: this run finished before
            by_run[(seed, i)] = _read_result(done) if main else {}
            bar.update(steps[i])
            continue
        metrics = path / "metrics" / f"{tag}.jsonl"
        if main and not kind.resumable and metrics.exists():
            metrics.unlink()  # a partial run from an interrupted attempt: it starts again
        todo.append((seed, i, metrics))
    results[:] = [by_run[k] for k in order if k in by_run]
    try:
        if jobs > 1 and len(todo) > 1:
            _run_parallel(kind, cfgs, todo, jobs, max(1, cfg.threads // jobs), path, bar, steps, finished)
        else:
            for seed, i, metrics in todo:
                bar.describe(f"{cfg.variants[i].name} seed {seed}")
                t_run = time.perf_counter()
                r = kind.run_one(cfgs[i], i, seed, metrics, bar.update)
                finished(seed, i, r, time.perf_counter() - t_run)
    finally:
        bar.close()
    if main:
        atomic_write_json(path / "summary.json", summary(True))
        from poise.runs.report import build_report, write_summaries

        if report:
            build_report(path)  # writes summary.csv, runs.csv and summary.md too
        else:
            write_summaries(path)
    return path


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _one_run(run_one: Any, cfg: Any, i: int, seed: int, metrics: Path, threads: int,
             root: Path) -> tuple[dict[str, Any], float]:
    """A run in a worker process: its own torch threads, writes checked against the run directory."""
    import torch

    from poise.runs.store import writing_into

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with writing_into(root):
        r = run_one(cfg, i, seed, metrics, lambda n: None)
    return r, time.perf_counter() - t0


def _run_parallel(kind: StudyKind, cfgs: list[Any], todo: list[tuple[int, int, Path]], jobs: int, threads: int,
                  root: Path, bar: _Progress, steps: list[int], finished: Any) -> None:
    """``todo`` on ``jobs`` spawned processes; each result is handed to ``finished`` as it arrives. The
    first error stops the pool (runs not started are cancelled) and is raised here."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_one_run, kind.run_one, cfgs[i], i, seed, metrics, threads, root): (seed, i)
                   for seed, i, metrics in todo}
        bar.describe(f"{len(todo)} runs, {min(jobs, len(todo))} at once")
        try:
            for fut in cf.as_completed(futures):
                seed, i = futures[fut]
                r, seconds = fut.result()
                bar.update(steps[i])
                finished(seed, i, r, seconds)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _read_result(path: Path) -> dict[str, Any]:
    try:
        r = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not readable JSON ({e}); delete it to run that run again") from None
    if not isinstance(r, dict) or "variant" not in r:
        raise RunDirError(f"{path} is not a poise result; delete it to run that run again")
    return r


_TRACK_FAILED: set[str] = set()


def _track(trackers: list[str], path: Path, tag: str) -> None:
    """Send a finished run's metric lines (at their own steps) and final metrics to the recipe's
    trackers. A tracker that fails warns once and is skipped from then on: the study goes on."""
    import warnings

    for t in trackers:
        if t in _TRACK_FAILED:
            continue
        try:
            from poise.integrations.trackers import export_run

            export_run(path, t, runs=[tag])
        except Exception as e:  # noqa: BLE001 - a tracker must never break the study
            _TRACK_FAILED.add(t)
            warnings.warn(f"tracker {t!r} failed on run {tag} ({type(e).__name__}: {e}); the study goes on without "
                          "it (poise export RUN_DIR --to ... can send the run later)", RuntimeWarning, stacklevel=2)


def summarize_results(kind: StudyKind, config: dict[str, Any], results: list[dict[str, Any]],
                      claims: list[Any]) -> dict[str, Any]:
    """``variants`` (the kind's summary over the runs that did not diverge, plus per variant
    ``diverged``: count, runs and ``at`` = [[seed, step], ...]) and ``claims`` (each one's verdict,
    :func:`poise.runs.verdict.evaluate_claim`). A diverged run is a result: it is counted and
    named, never averaged into a mean."""
    from poise.runs.verdict import evaluate_claim

    ok = [r for r in results if r.get("diverged_at") is None]
    rows = kind.summarize(ok, config)
    for v, rs in by_variant(results).items():
        bad = [[r["seed"], r["diverged_at"]] for r in rs if r.get("diverged_at") is not None]
        rows.setdefault(v, {"seeds": [r["seed"] for r in rs]})
        rows[v]["diverged"] = {"count": len(bad), "runs": len(rs), "at": bad}
    order = list(dict.fromkeys(r["variant"] for r in results))
    rows = {v: rows[v] for v in order if v in rows}
    claims_out = []
    for c in claims:
        from poise.runs.verdict import ClaimConfig, Side

        if isinstance(c, dict):  # from a stored config.json
            c = ClaimConfig(**{**c, "better": Side(**c["better"]), "than": Side(**c["than"])})  # type: ignore[arg-type]
        claims_out.append(evaluate_claim(c, results))
    return {"variants": rows, "claims": claims_out}


def run(cfg: Any, run_dir: str | Path | None = None, progress: bool | None = None, report: bool = True,
        resume: bool = False, allow_large: bool = False, jobs: int = 1) -> Path:
    """Run a study of any kind (the kind is ``cfg.kind``); write the run directory; return its path.
    See :func:`execute`."""
    return execute(cfg, run_dir, progress, report, resume=resume, allow_large=allow_large, jobs=jobs)


def _agreed(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one run directory, maybe not shared by all machines)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])

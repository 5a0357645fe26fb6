"""``poise``: run studies, list what is registered, rebuild reports, print the environment.

    poise run [RECIPE] [key=value ...]   run a study (default recipe: stability-gap)
    poise list [KIND]                    recipes, strategies, metrics, streams, models
    poise report RUN_DIR                 rebuild a run directory's plots and report.html
    poise export RUN_DIR --to T [T ...]  send a run directory to TensorBoard, W&B, MLflow or trackio
    poise env                            versions and threads, for bug reports
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import textwrap
from pathlib import Path

__all__ = ["main"]


def _fields_epilog() -> str:
    from poise.runs.config import field_help
    from poise.runs.kinds import get_kind, kind_names

    lines = []
    for i, name in enumerate(kind_names()):
        k = get_kind(name)
        if i == 0:
            lines += [f"recipe fields (set in the TOML or as key=value overrides; kind = \"{name}\", the default):",
                      ""]
        else:
            lines += ["", f"recipes with kind = \"{name}\" (e.g. `poise run {k.example}`) have these fields instead:",
                      ""]
        for key, tp, default, help_ in field_help(k.Config):
            lines.append(f"  {key}  ({tp}, default {default})")
            lines.extend(textwrap.wrap(help_, 88, initial_indent="      ", subsequent_indent="      "))
    lines += [
        "",
        "  each [[variants]] table: name (label), strategy (registry name), params (its",
        "  keyword arguments; `poise list strategies` shows them).",
        "",
        "overrides: dotted keys, TOML values; variants.NAME.KEY addresses one variant:",
        "  poise run train.lr=0.1 seeds=[0] variants.replay.params.mem_size=500",
        "sweeps: a value with commas makes one variant per value, named by it (several multiply):",
        "  poise run tiny train.lr=0.01,0.1          -> finetune[lr=0.01], finetune[lr=0.1], replay[lr=0.01], ...",
        "  poise run tiny variants.replay.params.mem_size=10,50   (only the replay variant is copied)",
    ]
    return "\n".join(lines)


EXIT_CODES = """exit codes:
  0  done (a diverged run is a result: it is flagged in the table, not an error)
  1  a file or folder problem, named in the message: missing run directory or recipe, a run directory
     that holds another study or is in use, a corrupt checkpoint, a full disk or a permission denied
     (written results are kept: fix the cause and `poise run --resume RUN_DIR`), or a missing extra
  2  a bad recipe, override or command line (the key and the valid choices are named)
  3  training stopped by an update guard (non-finite gradients kept coming)
  130 interrupted (Ctrl-C); the message names the run directory and the resume command
--debug (before the command: poise --debug run ...) shows the Python traceback of any of these."""


def _parser(fields: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``fields``: give ``run`` its epilog of every kind's recipe fields (it imports
    every study kind, so it is built only when ``poise run --help`` asks for it)."""
    p = argparse.ArgumentParser(prog="poise", description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run a study (every variant x seed) and write a run directory",
        description="Run every variant x seed of a recipe with continual evaluation, and write "
        "runs/<timestamp>-<recipe>/ with config.json, per-step metrics (JSON Lines), "
        "summary.json, PNG plots and report.html. RECIPE is a built-in name (poise list recipes), "
        "recipes/<name>.toml under the current folder, or a path; without it the default study "
        "runs. Under torchrun (torchrun --nproc_per_node=N -m poise.cli run RECIPE --run-dir DIR) every "
        "rank runs the study, rank 0 writes DIR (required), evaluation is sharded and RL policies train "
        "through DDP; see docs/distributed.md.",
        epilog=_fields_epilog() if fields else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", nargs="?", default=None, help="recipe name or .toml path")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    run.add_argument("--run-dir", default=None, help="write into this folder instead of a new one")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue an interrupted run directory with its own config.json: finished runs are kept, "
                     "RL runs restart from their last checkpoint")
    run.add_argument("--no-report", action="store_true", help="skip the plots and report.html")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--dry-run", action="store_true", help="validate and print the config, run nothing")
    run.add_argument("--allow-large", action="store_true",
                     help="run a study above its kind's size limit (250,000 steps over all variants and seeds; "
                     "rl: 25,000), which is otherwise refused before it starts (and by --dry-run)")
    run.add_argument("--jobs", default="1", metavar="N",
                     help="runs at once, each in its own process with threads/N torch threads ('auto': one per CPU); "
                     "the results are those of one process running them in turn (default 1)")
    run.add_argument("--quick", action="store_true",
                     help="smoke-test size: one seed and fewer steps, labelled 'not for conclusions' (each built-in "
                     "recipe took 7-28 s on 2 idle CPU cores; README has the table)")
    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", nargs="?", default=None, choices=list(LISTS))
    exp = sub.add_parser("export", help="send a run directory's metrics to TensorBoard, W&B, MLflow or trackio",
                         description="Replay RUN_DIR's metrics/<run>.jsonl (every line at its own step) and results "
                         "into trackers: one tracker run per variant x seed, with the config as its parameters. "
                         "TensorBoard writes under RUN_DIR/tensorboard, MLflow to MLFLOW_TRACKING_URI or "
                         "RUN_DIR/mlflow.db, W&B offline under RUN_DIR unless WANDB_MODE is set.")
    exp.add_argument("run_dir")
    exp.add_argument("--to", required=True, nargs="+", choices=["tensorboard", "wandb", "mlflow", "trackio"])
    exp.add_argument("--project", default=None, help="W&B / MLflow / trackio project (default: the study name)")
    exp.add_argument("--runs", nargs="*", default=None, metavar="TAG", help="only these runs (e.g. replay-s0)")
    rep = sub.add_parser("report", help="rebuild the plots and report.html of a run directory")
    rep.add_argument("run_dir")
    sub.add_parser("env", help="versions and threads")
    return p


def _split_recipe(recipe: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    # `poise run train.lr=0.1`: the first positional is an override, not a recipe
    if recipe is not None and "=" in recipe:
        return None, [recipe, *overrides]
    return recipe, overrides


def _cmd_run(args: argparse.Namespace) -> int:
    from poise.distributed import init_from_env, is_main
    from poise.runs.config import load_recipe
    from poise.runs.engine import execute
    from poise.runs.kinds import kind_of

    _, world = init_from_env()  # under torchrun: join the process group (every rank runs the study; rank 0 writes)
    recipe, overrides = _split_recipe(args.recipe, args.overrides)
    jobs = _jobs(args.jobs)  # refused before anything is loaded or run
    if args.resume:
        from poise.runs.config import from_dict

        cfg_path = Path(args.resume) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{args.resume} is not a run directory (no config.json)")
        if recipe or overrides:
            print("poise: --resume uses the run directory's own config; recipe and overrides are ignored",
                  file=sys.stderr)
        from poise.runs.engine import RunDirError

        try:
            stored = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{cfg_path} is not readable JSON ({e}): this run directory cannot be resumed") from None
        if not isinstance(stored, dict):
            raise RunDirError(f"{cfg_path} is not a poise config (a JSON object): this run directory cannot be resumed")
        cfg = from_dict(stored)
        args.run_dir = args.resume
    else:
        cfg = load_recipe(recipe, overrides, quick=args.quick)
    if args.dry_run:
        import dataclasses

        from poise.runs.engine import check_size

        check_size(cfg, kind_of(cfg), args.allow_large)  # a dry run says what the real one would refuse

        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    n = len(cfg.variants) * len(cfg.seeds)
    kind = kind_of(cfg)
    if is_main():
        print(f"poise run {cfg.name} ({kind.name}): {len(cfg.variants)} variants x {len(cfg.seeds)} seeds = {n} runs, "
              f"{kind.describe(cfg)} each", file=sys.stderr)
    if world > 1 and not args.run_dir:
        raise FileNotFoundError("under torchrun give --run-dir (the same path on every rank)")
    import shlex

    command = "poise " + " ".join(shlex.quote(a) for a in args.argv)
    path = execute(cfg, args.run_dir, False if args.no_progress else None, not args.no_report, kind,
                   resume=bool(args.resume), allow_large=args.allow_large, command=command, jobs=jobs)
    if not is_main():
        return 0
    print_summary(json.loads((path / "summary.json").read_text()), kind.columns)
    print(f"\nrun directory: {path}")
    if (path / "report.html").exists():
        print(f"report:        {path / 'report.html'}")
    return 0


def _cell(st: object) -> str:
    """One summary statistic as text: ``mean ± std``, ``count / runs``, or ``–`` when missing."""
    if isinstance(st, dict) and "count" in st:
        return f"{st['count']} / {st['runs']}"
    m = st.get("mean") if isinstance(st, dict) else None
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if st.get("n") == 1:  # one seed: no spread to show (never "± 0.000")
        return f"{m:.3f}"
    return f"{m:.3f} ± {st.get('std') or 0.0:<5.3f}"


def print_summary(summary: dict, columns: tuple[tuple[str, str], ...]) -> None:
    """The summary table of any study kind: one row per variant, its kind's ``columns`` (and
    ``diverged`` when a run diverged), then the diverged runs and the claims' verdicts."""
    rows = summary["variants"].values()
    if any((r.get("diverged") or {}).get("count") for r in rows) and "diverged" not in dict(columns):
        columns = (*columns, ("diverged", "diverged"))
    if summary.get("quick"):
        print("\nSMOKE RUN (--quick): one seed, fewer steps; not for conclusions.")
    widths = [max(16, len(h) + 2) for _, h in columns]  # a long metric name never runs into its neighbour
    names = list(summary["variants"])
    first = max([12, *(len(v) + 2 for v in names)])
    if "wall_seconds" in summary:
        print(f"\n{len(names)} variants, {summary.get('runs', '?')} runs, {summary['wall_seconds']:.0f} s")
    print(f"\n{'variant':<{first}}" + "".join(h.rjust(w) for (_, h), w in zip(columns, widths, strict=True)))
    for name, row in summary["variants"].items():
        print(f"{name:<{first}}" + "".join(_cell(row.get(k)).rjust(w)
                                          for (k, _), w in zip(columns, widths, strict=True)))
    for name, row in summary["variants"].items():
        for seed, step in (row.get("diverged") or {}).get("at", []):
            print(f"  {name} (seed {seed}): diverged at step {step}; left out of the means")
    for c in summary.get("claims") or []:
        ci = "" if not c.get("interval") else f", 95% interval [{c['interval'][0]:.4g}, {c['interval'][1]:.4g}]"
        est = "" if c.get("estimate") is None else f": estimate {c['estimate']:.4g}{ci}"
        print(f"\nclaim ({c['paper']}): {c['text']}\n  {c['better']} - {c['than']} > {c['margin']:g}{est} over "
              f"{c['n']} seeds -> {c['verdict'].upper()} ({c['why']})")


LISTS = {  # what `poise list` shows: a registry kind, or one of the workbench's own lists
    "recipes": None, "kinds": None, "strategies": "strategy", "optimizers": "optimizer", "editors": "editor",
    "losses": "loss", "advantages": "advantage", "metrics": "metric", "streams": "stream", "models": "model",
    "rl_tasks": "rl_task",
}
_SIGNATURE_KINDS = ("strategy", "optimizer", "editor")  # constructors whose defaults a recipe may override
_NOT_SETTABLE = ("self", "params", "loss_fn", "reference", "seed", "diagnostics")  # set by code, not by a recipe


def _signature(obj: object) -> str:
    """``(a, b=1, ...)`` of a class's constructor: the arguments a recipe can set, with defaults
    (``self``, ``params``, ``*args`` and ``**kwargs`` left out)."""
    import inspect

    try:
        sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)  # type: ignore[misc]
    except (TypeError, ValueError):
        return ""
    parts = []
    for k, p in sig.parameters.items():
        if k in _NOT_SETTABLE or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        parts.append(k if p.default is p.empty else f"{k}={p.default!r}")
    return "(" + ", ".join(parts) + ")"


def _first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph (a period before a capital ends it)."""
    import re

    text = " ".join(text.split("\n\n")[0].split("::")[0].split())
    m = re.search(r"\.\s+(?=[A-Z])", text)
    return text if m is None else text[: m.start() + 1]


def _cmd_list(args: argparse.Namespace) -> int:
    import inspect
    import tomllib

    from poise import _registry
    from poise.runs.config import find_recipe, recipe_names
    from poise.runs.kinds import get_kind, kind_names

    for what in [args.kind] if args.kind else list(LISTS):
        print(f"{what}:")
        if what == "recipes":
            for n in recipe_names():
                data = tomllib.loads(find_recipe(n)[1])
                print(f"  {n}  (kind {data.get('kind', 'continual')})")
                if data.get("description"):
                    print(textwrap.fill(_first_sentence(data["description"]), 96, initial_indent="      ",
                                        subsequent_indent="      "))
        elif what == "kinds":
            for n in kind_names():
                k = get_kind(n)
                doc = _first_sentence(inspect.getdoc(importlib.import_module(k.run_one.__module__)) or "")
                print(f"  {n}  (e.g. poise run {k.example})")
                if doc:
                    print(textwrap.fill(doc, 96, initial_indent="      ", subsequent_indent="      "))
        else:
            reg = LISTS[what]
            for n in _registry.names(reg):
                obj = _registry.get(reg, n)
                extra = _signature(obj) if reg in _SIGNATURE_KINDS else ""
                print(f"  {n}{extra}")
                doc = _first_sentence(inspect.getdoc(obj) or "")
                if doc:
                    print(textwrap.fill(doc, 96, initial_indent="      ", subsequent_indent="      "))
        print()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from poise.integrations.trackers import export_run

    if not (Path(args.run_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a run directory (no config.json)")
    try:
        written = export_run(args.run_dir, to=args.to, project=args.project, runs=args.runs)
    except ValueError as e:
        print(f"poise: {e}", file=sys.stderr)
        return 2
    for run, n in written.items():
        print(f"{run}: {n} metric lines -> {', '.join(args.to)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from poise.runs.report import build_report

    print(build_report(Path(args.run_dir)))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    import numpy
    import torch

    import poise

    print(f"poise    {poise.__version__}")
    print(f"python   {platform.python_version()} ({platform.platform()})")
    print(f"torch    {torch.__version__} (threads {torch.get_num_threads()}, "
          f"interop {torch.get_num_interop_threads()}, cuda {torch.cuda.is_available()})")
    print(f"numpy    {numpy.__version__}")
    for mod in ("sklearn", "matplotlib", "jinja2", "tqdm", "transformers"):
        try:
            m = __import__(mod)
            print(f"{mod:<8} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod:<8} (not installed)")
    print(f"cpus     {os.cpu_count()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    return 0


def _jobs(text: str) -> int:
    """``--jobs``: an integer >= 1 or 'auto' (the CPUs this process may use)."""
    import os

    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        from poise.runs.config import ConfigError

        raise ConfigError(f"--jobs {text!r}; valid: an integer >= 1 or 'auto'")
    return n


def main(argv: list[str] | None = None) -> int:
    """``poise``: returns the exit code (see ``poise --help``)."""
    return _run_command(argv)


def _dispatch(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(fields=bool(argv) and argv[0] == "run" and any(a in ("-h", "--help") for a in argv))
    # overrides may follow options (`poise run tiny --no-report seeds=[0]`): argparse leaves
    # those over, and they are overrides when they look like key=value
    args, extra = parser.parse_known_args(argv)
    args.argv = list(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "run"]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"run": _cmd_run, "list": _cmd_list, "report": _cmd_report, "export": _cmd_export,
                "env": _cmd_env}[args.command](args)
    except Exception:
        if args.debug:
            import traceback

            traceback.print_exc()
        raise


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a kill from a scheduler ends like Ctrl-C: results kept, resume command printed


def _run_command(argv: list[str] | None) -> int:
    """The command, with every expected failure turned into one line and its exit code."""
    import signal
    import threading

    from poise.runs.config import ConfigError

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_guarded(argv, ConfigError)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run_guarded(argv: list[str] | None, ConfigError: type) -> int:  # noqa: N803 - the class, passed in
    try:
        return _dispatch(argv)
    except ConfigError as e:
        print(f"poise: bad config: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as e:
        print(f"poise: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        from poise.runs.checkpoint import CheckpointError
        from poise.runs.engine import RunDirError

        if not isinstance(e, (CheckpointError, RunDirError)):
            raise
        print(f"poise: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `poise list | head`: the reader has gone; nothing is wrong with the run
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
    except OSError as e:  # a full disk, a read-only or vanished run directory
        where = f" ({e.filename})" if e.filename else ""
        run_dir = getattr(e, "run_dir", None) or "RUN_DIR"
        print(f"poise: cannot write{where}: {e.strerror or e}. Every metric line and result written before is "
              f"kept; fix the cause and continue with `poise run --resume {run_dir}`.", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # update guards gave up: non-finite gradients kept coming
        print(f"poise: training stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        where = getattr(e, "run_dir", None)
        tail = (f" in {where}; continue with `poise run --resume {where}`" if where
                else " in the run directory")
        print(f"\npoise: interrupted; finished runs and checkpoints are kept{tail}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

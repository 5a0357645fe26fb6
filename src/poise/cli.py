"""``poise``: run studies, list what is registered, rebuild reports, print the environment.

    poise run [RECIPE] [key=value ...]   run a study (default recipe: stability-gap)
    poise list [KIND]                    recipes, strategies, metrics, streams, models
    poise report RUN_DIR                 rebuild a run directory's plots and report.html
    poise env                            versions and threads, for bug reports
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import textwrap
from pathlib import Path

__all__ = ["main"]


def _fields_epilog() -> str:
    from poise.runs.config import EditStudyConfig, OptimStudyConfig, PrimingStudyConfig, RLStudyConfig, field_help

    lines = ["recipe fields (set in the TOML or as key=value overrides):", ""]
    for key, tp, default, help_ in field_help():
        lines.append(f"  {key}  ({tp}, default {default})")
        lines.extend(textwrap.wrap(help_, 88, initial_indent="      ", subsequent_indent="      "))
    for kind, example, cls in (("optimizers", "optimizers", OptimStudyConfig), ("rl", "rl-stability", RLStudyConfig),
                               ("edit", "edit-stream", EditStudyConfig), ("priming", "priming", PrimingStudyConfig)):
        lines += ["", f"recipes with kind = \"{kind}\" (e.g. `poise run {example}`) have these fields instead:", ""]
        for key, tp, default, help_ in field_help(cls):
            lines.append(f"  {key}  ({tp}, default {default})")
            lines.extend(textwrap.wrap(help_, 88, initial_indent="      ", subsequent_indent="      "))
    lines += [
        "",
        "  each [[variants]] table: name (label), strategy (registry name), params (its",
        "  keyword arguments; `poise list strategies` shows them).",
        "",
        "overrides: dotted keys, TOML values; variants.NAME.KEY addresses one variant:",
        "  poise run train.lr=0.1 seeds=[0] variants.replay.params.mem_size=500",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
        epilog=_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", nargs="?", default=None, help="recipe name or .toml path")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    run.add_argument("--run-dir", default=None, help="write into this folder instead of a new one")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue an interrupted run directory with its own config.json: finished runs are kept, "
                     "RL runs restart from their last checkpoint")
    run.add_argument("--no-report", action="store_true", help="skip the plots and report.html")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--dry-run", action="store_true", help="validate and print the config, run nothing")
    run.add_argument("--quick", action="store_true",
                     help="smoke-test size: one seed and fewer steps (rl-stability: under 2 minutes)")
    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", nargs="?", default=None,
                    choices=["recipes", "strategies", "optimizers", "losses", "advantages", "metrics", "streams",
                             "models"])
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
    from poise.runs.config import EditStudyConfig, OptimStudyConfig, PrimingStudyConfig, RLStudyConfig, load_recipe
    from poise.runs.edit_study import run_edit_study
    from poise.runs.optim_study import run_optim_study
    from poise.runs.priming_study import run_priming_study
    from poise.runs.rl_study import run_rl_study
    from poise.runs.study import run_study

    _, world = init_from_env()  # under torchrun: join the process group (every rank runs the study; rank 0 writes)
    recipe, overrides = _split_recipe(args.recipe, args.overrides)
    if args.resume:
        from poise.runs.config import from_dict

        cfg_path = Path(args.resume) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{args.resume} is not a run directory (no config.json)")
        if recipe or overrides:
            print("poise: --resume uses the run directory's own config; recipe and overrides are ignored",
                  file=sys.stderr)
        cfg = from_dict(json.loads(cfg_path.read_text()))
        args.run_dir = args.resume
    else:
        cfg = load_recipe(recipe, overrides, quick=args.quick)
    if args.dry_run:
        import dataclasses

        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    n = len(cfg.variants) * len(cfg.seeds)
    if isinstance(cfg, OptimStudyConfig):
        what, runner, show = f"{cfg.lm.steps} steps", run_optim_study, _print_optim_summary
    elif isinstance(cfg, RLStudyConfig):
        what, runner, show = f"{cfg.train.steps} RL steps", run_rl_study, _print_rl_summary
    elif isinstance(cfg, EditStudyConfig):
        what, runner = f"{cfg.stream.n_edits} edits", run_edit_study
        show = _table_printer(("efficacy", "paraphrase", "retention_early", "locality", "general_loss", "forget_acc"))
    elif isinstance(cfg, PrimingStudyConfig):
        what, runner = f"{cfg.priming.n_probes} facts learned", run_priming_study
        show = _table_printer(("log_priming", "log_memorization", "spearman_predictor", "keyword_before"))
    else:
        what = f"{cfg.workload.n_tasks} tasks x {cfg.train.steps_per_task} steps"
        runner, show = run_study, _print_summary
    if is_main():
        print(f"poise run {cfg.name}: {len(cfg.variants)} variants x {len(cfg.seeds)} seeds = {n} runs, "
              f"{what} each", file=sys.stderr)
    if world > 1 and not args.run_dir:
        raise FileNotFoundError("under torchrun give --run-dir (the same path on every rank)")
    path = runner(cfg, args.run_dir, progress=False if args.no_progress else None, report=not args.no_report)
    if not is_main():
        return 0
    show(json.loads((path / "summary.json").read_text()))
    print(f"\nrun directory: {path}")
    if (path / "report.html").exists():
        print(f"report:        {path / 'report.html'}")
    return 0


def _table_printer(cols: tuple[str, ...]):
    def show(summary: dict) -> None:
        widths = [max(18, len(c) + 2) for c in cols]  # a long metric name never runs into its neighbour
        print(f"\n{'variant':<16}" + "".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
        for name, row in summary["variants"].items():
            cells = []
            for c, w in zip(cols, widths, strict=True):
                st = row.get(c)
                cell = f"{st['mean']:.3f} ± {st['std']:<5.3f}" if st and st.get("mean") is not None else "–"
                cells.append(cell.rjust(w))
            print(f"{name:<16}" + "".join(cells))

    return show


def _print_summary(summary: dict) -> None:
    cols = [("acc", "ACC"), ("forgetting", "FORG"), ("min_acc", "min-ACC"), ("wc_acc", "WC-ACC"),
            ("gap_depth", "gap"), ("task0_acc_at_end", "t0 end"), ("task0_min_after", "t0 min")]

    def f(s: dict) -> str:
        m = s.get("mean")
        return "   -  " if m is None or (isinstance(m, float) and math.isnan(m)) else f"{m:6.3f}"

    print(f"\n{'variant':<12}" + "".join(f"{h:>9}" for _, h in cols) + f"   ({summary['wall_seconds']:.0f} s)")
    for v, row in summary["variants"].items():
        print(f"{v:<12}" + "".join(f"{f(row[k]):>9}" for k, _ in cols))


def _print_optim_summary(summary: dict) -> None:
    print(f"\n{'variant':<14}{'final val':>10}{'spikes':>8}{'diverged':>10}{'ms/step':>9}   "
          f"({summary['wall_seconds']:.0f} s)")
    for v, row in summary["variants"].items():
        m = row["final_val_loss"]["mean"]
        val = "   -  " if m is None or (isinstance(m, float) and math.isnan(m)) else f"{m:8.3f}"
        print(f"{v:<14}{val:>10}{row['spikes']['mean']:>8.1f}"
              f"{row['diverged']['count']:>6} / {row['diverged']['runs']}{row['seconds_per_step']['mean'] * 1e3:>9.1f}")


def _print_rl_summary(summary: dict) -> None:
    print(f"\n{'variant':<18}{'held-out acc':>14}{'start':>8}{'reward':>8}{'entropy':>9}{'collapsed':>11}"
          f"{'s/step':>8}   ({summary['wall_seconds']:.0f} s)")
    def f(row: dict, k: str) -> float:
        m = row[k]["mean"]
        return float("nan") if m is None else m

    for v, row in summary["variants"].items():
        print(f"{v:<18}{f(row, 'final_acc'):>14.3f}{f(row, 'start_acc'):>8.3f}{f(row, 'final_reward'):>8.3f}"
              f"{f(row, 'final_entropy'):>9.3f}{row['collapsed']['count']:>7} / {row['collapsed']['runs']}"
              f"{f(row, 'seconds_per_step'):>8.2f}")


def _cmd_list(args: argparse.Namespace) -> int:
    import inspect

    from poise import _registry
    from poise.runs.config import recipe_names, strategy_params

    kinds = [args.kind] if args.kind else ["recipes", "strategies", "optimizers", "losses", "advantages", "metrics",
                                           "streams", "models"]
    for kind in kinds:
        print(f"{kind}:")
        if kind == "recipes":
            for n in recipe_names():
                print(f"  {n}")
        else:
            reg = {"strategies": "strategy", "optimizers": "optimizer", "losses": "loss", "advantages": "advantage",
                   "metrics": "metric", "streams": "stream", "models": "model"}[kind]
            for n in _registry.names(reg):
                obj = _registry.get(reg, n)
                doc = (inspect.getdoc(obj) or "").split("\n")[0]
                extra = ""
                if reg == "strategy":
                    ps = strategy_params(n)
                    extra = "(" + ", ".join(f"{k}={p.default!r}" for k, p in ps.items()) + ")"
                print(f"  {n}{extra}")
                if doc:
                    print(f"      {doc}")
        print()
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


def main(argv: list[str] | None = None) -> int:
    from poise.runs.config import ConfigError

    parser = _parser()
    # overrides may follow options (`poise run tiny --no-report seeds=[0]`): argparse leaves
    # those over, and they are overrides when they look like key=value
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or args.command != "run"]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"run": _cmd_run, "list": _cmd_list, "report": _cmd_report, "env": _cmd_env}[args.command](args)
    except ConfigError as e:
        print(f"poise: bad config: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as e:
        print(f"poise: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only or vanished run directory
        where = f" ({e.filename})" if e.filename else ""
        print(f"poise: cannot write{where}: {e.strerror or e}. Every metric line and result written before is "
              "kept; fix the cause and continue with `poise run --resume RUN_DIR`.", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # update guards gave up: non-finite gradients kept coming
        print(f"poise: training stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("poise: interrupted; finished runs are kept in the run directory", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""A study's run time at two commits, side by side: ``poise run`` from an earlier commit's source tree and from
this checkout's, alternating, in fresh processes, with the same arguments; prints per repeat the seconds of
the runs (``summary.json``'s ``wall_seconds``), of the whole command and of evaluation, the after/before
ratios (median over repeats), and whether every metric of every run is equal (``runs.csv`` without its
timing columns).

    python benchmarks/study_ab.py --before 3e778e9                       # the default study, 1 repeat
    python benchmarks/study_ab.py --before HEAD~3 --repeats 2 -- --jobs auto 'seeds=[0]'

The earlier commit is checked out with ``git worktree`` into a temporary folder (removed at the end); both
trees run with this environment's packages (``PYTHONPATH`` picks the tree). Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(src: Path, out: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "poise.cli", "run", "--no-progress", "--run-dir", str(out), *args],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    runs = list(csv.DictReader((out / "runs.csv").open()))
    return {"runs": json.loads((out / "summary.json").read_text())["wall_seconds"], "wall": wall,
            "eval": sum(float(r.get("eval_seconds") or 0) for r in runs)}


def _metrics(out: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader((out / "runs.csv").open())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("args", nargs="*", help="poise run's arguments (a recipe, overrides, --jobs; after --)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), a.before], check=True)
        try:
            rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            same = True
            for i in range(a.repeats):
                for label, src in (("before", tree / "src"), ("after", ROOT / "src")):
                    rows[label].append(_run(src, Path(tmp) / f"{label}-{i}", a.args))
                    r = rows[label][-1]
                    print(f"repeat {i} {label:<6} runs {r['runs']:6.1f} s  wall {r['wall']:6.1f} s  "
                          f"evaluation {r['eval']:6.1f} s", flush=True)
                same &= _metrics(Path(tmp) / f"before-{i}") == _metrics(Path(tmp) / f"after-{i}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    for k in ("runs", "wall", "eval"):
        ratio = statistics.median(x[k] / y[k] for x, y in zip(rows["after"], rows["before"], strict=True) if y[k])
        print(f"after / before, {k}: {ratio:.2f}")
    print(f"every metric of every run equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

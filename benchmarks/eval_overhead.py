"""Continual evaluation's cost relative to training, in the default study (per-iteration evaluation).

Runs one variant of ``stability-gap`` (every task evaluated after every optimizer step) with the
evaluator scoring task by task (``batched=False``, the old path) and with all tasks in one pass over
their cached, concatenated inputs (``batched=True``, the default), alternating in one process, and
prints per setting the median over repeats of: wall time of the run, evaluation time, evaluation /
training time, and the results' equality (the same accuracies either way).

    python benchmarks/eval_overhead.py                 # finetune, seed 0, 3 repeats
    python benchmarks/eval_overhead.py --variant replay --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partialmethod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="finetune", help="a variant of the stability-gap recipe")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from poise.measure import evaluator as E
    from poise.runs.config import load_recipe
    from poise.runs.kinds import continual

    cfg = load_recipe("stability-gap", ["seeds=[0]", f"threads={args.threads}"])
    names = [v.name for v in cfg.variants]
    if args.variant not in names:
        sys.exit(f"--variant {args.variant!r}: valid choices: {', '.join(names)}")
    torch.set_num_threads(args.threads)
    index = names.index(args.variant)
    original = E.ContinualEvaluator.__init__
    rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    curves: dict[bool, list] = {}
    for _ in range(args.repeats):
        for batched in (False, True):
            E.ContinualEvaluator.__init__ = partialmethod(original, batched=batched)  # type: ignore[method-assign]
            try:
                r = continual.run_one(cfg, index, 0)
            finally:
                E.ContinualEvaluator.__init__ = original  # type: ignore[method-assign]
            rows[batched].append((r["wall_seconds"], r["metrics"]["eval_seconds"]))
            curves[batched] = r["curves"]
    print(f"stability-gap, {args.variant}, seed 0: {cfg.workload.n_tasks} tasks x {cfg.train.steps_per_task} steps, "
          f"every task evaluated after every step; {args.threads} threads; median of {args.repeats}")
    print(f"{'evaluator':<14}{'run (s)':>10}{'eval (s)':>10}{'train (s)':>11}{'eval/train':>12}")
    med = {}
    for batched, label in ((False, "task by task"), (True, "batched")):
        wall = statistics.median(w for w, _ in rows[batched])
        ev = statistics.median(e for _, e in rows[batched])
        med[batched] = (wall, ev)
        print(f"{label:<14}{wall:>10.1f}{ev:>10.1f}{wall - ev:>11.1f}{ev / (wall - ev):>12.2f}")
    import json

    same = json.dumps(curves[True]) == json.dumps(curves[False])  # NaN (a task not yet seen) != NaN in lists
    floor = _forward_floor(cfg, args.repeats)
    print(f"the evaluations' forward passes alone (the model on every seen task's inputs, no scoring): {floor:.1f} s; "
          f"batched evaluation / that: {med[True][1] / floor:.2f}")
    print(f"evaluation time, batched / task by task: {med[True][1] / med[False][1]:.2f}; run time: "
          f"{med[True][0] / med[False][0]:.2f}; same curves: {same}")
    return 0 if same else 1


def _forward_floor(cfg, repeats: int) -> float:
    """Seconds of the bare forward passes one run's evaluations make (after task k, the concatenated
    inputs of tasks 0..k, once per step), median over ``repeats``: what no scoring can go below."""
    import time

    import torch

    from poise import _registry
    from poise.runs.kinds import continual

    w = cfg.workload
    stream = _registry.get("stream", w.stream)(n_tasks=w.n_tasks, scenario=w.scenario, **w.stream_params)
    model = continual._model(cfg, stream).eval()
    xs = [torch.cat([t.x_test for t in stream.tasks[: k + 1]]) for k in range(len(stream.tasks))]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in xs:
                for _ in range(cfg.train.steps_per_task):
                    model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())

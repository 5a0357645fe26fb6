"""Where an RL step's time goes: poise's loop and TRL's GRPOTrainer, phase by phase.

    python benchmarks/rl_profile.py [--sizes small,medium] [--impls poise,trl] [--steps 5]
                                    [--prompts 32] [--group 8] [--threads 1] [--json out.json]

The same policies, batch and settings as ``benchmarks/rl_step.py`` (one process; each
implementation trains its own copy of the warm-started model). The functions each step calls
are wrapped with wall-clock timers (``time.perf_counter``); a timer nested in another is
subtracted from it, so every phase is *exclusive* time and the phases add up to the step:

poise (``poise.runs.kinds.rl.run_one_rl``):

* ``generation: model forward``: the policy's forward passes while sampling;
* ``generation: sampling``: the rest of :func:`poise.rl.rollout.generate` (softmax,
  multinomial, concatenation, building the rollouts);
* ``reward + advantages``: the rest of :func:`poise.rl.rollout.collect`;
* ``old-logp forward``: the trainer's no-grad log-probs at pi_old (only with minibatches > 1);
* ``trainer forward: model`` / ``trainer forward: logp``: the training forward pass of the model,
  and the log-softmax / gather / padding around it (:func:`poise.rl.trainer_logprobs`);
* ``loss``: the variant's objective and its aggregation;
* ``backward``: ``loss.backward()``; ``grad norm``: ``clip_grad_norm_``; ``optimizer``: ``opt.step()``;
* ``diagnostics``: ``completion_batch``, ``completion_stats``, ``rollout_diagnostics``;
* ``evaluation``: held-out greedy accuracy (the last step evaluates);
* ``other``: the rest of the loop.

TRL (``GRPOTrainer``): ``generation: model forward`` / ``generation: other`` (``_generate``:
tokenising, ``model.generate``'s own work, decoding), ``reward`` (``_calculate_rewards``),
``old-logp forward`` (``_get_per_token_logps_and_entropies`` without grad), ``scoring + batch
prep`` (the rest of ``_generate_and_score_completions``), ``trainer forward: model`` /
``trainer forward: logp``, ``loss`` (the rest of ``_compute_loss``), ``backward``, ``grad norm``
(the accelerator's ``clip_grad_norm_``), ``optimizer``, ``other`` (the Trainer's loop, logging,
callbacks, data loading).

Timing starts at the end of step 1 (warm-up) and stops at the end of the last step; the table
gives seconds per step and the share of the step. Quote the shares and ratios, not absolute
seconds, on a shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_step  # noqa: E402 - the benchmark's models, settings and runners

POISE_PHASES = ("generation: backbone", "generation: sampling", "reward + advantages", "old-logp forward",
                "trainer forward: backbone", "trainer forward: head + logp", "loss", "backward", "grad norm",
                "optimizer", "diagnostics", "evaluation", "other")
TRL_PHASES = ("generation: backbone", "generation: other", "reward", "old-logp forward", "scoring + batch prep",
              "trainer forward: backbone", "trainer forward: head + logp", "loss", "backward", "grad norm", "optimizer",
              "other")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Timers:
    """Exclusive time per phase on ``clock`` (``time.perf_counter`` or ``time.process_time``): a phase nested
    in another is subtracted from the outer one."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.stack: list[list[Any]] = []  # [phase, start, time spent in nested phases]
        self.on = False
        self.t_on = self.t_off = 0.0

    def start(self) -> None:
        self.seconds.clear()
        self.on, self.t_on = True, self.clock()

    def stop(self) -> None:
        self.on, self.t_off = False, self.clock()

    def wrap(self, fn, phase):
        """``fn`` timed as ``phase`` (a string, or a function of the enclosing phase or None)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = phase(self.stack[-1][0] if self.stack else None) if callable(phase) else phase
            self.stack.append([name, self.clock(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, t0, inner = self.stack.pop()
                dt = self.clock() - t0
                if self.on:
                    self.seconds[name] = self.seconds.get(name, 0.0) + dt - inner
                if self.stack:
                    self.stack[-1][2] += dt

        return timed

    def table(self, steps: int, phases: tuple[str, ...]) -> dict[str, dict[str, float]]:
        total = self.t_off - self.t_on
        rows = {p: self.seconds.get(p, 0.0) for p in phases if p != "other"}
        rows["other"] = total - sum(rows.values())
        extra = set(self.seconds) - set(phases)
        if extra:
            raise RuntimeError(f"unexpected phases {sorted(extra)}")
        out = {p: {"s_per_step": s / steps, "share": s / total} for p, s in rows.items()}
        out["total"] = {"s_per_step": total / steps, "share": 1.0}
        return out


_MISSING = object()


def _patch(obj: Any, name: str, new: Any, undo: list) -> None:
    """``setattr(obj, name, new)``, remembered in ``undo`` (the attribute of ``obj`` itself, if any)."""
    undo.append((obj, name, vars(obj).get(name, _MISSING)))
    setattr(obj, name, new)


def _unpatch(undo: list) -> None:
    for obj, name, old in reversed(undo):
        if old is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, old)
    undo.clear()


def _model_phase(outer: str | None) -> str:
    """The model's forward is named by what encloses it: generation or the trainer's forward."""
    if outer is None:
        return "other"
    if outer.startswith("generation"):
        return "generation: backbone"
    if outer.startswith("trainer forward"):
        return "trainer forward: backbone"
    return outer


def profile_poise(model, steps: int, prompts: int, group: int, clock=time.perf_counter,
                  extra: tuple[str, ...] = ()) -> dict:
    import poise.rl.rollout as ro
    import poise.runs.kinds.rl as rs

    tm = Timers(clock)
    undo: list = []
    n_ends = [0]

    def progress() -> None:
        n_ends[0] += 1
        if n_ends[0] == 1:
            tm.start()
        elif n_ends[0] == steps:
            tm.stop()

    def fwd(f, *a, **k):
        name = "trainer forward: head + logp" if torch.is_grad_enabled() else "old-logp forward"
        return tm.wrap(f, name)(*a, **k)

    def build_opt(t, m):
        opt = orig_opt(t, m)
        opt.step = tm.wrap(opt.step, "optimizer")
        return opt

    orig_opt = rs._optimizer
    orig_fwd = rs._forward_logprobs
    try:
        _patch(type(model.model), "forward", tm.wrap(type(model.model).forward, _model_phase), undo)
        _patch(ro, "generate", tm.wrap(ro.generate, "generation: sampling"), undo)
        _patch(rs, "collect", tm.wrap(rs.collect, "reward + advantages"), undo)
        _patch(rs, "_forward_logprobs", functools.partial(fwd, orig_fwd), undo)
        _patch(rs, "variant_objective", tm.wrap(rs.variant_objective, "loss"), undo)
        _patch(rs, "aggregate", tm.wrap(rs.aggregate, "loss"), undo)
        _patch(torch.Tensor, "backward", tm.wrap(torch.Tensor.backward, "backward"), undo)
        _patch(torch.nn.utils, "clip_grad_norm_", tm.wrap(torch.nn.utils.clip_grad_norm_, "grad norm"), undo)
        _patch(rs, "_optimizer", build_opt, undo)
        for f in ("completion_batch", "completion_stats", "rollout_diagnostics"):
            _patch(rs, f, tm.wrap(getattr(rs, f), "diagnostics"), undo)
        _patch(rs, "_held_out_accuracy", tm.wrap(rs._held_out_accuracy, "evaluation"), undo)
        _patch(rs, "_held_out_pass1", tm.wrap(rs._held_out_pass1, "evaluation"), undo)
        rl_step.run_poise(model, steps, prompts, group, on_step=progress, extra=extra)
    finally:
        _unpatch(undo)
    return tm.table(steps - 1, POISE_PHASES)


def profile_trl(model, steps: int, prompts: int, group: int, clock=time.perf_counter) -> dict:
    import accelerate
    import accelerate.optimizer
    import trl.trainer.grpo_trainer as gt

    tm = Timers(clock)
    undo: list = []
    G = gt.GRPOTrainer

    n_ends = [0]

    def on_step() -> None:
        n_ends[0] += 1
        if n_ends[0] == 1:
            tm.start()
        elif n_ends[0] == steps:
            tm.stop()

    orig_logps = G._get_per_token_logps_and_entropies

    def logps(self, *a, **k):
        name = "trainer forward: head + logp" if torch.is_grad_enabled() else "old-logp forward"
        return tm.wrap(orig_logps, name)(self, *a, **k)

    try:
        _patch(type(model.model), "forward", tm.wrap(type(model.model).forward, _model_phase), undo)
        _patch(G, "_generate", tm.wrap(G._generate, "generation: other"), undo)
        _patch(G, "_calculate_rewards", tm.wrap(G._calculate_rewards, "reward"), undo)
        _patch(G, "_generate_and_score_completions", tm.wrap(G._generate_and_score_completions,
                                                             "scoring + batch prep"), undo)
        _patch(G, "_get_per_token_logps_and_entropies", logps, undo)
        _patch(G, "_compute_loss", tm.wrap(G._compute_loss, "loss"), undo)
        _patch(torch.Tensor, "backward", tm.wrap(torch.Tensor.backward, "backward"), undo)
        _patch(accelerate.Accelerator, "clip_grad_norm_", tm.wrap(accelerate.Accelerator.clip_grad_norm_,
                                                                    "grad norm"), undo)
        _patch(accelerate.optimizer.AcceleratedOptimizer, "step",
               tm.wrap(accelerate.optimizer.AcceleratedOptimizer.step, "optimizer"), undo)
        rl_step.run_trl(model, steps, prompts, group, on_step=on_step)
    finally:
        _unpatch(undo)
    return tm.table(steps - 1, TRL_PHASES)


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'phase':28}{'ms / step':>11}{'share':>8}")
    for phase, r in table.items():
        print(f"{phase:28}{1000 * r['s_per_step']:>11.1f}{100 * r['share']:>7.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--impls", default=",".join(rl_step.IMPLS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft-steps", type=int, default=150, help="warm-start steps of the policy")
    ap.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                    help="wall: perf_counter; cpu: this process's CPU time (with --threads 1, steadier than wall time "
                         "on a machine shared with other jobs)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    sizes = [s for s in a.sizes.split(",") if s]
    impls = [s for s in a.impls.split(",") if s]
    for s in sizes:
        if s not in rl_step.SIZES:
            raise SystemExit(f"--sizes: {s!r}; valid choices: {', '.join(rl_step.SIZES)}")
    for s in impls:
        if s not in rl_step.IMPLS:
            raise SystemExit(f"--impls: {s!r}; valid choices: {', '.join(rl_step.IMPLS)}")
    if a.steps < 2:
        raise SystemExit(f"--steps={a.steps}: at least 2 (step 1 is warm-up)")
    torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"args": vars(a), "tables": {}}
    for size in sizes:
        model = rl_step.build(size, sft_steps=a.sft_steps)
        for impl in impls:
            if impl == "trl":
                table = profile_trl(model, a.steps, a.prompts, a.group, CLOCKS[a.clock])
            else:
                table = profile_poise(model, a.steps, a.prompts, a.group, CLOCKS[a.clock],
                                      ("train.share_rows=false",) if impl == "poise_every_row" else ())
            out["tables"][f"{impl}/{size}"] = table
            print_table(f"{impl}, {size} ({sum(p.numel() for p in model.parameters())} parameters), batch "
                        f"{a.prompts} x {a.group}, {a.steps - 1} timed steps, {a.threads} thread(s), "
                        f"{a.clock} clock", table)
        if "trl" in impls:
            t = out["tables"][f"trl/{size}"]["total"]["s_per_step"]
            for impl in impls:
                if impl != "trl":
                    p = out["tables"][f"{impl}/{size}"]["total"]["s_per_step"]
                    print(f"{size}: TRL / {impl} seconds per step (this process, {a.clock} clock) = {t / p:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""RL step speed, peak memory and sample efficiency: poise's loop against TRL's GRPOTrainer, side by side.

    python benchmarks/rl_step.py [--sizes small,medium] [--impls poise,poise_every_row,trl] [--steps 6]
                                 [--prompts 32] [--group 8] [--repeats 2] [--threads 2] [--json out.json]

Both train the same Hugging Face Qwen2 policy (built from a config, warm-started on 1-digit
additions by poise's supervised warm start in the parent process, then handed to both as the
same state dict), on the same task and reward, with the same batch (prompts x group
completions), learning rate, temperature and completion length, one optimizer step per rollout
batch. poise runs its RL loop (``run_one_rl``, variant ppo_clip of the rl-stability recipe,
float32 sampler so that both sample alike; its default ``train.share_rows=auto`` runs the training
forward once per distinct completion: same loss, other rounding of the gradient);
``poise_every_row`` is the same with ``train.share_rows=false`` (every row); TRL runs ``GRPOTrainer``
(loss dapo, beta 0) offline on CPU.

Sizes: ``small`` = hidden 48, MLP 192, 1 layer, 2 heads (38,784 parameters); ``medium`` =
hidden 128, MLP 384, 2 layers, 4 heads (431,744 parameters, 11.1x).

Every (size, repeat, implementation) runs in a fresh Python process (so the two never share an
allocator or a warm cache); the order of the two is alternated over repeats. Each child
reports:

* ``s_per_step`` / ``cpu_s_per_step``: the median over steps 2..N of the wall / process CPU time
  between consecutive step ends (generation, scoring, forward, backward and optimizer included;
  step 1 is warm-up; TRL's one-off trainer set-up is not a step). With ``--threads 1`` the CPU
  time is the steadier figure on a machine shared with other jobs;
* ``rss_build_mb``: resident memory once the implementation's modules are imported and the
  model is built; ``peak_rss_mb``: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end;
  ``peak_delta_mb = peak_rss_mb - rss_build_mb``: the memory the RL loop itself added;
* the mean training reward over the steps.

The table gives the median over repeats per implementation and size, and the ratio TRL / poise
of seconds per step (= poise / TRL of steps per second), median over repeats of the per-repeat
ratio. docs/rl-performance.md has the figures and where the time goes (benchmarks/rl_profile.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from poise.rl import sft_warmup
from poise.tasks.reasoning import EOS, ArithmeticTask
from poise.tasks.text import CharTokenizer

LR = 3e-4  # both, constant
SIZES: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 1, "num_attention_heads": 2},
    "medium": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4},
}
IMPLS = ("poise", "poise_every_row", "trl")  # poise_every_row: poise with train.share_rows=false


def hf_char_tokenizer(tok: CharTokenizer):
    import tokenizers
    import transformers

    vocab = {c: i for i, c in enumerate(tok.alphabet)}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=EOS))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    t.decoder = tokenizers.decoders.Fuse()  # characters back to text without spaces
    # padding with EOS (as for most chat models): the policy's vocabulary is the task's alphabet, with no
    # extra token that poise's tokenizer could not decode
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token=EOS, eos_token=EOS, unk_token=EOS)


def qwen2_config(size: str = "small"):
    """The Qwen2 config of a benchmark size (``small`` or ``medium``)."""
    import transformers

    if size not in SIZES:
        raise ValueError(f"size={size!r}; valid choices: {', '.join(SIZES)}")
    tok = CharTokenizer()
    s = SIZES[size]
    eos = int(tok.encode(EOS)[0])
    return transformers.Qwen2Config(vocab_size=tok.vocab_size, num_key_value_heads=s["num_attention_heads"],
                                    max_position_embeddings=32, pad_token_id=eos, eos_token_id=eos, bos_token_id=None,
                                    **s)


def build(size: str = "small", seed: int = 0, sft_steps: int = 150):
    """The benchmark policy: a Qwen2 of ``size`` built from its config, warm-started on 1-digit additions."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(qwen2_config(size))
    if sft_steps:
        sft_warmup(model, CharTokenizer(), ArithmeticTask(1, seed=99), steps=sft_steps, lr=3e-3, seed=seed)
    return model


def load_model(size: str, state_path: str):
    """A model of ``size`` with the weights saved at ``state_path`` (what a child process trains)."""
    import transformers

    model = transformers.Qwen2ForCausalLM(qwen2_config(size))
    model.load_state_dict(torch.load(state_path, weights_only=True))
    return model


def poise_config(steps: int, prompts: int, group: int, extra: tuple[str, ...] = ()):
    """The rl-stability recipe's ppo_clip variant with the benchmark's batch (and ``extra`` overrides);
    returns ``(cfg, variant index)``."""
    from poise.runs.config import load_recipe

    overrides = [f"train.lr={LR}", f"train.steps={steps}", f"train.prompts={prompts}", f"train.group_size={group}",
                 "train.sft_steps=0", "train.sampler_dtype=float32", "train.sampler_bits=0", "train.eval_every=1000",
                 "train.eval_problems=10", "train.eval_pass1_samples=0", "train.checkpoint_every=0", "seeds=[0]",
                 "train.model=qwen2", *extra]
    cfg = load_recipe("rl-stability", overrides)
    return cfg, [v.name for v in cfg.variants].index("ppo_clip")


def run_poise(model, steps: int, prompts: int, group: int, wrap_model=None, on_step=None,
              extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """poise's RL loop on a copy of ``model`` (passed through ``wrap_model`` if given; ``extra`` config
    overrides): the wall and CPU times of the step ends, wall seconds, rewards; ``on_step()`` is called at
    each step's end."""
    import poise.runs.kinds.rl as rs

    cfg, i = poise_config(steps, prompts, group, extra)
    original = rs.build_policy

    def policy(t, v):
        m = copy.deepcopy(model)
        return wrap_model(m) if wrap_model else m

    ends: list[float] = []
    cpu: list[float] = []

    def step_end(n: int) -> None:
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        if on_step:
            on_step()

    rs.build_policy = policy
    try:
        t0 = time.perf_counter()
        r = rs.run_one_rl(cfg, i, 0, progress=step_end)
        wall = time.perf_counter() - t0
    finally:
        rs.build_policy = original
    return {"step_ends": ends, "cpu_ends": cpu, "wall": wall, "rewards": r["curves"]["reward"]}


def trl_trainer(model, steps: int, prompts: int, group: int, out_dir: str, callbacks=()):
    """TRL's GRPOTrainer on a copy of ``model`` with the same batch, task, reward and learning rate."""
    import datasets
    import trl

    tok = hf_char_tokenizer(CharTokenizer())
    task = ArithmeticTask(1, seed=0)
    problems = task.sample(prompts * steps)
    answers = {p.prompt: p for p in problems}
    data = datasets.Dataset.from_dict({"prompt": [p.prompt for p in problems]})

    def reward(prompts, completions, **kw):
        return [task.reward(answers[p], c) for p, c in zip(prompts, completions, strict=True)]

    args = trl.GRPOConfig(output_dir=out_dir, per_device_train_batch_size=prompts * group, num_generations=group,
                          max_completion_length=5, max_steps=steps, report_to="none", use_cpu=True,
                          logging_steps=1, save_strategy="no", learning_rate=LR, lr_scheduler_type="constant",
                          bf16=False, beta=0.0, loss_type="dapo", temperature=1.0, disable_tqdm=True)
    return trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                           processing_class=tok, callbacks=list(callbacks))


def run_trl(model, steps: int, prompts: int, group: int, wrap_model=None, on_step=None) -> dict[str, Any]:
    """TRL's GRPOTrainer on a copy of ``model`` (passed through ``wrap_model`` if given): the times of the step
    ends, wall seconds, rewards; ``on_step()`` is called at each step's end."""
    import transformers

    ends: list[float] = []
    cpu: list[float] = []

    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            if on_step:
                on_step()

    m = copy.deepcopy(model)
    m = wrap_model(m) if wrap_model else m
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl_trainer(m, steps, prompts, group, d, callbacks=[StepEnds()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return {"step_ends": ends, "cpu_ends": cpu, "wall": wall, "rewards": rewards}


def step_seconds(ends: list[float]) -> float:
    """Median time between consecutive step ends (steps 2..N; step 1 is warm-up)."""
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    if not gaps:
        raise ValueError(f"need at least 2 steps to time a step, got {len(ends)}")
    return statistics.median(gaps)


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(impl: str, size: str, state_path: str, steps: int, prompts: int, group: int, threads: int) -> dict:
    """One (implementation, size) run in this (fresh) process: timing and memory."""
    torch.set_num_threads(threads)
    if impl == "trl":
        import datasets  # noqa: F401 - imported before the baseline, as the run needs them
        import trl  # noqa: F401
    else:
        import poise.runs.kinds.rl  # noqa: F401
    model = load_model(size, state_path)
    rss_build, maxrss_build = _rss_mb(), _maxrss_mb()
    if impl == "trl":
        r = run_trl(model, steps, prompts, group)
    else:
        every_row = ("train.share_rows=false",) if impl == "poise_every_row" else ()
        r = run_poise(model, steps, prompts, group, extra=every_row)
    peak = _maxrss_mb()
    return {"impl": impl, "size": size, "params": sum(p.numel() for p in model.parameters()),
            "s_per_step": step_seconds(r["step_ends"]), "cpu_s_per_step": step_seconds(r["cpu_ends"]),
            "wall_s": r["wall"], "steps": len(r["step_ends"]),
            "mean_reward": statistics.mean(r["rewards"]) if r["rewards"] else float("nan"),
            "rss_build_mb": rss_build, "maxrss_at_build_mb": maxrss_build, "peak_rss_mb": peak,
            "peak_delta_mb": peak - rss_build}


def run_child(impl: str, size: str, state_path: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_child", impl, "--_size", size, "--_state", state_path,
           "--steps", str(a.steps), "--prompts", str(a.prompts), "--group", str(a.group), "--threads", str(a.threads)]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd += ["--_out", f.name]
        done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"{impl} / {size} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(Path(f.name).read_text())


def summarise(rows: list[dict], sizes: list[str], impls: list[str]) -> dict[str, dict]:
    """Per size and implementation: medians over repeats; per poise implementation, the ratio TRL / it of
    seconds per step (wall and CPU), median over repeats of the per-repeat ratio."""
    out: dict[str, dict] = {}
    for size in sizes:
        by = {impl: [r for r in rows if r["size"] == size and r["impl"] == impl] for impl in impls}
        out[size] = {"params": by[impls[0]][0]["params"]}
        for impl in impls:
            rs = by[impl]
            x = {k: statistics.median(r[k] for r in rs)
                 for k in ("s_per_step", "cpu_s_per_step", "peak_rss_mb", "rss_build_mb", "peak_delta_mb")}
            x["steps_per_s"] = 1 / x["s_per_step"]
            x["mean_reward"] = statistics.mean(r["mean_reward"] for r in rs)
            if impl != "trl" and "trl" in by:
                for clock, key in (("wall", "s_per_step"), ("cpu", "cpu_s_per_step")):
                    ratios = [t[key] / p[key] for p, t in zip(rs, by["trl"], strict=True)]
                    x[f"ratio_vs_trl_{clock}"] = statistics.median(ratios)
                    x[f"ratios_vs_trl_{clock}"] = ratios
            out[size][impl] = x
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the rows and the summary to this JSON file")
    for hidden in ("--_child", "--_size", "--_state", "--_out"):
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        Path(a._out).write_text(json.dumps(child(a._child, a._size, a._state, a.steps, a.prompts, a.group,
                                                 a.threads)))
        return
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    impls = [s.strip() for s in a.impls.split(",") if s.strip()]
    for name, got, valid in (("--sizes", sizes, tuple(SIZES)), ("--impls", impls, IMPLS)):
        bad = [x for x in got if x not in valid] or ([] if got else ["(none)"])
        if bad:
            raise SystemExit(f"{name}: {', '.join(map(repr, bad))}; valid choices: {', '.join(valid)}")
    if a.steps < 3:
        raise SystemExit(f"--steps={a.steps}: at least 3 (step 1 is warm-up, the median needs 2 gaps)")
    torch.set_num_threads(a.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        for size in sizes:
            path = str(Path(d) / f"{size}.pt")
            torch.save(build(size).state_dict(), path)
            for k in range(a.repeats):
                for impl in (impls if k % 2 == 0 else impls[::-1]):
                    rows.append({**run_child(impl, size, path, a), "repeat": k})
    summary = summarise(rows, sizes, impls)
    print(f"batch {a.prompts} prompts x {a.group} completions, {a.steps} steps (step 1 warm-up), {a.repeats} "
          f"repeats, each run in a fresh process, torch threads {a.threads}; medians over repeats")
    print(f"{'size':7}{'params':>8} {'impl':13}{'s/step':>8}{'steps/s':>8}{'CPU s/step':>11}{'RSS built':>10}"
          f"{'peak RSS':>9}{'peak-built':>11}{'reward':>7}  TRL/impl s/step: wall (per repeat) | CPU")
    for size, s in summary.items():
        for impl in impls:
            x = s[impl]
            ratio = (f"  {x['ratio_vs_trl_wall']:.2f}x ({', '.join(f'{r:.2f}' for r in x['ratios_vs_trl_wall'])})"
                     f" | {x['ratio_vs_trl_cpu']:.2f}x" if "ratio_vs_trl_wall" in x else "")
            print(f"{size:7}{s['params']:>8} {impl:13}{x['s_per_step']:>8.3f}{x['steps_per_s']:>8.2f}"
                  f"{x['cpu_s_per_step']:>11.3f}{x['rss_build_mb']:>9.0f}M{x['peak_rss_mb']:>8.0f}M"
                  f"{x['peak_delta_mb']:>10.1f}M{x['mean_reward']:>7.3f}{ratio}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
                                            "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()

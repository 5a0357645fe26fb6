"""The example launched by torchrun with 2 processes (DDP training, sharded continual
evaluation) reports what 1 process reports."""

import json
import math
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "torchrun_continual.py"


def _run(*cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def test_torchrun_two_processes_equal_one():
    one = _run(sys.executable, str(EXAMPLE))
    two = _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE))
    assert one["world"] == 1 and two["world"] == 2
    assert two["train_rows"] * 2 == one["train_rows"] > 0  # each rank trained on half of each batch
    assert len(one["curve"]) == len(two["curve"]) > 10
    worst = max(abs(a - b) for ra, rb in zip(one["curve"], two["curve"], strict=True)
                for a, b in zip(ra, rb, strict=True) if not (math.isnan(a) and math.isnan(b)))
    assert worst <= 1 / 200  # at most a sample's prediction flipped by rounding; in practice 0
    assert abs(one["acc"] - two["acc"]) <= 1 / 200


RL_RECIPE = """
kind = "rl"
seeds = [0]
[task]
name = "arithmetic"
level = 1
[train]
steps = 6
prompts = 4
group_size = 4
max_new_tokens = 5
sft_steps = 20
eval_problems = 10
eval_every = 3
n_embd = 16
checkpoint_every = 2
async_eta = 1
[[variants]]
name = "ppo"
loss = "ppo_clip"
"""


def test_rl_async_under_torchrun_keeps_ranks_in_sync_and_resumes(tmp_path):
    from poise.runs.store import read_jsonl

    recipe = tmp_path / "rl.toml"
    recipe.write_text(RL_RECIPE)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "poise.cli",
           "run", str(recipe), "--run-dir", str(run), "--no-progress", "--no-report"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((run / "results" / "ppo-s0.json").read_text())
    assert r["world_size"] == 2 and r["ranks_in_sync"]  # DDP kept the two policies identical
    assert [x["step"] for x in read_jsonl(run / "metrics" / "ppo-s0.jsonl")] == list(range(1, 7))
    assert out.stdout.count("run directory:") == 1  # rank 0 alone reports
    # resume from the step-6 checkpoint on both ranks: nothing to redo, still in sync
    (run / "results" / "ppo-s0.json").unlink()
    out = subprocess.run([*cmd[:6], "poise.cli", "run", "--resume", str(run), "--no-progress", "--no-report"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    again = json.loads((run / "results" / "ppo-s0.json").read_text())
    assert again["ranks_in_sync"] and again["eval_acc"] == r["eval_acc"]
    assert [x["step"] for x in read_jsonl(run / "metrics" / "ppo-s0.jsonl")] == list(range(1, 7))

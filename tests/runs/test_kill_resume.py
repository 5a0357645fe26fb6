"""A run killed with SIGKILL at a random step and resumed ends with the metrics of an
uninterrupted run, and its metrics file has no torn or duplicated lines (real subprocess,
real kill)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

from poise.runs.store import read_jsonl

RECIPE = """
kind = "rl"
seeds = [0]
[task]
name = "arithmetic"
level = 1
[train]
steps = 12
prompts = 4
group_size = 4
max_new_tokens = 5
sft_steps = 20
eval_problems = 10
eval_every = 3
n_embd = 16
checkpoint_every = 2
[[variants]]
name = "ppo"
loss = "ppo_clip"
is_level = "token"
"""


def _cmd(*args):
    return [sys.executable, "-c", "import sys; from poise.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path):
    recipe = tmp_path / "k.toml"
    recipe.write_text(RECIPE)
    common = ["--no-progress", "--no-report"]
    subprocess.run(_cmd("run", str(recipe), "--run-dir", str(tmp_path / "clean"), *common), check=True,
                   capture_output=True)
    clean = json.loads((tmp_path / "clean" / "results" / "ppo-s0.json").read_text())

    kill_after = random.Random().randint(3, 10)  # lines seen before the kill; printed on failure
    run = tmp_path / "killed"
    metrics = run / "metrics" / "ppo-s0.jsonl"
    proc = subprocess.Popen(_cmd("run", str(recipe), "--run-dir", str(run), *common),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results" / "ppo-s0.json").exists()
    seen = len(read_jsonl(metrics))

    out = subprocess.run(_cmd("run", "--resume", str(run), *common), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed = json.loads((run / "results" / "ppo-s0.json").read_text())
    for key in ("curves", "eval_steps", "eval_acc", "samples_generated", "final_acc"):
        assert resumed[key] == clean[key], f"{key} differs after a kill at {seen} lines (kill_after={kill_after})"
    lines = metrics.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line parses: none torn
    assert [r["step"] for r in rows] == list(range(1, 13)), f"kill_after={kill_after}"
    ref = read_jsonl(tmp_path / "clean" / "metrics" / "ppo-s0.jsonl")
    timing = {k for r in ref for k in r if "second" in k or k.startswith("time")}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ref], f"kill_after={kill_after}"

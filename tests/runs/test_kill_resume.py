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


CONTINUAL = """
name = "k"
seeds = [0]
[workload]
n_tasks = 2
hidden = 32
[train]
steps_per_task = 60
checkpoint_every = 7
[eval]
every = 3
[[variants]]
name = "replay"
strategy = "replay"
params = { mem_size = 50 }
"""


def test_continual_run_killed_mid_task_resumes_from_its_checkpoint(tmp_path):
    """A continual run killed mid-task continues from its last mid-task checkpoint (not from its
    start) and ends with the uninterrupted run's results and metric lines."""
    recipe = tmp_path / "c.toml"
    recipe.write_text(CONTINUAL)
    common = ["--no-progress", "--no-report"]
    subprocess.run(_cmd("run", str(recipe), "--run-dir", str(tmp_path / "clean"), *common), check=True,
                   capture_output=True)
    clean = json.loads((tmp_path / "clean" / "results" / "replay-s0.json").read_text())
    assert not (tmp_path / "clean" / "checkpoints").exists()  # removed once the run finished

    kill_after = random.Random().randint(20, 100)  # metric lines seen before the kill; printed on failure
    run = tmp_path / "killed"
    metrics = run / "metrics" / "replay-s0.jsonl"
    ckpt = run / "checkpoints" / "replay-s0.pt"
    proc = subprocess.Popen(_cmd("run", str(recipe), "--run-dir", str(run), *common),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results" / "replay-s0.json").exists()
    import torch

    at = torch.load(ckpt, weights_only=True)["step"]
    assert at > 0  # there is a mid-run checkpoint to resume from
    # mark the first line: a run that continues from the checkpoint keeps it, one that restarts rewrites it
    lines = metrics.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "marker": True})
    metrics.write_text("\n".join(lines) + "\n")

    out = subprocess.run(_cmd("run", "--resume", str(run), *common), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    resumed = json.loads((run / "results" / "replay-s0.json").read_text())
    def untimed(d):
        return {k: v for k, v in d.items() if "second" not in k}

    assert untimed(resumed["metrics"]) == untimed(clean["metrics"]), f"killed at step {at} (kill_after={kill_after})"
    for key in ("curves", "boundaries"):
        assert resumed[key] == clean[key], f"{key} differs after a kill at step {at} (kill_after={kill_after})"
    rows = read_jsonl(metrics)
    assert rows[0].pop("marker", False), "the resumed run started again from step 1"
    ref = read_jsonl(tmp_path / "clean" / "metrics" / "replay-s0.jsonl")
    timing = {k for r in ref for k in r if "second" in k or k.startswith("time")}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ref], f"killed at step {at}"


def test_an_unreadable_continual_checkpoint_is_named_and_never_unpickled(tmp_path, capsys):
    import pickle

    from poise.cli import main

    run = tmp_path / "r"
    args = ["run", "tiny", "seeds=[0]", "variants=[{strategy='finetune'}]", "--run-dir", str(run), "--no-progress",
            "--no-report"]
    assert main(args + ["train.steps_per_task=2"]) == 0
    (run / "results" / "finetune-s0.json").unlink()  # as if interrupted
    (run / "checkpoints").mkdir()

    class Boom:
        def __reduce__(self):
            return (exec, ("open(r'%s', 'w').write('ran')" % (tmp_path / "pwned"),))

    (run / "checkpoints" / "finetune-s0.pt").write_bytes(pickle.dumps(Boom()))
    assert main(["run", "--resume", str(run), "--no-progress", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "finetune-s0.pt cannot be read" in err and "delete it" in err
    assert not (tmp_path / "pwned").exists()

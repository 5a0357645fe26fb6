"""Soak with injected faults, scaled down: a long workbench session (several studies, many
runs) hit by NaN gradients, a reward function that raises and a full disk. Each run either
finishes or stops cleanly; every metric line written before a fault stays readable; after
the disk fault, ``--resume`` completes the study with no torn or duplicated lines."""

import errno
import json

import pytest

from poise.cli import main
from poise.runs.store import JsonlWriter, read_jsonl


def _all_lines_parse(path):
    for line in path.read_text().splitlines():
        json.loads(line)  # raises on a torn line


def test_soak_with_injected_faults(tmp_path, monkeypatch, capsys):
    # 1. NaN gradients in the middle of an optimizer run: that run stops at the step and is
    #    recorded as diverged; the study goes on and completes.
    from poise.runs import optim_study

    calls = {"n": 0}
    forward = optim_study.GPT.forward

    def nan_at_7(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] == 7:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(optim_study.GPT, "forward", nan_at_7)
    run = tmp_path / "opt"
    assert main(["run", "optimizers", "--quick", "lm.steps=15", "--run-dir", str(run), "--no-progress",
                 "--no-report"]) == 0
    monkeypatch.setattr(optim_study.GPT, "forward", forward)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"]
    first = next(iter(summary["variants"]))
    rows = read_jsonl(run / "metrics" / f"{first}-s0.jsonl")
    assert rows[-1]["step"] == 7 and rows[-1].get("diverged") and [r["step"] for r in rows] == list(range(1, 8))
    for p in (run / "metrics").glob("*.jsonl"):
        _all_lines_parse(p)

    # 2. A reward function that raises now and then: samples dropped and counted, runs finish.
    from poise.tasks.reasoning import ArithmeticTask

    original = ArithmeticTask.reward
    n = {"n": 0}

    def flaky(problem, completion):
        n["n"] += 1
        if n["n"] % 6 == 0:
            raise RuntimeError("verifier crashed")
        return original(problem, completion)

    monkeypatch.setattr(ArithmeticTask, "reward", staticmethod(flaky))
    run = tmp_path / "rl"
    assert main(["run", "rl-sampling", "--quick", "train.steps=4", "train.sft_steps=20", "train.n_embd=16",
                 "--run-dir", str(run), "--no-progress", "--no-report"]) == 0
    monkeypatch.setattr(ArithmeticTask, "reward", staticmethod(original))
    results = [json.loads(p.read_text()) for p in (run / "results").glob("*.json")]
    assert len(results) == 3 and all(r["bad_rewards"] > 0 for r in results)

    # 3. The disk fills up in the middle of a continual study: a clear message, exit code 1,
    #    every line written before readable; --resume then completes it, no line twice.
    write = JsonlWriter.write
    lines = {"n": 0}

    def full_disk(self, record):
        lines["n"] += 1
        if lines["n"] > 100:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        write(self, record)

    monkeypatch.setattr(JsonlWriter, "write", full_disk)
    run = tmp_path / "cont"
    capsys.readouterr()
    assert main(["run", "tiny", "--run-dir", str(run), "--no-progress", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    partial = sorted((run / "metrics").glob("*.jsonl"))
    before = {p.name: read_jsonl(p) for p in partial}
    assert sum(len(r) for r in before.values()) == 100
    for p in partial:
        _all_lines_parse(p)
    monkeypatch.setattr(JsonlWriter, "write", write)
    assert main(["run", "--resume", str(run), "--no-progress", "--no-report"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    steps = cfg["train"]["steps_per_task"] * cfg["workload"]["n_tasks"]
    for p in (run / "metrics").glob("*.jsonl"):
        rows = [r for r in read_jsonl(p) if not r.get("boundary")]
        assert [r["step"] for r in rows] == list(range(1, steps + 1)), p.name
    assert json.loads((run / "summary.json").read_text())["complete"]


def test_guard_stop_is_a_clean_exit(tmp_path, monkeypatch, capsys):
    from poise.optim import ConsecutiveSkipsError
    from poise.runs import study

    def always_nan(*a, **k):  # the guard (nonfinite="skip", max_consecutive_skips=5) gives up
        raise ConsecutiveSkipsError("5 steps in a row skipped for non-finite gradients, the last at step 5 in w")

    monkeypatch.setattr(study, "fit_stream", always_nan)
    assert main(["run", "tiny", "--run-dir", str(tmp_path / "g"), "--no-progress", "--no-report"]) == 3
    assert "training stopped: 5 steps in a row" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["skip"])
def test_skip_policy_counts_and_resets(policy):
    import torch

    from poise.optim import AdamW

    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1, nonfinite=policy)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.ones(3)) and not opt.state[p]

"""A run directory holds one study: never mixed, never shared by two processes, readable files."""

import json
import os
import stat

import pytest

from poise.cli import main
from poise.runs.config import load_recipe
from poise.runs.engine import RunDirError, execute

TINY = ["seeds=[0]", "train.steps_per_task=2", "variants=[{strategy='finetune'}]"]


def test_a_used_run_dir_is_refused_without_resume(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["run", "tiny", *TINY, "--run-dir", str(run), "--no-progress", "--no-report"]) == 0
    before = (run / "results" / "finetune-s0.json").read_text()
    assert main(["run", "tiny", *TINY, "train.lr=0.9", "--run-dir", str(run), "--no-progress", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "already holds a study" in err and f"poise run --resume {run}" in err
    assert json.loads((run / "config.json").read_text())["train"]["lr"] != 0.9  # nothing was overwritten
    assert (run / "results" / "finetune-s0.json").read_text() == before


def test_resume_refuses_a_config_that_is_not_the_folders(tmp_path):
    run = tmp_path / "r"
    execute(load_recipe("tiny", TINY), run, False, False)
    with pytest.raises(RunDirError, match=r"another config \(differs in: train\)"):
        execute(load_recipe("tiny", [*TINY, "train.lr=0.9"]), run, False, False, resume=True)
    execute(load_recipe("tiny", TINY), run, False, False, resume=True)  # its own config: fine


def test_two_processes_never_share_a_run_dir(tmp_path):
    import fcntl

    run = tmp_path / "r"
    run.mkdir()
    with open(run / ".lock", "a+") as other:  # another process holds the lock
        other.write("4242")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirError, match=r"in use by another poise process \(pid 4242\)"):
            execute(load_recipe("tiny", TINY), run, False, False)
    execute(load_recipe("tiny", TINY), run, False, False)  # released: fine


def test_files_are_written_with_the_umask_mode(tmp_path):
    run = tmp_path / "r"
    execute(load_recipe("tiny", TINY), run, False, False)
    want = 0o666 & ~_umask()
    for f in ("config.json", "summary.json", "results/finetune-s0.json", "metrics/finetune-s0.jsonl"):
        assert stat.S_IMODE((run / f).stat().st_mode) == want, f


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_without_a_progress_bar_each_finished_run_is_announced(tmp_path, capsys):
    execute(load_recipe("tiny", ["seeds=[0,1]", "train.steps_per_task=2", "variants=[{strategy='finetune'}]"]),
            tmp_path / "r", False, False)
    err = capsys.readouterr().err
    assert "[1/2] finetune seed 0: done in" in err and "[2/2] finetune seed 1: done in" in err


def test_interrupt_names_the_run_dir_and_the_resume_command(tmp_path, monkeypatch, capsys):
    from poise.runs.kinds import continual

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(continual, "fit_stream", stop)
    run = tmp_path / "r"
    assert main(["run", "tiny", *TINY, "--run-dir", str(run), "--no-progress"]) == 130
    assert f"continue with `poise run --resume {run}`" in capsys.readouterr().err


def test_a_half_written_rl_checkpoint_never_blocks_resume(tmp_path):
    import torch

    from poise.runs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    save_checkpoint(tmp_path, 3, model, opt, gen, {"x": 1})
    leftover = tmp_path / ".step-000004.abc"  # a kill during the next write
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-000003" and not leftover.exists()
    assert load_checkpoint(latest, model, opt, gen)["x"] == 1


def test_debug_shows_the_traceback_and_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "tiny", "train.lr=nan", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["--debug", "run", "tiny", "train.lr=nan", "--dry-run"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_sigterm_ends_like_ctrl_c_naming_the_resume_command(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    cmd = [sys.executable, "-c", "import sys; from poise.cli import main; sys.exit(main(sys.argv[1:]))", "run",
           "tiny", "seeds=[0,1,2]", "train.steps_per_task=200", "--run-dir", str(run), "--no-progress", "--no-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "metrics").glob("*.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"continue with `poise run --resume {run}`" in err

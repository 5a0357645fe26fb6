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


def test_run_json_records_the_config_hash_and_an_edited_config_is_refused_on_resume(tmp_path):
    from poise.runs.engine import config_hash

    run = tmp_path / "r"
    execute(load_recipe("tiny", TINY), run, False, False, command="poise run tiny")
    meta = json.loads((run / "run.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert meta["config_sha256"] == config_hash(cfg) and meta["command"] == "poise run tiny"
    cfg["train"]["lr"] = 0.9  # edited by hand after the study began: resuming would mix two configs
    (run / "config.json").write_text(json.dumps(cfg))
    from poise.runs.config import from_dict

    with pytest.raises(RunDirError, match="was changed after the study began"):
        execute(from_dict(cfg), run, False, False, resume=True)


def test_a_run_dirs_config_json_runs_the_same_study_again(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "tiny", *TINY, "train.lr=0.05", "--run-dir", str(a), "--no-progress", "--no-report"]) == 0
    assert main(["run", str(a / "config.json"), "--run-dir", str(b), "--no-progress", "--no-report"]) == 0
    ra, rb = (json.loads((d / "results" / "finetune-s0.json").read_text()) for d in (a, b))
    timing = ("eval_seconds",)
    assert {k: v for k, v in ra["metrics"].items() if k not in timing} == \
        {k: v for k, v in rb["metrics"].items() if k not in timing}
    assert ra["curves"] == rb["curves"]


def test_a_study_above_the_size_limit_needs_confirmation(tmp_path, capsys):
    run = tmp_path / "r"
    big = ["seeds=[0]", "train.steps_per_task=200000", "variants=[{strategy='finetune'}]"]
    assert main(["run", "tiny", *big, "--run-dir", str(run), "--no-progress", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "400,000 steps" in err and "--allow-large" in err and not run.exists()
    # a dry run refuses what the real run would refuse, and passes with the confirmation
    assert main(["run", "tiny", *big, "--dry-run"]) == 2 and "400,000 steps" in capsys.readouterr().err
    assert main(["run", "tiny", *big, "--dry-run", "--allow-large"]) == 0
    from poise.runs.engine import total_steps

    assert total_steps(load_recipe("tiny", ["train.lr=0.1,0.2", "seeds=[0,1,2]"])) == 40 * 4 * 3


def test_nothing_is_written_outside_the_run_directory(tmp_path):
    from poise.runs.store import JsonlWriter, atomic_write_json, writing_into

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "outside").mkdir()
    (run / "link").symlink_to(tmp_path / "outside")
    with writing_into(run):
        atomic_write_json(run / "results" / "ok.json", {"a": 1})
        for bad in (run / ".." / "escaped.json", run / "link" / "x.json", tmp_path / "abs.json"):
            with pytest.raises(PermissionError, match="outside the run directory"):
                atomic_write_json(bad, {})
            with pytest.raises(PermissionError, match="outside the run directory"):
                JsonlWriter(bad)
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == ["ok.json"]

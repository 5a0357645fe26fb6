"""Recipes send their runs to trackers; poise export sends an existing run directory; a failing tracker never
breaks the study."""

import json

import pytest

from poise.cli import main

TINY = ["seeds=[0]", "train.steps_per_task=3", "variants=[{strategy='finetune'}]", "--no-progress", "--no-report"]


def _tb_steps(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {}
    for d in [p for p in logdir.rglob("*") if p.is_dir()] + [logdir]:
        if not list(d.glob("events.out.tfevents.*")):
            continue
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps[tag] = [e.step for e in acc.Scalars(tag)]
    return steps


def test_a_recipe_with_tracking_writes_tensorboard_at_the_runs_own_steps(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "r"
    assert main(["run", "tiny", "tracking=['tensorboard']", *TINY, "--run-dir", str(run)]) == 0
    steps = _tb_steps(run)
    assert steps and any(v == [1, 2, 3, 4, 5, 6] for v in steps.values()), steps


def test_poise_export_sends_an_existing_run(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "r"
    assert main(["run", "tiny", *TINY, "--run-dir", str(run)]) == 0
    assert not _tb_steps(run)
    assert main(["export", str(run), "--to", "tensorboard"]) == 0
    assert "finetune-s0: " in capsys.readouterr().out and _tb_steps(run)


def test_unknown_tracker_and_failing_tracker(tmp_path, capsys, monkeypatch):
    assert main(["run", "tiny", "tracking=['neptune']", "--dry-run"]) == 2
    assert "tracking[0]: unknown tracker 'neptune'; valid choices: tensorboard" in capsys.readouterr().err
    pytest.importorskip("tensorboard")
    from poise.integrations import trackers
    from poise.runs import engine

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers, "export_run", boom)
    monkeypatch.setattr(engine, "_TRACK_FAILED", set())
    run = tmp_path / "f"
    with pytest.warns(RuntimeWarning, match="tracker 'tensorboard' failed on run finetune-s0"):
        assert main(["run", "tiny", "tracking=['tensorboard']", "seeds=[0,1]", "train.steps_per_task=3",
                     "variants=[{strategy='finetune'}]", "--no-progress", "--no-report", "--run-dir", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["complete"]

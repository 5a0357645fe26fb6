"""``poise run --jobs N``: runs in parallel processes give the files of one process running them in
turn; a failing run stops the study with its own error; bad values are refused."""

import dataclasses
import json

import pytest

from poise.cli import main
from poise.runs.config import ConfigError, load_recipe
from poise.runs.engine import execute
from poise.runs.kinds import get_kind

TINY = ["workload.n_tasks=2", "train.steps_per_task=6", "variants=[{strategy='finetune'},{strategy='replay'}]",
        "seeds=[0,1]", "threads=1"]


def _strip(result: dict) -> dict:
    """A result without its timings (wall and evaluation seconds differ from run to run)."""
    out = {k: v for k, v in result.items() if k != "wall_seconds"}
    out["metrics"] = {k: v for k, v in out["metrics"].items() if k != "eval_seconds"}
    return out


def test_two_jobs_write_what_one_process_writes(tmp_path):
    cfg = load_recipe("tiny", TINY)
    one = execute(cfg, tmp_path / "one", progress=False, report=False)
    two = execute(cfg, tmp_path / "two", progress=False, report=False, jobs=2)
    names = sorted(p.name for p in (one / "results").iterdir())
    assert names == sorted(p.name for p in (two / "results").iterdir()) and len(names) == 4
    for n in names:
        a, b = (json.loads((d / "results" / n).read_text()) for d in (one, two))
        assert _strip(a) == _strip(b), n
        assert (one / "metrics" / n.replace(".json", ".jsonl")).read_text() == \
            (two / "metrics" / n.replace(".json", ".jsonl")).read_text()
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["complete"] and list(s1["variants"]) == list(s2["variants"])  # same order as one process
    for v in s1["variants"]:
        row1 = {k: x for k, x in s1["variants"][v].items() if k not in ("wall_seconds", "eval_seconds")}
        row2 = {k: x for k, x in s2["variants"][v].items() if k not in ("wall_seconds", "eval_seconds")}
        assert row1 == row2


def _failing_run(cfg, i, seed, metrics_path, progress):
    """A run function that fails on seed 1 (module level: a spawned worker imports it by name)."""
    if seed == 1:
        raise ConfigError("variants[0]: refused on seed 1 (test)")
    from poise.runs.kinds.continual import run_one

    return run_one(cfg, i, seed, metrics_path, progress)


def test_a_failing_run_stops_the_study_with_its_error(tmp_path):
    kind = dataclasses.replace(get_kind("continual"), run_one=_failing_run)
    cfg = load_recipe("tiny", TINY)
    with pytest.raises(ConfigError, match="refused on seed 1"):
        execute(cfg, tmp_path / "x", progress=False, report=False, kind=kind, jobs=2)
    done = sorted(p.name for p in (tmp_path / "x" / "results").iterdir())
    assert done and all(n.endswith("-s0.json") for n in done)  # what finished before the failure is kept


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_jobs_are_refused_before_anything_runs(value, tmp_path, capsys):
    assert main(["run", "tiny", "--jobs", value, "--run-dir", str(tmp_path / "r")]) == 2
    assert f"--jobs {value!r}; valid: an integer >= 1 or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_jobs_is_refused_in_the_api_too(tmp_path):
    with pytest.raises(ConfigError, match="jobs=0"):
        execute(load_recipe("tiny", TINY), tmp_path / "r", progress=False, report=False, jobs=0)

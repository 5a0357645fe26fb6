import json
import os
import subprocess
import sys

from poise.runs.store import JsonlWriter, atomic_write_json, read_jsonl


def test_jsonl_survives_a_hard_kill(tmp_path):
    # A child writes lines and is killed without cleanup: every line written before the
    # kill is readable, and at most a torn last line is lost.
    path = tmp_path / "m.jsonl"
    code = (
        "import os, sys\n"
        "from poise.runs.store import JsonlWriter\n"
        f"w = JsonlWriter({str(path)!r})\n"
        "for i in range(100): w.write({'step': i, 'loss': float('nan') if i == 5 else i / 2})\n"
        "os._exit(9)\n"  # no flush at exit, no close
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == list(range(100))
    assert rows[5]["loss"] is None  # NaN written as null, the file stays valid JSON


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    with JsonlWriter(path) as w:
        w.write({"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]


def test_atomic_write_json_leaves_no_temp_and_replaces(tmp_path):
    p = tmp_path / "s.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": float("inf")})
    assert json.loads(p.read_text()) == {"a": None}
    assert os.listdir(tmp_path) == ["s.json"]


def test_untimed_drops_only_timing_fields():
    from poise.runs.store import untimed

    got = untimed({"acc": 0.5, "wall_seconds": 3.0, "metrics": {"eval_seconds": 1.0, "forgetting": 0.1},
                   "curve": [{"time": 2, "loss": 1.0}], "seconds_per_step": 0.1})
    assert got == {"acc": 0.5, "metrics": {"forgetting": 0.1}, "curve": [{"loss": 1.0}]}


def test_study_outcome_holds_every_result_and_metric_line(tmp_path):
    from poise.runs.config import load_recipe
    from poise.runs.engine import execute
    from poise.runs.store import study_outcome

    cfg = load_recipe("tiny", ["seeds=[0]", "train.steps_per_task=3", "workload.n_tasks=2",
                               "variants=[{strategy='finetune'}]"])
    run = execute(cfg, tmp_path / "r", progress=False, report=False)
    out = study_outcome(run)
    assert out["complete"] is True
    assert list(out["results"]) == ["finetune-s0.json"] and out["results"]["finetune-s0.json"]["metrics"]["acc"] >= 0
    assert len(out["metrics"]["finetune-s0.jsonl"]) >= 6  # one line per step at least
    assert "finetune" in out["summary"]["variants"]
    assert not any("second" in k for k in out["results"]["finetune-s0.json"])

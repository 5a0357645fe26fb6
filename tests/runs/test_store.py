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

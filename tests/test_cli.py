import json
import subprocess
import sys

import pytest

from poise.cli import main
from poise.runs.config import field_help
from poise.runs.store import read_jsonl


def test_run_tiny_recipe_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "tiny", "--run-dir", str(run_dir), "--no-progress", "seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "replay" in out and str(run_dir) in out
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["name"] == "tiny" and cfg["seeds"] == [0, 1]
    steps = cfg["train"]["steps_per_task"] * cfg["workload"]["n_tasks"]
    for v in ("finetune", "replay"):
        for s in (0, 1):
            rows = read_jsonl(run_dir / "metrics" / f"{v}-s{s}.jsonl")
            assert sum(1 for r in rows if not r.get("boundary")) == steps
            assert sum(1 for r in rows if r.get("boundary")) == cfg["workload"]["n_tasks"]
            assert (run_dir / "results" / f"{v}-s{s}.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and set(summary["variants"]) == {"finetune", "replay"}
    assert summary["variants"]["replay"]["acc"]["n"] == 2
    html = (run_dir / "report.html").read_text()
    assert html.count("<img") == 5 and "min-ACC" in html and "replay" in html
    for png in ("task0_accuracy.png", "task_curves.png", "average_accuracy.png", "metrics.png", "accuracy_matrix.png"):
        assert (run_dir / png).stat().st_size > 1000
    # beside summary.json: a CSV per variant and per run, a Markdown summary; the page links them and says how
    # to run the study again
    import csv

    rows = list(csv.DictReader((run_dir / "summary.csv").open()))
    assert [r["variant"] for r in rows] == ["finetune", "replay"]
    assert float(rows[1]["acc_mean"]) == pytest.approx(summary["variants"]["replay"]["acc"]["mean"])
    per_run = list(csv.DictReader((run_dir / "runs.csv").open()))
    assert sorted((r["variant"], r["seed"]) for r in per_run) == [("finetune", "0"), ("finetune", "1"),
                                                                   ("replay", "0"), ("replay", "1")]
    assert "| replay |" in (run_dir / "summary.md").read_text()
    assert f"poise run {run_dir / 'config.json'} --run-dir NEW_DIR" in html
    for name in ("summary.csv", "runs.csv", "summary.md", "config.json", "metrics/replay-s1.jsonl"):
        assert f'href="{name}"' in html
    assert "Every run</h2>" in html and "poise run tiny" in html  # per-seed rows, and the command it was run with
    # the report can be rebuilt from the files alone
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["run", "tiny", "train.lrr=1"], "unknown key 'train.lrr'"),
    (["run", "tiny", "variants.replay.strategy=gem"], "valid choices: agem"),
    (["run", "tiny", "train.batch_size=1.5"], "expected int"),
    (["run", "nope"], "unknown recipe 'nope'"),
])
def test_bad_recipe_fails_before_training(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran, no run directory


def test_help_explains_every_field():
    r = subprocess.run([sys.executable, "-m", "poise.cli", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    from poise.runs.config import OptimStudyConfig

    for key, _, _, help_ in [*field_help(), *field_help(OptimStudyConfig)]:
        assert key in r.stdout
        assert help_.split()[0] in r.stdout


def test_list_env_and_report_errors(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("stability-gap", "replay(mem_size=200", "ogpsa", "min_acc", "split-digits", "cnn"):
        assert name in out
    assert main(["env"]) == 0
    assert "torch" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(capsys):
    assert main(["run", "--dry-run", "train.lr=0.2"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == 0.2


def test_summary_table_keeps_long_metric_names_apart(capsys):
    from poise.cli import print_summary

    cols = ("log_memorization", "spearman_predictor", "x")
    row = {c: {"mean": -1.5, "std": 0.25} for c in cols}
    print_summary({"variants": {"plain": row, "empty": {}}}, tuple((c, c) for c in cols))
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["variant", *cols]
    assert rows[0].split() == ["plain"] + ["-1.500", "±", "0.250"] * 3
    assert rows[1].split() == ["empty", "–", "–", "–"]
    assert len({len(line) for line in (header, *rows)}) == 1  # columns line up


def test_summary_table_shows_counts_and_headings(capsys):
    from poise.cli import print_summary

    print_summary({"variants": {"a": {"diverged": {"count": 1, "runs": 3}, "acc": {"mean": 0.5, "std": 0.0}}},
                   "wall_seconds": 12.0}, (("acc", "ACC"), ("diverged", "diverged")))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].split() == ["variant", "ACC", "diverged"]
    assert out[-1].split() == ["a", "0.500", "±", "0.000", "1", "/", "3"]
    assert "12 s" in out[0]


def test_help_is_fast_it_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nfrom poise.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help']) if False else main([])\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

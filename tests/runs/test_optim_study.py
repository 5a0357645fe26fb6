import json

import pytest

from poise.cli import main
from poise.runs.config import ConfigError, OptimStudyConfig, load_recipe
from poise.runs.store import read_jsonl


def test_optimizers_recipe_validates():
    cfg = load_recipe("optimizers")
    assert isinstance(cfg, OptimStudyConfig)
    assert [v.name for v in cfg.variants] == ["adamw", "stable_spam", "soap", "galore_adamw"]


def test_optimizers_study_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", "optimizers", "--run-dir", str(run_dir), "--no-progress", "seeds=[0]", "lm.steps=6",
            "lm.eval_every=3", "lm.n_embd=16", "lm.block_size=12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "galore_adamw" in out and "soap" in out
    rows = read_jsonl(run_dir / "metrics" / "soap-s0.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert "val_loss" in rows[2] and "opt/update_ratio" in rows[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["variants"]["adamw"]["diverged"] == {"count": 0, "runs": 1, "at": []}
    html = (run_dir / "report.html").read_text()
    assert "loss spikes" in html and html.count("<img") == 1


def test_divergence_is_detected_and_stops_the_run(tmp_path):
    from poise.runs.optim_study import run_one_optim

    cfg = load_recipe("optimizers", ["lm.steps=40", "lm.n_embd=16", "variants.adamw.params.lr=50.0"])
    r = run_one_optim(cfg, 0, seed=0)
    assert r["diverged_at"] is not None and len(r["losses"]) == r["diverged_at"] < 40


@pytest.mark.parametrize("override, message", [
    ("variants.soap.optimizer=lion", "unknown optimizer 'lion'; valid choices: adam, adamw, classp, frugal"),
    ("variants.soap.params.momentum=0.9", "unknown argument of optimizer 'soap'; valid: lr, betas"),
    ("variants.soap.params.lr=-1.0", "lr=-1.0 is out of range"),
    ("lm.n_head=3", "lm.n_embd=64 must be a multiple of lm.n_head=3"),
    ("lm.corpus=shakespeare", "unknown corpus 'shakespeare'; valid choices: arithmetic"),
])
def test_bad_optimizer_recipe(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("optimizers", [override])
    assert message in str(e.value)


def test_unknown_kind():
    from poise.runs.config import from_dict

    with pytest.raises(ConfigError, match="unknown study kind 'bandit'; valid choices: continual, optimizers, rl"):
        from_dict({"kind": "bandit"})

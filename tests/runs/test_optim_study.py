import json

import pytest
import torch

from poise.cli import main
from poise.runs.config import ConfigError, OptimStudyConfig, load_recipe
from poise.runs.store import read_jsonl


def test_optimizers_recipe_validates():
    cfg = load_recipe("optimizers")
    assert isinstance(cfg, OptimStudyConfig)
    assert [v.name for v in cfg.variants] == ["adamw", "stable_spam", "soap", "galore_adamw", "adamw_int8",
                                              "stable_spam_int8", "adamw_int4", "stable_spam_int4"]
    assert [v.quant or cfg.lm.quant for v in cfg.variants] == ["none"] * 4 + ["int8"] * 2 + ["int4"] * 2
    # the paper's claims are tested in its own setting (4-bit), with enough seeds for an interval
    assert len(cfg.seeds) >= 3 and cfg.claims
    assert all(c.better.variant == "adamw_int4" and c.than.variant == "stable_spam_int4" for c in cfg.claims)


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


def test_quant_none_is_the_float32_path_and_int4_trains_fake_quantised(monkeypatch):
    from poise.models.quant import FakeQuantLinear
    from poise.runs.kinds import optimizers as study

    cfg = load_recipe("optimizers", ["lm.steps=4", "lm.eval_every=2", "lm.n_embd=16", "lm.n_layer=1"])
    seen = {}
    make = study.make_optimizer

    def spy(v, model, key="variant"):
        seen[v.name] = sorted(type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear))
        return make(v, model, key)

    monkeypatch.setattr(study, "make_optimizer", spy)
    names = [v.name for v in cfg.variants]
    r32 = study.run_one_optim(cfg, names.index("adamw"), seed=0)
    r4 = study.run_one_optim(cfg, names.index("adamw_int4"), seed=0)
    assert seen["adamw"] == ["Linear"] * 5 and r32["quant"] == "none"
    # 4 layers of the block swapped, the tied output head kept in float32
    assert seen["adamw_int4"] == ["FakeQuantLinear"] * 4 + ["Linear"] and r4["quant"] == "int4"
    assert r4["losses"][0] != r32["losses"][0] and abs(r4["losses"][0] - r32["losses"][0]) < 0.1
    # lm.quant applies to every variant without its own
    cfg8 = load_recipe("optimizers", ["lm.steps=2", "lm.n_embd=16", "lm.n_layer=1", "lm.quant=int8"])
    assert [study.variant_quant(cfg8, i) for i in range(len(names))] == ["int8"] * 6 + ["int4"] * 2
    assert isinstance(FakeQuantLinear, type)


def test_interval95_by_hand():
    from poise.runs.kinds.optimizers import interval95

    # [1, 2, 3]: mean 2, sd 1, t_{2,0.975} = 4.303 -> 2 ± 4.303/sqrt(3) = 2 ± 2.4844
    lo, hi = interval95([1.0, 2.0, 3.0, float("nan")])
    assert lo == pytest.approx(2 - 2.4844, abs=1e-4) and hi == pytest.approx(2 + 2.4844, abs=1e-4)
    assert interval95([1.0]) is None


def test_quantised_study_reports_precision_and_intervals(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", "optimizers", "--run-dir", str(run_dir), "--no-progress", "seeds=[0,1]", "lm.steps=4",
            "lm.eval_every=2", "lm.n_embd=16", "lm.n_layer=1", "lm.block_size=12",
            "variants=[{name='adamw_int4',optimizer='adamw',quant='int4'},"
            "{name='stable_spam_int4',optimizer='stable_spam',quant='int4'}]"]
    assert main(args) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    row = summary["variants"]["adamw_int4"]
    assert row["quant"] == "int4" and len(row["interval95"]["final_val_loss"]) == 2
    lo, hi = row["interval95"]["final_val_loss"]
    assert lo <= row["final_val_loss"]["mean"] <= hi
    assert [c["verdict"] for c in summary["claims"]] and all(c["n"] == 2 for c in summary["claims"])
    html = (run_dir / "report.html").read_text()
    assert "INT4" in html and "95% interval" in html


@pytest.mark.parametrize("override, message", [
    ("variants.soap.optimizer=lion", "unknown optimizer 'lion'; valid choices: adam, adamw, classp, frugal"),
    ("variants.soap.params.momentum=0.9", "unknown argument of optimizer 'soap'; valid: lr, betas"),
    ("variants.soap.params.lr=-1.0", "lr=-1.0 is out of range"),
    ("lm.n_head=3", "lm.n_embd=64 must be a multiple of lm.n_head=3"),
    ("lm.corpus=shakespeare", "unknown corpus 'shakespeare'; valid choices: arithmetic"),
    ("lm.quant=fp4", "lm.quant: unknown quantisation 'fp4'; valid choices: none, int8, int4"),
    ("variants.adamw_int4.quant=int2", "variants[6].quant: unknown quantisation 'int2'; valid choices: none, int8"),
])
def test_bad_optimizer_recipe(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("optimizers", [override])
    assert message in str(e.value)


def test_unknown_kind():
    from poise.runs.config import from_dict

    with pytest.raises(ConfigError, match="unknown study kind 'bandit'; valid choices: continual, optimizers, rl"):
        from_dict({"kind": "bandit"})

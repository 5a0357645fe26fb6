"""The unlearn study kind: its config checks, its metric functions by hand, and a tiny study end to end
(continual curve, summary columns, claims' verdicts, a diverged run flagged)."""

import json

import pytest
import torch

from poise.edit.unlearn_study import forget_relapse, gradient_unlearn, retention_gap, train_classifier
from poise.runs.config import ConfigError, load_recipe
from poise.runs.engine import execute
from poise.runs.kinds import KINDS
from poise.runs.kinds.unlearn import KIND
from poise.runs.verdict import VERDICTS

TINY = ["seeds=[0, 1]", "model.train_steps=60", "stream.requests=2", "stream.steps=4", "stream.eval_every=2",
        "attack.calibrate=false", "attack.steps=3"]


@pytest.fixture(autouse=True)
def _kind(monkeypatch):
    monkeypatch.setitem(KINDS, "unlearn", "poise.runs.kinds.unlearn")  # until the kind is in the one list


def _load(*overrides):
    return load_recipe("unlearn-relearn", [*TINY, *overrides])


# -- config --------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "match"), [
    (["stream.classes=[3, 12]"], r"stream\.classes\[1\]=12: a class the model never learned; valid: 0 to 9"),
    (["stream.classes=[-1, 2]"], r"stream\.classes\[0\]=-1: a class the model never learned"),
    (["stream.requests=0"], r"stream\.requests=0; valid: 1 to 9"),
    (["stream.requests=10"], r"stream\.requests=10; valid: 1 to 9"),
    (["stream.classes=[4, 4]"], r"stream\.classes\[1\]=4: class 4 is requested twice"),
    (["stream.classes=[4]"], r"stream\.classes has 1 classes but stream\.requests=2"),
    (["stream.eval_every=0"], r"stream\.eval_every=0 must be > 0"),
    (["attack.n=0"], r"attack\.n=0; valid: 1 to 50"),
    (["attack.calibrate=true", "seeds=[0, 100]"], r"share \[100\]: calibration seeds are held out"),
    (["attack.target_forget=[0.7, 0.2]"], r"attack\.target_forget=\[0\.7, 0\.2\]"),
    (["variants=[{method='sgd'}]"], r"variants\[0\]\.method: unknown unlearning method 'sgd'; valid choices: ga, "
                                    r"graddiff, npo, stableun, fit, acu, retrain, none"),
    (["variants=[{method='npo', params={rho=0.5}}]"], r"params\.rho: unknown argument of method 'npo'; valid: beta"),
    (["variants=[{method='npo', params={beta=0}}]"], r"params\.beta=0 must be > 0"),
    (["variants=[{method='fit', params={top_k=9}}]"], r"params\.top_k=9; valid: 1 to 3 \(the model's linear"),
    (["model.hidden=1000000"], r"model\.hidden=1000000; valid: 1 to 4,096"),
    (["variants=[{method='stableun', params={n_noise=0.5}}]"], r"params\.n_noise=0\.5 must be an integer"),
    (["variants=[{method='fit', params={tau=7}}]"], r"variants\[0\]\.params\.tau=7; valid: -1 to 1 \(a cosine"),
    (["variants=[{method='fit', params={tau=-1.5}}]"], r"params\.tau=-1\.5; valid: -1 to 1"),
    (["attack.steps=1000000000"], r"attack\.steps=1000000000; valid: 0 to 10,000"),
])
def test_bad_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _load(*overrides)


def test_defaults_every_method_once_and_every_field_has_help():
    from poise.runs.config import field_help

    cfg = load_recipe("unlearn-relearn")
    assert [v.method for v in cfg.variants] == ["ga", "graddiff", "npo", "stableun", "fit", "acu", "retrain", "none"]
    assert cfg.attack.calibrate and len(cfg.seeds) >= 5 and len(cfg.claims) >= 4
    assert all(h for _, _, _, h in field_help(KIND.Config))
    quick = load_recipe("unlearn-relearn", quick=True)
    assert quick.seeds == [0] and not quick.attack.calibrate


# -- the metric functions, by hand ---------------------------------------------------------
def test_retention_gap_by_hand():
    g = retention_gap([0, 2, 4, 6, 8], [0.9, 0.8, 0.5, 0.7, 0.89], eps=0.02)
    # min 0.5 at step 4; drop 0.9 - 0.5 = 0.4; recovered 0.89 - 0.5 = 0.39; back within 0.02 of 0.9 (>= 0.88)
    # first at step 8: 8 - 4 = 4 steps
    assert g["retain_start"] == 0.9 and g["retain_min"] == 0.5 and g["retain_final"] == 0.89
    assert g["retain_drop"] == pytest.approx(0.4) and g["retain_recovered"] == pytest.approx(0.39)
    assert g["retain_recovery_steps"] == 4
    never = retention_gap([0, 1, 2], [0.9, 0.5, 0.6])
    assert never["retain_recovery_steps"] is None and never["retain_drop"] == pytest.approx(0.4)
    flat = retention_gap([0, 5], [0.8, 0.81])  # the minimum is the start: no gap, recovered at once
    assert flat["retain_drop"] == 0 and flat["retain_recovery_steps"] == 0
    with pytest.raises(ValueError, match="one accuracy per step"):
        retention_gap([0, 1], [0.5])


def test_forget_relapse_by_hand():
    # request 0: 0.0 right after it, 0.3 at the end (+0.3); request 1: 0.1 -> 0.2 (+0.1); the last has no later one
    assert forget_relapse([0.0, 0.1, 0.0], [0.3, 0.2, 0.0]) == pytest.approx(0.2)
    assert forget_relapse([0.0], [0.5]) is None


def _tiny_model():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 64, generator=g)
    y = torch.arange(60) % 3
    return train_classifier(x, y, seed=0, steps=5, hidden=8, depth=1, n_classes=3), x, y


def test_gradient_unlearn_empty_forget_set_is_a_no_op():
    model, x, y = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    out = gradient_unlearn(model, "npo", x[:0], y[:0], x, y, steps=5, lr=0.1, seed=0, inplace=True,
                           on_step=lambda i, m: calls.append(i))
    assert out is model and not calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_unlearn_refuses_and_counts_steps():
    model, x, y = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="method='sga'; valid choices: ga, graddiff, npo, stableun"):
        gradient_unlearn(model, "sga", x[:5], y[:5], x, y, steps=2, lr=0.1, seed=0, inplace=True)
    with pytest.raises(ValueError, match="needs retain data"):
        gradient_unlearn(model, "npo", x[:5], y[:5], x[:0], y[:0], steps=2, lr=0.1, seed=0, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refusals changed nothing
    calls = []
    out = gradient_unlearn(model, "stableun", x[:5], y[:5], x, y, steps=3, lr=0.1, seed=0,
                           on_step=lambda i, m: calls.append(i))
    assert calls == [1, 2, 3] and out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy was unlearned


# -- a tiny study end to end ---------------------------------------------------------------
def test_tiny_study_end_to_end(tmp_path):
    cfg = _load("variants=[{method='ga'},{method='stableun'},{method='fit'},{method='acu'},{method='retrain'}]")
    path = execute(cfg, tmp_path / "u", progress=False, report=True, kind=KIND)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["kind"] == "unlearn" and summary["complete"]
    for variant, row in summary["variants"].items():
        assert not [k for k, _ in KIND.columns if k not in row], variant
        assert row["forget_acc_attacked"]["n"] == 2 and row["diverged"]["count"] == 0
    verdicts = {c["text"]: c for c in summary["claims"]}
    ga_stable = next(c for t, c in verdicts.items() if t.startswith("StableUN resists relearning better than GA"))
    assert ga_stable["verdict"] in VERDICTS[:3] and ga_stable["n"] == 2 and len(ga_stable["interval"]) == 2
    assert next(c for t, c in verdicts.items() if "than NPO (the same" in t)["verdict"] == "untested"  # no npo here
    # the continual curve: every 2 of the 2 x 4 unlearning steps, the retained classes and each requested class
    r = json.loads((path / "results" / "ga-s1.json").read_text())
    assert r["classes"] == [1, 2]  # (seed + k) % 10
    assert [c["step"] for c in r["curve"]] == [0, 2, 4, 6, 8]
    assert [c["request"] for c in r["curve"]] == [0, 1, 1, 2, 2]
    assert all({"retain_acc", "forget/1", "forget/2"} <= set(c) for c in r["curve"])
    lines = (path / "metrics" / "ga-s1.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 2, 4, 6, 8]
    m = r["metrics"]
    assert m["retain_start"] == r["curve"][0]["retain_acc"] and m["retain_acc"] == r["curve"][-1]["retain_acc"]
    assert m["retain_min"] == min(c["retain_acc"] for c in r["curve"])
    assert m["per_request"]["0"]["forget_at_end"] == r["curve"][2]["forget/1"]  # right after request 0 (step 4)
    assert m["per_request"]["0"]["forget_final"] == r["curve"][-1]["forget/1"]
    # FIT is scored inside its own optimizer loop too; methods without steps at each request's end
    fit = json.loads((path / "results" / "fit-s0.json").read_text())
    assert [c["step"] for c in fit["curve"]] == [0, 2, 4, 6, 8] and len(fit["fit"]) == 2
    retrain = json.loads((path / "results" / "retrain-s0.json").read_text())
    assert [c["step"] for c in retrain["curve"]] == [0, 4, 8]
    assert retrain["metrics"]["forget_acc"] < 0.05  # never saw classes 0 and 1
    assert r["attack"] == {"mix": 25, "steps": 3, "lr": 0.003, "calibrated": False, "target_met": None, "table": []}
    assert (path / "report.html").is_file() and (path / "unlearn_curves.png").is_file()


def test_calibration_inside_the_study_picks_from_the_grid():
    from poise.edit.unlearn_study import attack_candidates, choose_attack
    from poise.runs.kinds.unlearn import CAL_LRS, CAL_MIXES, CAL_STEPS, attack_setting

    cfg = _load("stream.requests=1", "attack.calibrate=true", "attack.calibration_seeds=[100]")
    st = attack_setting(cfg)
    assert st["calibrated"] and st["mix"] in CAL_MIXES and st["steps"] in CAL_STEPS and st["lr"] in CAL_LRS
    assert len(st["table"]) == len(CAL_MIXES) * len(CAL_STEPS) * len(CAL_LRS)
    assert all(0 <= row["forget"] <= 1 and 0 <= row["retain"] <= 1 for row in st["table"])
    # the table is the grid in the calibration rule's order, and the setting is exactly the rule's choice on it
    assert [{k: r[k] for k in ("mix", "steps", "lr")} for r in st["table"]] == attack_candidates(CAL_MIXES, CAL_STEPS,
                                                                                                 CAL_LRS)
    a = cfg.attack
    want, met = choose_attack(st["table"], CAL_MIXES, (a.target_forget[0], a.target_forget[1]), a.target_retain)
    assert {k: st[k] for k in ("mix", "steps", "lr")} == want and st["target_met"] is met


def test_a_diverged_run_is_flagged_never_averaged(tmp_path):
    # gradient ascent at an absurd learning rate drives the weights to inf/NaN
    cfg = _load("seeds=[0]", "variants=[{method='ga'},{method='none'}]", "stream.lr=1e30", "stream.steps=6")
    path = execute(cfg, tmp_path / "d", progress=False, report=False, kind=KIND)
    summary = json.loads((path / "summary.json").read_text())
    ga = summary["variants"]["ga"]
    assert ga["diverged"]["count"] == 1 and "forget_acc" not in ga  # no number from a diverged run
    r = json.loads((path / "results" / "ga-s0.json").read_text())
    assert r["diverged_at"] is not None and "forget_acc" not in r["metrics"]
    assert json.loads((path / "metrics" / "ga-s0.jsonl").read_text().splitlines()[-1])["diverged"] is True
    assert summary["variants"]["none"]["forget_acc"]["n"] == 1


def test_the_size_guard_counts_the_attack_and_the_calibration(tmp_path):
    """steps_per_run counts the relearning attack (attack.steps per forgotten class) and each run's share of the
    calibration (its grid of attacks on the retrain reference of every calibration seed, and their training), so
    a huge attack meets the size guard before any work."""
    from poise.runs.engine import total_steps
    from poise.runs.kinds.unlearn import CAL_LRS, CAL_MIXES, CAL_STEPS

    base = _load("attack.steps=0")
    runs = len(base.variants) * len(base.seeds)
    assert total_steps(base, KIND) == runs * 2 * 4  # 2 requests x 4 unlearning steps
    assert total_steps(_load("attack.steps=20"), KIND) == runs * 2 * (4 + 20)
    cal = _load("attack.calibrate=true", "attack.calibration_seeds=[100, 101]")
    grid = len(CAL_MIXES) * len(CAL_LRS) * sum(CAL_STEPS)  # one attack per candidate per forgotten class
    shared = 2 * (60 + 2 * grid)  # per calibration seed: train the reference (60 steps), then the grid
    assert total_steps(cal, KIND) >= runs * 2 * (4 + max(CAL_STEPS)) + shared
    assert total_steps(cal, KIND) < runs * 2 * (4 + max(CAL_STEPS)) + shared + runs  # the share rounds up
    import dataclasses

    def never(*args, **kwargs):
        raise AssertionError("the size guard let a run start")

    big = _load("attack.steps=10000", "stream.requests=9", "seeds=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]")
    with pytest.raises(ConfigError, match=r"above the 250,000 a unlearn study runs without confirmation"):
        execute(big, tmp_path / "r", progress=False, report=False, kind=dataclasses.replace(KIND, run_one=never))


def test_progress_adds_up_to_steps_per_run():
    from poise.runs.kinds.unlearn import run_one_unlearn

    cfg = _load("seeds=[0]", "variants=[{method='ga'},{method='acu'}]", "attack.steps=5")
    for i in range(2):
        ticks = []
        run_one_unlearn(cfg, i, 0, None, ticks.append)
        assert sum(ticks) == KIND.steps_per_run(cfg) == 2 * (4 + 5)


def test_acu_refusing_a_request_mid_study_is_a_config_error_naming_variant_class_and_gamma():
    """A tiny gamma makes ACU's exact unlearning system I - X R X^T singular: one ConfigError naming the variant,
    the request's class and params.gamma (exit 2 at the command line), not a ValueError traceback."""
    from poise.runs.kinds.unlearn import run_one_unlearn

    cfg = _load("seeds=[0]", "variants=[{name='acu-tiny', method='acu', params={gamma=1e-300}}]")
    with pytest.raises(ConfigError, match=r"variants\.acu-tiny: request 0 \(class 0\) was refused by ACU: .*singular"
                                          r".*params\.gamma=1e-300"):
        run_one_unlearn(cfg, 0, 0)


def test_acu_refusal_at_the_command_line_is_one_line_with_exit_2(tmp_path, capsys):
    from poise.cli import main

    code = main(["run", "unlearn-relearn", "--quick", "--no-report", "--no-progress", "model.train_steps=50",
                 "stream.steps=4", "variants=[{name='acu', method='acu', params={gamma=1e-300}}]",
                 "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "variants.acu: request 0" in err[-1] and "params.gamma=1e-300" in err[-1]

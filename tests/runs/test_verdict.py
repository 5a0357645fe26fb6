"""Claims are tested, not illustrated: the verdict is computed from a t interval over seeds."""

import math

import pytest

from poise.runs.verdict import ClaimConfig, Side, evaluate_claim, run_metric, t975


def _claim(margin=0.0):
    return ClaimConfig(text="A beats B", paper="arXiv 0000.00000", better=Side("a", "acc"), than=Side("b", "acc"),
                       margin=margin)


def _runs(a, b, diverged=()):
    out = [{"variant": "a", "seed": s, "metrics": {"acc": x}} for s, x in enumerate(a)]
    out += [{"variant": "b", "seed": s, "metrics": {"acc": x}} for s, x in enumerate(b)]
    for v, s in diverged:
        next(r for r in out if r["variant"] == v and r["seed"] == s)["diverged_at"] = 7
    return out


def test_interval_by_hand_and_reproduced():
    # d = (0.1, 0.2, 0.3): mean 0.2, sd 0.1, half-width t_{2,.975} * 0.1 / sqrt(3) = 4.303 * 0.057735 = 0.24843
    v = evaluate_claim(_claim(), _runs([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]))
    assert v["n"] == 3 and v["estimate"] == pytest.approx(0.2)
    assert v["interval"] == pytest.approx([0.2 - 0.248434, 0.2 + 0.248434], abs=1e-5)
    assert v["verdict"] == "inconclusive"  # the interval contains 0: three noisy seeds cannot decide
    v = evaluate_claim(_claim(), _runs([0.60, 0.61, 0.62, 0.61], [0.50, 0.50, 0.51, 0.50]))
    assert v["verdict"] == "reproduced" and v["interval"][0] > 0


def test_not_reproduced_when_the_interval_excludes_the_claimed_effect():
    v = evaluate_claim(_claim(), _runs([0.50, 0.51, 0.50, 0.49], [0.60, 0.61, 0.62, 0.61]))
    assert v["verdict"] == "not reproduced" and v["interval"][1] < 0
    # a margin: an effect that exists but is smaller than claimed is not the claim
    v = evaluate_claim(_claim(margin=0.2), _runs([0.60, 0.61, 0.62, 0.61], [0.50, 0.50, 0.51, 0.50]))
    assert v["verdict"] == "not reproduced"


def test_one_seed_and_diverged_runs_are_inconclusive_not_a_number():
    v = evaluate_claim(_claim(), _runs([0.9], [0.1]))
    assert v["verdict"] == "inconclusive" and "at least 2" in v["why"] and v["interval"] is None
    v = evaluate_claim(_claim(), _runs([0.9, 0.9, float("nan")], [0.1, 0.1, 0.1], diverged=[("a", 1)]))
    assert v["n"] == 1 and v["diverged_runs"] == [["a", 1]] and v["verdict"] == "inconclusive"


def test_metric_lookup_and_t_table():
    r = {"final_acc": 0.5, "metrics": {"per_task": {"0": {"gap_depth": 0.25}}, "x": math.inf}}
    assert run_metric(r, "final_acc") == 0.5 and run_metric(r, "per_task.0.gap_depth") == 0.25
    assert run_metric(r, "x") is None and run_metric(r, "nope") is None
    assert t975(1) == 12.706 and t975(4) == 2.776 and t975(200) == 1.96


def test_a_claim_about_a_missing_variant_is_untested_not_dropped():
    v = evaluate_claim(_claim(), [r for r in _runs([0.6, 0.7], [0.5, 0.5]) if r["variant"] == "a"])
    assert v["verdict"] == "untested" and "'b'" in v["why"]


def test_the_engine_and_cli_report_verdicts_and_divergence(tmp_path, capsys):
    import json

    from poise.cli import main

    run = tmp_path / "r"
    claim = ("claims=[{text='replay beats finetune',paper='arXiv 1902.10486',better={variant='replay',metric='acc'},"
             "than={variant='finetune',metric='acc'}}]")
    assert main(["run", "tiny", "seeds=[0,1]", "train.steps_per_task=5", claim, "--run-dir", str(run),
                 "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    (c,) = summary["claims"]
    assert c["n"] == 2 and c["verdict"] in ("reproduced", "not reproduced", "inconclusive") and c["interval"]
    out = capsys.readouterr().out
    assert f"-> {c['verdict'].upper()}" in out
    page = (run / "report.html").read_text()
    assert "replay beats finetune" in page and c["verdict"] in page


def test_a_side_can_be_a_constant():
    # "the correlation is negative": 0 - rho > 0 over seeds; rho = (-0.3, -0.5, -0.4): d = (0.3, 0.5, 0.4), mean 0.4,
    # sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.2484: [0.1516, 0.6484] above 0
    c = ClaimConfig(text="rho < 0", paper="arXiv 2504.09522", better=Side(value=0.0), than=Side("a", "rho"))
    runs = [{"variant": "a", "seed": s, "metrics": {"rho": x}} for s, x in enumerate([-0.3, -0.5, -0.4])]
    v = evaluate_claim(c, runs)
    assert v["better"] == "0" and v["than"] == "a.rho" and v["verdict"] == "reproduced"
    assert v["interval"] == pytest.approx([0.4 - 0.248434, 0.4 + 0.248434], abs=1e-5)


def test_the_same_difference_on_every_seed_is_inconclusive_not_a_zero_width_interval():
    # two collapsed runs of a quantised metric: the difference 0.25 on both seeds, sd 0
    v = evaluate_claim(_claim(), _runs([0.75, 0.75], [0.5, 0.5]))
    assert v["verdict"] == "inconclusive" and v["interval"] is None and "zero spread" in v["why"]
    assert v["estimate"] == pytest.approx(0.25)
    v = evaluate_claim(_claim(), _runs([0.9, 0.9, 0.9], [0.9, 0.9, 0.9]))  # both saturated at one value
    assert v["verdict"] == "inconclusive"

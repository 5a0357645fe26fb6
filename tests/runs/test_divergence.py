"""A diverged run is a result that is flagged, never a number in a table."""

import json


def test_a_continual_run_that_diverges_is_stopped_flagged_and_left_out(tmp_path, capsys):
    from poise.cli import main
    from poise.runs.store import read_jsonl

    run = tmp_path / "r"
    # EWC at lam = 1000 with SGD lr 0.05 on rotated digits: the penalty's curvature makes SGD blow up after the switch
    assert main(["run", "domain-shift", "--quick", "workload.n_tasks=2", "variants=[{strategy='finetune'},"
                 "{strategy='ewc',params={lam=1000.0}}]", "--run-dir", str(run), "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    ewc = summary["variants"]["ewc"]
    (seed, step), = ewc["diverged"]["at"]
    assert ewc["diverged"]["count"] == 1 and 100 < step < 200  # after the switch at step 100
    assert "acc" not in ewc  # no mean from a diverged run
    assert summary["variants"]["finetune"]["diverged"]["count"] == 0 and summary["variants"]["finetune"]["acc"]["n"]
    rows = read_jsonl(run / "metrics" / "ewc-s0.jsonl")
    assert rows[-1]["step"] == step and rows[-1]["diverged"] and len(rows) < 300  # it stopped there
    out = capsys.readouterr().out
    assert f"ewc (seed 0): diverged at step {step}" in out and "SMOKE RUN" in out and "± 0.000" not in out
    page = (run / "report.html").read_text()
    assert f"diverged at step {step}" in page and "not for conclusions" in page


def test_a_poise_optimizer_refusing_a_nan_gradient_is_a_diverged_run_not_a_crash(tmp_path, monkeypatch):
    from poise.runs.config import load_recipe
    from poise.runs.kinds import continual

    real = continual.fit_stream

    def nan_at_5(model, *a, log=None, **k):
        def poisoned(rec):
            log(rec)
            if rec.get("step") == 4 and not rec.get("boundary"):  # the next backward gives NaN gradients
                for p in model.parameters():
                    p.data.fill_(float("nan"))
        return real(model, *a, log=poisoned, **k)

    monkeypatch.setattr(continual, "fit_stream", nan_at_5)
    cfg = load_recipe("tiny", ["seeds=[0]", "train.optimizer=adamw", "train.lr=0.001", "train.steps_per_task=8",
                               "variants=[{strategy='finetune'}]"])
    r = continual.run_one(cfg, 0, 0)
    assert r["diverged_at"] == 5


def test_the_users_skip_guard_stops_the_study_with_exit_3(tmp_path, monkeypatch, capsys):
    """nonfinite='skip' with max_consecutive_skips through the optimizer slot: when the guard gives up, the
    study stops (exit 3, naming the parameter), as the guard documents; not a silent diverged row."""
    from poise.cli import main
    from poise.runs.kinds import continual

    real = continual.fit_stream

    def nan_from_3(model, *a, log=None, **k):
        def poisoned(rec):  # from step 3 every gradient is NaN (the weights stay finite: the guard skips)
            log(rec)
            if rec.get("step") == 2 and not rec.get("boundary"):
                for p in model.parameters():
                    p.register_hook(lambda g: g * float("nan"))
        return real(model, *a, log=poisoned, **k)

    monkeypatch.setattr(continual, "fit_stream", nan_from_3)
    assert main(["run", "tiny", "seeds=[0]", "train.optimizer=adamw", "train.lr=0.001", "train.steps_per_task=8",
                 "train.optimizer_params={nonfinite='skip',max_consecutive_skips=3}",
                 "variants=[{strategy='finetune'}]", "--run-dir", str(tmp_path / "g"), "--no-progress",
                 "--no-report"]) == 3
    err = capsys.readouterr().err
    assert "training stopped" in err and "max_consecutive_skips=3" in err and "net." in err


def test_the_users_skip_guard_stops_an_optimizers_study_too(monkeypatch):
    """In the optimizers study a non-finite gradient under nonfinite='raise' is a diverged run, but the
    guard giving up under nonfinite='skip' (ConsecutiveSkipsError) stops the study: never a diverged row."""
    import pytest

    from poise.optim import AdamW, ConsecutiveSkipsError
    from poise.runs.config import load_recipe
    from poise.runs.kinds import optimizers

    def gives_up(self, closure=None):
        raise ConsecutiveSkipsError("3 consecutive steps skipped (max_consecutive_skips=3)")

    monkeypatch.setattr(AdamW, "step", gives_up)
    cfg = load_recipe("optimizers", ["seeds=[0]", "lm.steps=3", "variants=[{optimizer='adamw'}]"])
    with pytest.raises(ConsecutiveSkipsError):
        optimizers.KIND.run_one(cfg, 0, 0)


def test_a_model_that_evaluates_to_nan_is_a_diverged_run_not_an_accuracy(monkeypatch):
    """nonfinite='skip' lets a NaN loss pass (the optimizer skips the step), but weights that became NaN are
    evaluated as NaN: the run is flagged diverged at that evaluation, never averaged as an accuracy."""
    from poise.runs.config import load_recipe
    from poise.runs.engine import summarize_results
    from poise.runs.kinds import continual

    real = continual.fit_stream

    def nan_at_3(model, *a, log=None, **k):
        def poisoned(rec):
            log(rec)
            if rec.get("step") == 3 and not rec.get("boundary"):
                for p in model.parameters():
                    p.data.fill_(float("nan"))
        return real(model, *a, log=poisoned, **k)

    monkeypatch.setattr(continual, "fit_stream", nan_at_3)
    cfg = load_recipe("tiny", ["seeds=[0]", "train.optimizer=adamw", "train.lr=0.001", "train.steps_per_task=8",
                               "train.optimizer_params={nonfinite='skip'}", "variants=[{strategy='finetune'}]",
                               "eval.every=1"])
    r = continual.run_one(cfg, 0, 0)
    assert r["diverged_at"] == 4  # the first evaluation of the NaN weights
    summary = summarize_results(continual.KIND, {"eval": {"windows": [10]}}, [r], [])
    assert summary["variants"]["finetune"]["diverged"]["count"] == 1

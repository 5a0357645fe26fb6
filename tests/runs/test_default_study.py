"""The default study's headline claim, on one seed: continual evaluation shows the stability
gap for replay (task 0 dips well below its end-of-task accuracy, then partly recovers),
while fine-tuning forgets task 0 completely."""

from poise.runs.config import load_recipe
from poise.runs.study import run_one


def test_default_study_shows_the_stability_gap_for_replay():
    cfg = load_recipe(None, ["seeds=[0]"])
    names = [v.name for v in cfg.variants]
    replay = run_one(cfg, names.index("replay"), seed=0)["metrics"]
    t0 = replay["per_task"]["0"]
    assert t0["acc_at_end"] >= 0.95
    assert t0["min_after"] <= t0["acc_at_end"] - 0.1  # the gap: a clear dip after the switch
    assert t0["acc_final"] >= t0["min_after"] + 0.05  # ... and a partial recovery
    assert replay["min_acc"] < replay["acc"] - 0.1  # boundary-only metrics hide it
    finetune = run_one(cfg, names.index("finetune"), seed=0)["metrics"]
    assert finetune["per_task"]["0"]["acc_final"] <= 0.05 and finetune["forgetting"] > 0.9

"""The federated study kind (poise.runs.kinds.federated): per-round metrics by hand, the server loop's mechanism
(full participation makes beta irrelevant, drop-outs are absent, prototype merging equals the pooled class means),
bad input named, a diverged run flagged, a sweep over beta, the Flower engine's extra, and a whole tiny study."""

import json

import numpy as np
import pytest
import torch

from poise.federated import fedstale_aggregate
from poise.federated import study as fs
from poise.runs.config import ConfigError, apply_overrides, from_dict, load_recipe
from poise.runs.engine import execute
from poise.runs.kinds import KINDS


@pytest.fixture(autouse=True)
def federated_kind(monkeypatch):
    monkeypatch.setitem(KINDS, "federated", "poise.runs.kinds.federated")  # until the kind is in KINDS


def kind():
    from poise.runs.kinds.federated import KIND

    return KIND


TINY = {"kind": "federated", "name": "fed-tiny", "seeds": [0], "threads": 1,
        "data": {"n_clients": 4, "participation": [0.9, 0.3, 0.6, 0.5]},
        "train": {"rounds": 3, "local_steps": 2},
        "eval": {"warmup": 0, "final_window": 2},
        "variants": [{"name": "fedavg", "beta": 0.0}, {"name": "fedstale", "beta": 0.5}]}


def cfg_of(**over):
    data = json.loads(json.dumps(TINY))
    return from_dict(apply_overrides(data, [f"{k.replace('__', '.')}={v}" for k, v in over.items()]))


# -- metrics by hand ---------------------------------------------------------------------------------------------
def test_round_metrics_by_hand():
    from poise.runs.kinds.federated import round_metrics

    acc = [0.1, 0.5, 0.4, 0.6, 0.5]  # rounds 0..4
    client = np.array([[0.1, 0.1], [0.6, 0.4], [0.3, 0.5], [0.6, 0.6], [0.5, 0.4]])
    classes = np.full((5, 10), 0.5)
    classes[:, :2] = 1.0  # classes 0-1 (base) right, the rest half right
    fresh = [[0, 1], [1], [0, 1], [0]]  # round 2: client 0 absent; round 4: client 1 absent
    m = round_metrics(acc, client, classes, fresh, warmup=1, window=2, base_classes=2)
    assert m["final_acc"] == pytest.approx(0.55)  # (0.6 + 0.5) / 2
    assert m["last_acc"] == pytest.approx(0.5)
    assert m["min_acc"] == pytest.approx(0.4)  # min of rounds 2..4 (round 1 is the warm-up)
    assert m["wc_acc"] == pytest.approx(0.5)  # client means over rounds 3-4: 0.55, 0.5
    assert m["max_drop"] == pytest.approx(0.1)  # drops after round 1: .1, 0, .1
    assert m["mean_drop"] == pytest.approx(0.2 / 3)
    # absent pairs: (round 2, client 0): 0.6 -> 0.3 falls 0.3; (round 4, client 1): 0.6 -> 0.4 falls 0.2
    assert m["absent_forgetting"] == pytest.approx(0.25)
    assert m["absent_acc"] == pytest.approx(0.35)  # (0.3 + 0.4) / 2
    assert m["participants"] == pytest.approx(1.5)
    assert m["acc_base"] == pytest.approx(1.0) and m["acc_new"] == pytest.approx(0.5)
    assert m["client_acc"] == {"0": pytest.approx(0.55), "1": pytest.approx(0.5)}
    full = round_metrics(acc, client, classes, [[0, 1]] * 4, warmup=1, window=2)
    assert full["absent_forgetting"] is None and full["absent_acc"] is None and "acc_base" not in full


# -- the server loop's mechanism ----------------------------------------------------------------------------------
def curves(result):
    return result["curves"]["acc"], result["curves"]["client_acc"]


def test_full_participation_makes_beta_irrelevant():
    from poise.runs.kinds.federated import run_one_federated

    cfg = cfg_of(data__participation="[1.0]", variants="[{name='a',beta=0.0},{name='b',beta=1.0}]")
    a, b = run_one_federated(cfg, 0, 0), run_one_federated(cfg, 1, 0)
    # every client replies every round: Delta = b sum alpha h + sum alpha (Delta_i - b h) = sum alpha Delta_i
    np.testing.assert_allclose(curves(a)[0], curves(b)[0], atol=1e-6)
    np.testing.assert_allclose(curves(a)[1], curves(b)[1], atol=1e-6)
    assert a["curves"]["fresh"] == [[0, 1, 2, 3]] * 3


def test_partial_participation_beta_matters():  # the test above could pass by ignoring beta: this one cannot
    from poise.runs.kinds.federated import run_one_federated

    cfg = cfg_of(variants="[{name='a',beta=0.0},{name='b',beta=1.0}]")
    a, b = run_one_federated(cfg, 0, 0), run_one_federated(cfg, 1, 0)
    assert a["curves"]["update_norm"] != pytest.approx(b["curves"]["update_norm"])


def test_a_client_dropping_out_mid_round_is_absent():
    data = fs.digits_federated(4, 2, 12345)
    probs = [0.9, 0.3, 0.6, 0.5]
    x0 = fs.init_state(0)
    plain = list(fs.fedstale_rounds(x0, data, probs, seed=0, rounds=4, beta=0.0, local_steps=2, lr=0.1))
    drop = list(fs.fedstale_rounds(x0, data, probs, seed=0, rounds=4, beta=0.0, local_steps=2, lr=0.1, dropout=0.5))
    assert sum(len(r.dropped) for r in drop) > 0  # the draws below exercise drop-outs
    for p, d in zip(plain, drop, strict=True):
        # drop-outs never change who is available: the available clients split into replies and drop-outs
        assert sorted(d.fresh + d.dropped) == p.fresh and not set(d.fresh) & set(d.dropped)
        want = [c for c in range(4) if fs.available(0, d.rnd, c, probs[c])]
        assert p.fresh == want
    # round 1 by hand: the server's update is FedAvg over the clients that replied (unbiased weights alpha_i/p_i)
    r1 = drop[0]
    weights = data.weights()
    total = sum(weights.values())
    expect = {k: v.clone() for k, v in x0.items()}
    for c in r1.fresh:
        trained = fs.local_train(x0, *data.clients[c], 0, 1, c, 2, 0.1)
        for k in expect:
            expect[k] += weights[c] / total / probs[c] * (trained[k] - x0[k])
    for k in expect:
        torch.testing.assert_close(r1.state[k], expect[k], rtol=1e-5, atol=1e-6)


def test_every_client_dropping_out_is_a_no_op():
    from poise.runs.kinds.federated import run_one_federated

    cfg = cfg_of(data__dropout=1.0)
    for i in range(2):  # FedAvg and FedStale: no reply and no memory, the model stays as it was
        r = run_one_federated(cfg, i, 0)
        acc = r["curves"]["acc"]
        assert acc == [acc[0]] * 4 and r["diverged_at"] is None
        assert r["curves"]["fresh"] == [[], [], []] and sum(map(len, r["curves"]["dropped"])) > 0
        assert r["metrics"]["participants"] == 0.0 and r["metrics"]["max_drop"] == 0.0


def test_prototype_merge_equals_pooled_class_means():
    data = fs.digits_federated(4, 2, 12345, base_classes=5, shots=3)
    x0 = fs.pretrain_base(fs.init_state(0), data, 0, 20)
    (r, means), = fs.prototype_rounds(x0, data, [1.0] * 4, seed=0, rounds=1)
    assert r.fresh == [0, 1, 2, 3] and r.state["0.weight"].equal(x0["0.weight"])  # the body is never trained
    body = fs.model_from_state(x0)[:2]
    with torch.no_grad():
        xs = torch.cat([data.base[0], *[x for x, _ in data.clients]])
        ys = torch.cat([data.base[1], *[y for _, y in data.clients]])
        emb = body(xs)
    assert sorted(means) == list(range(10))
    for k, m in means.items():
        torch.testing.assert_close(m, emb[ys == k].mean(0), rtol=1e-5, atol=1e-6)
    assert all(len(y) <= 3 * 10 for _, y in data.clients)  # shots: at most 3 per class


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, match", [
    ({"variants": "[{name='x',beta=1.5}]"}, r"variants\[0\]\.beta=1\.5 \(variant 'x'\) must be in \[0, 1\]"),
    ({"variants": "[{name='x',beta=-0.1}]"}, r"variants\[0\]\.beta=-0\.1"),
    ({"data__n_clients": 0, "data__participation": "[0.5]"}, r"data\.n_clients=0 must be >= 1"),
    ({"data__participation": "[0.9, 0.0, 0.6, 0.5]"}, r"data\.participation\[1\]=0\.0 must be in \(0, 1\]"),
    ({"data__participation": "[0.9, 1.5, 0.6, 0.5]"}, r"data\.participation\[1\]=1\.5"),
    ({"data__participation": "[0.9, 0.5]"}, r"data\.participation has 2 values for data\.n_clients=4"),
    ({"train__rounds": 0}, r"train\.rounds=0 must be >= 1"),
    ({"data__dropout": 1.5}, r"data\.dropout=1\.5 must be in \[0, 1\]"),
    ({"train__engine": "ray"}, r"train\.engine: unknown engine 'ray'; valid choices: loop, flower"),
    ({"variants": "[{name='x',rule='median'}]"}, r"variants\[0\]\.rule: unknown rule 'median'; valid choices"),
    ({"variants": "[{name='x',weights='equal'}]"}, r"variants\[0\]\.weights: unknown weights 'equal'"),
    ({"variants": "[{name='x',rule='prototypes'}]"}, r"variants\[0\]\.rule='prototypes' needs .*data\.base_classes"),
    ({"eval__warmup": 3}, r"eval\.warmup=3; valid: 0 to train\.rounds - 1 = 2"),
    ({"eval__final_window": 4}, r"eval\.final_window=4; valid: 1 to train\.rounds = 3"),
    ({"data__dataset": "mnist"}, r"data\.dataset: unknown dataset 'mnist'; valid choices: digits"),
    ({"data__n_clients": 900, "data__participation": "[0.5]"}, r"data: .* shards for .* samples"),
    ({"train__hidden": 100000}, r"train\.hidden=100000; valid: 1 to 4,096"),
    ({"train__batch_size": 10**9}, r"train\.batch_size=1000000000; valid: 1 to 10,000"),
    ({"train__local_steps": 10**9}, r"train\.local_steps=1000000000; valid: 1 to 100,000"),
    ({"train__rounds": 10**7}, r"train\.rounds=10000000; valid: 1 to 100,000"),
    ({"data__base_steps": 10**9}, r"data\.base_steps=1000000000; valid: 0 to 1,000,000"),
])
def test_bad_input_names_the_key_and_value(over, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(**over)


def test_flower_engine_without_flwr_names_the_extra(monkeypatch):
    from poise.runs.kinds import federated

    monkeypatch.setattr(federated, "_flower_missing", lambda: "No module named 'flwr'")
    with pytest.raises(ConfigError, match=r"train\.engine='flower' needs Flower.*poise\[federated\]"):
        cfg_of(train__engine="flower")


def test_prototypes_refuse_the_flower_engine(monkeypatch):
    from poise.runs.kinds import federated

    monkeypatch.setattr(federated, "_flower_missing", lambda: None)
    with pytest.raises(ConfigError, match=r"rule='prototypes' runs only with train\.engine='loop'"):
        cfg_of(train__engine="flower", data__base_classes=5, data__participation="[0.5]",
               variants="[{name='p',rule='prototypes'}]")


# -- whole studies ----------------------------------------------------------------------------------------------
def test_tiny_study_writes_summary_claims_and_report(tmp_path):
    data = json.loads(json.dumps(TINY))
    data["seeds"] = [0, 1]
    data["claims"] = [{"text": "stale helps", "paper": "arXiv 2405.04171",
                       "better": {"variant": "fedstale", "metric": "final_acc"},
                       "than": {"variant": "fedavg", "metric": "final_acc"}}]
    cfg = from_dict(data)
    path = execute(cfg, tmp_path / "run", progress=False, report=True, kind=kind())
    summary = json.loads((path / "summary.json").read_text())
    assert summary["kind"] == "federated" and summary["complete"]
    for row in summary["variants"].values():
        assert all(k in row for k, _ in kind().columns)
        assert row["final_acc"]["n"] == 2 and "client_acc.3" in row
    (claim,) = summary["claims"]
    assert claim["n"] == 2 and claim["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert (path / "report.html").is_file() and (path / "rounds.png").is_file() and (path / "clients.png").is_file()
    lines = [json.loads(x) for x in (path / "metrics" / "fedavg-s0.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all("worst_client_acc" in x for x in lines)
    config = json.loads((path / "config.json").read_text())
    assert config["resolved"]["client_sizes"] and len(config["resolved"]["participation"]) == 4
    import dataclasses

    assert dataclasses.asdict(from_dict(config)) == {k: v for k, v in config.items() if k != "resolved"}


def test_a_diverged_run_is_flagged_never_averaged(tmp_path):
    data = json.loads(json.dumps(TINY))
    data["seeds"] = [0, 1]
    data["sweep"] = {}
    data["claims"] = [{"text": "x", "paper": "y", "better": {"variant": "fedstale", "metric": "final_acc"},
                       "than": {"variant": "fedavg", "metric": "final_acc"}}]
    data = apply_overrides(data, ["train.lr=1e30,0.1"])  # a sweep: the lr=1e30 copies diverge in round 1
    cfg = from_dict(data)
    path = execute(cfg, tmp_path / "run", progress=False, report=True, kind=kind())
    summary = json.loads((path / "summary.json").read_text())
    bad = summary["variants"]["fedavg[lr=1e30]"]
    assert bad["diverged"] == {"count": 2, "runs": 2, "at": [[0, 1], [1, 1]]}
    assert "final_acc" not in bad  # no number from a diverged run
    assert summary["variants"]["fedavg[lr=0.1]"]["final_acc"]["n"] == 2
    assert "diverged at step 1" in (path / "report.html").read_text()


def test_sweep_over_beta_makes_one_variant_per_value(tmp_path):
    data = apply_overrides(json.loads(json.dumps(TINY)), ["variants.fedstale.beta=0.25,0.75"])
    cfg = from_dict(data)
    assert [v.name for v in cfg.variants] == ["fedavg", "fedstale[beta=0.25]", "fedstale[beta=0.75]"]
    assert [v.beta for v in cfg.variants] == [0.0, 0.25, 0.75]
    with pytest.raises(ConfigError, match=r"variants\[2\]\.beta=1\.5 \(variant 'fedstale\[beta=1\.5\]'\)"):
        from_dict(apply_overrides(json.loads(json.dumps(TINY)), ["variants.fedstale.beta=0.25,1.5"]))


@pytest.mark.parametrize("recipe", ["fedstale", "fed-reconnaissance"])
def test_builtin_recipes_load_quick(recipe):
    cfg = load_recipe(recipe, quick=True)
    assert cfg.kind == "federated" and cfg.seeds == [0] and cfg.train.rounds == 8 and cfg.quick
    names = {v.name for v in cfg.variants}
    assert cfg.claims and all(c.better.variant in names and c.than.variant in names for c in cfg.claims)
    full = load_recipe(recipe)
    assert len(full.seeds) == 10


def test_fedstale_recipe_matches_the_benchmark_setup():
    from poise.runs.kinds.federated import run_one_federated

    cfg = load_recipe("fedstale", ["seeds=[0]", "train.rounds=3", "eval.warmup=0", "eval.final_window=1"])
    r = run_one_federated(cfg, 1, 0)  # beta = 0.5: the in-process loop over fedstale_aggregate, by hand below
    data = fs.digits_federated(10, 2, 12345)
    probs = cfg.data.participation
    x, memory = fs.init_state(0), {}
    for rnd in (1, 2, 3):
        fresh = {}
        for c in range(10):
            if fs.available(0, rnd, c, probs[c]):
                trained = fs.local_train(x, *data.clients[c], 0, rnd, c, 10, 0.1)
                fresh[c] = {k: trained[k] - x[k] for k in x}
        delta, memory = fedstale_aggregate(fresh, memory, range(10), 0.5, data.weights(), dict(enumerate(probs)))
        x = {k: x[k] + delta[k] for k in x}
        assert r["curves"]["acc"][rnd] == pytest.approx(fs.evaluate(x, data.x_test, data.y_test)[0])


@pytest.mark.slow
def test_flower_engine_equals_the_loop(tmp_path):
    pytest.importorskip("flwr")
    from poise.runs.kinds.federated import run_one_federated

    loop = cfg_of(train__rounds=2, eval__final_window=1)
    flower = cfg_of(train__rounds=2, eval__final_window=1, train__engine="flower", data__dropout=0.3)
    a = run_one_federated(loop, 1, 0)
    loop_drop = cfg_of(train__rounds=2, eval__final_window=1, data__dropout=0.3)
    b, c = run_one_federated(flower, 1, 0), run_one_federated(loop_drop, 1, 0)
    assert b["engine"] == "flower"
    np.testing.assert_allclose(b["curves"]["acc"], c["curves"]["acc"], atol=1e-6)
    assert b["curves"]["fresh"] == c["curves"]["fresh"] and b["curves"]["dropped"] == c["curves"]["dropped"]
    assert a["curves"]["acc"][0] == b["curves"]["acc"][0]


# -- what the prototypes rule ignores, and the size of a study ---------------------------------------------------
PROTO = {"data__base_classes": 5, "data__participation": "[0.5]", "train__local_steps": 10}  # TINY's 2: not default


@pytest.mark.parametrize("variant, match", [
    ("{name='p',rule='prototypes',beta=0.9}", r"variants\[0\]\.beta=0\.9 \(variant 'p'\): the prototypes rule has no "
                                              r"staleness weight"),
    ("{name='p',rule='prototypes',weights='participants'}", r"variants\[0\]\.weights='participants' \(variant 'p'\): "
                                                            r"the prototypes rule averages no updates"),
])
def test_a_prototypes_variant_refuses_fedstale_settings_it_would_ignore(variant, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(variants=f"[{variant}]", **PROTO)


@pytest.mark.parametrize("key, value", [("train__lr", "1e-300"), ("train__local_steps", 99999),
                                        ("train__batch_size", 7), ("train__server_lr", 2.0)])
def test_train_keys_prototypes_ignore_are_refused_when_every_variant_is_prototypes(key, value):
    name = key.replace("__", ".")
    with pytest.raises(ConfigError, match=rf"{name}=.*every variant uses rule='prototypes', which does not use it"):
        cfg_of(variants="[{name='p',rule='prototypes'}]", **{**PROTO, key: value})
    # beside a gradient rule the key matters (the field help says prototypes ignore it)
    cfg = cfg_of(variants="[{name='p',rule='prototypes'},{name='f',beta=0.5}]", **{**PROTO, key: value})
    assert [v.rule for v in cfg.variants] == ["prototypes", "fedstale"]


def test_the_reviewer_repro_is_refused():
    with pytest.raises(ConfigError, match=r"variants\[0\]\.beta=0\.9"):
        load_recipe("fed-reconnaissance", ["variants=[{name='p',rule='prototypes',beta=0.9,weights='participants'}]",
                                           "train.lr=1e-300", "train.local_steps=99999"], quick=True)


def test_steps_per_run_counts_local_steps_of_every_client():
    from poise.runs.engine import total_steps

    cfg = cfg_of()  # 4 clients x 3 rounds x 2 local steps, no base classes
    assert kind().steps_per_run(cfg) == 4 * 3 * 2
    assert total_steps(cfg, kind()) == 2 * 1 * 24  # 2 variants, 1 seed
    proto = cfg_of(variants="[{name='p',rule='prototypes'}]", **PROTO)  # base training, then one unit per round
    assert kind().steps_per_run(proto) == 300 + 3
    mixed = cfg_of(variants="[{name='p',rule='prototypes'},{name='f',beta=0.5}]", **PROTO)
    assert kind().steps_per_run(mixed) == 300 + 4 * 3 * 10


def test_a_study_of_huge_local_training_meets_the_size_guard(tmp_path):
    import dataclasses

    def never(*args, **kwargs):
        raise AssertionError("the size guard let a run start")

    cfg = cfg_of(train__rounds=1000, train__local_steps=1000)  # 4 clients: 4e6 local steps a run
    with pytest.raises(ConfigError, match=r"this study has 8,000,000 steps .* --allow-large"):
        execute(cfg, tmp_path / "r", progress=False, report=False, kind=dataclasses.replace(kind(), run_one=never))
    assert not (tmp_path / "r").exists()


def test_dry_run_of_a_billion_local_steps_is_refused(capsys):
    from poise.cli import main

    assert main(["run", "fedstale", "train.local_steps=1000000000", "--dry-run"]) == 2
    assert "train.local_steps=1000000000; valid: 1 to 100,000" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["fedstale", "fed-reconnaissance"])
def test_builtin_recipes_fit_under_the_size_guard(recipe):
    from poise.runs.engine import total_steps

    cfg = load_recipe(recipe)
    assert 10_000 < total_steps(cfg, kind()) <= kind().large


@pytest.mark.parametrize("variants", ["[{name='f',beta=0.5}]", "[{name='p',rule='prototypes'}]"])
def test_progress_adds_up_to_steps_per_run(variants):
    from poise.runs.kinds.federated import run_one_federated

    cfg = cfg_of(variants=variants, **PROTO)
    ticks = []
    run_one_federated(cfg, 0, 0, None, ticks.append)
    assert sum(ticks) == kind().steps_per_run(cfg)

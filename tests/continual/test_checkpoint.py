"""Checkpoint a continual run mid-task and resume it: every registered strategy (and Compose,
and the rollback guard) must give the uninterrupted run's weights, strategy state, evaluator
curves and logs bit for bit, after a torch.save / torch.load(weights_only=True) round trip."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from poise import _registry
from poise.continual import EMA, EWC, Compose, FineTune, IgnoreK, Replay, Strategy, fit_stream
from poise.guards import RollbackGuard
from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet

STEPS, N_TASKS = 6, 3
# Small settings that make every piece of state matter within 3 tasks of 6 steps: full buffers
# (random replacement), Fisher subsampling, memories larger than the reference size, ...
KWARGS = {
    "replay": {"mem_size": 10, "batch_size": 4},
    "ewc": {"lam": 10.0, "fisher_samples": 8},
    "agem": {"per_task": 5, "sample_size": 4},
    "ogd": {"samples_per_task": 3},
    "ogpsa": {"per_task": 5, "ref_size": 6, "refresh_every": 4, "rank": 2},
    "ema": {"decay": 0.9},
    "ignore_k": {"k": 0.25},
    "mbc": {"mem_size": 10, "batch_size": 4, "num_codes": 8, "code_dim": 2},
    "faulty_replay": {"mem_size": 10, "batch_size": 4, "fault_rate": 0.3},
    "stable_eviction": {"mem_size": 10, "batch_size": 4, "fault_rate": 0.3},
    "intact": {"lam_drift": 10.0},
    "fscil_tricks": {"supcon": 0.5, "augment": 1.0, "adapt": "calibrate"},
    "reloop": {"capacity": 10, "k": 3},
}
# mid task 0, the last step of task 0 (before its end), mid task 1, mid task 2
RESUME_AT = (3, 6, 8, 14)


class _Task:
    def __init__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        self.id, self.classes, self.restrict = i, [2 * i, 2 * i + 1], True
        self.x_train = torch.randn(30, 5, generator=g) + i
        self.y_train = torch.randint(2 * i, 2 * i + 2, (30,), generator=g)
        self.x_test, self.y_test = self.x_train[:20], self.y_train[:20]


def _tasks():
    return [_Task(i) for i in range(N_TASKS)]


def _build(make_strategy, model_seed=0, optimizer="adamw", guard=None):
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2 * N_TASKS))
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    else:
        from poise.optim import AdamW

        opt = AdamW(model.parameters(), lr=0.05)
    tasks = _tasks()
    ev = ContinualEvaluator({t.id: EvalSet(t.x_test, t.y_test, t.classes) for t in tasks},
                            schedule=EvalSchedule(2, 2), subset_size=15, seed=3)
    g = None if guard is None else RollbackGuard(model, opt, threshold=guard)
    return model, opt, make_strategy(), ev, tasks, g


def _fit(parts, **kw):
    model, opt, strategy, ev, tasks, guard = parts
    logs = []
    res = fit_stream(model, tasks, strategy, opt, ev, steps_per_task=STEPS, batch_size=8, n_classes=2 * N_TASKS,
                     seed=5, log=logs.append, guard=guard, **kw)
    return res, logs


def _weights_only(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_tree_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _opt_state(opt):
    # torch's Optimizer.load_state_dict adds a group key `differentiable` (False) that a fresh poise optimizer lacks
    sd = opt.state_dict()
    return {"state": sd["state"],
            "param_groups": [{k: v for k, v in g.items() if k != "differentiable"} for g in sd["param_groups"]]}


def _no_time(metrics):
    return {k: v for k, v in metrics.items() if k != "eval_seconds"}


def _check_resume(make_strategy, optimizer="adamw", guard=None, resume_at=RESUME_AT):
    ref_parts = _build(make_strategy, optimizer=optimizer, guard=guard)
    ref_res, ref_logs = _fit(ref_parts)

    saved = {}
    ck_parts = _build(make_strategy, optimizer=optimizer, guard=guard)
    ck_res, ck_logs = _fit(ck_parts, checkpoint_every=1, on_checkpoint=lambda s: saved.__setitem__(s["step"], s))
    # checkpointing does not disturb the run
    assert_tree_equal(ck_parts[0].state_dict(), ref_parts[0].state_dict(), "model")
    assert_tree_equal(_no_time(ck_res), _no_time(ref_res), "metrics")
    assert sorted(saved) == list(range(1, N_TASKS * STEPS + 1))

    for at in resume_at:
        state = _weights_only(saved[at])
        assert (state["task_index"], state["step_in_task"]) == ((at - 1) // STEPS, (at - 1) % STEPS + 1)
        parts = _build(make_strategy, model_seed=123, optimizer=optimizer, guard=guard)  # fresh, other init
        torch.manual_seed(999)  # scramble the global RNG (dropout): resume must restore it
        res, logs = _fit(parts, resume=state)
        model, opt, strategy, ev, _, g = parts
        rmodel, ropt, rstrategy, rev, _, rg = ref_parts
        assert_tree_equal(model.state_dict(), rmodel.state_dict(), f"model (resumed at {at})")
        assert_tree_equal(_opt_state(opt), _opt_state(ropt), f"optimizer (resumed at {at})")
        assert_tree_equal(strategy.state_dict(), rstrategy.state_dict(), f"strategy (resumed at {at})")
        ev_state, rev_state = ev.state_dict(), rev.state_dict()
        ev_state.pop("eval_seconds"), rev_state.pop("eval_seconds")
        assert_tree_equal(ev_state, rev_state, f"evaluator (resumed at {at})")
        for x, y in zip(ev.curves(), rev.curves(), strict=True):
            np.testing.assert_array_equal(x, y)
        assert_tree_equal(_no_time(res), _no_time(ref_res), f"metrics (resumed at {at})")
        n_before = 1 + next(i for i, r in enumerate(ref_logs) if r["step"] == at and not r.get("boundary"))
        assert_tree_equal(ref_logs[:n_before] + logs, ref_logs, f"logs (resumed at {at})")
        if guard is not None:
            assert_tree_equal(g.state_dict(), rg.state_dict(), f"guard (resumed at {at})")
    return ref_parts


@pytest.mark.parametrize("name", _registry.names("strategy"))
def test_every_registered_strategy_resumes_bit_identically(name):
    cls = _registry.get("strategy", name)
    # a new strategy must say what its state is (an explicit {} for a stateless one)
    assert cls.state_dict is not Strategy.state_dict, f"strategy {name!r} does not define state_dict"
    _check_resume(lambda: cls(**KWARGS.get(name, {})))


def test_compose_resumes_with_a_poise_optimizer():
    parts = _check_resume(lambda: Compose([Replay(mem_size=10, batch_size=4), EWC(lam=10.0, fisher_samples=8),
                                           IgnoreK(0.25), EMA(0.9)]), optimizer="poise", resume_at=(4, 9))
    state = parts[2].state_dict()
    assert [d["name"] for d in state["strategies"]] == ["replay", "ewc", "ignore_k", "ema"]


def test_guard_state_resumes_with_its_rollbacks():
    parts = _check_resume(FineTune, optimizer="sgd", guard=0.0, resume_at=(8, 12))
    guard = parts[5]
    assert guard.rollbacks > 0  # the resumed runs reproduced real rollbacks


def test_a_lost_state_would_be_caught():
    # the comparison can fail: resuming without the strategy's state gives other results
    def run(drop_strategy_state):
        saved = {}
        make = lambda: Replay(mem_size=10, batch_size=4)  # noqa: E731
        _fit(_build(make), checkpoint_every=8, on_checkpoint=lambda s: saved.__setitem__(s["step"], s))
        state = dict(saved[8])
        if drop_strategy_state:
            state["strategy"] = make().state_dict()
        parts = _build(make, model_seed=1)
        _fit(parts, resume=state)
        return parts[0].state_dict()

    ref = run(False)
    lost = run(True)
    assert not all(torch.equal(ref[k], lost[k]) for k in ref)


def test_resume_rejects_another_run():
    saved = {}
    _fit(_build(FineTune), checkpoint_every=4, on_checkpoint=lambda s: saved.__setitem__(s["step"], s))
    model, opt, strategy, ev, tasks, _ = _build(FineTune)
    with pytest.raises(ValueError, match="seed=5, this run seed=6"):
        fit_stream(model, tasks, strategy, opt, ev, steps_per_task=STEPS, batch_size=8, n_classes=6, seed=6,
                   resume=saved[4])
    with pytest.raises(ValueError, match="steps_per_task=6, this run steps_per_task=7"):
        fit_stream(model, tasks, strategy, opt, ev, steps_per_task=7, batch_size=8, n_classes=6, seed=5,
                   resume=saved[4])
    with pytest.raises(ValueError, match="checkpoint version 0"):
        fit_stream(model, tasks, strategy, opt, ev, steps_per_task=STEPS, batch_size=8, n_classes=6, seed=5,
                   resume={**saved[4], "version": 0})
    with pytest.raises(ValueError, match="needs on_checkpoint"):
        fit_stream(model, tasks, strategy, opt, ev, steps_per_task=STEPS, batch_size=8, n_classes=6,
                   checkpoint_every=2)
    with pytest.raises(ValueError, match="strategy 'finetune' keeps no state"):
        FineTune().load_state_dict({"buffer": 1})
    with pytest.raises(ValueError, match=r"Compose state is for strategies \['replay'\], this Compose has \['ewc'\]"):
        Compose([EWC()]).load_state_dict(Compose([Replay()]).state_dict())


def test_checkpoints_are_snapshots():
    # later training must not change a checkpoint already handed out
    import copy

    saved, frozen = {}, {}

    def keep(state):
        saved[state["step"]] = state
        frozen[state["step"]] = copy.deepcopy(state["evaluator"])  # what it held when it was handed out

    parts = _build(lambda: Replay(mem_size=10, batch_size=4))
    _fit(parts, checkpoint_every=3, on_checkpoint=keep)
    assert not torch.equal(saved[3]["model"]["0.weight"], parts[0].state_dict()["0.weight"])
    assert saved[3]["strategy"]["buffer"]["seen"] == 24  # 3 steps x 8 samples, unchanged since
    # the evaluator's part is not copied again (it is built afresh): training on (more evaluations, a new task
    # seen, boundaries) must still leave every checkpoint's evaluator state as it was handed out
    assert len(saved) > 1 and all(saved[k]["evaluator"] == frozen[k] for k in saved)


def test_the_evaluator_state_shares_nothing_with_the_evaluator():
    from poise.measure import ContinualEvaluator, EvalSchedule

    sets = {t: (torch.randn(5, 3), torch.zeros(5, dtype=torch.long)) for t in (0, 1)}
    ev = ContinualEvaluator(sets, schedule=EvalSchedule(0, 1))
    nan = torch.nn.Linear(3, 2)
    with torch.no_grad():
        nan.weight.fill_(float("nan"))
    ev.begin_task(0)
    ev.maybe_eval(torch.nn.Linear(3, 2))
    ev.maybe_eval(nan)  # a record with a non-finite task
    ev.end_task(nan)
    import copy

    before = copy.deepcopy(ev.state_dict())  # (its NaN float is the same object: equal to itself in a list)
    state = ev.state_dict()
    for key in ("task_ids", "seen", "boundaries", "records"):  # every container, at every level
        for r in state["records"]:
            r["acc"].append(["x", 0.5])
            r["acc"][0][1] = -1.0
            r.setdefault("nonfinite", []).append("x")
        state[key].append("x")
    assert ev.state_dict() == before

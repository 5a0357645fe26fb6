import pytest
import torch
from torch import nn

from poise.continual import FineTune, fit_stream
from poise.guards import RollbackGuard
from poise.measure import ContinualEvaluator, EvalSchedule
from poise.optim import AdamW, NonFiniteGradientError
from tests.continual.test_ema_compose_loop import _Task


def test_rollback_restores_weights_and_optimizer_state_exactly():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()

    step()
    g = RollbackGuard(model, opt, threshold=0.05)
    assert g.check(0.80, step=1)
    good_w = model.weight.detach().clone()
    good_m = opt.state[model.weight]["exp_avg"].clone()
    step()
    assert g.check(0.78, step=2)  # within the threshold: accepted, becomes the snapshot
    good_w, good_m = model.weight.detach().clone(), opt.state[model.weight]["exp_avg"].clone()
    step()
    assert not torch.equal(model.weight, good_w)
    assert not g.check(0.70, step=3)  # 0.80 - 0.70 > 0.05: back to step 2's state
    assert torch.equal(model.weight, good_w) and torch.equal(opt.state[model.weight]["exp_avg"], good_m)
    assert g.rollbacks == 1 and g.events[-1] == {"step": 3, "score": 0.70, "best": 0.80, "accepted": False}
    assert not g.check(float("nan"), step=4)  # a NaN score is never accepted
    with pytest.raises(ValueError, match="threshold"):
        RollbackGuard(model, threshold=-1)


def test_rollback_stops_after_max_rollbacks_with_a_message():
    model = nn.Linear(2, 2)
    g = RollbackGuard(model, threshold=0.0, max_rollbacks=2, higher_is_better=False)
    assert g.check(1.0, 0)  # a loss: lower is better
    assert not g.check(1.5, 1)
    with pytest.raises(RuntimeError, match="2 rollbacks, the last at step 2"):
        g.check(2.0, 2)


def test_guard_in_the_loop_keeps_earlier_tasks():
    def run(guard_threshold):
        torch.manual_seed(0)
        tasks = [_Task(i, torch.randn(60, 5) + 3 * i, torch.full((60,), i), [i]) for i in range(2)]
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ev = ContinualEvaluator({t.id: (t.x_test, t.y_test) for t in tasks}, schedule=EvalSchedule(1, 1))
        guard = RollbackGuard(model, opt, threshold=guard_threshold) if guard_threshold is not None else None
        logs = []
        res = fit_stream(model, tasks, FineTune(), opt, ev, steps_per_task=30, batch_size=16, n_classes=2,
                         log=logs.append, guard=guard)
        return res, logs, guard

    plain, _, _ = run(None)
    guarded, logs, guard = run(0.1)
    assert guard.rollbacks > 0 and any(r.get("guard/rolled_back") == 1.0 for r in logs)
    assert all("guard/rolled_back" not in r for r in logs if r.get("task") == 0)  # no earlier task yet
    t0 = guarded["acc_matrix"][-1][0] if "acc_matrix" in guarded else None
    assert guarded["min_acc"] > plain["min_acc"]  # the drop on task 0 was refused
    assert t0 is None or t0 >= 0.9


def test_consecutive_nonfinite_skips_stop_with_the_parameter_and_step():
    model = nn.Linear(3, 1)
    opt = AdamW(model.parameters(), lr=0.1, nonfinite="skip", max_consecutive_skips=3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        model.weight.grad[0, 0] = float("nan")
        opt.step()
    assert opt.skipped_steps == 2
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # a good step resets the count
    assert opt.consecutive_skips == 0
    with pytest.raises(NonFiniteGradientError, match=r"3 steps in a row .* step 6 in param_groups\[0\].params\[0\]"):
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(1, 3)).sum().backward()
            model.weight.grad[0, 0] = float("inf")
            opt.step()


def test_reset_forgets_the_best_and_accepts_now():
    model = nn.Linear(2, 1)
    g = RollbackGuard(model, threshold=0.1)
    assert g.check(0.9, 0)
    with torch.no_grad():
        model.weight.fill_(7.0)
    g.reset()
    assert g.best is None
    assert g.check(0.1, 1)  # no best to fall below: accepted
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert not g.check(-0.5, 2)  # 0.1 - (-0.5) > 0.1: back to the state accepted at reset/step 1
    assert torch.equal(model.weight, torch.full((1, 2), 7.0))


def test_guard_state_dict_round_trip_restores_the_snapshot():
    import io

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    g = RollbackGuard(model, opt, threshold=0.05)
    assert g.check(0.8, 1)
    accepted_w = model.weight.detach().clone()
    accepted_m = opt.state[model.weight]["exp_avg"].clone()
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    # a fresh guard over a changed model and optimizer, loaded: its rollback goes to the saved snapshot
    with torch.no_grad():
        model.weight.add_(1.0)
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    g2 = RollbackGuard(model, opt, threshold=0.05)
    g2.load_state_dict(state)
    assert g2.best == 0.8 and g2.rollbacks == 0 and g2.events == g.events
    assert not g2.check(0.5, 2)
    assert torch.equal(model.weight, accepted_w)
    assert torch.equal(opt.state[model.weight]["exp_avg"], accepted_m)
    with pytest.raises(ValueError, match="differ in having an optimizer"):
        RollbackGuard(model).load_state_dict(state)

import pytest
import torch
from torch import nn

from poise import _registry
from poise.continual import EMA, Compose, Replay, fit_stream
from poise.measure import ContinualEvaluator, EvalSchedule
from poise.runs.config import strategy_params


def test_ema_closed_form(tiny):
    model, t0, _ = tiny
    ema = EMA(decay=0.9)
    w0 = model[0].weight.detach().clone()
    ema.after_step(model, t0)  # shadow = copy, then lerp with itself
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.after_step(model, t0)
    torch.testing.assert_close(ema.eval_model(model)[0].weight, w0 + 0.1)


def test_compose_prefixes_terms_and_chains_eval_model(tiny):
    model, t0, _ = tiny
    c = Compose([Replay(mem_size=10, batch_size=4), EMA(0.5)])
    b = t0.index(torch.arange(4))
    c.after_step(model, b)
    assert set(c.loss_terms(model, b, model(b.x))) == {"replay/replay"}
    assert c.eval_model(model) is not model


class _Task:
    def __init__(self, i, x, y, classes, restrict=False):
        self.id, self.x_train, self.y_train, self.classes, self.restrict = i, x, y, classes, restrict
        self.x_test, self.y_test = x, y


@pytest.mark.parametrize("name", _registry.names("strategy"))
def test_every_registered_strategy_runs_in_the_loop(name):
    torch.manual_seed(0)
    tasks = [_Task(i, torch.randn(30, 5), torch.randint(2 * i, 2 * i + 2, (30,)), [2 * i, 2 * i + 1])
             for i in range(2)]
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    kwargs = {"per_task": 10} if "per_task" in strategy_params(name) else {}
    strategy = _registry.get("strategy", name)(**kwargs)
    ev = ContinualEvaluator({t.id: (t.x_test, t.y_test) for t in tasks}, schedule=EvalSchedule(2, 3))
    logs = []
    res = fit_stream(model, tasks, strategy, torch.optim.SGD(model.parameters(), lr=0.1), ev,
                     steps_per_task=6, batch_size=8, n_classes=4, log=logs.append)
    assert 0 <= res["acc"] <= 1
    assert sum(1 for r in logs if not r.get("boundary")) == 12
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs if "loss" in r)


def test_loop_is_reproducible_per_seed():
    def run(seed):
        torch.manual_seed(seed)
        tasks = [_Task(0, torch.randn(30, 5), torch.randint(0, 2, (30,)), [0, 1], restrict=True)]
        model = nn.Linear(5, 4)
        ev = ContinualEvaluator({0: (tasks[0].x_test, tasks[0].y_test)})
        fit_stream(model, tasks, Replay(mem_size=10, seed=seed), torch.optim.SGD(model.parameters(), lr=0.1),
                   ev, steps_per_task=5, batch_size=4, n_classes=4, seed=seed)
        return model.weight.detach().clone()

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))

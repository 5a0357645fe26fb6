"""torch.compile of a training step with poise optimizers at their default settings: no crash,
no graph break in ``opt.step`` (torch's own AdamW has none), the same trajectory as eager."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

from poise._registry import get, names
from poise.optim import AdamW, StableSPAM, low_rank_groups

# settings that make the branchy paths fire within a few steps (resets, clipping, schedules)
BUSY = {
    "stable_spam": {"update_proj_gap": 3, "total_T": 20},
    "spam": {"DeltaT": 4, "grad_accu_steps": 1, "warmup_steps": 2, "threshold": 1.0},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _opt(name: str, model: nn.Module, **kw) -> torch.optim.Optimizer:
    if name == "torch_adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    cls = get("optimizer", name)
    if name in ("galore_adamw", "qgalore_adamw"):
        return cls(low_rank_groups(model, rank=2), lr=1e-2, **kw)
    return cls(model.parameters(), lr=1e-2, **kw)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _grads(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()


def _step_breaks(name: str, **kw) -> int:
    model = _model()
    opt = _opt(name, model, **kw)
    x, y = _data()
    _grads(model, opt, x, y)
    opt.step()  # the state exists: the count is the steady-state step's
    _grads(model, opt, x, y)
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dynamo.explain(opt.step)().graph_break_count


@pytest.mark.parametrize("name,kw", [
    ("torch_adamw", {}), ("adamw", {}), ("stable_spam", {}), ("stable_spam", BUSY["stable_spam"]),
    ("spam", {}), ("classp", {}),
])
def test_compiled_step_has_no_graph_break(name, kw):
    assert _step_breaks(name, **kw) == 0


def test_compiled_training_step_breaks_only_where_torch_adamw_does():
    """A whole step (forward, backward, opt.step, zero_grad) breaks at ``backward()`` for
    torch's AdamW too: poise's optimizers add none."""
    def breaks(name: str) -> int:
        model = _model()
        opt = _opt(name, model)
        x, y = _data()

        def train_step(x, y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        train_step(x, y)
        dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dynamo.explain(train_step)(x, y).graph_break_count

    ref = breaks("torch_adamw")
    assert breaks("adamw") == ref
    assert breaks("stable_spam") == ref


def _trajectory(name: str, compiled: bool, backend: str = "aot_eager", steps: int = 7) -> torch.Tensor:
    model = _model()
    opt = _opt(name, model, **BUSY.get(name, {}))
    x, y = _data()
    step = torch.compile(opt.step, backend=backend) if compiled else opt.step
    for _ in range(steps):
        _grads(model, opt, x, y)
        step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", names("optimizer"))
def test_compiled_step_follows_the_eager_trajectory(name):
    """Every registered optimizer at its defaults (plus BUSY's short intervals) compiles through
    AOTAutograd's functionalisation, where ``torch._fused_adamw_`` used to crash, and gives the
    eager trajectory up to float32 rounding."""
    dynamo.reset()
    eager = _trajectory(name, compiled=False)
    compiled = _trajectory(name, compiled=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiles_adamw_and_stable_spam():
    for name in ("adamw", "stable_spam"):
        dynamo.reset()
        torch.testing.assert_close(_trajectory(name, True, "inductor", steps=4), _trajectory(name, False, steps=4),
                                   rtol=1e-5, atol=1e-5)


def test_nonfinite_raise_under_compile_stops_before_any_update():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2)
    x, y = _data()
    step = torch.compile(opt.step, backend="aot_eager")
    _grads(model, opt, x, y)
    step()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    _grads(model, opt, x, y)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        step()
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    for k, v in state.items():
        torch.testing.assert_close(opt.state[model[0].weight][k], v, rtol=0, atol=0)


def test_eager_step_unchanged_by_the_compile_paths():
    """Outside torch.compile the Python-number arithmetic runs (the parity tests replay it bit
    for bit): Stable-SPAM with momentum resets and the schedule, and the fused AdamW kernel."""
    from poise.transforms import _base

    assert not _base.compiling()
    for name in ("stable_spam", "adamw"):
        a = _trajectory(name, compiled=False)
        model = _model()
        opt = (StableSPAM(model.parameters(), lr=1e-2, fused=False, **BUSY["stable_spam"]) if name == "stable_spam"
               else AdamW(model.parameters(), lr=1e-2, fused=False))
        x, y = _data()
        for _ in range(7):
            _grads(model, opt, x, y)
            opt.step()
        b = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

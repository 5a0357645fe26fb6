"""One suite over every registered optimizer (torch's optim_db idea): the torch.optim
contract holds for each of them."""

import copy
import io

import pytest
import torch

from poise import _registry
from poise.optim import NonFiniteGradientError

NAMES = _registry.names("optimizer")


def make(name, params, **kw):
    cls = _registry.get("optimizer", name)
    params = list(params)
    if name.startswith("galore") or name.startswith("qgalore"):
        mats = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": mats, "rank": 4, "update_proj_gap": 3, "scale": 1.0}]
        if rest:
            groups.append({"params": rest})
        return cls(groups, **kw)
    return cls(params, **kw)


def small_kw(name):
    # short reset / refresh / redraw intervals so that every mechanism runs in a few steps;
    # CLASSP's gate (g^2 > 0.5 by default) freezes a converging weight by design: open it
    return {"stable_spam": {"update_proj_gap": 4}, "soap": {"precondition_frequency": 2},
            "spam": {"DeltaT": 4, "warmup_steps": 2, "grad_accu_steps": 1}, "frugal": {"update_gap": 3, "density": 0.5},
            "classp": {"threshold": 0.0, "power": 2.0}}.get(name, {})


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def train(m, opt, steps, start=0):
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x.to(next(m.parameters()).dtype)), y.to(next(m.parameters()).dtype)).backward()
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_state_dict_equals_uninterrupted(name):
    a = model()
    oa = make(name, a.parameters(), lr=1e-2, **small_kw(name))
    train(a, oa, 12)
    b = model()
    ob = make(name, b.parameters(), lr=1e-2, **small_kw(name))
    train(b, ob, 5)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # loading never executes code
    c = model(seed=1)
    c.load_state_dict(ck["model"])
    oc = make(name, c.parameters(), lr=1e-2, **small_kw(name))
    oc.load_state_dict(ck["opt"])
    train(c, oc, 7, start=5)
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_equal_separate_optimizers(name):
    a, b = model(), model()
    la, lb = list(a.parameters()), list(b.parameters())
    kw = small_kw(name)
    cls = _registry.get("optimizer", name)
    # low-rank optimizers: the projection settings travel with each group
    extra = {"rank": 2, "update_proj_gap": 3} if name in ("galore_adamw", "qgalore_adamw") else {}
    oa = cls([{"params": la[:2], "lr": 1e-2, **extra}, {"params": la[2:], "lr": 3e-3, **extra}], **kw)
    ob1 = cls([{"params": lb[:2], **extra}], lr=1e-2, **kw)
    ob2 = cls([{"params": lb[2:], **extra}], lr=3e-3, **kw)

    class Both:
        def zero_grad(self):
            ob1.zero_grad()
            ob2.zero_grad()

        def step(self):
            ob1.step()
            ob2.step()

    train(a, oa, 6)
    train(b, Both(), 6)
    for p, q in zip(la, lb, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parameter_dtype_preserved(name, dtype):
    m = model(dtype=dtype)
    opt = make(name, m.parameters(), lr=1e-2, **small_kw(name))
    train(m, opt, 4)
    assert all(p.dtype == dtype for p in m.parameters())
    assert all(torch.isfinite(p.float()).all() for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_quadratic(name):
    torch.manual_seed(0)
    target = torch.randn(8, 6)
    w = torch.nn.Parameter(torch.zeros(8, 6))
    b = torch.nn.Parameter(torch.zeros(6))
    opt = make(name, [w, b], lr=5e-2, **small_kw(name))

    def loss():
        return ((w - target) ** 2).sum() + ((b - 1) ** 2).sum()

    start = float(loss())
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss()) < 0.1 * start, f"{name}: {start:.3f} -> {float(loss()):.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_closure_tensor_lr_and_scheduler(name):
    m = model()
    opt = make(name, m.parameters(), lr=torch.tensor(1e-2), **small_kw(name))
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        out = torch.nn.functional.mse_loss(m(x), y)
        out.backward()
        return out

    assert isinstance(opt.step(closure), torch.Tensor)
    m2 = model()
    o2 = make(name, m2.parameters(), lr=1e-2, **small_kw(name))
    sched = torch.optim.lr_scheduler.LambdaLR(o2, lambda k: 0.0 if k >= 3 else 1.0)
    for t in range(6):
        if t == 4:
            before = [p.detach().clone() for p in m2.parameters()]
        xb, yb = batch(t)
        o2.zero_grad()
        torch.nn.functional.mse_loss(m2(xb), yb).backward()
        o2.step()
        sched.step()
    # lr 0 from the 4th step on: nothing moves (decoupled decay is scaled by lr too)
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), before, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_policies(name):
    m = model()
    opt = make(name, m.parameters(), lr=1e-2, **small_kw(name))
    train(m, opt, 2)
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    next(iter(m.parameters())).grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\.params\[0\]"):
        opt.step()
    opt.nonfinite = "skip"
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params, strict=True))
    assert repr(opt.state_dict()) == repr(state)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(1.5, 0.9)), dict(weight_decay=-0.1)])
def test_bad_hyperparameters_fail_at_construction(name, bad):
    cls = _registry.get("optimizer", name)
    import inspect

    if not set(bad) <= set(inspect.signature(cls.__init__).parameters):
        pytest.skip(f"{name} has no {list(bad)}")
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        make(name, model().parameters(), **bad)
    with pytest.raises(ValueError, match="nonfinite='maybe'; valid choices: raise, skip, ignore"):
        make(name, model().parameters(), nonfinite="maybe")


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_are_tensors_and_sensible(name):
    m = model()
    opt = make(name, m.parameters(), lr=1e-2, diagnostics=True, **small_kw(name))
    train(m, opt, 6)
    d = opt.last_diagnostics
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in d.values())
    assert 0 < float(d["update_ratio"]) < 1

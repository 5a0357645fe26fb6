"""nonfinite="raise_async": no host read of a device value inside step(); a NaN gradient is acted
on at the next step (or check_nonfinite / state_dict), naming the parameter and the step."""

import contextlib
import io

import pytest
import torch

from poise.optim import SOAP, AdamW, GaLoreAdamW, NonFiniteGradientError


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def grads(m, t, nan=False):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    for p in m.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(m(x), y).backward()
    if nan:
        m[2].weight.grad[1, 2] = float("nan")


@contextlib.contextmanager
def no_host_reads(monkeypatch, opt=None):
    """Every way a step could read a tensor's value on the host (what syncs a GPU) raises; the
    exceptions are the per-parameter ``step``/``clock`` counters, which live on the CPU whatever
    the parameters' device (as torch.optim's), so reading them syncs nothing. On CPU this is the
    proxy for torch.cuda.set_sync_debug_mode("error")."""
    counters = set()
    if opt is not None:
        counters = {id(v) for st in opt.state.values() for k, v in st.items() if k in ("step", "clock")}

    def patch(mp, name):
        orig = getattr(torch.Tensor, name)

        def refuse(self, *a, **k):
            if id(self) in counters:
                return orig(self, *a, **k)
            raise AssertionError(f"host read of a tensor value inside step() ({name})")

        mp.setattr(torch.Tensor, name, refuse)

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch(mp, name)
        yield


OPTS = {
    "adamw": lambda ps, **kw: AdamW(ps, lr=1e-2, **kw),
    "adamw_chain": lambda ps, **kw: AdamW(ps, lr=1e-2, fused=False, **kw),
}


@pytest.mark.parametrize("name", list(OPTS))
def test_the_synchronous_check_reads_the_host_and_the_async_one_does_not(name, monkeypatch):
    m = model()
    opt = OPTS[name](m.parameters(), nonfinite="raise")
    grads(m, 0)
    opt.step()  # state exists
    grads(m, 1)
    with no_host_reads(monkeypatch, opt), pytest.raises(AssertionError, match="host read"):
        opt.step()  # the default: one sync per step (this is what the async mode removes)
    m = model()
    opt = OPTS[name](m.parameters(), nonfinite="raise_async")
    grads(m, 0)
    opt.step()
    for t in range(1, 4):
        grads(m, t)
        with no_host_reads(monkeypatch, opt):
            opt.step()


def test_a_nan_is_acted_on_at_the_next_step_before_anything_changes(monkeypatch):
    m, ref = model(), model()
    opt = AdamW(m.parameters(), lr=1e-2, nonfinite="raise_async")
    oref = AdamW(ref.parameters(), lr=1e-2)
    for t in range(2):
        grads(m, t)
        grads(ref, t)
        opt.step()
        oref.step()
    grads(m, 2, nan=True)
    with no_host_reads(monkeypatch, opt):
        opt.step()  # step 3 sees the NaN: no sync, so it is applied (documented)
    assert not torch.isfinite(m[2].weight).all()
    assert torch.isfinite(m[0].weight).all()  # only the tensor with the NaN gradient
    poisoned = [p.detach().clone() for p in m.parameters()]
    state = {k: v.clone() for k, v in opt.state[m[0].weight].items()}
    grads(m, 3)
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient in param_groups\[0\]\.params\[2\] at "
                                                     r"step 3 \(nonfinite='raise_async'"):
        opt.step()
    # the step that raises changes nothing
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), poisoned, strict=True)
               if torch.isfinite(q).all())
    assert all(torch.equal(opt.state[m[0].weight][k], v) for k, v in state.items())
    assert opt._pending is None  # acted on once: a later step with good gradients goes on
    # a clean run never raises and equals the synchronous check's trajectory
    m2, m3 = model(), model()
    o2 = AdamW(m2.parameters(), lr=1e-2, nonfinite="raise_async")
    o3 = AdamW(m3.parameters(), lr=1e-2)
    for t in range(5):
        grads(m2, t)
        grads(m3, t)
        o2.step()
        o3.step()
    o2.check_nonfinite()
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), m3.parameters(), strict=True))


def test_the_last_step_is_checked_by_check_nonfinite_and_state_dict():
    m = model()
    opt = AdamW(list(m.named_parameters()), lr=1e-2, nonfinite="raise_async")
    grads(m, 0)
    m[0].bias.grad[0] = float("inf")
    opt.step()
    with pytest.raises(NonFiniteGradientError, match=r"in 0\.bias at step 1"):
        torch.save(opt.state_dict(), io.BytesIO())  # never saves a poisoned state silently
    opt.check_nonfinite()  # acted on once: nothing pending
    m = model()
    opt = AdamW(list(m.named_parameters()), lr=1e-2, nonfinite="raise_async")
    grads(m, 0)
    opt.step()
    grads(m, 1)
    m[2].weight.grad[0, 0] = float("nan")
    opt.step()
    with pytest.raises(NonFiniteGradientError, match=r"in 2\.weight at step 2"):
        opt.check_nonfinite()


def test_fp16_gradient_whose_sum_overflows_is_no_false_alarm():
    # max |g| cannot overflow where a sum can (65504 is float16's largest value)
    w = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float16))
    opt = AdamW([w], lr=1e-3, nonfinite="raise_async")
    w.grad = torch.full((4, 4), 6e4, dtype=torch.float16)
    assert not torch.isfinite(w.grad.sum())
    opt.step()
    opt.check_nonfinite()


@pytest.mark.parametrize("make", [
    lambda ps: SOAP(ps, lr=1e-2, nonfinite="raise_async"),
    lambda ps: GaLoreAdamW([{"params": [p for p in ps if p.dim() == 2], "rank": 2},
                            {"params": [p for p in ps if p.dim() < 2]}], lr=1e-2, nonfinite="raise_async"),
])
def test_other_optimizers_take_the_policy(make):
    m = model()
    opt = make(list(m.parameters()))
    grads(m, 0)
    opt.step()
    grads(m, 1, nan=True)
    opt.step()
    grads(m, 2)
    with pytest.raises(NonFiniteGradientError, match=r"params\[\d\] at step 2"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CUDA sync debug mode")
def test_no_cuda_sync_in_step():
    m = model().cuda()
    opt = AdamW(m.parameters(), lr=1e-2, nonfinite="raise_async")
    x, y = torch.randn(16, 6, device="cuda"), torch.randn(16, 3, device="cuda")
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    opt.check_nonfinite()

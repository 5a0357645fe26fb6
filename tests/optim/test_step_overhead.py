"""The step's fixed costs (issue 18): the finiteness screen is one multi-tensor call over small
gradients and leaves them bit for bit unchanged; the step/clock counters live in one buffer per
group and keep torch.optim's per-parameter semantics (a parameter without a gradient does not
count a step; state dicts save, load and stay independent)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from poise.optim import SPAM, AdamW, GaLoreAdamW, NonFiniteGradientError, StableSPAM
from poise.optim._adapter import _SERIAL_CHECK_MAX


def _params(sizes, dtype=torch.float32):
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(n, dtype=dtype)) for n in sizes]


SIZES = [7, 300, _SERIAL_CHECK_MAX, _SERIAL_CHECK_MAX + 1]  # both sides of the screen's split


@pytest.mark.parametrize("where", range(len(SIZES)))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_entry_in_any_gradient_is_found_and_named(where, bad):
    ps = _params(SIZES)
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[where].grad[-1] = bad
    opt = AdamW(ps, lr=0.1)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(NonFiniteGradientError, match=rf"param_groups\[0\]\.params\[{where}\]; nothing was updated"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))
    assert not opt.state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_screen_covers_every_float_dtype(dtype):
    ps = _params([5, 9], dtype)
    for p in ps:
        p.grad = torch.ones_like(p)
    ps[1].grad[3] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"params\[1\]"):
        AdamW(ps, lr=0.1).step()


def test_the_screen_leaves_gradients_bit_for_bit_unchanged():
    ps = _params([6, 1000, _SERIAL_CHECK_MAX + 5])
    special = torch.tensor([-0.0, 1e-40, -1e-45, 3.4e38, -3.4e38, 1.0])  # signed zero, subnormals, extremes
    for p in ps:
        p.grad = torch.randn_like(p)
        p.grad[:6] = special
    saved = [p.grad.clone() for p in ps]
    AdamW(ps, lr=0.1).step()
    for p, g in zip(ps, saved, strict=True):
        assert torch.equal(p.grad.view(torch.int32), g.view(torch.int32))


def test_gradients_the_screen_cannot_write_are_checked_by_the_sum():
    p, q = _params([4, 4])
    p.grad = torch.ones(1).expand(4)  # overlapping memory: no in-place write is allowed
    q.grad = torch.ones(8)[::2]  # not contiguous
    AdamW([p, q], lr=0.1).step()  # no error, a step was taken
    q.grad = torch.tensor([1.0, 0, 1.0, 0, float("inf"), 0, 1.0, 0])[::2]
    p.grad = torch.ones(1).expand(4)
    with pytest.raises(NonFiniteGradientError, match=r"params\[1\]"):
        AdamW([p, q], lr=0.1).step()


def test_skip_skips_and_the_next_finite_step_steps():
    ps = _params([3, 3])
    opt = AdamW(ps, lr=0.1, nonfinite="skip")
    ps[0].grad, ps[1].grad = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(p, b) for p, b in zip(ps, before, strict=True))
    ps[1].grad = torch.ones(3)
    opt.step()
    assert not torch.equal(ps[0], before[0]) and float(opt.state[ps[0]]["step"]) == 1


def _trajectory(make, steps=8, reload_at=None, grads_seed=1):
    """Parameters after ``steps`` steps where parameter 1 has no gradient on odd steps; with
    ``reload_at``, the optimizer is saved (torch.save) and a fresh one loads it there."""
    ps = _params([5, 12, 3])
    opt = make(ps)
    g = torch.Generator().manual_seed(grads_seed)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (i == 1 and t % 2) else torch.randn(p.shape, generator=g)
        opt.step()
        if reload_at == t:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = make(ps)
            opt.load_state_dict(torch.load(buf, weights_only=True))
    return ps, opt


@pytest.mark.parametrize("reload_at", [None, 2, 3])
def test_banked_counters_follow_torch_per_parameter_steps(reload_at):
    ours, opt = _trajectory(lambda ps: AdamW(ps, lr=0.05, weight_decay=0.1), reload_at=reload_at)
    ref, ropt = _trajectory(lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, fused=True),
                            reload_at=reload_at)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ours, ref, strict=True):
        assert float(opt.state[a]["step"]) == float(ropt.state[b]["step"])
        assert float(opt.state[a]["clock"]) == float(opt.state[a]["step"])


def test_counters_are_one_buffer_and_loading_never_shares_them():
    ps = _params([4, 4, 4])
    for p in ps:
        p.grad = torch.ones_like(p)
    a = AdamW(ps, lr=0.1)
    a.step()
    a.step()
    steps = [a.state[p]["step"] for p in ps]
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1  # the fast path is the one taken
    b = AdamW(ps, lr=0.1)
    b.load_state_dict(a.state_dict())  # in process: torch would keep a's step tensors
    a.step()
    assert [float(b.state[p]["step"]) for p in ps] == [2.0] * 3
    assert [float(a.state[p]["step"]) for p in ps] == [3.0] * 3
    b.step()
    assert [float(b.state[p]["step"]) for p in ps] == [3.0] * 3


def test_a_reset_by_assignment_is_seen_and_rebanked():
    ps = _params([4, 4])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt = AdamW(ps, lr=0.1)
    opt.step()
    opt.state[ps[0]]["step"] = torch.tensor(0.0)  # replaced, not written in place
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 1.0 and float(opt.state[ps[1]]["step"]) == 2.0
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 2.0 and float(opt.state[ps[1]]["step"]) == 3.0


def test_in_place_resets_of_a_banked_counter_are_kept():
    """Stable-SPAM resets its moments by writing its counter in place (masked_fill_)."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(6, 6))]
    opt = StableSPAM(ps, lr=1e-3, update_proj_gap=2)
    for _ in range(5):
        ps[0].grad = torch.randn(6, 6)
        opt.step()
    st = opt.state[ps[0]]
    assert float(st["clock"]) == 5 and float(st["step"]) < 5  # a reset happened and the clock ran on


@pytest.mark.parametrize("layout", ["column-major", "broadcast", "sliced"])
@pytest.mark.parametrize("make", [
    lambda ps, f: AdamW(ps, lr=1e-2, weight_decay=0.1, fused=f),
    lambda ps, f: AdamW(ps, lr=1e-2, weight_decay=0.1, convention="hf", fused=f),
    lambda ps, f: SPAM(ps, lr=1e-2, weight_decay=0.1, fused=f),
    lambda ps, f: GaLoreAdamW(ps, lr=1e-2, weight_decay=0.1, fused=f, allow_unprojected=True),
], ids=["adamw", "adamw_hf", "spam", "galore_unprojected"])
def test_fused_kernels_never_pair_a_gradient_by_memory_when_its_layout_differs(make, layout):
    """torch's CPU fused AdamW kernel pairs entries by their place in memory: a gradient set by hand
    with other strides than its parameter's must take the reference arithmetic."""
    def run(fused):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(6, 4))
        opt = make([p], fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            x = torch.randn(6, 8, generator=g)
            p.grad = {"column-major": x[:, :4].t().contiguous().t(), "broadcast": x[:1, :4].expand(6, 4),
                      "sliced": x[:, ::2]}[layout]
            opt.step()
        return p.detach()

    a, b = run(True), run(False)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6


def test_a_parameter_listed_twice_counts_two_steps_as_in_torch():
    import warnings

    p, q = _params([3, 3])
    q2 = nn.Parameter(q.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AdamW([p, p], lr=0.1)
        ref = torch.optim.AdamW([q2, q2], lr=0.1)
    for _ in range(3):
        p.grad, q2.grad = torch.ones(3), torch.ones(3)
        ours.step()
        ref.step()
    # the count only: torch's CPU loop counts and applies one copy after the other, poise counts
    # both then applies both (as before the counters were banked), so the values differ
    assert float(ours.state[p]["step"]) == float(ref.state[q2]["step"]) == 6.0


def test_a_deep_copy_steps_on_its_own():
    import copy

    p = _params([4])[0]
    opt = AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    twin = copy.deepcopy(opt)
    q = twin.param_groups[0]["params"][0]
    q.grad = torch.ones(4)
    twin.step()
    twin.step()
    assert float(twin.state[q]["step"]) == 3.0 and float(opt.state[p]["step"]) == 1.0
    opt.step()
    assert float(opt.state[p]["step"]) == 2.0 and float(twin.state[q]["step"]) == 3.0


def test_a_tensor_learning_rate_decays_as_a_float_one():
    """lr * weight_decay was computed in float32 when lr is a 0-d tensor: at lr = 1, wd = 1 - 1e-7
    the decay factor 1 - lr wd lost every digit."""
    def run(lr):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(5, dtype=torch.float64))
        opt = AdamW([p], lr=lr, weight_decay=0.9999999, convention="hf", fused=False)
        for _ in range(3):
            p.grad = torch.ones(5, dtype=torch.float64)
            opt.step()
        return p.detach()

    torch.testing.assert_close(run(torch.tensor(1.0)), run(1.0), rtol=1e-12, atol=0)

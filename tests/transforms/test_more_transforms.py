import math

import pytest
import torch

from poise.optim import CLASSP, FRUGAL, SPAM, AdamW, QGaLoreAdamW, TransformOptimizer
from poise.transforms import (
    apply_updates,
    chain,
    dequantize,
    ignore_top_k,
    project_orthogonal,
    quantize,
    scale_by_learning_rate,
    spam_warmup_scale,
)
from tests.optim._replay import replay_pair


@pytest.mark.parametrize("k", [0.1, 0.25, 0.5])
def test_ignore_k_zeroes_exactly_the_largest(k):
    torch.manual_seed(0)
    g = torch.randn(7, 9)
    p = torch.nn.Parameter(torch.zeros(7, 9))
    apply_updates(chain(ignore_top_k(k)), [p], [g.clone()], None, {})
    n = math.ceil(k * g.numel())
    top = g.abs().reshape(-1).topk(n).indices
    flat = p.detach().reshape(-1)
    assert (flat[top] == 0).all()
    assert (flat != 0).sum() == g.numel() - n
    keep = torch.ones(g.numel(), dtype=torch.bool)
    keep[top] = False
    assert torch.equal(flat[keep], g.reshape(-1)[keep])
    with pytest.raises(ValueError, match=r"ignore_k=1.5 is out of range; valid: \[0, 1\)"):
        apply_updates(chain(ignore_top_k(1.5)), [p], [g.clone()], None, {})


def test_project_orthogonal_under_sgd_leaves_no_component_along_the_basis():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    q, _ = torch.linalg.qr(torch.randn(30, 3))
    U = q.T
    opt = TransformOptimizer([w], {"lr": 0.1}, chain(project_orthogonal(lambda p: U if p is w else None),
                                                     scale_by_learning_rate()))
    before = w.detach().clone()
    for _ in range(3):
        w.grad = torch.randn(6, 5)
        opt.step()
    delta = (w.detach() - before).reshape(-1)
    assert (U @ delta).abs().max() < 1e-6 and delta.norm() > 0.1


def test_classp_by_hand():
    # p = 2, tau = 1, eps = 0: weight 0 has g = 2 (gate open), weight 1 has g = 0.5 (closed).
    # step 1: G = [4, 0], update = -lr * [2 / sqrt(4), 0] = [-1, 0] (lr = 1)
    # step 2 (same g): G = [8, 0], update = -[2 / sqrt(8), 0]
    w = torch.nn.Parameter(torch.zeros(2))
    opt = CLASSP([w], lr=1.0, threshold=1.0, epsilon=1e-30, power=2.0)
    for _ in range(2):
        w.grad = torch.tensor([2.0, 0.5])
        opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-1 - 2 / math.sqrt(8), 0.0]))
    assert torch.equal(opt.state[w]["classp.grad_sum"], torch.tensor([8.0, 0.0]))
    assert float(opt.state[w]["classp.active_frac"]) == 0.5


def test_spam_without_clipping_resets_or_warmup_is_hf_adamw():
    err = replay_pair([(6, 4), (4,)], lambda ps: SPAM(ps, lr=1e-2, threshold=0, DeltaT=10_000, warmup_steps=0,
                                                      weight_decay=0.1),
                      lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-6, convention="hf"))
    assert err < 1e-6


def test_spam_warmup_schedule_and_reset():
    assert spam_warmup_scale(0, 150) == pytest.approx(0.01)
    assert spam_warmup_scale(151, 150) == 1.0
    assert 0.01 < spam_warmup_scale(75, 150) < 1.0
    w = torch.nn.Parameter(torch.zeros(3))
    opt = SPAM([w], lr=1e-2, DeltaT=5, warmup_steps=3, threshold=0)
    seen = []
    for t in range(1, 8):
        w.grad = torch.ones(3)
        opt.step()
        seen.append(float(opt.state[w]["spam.warmup_step"]))
        if t == 5:  # the reset step: moments were zeroed before this step's update
            assert torch.allclose(opt.state[w]["spam.inner.exp_avg"], torch.full((3,), 0.1))
    # the counter restarts on the step before each reset (clock 4 -> warm-up 0 at clock 5)
    assert seen == [5.0, 6.0, 7.0, 0.0, 1.0, 2.0, 3.0]


def test_spam_clips_spikes_against_second_moment():
    w = torch.nn.Parameter(torch.zeros(4))
    # v is the raw (not bias-corrected) EMA: after 5 steps of g = 1, v = 1 - 0.999^5 ~ 0.005, so
    # the bound sqrt(5000 v) ~ 5 lets g = 1 through and clips the spike of 100
    opt = SPAM([w], lr=1e-3, threshold=5000.0, grad_accu_steps=1, DeltaT=1000, warmup_steps=0)
    for _ in range(5):
        w.grad = torch.ones(4)
        opt.step()
    v = opt.state[w]["spam.inner.exp_avg_sq"].clone()
    w.grad = torch.tensor([100.0, 1.0, 1.0, 1.0])
    opt.step()
    assert float(opt.state[w]["spam.clipped_frac"]) == 0.25
    # the spike entered the moments as sqrt(4 v), not 100
    v_new = opt.state[w]["spam.inner.exp_avg_sq"]
    assert float(v_new[0]) == pytest.approx(float(0.999 * v[0] + 0.001 * 5000 * v[0]), rel=1e-5)


def test_frugal_density_one_is_adamw_and_density_zero_is_sign_sgd():
    big = dict(update_gap=10_000, reset_statistics=True)
    err = replay_pair([(6, 4), (4,)], lambda ps: FRUGAL(ps, lr=1e-2, density=1.0, **big),
                      lambda ps: AdamW(ps, lr=1e-2, fused=False))
    assert err < 1e-6
    w = torch.nn.Parameter(torch.zeros(5))
    opt = FRUGAL([w], lr=0.1, density=0.0, weight_decay=0.0, **big)
    w.grad = torch.tensor([3.0, -0.2, 0.0, 1e-4, -7.0])
    opt.step()
    torch.testing.assert_close(w.detach(), -0.1 * torch.tensor([1.0, -1.0, 0.0, 1.0, -1.0]))


def test_frugal_rows_mode_keeps_state_for_active_rows_only():
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = FRUGAL([w], lr=1e-2, density=0.25, mode="rows", update_gap=3)
    for _ in range(4):
        w.grad = torch.randn(8, 6)
        opt.step()
    assert opt.state[w]["frugal.inner.exp_avg"].shape == (2, 6)
    assert opt.state[w]["frugal.rows"].shape == (2,)
    with pytest.raises(ValueError, match="mode='cols'; valid choices: block, rows"):
        FRUGAL([w], mode="cols")


def test_quantize_roundtrip_and_unbiased_stochastic_rounding():
    torch.manual_seed(0)
    x = torch.randn(10, 30)
    codes, scale, lo = quantize(x, 4, 64)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    back = dequantize(codes, scale, lo, x.shape)
    per_group_step = scale.repeat_interleave(64)[: x.numel()].view_as(x)
    assert ((back - x).abs() <= per_group_step / 2 + 1e-6).all()
    gen = torch.Generator().manual_seed(1)
    mean = torch.stack([dequantize(*quantize(x, 4, 64, True, gen), x.shape) for _ in range(400)]).mean(0)
    assert (mean - x).abs().max() < 0.1 * scale.max()


def test_qgalore_quantized_projector_int8_weights_and_adaptive_gap():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 12))
    opt = QGaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "queue_size": 2, "cos_threshold": 0.4,
                         "weight_group_size": 64}], lr=1e-2)
    g = torch.randn(16, 12)
    for _ in range(9):
        w.grad = g.clone()  # the same gradient: the subspace never moves, cosine 1
        opt.step()
    st = opt.state[w]
    assert st["galore.proj_codes"].dtype == torch.uint8 and "galore.proj" not in st
    assert int(st["galore.gap"]) > 2  # the refresh interval grew
    groups = w.detach().reshape(-1)[:192].view(3, 64)
    assert all(len(torch.unique(row)) <= 256 for row in groups)  # on an 8-bit grid per group


@pytest.mark.parametrize("mode", ["block", "rows"])
def test_frugal_takes_a_tensor_whose_first_gradient_comes_between_draws(mode):
    """It used to raise KeyError('frugal.active'): the draw covers the tensors with a gradient."""
    from poise._registry import get

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = get("optimizer", "frugal")([a, b], lr=1e-2, weight_decay=0.0, mode=mode, update_gap=3,
                                     inactive_update_rule="sgd", inactive_lr_scale=1.0)
    a.grad = torch.randn(4, 4)
    opt.step()  # the draw: b has no gradient yet
    before = b.detach().clone()
    g = torch.randn(4, 4)
    a.grad, b.grad = torch.randn(4, 4), g.clone()
    opt.step()
    assert float(opt.state[b]["frugal.active"]) == 0.0  # the state-free rule until the next draw
    torch.testing.assert_close(b.detach(), before - 1e-2 * g)

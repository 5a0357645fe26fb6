"""Exactness fixes of issue 12, each failing on the code before it:

* group statistics are two-pass (a one-pass variance loses float32 advantages to cancellation);
* every loss and aggregation is finite, with exactly zero gradient on masked tokens, whatever
  their log-probs (+-inf, NaN);
* ``entropy_topk_mask`` keeps as many tokens as TRL's ``top_entropy_quantile``;
* the numerical conventions (verl's clamps, TRL's none) are named options;
* ``aggregate`` says how empty rows count; bad shapes raise naming the field.
"""

import math

import pytest
import torch

from poise.rl import (
    PolicyBatch,
    aggregate,
    call_loss,
    entropy_topk_mask,
    group_advantage,
    gspo_loss,
    kl_penalty,
    policy_losses,
    policy_objective,
    ppo_clip_loss,
)
from poise.rl.correction import CONVENTIONS

B, T = 4, 6


# -- two-pass group statistics --------------------------------------------------------------

def test_group_advantage_is_two_pass_in_float32():
    g = torch.Generator().manual_seed(0)
    r64 = 0.9 + 0.002 * torch.randn(16, generator=g, dtype=torch.float64)
    r32 = r64.float()
    gid = torch.arange(16) // 8
    exact = group_advantage(r32.double(), gid)  # the float32 values, statistics in float64
    got = group_advantage(r32, gid)
    assert got.dtype == torch.float32
    # a one-pass variance (sum x^2 - n mean^2) is off by ~6e-2 here; two-pass by ~4e-5 (TRL's torch.std)
    assert float((got.double() - exact).abs().max()) <= 1e-3
    loo = group_advantage(r32, gid, center="loo")
    assert float((loo.double() - group_advantage(r32.double(), gid, center="loo")).abs().max()) <= 1e-3


# -- non-finite log-probs on masked tokens ---------------------------------------------------

def _batch(fill: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 1:] = 0
    mask[2] = 0  # an empty row
    logp0 = -torch.rand(B, T, generator=g) * 2
    old = logp0 + 0.2 * torch.randn(B, T, generator=g)
    behav = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    bad = mask == 0
    dirty = [x.masked_fill(bad, fill) for x in (logp0, old, behav)]
    return mask, logp0, (old, behav, adv), dirty


FILLS = [float("-inf"), float("inf"), float("nan")]


@pytest.mark.parametrize("convention", ["verl", "trl"])
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("loss", ["pg", "ppo_clip", "gspo", "cispo", "sapo", "minirl", "decoupled_ppo"])
def test_every_policy_loss_ignores_nonfinite_masked_logps(loss, fill, convention):
    mask, logp0, (old, behav, adv), (lp_d, old_d, behav_d) = _batch(fill)
    kw = {} if loss == "pg" else {"convention": convention}
    clean_lp = logp0.clone().requires_grad_(True)
    clean = call_loss(loss, PolicyBatch(clean_lp, old, behav, adv, mask), **kw)
    dirty_lp = lp_d.clone().requires_grad_(True)
    dirty = call_loss(loss, PolicyBatch(dirty_lp, old_d, behav_d, adv, mask), **kw)
    for mode in ("token_mean", "token_sum", "seq_mean_token_mean", "seq_mean_token_sum", "seq_sum_norm"):
        hz = {"horizon": T} if mode == "seq_sum_norm" else {}
        a = aggregate(dirty.values, mask, mode, **hz)
        b = aggregate(clean.values, mask, mode, **hz)
        assert torch.isfinite(a), (loss, mode)
        torch.testing.assert_close(a, b)
        gd = torch.autograd.grad(a, dirty_lp, retain_graph=True)[0]
        gc = torch.autograd.grad(b, clean_lp, retain_graph=True)[0]
        assert torch.isfinite(gd).all() and (gd[mask == 0] == 0).all(), (loss, mode)
        torch.testing.assert_close(gd, gc)
    for k, v in dirty.metrics.items():
        assert torch.isfinite(v).all(), (loss, k)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("convention", ["verl", "trl"])
def test_kl_ignores_nonfinite_masked_logps(kind, fill, convention):
    mask, logp0, (old, _, _), (lp_d, ref_d, _) = _batch(fill)
    x = lp_d.clone().requires_grad_(True)
    out = kl_penalty(x, ref_d, mask, kind=kind, convention=convention)
    loss = aggregate(out.values, mask, "token_mean")
    assert torch.isfinite(loss) and torch.isfinite(out.metrics[f"kl_{kind}"])
    g = torch.autograd.grad(loss, x)[0]
    assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()
    torch.testing.assert_close(loss, aggregate(kl_penalty(logp0, old, mask, kind=kind).values, mask, "token_mean"))


def test_aggregate_and_objective_ignore_nonfinite_masked_values():
    mask, logp0, (old, behav, adv), (lp_d, old_d, behav_d) = _batch(float("nan"))
    v = torch.randn(B, T).masked_fill(mask == 0, float("nan")).requires_grad_(True)
    for mode in ("token_mean", "seq_mean_token_mean", "seq_sum_norm"):
        out = aggregate(v, mask, mode, horizon=T)
        assert torch.isfinite(out)
        g = torch.autograd.grad(out, v, retain_graph=True)[0]
        assert (g[mask == 0] == 0).all()
    x = lp_d.clone().requires_grad_(True)
    ent = torch.rand(B, T).masked_fill(mask == 0, float("nan"))
    obj = policy_objective(PolicyBatch(x, old_d, behav_d, adv, mask), "ppo_clip", is_level="sequence",
                           token_select="entropy_top", token_weights="steer", entropy=ent)
    loss = obj.aggregate("token_mean")
    assert torch.isfinite(loss) and all(torch.isfinite(m).all() for m in obj.metrics.values())
    assert (torch.autograd.grad(loss, x)[0][mask == 0] == 0).all()


# -- entropy top-k: TRL's count ----------------------------------------------------------------

def _trl_count(h: torch.Tensor, ratio: float) -> int:
    """TRL 1.16 ``get_high_entropy_mask``: ``H >= torch.quantile(H, 1 - top_entropy_quantile)``."""
    return int((h >= torch.quantile(h.float(), 1 - ratio)).sum())


@pytest.mark.parametrize("ratio, n, want", [(0.3, 24, 7), (0.3, 7, 2), (0.2, 6, 2), (0.5, 9, 5)])
def test_entropy_topk_keeps_trls_count(ratio, n, want):
    h = torch.linspace(0.1, 3.0, n, dtype=torch.float32).flip(0)[None, :]
    m = torch.ones(1, n)
    top = entropy_topk_mask(h, m, ratio)
    assert int(top.sum()) == want == _trl_count(h.flatten(), ratio)
    assert int(entropy_topk_mask(h, m, ratio, rule="ceil").sum()) == math.ceil(ratio * n)


def test_entropy_topk_matches_trl_on_random_batches():
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        n_t = 3 + trial % 9
        h = torch.rand(5, n_t, generator=g)  # float64 here (conftest)
        mask = (torch.rand(5, n_t, generator=g) > 0.3).double()
        ratio = [0.1, 0.2, 0.25, 0.3, 0.5, 0.8][trial % 6]
        if mask.sum() == 0:
            assert entropy_topk_mask(h, mask, ratio).sum() == 0
            continue
        # TRL: the quantile of the (gathered) valid entropies in float32, compared with H in its dtype
        thr = torch.quantile(h[mask.bool()].float(), 1 - ratio)
        want = ((h * mask >= thr) & mask.bool()).double()
        assert torch.equal(entropy_topk_mask(h, mask, ratio, pool=h[mask.bool()].float()), want), trial
        h32 = h.float()
        want32 = ((h32 * mask.float() >= torch.quantile(h32[mask.bool()], 1 - ratio)) & mask.bool()).double()
        assert torch.equal(entropy_topk_mask(h32, mask, ratio), want32), trial


# -- conventions ---------------------------------------------------------------------------------

def test_conventions_are_named_presets():
    assert CONVENTIONS["verl"].log_ratio_clamp == 20.0 and CONVENTIONS["verl"].kl_max == 10.0
    assert CONVENTIONS["trl"].log_ratio_clamp is None and CONVENTIONS["trl"].gspo_grad == "sequence"
    with pytest.raises(ValueError, match="convention='deepspeed'; valid choices: verl, trl"):
        ppo_clip_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), convention="deepspeed")


def test_verl_clamps_zero_gradients_trl_does_not():
    # A < 0 and log-ratio 25: PPO's loss is |A| r (unclipped side); verl clamps the log-ratio at 20,
    # so the gradient is 0; TRL (no clamp) has gradient |A| r
    logp = torch.tensor([[25.0]], requires_grad=True)
    old, adv, m = torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1)
    g_verl = torch.autograd.grad(ppo_clip_loss(logp, old, adv, m).values.sum(), logp)[0]
    g_trl = torch.autograd.grad(ppo_clip_loss(logp, old, adv, m, convention="trl").values.sum(), logp)[0]
    assert float(g_verl) == 0.0
    assert float(g_trl) == pytest.approx(math.exp(25.0))
    # k3 with d = logp - ref = -15: verl clamps the value at 10 (zero gradient), TRL does not
    x = torch.tensor([[-15.0]], requires_grad=True)
    v_trl = kl_penalty(x, torch.zeros(1, 1), m, convention="trl").values
    assert float(v_trl) == pytest.approx(math.exp(15.0) - 15.0 - 1.0)
    assert float(kl_penalty(x, torch.zeros(1, 1), m).values) == 10.0
    assert float(torch.autograd.grad(kl_penalty(x, torch.zeros(1, 1), m).values.sum(), x)[0]) == 0.0


def test_gspo_gradient_conventions_with_uneven_token_weights():
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(2, 4, generator=g)).requires_grad_(True)
    old = logp.detach() + 0.01 * torch.randn(2, 4, generator=g)
    adv, mask = torch.tensor([1.0, -0.5]), torch.ones(2, 4)
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # e.g. TRL's entropy mask
    # TRL: the sequence loss l_i = -A_i s_i (a (B, 1) tensor) times the token weights
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    trl = ((-adv * s)[:, None] * w * mask).sum(-1).div(mask.sum(-1)).mean()
    ours = aggregate(gspo_loss(logp, old, adv, mask, eps_low=1.0, eps_high=1.0, convention="trl").values * w, mask,
                     "seq_mean_token_mean")
    verl = aggregate(gspo_loss(logp, old, adv, mask, eps_low=1.0, eps_high=1.0).values * w, mask,
                     "seq_mean_token_mean")
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(verl, trl)  # same value ...
    g_trl, g_ours, g_verl = (torch.autograd.grad(x, logp)[0] for x in (trl, ours, verl))
    torch.testing.assert_close(g_ours, g_trl)
    assert not torch.allclose(g_verl, g_trl)  # ... different gradient


# -- aggregate: empty rows are explicit --------------------------------------------------------

def test_aggregate_empty_rows_count_or_skip():
    v = torch.tensor([[1.0, 3.0], [5.0, 0.0], [7.0, 7.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert float(aggregate(v, m, "seq_mean_token_mean")) == pytest.approx((2 + 5) / 2)  # verl: skip
    assert float(aggregate(v, m, "seq_mean_token_mean", empty_rows="count")) == pytest.approx((2 + 5) / 3)  # TRL
    assert float(aggregate(v, m, "seq_sum_norm", horizon=2, empty_rows="count")) == pytest.approx(9 / 6)
    with pytest.raises(ValueError, match="empty_rows='drop'; valid choices: skip, count"):
        aggregate(v, m, "seq_mean_token_mean", empty_rows="drop")


# -- bad input --------------------------------------------------------------------------------

def test_bad_shapes_raise_naming_the_field():
    lp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 4\); expected \(2, 3\) \(the mask's\)"):
        ppo_clip_loss(lp, torch.zeros(2, 4), adv, mask)
    with pytest.raises(ValueError, match=r"adv has shape \(3,\); expected \(2,\) or \(2, 3\)"):
        call_loss("pg", PolicyBatch(lp, lp, lp, torch.zeros(3), mask))
    with pytest.raises(ValueError, match=r"values has shape \(2, 2\); expected \(2, 3\)"):
        aggregate(torch.zeros(2, 2), mask)
    with pytest.raises(ValueError, match=r"mask has shape \(6,\); expected 2 dimensions"):
        kl_penalty(lp, lp, torch.ones(6))
    with pytest.raises(ValueError, match="loss='grpo' is not a policy loss; valid choices: pg"):
        policy_objective(PolicyBatch(lp, lp, lp, adv, mask), "grpo")
    assert "ppo_clip" in policy_losses()

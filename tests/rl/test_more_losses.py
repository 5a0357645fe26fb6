"""The losses of ``poise.rl.losses_more``: parity with TRL 1.16's ``GRPOTrainer._compute_loss`` for
VESPO, sequence-level SAPO and sequence-level delta (float64, loss and gradient <= 1e-8), hand
numbers, masked-token safety, and their place in the registry / ``policy_objective``.
(verl parity of GMPO, Clip-Cov and KL-Cov: tests/rl/test_verl_parity.py.)"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from poise.rl import (
    PolicyBatch,
    aggregate,
    call_loss,
    gmpo_loss,
    kl_cov_loss,
    policy_losses,
    policy_objective,
    seq_delta_loss,
    seq_sapo_loss,
    vespo_loss,
)

NEW = ["vespo", "seq_sapo", "seq_delta", "gmpo", "clip_cov", "kl_cov"]
B, T, MAXLEN = 5, 7, 9
LENGTHS = torch.tensor([7, 3, 5, 1, 6])
TOL = 1e-8


def _inputs(seed, spread=0.15):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    behav = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(torch.float64)
    return logp, old, behav, adv, mask


# ---------------------------------------------------------------- TRL parity

class _Acc:
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, *a, **k):
        return x


def _trl_loss(logp, old, adv, mask, *, loss_type, level="token", delta=None, isr=None, eps=(0.2, 0.28), vespo=None):
    trl = pytest.importorskip("trl", reason="TRL parity needs trl==1.16.0")
    t = object.__new__(trl.GRPOTrainer)
    v = vespo or {}
    t.__dict__.update(
        loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], beta=0.0, importance_sampling_level=level,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=isr is not None,
        vllm_importance_sampling_correction=isr is not None, max_completion_length=MAXLEN, accelerator=_Acc(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, use_adaptive_entropy=False,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1,
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                             vespo_k_pos=v.get("k_pos", 2.0), vespo_lambda_pos=v.get("lambda_pos", 3.0),
                             vespo_k_neg=v.get("k_neg", 3.0), vespo_lambda_neg=v.get("lambda_neg", 2.0)),
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if isr is not None:
        inputs["importance_sampling_ratio"] = isr
    return t._compute_loss(None, inputs), t._metrics["train"]


def _both(f_ours, f_trl, seed, spread=0.15):
    logp, old, behav, adv, mask = _inputs(seed, spread)
    lp1 = logp.detach().clone().requires_grad_(True)
    ours = f_ours(lp1, old, behav, adv, mask)
    (g1,) = torch.autograd.grad(ours, lp1)
    lp2 = logp.detach().clone().requires_grad_(True)
    theirs, metrics = f_trl(lp2, old, behav, adv, mask)
    (g2,) = torch.autograd.grad(theirs, lp2)
    return float((ours - theirs).detach().abs()), float((g1 - g2).abs().max()), metrics


def _isr(old, behav, mask, mode, lo, hi):
    """TRL's vLLM importance_sampling_ratio for the token modes (its _generate_and_score_completions)."""
    r = torch.exp((old - behav) * mask)
    if mode == "truncate":
        return r.clamp(min=lo, max=hi)
    return r.masked_fill((r < (lo if lo is not None else -math.inf)) | (r > (hi if hi is not None else math.inf)), 0)


VESPO_CASES = [(None, None, None), ("truncate", None, 1.5), ("mask", 0.8, 1.25)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("is_mode,lo,hi", VESPO_CASES)
@pytest.mark.parametrize("spread", [0.05, 0.4])
def test_vespo_matches_trl(seed, is_mode, lo, hi, spread):
    hp = {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}

    def ours(lp, old, behav, adv, mask):
        b = behav if is_mode else old
        out = vespo_loss(lp, old, b, adv, mask, is_mode=is_mode or "truncate", is_min=lo, is_max=hi, **hp)
        return aggregate(out.values, mask, "token_mean")

    def theirs(lp, old, behav, adv, mask):
        isr = _isr(old, behav, mask, is_mode, lo, hi) if is_mode else None
        return _trl_loss(lp, old, adv, mask, loss_type="vespo", isr=isr, vespo=hp)

    dl, dg, metrics = _both(ours, theirs, seed, spread)
    assert dl <= TOL and dg <= TOL
    assert len(metrics["vespo/phi_seq_mean"]) == 1


def test_vespo_phi_metric_and_value():
    """phi(w) = e^lambda w^k e^{-lambda w}; one 1-token sequence with log w = log 2, A > 0, k=2, lambda=3:
    phi = e^3 * 4 * e^-6 = 4 e^-3, so l = -4 e^-3 * A * logp."""
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    old = logp - math.log(2.0)
    out = vespo_loss(logp, old, old, torch.tensor([1.5]), torch.ones(1, 1))
    assert float(out.values[0, 0]) == pytest.approx(-4 * math.exp(-3) * 1.5 * math.log(0.5), rel=1e-12)
    assert float(out.metrics["vespo/phi_seq_mean"]) == pytest.approx(4 * math.exp(-3), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spread", [0.05, 0.5])
def test_seq_sapo_matches_trl(seed, spread):
    def ours(lp, old, behav, adv, mask):
        return aggregate(seq_sapo_loss(lp, old, adv, mask).values, mask, "seq_mean_token_mean", num_seqs=B)

    dl, dg, _ = _both(ours, lambda lp, o, b, a, m: _trl_loss(lp, o, a, m, loss_type="sapo", level="sequence"),
                      seed, spread)
    assert dl <= TOL and dg <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("delta", [None, 1.1, 4.0])
@pytest.mark.parametrize("spread", [0.05, 0.5])
def test_seq_delta_matches_trl(seed, delta, spread):
    eps = (3e-2, 4e-2)

    def ours(lp, old, behav, adv, mask):
        out = seq_delta_loss(lp, old, adv, mask, eps_low=eps[0], eps_high=eps[1], delta=delta)
        return aggregate(out.values, mask, "seq_mean_token_mean", num_seqs=B)

    dl, dg, _ = _both(ours, lambda lp, o, b, a, m: _trl_loss(lp, o, a, m, loss_type="grpo", level="sequence",
                                                             delta=delta, eps=eps), seed, spread)
    assert dl <= TOL and dg <= TOL


def test_seq_delta_caps_negative_advantage_ratio():
    """One 2-token sequence, A = -1, mean log-ratio log 3: s = 3 > delta = 2 -> value -min(2*(-1), clip*(-1))
    = 2 and zero gradient (the cap is constant in logp)."""
    logp = torch.log(torch.tensor([[0.3, 0.6]], dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() - math.log(3.0)
    out = seq_delta_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.2, delta=2.0)
    assert torch.allclose(out.values, torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    (g,) = torch.autograd.grad(out.values.sum(), logp)
    assert float(g.abs().max()) == 0.0


def test_gmpo_hand_numbers():
    """Two tokens, A = 1, log-ratios (0.1, 0.6) with eps 0.4: the second clips to 0.4 (A > 0),
    R = exp((0.1 + 0.4)/2) = e^0.25, L = -e^0.25, d L / d logp = (-e^0.25 / 2, 0)."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([[0.1, 0.6]], dtype=torch.float64)
    out = gmpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    assert torch.allclose(out.values, torch.full((1, 2), -math.exp(0.25), dtype=torch.float64))
    (g,) = torch.autograd.grad(aggregate(out.values, torch.ones(1, 2), "seq_mean_token_mean"), logp)
    assert torch.allclose(g, torch.tensor([[-math.exp(0.25) / 2, 0.0]], dtype=torch.float64))


def test_kl_cov_penalises_the_top_covariance_token():
    """3 tokens, A = (1, 0, -1) centred (mean 0), logp = (-1, -2, -3) (mean -2): covariances (1, 0, 1);
    top-1 picks one of the ties; that token gets + coef * |logp - old|."""
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    old = logp - 0.5
    adv = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    out = kl_cov_loss(logp, old, adv, torch.ones(1, 3), kl_cov_ratio=0.34, ppo_kl_coef=2.0)
    base = -adv * math.exp(0.5)
    extra = out.values - base
    assert sorted(extra.flatten().tolist()) == pytest.approx([0.0, 0.0, 1.0])  # 2 * 0.5 on exactly one token
    assert float(extra[0, 1]) == 0.0  # zero covariance is never the top


# ---------------------------------------------------------------- registry and safety

def test_new_losses_are_policy_losses():
    assert set(NEW) <= set(policy_losses())


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_masked_positions_any_logp_give_finite_loss_and_zero_grad(name, bad):
    logp, old, behav, adv, mask = _inputs(0)
    pad = mask == 0
    lp = logp.detach().masked_fill(pad, bad).requires_grad_(True)
    out = call_loss(name, PolicyBatch(lp, old.masked_fill(pad, bad), behav.masked_fill(pad, -bad), adv, mask))
    loss = aggregate(out.values, mask, "token_mean")
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert float(g[pad].abs().max()) == 0.0
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("name", ["seq_sapo", "seq_delta", "gmpo"])
def test_on_policy_gradient_is_gspo_policy_gradient(name):
    """At ratio 1 (logp = old_logp) the sequence losses' gradient is -A grad mean_t logp_t per sequence."""
    logp, _, _, adv, mask = _inputs(1)
    out = call_loss(name, PolicyBatch(logp, logp.detach(), logp.detach(), adv, mask))
    (g,) = torch.autograd.grad(aggregate(out.values, mask, "seq_mean_token_mean", num_seqs=B), logp)
    expect = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / B
    assert torch.allclose(g, expect, atol=1e-12)


def test_policy_objective_takes_new_losses():
    logp, old, behav, adv, mask = _inputs(2)
    obj = policy_objective(PolicyBatch(logp, old, behav, adv, mask), "seq_sapo", is_level="token")
    assert torch.isfinite(obj.aggregate("seq_mean_token_mean"))
    obj = policy_objective(PolicyBatch(logp, old, behav, adv, mask), "vespo", is_max=1.5)
    assert torch.isfinite(obj.aggregate("token_mean"))


def test_bad_options_raise():
    logp, old, behav, adv, mask = _inputs(0)
    with pytest.raises(ValueError, match="valid choices"):
        vespo_loss(logp, old, behav, adv, mask, is_mode="clip")
    with pytest.raises(ValueError, match="delta"):
        seq_delta_loss(logp, old, adv, mask, delta=0.0)


@pytest.mark.parametrize("name", NEW)
def test_new_losses_through_the_whole_objective_grid(name):
    """Every option combination the RL recipes accept (the grid of test_objective_equals_rl_study.py,
    which is frozen against the pre-redesign function and so holds only the older losses)."""
    import itertools

    logp, old, behav, adv, mask = _inputs(4)
    ent = torch.rand(B, T, dtype=torch.float64)
    for is_level, is_mode, select, weights in itertools.product(["none", "token", "sequence", "geometric"],
                                                                ["truncate", "mask"], ["none", "entropy_top"],
                                                                ["none", "steer"]):
        obj = policy_objective(PolicyBatch(logp, old, behav, adv, mask), name, is_level=is_level, is_mode=is_mode,
                               is_max=1.7, token_select=select, entropy_ratio=0.3, token_weights=weights, entropy=ent)
        loss = obj.aggregate("token_mean")
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), (is_level, is_mode, select, weights)
        assert float(g[mask == 0].abs().max()) == 0.0

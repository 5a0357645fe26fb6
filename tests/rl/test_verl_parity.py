"""Parity with verl 0.9.1's own policy losses (``verl.trainer.ppo.core_algos``, the ``verl``
extra): every verl loss mode that poise has, under every verl aggregation mode, through the
adapter registered in verl's registry (``poise.integrations.verl``), in float64: loss and
gradient within 1e-8 of verl's on random ragged inputs. Also verl's KL estimators."""

import copy

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl parity needs the verl extra")
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from poise.integrations.verl import aggregate_verl, make_policy_loss_fn, register_verl_losses  # noqa: E402
from poise.rl import kl_estimate  # noqa: E402

B, T = 6, 7
LENGTHS = torch.tensor([7, 3, 5, 1, 6, 4])
TOL = 1e-8
AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")

# verl loss mode -> (poise loss, actor-config fields)
PAIRS = {
    "vanilla": ("ppo_clip", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}),
    "gspo": ("gspo", {"clip_ratio_low": 3e-2, "clip_ratio_high": 4e-2}),
    "cispo": ("cispo", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
    "gpg": ("pg", {}),
    "sapo": ("sapo", {"tau_pos": 1.0, "tau_neg": 1.05}),
    "geo_mean": ("gmpo", {"clip_ratio_low": 0.4, "clip_ratio_high": 0.4}),
    "clip_cov": ("clip_cov", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}),
    "kl_cov": ("kl_cov", {}),
}
# verl's sapo always aggregates with seq-mean-token-mean and geo_mean with a mean over rows
FIXED_MODE = {"sapo": "seq-mean-token-mean", "geo_mean": "seq-mean-token-mean"}


def _config(fields, info=None):
    # clip/kl_cov ratio 0.1: ~3 of 32 tokens, so the covariance selection matters on this batch
    pl = PolicyLossConfig(clip_cov_ratio=0.1, kl_cov_ratio=0.1, ppo_kl_coef=1.0)
    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, policy_loss=pl, **fields)
    cfg.global_batch_info.update(info or {})
    return cfg


def _inputs(seed, spread=0.15):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(torch.float64)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = (2 * torch.randn(B, generator=g, dtype=torch.float64))[:, None] * mask  # verl: [B, T], 0 on padding
    w = torch.exp(0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)) * mask
    return logp, old, adv, mask, w


def _run(fn, logp, old, adv, mask, mode, cfg, w, seed):
    lp = logp.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # clip_cov draws with the global generator
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask.bool(),
                       loss_agg_mode=mode, config=cfg, rollout_is_weights=w)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


CASES = [(v, mode) for v in PAIRS for mode in AGG]


@pytest.mark.parametrize("verl_mode,mode", CASES)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_adapter_matches_verl_loss(verl_mode, mode, with_is, seed):
    poise_name, fields = PAIRS[verl_mode]
    logp, old, adv, mask, w = _inputs(seed)
    cfg = _config(fields)
    theirs = core_algos.get_policy_loss_fn(verl_mode)
    ours = make_policy_loss_fn(poise_name)
    ours_mode = FIXED_MODE.get(verl_mode, mode)
    wi = w if with_is else None
    if verl_mode == "geo_mean" and with_is:
        pytest.skip("verl geo_mean takes the geometric mean of the IS weights per sequence; the adapter "
                    "multiplies per-token values (documented)")
    lt, gt, mt = _run(theirs, logp, old, adv, mask, mode, cfg, wi, seed)
    lo, go, mo = _run(ours, logp, old, adv, mask, ours_mode, cfg, wi, seed)
    assert torch.isfinite(lo)
    # (verl's geo_mean divides by |y_i| + 1e-8, poise by |y_i|: measured <= 3.4e-9 on these inputs)
    assert abs(float(lo - lt)) <= TOL, (float(lo), float(lt))
    assert float((go - gt).abs().max()) <= TOL
    if verl_mode == "vanilla":  # the same token set; verl's masked mean divides by n + 1e-8
        assert mo["actor/pg_clipfrac"] == pytest.approx(mt["actor/pg_clipfrac"], abs=1e-8)
        assert mo["actor/ppo_kl"] == pytest.approx(mt["actor/ppo_kl"], abs=1e-8)
    if verl_mode == "clip_cov":  # verl's pg_clipfrac here is the covariance-detached fraction
        assert mo["actor/poise/clip_frac/cov"] == pytest.approx(mt["actor/pg_clipfrac"], abs=1e-8)
        assert mo["actor/poise/clip_frac/cov"] > 0  # the covariance selection acted on this batch


@pytest.mark.parametrize("mode", AGG)
def test_global_batch_info_dp2(mode):
    """With dp_size=2 and global counts, the adapter's per-rank loss is verl's."""
    logp, old, adv, mask, _ = _inputs(3)
    info = {"dp_size": 2, "batch_num_tokens": 2 * int(mask.sum()) + 5, "global_batch_size": 2 * B + 1,
            "loss_scale_factor": 11}
    cfg = _config(PAIRS["vanilla"][1], info)
    lt, gt, _ = _run(core_algos.get_policy_loss_fn("vanilla"), logp, old, adv, mask, mode, cfg, None, 0)
    lo, go, _ = _run(make_policy_loss_fn("ppo_clip"), logp, old, adv, mask, mode, copy.deepcopy(cfg), None, 0)
    assert abs(float(lo - lt)) <= TOL and float((go - gt).abs().max()) <= TOL


@pytest.mark.parametrize("mode", AGG)
def test_aggregate_verl_equals_agg_loss_with_empty_rows(mode):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    ours = aggregate_verl(v, mask, mode)
    theirs = core_algos.agg_loss(v, mask, mode)
    assert abs(float(ours - theirs)) <= TOL


def test_register_in_verl_registry():
    names = register_verl_losses(prefix="poise_test_")
    assert "poise_test_ppo_clip" in names and "poise_test_vespo" in names and "poise_test_gmpo" in names
    fn = core_algos.get_policy_loss_fn("poise_test_cispo")
    logp, old, adv, mask, _ = _inputs(0)
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask.bool(),
                       loss_agg_mode="token-mean", config=_config({}))
    assert torch.isfinite(loss) and "actor/ppo_kl" in metrics
    register_verl_losses(["pg"], prefix="poise_test_")  # re-registering our own name is fine
    core_algos.POLICY_LOSS_REGISTRY["poise_clash_pg"] = core_algos.compute_policy_loss_gpg
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_verl_losses(["pg"], prefix="poise_clash_")
    finally:
        core_algos.POLICY_LOSS_REGISTRY.pop("poise_clash_pg", None)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="valid choices"):
        make_policy_loss_fn("nope")
    with pytest.raises(ValueError, match="valid choices"):
        aggregate_verl(torch.zeros(1, 1), torch.ones(1, 1), "token_mean")


KINDS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "abs+", "k3+", "k2+"]


@pytest.mark.parametrize("kind", KINDS)
def test_kl_estimators_match_verl(kind):
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = logp.detach() + 0.7 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref[0, 0] = logp[0, 0].detach() + 25.0  # k3's clamps act here
    up = torch.randn(B, T, generator=g, dtype=torch.float64)
    theirs = core_algos.kl_penalty(logp, ref, kind)
    (gt,) = torch.autograd.grad((theirs * up).sum(), logp)
    ours = kl_estimate(logp, ref, kind=kind)
    (go,) = torch.autograd.grad((ours * up).sum(), logp)
    assert float((ours - theirs).abs().max()) <= TOL
    assert float((go - gt).abs().max()) <= TOL

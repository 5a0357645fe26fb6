"""Parity of ``poise.rl.rollout_correction`` and ``poise.rl.rollout_diagnostics`` with verl 0.9.1's
``verl/trainer/ppo/rollout_corr_helper.py`` (IS weights, batch normalisation, rejection rules,
off-policy metrics), float64."""

import pytest
import torch

rch = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper", reason="verl parity needs the verl extra")

from poise.rl import rejection_mask, rollout_correction, rollout_diagnostics  # noqa: E402

B, T = 6, 9
LENGTHS = torch.tensor([9, 3, 5, 1, 7, 4])


def _data(seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(torch.float64)
    trainer = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    sampler = trainer + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    return trainer, sampler, mask


IS_CASES = [("token", 2.0, None, False), ("sequence", 2.0, None, False), ("token", 2.0, None, True),
            ("sequence", 3.0, None, True), ("token", 1.5, 0.7, False), ("sequence", 2.0, 0.5, False)]


@pytest.mark.parametrize("level,hi,lo,norm", IS_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_is_weights_match_verl(level, hi, lo, norm, seed):
    trainer, sampler, mask = _data(seed)
    spec = hi if lo is None else f"{lo}_{hi}"
    theirs, _ = rch.compute_rollout_correction_weights(trainer - sampler, mask, rollout_is=level,
                                                       rollout_is_threshold=spec, rollout_is_batch_normalize=norm)
    ours = rollout_correction(trainer, sampler, mask, is_level=level, is_mode="truncate" if lo is None else "mask",
                              is_max=hi, is_min=lo, batch_normalize=norm, denominator="all")
    tol = 1e-8 if norm else 1e-12  # verl's batch mean divides by n + 1e-8 (per row, at sequence level)
    assert float((ours.weights - theirs * mask).abs().max()) <= tol
    assert torch.equal(ours.loss_mask, mask)


RULES = [{"token_k1": (0.8, 1.25)}, {"token_k2": 0.02}, {"token_k3": 0.02}, {"seq_sum_k1": (0.5, 2.0)},
         {"seq_sum_k2": 0.1}, {"seq_sum_k3": 0.1}, {"seq_mean_k1": 1.2}, {"seq_mean_k2": 0.03},
         {"seq_mean_k3": 0.03}, {"seq_max_k2": 0.08}, {"seq_max_k3": 0.08}, {"token_k2": 0.05, "seq_max_k3": 0.1}]


def _spec(rules):
    def one(v):
        return f"{v[0]}_{v[1]}" if isinstance(v, tuple) else str(v)
    return ",".join(rules), ",".join(one(v) for v in rules.values())


@pytest.mark.parametrize("rules", RULES, ids=lambda r: "+".join(r))
@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_matches_verl(rules, seed):
    trainer, sampler, mask = _data(seed)
    names, spec = _spec(rules)
    theirs, tm = rch.compute_rollout_rejection_mask(trainer - sampler, mask, rollout_rs=names,
                                                    rollout_rs_threshold=spec)
    keep, metrics = rejection_mask(trainer - sampler, mask, rules)
    assert torch.equal(keep, theirs.to(keep.dtype))
    assert 0 < float(keep.sum()) < float(mask.sum()) or "seq" in names  # the rule acted on this batch
    assert float(metrics["rs/masked_frac"]) == pytest.approx(tm["rollout_rs_masked_fraction"], abs=1e-8)
    corr = rollout_correction(trainer, sampler, mask, is_level=None, reject=rules, denominator="kept")
    assert torch.equal(corr.loss_mask, theirs.to(keep.dtype))  # verl's modified response mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagnostics_match_verl(seed):
    trainer, sampler, mask = _data(seed)
    theirs = rch.compute_offpolicy_metrics(trainer, sampler, mask)
    ours = rollout_diagnostics(trainer, sampler, mask, prefix="")
    for k, v in theirs.items():
        assert float(ours[k]) == pytest.approx(v, rel=1e-7, abs=1e-8), k  # verl's masked means add 1e-8
    # ESS: verl's rollout_is_eff_sample_size on untruncated token weights (threshold far above every weight)
    _, m = rch.compute_rollout_correction_weights(trainer - sampler, mask, rollout_is="token",
                                                  rollout_is_threshold=1e12)
    assert float(ours["ess_token"]) == pytest.approx(m["rollout_is_eff_sample_size"], rel=1e-7)


def test_bad_rules_raise():
    t, s, m = _data(0)
    with pytest.raises(ValueError, match="valid"):
        rejection_mask(t - s, m, {"token_k4": 1.0})
    with pytest.raises(ValueError, match="one upper bound"):
        rejection_mask(t - s, m, {"token_k2": (0.1, 0.2)})
    with pytest.raises(ValueError, match="valid choices"):
        rollout_correction(t, s, m, denominator="some")

"""PolicyBatch + call_loss: one call for the four policy-loss signatures, bound by name."""

import math

import pytest
import torch

from poise import _registry
from poise.rl import (
    LossOut,
    PolicyBatch,
    batch_inputs,
    call_loss,
    decoupled_ppo_loss,
    loss_options,
    minirl_loss,
    policy_losses,
    ppo_clip_loss,
)


def _batch(seed=0, B=3, T=4):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    behav = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[1, 2:] = 0
    return PolicyBatch(logp, old, behav, adv, mask)


def test_pg_hand_value():
    # one token with p = 0.5 and A = 2: l = -A log p = -2 * (-ln 2) = 2 ln 2
    b = PolicyBatch(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([2.0]),
                    torch.ones(1, 1))
    out = call_loss("pg", b)
    assert isinstance(out, LossOut)
    assert math.isclose(float(out.values), 2 * math.log(2), rel_tol=1e-12)


def test_binds_parameters_by_name_not_by_field_position():
    b = _batch()
    # ppo_clip(logp, old_logp, adv, mask): the third field of the batch (behav_logp) must not be passed as adv
    got = call_loss("ppo_clip", b, eps_high=0.28)
    want = ppo_clip_loss(b.logp, b.old_logp, b.adv, b.mask, eps_high=0.28)
    assert torch.equal(got.values, want.values)
    got = call_loss("minirl", b)
    assert torch.equal(got.values, minirl_loss(b.logp, b.old_logp, b.behav_logp, b.adv, b.mask).values)
    swapped = minirl_loss(b.logp, b.behav_logp, b.old_logp, b.adv, b.mask).values
    assert not torch.equal(got.values, swapped)


def test_prox_logp_defaults_to_old_logp():
    b = _batch()
    default = call_loss("decoupled_ppo", b, max_weight=None)
    assert torch.equal(default.values,
                       decoupled_ppo_loss(b.logp, b.old_logp, b.behav_logp, b.adv, b.mask, max_weight=None).values)
    prox = b.old_logp + 0.1
    given = call_loss("decoupled_ppo", b._replace(prox_logp=prox), max_weight=None)
    assert torch.equal(given.values,
                       decoupled_ppo_loss(b.logp, prox, b.behav_logp, b.adv, b.mask, max_weight=None).values)
    assert not torch.equal(given.values, default.values)


def test_batch_inputs_and_options_come_from_the_signature():
    assert batch_inputs("pg") == ["logp", "adv", "mask"]
    assert batch_inputs("ppo_clip") == ["logp", "old_logp", "adv", "mask"]
    assert batch_inputs("minirl") == ["logp", "old_logp", "behav_logp", "adv", "mask"]
    assert batch_inputs("decoupled_ppo") == ["logp", "prox_logp", "behav_logp", "adv", "mask"]
    assert loss_options("gspo") == {"eps_low": 3e-4, "eps_high": 4e-4, "convention": "verl"}
    assert loss_options("pg") == {}
    assert loss_options("pg", keyword_only=False) == {"weights": None}


def test_unknown_keyword_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"loss 'ppo_clip' got unknown keyword argument\(s\) 'eps'; "
                                        r"valid: eps_low, eps_high, dual_clip, weights"):
        call_loss("ppo_clip", _batch(), eps=0.1)
    with pytest.raises(TypeError, match="valid: weights"):
        call_loss("pg", _batch(), eps_low=0.1)


def test_a_loss_whose_data_is_not_in_the_batch_raises():
    with pytest.raises(ValueError, match="loss 'kl' needs ref_logp, which a PolicyBatch does not hold; "
                                         "policy losses: pg, ppo_clip"):
        call_loss("kl", _batch())
    with pytest.raises(KeyError, match="unknown loss 'nope'; valid choices"):
        call_loss("nope", _batch())


def test_policy_losses_are_derived_from_the_registry(monkeypatch):
    assert policy_losses() == ["pg", "ppo_clip", "gspo", "cispo", "decoupled_ppo", "minirl", "sapo",
                               "vespo", "seq_sapo", "seq_delta", "gmpo", "clip_cov", "kl_cov"]
    assert "kl" in _registry.names("loss") and "pacs" in _registry.names("loss")

    def new_loss(logp, old_logp, behav_logp, adv, mask, *, tau=1.0):
        return LossOut(-tau * adv[:, None] * logp * mask, {})

    def needs_rewards(logp, rewards, mask):
        return LossOut(logp * mask, {})

    table = dict(_registry._REGISTRY["loss"])
    table.update(new_loss=new_loss, needs_rewards=needs_rewards)
    monkeypatch.setitem(_registry._REGISTRY, "loss", table)
    assert policy_losses()[-1] == "new_loss" and "needs_rewards" not in policy_losses()
    b = _batch()
    torch.testing.assert_close(call_loss("new_loss", b, tau=2.0).values, -2.0 * b.adv[:, None] * b.logp * b.mask)

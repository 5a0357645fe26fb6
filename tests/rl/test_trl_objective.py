"""PoiseGRPOTrainer computes its loss with poise.rl.policy_objective (the workbench's call), so the
IS placement is the same in TRL and in the RL kind; its arguments are checked before TRL starts."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from poise.rl import PolicyBatch, policy_objective

pytest.importorskip("trl", reason="the TRL adapter needs the parity extra")

B, T = 3, 4


def _trainer(loss, kwargs, is_):
    from poise.integrations.trl import PoiseGRPOTrainer

    t = object.__new__(PoiseGRPOTrainer)
    t.__dict__.update(poise_loss=loss, poise_kwargs=kwargs, poise_aggregation="token_mean", poise_is=is_,
                      model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
                      accelerator=SimpleNamespace(num_processes=1), args=SimpleNamespace(steps_per_generation=1),
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    return t


@pytest.mark.parametrize("loss, kwargs", [("pg", {}), ("ppo_clip", {"eps_high": 0.28}), ("minirl", {})])
def test_compute_loss_is_policy_objective(loss, kwargs):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=g)
    behav = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    t = _trainer(loss, kwargs, ("token", "truncate", 1.5))
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, None, None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "sampling_per_token_logps": behav, "num_items_in_batch": mask.sum()}
    got = t._compute_loss(None, inputs)
    m = mask.to(logp.dtype)
    want = policy_objective(PolicyBatch(logp, old, behav, adv, m), loss, is_level="token", is_max=1.5,
                            **kwargs).aggregate("token_mean", num_tokens=m.sum())
    assert torch.equal(got, want)
    if loss == "pg":  # pg weights pi_theta / mu (not pi_old / mu): sg[logp] - behav, truncated at 1.5
        w = torch.exp(logp.detach() - behav).clamp(max=1.5)
        torch.testing.assert_close(got, (-w * adv[:, None] * logp * m).sum() / m.sum())
    assert "poise/is/ess" in t._metrics["train"] or loss == "minirl"


def test_adapter_arguments_are_checked_before_trl_starts():
    from poise.integrations.trl import PoiseGRPOTrainer

    with pytest.raises(TypeError, match="unknown argument\\(s\\) 'eps' of loss 'cispo'; valid: eps_low, eps_high, "
                                        "bounds"):
        PoiseGRPOTrainer(poise_loss="cispo", poise_loss_kwargs={"eps": 0.2})
    with pytest.raises(ValueError, match="poise_is=\\('batch', 'truncate', 2.0\\); valid: None or"):
        PoiseGRPOTrainer(poise_loss="pg", poise_is=("batch", "truncate", 2.0))

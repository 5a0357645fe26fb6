"""PoiseGRPOTrainer with ``poise_loss`` computes its surrogate with poise.rl.policy_objective (the
workbench's call), so the IS placement is the same in TRL and in the RL kind; its arguments are checked
before TRL starts."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from poise.rl import PolicyBatch, policy_objective

trl = pytest.importorskip("trl", reason="the TRL adapter needs the trl extra")

B, T = 3, 4


def _trainer(loss, kwargs, is_, logp):
    from poise.integrations.trl import PoiseGRPOTrainer, trl_loss_plan

    cfg = trl.GRPOConfig(output_dir="/tmp/poise-trl-objective", use_cpu=True, bf16=False, report_to="none",
                         loss_type="dapo")
    t = object.__new__(PoiseGRPOTrainer)
    acc = SimpleNamespace(num_processes=1, sync_gradients=True, reduce=lambda x, **k: x, gather=lambda x: x)
    t.__dict__.update(args=cfg, poise_plan=trl_loss_plan(cfg, loss, kwargs, None, is_),
                      model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=acc,
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.ones_like(logp), None)
    return t


@pytest.mark.parametrize("loss, kwargs", [("pg", {}), ("ppo_clip", {"eps_high": 0.28}), ("minirl", {})])
def test_compute_loss_is_policy_objective(loss, kwargs):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=g)
    behav = old + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    t = _trainer(loss, kwargs, ("token", "truncate", 1.5), logp)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "sampling_per_token_logps": behav, "num_items_in_batch": mask.sum()}
    got = t.compute_loss(None, inputs)
    m = mask.to(logp.dtype)
    opts = {"eps_low": 0.2, "eps_high": 0.28, "convention": "trl"} if loss != "pg" else {}
    opts.update(kwargs)
    want = policy_objective(PolicyBatch(logp, old, behav, adv, m), loss, is_level="token", is_max=1.5,
                            **opts).aggregate("token_mean", num_tokens=m.sum())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if loss == "pg":  # pg weights pi_theta / mu (not pi_old / mu): sg[logp] - behav, truncated at 1.5
        w = torch.exp(logp.detach() - behav).clamp(max=1.5)
        torch.testing.assert_close(got, (-w * adv[:, None] * logp * m).sum() / m.sum())
    assert "poise/is/ess" in t._metrics["train"] or loss == "minirl"
    assert "entropy" in t._metrics["train"]  # TRL's name, always logged


def test_adapter_arguments_are_checked_before_trl_starts():
    from poise.integrations.trl import PoiseGRPOTrainer

    with pytest.raises(TypeError, match="unknown argument\\(s\\) 'eps' of loss 'cispo'; valid: eps_low, eps_high, "
                                        "bounds, convention"):
        PoiseGRPOTrainer(poise_loss="cispo", poise_loss_kwargs={"eps": 0.2})
    with pytest.raises(ValueError, match="poise_is=\\('batch', 'truncate', 2.0\\); valid: None or"):
        PoiseGRPOTrainer(poise_loss="pg", poise_is=("batch", "truncate", 2.0))
    with pytest.raises(ValueError, match="poise_aggregation='mean'; valid choices: token_mean"):
        PoiseGRPOTrainer(poise_loss="pg", poise_aggregation="mean")
    with pytest.raises(ValueError, match="poise_loss_kwargs=.* needs poise_loss"):
        PoiseGRPOTrainer(poise_loss_kwargs={"eps_high": 0.3})

"""``poise.rl.policy_objective`` against the workbench's former ``poise.runs.rl_study.policy_loss`` on
every policy loss x option combination the RL recipes accept (float64, random ragged inputs).

Before the old function was deleted, a test checked bit-identity with it (values, aggregation mask,
metrics and gradient) on this grid, and its numbers were frozen in ``policy_objective_frozen.json``:
the token-mean loss, the gradient projected on a fixed vector, and the sum of the metrics.
``test_policy_objective_matches_frozen_values`` holds ``policy_objective`` to them."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from poise.rl import PolicyBatch, policy_losses, policy_objective

B, T = 6, 7
PARAMS = {"ppo_clip": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0}, "gspo": {"eps_low": 3e-3},
          "cispo": {"eps_low": 0.2, "eps_high": 0.28}, "sapo": {"tau_neg": 1.2},
          "minirl": {"eps_high": 0.3, "rho_max": 2.0}, "decoupled_ppo": {"eps_high": 0.28, "max_weight": 3.0},
          "pg": {}}


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    behav = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return logp, old, behav, adv, mask, ent


FROZEN = Path(__file__).with_name("policy_objective_frozen.json")


def _key(case, seed):
    return "|".join(case) + f"|{seed}"


def _summary(values, mask, metrics, logp):
    loss = torch.sum(values * mask) / mask.sum()
    grad = torch.autograd.grad(loss, logp)[0]
    probe = torch.arange(B * T, dtype=torch.float64).reshape(B, T).cos()
    return [float(loss.detach()), float((grad * probe).sum()), float(sum(float(x) for x in metrics.values()))]


def _cases():
    for loss in ["pg", "ppo_clip", "gspo", "cispo", "sapo", "minirl", "decoupled_ppo"]:
        clips = ["none", "bapo"] if loss == "ppo_clip" else ["none"]  # the recipes accept bapo on ppo_clip only
        for is_level, is_mode, select, weights, clip in itertools.product(
                ["none", "token", "sequence", "geometric"], ["truncate", "mask"], ["none", "entropy_top"],
                ["none", "steer"], clips):
            if is_level == "none" and is_mode == "mask":
                continue  # the mode only matters with a level
            yield loss, is_level, is_mode, select, weights, clip


NEWER = {"vespo", "seq_sapo", "seq_delta", "gmpo", "clip_cov", "kl_cov"}  # after the freeze: their own grid test


def test_the_grid_covers_every_policy_loss():
    # the frozen grid holds every loss the old workbench function had; the newer ones run the same option grid in
    # tests/rl/test_more_losses.py::test_new_losses_through_the_whole_objective_grid
    assert {c[0] for c in _cases()} == set(policy_losses()) - NEWER


def _objective(case, logp, old, behav, adv, mask, ent):
    loss, is_level, is_mode, select, weights, clip = case
    return policy_objective(PolicyBatch(logp, old, behav, adv, mask), loss, is_level=is_level, is_mode=is_mode,
                            is_max=1.7, token_select=select, entropy_ratio=0.3, token_weights=weights,
                            adaptive_clip=clip, entropy=ent, **PARAMS[loss])


def test_policy_objective_matches_frozen_values():
    frozen = json.loads(FROZEN.read_text())
    cases = list(_cases())
    assert len(frozen) == 2 * len(cases)
    for case in cases:
        for seed in (0, 1):
            logp, old, behav, adv, mask, ent = _inputs(seed)
            obj = _objective(case, logp, old, behav, adv, mask, ent)
            got = _summary(obj.values, obj.mask, obj.metrics, logp)
            assert got == pytest.approx(frozen[_key(case, seed)], rel=1e-10, abs=1e-12), _key(case, seed)

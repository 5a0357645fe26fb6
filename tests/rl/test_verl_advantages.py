"""Parity of the advantage estimators of ``poise.rl.advantages_more`` with verl 0.9.1's own
(``verl.trainer.ppo.core_algos``), in float64 on ragged groups: max abs error <= 1e-8."""

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl parity needs the verl extra")

from poise.rl import (  # noqa: E402
    gpg_advantage,
    normalize_then_sum_advantage,
    opo_advantage,
    optimal_token_baseline_advantage,
    outcome_token_rewards,
    passk_advantage,
    reinforce_pp_advantage,
    reinforce_pp_baseline_advantage,
    token_whiten,
)

TOL = 1e-8
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # ragged groups, one of size 1
LENGTHS = torch.tensor([5, 2, 7, 3, 3, 6, 1, 4, 7, 2])
B, T = len(GROUPS), 7


def _data(seed, binary=False):
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(B, generator=g) > 0.5).to(torch.float64) if binary else torch.randn(B, generator=g,
                                                                                         dtype=torch.float64)
    mask = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(torch.float64)
    return r, mask, GROUPS.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp(seed, gamma):
    r, mask, _ = _data(seed)
    g = torch.Generator().manual_seed(seed + 10)
    tok = torch.randn(B, T, generator=g, dtype=torch.float64) * mask  # dense token rewards
    tok[:, 3] = 0
    mask[:, 3] *= torch.tensor([0, 1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.float64)  # observation spans
    theirs, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(tok.clone(), mask,
                                                                         config=_Cfg(gamma))
    ours = reinforce_pp_advantage(tok, mask, gamma=gamma)
    assert float((ours - theirs).abs().max()) <= TOL


class _Cfg(dict):
    def __init__(self, gamma):
        super().__init__(gamma=gamma, norm_adv_by_std_in_grpo=True)
        self.gamma = gamma


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_baseline(seed):
    r, mask, idx = _data(seed)
    theirs, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(outcome_token_rewards(r, mask),
                                                                                  mask, idx)
    ours = reinforce_pp_baseline_advantage(r, GROUPS, mask)
    assert float((ours - theirs).abs().max()) <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opo(seed):
    r, mask, idx = _data(seed)
    theirs, _ = core_algos.compute_opo_outcome_advantage(outcome_token_rewards(r, mask), mask, idx)
    ours = opo_advantage(r, GROUPS, mask.sum(-1))
    assert float((ours[:, None] * mask - theirs).abs().max()) <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("binary", [False, True])
def test_gpg(seed, binary):
    r, mask, idx = _data(seed, binary)
    theirs, _ = core_algos.compute_gpg_outcome_advantage(outcome_token_rewards(r, mask), mask, idx, f_norm=2.0)
    ours = gpg_advantage(r, GROUPS, f_norm=2.0)
    assert float((ours[:, None] * mask - theirs).abs().max()) <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [True, False])
def test_grpo_passk(seed, scale):
    r, mask, _ = _data(seed)
    keep = GROUPS != 3  # pass@k needs groups of >= 2
    r, mask, groups = r[keep], mask[keep], GROUPS[keep]
    theirs, _ = core_algos.compute_grpo_passk_outcome_advantage(outcome_token_rewards(r, mask), mask, groups.numpy(),
                                                                config={"norm_adv_by_std_in_grpo": scale})
    ours = passk_advantage(r, groups, scale=scale)
    assert float((ours[:, None] * mask - theirs).abs().max()) <= TOL
    assert int((ours != 0).sum()) == len(torch.unique(groups))  # one non-zero advantage per group


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
def test_optimal_token_baseline(seed, with_is, zero_tail):
    r, mask, idx = _data(seed)
    g = torch.Generator().manual_seed(seed + 20)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    spp = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.5 + 0.2
    isw = torch.exp(0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)) if with_is else None
    tok = outcome_token_rewards(r, mask)
    theirs, _ = core_algos.compute_optimal_token_baseline_advantage(tok, mask, idx, old, spp, isw,
                                                                    handle_zero_tail=zero_tail)
    ours = optimal_token_baseline_advantage(tok, mask, GROUPS, old, spp, is_weights=isw, handle_zero_tail=zero_tail)
    assert float((ours - theirs).abs().max()) <= TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalize_then_sum_equals_verl_gdpo(seed):
    """verl's GDPO = per-group normalisation of each reward, weighted sum, token whitening."""
    r, mask, _ = _data(seed)
    keep = GROUPS != 3  # a group of one: TRL's rule gives 0, verl's GRPO keeps r (mean 0, std 1): documented
    r, mask, groups = r[keep], mask[keep], GROUPS[keep]
    idx, B = groups.numpy(), int(keep.sum())
    g = torch.Generator().manual_seed(seed + 30)
    r2 = (torch.rand(B, generator=g) > 0.4).to(torch.float64)
    weights = [1.0, 0.5]
    lengths = mask.sum(-1).long()
    batch = {"prompts": torch.zeros(B, 2), "attention_mask": torch.cat([torch.ones(B, 2), mask], 1).long()}
    ntb = {"acc": r.numpy(), "fmt": r2.numpy()}
    cfg = {"gdpo_reward_keys": ["acc", "fmt"], "gdpo_reward_weights": weights}
    theirs, _ = core_algos.compute_gdpo_outcome_advantage(torch.zeros(B, T), mask, idx, epsilon=1e-6, config=cfg,
                                                          non_tensor_batch=ntb, batch=batch)
    # verl casts the component scores to float32 (np.float32): compare on float32-rounded rewards, at its precision
    x = torch.stack([r.float().double(), r2.float().double()], 1)
    s = normalize_then_sum_advantage(x, groups, weights=torch.tensor(weights), eps=1e-6, final="none")
    ours = token_whiten(s[:, None] * mask, mask)
    assert float((ours - theirs.double()).abs().max()) <= 1e-5
    assert lengths.min() > 0


def test_normalize_then_sum_trl_batch_step():
    """TRL's final step on hand-computable numbers: two groups of two, one reward function.
    Group z-scores are +-1/sqrt(2)/(... + eps): with eps=0 each group gives (+0.7071, -0.7071);
    the batch std of [a, -a, a, -a] is a*sqrt(4/3), so A = +-sqrt(3)/2."""
    x = torch.tensor([[1.0], [0.0], [5.0], [3.0]], dtype=torch.float64)
    a = normalize_then_sum_advantage(x, torch.tensor([0, 0, 1, 1]), eps=0.0)
    expect = torch.tensor([1, -1, 1, -1], dtype=torch.float64) * 3 ** 0.5 / 2
    assert torch.allclose(a, expect, atol=1e-12)
    nan_row = normalize_then_sum_advantage(torch.tensor([[1.0], [float("nan")], [0.0], [2.0]]),
                                           torch.tensor([0, 0, 1, 1]))
    assert nan_row[1] == 0 and torch.isfinite(nan_row).all()
    with pytest.raises(ValueError, match="valid choices"):
        normalize_then_sum_advantage(x, torch.tensor([0, 0, 1, 1]), final="whiten")

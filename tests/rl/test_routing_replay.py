"""Routing Replay (arXiv 2512.01374): top-k gates, replay of a recorded routing, the
routing-mismatch diagnostic, and the sampler-record / trainer-replay path on a tiny MoE GPT."""

import math

import pytest
import torch

from poise.models.moe import MoEConfig, MoEGPT, moe_gates
from poise.rl import Rollout, quantised_copy, record_routing, routed_logprobs, routing_mismatch, trainer_logprobs


def test_gates_hand_computed():
    z = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    g, s = moe_gates(z, 2)
    assert s.tolist() == [[1, 2]]
    e = math.e
    torch.testing.assert_close(g, torch.tensor([[0.0, e**2 / (e**2 + e), e / (e**2 + e), 0.0]]), check_dtype=False)
    g, s = moe_gates(z, 2, torch.tensor([[3, 0]]))  # replayed {0, 3}: softmax of (0, -1) over them
    assert s.tolist() == [[0, 3]]
    torch.testing.assert_close(g, torch.tensor([[1 / (1 + 1 / e), 0, 0, (1 / e) / (1 + 1 / e)]]), check_dtype=False)
    g, _ = moe_gates(z, 1, normalize=False)  # Switch-style: the full softmax's value on the chosen expert
    total = 1 + e**2 + e + 1 / e
    torch.testing.assert_close(g, torch.tensor([[0.0, e**2 / total, 0.0, 0.0]]), check_dtype=False)


def test_replayed_gates_still_train_the_router():
    z = torch.tensor([[0.0, 2.0, 1.0]], requires_grad=True)
    g, _ = moe_gates(z, 2, torch.tensor([[0, 2]]))
    (g * torch.tensor([[1.0, 5.0, 3.0]])).sum().backward()
    # d/dz of g_0*1 + g_2*3 with g = softmax(z_0, z_2): nonzero on the replayed experts, 0 on expert 1
    assert z.grad[0, 1] == 0 and z.grad[0, 0] < 0 < z.grad[0, 2]


def test_bad_routing_is_refused():
    with pytest.raises(ValueError, match="routing has shape"):
        moe_gates(torch.zeros(2, 4), 2, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="expert ids outside 0..3"):
        moe_gates(torch.zeros(1, 4), 1, torch.tensor([[4]]))
    with pytest.raises(ValueError, match="top_k=5 must be <= n_experts=4"):
        MoEConfig(top_k=5)


def test_routing_mismatch_compares_sets():
    a = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
    b = torch.tensor([[1, 0], [2, 1], [3, 1], [0, 3]])  # same set, differs, same set (order), differs
    assert float(routing_mismatch(a, b)) == 0.5
    assert float(routing_mismatch(a, b, torch.tensor([1.0, 0.0, 1.0, 0.0]))) == 0.0  # only the agreeing two
    assert float(routing_mismatch(a, a)) == 0.0
    with pytest.raises(ValueError, match="routings differ in shape"):
        routing_mismatch(a, b[:3])


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=16, n_experts=4, top_k=2)
    return MoEGPT(MoEConfig(**{**cfg, **kw})).float()


def _rollouts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p_len = 3 + i % 2  # two prompt lengths: two buckets
        prompt = torch.randint(0, 17, (p_len,), generator=g)
        comp = torch.randint(0, 17, (1 + i % 4,), generator=g)
        out.append(Rollout(None, prompt, comp, torch.zeros(len(comp)), "", group=i))
    return out


def test_replaying_the_models_own_routing_changes_nothing():
    m = _model()
    x = torch.randint(0, 17, (3, 7))
    logits, _ = m(x)
    own = m.last_routing
    assert own.shape == (3, 2, 7, 2)
    replayed, _ = m(x, routing=own)
    torch.testing.assert_close(replayed, logits)
    other = (own + 1) % 4  # a different set on every token
    changed, _ = m(x, routing=other)
    assert torch.equal(m.last_routing, other.sort(-1).values) and not torch.allclose(changed, logits)


def test_routed_logprobs_without_replay_equal_trainer_logprobs():
    m, ro = _model(), _rollouts()
    with torch.no_grad():
        lp, _, used = routed_logprobs(m, ro)
        torch.testing.assert_close(lp, trainer_logprobs(m, ro))
    assert [u.shape[1] for u in used] == [len(r.prompt_ids) + len(r.completion_ids) for r in ro]


def test_sampler_routing_is_recorded_and_replayed():
    """R3's mechanism: the sampler (weights quantised to 2 bits) routes some tokens differently from
    the trainer; replaying its recorded routing makes the trainer use exactly those experts, and the
    trainer's log-probs then equal a forward of the trainer's weights on the sampler's experts."""
    m, ro = _model(1), _rollouts(8, seed=1)
    record_routing(m, ro, weight_bits=2)
    rec = [r.extra["routing"] for r in ro]
    with torch.no_grad():
        sampler = quantised_copy(m, 2)
        for r, x in zip(ro, rec, strict=True):  # the recorded routing is the quantised sampler's own choice
            sampler(torch.cat([r.prompt_ids, r.completion_ids])[None])
            assert torch.equal(sampler.last_routing[0], x)
        _, _, live = routed_logprobs(m, ro)
        lp_replay, _, used = routed_logprobs(m, ro, rec)
    flat = lambda xs: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])  # noqa: E731
    assert float(routing_mismatch(flat(rec), flat(live))) > 0  # the engines disagree on some tokens
    assert float(routing_mismatch(flat(rec), flat(used))) == 0  # replay: the trainer used the sampler's experts
    with torch.no_grad():
        for i, r in enumerate(ro):
            x = torch.cat([r.prompt_ids, r.completion_ids])[None]
            logits, _ = m(x, routing=rec[i][None])
            lp = torch.log_softmax(logits[0, len(r.prompt_ids) - 1 : -1].float(), -1)
            ref = lp.gather(1, r.completion_ids[:, None]).squeeze(1)
            torch.testing.assert_close(lp_replay[i, : len(ref)], ref, check_dtype=False)


def test_replay_of_a_wrong_length_is_refused():
    m, ro = _model(), _rollouts(2)
    record_routing(m, ro)
    bad = [r.extra["routing"][:, :-1] for r in ro]
    with pytest.raises(ValueError, match="routing of rollout 0 covers"):
        routed_logprobs(m, ro, bad)

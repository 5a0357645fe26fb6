import itertools
import math

import pytest
import torch

from poise.federated import fedstale_aggregate, fedstale_weights

# Population {0, 1, 2}, weights 1:1:2 -> alpha = (.25, .25, .5). Clients 0 and 1 participate.
W = {0: 1.0, 1: 1.0, 2: 2.0}


def T(*v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(v)}


FRESH = {0: T(4.0, 0.0), 1: T(0.0, 8.0)}
MEMORY = {0: T(2.0, 2.0), 2: T(4.0, -4.0)}  # client 1 has never been seen: h_1 = 0


def fedvarp_reference(fresh, memory, alpha, w):
    """FedVARP (arXiv 2207.14130) written directly: sum_N alpha_j h_j + sum_S w_i (Delta_i - h_i)."""
    zero = torch.zeros(2)
    h = {j: memory.get(j, {"w": zero})["w"] for j in alpha}
    return sum(alpha[j] * h[j] for j in alpha) + sum(w[i] * (fresh[i]["w"] - h[i]) for i in fresh)


def test_beta0_is_fedavg_over_participants():
    # w_i = .25/.5 = .5 each: .5*[4,0] + .5*[0,8] = [2,4], the plain mean of the participants' updates
    upd, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.0, W)
    assert torch.equal(upd["w"], torch.tensor([2.0, 4.0]))


def test_beta1_is_fedvarp():
    # sum_N alpha h = .25*[2,2] + .5*[4,-4] = [2.5,-1.5]; sum_S w (Delta - h) = .5*[2,-2] + .5*[0,8] = [1,3]
    upd, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 1.0, W)
    assert torch.allclose(upd["w"], torch.tensor([3.5, 1.5]))
    alpha, w = fedstale_weights([0, 1], W)
    assert torch.allclose(upd["w"], fedvarp_reference(FRESH, MEMORY, alpha, w))


def test_intermediate_beta_is_the_convex_combination():
    # Delta(beta) = FedAvg + beta * (sum_N alpha h - sum_S w h) = [2,4] + beta*[1.5,-2.5]; beta=.5 -> [2.75, 2.75]
    upd, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, W)
    assert torch.allclose(upd["w"], torch.tensor([2.75, 2.75]))
    a, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.0, W)
    b, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 1.0, W)
    assert torch.allclose(upd["w"], 0.5 * a["w"] + 0.5 * b["w"])


def test_unbiased_weights_with_participation_probs():
    # w_0 = .25/.5 = .5, w_1 = .25/1 = .25
    probs = {0: 0.5, 1: 1.0, 2: 0.25}
    upd0, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.0, W, probs)
    assert torch.allclose(upd0["w"], torch.tensor([2.0, 2.0]))  # .5*[4,0] + .25*[0,8]
    upd1, _ = fedstale_aggregate(FRESH, MEMORY, [0, 1], 1.0, W, probs)
    # [2.5,-1.5] + .5*([4,0]-[2,2]) + .25*([0,8]-0) = [3.5,-0.5]
    assert torch.allclose(upd1["w"], torch.tensor([3.5, -0.5]))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_unbiased_in_expectation_over_participation(beta):
    # E_S[Delta] = sum_i alpha_i Delta_i for any beta when w_i = alpha_i / p_i (the paper's Lemma): exact
    # enumeration over the 2^3 participation patterns with independent Bernoulli(p_i).
    probs = {0: 0.5, 1: 0.8, 2: 0.25}
    all_fresh = {0: T(4.0, 0.0), 1: T(0.0, 8.0), 2: T(-2.0, 6.0)}
    expect = torch.zeros(2)
    for pattern in itertools.product([0, 1], repeat=3):
        part = [i for i in range(3) if pattern[i]]
        prob = math.prod(probs[i] if pattern[i] else 1 - probs[i] for i in range(3))
        upd, _ = fedstale_aggregate({i: all_fresh[i] for i in part}, MEMORY, part, beta, W, probs)
        expect += prob * upd["w"]
    target = sum(a * all_fresh[i]["w"] for i, a in {0: 0.25, 1: 0.25, 2: 0.5}.items())
    assert torch.allclose(expect, target, atol=1e-6)


def test_full_participation_ignores_memory():
    fresh = {0: T(4.0, 0.0), 1: T(0.0, 8.0), 2: T(2.0, 2.0)}
    for beta in (0.0, 0.5, 1.0):
        upd, _ = fedstale_aggregate(fresh, MEMORY, [0, 1, 2], beta, W)
        assert torch.allclose(upd["w"], torch.tensor([2.0, 3.0]))  # .25*[4,0] + .25*[0,8] + .5*[2,2]


def test_memory_update_rule_and_purity():
    before = {i: {k: v.clone() for k, v in d.items()} for i, d in MEMORY.items()}
    _, mem = fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, W)
    assert set(mem) == {0, 1, 2}
    assert torch.equal(mem[0]["w"], FRESH[0]["w"]) and mem[0]["w"] is not FRESH[0]["w"]  # h_i <- Delta_i (a copy)
    assert torch.equal(mem[1]["w"], FRESH[1]["w"])
    assert mem[2]["w"] is MEMORY[2]["w"]  # absent: unchanged
    for i in before:  # inputs untouched
        assert torch.equal(MEMORY[i]["w"], before[i]["w"])
    assert set(MEMORY) == {0, 2}


def test_dropout_mid_round_is_absent():
    # client 2 was selected but sent nothing: same update and memory as if it had not been selected
    upd_a, mem_a = fedstale_aggregate(FRESH, MEMORY, [0, 1, 2], 0.5, W)
    upd_b, mem_b = fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, W)
    assert torch.equal(upd_a["w"], upd_b["w"])
    assert mem_a[2]["w"] is MEMORY[2]["w"]
    assert all(torch.equal(mem_a[i]["w"], mem_b[i]["w"]) for i in mem_b)


def test_nobody_replies():
    upd, mem = fedstale_aggregate({}, MEMORY, [0, 1], 0.0, W)  # FedAvg: a zero update (no-op)
    assert torch.equal(upd["w"], torch.zeros(2)) and mem[0]["w"] is MEMORY[0]["w"]
    upd, _ = fedstale_aggregate({}, MEMORY, [0, 1], 1.0, W)  # stale only: sum_N alpha h
    assert torch.allclose(upd["w"], torch.tensor([2.5, -1.5]))
    with pytest.raises(ValueError, match="nothing defines"):
        fedstale_aggregate({}, {}, [0], 0.5, W)


def test_dtype_preserved():
    fresh = {0: {"w": torch.tensor([1.0, 3.0], dtype=torch.float16)}}
    upd, _ = fedstale_aggregate(fresh, {}, [0], 0.5, {0: 1.0})
    assert upd["w"].dtype == torch.float16 and torch.equal(upd["w"].float(), torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_beta_raises_naming_it(beta):
    with pytest.raises(ValueError, match=r"beta=.*\[0, 1\]"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], beta, W)


def test_beta_type():
    with pytest.raises(TypeError, match="beta"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], "0.5", W)  # type: ignore[arg-type]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"not in participating"):
        fedstale_aggregate(FRESH, MEMORY, [0], 0.5, W)
    with pytest.raises(ValueError, match=r"not in weights"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, {0: 1.0, 2: 1.0})
    with pytest.raises(ValueError, match=r"memory has clients \[2\]"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, {0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match="shape"):
        fedstale_aggregate({0: T(1.0, 2.0), 1: T(1.0)}, {}, [0, 1], 0.5, W)
    with pytest.raises(ValueError, match="keys"):
        fedstale_aggregate({0: T(1.0, 2.0), 1: {"v": torch.zeros(2)}}, {}, [0, 1], 0.5, W)
    with pytest.raises(ValueError, match=r"weights\[2\]=-1"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, {0: 1.0, 1: 1.0, 2: -1.0})
    with pytest.raises(ValueError, match=r"participation_probs\[0\]=0"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, W, {0: 0.0, 1: 1.0})
    with pytest.raises(ValueError, match="no entry"):
        fedstale_aggregate(FRESH, MEMORY, [0, 1], 0.5, W, {0: 0.5})
    with pytest.raises(TypeError, match="Tensor"):
        fedstale_aggregate({0: {"w": [1.0]}}, {}, [0], 0.5, W)  # type: ignore[dict-item]

"""poise.models.quant: fake INT4/INT8 quantisation as the Stable-SPAM authors simulate it
(arXiv 2502.17055; TianjinYellow/StableSPAM utils/act_weight_quantization.py, utils/dummy_quant.py)."""

import pytest
import torch
from torch import nn

from poise.models import GPT, GPTConfig
from poise.models.quant import (
    QUANT_PRESETS,
    FakeQuantLinear,
    QuantSpec,
    fake_quantize,
    fake_quantize_linears,
    quant_spec,
    quantize_dequantize,
)


def test_symmetric_4bit_by_hand():
    # Q = 2^3 - 1 = 7, s = max|x| = 1: x*7 = [7, -3.5, 2.1, 0] -> round (half to even) [7, -4, 2, 0] -> /7
    x = torch.tensor([1.0, -0.5, 0.3, 0.0])
    assert torch.allclose(quantize_dequantize(x, 4), torch.tensor([1.0, -4 / 7, 2 / 7, 0.0]))
    # 8 bits: Q = 127; 0.3*127 = 38.1 -> 38
    assert torch.allclose(quantize_dequantize(x, 8), torch.tensor([1.0, -64 / 127, 38 / 127, 0.0]))


def test_symmetric_clamps_to_the_negative_end():
    # s = 1, Q = 7: -1 * 7 = -7 (inside [-8, 7]); 2 bits: Q = 1, [-1, 0.4] -> [-1, 0] (round(0.4) = 0)
    assert torch.allclose(quantize_dequantize(torch.tensor([-1.0, 0.4]), 2), torch.tensor([-1.0, 0.0]))


def test_topk_outliers_stay_exact_and_do_not_set_the_scale():
    # group [10, 1, -0.5, 0.25], top-1 kept: scale from the rest, max|.| = 1:
    # [1, -0.5, 0.25]*7 = [7, -3.5, 1.75] -> [7, -4, 2] -> [1, -4/7, 2/7]; 10 stays 10
    x = torch.tensor([10.0, 1.0, -0.5, 0.25])
    assert torch.allclose(quantize_dequantize(x, 4, topk=1), torch.tensor([10.0, 1.0, -4 / 7, 2 / 7]))
    # without topk the outlier sets s = 10: 1*0.7 -> 1 -> 10/7; -0.5*0.7 = -0.35 -> 0; 0.25 -> 0
    assert torch.allclose(quantize_dequantize(x, 4), torch.tensor([10.0, 10 / 7, 0.0, 0.0]))


def test_asymmetric_min_max_by_hand():
    # 2 bits: Q = 3, min 0, max 3 -> s = 1, z = 0: exact
    assert torch.equal(quantize_dequantize(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2, symmetric=False),
                       torch.tensor([0.0, 1.0, 2.0, 3.0]))
    # 2 bits on [-1, 0.2, 2]: s = 3/3 = 1, z = -round(-1) = 1; q = round([-1, 0.2, 2]) + 1 = [0, 1, 3]
    # -> (q - 1)*1 = [-1, 0, 2]
    assert torch.allclose(quantize_dequantize(torch.tensor([-1.0, 0.2, 2.0]), 2, symmetric=False),
                          torch.tensor([-1.0, 0.0, 2.0]))


def test_groups_have_their_own_scale_and_a_partial_group_works():
    # groups of 2: [4, 1] (s = 4, Q = 7: 1*7/4 = 1.75 -> 2 -> 8/7) and [0.5, 0.25] (s = 0.5:
    # 0.25*14 = 3.5 -> 4 -> 4/14); the last group [3] alone: exact
    x = torch.tensor([4.0, 1.0, 0.5, 0.25, 3.0])
    out = quantize_dequantize(x, 4, group_size=2)
    assert torch.allclose(out, torch.tensor([4.0, 8 / 7, 0.5, 2 / 7, 3.0]))
    # per tensor (group_size <= 0): s = 4: 0.25*7/4 = 0.4375 -> 0
    assert quantize_dequantize(x, 4, group_size=-1)[3] == 0.0
    # asymmetric, 2 bits (Q = 3), groups of 3: [-1, 2, -3]: s = 5/3, z = -round(-1.8) = 2,
    # q = round([-0.6, 1.2, -1.8]) + 2 = [1, 3, 0] -> (q - 2)*5/3 = [-5/3, 5/3, -10/3];
    # the partial group [-1, 2] (padded with its last element): s = 1, z = 1 -> exact
    y = torch.tensor([-1.0, 2.0, -3.0, -1.0, 2.0])
    assert torch.allclose(quantize_dequantize(y, 2, group_size=3, symmetric=False),
                          torch.tensor([-5 / 3, 5 / 3, -10 / 3, -1.0, 2.0]))


def test_asymmetric_zero_point_is_clamped_as_in_the_authors_code():
    # [1, 2], 2 bits: s = 1/3, z = clamp(-round(3), 0, 3) = 0, q = clamp(round([3, 6]), 0, 3) = [3, 3]
    # -> [1, 1]: a group of one sign is clipped (weight groups of 256 straddle 0 in practice)
    assert torch.allclose(quantize_dequantize(torch.tensor([1.0, 2.0]), 2, symmetric=False),
                          torch.tensor([1.0, 1.0]))


def test_groups_follow_the_flattened_layout_and_keep_shape_and_dtype():
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    out = quantize_dequantize(x, 4, group_size=16)
    assert out.shape == x.shape and out.dtype == x.dtype
    rows = torch.stack([quantize_dequantize(r, 4) for r in x.reshape(-1, 16)])
    assert torch.equal(out.reshape(-1, 16), rows)
    assert out.unique().numel() <= 16 * 24  # at most 16 levels per group


def test_more_bits_less_error():
    torch.manual_seed(0)
    x = torch.randn(4096)
    err = {b: float((quantize_dequantize(x, b, 256) - x).abs().mean()) for b in (4, 8)}
    assert err[8] < err[4] / 8  # each extra bit halves the step: 16x in theory


def test_straight_through_gradient():
    x = torch.tensor([1.0, -0.5, 0.3, 0.0], requires_grad=True)
    y = fake_quantize(x, 4)
    assert torch.allclose(y, torch.tensor([1.0, -4 / 7, 2 / 7, 0.0]))
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # identity in the backward pass


def test_fake_quant_linear_forward_and_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    spec = QuantSpec(weight_bits=4, act_bits=4, weight_group_size=16, act_group_size=8, act_topk=1)
    q = FakeQuantLinear.from_linear(lin, spec)
    assert q.weight is lin.weight and q.bias is lin.bias
    x = torch.randn(5, 8, requires_grad=True)
    y = q(x)
    wq = quantize_dequantize(lin.weight, 4, 16, symmetric=False)
    xq = quantize_dequantize(x, 4, 8, symmetric=True, topk=1)
    assert torch.allclose(y, xq @ wq.T + lin.bias)
    g = torch.randn(5, 4)
    y.backward(g)
    assert torch.allclose(x.grad, g @ wq)  # STE through the activations, the rounded weight used
    assert torch.allclose(lin.weight.grad, g.T @ xq)  # the rounded activations used
    assert torch.allclose(lin.bias.grad, g.sum(0))


def test_swap_on_the_gpt_keeps_parameters_and_rng():
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    idx = torch.randint(0, 13, (4, 8))
    with torch.no_grad():
        ref = model(idx, idx)[1]
    rng = torch.get_rng_state()
    names = fake_quantize_linears(model, quant_spec("int8"), exclude=("head",))
    assert torch.equal(rng, torch.get_rng_state())
    assert names == ["blocks.0.qkv", "blocks.0.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]
    assert type(model.head) is nn.Linear and model.head.weight is model.wte.weight
    assert list(model.parameters()) == params
    sd = model.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in sd)
    with torch.no_grad():
        q8 = model(idx, idx)[1]
    assert q8 != ref and abs(float(q8 - ref)) < 0.01
    fake_quantize_linears(model, quant_spec("int4"))  # already swapped: nothing happens
    assert isinstance(model.blocks[0].qkv, FakeQuantLinear) and model.blocks[0].qkv.spec.weight_bits == 8


def test_presets_and_errors():
    assert list(QUANT_PRESETS) == ["none", "int8", "int4"]
    assert quant_spec("none") is None
    s = quant_spec("int4", group_size=64)
    assert (s.weight_bits, s.act_bits, s.weight_group_size, s.act_group_size, s.act_topk) == (4, 4, 64, 64, 2)
    assert not s.weight_symmetric and s.act_symmetric
    with pytest.raises(ValueError, match="unknown quantisation 'fp4'; valid choices: none, int8, int4"):
        quant_spec("fp4")
    with pytest.raises(ValueError, match="weight_bits=1 must be an integer in"):
        QuantSpec(weight_bits=1)
    with pytest.raises(ValueError, match="act_topk=4 must be smaller than act_group_size=4"):
        QuantSpec(act_group_size=4, act_topk=4)
    with pytest.raises(ValueError, match="topk=1 must be >= 0, and 0 for asymmetric"):
        quantize_dequantize(torch.ones(4), 4, symmetric=False, topk=1)
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        fake_quantize_linears(nn.Linear(2, 2), "int4")  # type: ignore[arg-type]

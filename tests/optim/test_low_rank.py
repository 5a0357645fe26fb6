"""GaLore / Q-GaLore declare their group keys and never run silently as AdamW: projected groups
from a model (low_rank_groups), from the constructor's rank= (the Hugging Face path), from
add_param_group; a construction with nothing projected refuses."""

import inspect
import warnings

import pytest
import torch
from torch import nn

from poise.optim import AdamW, GaLoreAdamW, QGaLoreAdamW, low_rank_groups

LOW_RANK = [GaLoreAdamW, QGaLoreAdamW]


class Tiny(nn.Module):
    """Embedding, two linear layers, a norm and an LM head tied to the embedding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.up = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.down = nn.Linear(12, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.down(self.norm(torch.tanh(self.up(self.emb(x))))))


def _train(model, opt, steps=6):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("cls", LOW_RANK)
def test_group_keys_are_declared_and_are_the_constructor_defaults(cls):
    sig = inspect.signature(cls.__init__).parameters
    assert set(cls.group_keys) >= {"rank", "update_proj_gap", "scale", "proj_type"}
    assert cls.group_keys["rank"] is None
    for k, v in cls.group_keys.items():
        assert sig[k].kind is inspect.Parameter.KEYWORD_ONLY and sig[k].default == v, k


def test_low_rank_groups_takes_the_linear_weights():
    m = Tiny()
    proj, plain = low_rank_groups(m, 4, update_proj_gap=50, scale=0.25)
    # the tied head is the embedding: left out with it; biases and the norm are 1-D
    assert proj["param_names"] == ["up.weight", "down.weight"]
    assert {k: proj[k] for k in ("rank", "update_proj_gap", "scale")} == {"rank": 4, "update_proj_gap": 50,
                                                                          "scale": 0.25}
    assert plain["param_names"] == ["emb.weight", "up.bias", "norm.weight", "norm.bias", "down.bias"]
    assert "rank" not in plain
    # Hugging Face's optim_target_modules rule: a list matches names containing an entry
    (proj, _) = low_rank_groups(m, 4, target=["down"])
    assert proj["param_names"] == ["down.weight"]
    (proj, _) = low_rank_groups(m, 4, target=r"emb|up")  # a string is a regex for the whole name
    assert proj["param_names"] == ["emb.weight", "up.weight"]  # an embedding when targeted
    (proj, _) = low_rank_groups(m, 8, min_dim=8)  # up is 12x8, down 8x12: smaller side 8
    assert proj["param_names"] == ["up.weight", "down.weight"]
    with pytest.raises(ValueError, match="no 2-D parameter to project"):
        low_rank_groups(m, 8, min_dim=9)
    with pytest.raises(ValueError, match="target='attn' matches no module; module names include: "):
        low_rank_groups(m, 4, target="attn")
    with pytest.raises(ValueError, match="unknown group key 'update_gap'; valid: update_proj_gap, scale"):
        low_rank_groups(m, 4, update_gap=3)
    # from named parameters (no modules): every 2-D tensor, names as given
    proj, plain = low_rank_groups(list(m.named_parameters()), 4, names=False)
    assert len(proj["params"]) == 3 and "param_names" not in proj


@pytest.mark.parametrize("cls", LOW_RANK)
def test_recipe_style_construction_projects_and_differs_from_adamw(cls):
    a = Tiny()
    opt = cls(low_rank_groups(a, 4, update_proj_gap=2), lr=1e-2)
    s = opt.projected_summary()
    assert [d["projected_tensors"] for d in s] == [2, 0]
    assert s[0]["projected_names"] == ["up.weight", "down.weight"] and s[0]["projected_shapes"] == [[12, 8], [8, 12]]
    projected = _train(a, opt)
    b = Tiny()
    with pytest.warns(UserWarning, match="would run as plain AdamW"):
        unprojected = _train(b, cls(b.parameters(), lr=1e-2, allow_unprojected=True))
    assert not torch.allclose(projected, unprojected)


@pytest.mark.parametrize("cls", LOW_RANK)
def test_no_projected_group_refuses(cls):
    m = Tiny()
    with pytest.raises(ValueError, match=rf"{cls.__name__}: no parameter is projected .* would run as plain AdamW\. "
                                         r"Pass rank=<r> .*low_rank_groups"):
        cls(m.parameters(), lr=1e-2)
    # a rank group that holds only 1-D tensors projects nothing either
    with pytest.raises(ValueError, match="would run as plain AdamW"):
        cls([{"params": [m.up.bias, m.norm.weight], "rank": 4}])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cls(m.parameters(), allow_unprojected=True)
    assert len(w) == 1 and "plain AdamW" in str(w[0].message)


def test_allow_unprojected_galore_is_exactly_hf_adamw():
    # the silent failure the refusal prevents: without rank groups GaLore is HF-style AdamW
    a, b = Tiny(), Tiny()
    with pytest.warns(UserWarning):
        ga = _train(a, GaLoreAdamW(a.parameters(), lr=1e-2, allow_unprojected=True))
    ad = _train(b, AdamW(b.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.0, convention="hf"))
    assert torch.equal(ga, ad)  # the same kernel, bit for bit
    c = Tiny()
    chain = _train(c, AdamW(c.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.0, convention="hf", fused=False))
    torch.testing.assert_close(ga, chain, rtol=1e-5, atol=1e-6)  # and the chain, to rounding


@pytest.mark.parametrize("cls", LOW_RANK)
def test_rank_keyword_projects_every_matrix_of_groups_without_rank(cls):
    m = Tiny()
    # Hugging Face's groups: decay / no decay, no rank of their own
    decay = [p for n, p in m.named_parameters() if "bias" not in n and "norm" not in n]
    no_decay = [p for n, p in m.named_parameters() if "bias" in n or "norm" in n]
    own = nn.Linear(3, 5)
    opt = cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0},
               {"params": [own.weight], "rank": 2, "scale": 0.5}, {"params": [own.bias], "rank": None}],
              lr=1e-2, rank=4, update_proj_gap=7)
    s = opt.projected_summary()
    by_rank = [(d["rank"], d["projected_tensors"], d["tensors"]) for d in s]
    # decay (3 matrices: emb, up, down) -> projected; no-decay (1-D) untouched; own rank kept; rank None plain
    assert by_rank == [(4, 3, 3), (None, 0, 4), (2, 1, 1), (None, 0, 1)]
    assert opt.param_groups[0]["weight_decay"] == 0.1  # the group's own settings travel with the split
    assert opt.param_groups[0]["update_proj_gap"] == 7 and opt.param_groups[2]["update_proj_gap"] == 7
    assert opt.param_groups[2]["scale"] == 0.5 and opt.param_groups[0]["scale"] == cls.group_keys["scale"]
    assert "rank" not in opt.param_groups[1]


@pytest.mark.parametrize("cls", LOW_RANK)
def test_add_param_group_with_rank_is_defaulted_and_checked(cls):
    m = Tiny()
    opt = cls(low_rank_groups(m, 4, names=False), lr=1e-2)
    extra = nn.Linear(6, 10)
    opt.add_param_group({"params": [extra.weight, extra.bias], "rank": 8})
    g = opt.param_groups[-1]
    for k, v in cls.group_keys.items():
        if k != "rank":
            assert g[k] == v, k
    with pytest.raises(ValueError, match=r"param_groups\[3\]\.proj_type='middle'; valid choices: std, reverse_std"):
        opt.add_param_group({"params": [nn.Linear(2, 2).weight], "rank": 2, "proj_type": "middle"})
    with pytest.raises(ValueError, match=r"param_groups\[3\]\.rank=0 must be an integer >= 1"):
        opt.add_param_group({"params": [nn.Linear(2, 2).weight], "rank": 0})
    x = torch.randn(3, 6)
    opt.zero_grad()
    extra(x).sum().backward()
    before = extra.weight.detach().clone()
    opt.step()
    assert opt.projected_summary()[2]["projected_shapes"] == [[10, 6]]
    assert "galore.proj" in opt.state[extra.weight] or "galore.proj_codes" in opt.state[extra.weight]
    assert not torch.equal(before, extra.weight)


def test_add_param_group_without_rank_follows_the_constructor_rank():
    w, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.zeros(4))
    opt = GaLoreAdamW([nn.Parameter(torch.randn(5, 5))], rank=2)
    opt.add_param_group({"params": [w, b]})
    assert [(g.get("rank"), len(g["params"])) for g in opt.param_groups] == [(2, 1), (2, 1), (None, 1)]


@pytest.mark.parametrize("fused", [True, False])
def test_one_dim_tensor_in_a_rank_group_gets_plain_adamw(fused):
    # GaLore projects matrices only: a bias in a projected group is updated exactly as in a plain group
    # (no scale, no projection); the authors' projector would fail on it
    torch.manual_seed(0)
    w0, b0 = torch.randn(6, 4), torch.randn(4)
    wa, ba = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    wb, bb = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    oa = GaLoreAdamW([{"params": [wa, ba], "rank": 2, "scale": 0.5}], lr=1e-2, weight_decay=0.1, fused=fused)
    ob = GaLoreAdamW([{"params": [wb], "rank": 2, "scale": 0.5}, {"params": [bb]}], lr=1e-2, weight_decay=0.1,
                     fused=fused)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        gw, gb = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
        wa.grad, ba.grad, wb.grad, bb.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        oa.step()
        ob.step()
    assert torch.equal(ba, bb) and torch.equal(wa, wb)
    assert not torch.equal(ba, b0)


def test_qgalore_requantizes_only_projected_matrices():
    m = Tiny()
    opt = QGaLoreAdamW(m.parameters(), lr=1e-2, rank=4, weight_bits=4)
    _train(m, opt, steps=2)
    # 4-bit weights: at most 16 distinct values in a group of 256 entries (up.weight has 96)
    assert m.up.weight.detach().unique().numel() <= 16
    b = Tiny()
    _train(b, QGaLoreAdamW(b.parameters(), lr=1e-2, rank=4, weight_bits=0), steps=2)
    assert b.up.weight.detach().unique().numel() > 16  # the check above can fail: without requantization
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.proj_bits=9 is out of range"):
        QGaLoreAdamW(m.parameters(), rank=4, proj_bits=9)

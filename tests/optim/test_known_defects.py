"""Known defects of the peers and of the authors' code (shared/research/optim.md) are
tests here: poise must not have them."""

import io

import pytest
import torch

from poise.optim import SOAP, GaLoreAdamW, StableSPAM
from poise.transforms import merge_dims


def test_soap_merge_dims_on_a_square_weight():
    # pytorch-optimizer 4.1.0 crashes: "shape '[1]' is invalid for input of size 1024"
    assert merge_dims((32, 32), 10000) == [1024]
    assert merge_dims((20000, 64), 10000) == [20000, 64]
    assert merge_dims((8, 4, 3, 3), 20) == [8, 12, 3]
    w = torch.nn.Parameter(torch.randn(32, 32))
    opt = SOAP([w], merge_dims=True, precondition_frequency=2)
    for _ in range(5):
        w.grad = torch.randn(32, 32)
        opt.step()
    assert opt.state[w]["soap.GG0"].shape == (1024, 1024)
    assert torch.isfinite(w).all()


def test_stable_spam_reset_schedule_survives_state_dict():
    # The authors keep the global step in an attribute that state_dict drops: a resumed run
    # restarts its reset phase. Here a resume across a reset boundary is exact.
    def run(split):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 4))
        opt = StableSPAM([p], update_proj_gap=4, total_T=20)
        g = torch.Generator().manual_seed(1)
        for t in range(14):
            if t == split:
                sd = opt.state_dict()
                opt = StableSPAM([p], update_proj_gap=4, total_T=20)
                opt.load_state_dict(sd)
            p.grad = torch.randn(5, 4, generator=g)
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(split=-1), run(split=6))


def test_float32_state_of_bfloat16_params_is_not_downcast_on_load():
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    opt = SOAP([p], precondition_frequency=2)
    for _ in range(3):
        p.grad = torch.randn(6, 4, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[p]["soap.exp_avg_sq"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = SOAP([p], precondition_frequency=2)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    st = opt2.state[p]
    assert st["soap.exp_avg_sq"].dtype == torch.float32  # torch.optim would cast to bf16
    assert st["soap.Q0"].dtype == torch.float32 and st["step"].dtype == torch.float32


def test_galore_on_a_four_dimensional_parameter():
    # galore-torch's GaLoreProjectorTensor raises a TypeError in its constructor
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3, "scale": 0.25}])
    before = w.detach().clone()
    for _ in range(4):
        w.grad = torch.randn_like(w)
        opt.step()
    assert w.shape == (8, 4, 3, 3) and not torch.equal(w, before)
    # viewed as (8, 36): m < n, so std projects from the left and the moments are 2 x 36
    assert opt.state[w]["galore.inner.exp_avg"].shape == (2, 36)


def test_galore_state_is_plain_tensors():
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}])
    w.grad = torch.randn(6, 4)
    opt.step()
    assert all(isinstance(v, torch.Tensor) for v in opt.state[w].values())


@pytest.mark.parametrize("bad, match", [
    (dict(precondition_frequency=0), "precondition_frequency=0 must be an integer >= 1"),
    (dict(shampoo_beta=1.5), r"shampoo_beta=1.5 is out of range; valid: \[0.0, 1.0\)"),
    (dict(data_format="NHWC"), "data_format='NHWC'; valid choices: channels_first, channels_last"),
])
def test_soap_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], **bad)


def test_galore_bad_group_settings():
    with pytest.raises(ValueError, match=r"param_groups\[0\].proj_type='diag'; valid choices: std"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2, "proj_type": "diag"}])
    with pytest.raises(ValueError, match=r"param_groups\[0\].rank=0 must be an integer >= 1"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 0}])

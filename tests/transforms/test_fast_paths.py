"""Every fast path equals the readable reference it replaces (torch's
test_foreach_matches_forloop idea): fused kernels vs chains, foreach vs per-tensor."""

import pytest
import torch

from poise.optim import SPAM, AdamW, GaLoreAdamW, StableSPAM, TransformOptimizer
from poise.transforms import add_decayed_weights, chain, fused_adamw, scale_by_adam, scale_by_learning_rate
from tests.optim._replay import replay_pair

SHAPES = [(24, 16), (16,), (8, 24), (8, 4, 3, 3)]
TOL = 1e-6  # same arithmetic, different kernels: rounding only


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fused_adamw_equals_chain_and_torch(wd):
    err = replay_pair(SHAPES, lambda ps: AdamW(ps, lr=1e-2, weight_decay=wd, fused=True),
                      lambda ps: AdamW(ps, lr=1e-2, weight_decay=wd, fused=False))
    assert err <= TOL
    err = replay_pair(SHAPES, lambda ps: AdamW(ps, lr=1e-2, weight_decay=wd),
                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=wd))
    assert err <= TOL


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_hf_adamw_equals_chain(wd, dtype):
    """HF AdamW (eps inside sqrt(bc2), decay after the update) through torch's kernel."""
    err = replay_pair(SHAPES, lambda ps: AdamW(ps, lr=1e-2, weight_decay=wd, convention="hf", fused=True),
                      lambda ps: AdamW(ps, lr=1e-2, weight_decay=wd, convention="hf", fused=False), dtype=dtype)
    assert err <= (TOL if dtype == torch.float32 else 1e-12)


def test_fused_hf_adamw_without_bias_correction_takes_the_chain():
    def opt(fused):
        return lambda ps: TransformOptimizer(ps, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, correct_bias=False),
                                             chain(fused_adamw("hf")) if fused else
                                             chain(scale_by_adam("hf"), scale_by_learning_rate(),
                                                   add_decayed_weights("after")))
    assert replay_pair(SHAPES, opt(True), opt(False)) <= TOL


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, warmup_steps=4, DeltaT=8, grad_accu_steps=2,
                                              threshold=5.0)])
def test_fused_spam_equals_chain(kw):
    """Resets, warm-up factors below 1, clipping and decay all happen inside the 25 steps."""
    err = replay_pair(SHAPES, lambda ps: SPAM(ps, lr=1e-2, fused=True, **kw),
                      lambda ps: SPAM(ps, lr=1e-2, fused=False, **kw), steps=25, spikes=((7, 0, 50.0), (11, 2, 80.0)))
    assert err <= TOL


@pytest.mark.parametrize("kw", [dict(), dict(total_T=15, update_proj_gap=6), dict(weight_decay=0.1, update_proj_gap=5,
                                                                              reset_semantics="clean")])
def test_fused_stable_spam_equals_chain(kw):
    err = replay_pair(SHAPES, lambda ps: StableSPAM(ps, fused=True, **kw), lambda ps: StableSPAM(ps, fused=False, **kw),
                      steps=20, spikes=((7, 0, 50.0), (11, 2, 80.0)))
    assert err <= TOL


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fused_galore_equals_chain(proj_type, wd):
    def groups(ps):
        return [{"params": [ps[0], ps[2], ps[3]], "rank": 3, "update_proj_gap": 5, "scale": 0.5,
                 "proj_type": proj_type}, {"params": [ps[1]]}]

    err = replay_pair(SHAPES, lambda ps: GaLoreAdamW(groups(ps), lr=1e-2, weight_decay=wd, fused=True),
                      lambda ps: GaLoreAdamW(groups(ps), lr=1e-2, weight_decay=wd, fused=False), steps=15)
    assert err <= TOL


@pytest.mark.parametrize("convention", ["torch", "hf"])
def test_foreach_adam_equals_per_tensor(convention):
    def opt(foreach):
        return lambda ps: TransformOptimizer(
            ps, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8),
            chain(scale_by_adam(convention, foreach=foreach), scale_by_learning_rate()))

    assert replay_pair(SHAPES, opt(True), opt(False)) <= TOL

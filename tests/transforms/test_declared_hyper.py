"""Transforms declare the hyper keys they read: a missing required key fails at construction
(naming the stage and the key), two meanings of one key cannot be chained without an alias,
and an alias composes GaLore's refresh with a momentum reset on two independent intervals."""

import copy

import pytest
import torch

from poise import _registry
from poise.optim import TransformOptimizer
from poise.transforms import (
    REQUIRED,
    Transform,
    apply_updates,
    chain,
    clip_by_global_norm,
    clip_spikes_by_max_ema,
    declare,
    ignore_top_k,
    periodic_reset,
    project_low_rank,
    rename,
    scale_by_adam,
    scale_by_classp,
    scale_by_learning_rate,
    spam,
)
from tests.conformance.test_optimizers import batch, make, model, small_kw


def _readme_chain():
    return chain(clip_by_global_norm(), scale_by_adam(), scale_by_learning_rate(), ignore_top_k(0.05))


def test_readme_chain_without_max_norm_fails_at_construction():
    m = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError) as e:
        TransformOptimizer(m.parameters(), dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8), _readme_chain())
    assert str(e.value) == "stage 'clip_global_norm' reads hyper 'max_norm': add it to defaults or the param group"
    # the README's own line, with max_norm, builds and steps
    opt = TransformOptimizer(m.parameters(), dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, max_norm=1.0),
                             _readme_chain())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()


def test_spike_clipping_without_gamma3_fails_at_construction():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="^stage 'clip_spikes_by_max_ema' reads hyper 'gamma3': add it to defaults "
                                         "or the param group$"):
        TransformOptimizer([w], dict(lr=1e-3), chain(clip_spikes_by_max_ema(), scale_by_learning_rate()))
    # given in the param group instead of the defaults: fine
    TransformOptimizer([{"params": [w], "gamma3": 0.999}], dict(lr=1e-3),
                       chain(clip_spikes_by_max_ema(), scale_by_learning_rate()))


def test_add_param_group_checks_and_fills_the_same_way():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = TransformOptimizer([{"params": [a], "max_norm": 1.0}], dict(lr=0.1),
                             chain(clip_by_global_norm(), scale_by_adam(), scale_by_learning_rate()))
    with pytest.raises(ValueError, match="stage 'clip_global_norm' reads hyper 'max_norm'"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1  # the refused group was not added
    opt.add_param_group({"params": [b], "max_norm": 2.0})
    # declared defaults of scale_by_adam filled in: betas (0.9, 0.999), eps 1e-8
    assert opt.param_groups[1]["betas"] == (0.9, 0.999) and opt.param_groups[1]["eps"] == 1e-8


def test_declared_defaults_make_a_working_adam():
    # first Adam step (torch convention): m_hat = g, v_hat = g^2, so u = -lr g / (|g| + eps):
    # g = 2, lr = 0.1 -> p = 1 - 0.1 * 2 / (2 + 1e-8) = 0.9 (to 1e-9)
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = TransformOptimizer([w], dict(lr=0.1), chain(scale_by_adam(), scale_by_learning_rate()))
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    assert abs(float(w.detach()) - 0.9) < 1e-9


def test_functional_apply_updates_checks_too():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="stage 'ignore_k' reads hyper 'ignore_k'"):
        apply_updates(chain(ignore_top_k()), [p], [torch.ones(3)], None, {})


def test_two_meanings_of_one_key_cannot_be_chained():
    with pytest.raises(ValueError) as e:
        chain(project_low_rank(scale_by_adam("hf")), periodic_reset(scale_by_adam()), scale_by_learning_rate())
    msg = str(e.value)
    for part in ("'galore'", "'periodic_reset'", "'update_proj_gap'", "rename(", "key='reset_gap'"):
        assert part in msg, msg
    with pytest.raises(ValueError, match="stages 'spam' and 'classp' both read hyper 'threshold' with different "
                                         "meanings"):
        chain(spam(scale_by_adam("hf")), scale_by_classp())
    # the same key with the same meaning is shared, not an error (lr read by two stages)
    chain(scale_by_adam(), scale_by_learning_rate(), scale_by_learning_rate())


def test_same_meaning_with_two_defaults_is_an_error():
    def stage(name, default):
        return Transform(lambda p, h: {}, lambda u, s, p, h: u, name, True,
                         declare(name, gap=(default, "some interval")))

    assert chain(stage("a", REQUIRED), stage("b", 5)).reads["gap"].default == 5
    with pytest.raises(ValueError, match="stages 'a' and 'b' both read hyper 'gap' .* different defaults"):
        chain(stage("a", 3), stage("b", 5))


def _galore_with_reset(gap_key):
    return chain(project_low_rank(periodic_reset(scale_by_adam("hf"), key=gap_key)), scale_by_learning_rate())


def _schedule(update_proj_gap, reset_gap, steps=12):
    """Clocks at which GaLore refreshed its projector, and at which the momentum was reset."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = TransformOptimizer([{"params": [w], "rank": 2, "update_proj_gap": update_proj_gap,
                               "reset_gap": reset_gap}], dict(lr=1e-2), _galore_with_reset("reset_gap"))
    refreshes, resets = [], []
    for t in range(1, steps + 1):
        w.grad = torch.randn(6, 4)
        opt.step()
        st = opt.state[w]
        if float(st["galore.refreshed"]):
            refreshes.append(t)
        if int(st["step"]) == 1 and t > 1:  # a reset sets the bias-correction step back to 1
            resets.append(t)
    return refreshes, resets


def test_alias_composes_galore_and_periodic_reset_with_independent_intervals():
    t = _galore_with_reset("reset_gap")
    assert t.reads["update_proj_gap"].meaning != t.reads["reset_gap"].meaning
    # refresh every 3 steps of the clock (1, 4, 7, 10), reset every 5 (5, 10)
    assert _schedule(3, 5) == ([1, 4, 7, 10], [5, 10])
    # each interval moves only its own schedule
    assert _schedule(3, 4) == ([1, 4, 7, 10], [4, 8, 12])
    assert _schedule(5, 5) == ([1, 6, 11], [5, 10])


def test_rename_aliases_any_declared_key():
    # CLASSP's gate under its own key beside SPAM's spike threshold
    t = chain(rename(scale_by_classp(), threshold="gate_threshold"), spam(scale_by_adam("hf")),
              scale_by_learning_rate())
    assert t.reads["gate_threshold"].meaning.startswith("CLASSP")
    assert t.reads["threshold"].meaning.startswith("SPAM")

    def moved(gate):
        w = torch.nn.Parameter(torch.ones(4))
        opt = TransformOptimizer([w], dict(lr=0.1, gate_threshold=gate, threshold=5000.0), t)
        w.grad = torch.full((4,), 0.5)  # g^2 = 0.25
        opt.step()
        return not torch.equal(w.detach(), torch.ones(4))

    # the gate reads gate_threshold: 0.25 > 0.1 lets the update through, 0.25 > 1.0 does not
    assert moved(0.1) and not moved(1.0)
    with pytest.raises(ValueError, match="rename: 'classp' reads no hyper 'thresh'; valid: threshold, epsilon"):
        rename(scale_by_classp(), thresh="x")


def test_load_state_dict_fills_keys_missing_from_an_older_checkpoint():
    w = torch.nn.Parameter(torch.ones(3))
    opt = TransformOptimizer([w], dict(lr=0.1), chain(scale_by_adam(), scale_by_learning_rate()))
    w.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:  # as saved before 'betas'/'eps' were declared defaults
        del g["betas"], g["eps"]
    opt2 = TransformOptimizer([w], dict(lr=0.1), chain(scale_by_adam(), scale_by_learning_rate()))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)
    opt2.step()


class _Recorder(dict):
    """A param group that records every key read from it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = set()

    def __getitem__(self, k):
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.seen.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.seen.add(k)
        return super().__contains__(k)


@pytest.mark.parametrize("name", _registry.names("optimizer"))
def test_every_key_a_registered_optimizer_reads_is_declared(name):
    # the declaration is the contract: a stage reading an undeclared key would again fail only at step()
    m = model()
    opt = make(name, m.parameters(), lr=1e-2, **small_kw(name))
    opt.param_groups[:] = [_Recorder(g) for g in opt.param_groups]
    for t in range(6):
        x, y = batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    declared = set(opt.transform.reads) | set(getattr(_registry.get("optimizer", name), "group_keys", {}))
    seen = set().union(*(g.seen for g in opt.param_groups)) - {"params", "param_names"}
    assert seen <= declared, f"{name} reads undeclared hyper keys {sorted(seen - declared)}"
    assert seen, name  # the recorder does see the reads

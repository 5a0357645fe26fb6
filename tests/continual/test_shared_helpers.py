"""One copy each: logits_of / trainable in poise._nn, rank_world in poise.distributed."""

import pytest
import torch
from torch import nn

import poise.continual._base
import poise.measure
import poise.measure.evaluator
from poise._nn import logits_of, trainable
from poise.distributed import rank_world


def test_one_copy_reexported_from_the_old_paths():
    assert poise.measure.logits_of is poise.measure.evaluator.logits_of is logits_of
    assert poise.continual._base.trainable is poise.measure.trainable is trainable


def test_logits_of_and_trainable():
    t = torch.ones(2, 3)

    class Out:
        logits = t

    assert logits_of(t) is t and logits_of(Out()) is t and logits_of((t, None)) is t
    with pytest.raises(TypeError, match="cannot find logits in a model output of type dict"):
        logits_of({"x": t})
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    m[0].weight.requires_grad_(False)
    assert [n for n, _ in trainable(m)] == ["0.bias", "1.weight", "1.bias"]


def test_rank_world_without_a_process_group():
    assert rank_world() == (0, 1) and rank_world(True) == (0, 1) and rank_world(False) == (0, 1)
    with pytest.raises(ValueError, match="shard='yes'; valid choices: 'auto', True, False"):
        rank_world("yes")

import pytest
import torch
from torch import nn

from poise.continual import Batch


@pytest.fixture
def tiny():
    """A small MLP and two tasks of random data (4 classes, classes {0,1} then {2,3})."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(80, 6)
    t0 = Batch(x[:40], torch.randint(0, 2, (40,)))
    t1 = Batch(x[40:], torch.randint(2, 4, (40,)))
    return model, t0, t1


def backward_on(model, batch):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(batch.x), batch.y).backward()

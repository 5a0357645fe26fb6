import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    """The RL objective tests run in float64 (exact identities, gradcheck); restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

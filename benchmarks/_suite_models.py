"""The models of the optimizer benchmark suite (``benchmarks/suite.py``), sized by parameter count.

Three shapes, each built at a target number of parameters by searching its width:

* ``mlp``: ``Linear(w, w) -> ReLU`` three times (three ``w x w`` matrices and their biases);
* ``transformer``: poise's tiny GPT (``poise.models.GPT``: pre-norm blocks, causal attention, tied
  embeddings), 4 layers, 4 heads, width ``d``, vocabulary 256, context 64;
* ``conv``: ``Conv2d(3, c, 3)`` then three ``Conv2d(c, c, 3)`` (ReLU between), global average pool,
  ``Linear(c, 10)``.

Only the parameter tensors matter to an optimizer step (the suite never runs a forward pass): their
shapes decide the work. :func:`low_rank_names` says which tensors GaLore projects (2-D weights of the
model's body, as the GaLore authors project attention and MLP weights; the conv net's filters are
4-D, so there only its head is projected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from poise.models.gpt import GPT, GPTConfig

__all__ = ["SHAPES", "SIZES", "TINY_SIZES", "ModelSpec", "build_spec", "count_params", "low_rank_names"]

SHAPES = ("mlp", "transformer", "conv")
# size name -> target parameter count: each set spans 10x
SIZES = {"S": 300_000, "M": 1_000_000, "L": 3_000_000}
TINY_SIZES = {"S": 5_000, "M": 15_000, "L": 50_000}


def _mlp(w: int) -> nn.Module:
    return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w))


def _transformer(d: int) -> nn.Module:
    return GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=d))


def _conv(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


BUILDERS: dict[str, Callable[[int], nn.Module]] = {"mlp": _mlp, "transformer": _transformer, "conv": _conv}
STEP = 8  # widths are multiples of 8 (the transformer's 4 heads get an even head size)


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


def _count(shape: str, width: int) -> int:
    with torch.device("meta"):
        return count_params(BUILDERS[shape](width))


@dataclass
class ModelSpec:
    """One model of the suite: its shape, size name, width and a builder (seeded, so every
    implementation starts from the same weights)."""

    shape: str
    size: str
    target: int
    width: int
    n_params: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_params = _count(self.shape, self.width)

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return BUILDERS[self.shape](self.width)


def build_spec(shape: str, size: str, target: int) -> ModelSpec:
    """The ``shape`` model whose parameter count is nearest ``target`` (width a multiple of 8)."""
    if shape not in BUILDERS:
        raise ValueError(f"shape={shape!r}; valid choices: {', '.join(BUILDERS)}")
    if not (isinstance(target, int) and target > 0):
        raise ValueError(f"target={target!r} must be a positive number of parameters")
    lo, hi = 1, 1
    while _count(shape, hi * STEP) < target and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the count grows with the width: bisect to the last width below the target
        mid = (lo + hi) // 2
        if _count(shape, mid * STEP) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: abs(_count(shape, k * STEP) - target))
    return ModelSpec(shape, size, target, best * STEP)


def low_rank_names(shape: str, model: nn.Module) -> set[str]:
    """Names of the tensors GaLore projects: the 2-D weights of the model's body (not embeddings)."""
    if shape not in BUILDERS:
        raise ValueError(f"shape={shape!r}; valid choices: {', '.join(BUILDERS)}")
    out = set()
    for name, p in model.named_parameters():
        if p.dim() != 2:
            continue
        if shape == "transformer" and not name.startswith("blocks."):
            continue  # token/position embeddings (the head is tied to the token embedding)
        out.add(name)
    return out

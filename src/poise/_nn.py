"""Small model-output and parameter helpers shared by every package (one copy each).

``logits_of`` is re-exported from :mod:`poise.measure` (and its old home
``poise.measure.evaluator``); ``trainable`` from :mod:`poise.continual._base`. ``scorable`` (which rows
of logits make a prediction) serves the continual evaluator and the editors' measurements.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["logits_of", "scorable", "trainable"]


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, an object with ``.logits`` (Hugging Face),
    or a tuple whose first element is the logits."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs that require grad, in module order (tied parameters once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def scorable(logits: Tensor, keep: Tensor | None = None) -> Tensor:
    """Per row (last dim = classes): no NaN, no ``+inf``, and at least one finite logit among the
    classes ``keep`` marks (a bool mask broadcast against ``logits``; None: every class). ``-inf`` is a
    legitimate "impossible class" mask; an argmax over anything else is no prediction."""
    bad, finite = torch.isnan(logits) | (logits == math.inf), torch.isfinite(logits)
    if keep is not None:
        bad, finite = bad & keep, finite & keep
    return ~bad.any(-1) & finite.any(-1)

"""Small model-output and parameter helpers shared by every package (one copy each).

``logits_of`` is re-exported from :mod:`poise.measure` (and its old home
``poise.measure.evaluator``); ``trainable`` from :mod:`poise.continual._base`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["logits_of", "trainable"]


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

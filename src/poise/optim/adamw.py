"""AdamW as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import COMPLEX_DTYPES, FLOAT_DTYPES, TransformOptimizer
from poise.transforms import add_decayed_weights, chain, fused_adamw, scale_by_adam, scale_by_learning_rate

__all__ = ["AdamW"]


@register("optimizer", "adamw")
class AdamW(TransformOptimizer):
    r"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) =
    ``chain(scale_by_adam(convention), scale_by_learning_rate(), add_decayed_weights(when))``.

    ``convention="torch"`` (default) matches ``torch.optim.AdamW``:
    ``p <- p (1 - lr wd) - lr (m/bc1) / (sqrt(v/bc2) + eps)``.
    ``convention="hf"`` matches the transformers AdamW that SOAP, SPAM and GaLore build on:
    ``p <- p - lr sqrt(bc2)/bc1 m/(sqrt(v)+eps)``, then ``p <- p (1 - lr wd)``.
    Arguments as torch's: ``lr, betas, eps, weight_decay``. ``fused=True`` (default) runs
    ``fused_adamw(convention)``, torch's one-pass kernel (for ``"hf"`` with its eps and decay
    placement mapped onto the kernel's arguments), in place of the three-stage chain it is
    tested equal to; ``fused=False`` runs the chain.

    Complex parameters are stepped as pairs of reals (``torch.view_as_real``), as
    ``torch.optim.AdamW`` does (tested equal to it); integer and bool parameters are refused
    with ``TypeError`` naming the parameter and its dtype.
    """

    shard_safe = True  # every stage is elementwise: a shard's update is the whole tensor's update, sliced
    # every stage is elementwise, so complex as pairs of reals is torch.optim.AdamW exactly
    param_dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES + COMPLEX_DTYPES

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, convention: str = "torch",
                 fused: bool | None = None, nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        if convention not in ("torch", "hf"):
            raise ValueError(f"convention={convention!r}; valid choices: torch, hf")
        if fused is None:
            fused = True
        if fused:
            t = chain(fused_adamw(convention), name="adamw")
        else:
            t = chain(scale_by_adam(convention), scale_by_learning_rate(),
                      add_decayed_weights("before" if convention == "torch" else "after"), name="adamw")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, t, nonfinite, diagnostics, max_consecutive_skips)

"""SPAM as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import add_decayed_weights, chain, scale_by_adam, scale_by_learning_rate
from poise.transforms._spam import spam

__all__ = ["SPAM"]


@register("optimizer", "spam")
class SPAM(TransformOptimizer):
    r"""SPAM (Huang et al., arXiv 2501.06842; TianjinYellow/SPAM-Optimizer) =
    ``chain(spam(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"))``:
    Adam (HF convention) with spike clipping ``g^2 > threshold * v -> sign(g) sqrt(threshold v)``,
    a momentum reset every ``DeltaT`` steps and a cosine warm-up over ``warmup_steps`` after
    each reset (:func:`poise.transforms.spam`). Arguments under the authors' names: ``lr,
    betas, eps, weight_decay, correct_bias, warmup_steps, threshold, DeltaT,
    grad_accu_steps``. Dense only (no ``density`` masks). ``fused=True`` (default) runs the Adam
    step, the warm-up factor, the learning rate and the decay in torch's one-pass fused kernel
    (``spam(..., apply_hf=True)``, tested equal to the chain to float rounding); ``fused=False``
    runs the chain as written."""

    shard_safe = True  # every stage is elementwise: a shard's update is the whole tensor's update, sliced

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, warmup_steps: int = 150,
                 threshold: float = 5000, DeltaT: int = 500, grad_accu_steps: int = 20,  # noqa: N803 (authors' name)
                 nonfinite: str = "raise", diagnostics: bool = False,
                 max_consecutive_skips: int | None = None, fused: bool = True):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        _check.positive_int("warmup_steps", warmup_steps, allow_zero=True)
        _check.positive_int("DeltaT", DeltaT)
        _check.positive_int("grad_accu_steps", grad_accu_steps, allow_zero=True)
        _check.in_range("threshold", threshold, 0.0, float("inf"))
        t = chain(spam(scale_by_adam("hf"), apply_hf=fused), scale_by_learning_rate(), add_decayed_weights("after"),
                  name="spam")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias, warmup_steps=warmup_steps, threshold=threshold,
                                      DeltaT=DeltaT, grad_accu_steps=grad_accu_steps), t,
            nonfinite, diagnostics, max_consecutive_skips)

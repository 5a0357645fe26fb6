"""Probes that compare two versions of a model.

* Negative flips (MUSCLE, Echterhoff et al., EMNLP 2024, arXiv 2407.09435):
  ``NFR = 1/N \\sum_n 1[\\hat y^{old}_n = y_n \\wedge \\hat y^{new}_n \\neq y_n]``, the share of
  samples the old model got right and the new one gets wrong. Positive flips are the
  converse.
* KL drift (the drift metric of "Drift No More? Context Equilibria", arXiv 2510.07777):
  ``D = 1/N \\sum_n KL(p_{ref}(\\cdot|x_n) \\| p(\\cdot|x_n))``, the mean KL divergence from a
  reference model's predictive distribution to the current model's on a probe set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of
from poise._registry import register

__all__ = ["kl_drift", "model_kl_drift", "model_negative_flips", "negative_flip_rate", "positive_flip_rate"]


@register("metric", "negative_flip_rate")
def negative_flip_rate(pred_old: Tensor, pred_new: Tensor, target: Tensor) -> Tensor:
    """Fraction of samples with ``pred_old == target`` and ``pred_new != target``."""
    if not (pred_old.shape == pred_new.shape == target.shape):
        raise ValueError(
            f"shapes differ: old {tuple(pred_old.shape)}, new {tuple(pred_new.shape)}, "
            f"target {tuple(target.shape)}"
        )
    return ((pred_old == target) & (pred_new != target)).float().mean()


@register("metric", "positive_flip_rate")
def positive_flip_rate(pred_old: Tensor, pred_new: Tensor, target: Tensor) -> Tensor:
    """Fraction of samples with ``pred_old != target`` and ``pred_new == target``."""
    return negative_flip_rate(pred_new, pred_old, target)


@register("metric", "kl_drift")
def kl_drift(ref_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over leading dimensions of ``KL(softmax(ref_logits) || softmax(logits))``,
    computed from log-softmax in float64-safe form (0-d tensor)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    lp_ref = F.log_softmax(ref_logits.float(), -1)
    lp = F.log_softmax(logits.float(), -1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean()


def _eval_logits(model: nn.Module, x: Tensor) -> Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return logits_of(model(x))
    finally:
        model.train(was)


def model_negative_flips(old: nn.Module, new: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Negative and positive flip rates of ``new`` against ``old`` on ``(x, y)``."""
    po, pn = _eval_logits(old, x).argmax(-1), _eval_logits(new, x).argmax(-1)
    return {
        "negative_flip_rate": negative_flip_rate(po, pn, y),
        "positive_flip_rate": positive_flip_rate(po, pn, y),
    }


def model_kl_drift(ref: nn.Module, model: nn.Module, x: Tensor) -> Tensor:
    """KL drift of ``model`` from ``ref`` on the probe inputs ``x``."""
    return kl_drift(_eval_logits(ref, x), _eval_logits(model, x))

"""SOAP as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import (
    add_decayed_weights,
    chain,
    normalize_by_rms,
    scale_by_bias_correction,
    scale_by_learning_rate,
    scale_by_soap,
)

__all__ = ["SOAP"]


@register("optimizer", "soap")
class SOAP(TransformOptimizer):
    r"""SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam",
    arXiv 2409.11321), replaying nikhilvyas/SOAP ``soap.py`` (commit a1e5535)::

        chain(scale_by_soap(data_format),          # Q_L (m / (sqrt(v)+eps)) Q_R^T in Shampoo's eigenbasis
              normalize_by_rms(),                  # only if normalize_grads
              scale_by_bias_correction(1),         # sqrt(1-b2^t)/(1-b1^t), t not counting the first call
              scale_by_learning_rate(),
              add_decayed_weights("after"))        # p <- p (1 - lr wd) after the step

    Arguments under the authors' names: ``lr, betas, shampoo_beta`` (-1: ``betas[1]``),
    ``eps, weight_decay, precondition_frequency, max_precond_dim, merge_dims,
    precondition_1d, normalize_grads, data_format, correct_bias``. The first step of each
    parameter only builds its preconditioner (no update), as in the authors' code.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = -1, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False,
                 data_format: str = "channels_first", correct_bias: bool = True, nonfinite: str = "raise",
                 diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        if shampoo_beta != -1:
            _check.in_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
        _check.positive_int("precondition_frequency", precondition_frequency)
        _check.positive_int("max_precond_dim", max_precond_dim)
        parts = [scale_by_soap(data_format)]
        if normalize_grads:
            parts.append(normalize_by_rms())
        parts += [scale_by_bias_correction(step_offset=1), scale_by_learning_rate(), add_decayed_weights("after")]
        super().__init__(params, dict(
            lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
            correct_bias=correct_bias), chain(*parts, name="soap"), nonfinite, diagnostics, max_consecutive_skips)

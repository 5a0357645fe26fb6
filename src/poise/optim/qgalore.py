"""Q-GaLore-AdamW as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import (
    add_decayed_weights,
    chain,
    project_low_rank,
    scale_by_adam,
    scale_by_learning_rate,
)
from poise.transforms._lowrank import PROJ_TYPES, dequantize, quantize

__all__ = ["QGaLoreAdamW"]


@register("optimizer", "qgalore_adamw")
class QGaLoreAdamW(TransformOptimizer):
    r"""Q-GaLore-AdamW (Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients", arXiv 2407.08296; VITA-Group/Q-GaLore) =
    ``chain(project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"))``
    with, per projected group: the projector kept as INT4 codes (``proj_bits=4``,
    ``proj_group_size=256``), the layer-adaptive refresh (``cos_threshold=0.4``,
    ``gamma_proj=2``, ``queue_size=5``), and after each step the weights requantized to
    INT8 (``weight_bits=8``, ``weight_group_size=256``) with stochastic rounding
    (``stochastic_round=True``; generator seeded by ``seed`` and the step, so runs and
    resumes are reproducible).

    Departures: the weights stay float tensors holding INT8-grid values (the authors store
    uint8 in a custom Linear layer; this optimizer works on any module but does not save
    the weight memory), and Adam's moments are float32, not bitsandbytes 8-bit.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, seed: int = 0, nonfinite: str = "raise",
                 diagnostics: bool = False,
                 max_consecutive_skips: int | None = None):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        t = chain(project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"),
                  name="qgalore_adamw")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), t,
                         nonfinite, diagnostics, max_consecutive_skips)
        self.seed = seed
        for i, g in enumerate(self.param_groups):
            if "rank" not in g:
                continue
            _check.positive_int(f"param_groups[{i}].rank", g["rank"])
            for key, default in (("update_proj_gap", 200), ("scale", 0.25), ("proj_type", "std"), ("proj_bits", 4),
                                 ("proj_group_size", 256), ("cos_threshold", 0.4), ("gamma_proj", 2),
                                 ("queue_size", 5), ("weight_bits", 8), ("weight_group_size", 256),
                                 ("stochastic_round", True)):
                g.setdefault(key, default)
            if g["proj_type"] not in PROJ_TYPES:
                raise ValueError(f"param_groups[{i}].proj_type={g['proj_type']!r}; "
                                 f"valid choices: {', '.join(PROJ_TYPES)}")
            _check.positive_int(f"param_groups[{i}].proj_bits", g["proj_bits"])
            _check.positive_int(f"param_groups[{i}].weight_bits", g["weight_bits"], allow_zero=True)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            bits = group.get("weight_bits", 0)
            if "rank" not in group or not bits:
                continue
            for p in group["params"]:
                if p.grad is None or p.dim() < 2 or "clock" not in self.state[p]:
                    continue
                gen = torch.Generator(device=p.device).manual_seed(
                    self.seed * 1_000_003 + int(self.state[p]["clock"]) * 7919 + p.numel())
                codes, scale, lo = quantize(p, bits, group["weight_group_size"], group["stochastic_round"], gen)
                p.copy_(dequantize(codes, scale, lo, p.shape, p.dtype))
        return loss

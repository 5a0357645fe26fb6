"""Q-GaLore-AdamW as a chain of transforms."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import _is_dtensor, _local_shard
from poise.optim._lowrank import LowRankOptimizer
from poise.transforms import (
    add_decayed_weights,
    chain,
    project_low_rank,
    scale_by_adam,
    scale_by_learning_rate,
)
from poise.transforms._lowrank import dequantize, quantize

__all__ = ["QGaLoreAdamW"]


@register("optimizer", "qgalore_adamw")
class QGaLoreAdamW(LowRankOptimizer):
    r"""Q-GaLore-AdamW (Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and
    Layer-Adaptive Low-Rank Gradients", arXiv 2407.08296; VITA-Group/Q-GaLore) =
    ``chain(project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"))``
    with, per projected group: the projector kept as INT4 codes (``proj_bits=4``,
    ``proj_group_size=256``), the layer-adaptive refresh (``cos_threshold=0.4``,
    ``gamma_proj=2``, ``queue_size=5``), and after each step the weights requantized to
    INT8 (``weight_bits=8``, ``weight_group_size=256``) with stochastic rounding
    (``stochastic_round=True``; generator seeded by ``seed`` and the step, so runs and
    resumes are reproducible).

    Projected groups work as :class:`~poise.optim.GaLoreAdamW`'s: groups with ``rank``; the
    group keys (``group_keys``: GaLore's ``rank, update_proj_gap, scale=0.25, proj_type`` and
    the ones above) are also keyword arguments, defaults for every projected group, and
    ``rank=<r>`` projects every tensor of 2 or more dims of the groups that set no rank.
    No projected tensor raises ``ValueError`` unless ``allow_unprojected=True`` (a warning).

    Departures: the weights stay float tensors holding INT8-grid values (the authors store
    uint8 in a custom Linear layer; this optimizer works on any module but does not save
    the weight memory), and Adam's moments are float32, not bitsandbytes 8-bit.
    """

    shard_safe = False  # needs whole tensors (projections, bases or norms): DTensor parameters are gathered
    group_keys: ClassVar[dict[str, Any]] = {
        "rank": None, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "proj_bits": 4,
        "proj_group_size": 256, "cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5, "weight_bits": 8,
        "weight_group_size": 256, "stochastic_round": True}

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, seed: int = 0, nonfinite: str = "raise",
                 diagnostics: bool = False,
                 max_consecutive_skips: int | None = None, *, rank: int | None = None, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", proj_bits: int = 4, proj_group_size: int = 256,
                 cos_threshold: float | None = 0.4, gamma_proj: float = 2, queue_size: int = 5, weight_bits: int = 8,
                 weight_group_size: int = 256, stochastic_round: bool = True, allow_unprojected: bool = False):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        self._init_low_rank(dict(
            rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, proj_bits=proj_bits,
            proj_group_size=proj_group_size, cos_threshold=cos_threshold, gamma_proj=gamma_proj,
            queue_size=queue_size, weight_bits=weight_bits, weight_group_size=weight_group_size,
            stochastic_round=stochastic_round))
        self.seed = seed
        t = chain(project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"),
                  name="qgalore_adamw")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), t,
                         nonfinite, diagnostics, max_consecutive_skips)
        self._refuse_unprojected(allow_unprojected)

    def _validate_group(self, g: dict[str, Any], where: str) -> None:
        super()._validate_group(g, where)
        _check.positive_int(f"{where}.proj_bits", g["proj_bits"])
        _check.in_range(f"{where}.proj_bits", g["proj_bits"], 1, 8, hi_open=False)
        _check.positive_int(f"{where}.weight_bits", g["weight_bits"], allow_zero=True)
        _check.in_range(f"{where}.weight_bits", g["weight_bits"], 0, 8, hi_open=False)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            bits = group.get("weight_bits", 0)
            if group.get("rank") is None or not bits:
                continue
            for p in group["params"]:
                if p.grad is None or p.dim() < 2 or p.numel() == 0 or "clock" not in self.state.get(p, {}):
                    continue
                gen = torch.Generator(device=p.device).manual_seed(
                    self.seed * 1_000_003 + int(self.state[p]["clock"]) * 7919 + p.numel())
                # an FSDP2 shard is requantized as part of its whole tensor (groups span shard borders;
                # every rank draws the same stochastic rounding), then keeps its own slice
                full = p.full_tensor() if _is_dtensor(p) else p
                codes, scale, lo = quantize(full, bits, group["weight_group_size"], group["stochastic_round"], gen)
                new = dequantize(codes, scale, lo, full.shape, full.dtype)
                if _is_dtensor(p):
                    p.to_local().copy_(_local_shard(new, p))
                else:
                    p.copy_(new)
        return loss

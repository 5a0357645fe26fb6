"""SPAM, CLASSP, FRUGAL and Q-GaLore-AdamW as chains of transforms."""

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
from poise.transforms._frugal import MODES, RULES, split_frugal
from poise.transforms._lowrank import PROJ_TYPES, dequantize, quantize
from poise.transforms._spam import spam
from poise.transforms._sparse import scale_by_classp

__all__ = ["CLASSP", "FRUGAL", "SPAM", "QGaLoreAdamW"]


@register("optimizer", "spam")
class SPAM(TransformOptimizer):
    r"""SPAM (Huang et al., arXiv 2501.06842; TianjinYellow/SPAM-Optimizer) =
    ``chain(spam(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"))``:
    Adam (HF convention) with spike clipping ``g^2 > threshold * v -> sign(g) sqrt(threshold v)``,
    a momentum reset every ``DeltaT`` steps and a cosine warm-up over ``warmup_steps`` after
    each reset (:func:`poise.transforms.spam`). Arguments under the authors' names: ``lr,
    betas, eps, weight_decay, correct_bias, warmup_steps, threshold, DeltaT,
    grad_accu_steps``. Dense only (no ``density`` masks)."""

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, warmup_steps: int = 150,
                 threshold: float = 5000, DeltaT: int = 500, grad_accu_steps: int = 20,  # noqa: N803 (authors' name)
                 nonfinite: str = "raise", diagnostics: bool = False):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        _check.positive_int("warmup_steps", warmup_steps, allow_zero=True)
        _check.positive_int("DeltaT", DeltaT)
        _check.positive_int("grad_accu_steps", grad_accu_steps, allow_zero=True)
        _check.in_range("threshold", threshold, 0.0, float("inf"))
        t = chain(spam(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"), name="spam")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias, warmup_steps=warmup_steps, threshold=threshold,
                                      DeltaT=DeltaT, grad_accu_steps=grad_accu_steps), t, nonfinite, diagnostics)


@register("optimizer", "classp")
class CLASSP(TransformOptimizer):
    r"""CLASSP (Ludwig, arXiv 2405.09637) = ``chain(scale_by_classp(), scale_by_learning_rate())``:
    ``w_i <- w_i - lr g_i / (epsilon + G_i)^{1/power}`` only where ``g_i^2 > threshold``, with
    ``G_i`` the sum of ``|g_i|^power`` over the steps where the gate was open (see
    :func:`poise.transforms.scale_by_classp` for how this relates to the paper and to the
    authors' script). Arguments under the authors' names: ``lr, threshold, epsilon, power,
    apply_scaling``, plus ``include_current``."""

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 0.2, threshold: float = 0.5,
                 epsilon: float = 1e-5, power: float = 1.0, apply_scaling: bool = True, include_current: bool = True,
                 nonfinite: str = "raise", diagnostics: bool = False):
        _check.in_range("lr", lr, 0.0, float("inf"))
        _check.in_range("threshold", threshold, 0.0, float("inf"))
        _check.in_range("epsilon", epsilon, 0.0, float("inf"), lo_open=True)
        _check.in_range("power", power, 0.0, float("inf"), lo_open=True)
        t = chain(scale_by_classp(), scale_by_learning_rate(), name="classp")
        super().__init__(params, dict(lr=lr, threshold=threshold, epsilon=epsilon, power=power,
                                      apply_scaling=apply_scaling, include_current=include_current), t, nonfinite,
                         diagnostics)


@register("optimizer", "frugal")
class FRUGAL(TransformOptimizer):
    r"""FRUGAL (Zmushko et al., arXiv 2411.07837) =
    ``chain(split_frugal(scale_by_adam("torch")), scale_by_learning_rate(), add_decayed_weights("before"))``:
    AdamW on a subspace redrawn every ``update_gap`` steps (``mode`` ``"block"``: a
    ``density`` share of the tensors; ``"rows"``: of each matrix's rows), and a state-free
    ``inactive_update_rule`` (``sign_sgd``, ``sgd``, ``no``) on the rest. Arguments as the
    authors': ``lr, betas, eps, weight_decay, density, update_gap, proj_params_lr_scale,
    inactive_update_rule, inactive_lr_scale, reset_statistics``, plus ``mode`` and ``seed``."""

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, density: float = 0.25, update_gap: int = 200,
                 proj_params_lr_scale: float = 1.0, inactive_update_rule: str = "sign_sgd",
                 inactive_lr_scale: float = 1.0, reset_statistics: bool = True, mode: str = "block", seed: int = 0,
                 nonfinite: str = "raise", diagnostics: bool = False):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        _check.in_range("density", density, 0.0, 1.0, hi_open=False)
        _check.positive_int("update_gap", update_gap)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid choices: {', '.join(MODES)}")
        if inactive_update_rule not in RULES:
            raise ValueError(f"inactive_update_rule={inactive_update_rule!r}; valid choices: {', '.join(RULES)}")
        t = chain(split_frugal(scale_by_adam("torch")), scale_by_learning_rate(), add_decayed_weights("before"),
                  name="frugal")
        super().__init__(params, dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, density=density, update_gap=update_gap,
            proj_params_lr_scale=proj_params_lr_scale, inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale, reset_statistics=reset_statistics, mode=mode, seed=seed),
            t, nonfinite, diagnostics)


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

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, seed: int = 0, nonfinite: str = "raise",
                 diagnostics: bool = False):
        _check.common(lr, eps, weight_decay)
        _check.betas(betas)
        t = chain(project_low_rank(scale_by_adam("hf")), scale_by_learning_rate(), add_decayed_weights("after"),
                  name="qgalore_adamw")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), t,
                         nonfinite, diagnostics)
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

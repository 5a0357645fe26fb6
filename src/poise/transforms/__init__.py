"""Gradient transforms: ``(init, update)`` pairs composed with :func:`chain`.

See :mod:`poise.transforms._base` for the contract (state in place, hyperparameters from the
parameter group, ``None`` = skip, declared hyperparameter keys in ``Transform.reads``).
"""

from poise.transforms._adam import (
    add_decayed_weights,
    fused_adamw,
    scale_by_adam,
    scale_by_bias_correction,
    scale_by_learning_rate,
)
from poise.transforms._apg import MomentumBuffer, apg_guidance, apg_project, scale_by_apg
from poise.transforms._base import (
    REQUIRED,
    Read,
    Transform,
    apply_updates,
    chain,
    compiling,
    declare,
    fill_hyper,
    identity,
    init_state,
    merge_reads,
    missing_hyper,
    rename,
    tick,
)
from poise.transforms._clipping import (
    clip_by_global_norm,
    clip_spikes_by_max_ema,
    cosine_momentum_schedule,
    normalize_by_norm_ema,
    normalize_by_rms,
)
from poise.transforms._frugal import split_frugal
from poise.transforms._lowrank import dequantize, project_low_rank, quantize
from poise.transforms._projection import project_orthogonal
from poise.transforms._reset import periodic_reset
from poise.transforms._soap import merge_dims, scale_by_soap
from poise.transforms._spam import spam, spam_warmup_scale
from poise.transforms._sparse import ignore_top_k, scale_by_classp

__all__ = [
    "MomentumBuffer",
    "apg_guidance",
    "apg_project",
    "scale_by_apg",
    "REQUIRED",
    "Read",
    "Transform",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "clip_spikes_by_max_ema",
    "compiling",
    "fused_adamw",
    "cosine_momentum_schedule",
    "declare",
    "dequantize",
    "fill_hyper",
    "identity",
    "ignore_top_k",
    "init_state",
    "merge_dims",
    "merge_reads",
    "missing_hyper",
    "normalize_by_norm_ema",
    "normalize_by_rms",
    "periodic_reset",
    "project_low_rank",
    "project_orthogonal",
    "quantize",
    "rename",
    "scale_by_adam",
    "scale_by_bias_correction",
    "scale_by_classp",
    "scale_by_learning_rate",
    "scale_by_soap",
    "spam",
    "spam_warmup_scale",
    "split_frugal",
    "tick",
]

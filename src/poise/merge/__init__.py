"""Integrate-stage merges: a task's update as a parameter delta (task vector) of any ``nn.Module``'s
state dict, the plain merges (task arithmetic, averaging) and geometry-conflict merging (GCWM), with
the conflict score between the current model's geometry and a new update."""

from poise.merge.gcwm import (
    bures_distance_sq,
    conflict_gate,
    gcwm_merge,
    gcwm_merge_tensor,
    geometry_conflict,
    interference_merge,
    projected_covariances,
    psd_sqrt,
    right_geometry,
    state_conflict,
    union_basis,
    wasserstein_barycenter,
)
from poise.merge.task import apply_task_vector, average, task_arithmetic, task_vector

__all__ = [
    "apply_task_vector",
    "average",
    "bures_distance_sq",
    "conflict_gate",
    "gcwm_merge",
    "gcwm_merge_tensor",
    "geometry_conflict",
    "interference_merge",
    "projected_covariances",
    "psd_sqrt",
    "right_geometry",
    "state_conflict",
    "task_arithmetic",
    "task_vector",
    "union_basis",
    "wasserstein_barycenter",
]

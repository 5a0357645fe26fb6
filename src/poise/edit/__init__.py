"""Integrate-stage methods that change what a model knows without retraining it: closed-form
editors for a linear layer and analytic unlearning."""

from poise.edit.linear import (
    RLSEditor,
    alphaedit,
    apply_delta,
    collect_keys_values,
    memit,
    nullspace_projector,
    rome,
    sphere_project,
)
from poise.edit.unlearn import AnalyticClassifier, grad_ascent_loss, grad_diff_loss, npo_loss

__all__ = [
    "AnalyticClassifier",
    "RLSEditor",
    "alphaedit",
    "apply_delta",
    "collect_keys_values",
    "grad_ascent_loss",
    "grad_diff_loss",
    "memit",
    "npo_loss",
    "nullspace_projector",
    "rome",
    "sphere_project",
]

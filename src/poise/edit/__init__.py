"""Integrate-stage methods that change what a model knows without retraining it: closed-form
editors for a linear layer (pure functions in :mod:`~poise.edit.linear`, stateful editors with one
interface in :mod:`~poise.edit.editors`), the targets they write (:mod:`~poise.edit.targets`) and
analytic unlearning; :mod:`~poise.edit.hf` edits a Hugging Face causal LM from EasyEdit-style requests."""

from poise.edit.editors import (
    MEMIT,
    ROME,
    AlphaEdit,
    Editor,
    LinearEditor,
    NoEdit,
    RLSEdit,
    RLSEditor,
    Sphere,
    editor_params,
    make_editor,
)
from poise.edit.hf import EditRequest, HFEditor, edit_hf_model, evaluate_requests, mlp_out_module
from poise.edit.linear import (
    alphaedit,
    apply_delta,
    collect_keys_values,
    memit,
    nullspace_projector,
    rome,
    sphere_project,
)
from poise.edit.targets import edit_targets, keys_at
from poise.edit.unlearn import AnalyticClassifier, grad_ascent_loss, grad_diff_loss, npo_loss, relearn_attack
from poise.edit.unlearn_fit import FIT, importance_score, layer_attribution, redundancy_filter, select_algorithm
from poise.edit.unlearn_stableun import project_conflict, stableun_backward

__all__ = [
    "FIT",
    "MEMIT",
    "ROME",
    "AlphaEdit",
    "AnalyticClassifier",
    "EditRequest",
    "Editor",
    "HFEditor",
    "LinearEditor",
    "NoEdit",
    "RLSEdit",
    "RLSEditor",
    "Sphere",
    "alphaedit",
    "apply_delta",
    "collect_keys_values",
    "edit_hf_model",
    "edit_targets",
    "editor_params",
    "evaluate_requests",
    "grad_ascent_loss",
    "grad_diff_loss",
    "importance_score",
    "keys_at",
    "layer_attribution",
    "make_editor",
    "memit",
    "mlp_out_module",
    "npo_loss",
    "nullspace_projector",
    "project_conflict",
    "redundancy_filter",
    "relearn_attack",
    "rome",
    "select_algorithm",
    "sphere_project",
    "stableun_backward",
]

"""Measure what an update did: continual evaluation (classifiers and causal LMs), forgetting metrics, model\nprobes."""

from poise._nn import logits_of, trainable
from poise.measure.evaluator import ContinualEvaluator, EvalSchedule, EvalSet
from poise.measure.lm import LM_METRICS, LMEvalSet, lm_logits, lm_sums, lm_values
from poise.measure.metrics import (
    GapStats,
    average_accuracy,
    backward_transfer,
    forgetting,
    higher_is_better,
    max_window_drop,
    min_acc,
    stability_gap,
    wc_acc,
    windowed_forgetting,
    windowed_plasticity,
)
from poise.measure.priming import keyword_logprob, memorization_score, priming_score
from poise.measure.probes import (
    kl_drift,
    model_kl_drift,
    model_negative_flips,
    negative_flip_rate,
    positive_flip_rate,
)

__all__ = [
    "ContinualEvaluator",
    "EvalSchedule",
    "EvalSet",
    "GapStats",
    "LMEvalSet",
    "LM_METRICS",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "higher_is_better",
    "keyword_logprob",
    "kl_drift",
    "lm_logits",
    "lm_sums",
    "lm_values",
    "logits_of",
    "max_window_drop",
    "memorization_score",
    "min_acc",
    "model_kl_drift",
    "model_negative_flips",
    "negative_flip_rate",
    "positive_flip_rate",
    "priming_score",
    "stability_gap",
    "trainable",
    "wc_acc",
    "windowed_forgetting",
    "windowed_plasticity",
]

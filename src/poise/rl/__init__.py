"""RL objectives for LLM post-training as pure per-token functions.

``poise.rl.get_loss("ppo_clip")(logp, old_logp, adv, mask) -> LossOut(values, metrics)``;
then ``poise.rl.aggregate(values, mask, mode, num_tokens=..., num_seqs=...)``.
No model, no ``.item()``, no distributed calls inside.

One call for every policy loss: ``call_loss(name, PolicyBatch(logp, old_logp, behav_logp, adv,
mask))``; the whole step objective (IS correction, token selection and weights, BAPO):
``policy_objective(batch, name, ...)``. The sample stage (generation, scoring, DAPO and
Reinforce-Ada sampling, asynchronous samplers) is :mod:`poise.rl.rollout`.
"""

from typing import Any

from poise import _registry
from poise.rl._common import (
    AGG_MODES,
    LossOut,
    aggregate,
    broadcast,
    completion_stats,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from poise.rl.acereason import length_stage, overlong_filter, truncated_rows, validate_stages
from poise.rl.advantages import (
    batch_normalized_advantage,
    dr_grpo_advantage,
    global_stat_advantage,
    group_advantage,
    reinforce_advantage,
    rloo_advantage,
)
from poise.rl.advantages_more import (
    gpg_advantage,
    normalize_then_sum_advantage,
    opo_advantage,
    optimal_token_baseline_advantage,
    outcome_token_rewards,
    passk_advantage,
    reinforce_pp_advantage,
    reinforce_pp_baseline_advantage,
    token_whiten,
)
from poise.rl.batch import PolicyBatch, batch_inputs, call_loss, loss_options, policy_losses
from poise.rl.consistency import (
    SIMILARITIES,
    exact_match,
    group_similarity_reward,
    paraphrase_consistency,
    token_f1,
)
from poise.rl.correction import (
    ISWeights,
    decompose_ratio,
    is_weights,
    log_ratio,
    prox_logp_loglinear,
    sequence_log_ratio,
)
from poise.rl.diagnostics import DIAGNOSTIC_KEYS, rollout_diagnostics
from poise.rl.kl import KL_ESTIMATORS, kl_estimate
from poise.rl.losses import (
    cispo_loss,
    decoupled_ppo_loss,
    gspo_loss,
    kl_penalty,
    minirl_loss,
    pacs_loss,
    pg_loss,
    ppo_clip_loss,
    sapo_loss,
)
from poise.rl.losses_more import (
    clip_cov_loss,
    gmpo_loss,
    kl_cov_loss,
    seq_delta_loss,
    seq_sapo_loss,
    vespo_loss,
)
from poise.rl.objective import PolicyObjective, is_placement, policy_objective
from poise.rl.precision import PRECISIONS, engine_dtypes, unit_roundoff
from poise.rl.rollout import (
    AsyncSampler,
    Collected,
    RaySampler,
    Rollout,
    collect,
    completion_batch,
    generate,
    quantise_weights,
    quantised_copy,
    score_rollouts,
    sft_warmup,
    stochastic_forward,
    trainer_logprobs,
)
from poise.rl.rollout_correction import (
    REJECTION_RULES,
    Correction,
    is_batch_normalize,
    rejection_mask,
    rollout_correction,
)
from poise.rl.routing import ROUTING_REPLAYS, record_routing, routed_logprobs, routing_mismatch
from poise.rl.sampling import AdaSampler, StalenessBuffer, dynamic_sampling_keep, overlong_penalty
from poise.rl.tokens import (
    bapo_bounds,
    capo_mask,
    capo_token_kl,
    echo_clip_eps,
    entropy_topk_mask,
    gtpo_conflict_weights,
    gtpo_entropy_filter,
    masked_entropy_stats,
    steer_weights,
)


def get_loss(name: str) -> Any:
    """A registered loss by name; an unknown name raises listing the valid ones."""
    return _registry.get("loss", name)


def names() -> list[str]:
    """Names of the registered losses."""
    return _registry.names("loss")


__all__ = [
    # issue 17: PS-GRPO, Routing Replay, AceReason sampling, engine precision
    "PRECISIONS",
    "ROUTING_REPLAYS",
    "SIMILARITIES",
    "engine_dtypes",
    "exact_match",
    "group_similarity_reward",
    "length_stage",
    "overlong_filter",
    "paraphrase_consistency",
    "record_routing",
    "routed_logprobs",
    "routing_mismatch",
    "token_f1",
    "truncated_rows",
    "unit_roundoff",
    "validate_stages",
    "quantise_weights",
    "quantised_copy",
    "AGG_MODES",
    "AdaSampler",
    "AsyncSampler",
    "Collected",
    "Correction",
    "DIAGNOSTIC_KEYS",
    "ISWeights",
    "KL_ESTIMATORS",
    "LossOut",
    "PolicyBatch",
    "PolicyObjective",
    "REJECTION_RULES",
    "RaySampler",
    "Rollout",
    "StalenessBuffer",
    "aggregate",
    "bapo_bounds",
    "batch_inputs",
    "batch_normalized_advantage",
    "broadcast",
    "call_loss",
    "capo_mask",
    "capo_token_kl",
    "cispo_loss",
    "clip_cov_loss",
    "collect",
    "completion_batch",
    "completion_stats",
    "decompose_ratio",
    "decoupled_ppo_loss",
    "dr_grpo_advantage",
    "dynamic_sampling_keep",
    "echo_clip_eps",
    "entropy_topk_mask",
    "generate",
    "get_loss",
    "global_stat_advantage",
    "gmpo_loss",
    "gpg_advantage",
    "group_advantage",
    "gspo_loss",
    "gtpo_conflict_weights",
    "gtpo_entropy_filter",
    "is_batch_normalize",
    "is_placement",
    "is_weights",
    "kl_cov_loss",
    "kl_estimate",
    "kl_penalty",
    "log_ratio",
    "loss_options",
    "masked_entropy_stats",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "minirl_loss",
    "names",
    "normalize_then_sum_advantage",
    "opo_advantage",
    "optimal_token_baseline_advantage",
    "outcome_token_rewards",
    "overlong_penalty",
    "pacs_loss",
    "passk_advantage",
    "pg_loss",
    "policy_losses",
    "policy_objective",
    "ppo_clip_loss",
    "prox_logp_loglinear",
    "reinforce_advantage",
    "reinforce_pp_advantage",
    "reinforce_pp_baseline_advantage",
    "rejection_mask",
    "rloo_advantage",
    "rollout_correction",
    "rollout_diagnostics",
    "sapo_loss",
    "score_rollouts",
    "seq_delta_loss",
    "seq_sapo_loss",
    "sequence_log_ratio",
    "sft_warmup",
    "steer_weights",
    "token_whiten",
    "stochastic_forward",
    "trainer_logprobs",
    "vespo_loss",
]

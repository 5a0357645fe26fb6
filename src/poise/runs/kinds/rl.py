"""The RL study: policy-gradient objectives compared on a tiny LM that learns a task with
verifiable rewards, under a train-inference mismatch (a bfloat16-autocast sampler, optionally
on weights quantised to ``train.sampler_bits`` bits, against a float32 trainer) and optional
staleness (several minibatch updates per rollout batch).

One run, top to bottom (:func:`run_one_rl`): warm start by supervised learning; then each
step samples ``group_size`` completions for ``prompts`` problems, scores them, computes
group advantages, recomputes the trainer's log-probs at the current version (``old``),
and takes ``minibatches`` optimizer steps, each on its share of the batch with the
variant's loss from :mod:`poise.rl` and its aggregation. Held-out greedy accuracy (and, with
``eval_pass1_samples``, the sampled pass@1 of the trainer's weights) is evaluated every
``eval_every`` steps; ``late_acc`` / ``late_pass1`` average the second half of RL
(:func:`late_accuracy`).
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise import _registry
from poise.distributed import rank_world
from poise.models import build_lm
from poise.rl import (
    AGG_MODES,
    AsyncSampler,
    PolicyBatch,
    RaySampler,
    aggregate,
    collect,
    completion_batch,
    completion_stats,
    generate,
    loss_options,
    policy_losses,
    policy_objective,
    rollout_diagnostics,
    score_rollouts,
    sft_warmup,
    stochastic_forward,
    trainer_logprobs,
)
from poise.rl.acereason import length_stage, overlong_filter, truncated_rows, validate_stages
from poise.rl.consistency import SIMILARITIES, group_similarity_reward, paraphrase_consistency
from poise.rl.correction import MODES as IS_MODES
from poise.rl.objective import ADAPTIVE_CLIPS, IS_DENOMINATORS, IS_LEVELS, TOKEN_SELECTS, TOKEN_WEIGHTS, is_placement
from poise.rl.precision import PRECISIONS, autocast
from poise.rl.rollout import SAMPLING_MODES
from poise.rl.routing import ROUTING_REPLAYS, record_routing, routed_logprobs, routing_mismatch
from poise.runs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from poise.runs.components import OptimizerSpec, build_optimizer, describe_optimizer
from poise.runs.config import (
    ConfigError,
    _check_variants,
    _choices,
    _help,
    claims_field,
    quick_field,
    sweep_field,
    tracking_field,
)
from poise.runs.engine import _stats, by_variant, execute
from poise.runs.kinds._protocol import StudyKind
from poise.runs.report import _fmt, _plt
from poise.runs.store import JsonlWriter, truncate_jsonl
from poise.runs.verdict import ClaimConfig
from poise.tasks import paraphrase as _paraphrase  # noqa: F401 - registers the rl_task 'paraphrase'
from poise.tasks.reasoning import EOS
from poise.tasks.text import CharTokenizer

PS_GRPO_MODES = ("none", "similarity", "similarity+task")

__all__ = ["KIND", "RLStudyConfig", "RLTaskConfig", "RLTrainConfig", "RLVariantConfig", "build_policy", "run_one_rl",
           "late_accuracy", "run_rl_study", "summarize_rl", "validate_rl", "variant_objective"]


# -- config --------------------------------------------------------------------------------
@dataclass
class RLTaskConfig:
    name: str = _help("task with verifiable rewards: 'arithmetic', 'countdown' or 'paraphrase' (arithmetic asked in "
                      "several surface forms, poise.tasks.paraphrase)", default="arithmetic")
    level: int = _help("difficulty: arithmetic digits (1-4), countdown numbers (2-4)", default=1)
    ops: str = _help("arithmetic operators, a subset of '+-*'", default="+")
    paraphrases: int = _help("paraphrase task: surface forms per problem, 2-6 (one paraphrase set = one problem "
                             "in this many forms)", default=4)


@dataclass
class RLTrainConfig:
    model: str = _help("policy: 'gpt' (poise's own), 'moe' (poise's GPT with top-k mixture-of-experts MLPs, "
                       "poise.models.moe; for Routing Replay) or a Hugging Face model built from a config, 'llama' or "
                       "'qwen2' (needs transformers)", default="gpt")
    moe_experts: int = _help("model='moe': experts per layer", default=4)
    moe_top_k: int = _help("model='moe': experts chosen per token (1 to moe_experts)", default=2)
    moe_norm_topk_prob: bool = _help("model='moe': renormalise the gates over the chosen experts (Mixtral, "
                                     "Qwen3-MoE); false keeps the router's full softmax on them (Switch, Qwen2-MoE)",
                                     default=True)
    n_layer: int = _help("GPT layers", default=1)
    n_head: int = _help("GPT heads", default=2)
    n_embd: int = _help("GPT width", default=48)
    block_size: int = _help("GPT context length", default=24)
    sft_steps: int = _help("supervised warm-start steps before RL (0 = none)", default=150)
    sft_lr: float = _help("warm-start learning rate", default=3e-3)
    steps: int = _help("RL steps (rollout batches)", default=30)
    prompts: int = _help("prompts per rollout batch", default=16)
    group_size: int = _help("completions per prompt", default=8)
    max_new_tokens: int = _help("completion length limit", default=5)
    temperature: float = _help("sampling temperature", default=1.0)
    sampler_dtype: str = _help("sampler precision: 'bfloat16' (a real train-inference mismatch) or 'float32'",
                               default="bfloat16")
    sampler_bits: int = _help("the sampler's weights fake-quantised to this many bits (symmetric, one scale per "
                              "output row, round to nearest: weight-only int8/int4 serving; "
                              "poise.rl.rollout.quantised_copy) for sampling only, while the trainer keeps its "
                              "float32 weights: a controlled train-inference mismatch. 0 = the trainer's weights; "
                              "else 2-16", default=0)
    lr: float = _help("RL learning rate", default=1e-3)
    optimizer: str = _help("the policy's optimizer: a registered poise optimizer (poise list optimizers), torch's "
                           "'sgd' or 'adam', or an import path 'pkg.mod:Class'", default="torch.optim:AdamW")
    optimizer_params: dict[str, Any] = _help("more keyword arguments of the optimizer and its declared group keys "
                                             "(galore_adamw: rank, ...)", default_factory=dict)
    minibatches: int = _help("optimizer steps per rollout batch (1 = on-policy; k > 1 makes later "
                             "minibatches k-1 updates stale)", default=1)
    eval_every: int = _help("held-out greedy accuracy every this many steps", default=5)
    eval_problems: int = _help("held-out problems", default=100)
    eval_pass1_samples: int = _help("with k > 0, each evaluation also samples k completions per held-out problem "
                                    "from the trainer's float32 weights at the training temperature (its own "
                                    "generator, seeded by seed and step, so training is unchanged): the held-out "
                                    "pass@1, the quantity RL maximises (greedy accuracy moves only when the argmax "
                                    "flips). 0 = greedy only", default=0)
    collapse_reward: float = _help("collapsed: held-out accuracy below this after having been above twice it",
                                   default=0.05)
    async_eta: int = _help("asynchronous generation: a sampler thread runs ahead of training by at most this "
                           "many policy versions (AReaL's eta; 0 = synchronous). Results then depend on timing",
                           default=0)
    async_backend: str = _help("where asynchronous generation runs: 'thread' (this process) or 'ray' (a Ray "
                               "actor, the 'ray' extra; for rollouts on other machines)", default="thread")
    share_rows: bool | str = _help(
        "the training forward runs once per distinct (prompt, completion) of the batch and copies the result to "
        "its repeats (groups often repeat short completions): the same loss and, in exact arithmetic, the same "
        "gradient, with other rounding of the weight gradient (~1e-7 relative); a faster step. 'auto' (default): "
        "on unless the training forward is random (a dropout with p > 0, whose masks repeats would share); "
        "false = every row (bitwise the numbers of poise before 2026-12); the no-grad forwards (sampling, "
        "pi_old) always share, their values are unchanged", default="auto")
    checkpoint_every: int = _help("write a checkpoint (safetensors + JSON, atomically) every this many steps; "
                                  "poise run --resume RUN_DIR continues from it (0 = never)", default=10)


@dataclass
class RLVariantConfig:
    name: str = _help("label of this variant", default="")
    loss: str = _help("policy loss: any of poise.rl.policy_losses() (poise list losses)",
                      default="ppo_clip")
    advantage: str = _help("advantage estimator (registry 'advantage')", default="grpo")
    aggregation: str = _help("token_mean, seq_mean_token_mean, seq_mean_token_sum, token_sum", default="token_mean")
    is_level: str = _help("IS correction of the sampler mismatch: 'none', 'token', 'sequence', 'geometric'",
                          default="none")
    is_mode: str = _help("'truncate' (TIS) or 'mask' (MIS)", default="truncate")
    is_max: float = _help("IS bound", default=2.0)
    is_denominator: str = _help("with is_mode='mask': 'all' (verl's, TRL's) keeps rejected tokens in a token-mean's "
                                "denominator; 'kept' takes them out (the mean over the tokens trained on)",
                                default="all")
    minibatches: int = _help("optimizer steps per rollout batch for this variant (0 = train.minibatches)",
                             default=0)
    token_select: str = _help("'none' or 'entropy_top': train only on the top entropy_ratio highest-entropy "
                              "tokens (arXiv 2506.01939; the authors' normaliser: selected tokens)", default="none")
    entropy_ratio: float = _help("share of tokens kept by entropy_top", default=0.2)
    token_weights: str = _help("'none' or 'steer' (entropy-change weights, arXiv 2510.10150)", default="none")
    adaptive_clip: str = _help("'none' or 'bapo' (adaptive clipping bounds, arXiv 2510.18927; ppo_clip only)",
                               default="none")
    sampling: str = _help("'uniform' (group_size per prompt), 'dynamic' (DAPO: regenerate until groups with "
                          "reward variance fill the batch) or 'reinforce_ada' (adaptive rounds, arXiv 2510.04996)",
                          default="uniform")
    max_gen_batches: int = _help("dynamic sampling: generation batches per step at most", default=3)
    ada_rounds: int = _help("Reinforce-Ada: sampling rounds per step at most", default=4)
    params: dict[str, Any] = _help("keyword arguments of the loss (eps_low, eps_high, ...)", default_factory=dict)
    sampler_precision: str = _help("this variant's sampler autocast precision, overriding train.sampler_dtype: "
                                   "'float16' (FP16 sampling, arXiv 2510.26788), 'bfloat16' or 'float32'; '' = "
                                   "train.sampler_dtype", default="")
    trainer_precision: str = _help("the trainer's forward autocast precision: 'float32' (default), 'bfloat16' or "
                                   "'float16' (with a gradient scaler, as the paper's verl patch); weights and "
                                   "optimizer stay float32. FP16 on both engines is the paper's setting",
                                   default="float32")
    routing_replay: str = _help("Routing Replay for train.model='moe' (arXiv 2512.01374): 'none', 'R2' (gradient "
                                "steps replay the trainer's routing at pi_old) or 'R3' (every trainer forward "
                                "replays the sampler's routing)", default="none")
    length_stages: list[int] = _help("AceReason's length curriculum (arXiv 2505.16400): the completion limit of "
                                     "each stage, e.g. [2, 3, 5], the RL steps split into equal stages; [] = "
                                     "train.max_new_tokens throughout", default_factory=list)
    overlong_filter: bool = _help("AceReason: mask completions cut at the length limit (no EOS) out of the loss; "
                                  "their rewards still enter the group baseline", default=False)
    strict_on_policy: bool = _help("AceReason: one gradient step per rollout batch, synchronous sampling (refuses "
                                   "minibatches > 1 and train.async_eta > 0)", default=False)
    ps_grpo: str = _help("PS-GRPO (arXiv 2510.04392), task 'paraphrase' only: 'none', 'similarity' (the reward is "
                         "the group similarity across paraphrases, no ground truth) or 'similarity+task' (plus the "
                         "task's reward); advantages over the whole paraphrase set", default="none")
    ps_grpo_similarity: str = _help("PS-GRPO's similarity of two outputs: 'exact' or 'token_f1'", default="exact")
    ps_grpo_samples: int = _help("PS-GRPO: compare each output with this many outputs of other paraphrases, drawn "
                                 "at random (the paper's approximation); 0 = all (exact)", default=0)


@dataclass
class RLStudyConfig:
    kind: str = _help("'rl': RL objectives on a tiny LM with verifiable rewards", default="rl")
    name: str = _help("study name", default="rl")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("seeds", default_factory=lambda: [0, 1, 2])
    threads: int = _help("torch threads", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    task: RLTaskConfig = _help("the task", default_factory=RLTaskConfig)
    train: RLTrainConfig = _help("model, warm start and RL loop", default_factory=RLTrainConfig)
    variants: list[RLVariantConfig] = _help("the objectives compared ([[variants]] tables)", default_factory=list)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()


def validate_rl(cfg: RLStudyConfig) -> RLStudyConfig:
    _choices("rl_task", cfg.task.name, "task.name")
    t = cfg.train
    if t.model not in ("gpt", "moe", "llama", "qwen2"):
        raise ConfigError(f"train.model: {t.model!r}; valid choices: gpt, moe, llama, qwen2")
    for key in ("moe_experts", "moe_top_k"):
        x = getattr(t, key)
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ConfigError(f"train.{key}={x!r} must be an integer >= 1")
    if not isinstance(t.moe_norm_topk_prob, bool):
        raise ConfigError(f"train.moe_norm_topk_prob={t.moe_norm_topk_prob!r} must be true or false")
    if t.moe_top_k > t.moe_experts:
        raise ConfigError(f"train.moe_top_k={t.moe_top_k} must be <= train.moe_experts={t.moe_experts}")
    if t.n_embd % t.n_head:
        raise ConfigError(f"train.n_embd={t.n_embd} must be a multiple of train.n_head={t.n_head}")
    if t.sampler_dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"train.sampler_dtype: {t.sampler_dtype!r}; valid choices: bfloat16, float32 (FP16 "
                          "sampling: a variant's sampler_precision='float16')")
    if isinstance(t.sampler_bits, bool) or not isinstance(t.sampler_bits, int) or not (
            t.sampler_bits == 0 or 2 <= t.sampler_bits <= 16):
        raise ConfigError(f"train.sampler_bits={t.sampler_bits!r}: 0 (the trainer's weights) or an integer 2-16")
    for key in ("steps", "prompts", "group_size", "max_new_tokens", "minibatches", "eval_every", "eval_problems",
                "n_layer", "n_head", "n_embd", "block_size"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be > 0")
    if t.eval_pass1_samples < 0:
        raise ConfigError(f"train.eval_pass1_samples={t.eval_pass1_samples} must be >= 0")
    if t.async_eta < 0:
        raise ConfigError(f"train.async_eta={t.async_eta} must be >= 0")
    if not (isinstance(t.share_rows, bool) or t.share_rows == "auto"):
        raise ConfigError(f"train.share_rows={t.share_rows!r}; valid choices: auto, true, false")
    if t.async_backend not in ("thread", "ray"):
        raise ConfigError(f"train.async_backend: {t.async_backend!r}; valid choices: thread, ray")
    if t.async_backend == "ray" and t.async_eta:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("train.async_backend='ray' needs Ray: pip install 'poise[ray]'") from None
    model = build_policy(t, CharTokenizer().vocab_size)
    _optimizer(t, model)  # the optimizer's own checks run now, before any training
    if t.group_size < 2:
        raise ConfigError(f"train.group_size={t.group_size} must be >= 2 (group-relative advantages)")
    try:
        _registry.get("rl_task", cfg.task.name)(level=cfg.task.level, **_task_kwargs(cfg))
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None
    losses = policy_losses()
    for i, v in enumerate(_check_variants(cfg, "loss")):
        key = f"variants[{i}]"
        if v.loss not in losses:
            raise ConfigError(f"{key}.loss: {v.loss!r} is not a policy loss; valid choices: {', '.join(losses)}")
        _choices("advantage", v.advantage, f"{key}.advantage")
        if v.aggregation not in AGG_MODES or v.aggregation == "seq_sum_norm":
            raise ConfigError(f"{key}.aggregation: {v.aggregation!r}; valid choices: "
                              f"{', '.join(m for m in AGG_MODES if m != 'seq_sum_norm')}")
        for fld, ok in (("is_level", IS_LEVELS), ("is_mode", IS_MODES), ("is_denominator", IS_DENOMINATORS),
                        ("token_select", TOKEN_SELECTS),
                        ("token_weights", TOKEN_WEIGHTS), ("adaptive_clip", ADAPTIVE_CLIPS),
                        ("sampling", SAMPLING_MODES)):
            if getattr(v, fld) not in ok:
                raise ConfigError(f"{key}.{fld}: {getattr(v, fld)!r}; valid choices: {', '.join(ok)}")
        options = loss_options(v.loss)
        if v.adaptive_clip == "bapo" and not {"eps_low", "eps_high"} <= set(options):
            raise ConfigError(f"{key}.adaptive_clip='bapo' sets eps_low/eps_high, which loss {v.loss!r} does not take")
        if v.is_level != "none" and is_placement(v.loss) == "own":
            raise ConfigError(f"{key}.is_level={v.is_level!r}: loss {v.loss!r} corrects the sampler mismatch with its "
                              "own behav_logp term; set is_level='none' (it would be ignored)")
        if v.minibatches < 0:
            raise ConfigError(f"{key}.minibatches={v.minibatches} must be >= 0")
        for p in v.params:
            if p not in options:
                raise ConfigError(f"{key}.params.{p}: unknown argument of loss {v.loss!r}; "
                                  f"valid: {', '.join(options) or '(none)'}")
        _validate_variant_extras(cfg, v, key)
    return cfg


def _validate_variant_extras(cfg: RLStudyConfig, v: RLVariantConfig, key: str) -> None:
    """The options of issue 17: precision, Routing Replay, AceReason sampling, PS-GRPO."""
    t = cfg.train
    for fld, ok in (("sampler_precision", ("", *PRECISIONS)), ("trainer_precision", tuple(PRECISIONS)),
                    ("routing_replay", ROUTING_REPLAYS), ("ps_grpo", PS_GRPO_MODES),
                    ("ps_grpo_similarity", tuple(SIMILARITIES))):
        if getattr(v, fld) not in ok:
            raise ConfigError(f"{key}.{fld}: {getattr(v, fld)!r}; valid choices: "
                              f"{', '.join(repr(x) if x == '' else x for x in ok)}")
    if v.routing_replay != "none" and t.model != "moe":
        raise ConfigError(f"{key}.routing_replay={v.routing_replay!r} needs a routed policy: train.model='moe' "
                          f"(it is {t.model!r})")
    if (v.routing_replay != "none" or t.model == "moe") and t.async_eta:
        raise ConfigError(f"train.async_eta={t.async_eta}: the 'moe' policy records the sampler's routing "
                          "synchronously; use async_eta=0")
    try:
        validate_stages(v.length_stages, f"{key}.length_stages")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if v.length_stages and t.async_eta:
        raise ConfigError(f"{key}.length_stages needs synchronous sampling (train.async_eta={t.async_eta}; use 0)")
    if v.length_stages and len(v.length_stages) > t.steps:
        raise ConfigError(f"{key}.length_stages has {len(v.length_stages)} stages for train.steps={t.steps}")
    if not isinstance(v.overlong_filter, bool) or not isinstance(v.strict_on_policy, bool):
        raise ConfigError(f"{key}.overlong_filter / strict_on_policy must be true or false")
    if v.strict_on_policy:
        steps = v.minibatches or t.minibatches
        if steps != 1 or t.async_eta:
            raise ConfigError(f"{key}.strict_on_policy: one gradient step per rollout batch, synchronous; got "
                              f"minibatches={steps}, train.async_eta={t.async_eta} (need 1 and 0)")
    if isinstance(v.ps_grpo_samples, bool) or not isinstance(v.ps_grpo_samples, int) or v.ps_grpo_samples < 0:
        raise ConfigError(f"{key}.ps_grpo_samples={v.ps_grpo_samples!r}: 0 (exact) or an integer >= 1")
    if v.ps_grpo != "none":
        if cfg.task.name != "paraphrase":
            raise ConfigError(f"{key}.ps_grpo={v.ps_grpo!r} needs paraphrased prompts: task.name='paraphrase' "
                              f"(it is {cfg.task.name!r})")
        if v.sampling != "uniform":
            raise ConfigError(f"{key}.ps_grpo={v.ps_grpo!r} groups rollouts by paraphrase set; sampling must be "
                              f"'uniform' (it is {v.sampling!r})")





# -- one run --------------------------------------------------------------------------------
def _optimizer(t: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(OptimizerSpec(t.optimizer, dict(t.optimizer_params)), model, "train.optimizer",
                           "train.optimizer_params", lr=t.lr)


def resolve(cfg: RLStudyConfig) -> dict[str, Any]:
    """What the policy's optimizer was built as (class, groups, projected matrices), and what
    ``train.share_rows`` came to."""
    model = build_policy(cfg.train, CharTokenizer().vocab_size)
    share, why = _share_rows(cfg.train, model)
    return {"optimizer": describe_optimizer(_optimizer(cfg.train, model), model),
            "share_rows": {"value": share, "why": why}}


def _share_rows(t: RLTrainConfig, model: torch.nn.Module) -> tuple[bool, str]:
    """``train.share_rows`` for ``model``, and why: as set, or ``"auto"``: on unless the training
    forward is random (:func:`poise.rl.stochastic_forward`)."""
    if isinstance(t.share_rows, bool):
        return t.share_rows, "set"
    why = stochastic_forward(model)
    return why is None, "auto: the training forward is deterministic" if why is None else f"auto: off, {why}"


def _task_kwargs(cfg: RLStudyConfig) -> dict[str, Any]:
    """The task's keyword arguments besides level and seed."""
    if cfg.task.name == "arithmetic":
        return {"ops": cfg.task.ops}
    if cfg.task.name == "paraphrase":
        return {"ops": cfg.task.ops, "n_paraphrases": cfg.task.paraphrases}
    return {}


def _task(cfg: RLStudyConfig, seed: int) -> Any:
    cls = _registry.get("rl_task", cfg.task.name)
    return cls(level=cfg.task.level, seed=seed, **_task_kwargs(cfg))


def _any_rank(flag: bool, world: int) -> bool:
    """True when ``flag`` holds on any rank (every rank must then take the same branch)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    x = torch.tensor([float(flag)])
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    import torch.distributed as dist

    x = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(x)
    return float(x.item()) / world


def _in_sync(model: torch.nn.Module, world: int) -> bool:
    """Whether every rank ends with the same weights (DDP kept them together)."""
    if world == 1:
        return True
    import torch.distributed as dist

    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def build_policy(t: Any, vocab_size: int) -> torch.nn.Module:
    """The policy from the config: poise's GPT, its mixture-of-experts form (``model="moe"``,
    :class:`poise.models.moe.MoEGPT`), or a Hugging Face Llama / Qwen2 causal LM built
    from a config (random weights, no download): :func:`poise.models.build_lm`."""
    if t.model == "moe":
        from poise.models.moe import MoEConfig, MoEGPT

        return MoEGPT(MoEConfig(vocab_size=vocab_size, block_size=t.block_size, n_layer=t.n_layer, n_head=t.n_head,
                                n_embd=t.n_embd, n_experts=getattr(t, "moe_experts", 4),
                                top_k=getattr(t, "moe_top_k", 2),
                                norm_topk_prob=getattr(t, "moe_norm_topk_prob", True)))
    return build_lm(t.model, vocab_size=vocab_size, n_layer=t.n_layer, n_head=t.n_head, n_embd=t.n_embd,
                    block_size=t.block_size)


def variant_objective(v: RLVariantConfig, batch: PolicyBatch, entropy: torch.Tensor | None = None) -> Any:
    """The variant's objective on ``batch``: :func:`poise.rl.policy_objective` with the variant's loss,
    IS correction, token selection/weights, adaptive clipping and loss arguments (the TRL adapter
    calls the same function)."""
    return policy_objective(batch, v.loss, is_level=v.is_level, is_mode=v.is_mode, is_max=v.is_max,
                            token_select=v.token_select, entropy_ratio=v.entropy_ratio, token_weights=v.token_weights,
                            adaptive_clip=v.adaptive_clip, entropy=entropy, is_denominator=v.is_denominator,
                            **v.params)


def _collect_kwargs(v: RLVariantConfig, t: RLTrainConfig) -> dict[str, Any]:
    """The variant's sample stage as :func:`poise.rl.collect` arguments."""
    return dict(num_prompts=t.prompts, group_size=t.group_size, max_new_tokens=t.max_new_tokens,
                sampling=v.sampling, advantage=v.advantage, max_gen_batches=v.max_gen_batches,
                ada_rounds=v.ada_rounds, temperature=t.temperature, dtype=_sampler_dtype(v, t),
                weight_bits=t.sampler_bits or None)


def _sampler_dtype(v: RLVariantConfig, t: RLTrainConfig) -> torch.dtype | None:
    """The sampler's autocast dtype: the variant's ``sampler_precision`` or else ``train.sampler_dtype``."""
    if getattr(v, "sampler_precision", ""):
        return PRECISIONS[v.sampler_precision]
    return torch.bfloat16 if t.sampler_dtype == "bfloat16" else None


def _forward_logprobs(model: torch.nn.Module, rollouts: list, routed: bool, replay: list | None,
                      dtype: torch.dtype | None, with_entropy: bool = False,
                      share_rows: bool = False) -> tuple[Any, Any, list | None]:
    """The trainer's ``(logp, entropy or None, routing used or None)`` in ``dtype`` autocast; a routed
    (MoE) policy goes through :func:`poise.rl.routing.routed_logprobs` with ``replay`` replayed.
    ``share_rows``: one forward per distinct (prompt, completion) (:func:`poise.rl.trainer_logprobs`)."""
    with autocast(dtype):
        if not routed:
            out = trainer_logprobs(model, rollouts, with_entropy=with_entropy, share_rows=share_rows)
            return (*out, None) if with_entropy else (out, None, None)
        return routed_logprobs(model, rollouts, replay, with_entropy=with_entropy)


def _context_routing_mismatch(sampler: list, trainer: list) -> float:
    """:func:`poise.rl.routing.routing_mismatch` over every position whose hidden state feeds a
    completion log-prob (all but each sequence's last token), every layer."""
    a = torch.cat([x[:, :-1].reshape(-1, x.shape[-1]) for x in sampler])
    b = torch.cat([x[:, :-1].reshape(-1, x.shape[-1]) for x in trainer])
    return float(routing_mismatch(a, b))


def _paraphrase_ids(rollouts: list) -> tuple[torch.Tensor, list[int]]:
    """Contiguous paraphrase-set ids ``[N]`` and each rollout's form."""
    remap: dict[int, int] = {}
    sets = [remap.setdefault(r.problem.set_id, len(remap)) for r in rollouts]
    return torch.tensor(sets), [r.problem.paraphrase for r in rollouts]


def _held_out_accuracy(model: torch.nn.Module, tok: CharTokenizer, task: Any, problems: list,
                       max_new_tokens: int, failures: list[dict[str, str]] | None = None,
                       consistency: list[float] | None = None) -> float:
    """Greedy held-out accuracy; with ``consistency`` (a list) and paraphrased problems, also appends
    the greedy outputs' consistency across paraphrases (:func:`poise.rl.consistency.paraphrase_consistency`)."""
    rollouts = generate(model, tok, problems, group_size=1, max_new_tokens=max_new_tokens, greedy=True)
    if consistency is not None and rollouts and hasattr(rollouts[0].problem, "set_id"):
        sets, forms = _paraphrase_ids(rollouts)
        consistency.append(paraphrase_consistency([r.text for r in rollouts], sets, forms))
    kept, bad = score_rollouts(task, rollouts)
    if failures is not None:
        failures.extend(bad)
    return sum(r.reward for r in kept) / max(1, len(rollouts))  # a failed reward counts as wrong here


def _held_out_pass1(model: torch.nn.Module, tok: CharTokenizer, task: Any, problems: list, t: RLTrainConfig,
                    seed: int, step: int) -> float | None:
    """Mean reward of ``t.eval_pass1_samples`` completions per held-out problem, sampled from the
    trainer's weights (float32, no quantisation) at the training temperature with a generator of
    its own (seeded by ``seed`` and ``step``: resumable, and the training stream is untouched)."""
    if not t.eval_pass1_samples:
        return None
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)
    rollouts = generate(model, tok, problems, group_size=t.eval_pass1_samples, max_new_tokens=t.max_new_tokens,
                        temperature=t.temperature, generator=g)
    kept, _ = score_rollouts(task, rollouts)
    return sum(r.reward for r in kept) / max(1, len(rollouts))


def run_one_rl(cfg: RLStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
               progress: Any = None) -> dict[str, Any]:
    v, t = cfg.variants[variant_index], cfg.train
    rank, world = rank_world()
    if world > 1 and t.async_eta and t.async_backend == "ray":
        raise ValueError("train.async_backend='ray' under torchrun is not supported: every rank would start its "
                         "own Ray actors; use async_backend='thread' (one sampler thread per rank)")
    ckpt_dir = metrics_path.parent.parent / "checkpoints" / metrics_path.stem if metrics_path else None
    if rank > 0:  # rank 0 writes the run's files; the others train with it (and resume from its checkpoints)
        metrics_path, progress = None, None
    tok = CharTokenizer()
    task = _task(cfg, seed if rank == 0 else seed + 100_003 * rank)  # each rank its own prompts
    held = _task(cfg, 10_000 + seed).sample(t.eval_problems)
    torch.manual_seed(seed)
    model = build_policy(t, tok.vocab_size)
    opt = _optimizer(t, model)
    gen = torch.Generator().manual_seed(seed if rank == 0 else seed + 7919 * rank)
    kw = _collect_kwargs(v, t)
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir and t.checkpoint_every else None
    examples: list[dict[str, str]] = []  # the last 10 reward failures, reported in the results

    def record(failures: list[dict[str, str]]) -> None:
        examples[:] = (examples + failures)[-10:]
    if latest is not None:  # resume: everything the loop carries comes back from the checkpoint
        st = load_checkpoint(latest, model, opt, gen)
        task.rng.setstate(_tuplify(st["task_rng"]))
        if rank > 0:  # the checkpoint holds rank 0's sampling state: the others draw their own prompts again
            task.rng.seed(seed + 100_003 * rank + 1_000_003 * st["step"])
            gen.manual_seed(seed + 7919 * rank + 1_000_003 * st["step"])
        start, curve = st["step"] + 1, st["curves"]
        eval_steps, eval_acc, eval_samples = st["eval_steps"], st["eval_acc"], st["eval_samples"]
        eval_pass1 = st.get("eval_pass1", [])
        eval_consistency = st.get("eval_consistency", [])
        collapsed_at, bad_rewards, generated_total = st["collapsed_at"], st["bad_rewards"], st["generated_total"]
        examples.extend(st["bad_reward_examples"])
        if metrics_path is not None:
            truncate_jsonl(metrics_path, st["step"])
        if progress is not None:
            progress(st["step"])
    else:
        if t.sft_steps:
            sft_warmup(model, tok, _task(cfg, 20_000 + seed), steps=t.sft_steps, lr=t.sft_lr, seed=seed)
        start = 1
        curve = {k: [] for k in ("reward", "entropy", "mismatch_abs", "grad_norm", "clip_frac", "chi2_token")}
        eval_failures: list[dict[str, str]] = []
        eval_consistency: list[float] = []
        eval_steps, eval_acc = [0], [_held_out_accuracy(model, tok, task, held, t.max_new_tokens, eval_failures,
                                                        eval_consistency)]
        eval_pass1 = [_held_out_pass1(model, tok, task, held, t, seed, 0)]
        record(eval_failures)
        eval_samples = [0]
        collapsed_at = None
        bad_rewards = generated_total = 0
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()  # a fresh run: no stale lines from an earlier attempt
    diverged_at = None
    # under torchrun: the training forward goes through DDP (gradients averaged over ranks);
    # sampling and evaluation use the module itself
    trainer = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    writer = JsonlWriter(metrics_path) if metrics_path else None
    sampler: AsyncSampler | RaySampler | None = None
    if t.async_eta and t.async_backend == "ray":
        sampler = RaySampler(model, t.async_eta, t.steps - start + 1, task, seed=seed, tokenizer=tok,
                             start_version=start - 1, **kw)
    elif t.async_eta:
        sampler = AsyncSampler(model, t.async_eta, t.steps - start + 1,
                               lambda m: collect(m, tok, task, generator=gen, **kw), start_version=start - 1)
    routed = t.model == "moe"
    trainer_dtype = PRECISIONS[v.trainer_precision]
    share_rows = _share_rows(t, trainer)[0]
    scaler = torch.amp.GradScaler("cpu", growth_interval=400) if v.trainer_precision == "float16" else None
    eos_id = int(tok.encode(EOS)[0])
    t0 = time.perf_counter()
    try:
        for step in range(start, t.steps + 1):
            version_gap = 0
            if sampler is None:
                kw_step = kw if not v.length_stages else {
                    **kw, "max_new_tokens": length_stage(step, t.steps, v.length_stages)}
                rollouts, rewards_t, adv, n_generated, bad = collect(model, tok, task, generator=gen, **kw_step)
            else:
                (rollouts, rewards_t, adv, n_generated, bad), used = sampler.get()
                version_gap = (step - 1) - used
            bad_rewards += len(bad)
            record(bad)
            generated_total += n_generated
            if _any_rank(not rollouts, world):  # every reward failed on some rank: all ranks skip the step
                if writer:
                    writer.write({"step": step, "skipped": True, "bad_rewards": bad_rewards})
                if sampler is not None:
                    sampler.publish(model)
                if progress is not None:
                    progress(1)
                continue
            behav, mask = completion_batch(rollouts)
            extra: dict[str, float] = {}
            if hasattr(rollouts[0].problem, "set_id"):  # paraphrased prompts
                sets, forms = _paraphrase_ids(rollouts)
                texts = [r.text for r in rollouts]
                extra["consistency/train"] = paraphrase_consistency(texts, sets, forms)
                if v.ps_grpo != "none":  # PS-GRPO: the group similarity reward, the paraphrase set as the group
                    sim = group_similarity_reward(texts, sets, forms, similarity=v.ps_grpo_similarity,
                                                  num_samples=v.ps_grpo_samples or None, generator=gen)
                    extra["ps_grpo/similarity_reward"] = float(sim.mean())
                    score = sim + rewards_t if v.ps_grpo == "similarity+task" else sim
                    adv = _registry.get("advantage", v.advantage)(score, sets)
            train_mask = mask
            if v.overlong_filter or v.length_stages:
                truncated = truncated_rows([r.completion_ids for r in rollouts], eos_id)
                extra["overlong/truncated_frac"] = float(truncated.float().mean())
                if v.overlong_filter:
                    train_mask = overlong_filter(mask, truncated)
            replay = None
            if routed:  # the sampler's routing, the trainer's own at pi_old, and how often they differ
                record_routing(model, rollouts, dtype=kw["dtype"], weight_bits=kw["weight_bits"])
                sampler_routing = [r.extra.pop("routing") for r in rollouts]
                with torch.no_grad():
                    live_logp, _, live_routing = _forward_logprobs(model, rollouts, True, None, trainer_dtype)
                extra["routing/mismatch"] = _context_routing_mismatch(sampler_routing, live_routing)
                # |log pi - log mu| with the trainer's own routing, on the same batch as the replayed one
                T_ = live_logp.shape[1]
                extra["routing/abs_log_ratio_unreplayed"] = float(
                    ((live_logp - behav[:, :T_]).abs() * mask[:, :T_]).sum() / mask[:, :T_].sum().clamp_min(1))
                replay = {"none": None, "R2": live_routing, "R3": sampler_routing}[v.routing_replay]
            chunks = np.array_split(np.arange(len(rollouts)), v.minibatches or t.minibatches)
            if len(chunks) > 1:  # pi_old: the trainer's log-probs before this batch's first update
                if routed and v.routing_replay != "R3":
                    old = live_logp
                else:
                    with torch.no_grad():  # forward only: sharing repeated rows gives the same values
                        old = _forward_logprobs(model, rollouts, routed, replay, trainer_dtype, share_rows=True)[0]
            else:  # on-policy: pi_old is the current policy; its log-probs come with the forward below
                old = None
            rec: dict[str, Any] = {"step": step, "reward": _mean_over_ranks(float(rewards_t.mean()), world),
                                   "samples_generated": generated_total, "bad_rewards": bad_rewards,
                                   "staleness/version_gap": version_gap, **extra}
            for c in chunks:
                sub = [rollouts[i] for i in c]
                idx = torch.as_tensor(c)
                logp, ent, _ = _forward_logprobs(trainer, sub, routed, None if replay is None else
                                                 [replay[i] for i in c], trainer_dtype, with_entropy=True,
                                                 share_rows=share_rows)
                m = mask[idx][:, : logp.shape[1]]
                old_c = logp.detach() if old is None else old[idx][:, : logp.shape[1]]
                values, agg_mask, metrics = variant_objective(
                    v, PolicyBatch(logp, old_c, behav[idx][:, : logp.shape[1]], adv[idx],
                                   train_mask[idx][:, : logp.shape[1]]), ent)
                loss = aggregate(values, agg_mask, v.aggregation)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                else:  # float16 trainer: scaled loss, unscaled gradients (the paper's verl patch)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
                if _any_rank(not math.isfinite(float(loss.detach())) or (scaler is None and not math.isfinite(gn)),
                             world):
                    diverged_at = step
                    break
                if scaler is None:
                    opt.step()
                else:  # a non-finite gradient skips the step and lowers the scale
                    scaler.step(opt)
                    scaler.update()
            if sampler is not None:
                sampler.publish(model)
            if diverged_at:
                rec["diverged"] = True
            rec.update(completion_stats(ent, m, old_c - behav[idx][:, : logp.shape[1]]))
            tr = old if old is not None else old_c  # the trainer's log-probs at the step's start, every row
            rec.update({k: float(x) for k, x in
                        rollout_diagnostics(tr, behav[:, : tr.shape[1]], mask[:, : tr.shape[1]]).items()})
            if routed:  # the same batch's |log pi - log mu| as trained on (replayed or not), every row
                mt = mask[:, : tr.shape[1]]
                rec["routing/abs_log_ratio_trained"] = float(
                    ((tr.detach() - behav[:, : tr.shape[1]]).abs() * mt).sum() / mt.sum().clamp_min(1))
            rec.update({k: float(x) for k, x in metrics.items()})
            rec.update(loss=float(loss.detach()), grad_norm=gn)
            curve["reward"].append(rec["reward"])
            curve["entropy"].append(rec["entropy/mean"])
            curve["mismatch_abs"].append(rec["mismatch/abs_log_ratio"])
            curve["grad_norm"].append(gn)
            curve["clip_frac"].append(rec.get("clip_frac/region", 0.0))
            curve.setdefault("chi2_token", []).append(rec["rollout_corr/chi2_token"])
            curve.setdefault("k3_kl", []).append(rec["rollout_corr/k3_kl"])
            for key, name in (("routing/mismatch", "routing_mismatch"), ("overlong/truncated_frac", "truncated_frac"),
                              ("routing/abs_log_ratio_unreplayed", "mismatch_abs_unreplayed"),
                              ("routing/abs_log_ratio_trained", "mismatch_abs_trained"),
                              ("consistency/train", "consistency_train"),
                              ("ps_grpo/similarity_reward", "similarity_reward")):
                if key in rec:
                    curve.setdefault(name, []).append(rec[key])
            if step % t.eval_every == 0 or step == t.steps:
                eval_failures = []
                acc = _held_out_accuracy(model, tok, task, held, t.max_new_tokens, eval_failures, eval_consistency)
                record(eval_failures)
                eval_steps.append(step)
                eval_acc.append(acc)
                eval_pass1.append(_held_out_pass1(model, tok, task, held, t, seed, step))
                eval_samples.append(generated_total)
                rec["held_out_acc"] = acc
                if eval_pass1[-1] is not None:
                    rec["held_out_pass1"] = eval_pass1[-1]
                if eval_consistency:
                    rec["held_out_consistency"] = eval_consistency[-1]
                if collapsed_at is None and max(eval_acc) >= 2 * t.collapse_reward and acc < t.collapse_reward:
                    collapsed_at = step
            if writer:
                writer.write(rec)
            if rank == 0 and ckpt_dir and t.checkpoint_every and step % t.checkpoint_every == 0 and not diverged_at:
                save_checkpoint(ckpt_dir, step, model, opt, gen, {
                    "task_rng": task.rng.getstate(), "curves": curve, "eval_steps": eval_steps,
                    "eval_acc": eval_acc, "eval_pass1": eval_pass1, "eval_samples": eval_samples,
                    "eval_consistency": eval_consistency,
                    "collapsed_at": collapsed_at,
                    "bad_rewards": bad_rewards, "generated_total": generated_total,
                    "bad_reward_examples": examples})
            if progress is not None:
                progress(1)
            if diverged_at:
                if progress is not None:
                    progress(t.steps - step)
                break
    finally:
        if sampler is not None:
            sampler.close()
        if writer:
            writer.close()
    wall = time.perf_counter() - t0
    run_means = {f"{k}_mean": float(np.mean(curve[k])) for k in ("mismatch_abs", "chi2_token") if curve.get(k)}
    return {"variant": v.name, "seed": seed, "wall_seconds": wall, "curves": curve,
            "metrics": run_means,  # per-run scalars a [[claims]] table can name (mismatch_abs_mean, ...)
            "eval_steps": eval_steps, "eval_acc": eval_acc, "eval_samples": eval_samples, "final_acc": eval_acc[-1],
            "late_acc": late_accuracy(eval_steps, eval_acc, t.steps),
            **({"eval_pass1": eval_pass1, "start_pass1": eval_pass1[0], "final_pass1": eval_pass1[-1],
                "late_pass1": late_accuracy(eval_steps, eval_pass1, t.steps)} if t.eval_pass1_samples else {}),
            **({"eval_consistency": eval_consistency, "start_consistency": eval_consistency[0],
                "late_consistency": late_accuracy(eval_steps, eval_consistency, t.steps)}
               if len(eval_consistency) == len(eval_steps) else {}),
            "samples_generated": generated_total,
            "collapsed_at": collapsed_at, "diverged_at": diverged_at, "bad_rewards": bad_rewards,
            "bad_reward_examples": examples,
            "seconds_per_step": wall / max(1, len(curve["reward"])),
            "world_size": world, "ranks_in_sync": _in_sync(model, world)}


def late_accuracy(eval_steps: list[int], eval_acc: list[float], steps: int) -> float:
    """Mean held-out accuracy over the evaluations of the second half of RL (``step >= steps / 2``;
    the last evaluation if none is there): the run's end point, less noisy than one evaluation.

    >>> round(late_accuracy([0, 10, 20, 30, 40], [0.5, 0.6, 0.7, 0.8, 0.9], 40), 6)
    0.8
    """
    late = [a for s, a in zip(eval_steps, eval_acc, strict=True) if s > 0 and 2 * s >= steps]
    return float(np.mean(late)) if late else float(eval_acc[-1])


def _tuplify(x: Any) -> Any:
    """JSON turned random.getstate()'s tuples into lists; turn them back."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def summarize_rl(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        out[variant] = {
            "final_acc": _stats([r["final_acc"] for r in rs]),
            "late_acc": _stats([r["late_acc"] if "late_acc" in r else r["final_acc"] for r in rs]),
            # pass@1 only where train.eval_pass1_samples > 0: n = 0 otherwise, so every row has every column
            "start_pass1": _stats([r.get("start_pass1") for r in rs]),
            "late_pass1": _stats([r.get("late_pass1") for r in rs]),
            "start_acc": _stats([r["eval_acc"][0] for r in rs]),
            "final_reward": _stats([float(np.mean(r["curves"]["reward"][-5:])) if r["curves"]["reward"] else math.nan
                                    for r in rs]),
            "final_entropy": _stats([r["curves"]["entropy"][-1] if r["curves"]["entropy"] else math.nan for r in rs]),
            "mismatch_abs": _stats([float(np.mean(r["curves"]["mismatch_abs"])) for r in rs]),
            "chi2_token": _stats([float(np.mean(r["curves"]["chi2_token"])) if r["curves"].get("chi2_token")
                                  else None for r in rs]),
            # issue 17's measurements; n = 0 where a run does not have them
            **{key: _stats([float(np.mean(r["curves"][curve])) if r["curves"].get(curve) else None for r in rs])
               for key, curve in (("mismatch_k3_kl", "k3_kl"), ("routing_mismatch", "routing_mismatch"),
                                  ("mismatch_abs_unreplayed", "mismatch_abs_unreplayed"),
                                  ("mismatch_abs_trained", "mismatch_abs_trained"),
                                  ("truncated_frac", "truncated_frac"), ("train_consistency", "consistency_train"))},
            "start_consistency": _stats([r.get("start_consistency") for r in rs]),
            "late_consistency": _stats([r.get("late_consistency") for r in rs]),
            "samples_generated": _stats([float(r["samples_generated"]) for r in rs]),
            "acc_gain_per_1k_samples": _stats([1000 * (r["final_acc"] - r["eval_acc"][0])
                                               / max(1, r["samples_generated"]) for r in rs]),
            "collapsed": {"count": sum(r["collapsed_at"] is not None or r["diverged_at"] is not None for r in rs),
                          "runs": len(rs)},
            "seconds_per_step": _stats([r["seconds_per_step"] for r in rs]),
            "seeds": [r["seed"] for r in rs],
        }
    return out


def run_rl_study(cfg: RLStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                 report: bool = True) -> Path:
    """Run every objective x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- report --------------------------------------------------------------------------------
def _rl_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = summarize_rl(results)
    note = (
        "Mean ± sample std over seeds. Held-out accuracy: greedy decoding on problems never trained on, "
        "at the start of RL (after the warm start) and at the end. Reward: mean training reward over the "
        "last 5 steps. Entropy: mean token entropy of the trainer at the last step. |log ρ|: mean absolute "
        "log-ratio between the trainer and the sampler on sampled tokens, the train-inference mismatch "
        f"({_sampler_words(config['train'])}); χ²: mean over steps of the token χ²(π‖μ) = E[ρ²] − 1. Late: the "
        "mean over the evaluations of the second half of RL. Collapsed: held-out accuracy fell below "
        f"{config['train']['collapse_reward']} after having reached twice that, or the loss diverged. "
        "↑ higher is better, ↓ lower is better.")
    pass1 = any(r["late_pass1"]["n"] for r in table.values())
    if pass1:
        note += (f" Pass@1: mean reward of {config['train'].get('eval_pass1_samples')} completions per held-out "
                 "problem sampled from the trainer's float32 weights at the training temperature.")
    heads = ["held-out acc (end) ↑", "held-out acc (start)", "held-out acc (late) ↑",
             *(["pass@1 (start)", "pass@1 (late) ↑"] if pass1 else []), "reward ↑", "entropy", "|log ρ| ↓", "χ² ↓",
             "collapsed ↓", "samples generated", "acc gain / 1k samples ↑", "s / step ↓"]
    rows = [[html.escape(v), _fmt(r["final_acc"]), _fmt(r["start_acc"]), _fmt(r["late_acc"]),
             *([_fmt(r["start_pass1"]), _fmt(r["late_pass1"])] if pass1 else []), _fmt(r["final_reward"]),
             _fmt(r["final_entropy"]), _fmt(r["mismatch_abs"], 4), _fmt(r["chi2_token"], 4),
             f"{r['collapsed']['count']} / {r['collapsed']['runs']}", _fmt(r["samples_generated"], 0),
             _fmt(r["acc_gain_per_1k_samples"], 3), _fmt(r["seconds_per_step"], 2)]
            for v, r in table.items()]
    tables = [{"title": "Objectives", "note": note, "heads": heads, "rows": rows}]
    extra = [(k, head, digits) for k, head, digits in (
        ("mismatch_abs", "|Δlogp| (mean ± std [95% CI])", 5), ("mismatch_k3_kl", "KL(μ‖π) k3", 6),
        ("routing_mismatch", "routing mismatch", 4),
        ("mismatch_abs_unreplayed", "|Δlogp| trainer's own routing", 5),
        ("mismatch_abs_trained", "|Δlogp| as trained (replayed)", 5), ("truncated_frac", "truncated share", 3),
        ("train_consistency", "consistency (train)", 3), ("start_consistency", "consistency held-out (start)", 3),
        ("late_consistency", "consistency held-out (late)", 3))
        if k in ("mismatch_abs", "mismatch_k3_kl") or any(r[k]["n"] for r in table.values())]
    variants = {v["name"]: v for v in config.get("variants", [])}
    if len(extra) > 2 or any(v.get("sampler_precision") or v.get("trainer_precision", "float32") != "float32"
                             for v in variants.values()):
        note2 = ("Per-token train-inference mismatch between the sampler μ and the trainer π on the sampled tokens, "
                 "mean over steps, then mean ± sample std over seeds with a 95% t-interval: |Δlogp| = |log π − log μ|, "
                 "KL(μ‖π) by the k3 estimator. Routing mismatch: share of (token, layer) whose top-k expert set "
                 "differs between the sampler's routing and the trainer's own (before any replay); |Δlogp| with the "
                 "trainer's own routing: the batch's mismatch had the trainer not replayed; as trained: with the "
                 "routing the update used (both over every row of the batch, at the step's start). Truncated share: "
                 "completions cut at the length limit. Consistency: share of output pairs from different paraphrases "
                 "of one problem that agree (greedy on held-out sets; sampled outputs during training).")
        heads2 = ["sampler", "trainer", "replay", *[h for _, h, _ in extra]]  # the page adds the variant column
        rows2 = []
        for name, r in table.items():
            v = variants.get(name, {})
            sampler = v.get("sampler_precision") or config["train"].get("sampler_dtype", "bfloat16")
            rows2.append([html.escape(name), sampler, v.get("trainer_precision", "float32"),
                          v.get("routing_replay", "none"),
                          *[_fmt_ci(r[k], d) if k.startswith("mismatch") else _fmt(r[k], d)
                            for k, _, d in extra]])
        tables.append({"title": "Train-inference mismatch, routing, length and consistency", "note": note2,
                       "heads": heads2, "rows": rows2})
    return tables


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for ``n - 1`` degrees of freedom (normal beyond 30)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
    df = n - 1
    return 1.96 if df > 30 else table[max(k for k in table if k <= df)]  # the smaller df: a wider interval


def _fmt_ci(s: dict[str, Any], digits: int) -> str:
    """``mean ± std [lo, hi]`` with a 95% t-interval over seeds (no interval for one seed)."""
    if not s["n"]:
        return "–"
    if s["n"] < 2:
        return f"{s['mean']:.{digits}f}"
    h = _t95(s["n"]) * s["std"] / math.sqrt(s["n"])
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['mean'] - h:.{digits}f}, {s['mean'] + h:.{digits}f}]"


def _sampler_words(train: dict[str, Any]) -> str:
    """The sampler's numerics in words, for the report."""
    dtype = "bfloat16 autocast" if train.get("sampler_dtype", "bfloat16") == "bfloat16" else "float32"
    bits = train.get("sampler_bits", 0)
    return f"sampler: {dtype}" + (f" on {bits}-bit quantised weights" if bits else "") + "; trainer: float32"


def _families(config: dict[str, Any]) -> dict[str, list[tuple[int, str]]]:
    """Variants that differ only in their number of minibatch steps, grouped: ``{label: [(staleness,
    variant name), ...]}`` (staleness = minibatch steps - 1; the label is the least stale member's name)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for v in config.get("variants", []):
        steps = v.get("minibatches") or config["train"]["minibatches"]
        key = json.dumps({k: x for k, x in v.items() if k not in ("name", "minibatches")}, sort_keys=True)
        groups.setdefault(key, []).append((steps - 1, v["name"]))
    out = {}
    for members in groups.values():
        members.sort()
        out[members[0][1]] = members
    return out


def _rl_plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    plt = _plt()
    families = _families(config)
    present = {r["variant"] for r in results}
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", "-.", ":"]

    def style(i: int) -> dict[str, Any]:
        return {"color": cmap(i % 10), "ls": styles[(i // 10) % len(styles)]}

    out: list[tuple[str, Path]] = []
    stale = any(len(m) > 1 for m in families.values())
    if stale:  # 1. the study's question at a glance: final accuracy against staleness, one line per objective
        fig, (ax, ac) = plt.subplots(1, 2, figsize=(13, 4.2))
        for i, (label, members) in enumerate(families.items()):
            xs, ys, es, cs = [], [], [], []
            for k, name in members:
                rs = [r for r in results if r["variant"] == name]
                ok = [r["final_acc"] for r in rs if r.get("diverged_at") is None and r.get("final_acc") is not None]
                if not rs:
                    continue
                xs.append(k)
                ys.append(np.mean(ok) if ok else np.nan)
                es.append(np.std(ok) if len(ok) > 1 else 0.0)
                cs.append(sum(r.get("collapsed_at") is not None or r.get("diverged_at") is not None for r in rs)
                          / len(rs))
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=1.4, label=label, **style(i))
            ac.plot(xs, cs, marker="o", lw=1.4, label=label, **style(i))
        ticks = sorted({k for m in families.values() for k, _ in m})
        ax.set_xticks(ticks)
        ac.set_xticks(ticks)
        ax.set(xlabel="staleness (updates behind the sampler)", ylabel="held-out accuracy at the end",
               title="Final held-out accuracy vs staleness (mean ± std over seeds)")
        ac.set(xlabel="staleness (updates behind the sampler)", ylabel="share of runs", ylim=(-0.05, 1.05),
               title="Collapsed or diverged runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = run_dir / "rl_staleness.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(("Each objective on-policy and stale: the end point of every run, and how many collapsed", p))

    if stale:  # 1b. small multiples: one panel per staleness, one line per objective, band and thin seeds
        ticks = sorted({k for m in families.values() for k, _ in m})
        fig, axes = plt.subplots(1, len(ticks), figsize=(4.4 * len(ticks), 3.6), squeeze=False, sharey=True)
        for ax, k in zip(axes[0], ticks, strict=True):
            for i, (label, members) in enumerate(families.items()):
                name = dict(members).get(k)
                rs = [r for r in results if r["variant"] == name and r.get("eval_acc")]
                if not rs:
                    continue
                n = min(len(r["eval_acc"]) for r in rs)
                x = np.array(rs[0]["eval_steps"][:n], dtype=float)
                ys = np.array([[np.nan if a is None else a for a in r["eval_acc"][:n]] for r in rs], dtype=float)
                m = np.nanmean(ys, axis=0)
                ax.plot(x, m, lw=1.6, label=label, **style(i))
                if len(rs) > 1:
                    ax.fill_between(x, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=cmap(i % 10), alpha=0.12)
                    for y in ys:
                        ax.plot(x, y, lw=0.5, alpha=0.5, color=cmap(i % 10))
            ax.set(title=f"staleness {k}", xlabel="RL step", ylim=(-0.02, 1.02))
        axes[0][0].set_ylabel("held-out accuracy")
        axes[0][0].legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        p = run_dir / "rl_by_staleness.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(("Held-out accuracy during RL, one panel per staleness, one line per objective (mean; band: "
                    "range over seeds; thin: each seed)", p))

    # 2. curves: one line per objective (its least stale member) so the panels stay readable
    shown = [(label, members[0][1]) for label, members in families.items() if members[0][1] in present]
    shown += [(v, v) for v in dict.fromkeys(r["variant"] for r in results) if v not in {n for _, n in shown}
              and not any(v == n for m in families.values() for _, n in m)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = [("reward", "training reward"), ("entropy", "token entropy"), (None, "held-out accuracy (greedy)"),
              ("mismatch_abs", "train-inference mismatch |log ρ|"), ("clip_frac", "clip fraction"),
              ("grad_norm", "gradient norm")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, (label, v) in enumerate(shown):
            rs = [x for x in results if x["variant"] == v]
            if key is None:
                n = min(len(r["eval_acc"]) for r in rs)
                y = np.mean([r["eval_acc"][:n] for r in rs], axis=0)
                ax.plot(rs[0]["eval_steps"][:n], y, marker=".", lw=1.3, label=label, **style(i))
            else:
                n = min(len(r["curves"].get(key, [])) for r in rs)
                if n == 0:
                    continue
                y = np.mean([r["curves"][key][:n] for r in rs], axis=0)
                ax.plot(range(1, n + 1), y, lw=1.2, label=label, **style(i))
            for r in rs:
                event = r.get("collapsed_at") or r.get("diverged_at")
                if event:
                    ax.axvline(event, lw=1, **style(i))
        ax.set(title=title, xlabel="RL step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    p = run_dir / "rl_curves.png"
    fig.savefig(p, dpi=95)
    plt.close(fig)
    what = "each objective's least stale variant" if stale else "every variant"
    out.append((f"Mean over seeds, {what}: reward, entropy, held-out accuracy, mismatch, clip fraction and "
                "gradient norm (a vertical line marks a collapse or divergence)", p))
    return out


KIND = StudyKind(
    name="rl",
    Config=RLStudyConfig,
    example="rl-stability",
    variant_key="loss",
    validate=validate_rl,
    steps_per_run=lambda cfg: cfg.train.steps,
    describe=lambda cfg: f"{cfg.train.steps} RL steps",
    run_one=run_one_rl,
    summarize=lambda results, config: summarize_rl(results),
    tables=_rl_tables,
    plots=_rl_plots,
    columns=(("late_pass1", "pass@1 late"), ("final_acc", "held-out acc"), ("start_acc", "start"),
             ("final_reward", "reward"), ("final_entropy", "entropy"), ("collapsed", "collapsed"),
             ("seconds_per_step", "s/step")),
    quick=("seeds=[0]", "train.steps=10", "train.eval_problems=50"),
    resumable=True,
    large=25_000,
    resolve=resolve,
)

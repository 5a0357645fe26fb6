"""Typed study configuration: dataclasses, TOML recipes, ``key=value`` overrides.

A recipe is a TOML file whose tables mirror :class:`StudyConfig`. Loading checks every key
and type before anything runs: an unknown key, a value of the wrong type, or an unknown
registry name (stream, model, strategy, optimizer) raises :class:`ConfigError` naming the
key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from poise import _registry

__all__ = [
    "ConfigError",
    "EvalConfig",
    "StudyConfig",
    "TrainConfig",
    "VariantConfig",
    "LMConfig",
    "OptimStudyConfig",
    "OptimVariantConfig",
    "RLStudyConfig",
    "EditStudyConfig",
    "PrimingStudyConfig",
    "WorkloadConfig",
    "apply_overrides",
    "field_help",
    "find_recipe",
    "load_recipe",
    "recipe_names",
]

DEFAULT_RECIPE = "stability-gap"
OPTIMIZERS = ("sgd", "adam", "adamw")


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key and the valid choices."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class WorkloadConfig:
    stream: str = _help("continual stream (registry 'stream')", default="split-digits")
    scenario: str = _help("split-digits: 'class' (one head) or 'task' (task id known); "
                          "rotated/permuted: 'domain'", default="class")
    n_tasks: int = _help("number of tasks in the stream", default=5)
    model: str = _help("classifier (registry 'model')", default="mlp")
    hidden: int = _help("hidden width of the model", default=256)
    depth: int = _help("hidden layers of the MLP", default=2)


@dataclass
class TrainConfig:
    optimizer: str = _help("torch optimizer: sgd, adam or adamw", default="sgd")
    lr: float = _help("learning rate", default=0.05)
    momentum: float = _help("SGD momentum", default=0.0)
    weight_decay: float = _help("weight decay", default=0.0)
    batch_size: int = _help("training samples per step (current task)", default=32)
    steps_per_task: int = _help("optimizer steps on each task", default=300)


@dataclass
class EvalConfig:
    dense_steps: int = _help("evaluate every step for this many steps after each task "
                             "boundary", default=0)
    every: int = _help("then evaluate every this many steps (1 = per-iteration)", default=1)
    subset_size: int = _help("evaluate each task on a fixed seeded subset of this many "
                             "samples (0 = all)", default=0)
    budget: float = _help("cap scheduled evaluation samples at budget x training samples "
                          "(0 = no cap)", default=0.0)
    windows: list[int] = _help("window sizes w of WF^w / WP^w, in evaluations",
                               default_factory=lambda: [10])
    gap_eps: float = _help("stability-gap recovery tolerance (accuracy)", default=0.02)


@dataclass
class VariantConfig:
    name: str = _help("label of this variant in tables and plots", default="")
    strategy: str = _help("continual strategy (registry 'strategy')", default="finetune")
    params: dict[str, Any] = _help("keyword arguments of the strategy", default_factory=dict)


def _default_variants() -> list[VariantConfig]:
    return [VariantConfig(n, n) for n in ("finetune", "replay", "ewc", "agem", "ogpsa")]


@dataclass
class StudyConfig:
    name: str = _help("study name (names the run directory)", default=DEFAULT_RECIPE)
    description: str = _help("one paragraph shown at the top of the report", default="")
    seeds: list[int] = _help("seeds; every variant runs once per seed",
                             default_factory=lambda: [0, 1, 2])
    threads: int = _help("torch intra-op threads (tiny models run fastest on 1)", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    workload: WorkloadConfig = _help("the stream and model", default_factory=WorkloadConfig)
    train: TrainConfig = _help("the optimizer and steps", default_factory=TrainConfig)
    eval: EvalConfig = _help("continual evaluation", default_factory=EvalConfig)
    variants: list[VariantConfig] = _help("the update rules compared ([[variants]] tables)",
                                          default_factory=_default_variants)


@dataclass
class LMConfig:
    corpus: str = _help("generated corpus: 'arithmetic' (a+b=c and a*b=c lines)", default="arithmetic")
    digits: int = _help("operand digits of the arithmetic corpus", default=2)
    n_layer: int = _help("GPT layers", default=2)
    n_head: int = _help("GPT attention heads", default=2)
    n_embd: int = _help("GPT width", default=64)
    block_size: int = _help("context length in characters", default=32)
    batch_size: int = _help("sequences per step", default=32)
    steps: int = _help("optimizer steps per run", default=300)
    eval_every: int = _help("validation loss every this many steps", default=25)


@dataclass
class OptimVariantConfig:
    name: str = _help("label of this variant", default="")
    optimizer: str = _help("optimizer (registry 'optimizer')", default="adamw")
    params: dict[str, Any] = _help("constructor arguments; for galore_adamw also the group keys rank, "
                                   "update_proj_gap, scale, proj_type (applied to 2-D weights)",
                                   default_factory=dict)


@dataclass
class OptimStudyConfig:
    kind: str = _help("'optimizers': optimizers compared on a tiny language model", default="optimizers")
    name: str = _help("study name (names the run directory)", default="optimizers")
    description: str = _help("one paragraph shown at the top of the report", default="")
    seeds: list[int] = _help("seeds; every variant runs once per seed", default_factory=lambda: [0, 1, 2])
    threads: int = _help("torch intra-op threads", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    spike_factor: float = _help("a loss spike: training loss above this factor times its running EMA",
                                default=1.5)
    divergence_factor: float = _help("diverged: loss non-finite or above this factor times the initial loss",
                                     default=2.0)
    lm: LMConfig = _help("the tiny GPT and its data", default_factory=LMConfig)
    variants: list[OptimVariantConfig] = _help("the optimizers compared ([[variants]] tables)",
                                               default_factory=list)


GALORE_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def validate_optim(cfg: OptimStudyConfig) -> OptimStudyConfig:
    if cfg.lm.corpus != "arithmetic":
        raise ConfigError(f"lm.corpus: unknown corpus {cfg.lm.corpus!r}; valid choices: arithmetic")
    for key in ("digits", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "eval_every"):
        if getattr(cfg.lm, key) <= 0:
            raise ConfigError(f"lm.{key}={getattr(cfg.lm, key)} must be > 0")
    if cfg.lm.n_embd % cfg.lm.n_head:
        raise ConfigError(f"lm.n_embd={cfg.lm.n_embd} must be a multiple of lm.n_head={cfg.lm.n_head}")
    for i, v in enumerate(_check_variants(cfg, "optimizer")):
        key = f"variants[{i}]"
        cls = _registry.get("optimizer", v.optimizer)
        allowed = [k for k in list(inspect.signature(cls.__init__).parameters)[2:] if k != "diagnostics"]
        if v.optimizer.startswith("galore"):
            allowed += list(GALORE_GROUP_KEYS)
        for p in v.params:
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown argument of optimizer {v.optimizer!r}; "
                                  f"valid: {', '.join(allowed)}")
        try:  # let the optimizer's own checks run now, before any training
            from torch import nn

            from poise.runs.optim_study import make_optimizer

            make_optimizer(v, nn.Linear(4, 4))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: {e}") from None
    return cfg


@dataclass
class RLTaskConfig:
    name: str = _help("task with verifiable rewards: 'arithmetic' or 'countdown'", default="arithmetic")
    level: int = _help("difficulty: arithmetic digits (1-4), countdown numbers (2-4)", default=1)
    ops: str = _help("arithmetic operators, a subset of '+-*'", default="+")


@dataclass
class RLTrainConfig:
    model: str = _help("policy: 'gpt' (poise's own) or a Hugging Face model built from a config, 'llama' or "
                       "'qwen2' (needs transformers)", default="gpt")
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
    lr: float = _help("RL learning rate (AdamW)", default=1e-3)
    minibatches: int = _help("optimizer steps per rollout batch (1 = on-policy; k > 1 makes later "
                             "minibatches k-1 updates stale)", default=1)
    eval_every: int = _help("held-out greedy accuracy every this many steps", default=5)
    eval_problems: int = _help("held-out problems", default=100)
    collapse_reward: float = _help("collapsed: held-out accuracy below this after having been above twice it",
                                   default=0.05)
    async_eta: int = _help("asynchronous generation: a sampler thread runs ahead of training by at most this "
                           "many policy versions (AReaL's eta; 0 = synchronous). Results then depend on timing",
                           default=0)
    async_backend: str = _help("where asynchronous generation runs: 'thread' (this process) or 'ray' (a Ray "
                               "actor, the 'ray' extra; for rollouts on other machines)", default="thread")
    checkpoint_every: int = _help("write a checkpoint (safetensors + JSON, atomically) every this many steps; "
                                  "poise run --resume RUN_DIR continues from it (0 = never)", default=10)


@dataclass
class RLVariantConfig:
    name: str = _help("label of this variant", default="")
    loss: str = _help("objective (registry 'loss': pg, ppo_clip, gspo, cispo, sapo, minirl, decoupled_ppo)",
                      default="ppo_clip")
    advantage: str = _help("advantage estimator (registry 'advantage')", default="grpo")
    aggregation: str = _help("token_mean, seq_mean_token_mean, seq_mean_token_sum, token_sum", default="token_mean")
    is_level: str = _help("IS correction of the sampler mismatch: 'none', 'token', 'sequence', 'geometric'",
                          default="none")
    is_mode: str = _help("'truncate' (TIS) or 'mask' (MIS)", default="truncate")
    is_max: float = _help("IS bound", default=2.0)
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


def validate_rl(cfg: RLStudyConfig) -> RLStudyConfig:
    _choices("rl_task", cfg.task.name, "task.name")
    t = cfg.train
    if t.model not in ("gpt", "llama", "qwen2"):
        raise ConfigError(f"train.model: {t.model!r}; valid choices: gpt, llama, qwen2")
    if t.n_embd % t.n_head:
        raise ConfigError(f"train.n_embd={t.n_embd} must be a multiple of train.n_head={t.n_head}")
    if t.sampler_dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"train.sampler_dtype: {t.sampler_dtype!r}; valid choices: bfloat16, float32")
    for key in ("steps", "prompts", "group_size", "max_new_tokens", "minibatches", "eval_every", "eval_problems",
                "n_layer", "n_head", "n_embd", "block_size"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be > 0")
    if t.async_eta < 0:
        raise ConfigError(f"train.async_eta={t.async_eta} must be >= 0")
    if t.async_backend not in ("thread", "ray"):
        raise ConfigError(f"train.async_backend: {t.async_backend!r}; valid choices: thread, ray")
    if t.async_backend == "ray" and t.async_eta:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("train.async_backend='ray' needs Ray: pip install 'poise[ray]'") from None
    if t.group_size < 2:
        raise ConfigError(f"train.group_size={t.group_size} must be >= 2 (group-relative advantages)")
    try:
        _registry.get("rl_task", cfg.task.name)(level=cfg.task.level, **({"ops": cfg.task.ops}
                                                                        if cfg.task.name == "arithmetic" else {}))
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None
    from poise.rl import AGG_MODES

    for i, v in enumerate(_check_variants(cfg, "loss")):
        key = f"variants[{i}]"
        if v.loss not in RL_LOSSES:
            raise ConfigError(f"{key}.loss: {v.loss!r} is not a policy loss; valid choices: {', '.join(RL_LOSSES)}")
        _choices("advantage", v.advantage, f"{key}.advantage")
        if v.aggregation not in AGG_MODES or v.aggregation == "seq_sum_norm":
            raise ConfigError(f"{key}.aggregation: {v.aggregation!r}; valid choices: "
                              f"{', '.join(m for m in AGG_MODES if m != 'seq_sum_norm')}")
        if v.is_level not in ("none", "token", "sequence", "geometric"):
            raise ConfigError(f"{key}.is_level: {v.is_level!r}; valid choices: none, token, sequence, geometric")
        for fld, ok in (("token_select", ("none", "entropy_top")), ("token_weights", ("none", "steer")),
                        ("adaptive_clip", ("none", "bapo")), ("sampling", ("uniform", "dynamic", "reinforce_ada"))):
            if getattr(v, fld) not in ok:
                raise ConfigError(f"{key}.{fld}: {getattr(v, fld)!r}; valid choices: {', '.join(ok)}")
        if v.adaptive_clip == "bapo" and v.loss != "ppo_clip":
            raise ConfigError(f"{key}.adaptive_clip='bapo' needs loss='ppo_clip', not {v.loss!r}")
        if v.minibatches < 0:
            raise ConfigError(f"{key}.minibatches={v.minibatches} must be >= 0")
        if v.is_mode not in ("truncate", "mask"):
            raise ConfigError(f"{key}.is_mode: {v.is_mode!r}; valid choices: truncate, mask")
        allowed = [k for k, prm in inspect.signature(_registry.get("loss", v.loss)).parameters.items()
                   if prm.kind == inspect.Parameter.KEYWORD_ONLY]
        for p in v.params:
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown argument of loss {v.loss!r}; "
                                  f"valid: {', '.join(allowed) or '(none)'}")
    return cfg


RL_LOSSES = ("pg", "ppo_clip", "gspo", "cispo", "sapo", "minirl", "decoupled_ppo")


@dataclass
class FactLMConfig:
    n_facts: int = _help("facts the LM is trained on (edits rewrite some of them; the rest measure locality)",
                         default=3000)
    n_layer: int = _help("GPT layers", default=2)
    n_head: int = _help("GPT heads", default=2)
    n_embd: int = _help("GPT width", default=64)
    mlp_ratio: int = _help("MLP hidden size / width (the edited layer's key size is mlp_ratio * n_embd)", default=4)
    steps: int = _help("training steps", default=1500)
    batch_size: int = _help("sequences of 16 tokens per step", default=32)
    lr: float = _help("AdamW learning rate (cosine decay)", default=3e-3)


@dataclass
class EditStreamConfig:
    layer: int = _help("block whose MLP down-projection is edited", default=1)
    position: str = _help("where keys are read: 'last' (the prompt's last token) or 'subject' (ROME's subject "
                          "token)", default="last")
    n_edits: int = _help("counterfactual edits in the stream (at most n_facts minus n_locality)", default=1000)
    per_request: int = _help("edits per request (each editor call gets this many)", default=10)
    n_locality: int = _help("unedited known facts that measure locality (never preserved keys)", default=300)
    n_preserve: int = _help("unedited known facts whose keys are the preserved/anchor keys K0", default=1500)
    eval_every: int = _help("requests between retention checks", default=10)
    v_steps: int = _help("Adam steps of the target-value search (ROME's v*)", default=40)
    v_lr: float = _help("learning rate of the target-value search", default=0.5)
    v_clamp: float = _help("the value change is clamped to this times the layer output's norm", default=4.0)
    unlearn_every: int = _help("an unlearning request every this many edit requests (0 = none)", default=0)
    unlearn_n: int = _help("facts forgotten per unlearning request", default=10)
    unlearn_method: str = _help("'npo', 'grad_diff' or 'grad_ascent' on the edited layer", default="npo")
    unlearn_steps: int = _help("gradient steps per unlearning request", default=20)
    unlearn_lr: float = _help("SGD learning rate of unlearning", default=0.05)


@dataclass
class EditVariantConfig:
    name: str = _help("label", default="")
    editor: str = _help("'rome', 'memit', 'alphaedit', 'rlsedit' or 'none'", default="memit")
    sphere: bool = _help("project each update away from W's principal directions (SPHERE)", default=False)
    params: dict[str, Any] = _help("editor arguments: memit lam; alphaedit threshold, l2; rlsedit lam, mu; "
                                   "sphere beta, alpha", default_factory=dict)


@dataclass
class EditStudyConfig:
    kind: str = _help("'edit': closed-form editors on a stream of edits to a tiny fact LM", default="edit")
    name: str = _help("study name", default="edit-stream")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("seeds", default_factory=lambda: [0])
    threads: int = _help("torch threads", default=2)
    out_dir: str = _help("parent folder of run directories", default="runs")
    lm: FactLMConfig = _help("the fact LM", default_factory=FactLMConfig)
    stream: EditStreamConfig = _help("the edit stream", default_factory=EditStreamConfig)
    variants: list[EditVariantConfig] = _help("the editors compared ([[variants]] tables)", default_factory=list)


EDITORS = {"none": (), "rome": ("lam",), "memit": ("lam",), "alphaedit": ("threshold", "l2"),
           "rlsedit": ("lam", "mu")}


def _check_lm(lm: FactLMConfig) -> None:
    for key in ("n_facts", "n_layer", "n_head", "n_embd", "mlp_ratio", "steps", "batch_size"):
        if getattr(lm, key) <= 0:
            raise ConfigError(f"lm.{key}={getattr(lm, key)} must be > 0")
    if lm.n_embd % lm.n_head:
        raise ConfigError(f"lm.n_embd={lm.n_embd} must be a multiple of lm.n_head={lm.n_head}")
    if not lm.lr > 0:
        raise ConfigError(f"lm.lr={lm.lr} must be > 0")


def validate_edit(cfg: EditStudyConfig) -> EditStudyConfig:
    _check_lm(cfg.lm)
    s = cfg.stream
    if not 0 <= s.layer < cfg.lm.n_layer:
        raise ConfigError(f"stream.layer={s.layer}; valid: 0 to lm.n_layer-1 = {cfg.lm.n_layer - 1}")
    if s.position not in ("last", "subject"):
        raise ConfigError(f"stream.position: {s.position!r}; valid choices: last, subject")
    for key in ("n_edits", "per_request", "n_locality", "eval_every", "v_steps", "unlearn_n", "unlearn_steps"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"stream.{key}={getattr(s, key)} must be > 0")
    if s.n_preserve < 0 or s.unlearn_every < 0:
        raise ConfigError("stream.n_preserve and stream.unlearn_every must be >= 0")
    forget = (s.n_edits // s.per_request // s.unlearn_every) * s.unlearn_n if s.unlearn_every else 0
    need = s.n_edits + s.n_locality + s.n_preserve + forget
    if need > cfg.lm.n_facts:
        raise ConfigError(f"stream needs {need} facts (n_edits + n_locality + n_preserve + facts to forget) but "
                          f"lm.n_facts={cfg.lm.n_facts}: raise lm.n_facts or lower the stream")
    if s.unlearn_method not in ("npo", "grad_diff", "grad_ascent"):
        raise ConfigError(f"stream.unlearn_method: {s.unlearn_method!r}; valid choices: npo, grad_diff, grad_ascent")
    for i, v in enumerate(_check_variants(cfg, "editor", registry=False)):
        key = f"variants[{i}]"
        if v.editor not in EDITORS:
            raise ConfigError(f"{key}.editor: {v.editor!r}; valid choices: {', '.join(EDITORS)}")
        allowed = EDITORS[v.editor] + (("beta", "alpha") if v.sphere else ())
        for p, x in v.params.items():
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown argument of editor {v.editor!r}; "
                                  f"valid: {', '.join(allowed) or '(none)'}")
            if not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0:
                raise ConfigError(f"{key}.params.{p}={x!r} must be a number >= 0")
    return cfg


@dataclass
class PrimingConfig:
    n_probes: int = _help("new facts learned one at a time (each from the same trained LM)", default=48)
    learn_steps: int = _help("Adam steps that learn one fact (the fact in every batch, with replayed lines)",
                             default=10)
    learn_lr: float = _help("Adam learning rate while learning a fact", default=1e-3)
    replay: int = _help("known lines mixed into each learning batch", default=15)


@dataclass
class PrimingVariantConfig:
    name: str = _help("label", default="")
    stepping_stone: bool = _help("learn the fact's stepping-stone rewrite instead of the fact", default=False)
    ignore_k: float = _help("ignore-k: drop this fraction of the largest update coordinates (0 = off)", default=0.0)


@dataclass
class PrimingStudyConfig:
    kind: str = _help("'priming': how learning one new fact primes its keyword elsewhere", default="priming")
    name: str = _help("study name", default="priming")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("seeds", default_factory=lambda: [0])
    threads: int = _help("torch threads", default=2)
    out_dir: str = _help("parent folder of run directories", default="runs")
    lm: FactLMConfig = _help("the LM the facts are learned into", default_factory=lambda: FactLMConfig(n_facts=600))
    priming: PrimingConfig = _help("the insertion step", default_factory=PrimingConfig)
    variants: list[PrimingVariantConfig] = _help("insertion variants ([[variants]] tables)", default_factory=list)


def validate_priming(cfg: PrimingStudyConfig) -> PrimingStudyConfig:
    _check_lm(cfg.lm)
    p = cfg.priming
    for key in ("n_probes", "learn_steps"):
        if getattr(p, key) <= 0:
            raise ConfigError(f"priming.{key}={getattr(p, key)} must be > 0")
    if p.replay < 0 or not p.learn_lr > 0:
        raise ConfigError("priming.replay must be >= 0 and priming.learn_lr > 0")
    for i, v in enumerate(_check_variants(cfg, "name", registry=False)):
        if not v.name:
            raise ConfigError(f"variants[{i}].name is empty: give each priming variant a name")
        if not 0 <= v.ignore_k < 1:
            raise ConfigError(f"variants[{i}].ignore_k={v.ignore_k}; valid: [0, 1)")
    return cfg


# -- loading ---------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in valid:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown key {where!r}; valid keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(valid)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _choices(kind: str, value: str, key: str) -> None:
    names = _registry.names(kind)
    if value not in names:
        raise ConfigError(f"{key}: unknown {kind} {value!r}; valid choices: {', '.join(names)}")


# Strategy arguments that a recipe cannot set (callables, tensors, or set per run).
_NOT_FROM_RECIPE = {"loss_fn", "reference", "seed"}


def strategy_params(name: str) -> dict[str, inspect.Parameter]:
    cls = _registry.get("strategy", name)
    sig = inspect.signature(cls.__init__)
    return {k: p for k, p in list(sig.parameters.items())[1:] if k not in _NOT_FROM_RECIPE}


def _check_variants(cfg: Any, field_name: str, registry: bool = True) -> list[Any]:
    """Seeds and variants present; each variant's ``field_name`` a registered name (the
    registry kind of the same name, when ``registry``); names filled in and unique."""
    if not cfg.seeds:
        raise ConfigError("seeds is empty: give at least one seed")
    if not cfg.variants:
        raise ConfigError("variants is empty: give at least one [[variants]] table")
    seen = set()
    for i, v in enumerate(cfg.variants):
        key = f"variants[{i}]"
        if registry:
            _choices(field_name, getattr(v, field_name), f"{key}.{field_name}")
        v.name = v.name or getattr(v, field_name)
        if v.name in seen:
            raise ConfigError(f"{key}.name: duplicate variant name {v.name!r}")
        seen.add(v.name)
    return cfg.variants


def validate(cfg: StudyConfig) -> StudyConfig:
    """Check registry names, ranges and strategy parameters; raise :class:`ConfigError`."""
    _choices("stream", cfg.workload.stream, "workload.stream")
    _choices("model", cfg.workload.model, "workload.model")
    if cfg.train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer: unknown optimizer {cfg.train.optimizer!r}; "
                          f"valid choices: {', '.join(OPTIMIZERS)}")
    for key, v in [("train.lr", cfg.train.lr), ("train.batch_size", cfg.train.batch_size),
                   ("train.steps_per_task", cfg.train.steps_per_task), ("eval.every", cfg.eval.every),
                   ("workload.n_tasks", cfg.workload.n_tasks), ("workload.hidden", cfg.workload.hidden),
                   ("threads", cfg.threads)]:
        if v <= 0:
            raise ConfigError(f"{key}={v} must be > 0")
    for key, v in [("eval.dense_steps", cfg.eval.dense_steps), ("eval.subset_size", cfg.eval.subset_size),
                   ("eval.budget", cfg.eval.budget)]:
        if v < 0:
            raise ConfigError(f"{key}={v} must be >= 0")
    for i, v in enumerate(_check_variants(cfg, "strategy")):
        key = f"variants[{i}]"
        allowed = strategy_params(v.strategy)
        for p, val in v.params.items():
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown parameter of strategy {v.strategy!r}; "
                                  f"valid: {', '.join(allowed) or '(none)'}")
            default = allowed[p].default
            if default is not inspect.Parameter.empty and default is not None:
                want = type(default)
                ok = isinstance(val, want) and not (isinstance(val, bool) and want is not bool)
                if want is float and isinstance(val, int) and not isinstance(val, bool):
                    v.params[p] = float(val)
                    ok = True
                if not ok:
                    raise ConfigError(f"{key}.params.{p}: expected {want.__name__}, "
                                      f"got {type(val).__name__} {val!r}")
    # the stream's own checks (scenario, n_tasks) run when it is built: build it now
    try:
        _registry.get("stream", cfg.workload.stream)(n_tasks=cfg.workload.n_tasks,
                                                     scenario=cfg.workload.scenario)
    except ValueError as e:
        raise ConfigError(f"workload: {e}") from None
    return cfg


KINDS = ("continual", "optimizers", "rl", "edit", "priming")


def from_dict(data: dict[str, Any]) -> StudyConfig | OptimStudyConfig | RLStudyConfig:
    """Build and validate the config of a recipe; ``kind`` picks the schema."""
    kind = data.get("kind", "continual")
    if kind == "optimizers":
        return validate_optim(_from_dict(OptimStudyConfig, data))
    if kind == "rl":
        return validate_rl(_from_dict(RLStudyConfig, data))
    if kind == "edit":
        return validate_edit(_from_dict(EditStudyConfig, data))
    if kind == "priming":
        return validate_priming(_from_dict(PrimingStudyConfig, data))
    if kind != "continual":
        raise ConfigError(f"kind: unknown study kind {kind!r}; valid choices: {', '.join(KINDS)}")
    data = {k: v for k, v in data.items() if k != "kind"}
    return validate(_from_dict(StudyConfig, data))


# -- overrides -------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a recipe's raw dict. Keys are dotted
    (``train.lr=0.1``); ``variants.NAME.KEY`` addresses the variant called NAME
    (``variants.replay.params.mem_size=500``); values are TOML literals (``seeds=[0,1]``),
    anything else is taken as a string."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        i = 0
        while i < len(parts) - 1:
            part = parts[i]
            if node is data and part == "variants":
                if len(parts) < 3:
                    raise ConfigError(f"override {key!r}: use variants.NAME.KEY=VALUE")
                variants = data.setdefault("variants",
                                           [dataclasses.asdict(v) for v in _default_variants()])
                names = [v.get("name") or v.get("strategy") or v.get("optimizer") or v.get("loss") for v in variants]
                if parts[1] not in names:
                    raise ConfigError(f"override {key!r}: no variant {parts[1]!r}; "
                                      f"variants: {', '.join(map(str, names))}")
                node = variants[names.index(parts[1])]
                i += 2
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a table")
            i += 1
        node[parts[-1]] = _parse_value(text.strip())
    return data


# -- recipes ---------------------------------------------------------------------------------
def _builtin_dir() -> Any:
    return resources.files("poise") / "recipes"


def recipe_names() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def find_recipe(name_or_path: str | None) -> tuple[str, str]:
    """``(name, TOML text)`` of a recipe: a file path, ``recipes/<name>.toml`` under the
    current directory, or a built-in recipe name. None gives the default recipe."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {str(p)!r} does not exist")
        return p.stem, p.read_text()
    local = Path("recipes") / f"{name_or_path}.toml"
    if local.is_file():
        return name_or_path, local.read_text()
    builtin = _builtin_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return name_or_path, builtin.read_text()
    raise ConfigError(f"unknown recipe {name_or_path!r}; valid choices: {', '.join(recipe_names())} "
                      "(or a path to a .toml file)")


QUICK = {
    "continual": ["seeds=[0]", "train.steps_per_task=100"],
    "optimizers": ["seeds=[0]", "lm.steps=60"],
    "rl": ["seeds=[0]", "train.steps=10", "train.eval_problems=50"],
    "edit": ["seeds=[0]", "lm.n_facts=800", "lm.steps=300", "stream.n_edits=100", "stream.n_locality=100",
             "stream.n_preserve=300"],
    "priming": ["seeds=[0]", "lm.n_facts=200", "lm.steps=300", "priming.n_probes=6"],
}


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None,
                quick: bool = False) -> StudyConfig | OptimStudyConfig | RLStudyConfig:
    """Load, override and validate a recipe. ``quick`` first applies a smoke-test size
    (one seed, fewer steps: :data:`QUICK`); explicit overrides still win."""
    name, text = find_recipe(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {name!r} is not valid TOML: {e}") from None
    data.setdefault("name", name)
    pre = QUICK.get(data.get("kind", "continual"), []) if quick else []
    return from_dict(apply_overrides(data, [*pre, *(overrides or [])]))


def field_help(cls: Any = StudyConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every field, nested tables flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = ", ".join(v.name for v in default)
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows

"""The RL study: policy-gradient objectives compared on a tiny LM that learns a task with
verifiable rewards, under a real train-inference mismatch (bfloat16 sampler, float32
trainer) and optional staleness (several minibatch updates per rollout batch).

One run, top to bottom (:func:`run_one_rl`): warm start by supervised learning; then each
step samples ``group_size`` completions for ``prompts`` problems, scores them, computes
group advantages, recomputes the trainer's log-probs at the current version (``old``),
and takes ``minibatches`` optimizer steps, each on its share of the batch with the
variant's loss from :mod:`poise.rl` and its aggregation. Held-out greedy accuracy is
evaluated every ``eval_every`` steps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise import _registry
from poise.rl import (
    aggregate,
    bapo_bounds,
    completion_stats,
    entropy_topk_mask,
    get_loss,
    is_weights,
    masked_entropy_stats,
    masked_mean,
    steer_weights,
)
from poise.runs.config import RLStudyConfig, RLVariantConfig
from poise.runs.store import JsonlWriter
from poise.runs.study import _stats, execute
from poise.tasks.gpt import GPT, GPTConfig
from poise.tasks.lm import completion_batch, generate, sft_warmup, trainer_logprobs
from poise.tasks.text import CharTokenizer

__all__ = ["build_policy", "policy_loss", "run_one_rl", "run_rl_study", "summarize_rl"]


def _task(cfg: RLStudyConfig, seed: int) -> Any:
    cls = _registry.get("rl_task", cfg.task.name)
    kw = {"ops": cfg.task.ops} if cfg.task.name == "arithmetic" else {}
    return cls(level=cfg.task.level, seed=seed, **kw)


def build_policy(t: Any, vocab_size: int) -> torch.nn.Module:
    """The policy from the config: poise's GPT, or a Hugging Face Llama / Qwen2 causal LM built
    from a config (random weights, no download)."""
    if t.model == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=t.block_size, n_layer=t.n_layer, n_head=t.n_head,
                             n_embd=t.n_embd))
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"train.model={t.model!r} needs transformers: pip install 'poise[hf]'") from e
    kw = dict(vocab_size=vocab_size, hidden_size=t.n_embd, intermediate_size=4 * t.n_embd,
              num_hidden_layers=t.n_layer, num_attention_heads=t.n_head, num_key_value_heads=t.n_head,
              max_position_embeddings=t.block_size, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if t.model == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))


def policy_loss(v: RLVariantConfig, logp: torch.Tensor, old: torch.Tensor, behav: torch.Tensor,
                adv: torch.Tensor, mask: torch.Tensor,
                entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The variant's per-token loss values, the mask to aggregate them with, and metrics.

    Token selection (``entropy_top``) shrinks the aggregation mask to the selected tokens
    (the authors' normaliser); ``steer`` multiplies the values by STEER's weights; ``bapo``
    picks the clip bounds of ``ppo_clip`` from the batch before computing the loss.

    IS correction (``is_level`` != none) corrects the sampler mismatch: for ``pg`` the whole
    ratio ``pi_theta / mu`` is importance-weighted (the Qwen paper's "PG + IS"); for the
    clipped objectives the clip handles staleness and ``pi_old / mu`` weights the loss
    (verl's decoupled mode). ``minirl`` and ``decoupled_ppo`` carry their own weights."""
    fn = get_loss(v.loss)
    metrics: dict[str, torch.Tensor] = {}

    def weights(log_ratio: torch.Tensor) -> torch.Tensor | None:
        if v.is_level == "none":
            return None
        w = is_weights(log_ratio, mask, level=v.is_level, mode=v.is_mode, hi=v.is_max)
        metrics.update({f"is/{k}": x for k, x in w.metrics.items()})
        return w.weights

    params = dict(v.params)
    if v.adaptive_clip == "bapo":
        lo, hi, bm = bapo_bounds(torch.exp(logp.detach() - old), adv, mask)
        params.update(eps_low=1 - lo, eps_high=hi - 1)
        metrics.update(bm)
    if v.loss == "pg":
        out = fn(logp, adv, mask, weights=weights(logp.detach() - behav))
        values = out.values
    elif v.loss in ("minirl", "decoupled_ppo"):
        out = fn(logp, old, behav, adv, mask, **params)
        values = out.values
    else:
        out = fn(logp, old, adv, mask, **params)
        w = weights(old - behav)
        values = out.values if w is None else out.values * w
    metrics.update(out.metrics)
    agg_mask = mask
    if entropy is not None and v.token_select == "entropy_top":
        top = entropy_topk_mask(entropy, mask, v.entropy_ratio)
        agg_mask = mask * top
        metrics.update(masked_entropy_stats(entropy, mask, top))
    if entropy is not None and v.token_weights == "steer":
        sw = steer_weights(adv, entropy, old, logp.detach(), mask)
        values = values * sw
        metrics["steer/weight_mean"] = masked_mean(sw, mask)
    return values, agg_mask, metrics


@torch.no_grad()
def _held_out_accuracy(model: torch.nn.Module, tok: CharTokenizer, task: Any, problems: list,
                       max_new_tokens: int) -> float:
    rollouts = generate(model, tok, problems, group_size=1, max_new_tokens=max_new_tokens, greedy=True)
    return float(np.mean([task.reward(r.problem, r.text) for r in rollouts]))


def run_one_rl(cfg: RLStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
               progress: Any = None) -> dict[str, Any]:
    v, t = cfg.variants[variant_index], cfg.train
    tok = CharTokenizer()
    task = _task(cfg, seed)
    held = _task(cfg, 10_000 + seed).sample(t.eval_problems)
    torch.manual_seed(seed)
    model = build_policy(t, tok.vocab_size)
    if t.sft_steps:
        sft_warmup(model, tok, _task(cfg, 20_000 + seed), steps=t.sft_steps, lr=t.sft_lr, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    gen = torch.Generator().manual_seed(seed)
    advantage = _registry.get("advantage", v.advantage)
    dtype = torch.bfloat16 if t.sampler_dtype == "bfloat16" else None
    writer = JsonlWriter(metrics_path) if metrics_path else None
    curve: dict[str, list[float]] = {k: [] for k in ("reward", "entropy", "mismatch_abs", "grad_norm", "clip_frac")}
    eval_steps, eval_acc = [0], [_held_out_accuracy(model, tok, task, held, t.max_new_tokens)]
    collapsed_at = diverged_at = None
    bad_rewards = 0
    t0 = time.perf_counter()
    try:
        for step in range(1, t.steps + 1):
            rollouts = generate(model, tok, task.sample(t.prompts), group_size=t.group_size,
                                max_new_tokens=t.max_new_tokens, temperature=t.temperature, generator=gen,
                                dtype=dtype)
            rewards = []
            for r in rollouts:
                try:
                    x = float(task.reward(r.problem, r.text))
                    if not math.isfinite(x):
                        raise ValueError(f"reward {x}")
                except Exception:  # a broken reward drops the sample's signal, counted, never the run
                    x, bad_rewards = 0.0, bad_rewards + 1
                rewards.append(x)
            rewards_t = torch.tensor(rewards)
            groups = torch.tensor([r.group for r in rollouts])
            adv = advantage(rewards_t, groups)
            behav, mask = completion_batch(rollouts)
            with torch.no_grad():
                old = trainer_logprobs(model, rollouts)
            chunks = np.array_split(np.arange(len(rollouts)), v.minibatches or t.minibatches)
            rec: dict[str, Any] = {"step": step, "reward": float(rewards_t.mean())}
            for c in chunks:
                sub = [rollouts[i] for i in c]
                idx = torch.as_tensor(c)
                logp, ent = trainer_logprobs(model, sub, with_entropy=True)
                m = mask[idx][:, : logp.shape[1]]
                values, agg_mask, metrics = policy_loss(v, logp, old[idx][:, : logp.shape[1]],
                                                        behav[idx][:, : logp.shape[1]], adv[idx], m, ent)
                loss = aggregate(values, agg_mask, v.aggregation)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
                if not math.isfinite(float(loss.detach())) or not math.isfinite(gn):
                    diverged_at = step
                    break
                opt.step()
            if diverged_at:
                rec["diverged"] = True
            rec.update(completion_stats(ent, m, old[idx][:, : logp.shape[1]] - behav[idx][:, : logp.shape[1]]))
            rec.update({k: float(x) for k, x in metrics.items()})
            rec.update(loss=float(loss.detach()), grad_norm=gn)
            curve["reward"].append(rec["reward"])
            curve["entropy"].append(rec["entropy/mean"])
            curve["mismatch_abs"].append(rec["mismatch/abs_log_ratio"])
            curve["grad_norm"].append(gn)
            curve["clip_frac"].append(rec.get("clip_frac/region", 0.0))
            if step % t.eval_every == 0 or step == t.steps:
                acc = _held_out_accuracy(model, tok, task, held, t.max_new_tokens)
                eval_steps.append(step)
                eval_acc.append(acc)
                rec["held_out_acc"] = acc
                if collapsed_at is None and max(eval_acc) >= 2 * t.collapse_reward and acc < t.collapse_reward:
                    collapsed_at = step
            if writer:
                writer.write(rec)
            if progress is not None:
                progress(1)
            if diverged_at:
                if progress is not None:
                    progress(t.steps - step)
                break
    finally:
        if writer:
            writer.close()
    wall = time.perf_counter() - t0
    return {"variant": v.name, "seed": seed, "wall_seconds": wall, "curves": curve,
            "eval_steps": eval_steps, "eval_acc": eval_acc, "final_acc": eval_acc[-1],
            "collapsed_at": collapsed_at, "diverged_at": diverged_at, "bad_rewards": bad_rewards,
            "seconds_per_step": wall / max(1, len(curve["reward"]))}


def summarize_rl(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        out[variant] = {
            "final_acc": _stats([r["final_acc"] for r in rs]),
            "start_acc": _stats([r["eval_acc"][0] for r in rs]),
            "final_reward": _stats([float(np.mean(r["curves"]["reward"][-5:])) if r["curves"]["reward"] else math.nan
                                    for r in rs]),
            "final_entropy": _stats([r["curves"]["entropy"][-1] if r["curves"]["entropy"] else math.nan for r in rs]),
            "mismatch_abs": _stats([float(np.mean(r["curves"]["mismatch_abs"])) for r in rs]),
            "collapsed": {"count": sum(r["collapsed_at"] is not None or r["diverged_at"] is not None for r in rs),
                          "runs": len(rs)},
            "seconds_per_step": _stats([r["seconds_per_step"] for r in rs]),
            "seeds": [r["seed"] for r in rs],
        }
    return out


def run_rl_study(cfg: RLStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                 report: bool = True) -> Path:
    """Run every objective x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, cfg.train.steps, run_one_rl, summarize_rl, "rl")

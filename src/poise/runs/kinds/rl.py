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

import copy
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise import _registry
from poise.rl import (
    AdaSampler,
    aggregate,
    bapo_bounds,
    completion_stats,
    dynamic_sampling_keep,
    entropy_topk_mask,
    get_loss,
    global_stat_advantage,
    is_weights,
    masked_entropy_stats,
    masked_mean,
    steer_weights,
)
from poise.runs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from poise.runs.config import RLStudyConfig, RLVariantConfig
from poise.runs.store import JsonlWriter, truncate_jsonl
from poise.runs.study import _stats, execute
from poise.tasks.gpt import GPT, GPTConfig
from poise.tasks.lm import completion_batch, generate, sft_warmup, trainer_logprobs
from poise.tasks.text import CharTokenizer

__all__ = ["AsyncSampler", "RaySampler", "build_policy", "collect", "policy_loss", "run_one_rl", "run_rl_study",
           "summarize_rl"]


def _task(cfg: RLStudyConfig, seed: int) -> Any:
    cls = _registry.get("rl_task", cfg.task.name)
    kw = {"ops": cfg.task.ops} if cfg.task.name == "arithmetic" else {}
    return cls(level=cfg.task.level, seed=seed, **kw)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _score(task: Any, rollouts: list) -> tuple[list, list[dict[str, str]]]:
    """Score the rollouts; returns the ones with a valid reward (``r.reward`` set) and one
    record (prompt, completion, error) per dropped sample. A reward function that raises or
    returns a non-finite value drops that sample from the batch (it would otherwise train as
    a wrong answer); the run goes on and reports the failures."""
    kept, failures = [], []
    for r in rollouts:
        try:
            x = float(task.reward(r.problem, r.text))
            if not math.isfinite(x):
                raise ValueError(f"reward function returned {x}")
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported, never fatal
            failures.append({"prompt": r.problem.prompt, "completion": r.text, "error": f"{type(e).__name__}: {e}"})
            continue
        r.reward = x
        kept.append(r)
    return kept, failures


def collect(v: RLVariantConfig, t: Any, model: torch.nn.Module, tok: CharTokenizer, task: Any,
            gen: torch.Generator, dtype: torch.dtype | None) -> tuple[list, torch.Tensor, torch.Tensor, int, list]:
    """One step's training samples by the variant's sampling strategy: ``(rollouts, rewards,
    advantages, samples generated, reward failures)``; group ids are renumbered 0..G-1.
    Returning the failures (rather than keeping them in module state) lets a Ray actor
    report them too."""
    advantage = _registry.get("advantage", v.advantage)

    def sample(problems: list, n: int) -> list:
        return generate(model, tok, problems, group_size=n, max_new_tokens=t.max_new_tokens,
                        temperature=t.temperature, generator=gen, dtype=dtype)

    if v.sampling == "uniform":
        batch = sample(task.sample(t.prompts), t.group_size)
        rollouts, bad = _score(task, batch)  # bad: the failure records
        generated = len(batch)
    if v.sampling == "dynamic":
        kept: list = []
        generated, bad = 0, []
        for _ in range(v.max_gen_batches):
            batch = sample(task.sample(t.prompts), t.group_size)
            generated += len(batch)
            batch, b = _score(task, batch)
            bad += b
            if not batch:
                continue
            rw = torch.tensor([r.reward for r in batch])
            keep, _ = dynamic_sampling_keep(rw, torch.tensor([r.group for r in batch]))
            start = len({id(r.problem) for r in kept})
            for r, k in zip(batch, keep.tolist(), strict=True):
                if k:
                    r.group += 10_000 * (start + 1)
                    kept.append(r)
            if len(kept) >= t.prompts * t.group_size:
                break
        rollouts = kept[: t.prompts * t.group_size] or batch
    elif v.sampling == "reinforce_ada":
        problems = task.sample(t.prompts)
        ada = AdaSampler(len(problems), n=t.group_size, round_repeat=max(2, t.group_size // 2),
                         max_rounds=v.ada_rounds)
        pool: list[list] = [[] for _ in problems]
        generated, bad = 0, []
        while active := ada.active():
            batch = sample([problems[i] for i in active], ada.round_repeat)
            generated += len(batch)
            batch, b = _score(task, batch)
            bad += b
            ids = [active[r.group] for r in batch]
            for i, r in zip(ids, batch, strict=True):
                r.group = i
                pool[i].append(r)
            ada.update(ids, [r.reward for r in batch])
        picks, counts = ada.select()
        rollouts = [pool[i][k] for i, ks in enumerate(picks) for k in ks]
        groups = torch.tensor([r.group for r in rollouts])
        rewards = torch.tensor([r.reward for r in rollouts])
        p = torch.tensor([counts[int(g)][0] for g in groups])
        q = torch.tensor([counts[int(g)][1] for g in groups])
        return rollouts, rewards, global_stat_advantage(rewards, groups, p, q), generated, bad
    if not rollouts:
        return [], torch.zeros(0), torch.zeros(0), generated, bad
    remap = {g: k for k, g in enumerate(dict.fromkeys(r.group for r in rollouts))}
    for r in rollouts:
        r.group = remap[r.group]
    rewards = torch.tensor([r.reward for r in rollouts])
    return rollouts, rewards, advantage(rewards, torch.tensor([r.group for r in rollouts])), generated, bad


@torch.no_grad()
def _held_out_accuracy(model: torch.nn.Module, tok: CharTokenizer, task: Any, problems: list,
                       max_new_tokens: int, failures: list[dict[str, str]] | None = None) -> float:
    rollouts = generate(model, tok, problems, group_size=1, max_new_tokens=max_new_tokens, greedy=True)
    kept, bad = _score(task, rollouts)
    if failures is not None:
        failures.extend(bad)
    return sum(r.reward for r in kept) / max(1, len(rollouts))  # a failed reward counts as wrong here


def run_one_rl(cfg: RLStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
               progress: Any = None) -> dict[str, Any]:
    v, t = cfg.variants[variant_index], cfg.train
    rank, world = _world()
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
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr)
    gen = torch.Generator().manual_seed(seed if rank == 0 else seed + 7919 * rank)
    dtype = torch.bfloat16 if t.sampler_dtype == "bfloat16" else None
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
        curve = {k: [] for k in ("reward", "entropy", "mismatch_abs", "grad_norm", "clip_frac")}
        eval_failures: list[dict[str, str]] = []
        eval_steps, eval_acc = [0], [_held_out_accuracy(model, tok, task, held, t.max_new_tokens, eval_failures)]
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
        sampler = RaySampler(model, t.async_eta, t.steps - start + 1, v, t, task, seed, start_version=start - 1)
    elif t.async_eta:
        sampler = AsyncSampler(model, t.async_eta, t.steps - start + 1,
                               lambda m: collect(v, t, m, tok, task, gen, dtype), start_version=start - 1)
    t0 = time.perf_counter()
    try:
        for step in range(start, t.steps + 1):
            version_gap = 0
            if sampler is None:
                rollouts, rewards_t, adv, n_generated, bad = collect(v, t, model, tok, task, gen, dtype)
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
            chunks = np.array_split(np.arange(len(rollouts)), v.minibatches or t.minibatches)
            if len(chunks) > 1:  # pi_old: the trainer's log-probs before this batch's first update
                with torch.no_grad():
                    old = trainer_logprobs(model, rollouts)
            else:  # on-policy: pi_old is the current policy; its log-probs come with the forward below
                old = None
            rec: dict[str, Any] = {"step": step, "reward": _mean_over_ranks(float(rewards_t.mean()), world),
                                   "samples_generated": generated_total, "bad_rewards": bad_rewards,
                                   "staleness/version_gap": version_gap}
            for c in chunks:
                sub = [rollouts[i] for i in c]
                idx = torch.as_tensor(c)
                logp, ent = trainer_logprobs(trainer, sub, with_entropy=True)
                m = mask[idx][:, : logp.shape[1]]
                old_c = logp.detach() if old is None else old[idx][:, : logp.shape[1]]
                values, agg_mask, metrics = policy_loss(v, logp, old_c, behav[idx][:, : logp.shape[1]], adv[idx], m,
                                                        ent)
                loss = aggregate(values, agg_mask, v.aggregation)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
                if _any_rank(not math.isfinite(float(loss.detach())) or not math.isfinite(gn), world):
                    diverged_at = step
                    break
                opt.step()
            if sampler is not None:
                sampler.publish(model)
            if diverged_at:
                rec["diverged"] = True
            rec.update(completion_stats(ent, m, old_c - behav[idx][:, : logp.shape[1]]))
            rec.update({k: float(x) for k, x in metrics.items()})
            rec.update(loss=float(loss.detach()), grad_norm=gn)
            curve["reward"].append(rec["reward"])
            curve["entropy"].append(rec["entropy/mean"])
            curve["mismatch_abs"].append(rec["mismatch/abs_log_ratio"])
            curve["grad_norm"].append(gn)
            curve["clip_frac"].append(rec.get("clip_frac/region", 0.0))
            if step % t.eval_every == 0 or step == t.steps:
                eval_failures = []
                acc = _held_out_accuracy(model, tok, task, held, t.max_new_tokens, eval_failures)
                record(eval_failures)
                eval_steps.append(step)
                eval_acc.append(acc)
                eval_samples.append(generated_total)
                rec["held_out_acc"] = acc
                if collapsed_at is None and max(eval_acc) >= 2 * t.collapse_reward and acc < t.collapse_reward:
                    collapsed_at = step
            if writer:
                writer.write(rec)
            if rank == 0 and ckpt_dir and t.checkpoint_every and step % t.checkpoint_every == 0 and not diverged_at:
                save_checkpoint(ckpt_dir, step, model, opt, gen, {
                    "task_rng": task.rng.getstate(), "curves": curve, "eval_steps": eval_steps,
                    "eval_acc": eval_acc, "eval_samples": eval_samples, "collapsed_at": collapsed_at,
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
    return {"variant": v.name, "seed": seed, "wall_seconds": wall, "curves": curve,
            "eval_steps": eval_steps, "eval_acc": eval_acc, "eval_samples": eval_samples, "final_acc": eval_acc[-1],
            "samples_generated": generated_total,
            "collapsed_at": collapsed_at, "diverged_at": diverged_at, "bad_rewards": bad_rewards,
            "bad_reward_examples": examples,
            "seconds_per_step": wall / max(1, len(curve["reward"])),
            "world_size": world, "ranks_in_sync": _in_sync(model, world)}


class AsyncSampler:
    """Generation in a background thread, ahead of training by at most ``eta`` versions.

    The thread keeps its own copy of the policy, refreshed from the trainer's weights
    whenever the trainer has published a newer version, and produces batch ``k`` only once
    the trainer has reached version ``k - eta`` (AReaL's staleness bound, arXiv 2505.24298).
    :meth:`get` returns ``(batch, version it was generated with)``; the trainer calls
    :meth:`publish` after each optimizer step. Exceptions in the thread are re-raised in
    :meth:`get`.
    """

    def __init__(self, model: torch.nn.Module, eta: int, steps: int, produce: Any, start_version: int = 0):
        import queue
        import threading

        self.eta, self.steps, self.produce = eta, steps, produce
        self.sampler = copy.deepcopy(model)
        self.version = start_version  # the trainer's
        self.sampler_version = -1
        self.cond = threading.Condition()
        self.q: Any = queue.Queue()
        self.error: BaseException | None = None
        self._weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._weights_version = start_version
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for k in range(self.version, self.version + self.steps):
                with self.cond:
                    self.cond.wait_for(lambda k=k: self.stop or self.version >= k - self.eta)
                    if self.stop:
                        return
                    if self._weights_version != self.sampler_version:
                        self.sampler.load_state_dict(self._weights)
                        self.sampler_version = self._weights_version
                    used = self.sampler_version
                self.q.put((self.produce(self.sampler), used))
        except BaseException as e:  # noqa: BLE001 - handed to the trainer
            self.error = e
            self.q.put((None, -1))

    def get(self) -> tuple[Any, int]:
        batch, used = self.q.get()
        if self.error is not None:
            raise self.error
        return batch, used

    def publish(self, model: torch.nn.Module) -> None:
        with self.cond:
            self.version += 1
            self._weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._weights_version = self.version
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join(timeout=30)


class _RolloutWorker:
    """The Ray actor behind :class:`RaySampler`: a policy copy, the task and the sampling
    settings; ``produce(weights)`` loads the weights it is sent and returns one batch."""

    def __init__(self, model: torch.nn.Module, v: RLVariantConfig, t: Any, task: Any, seed: int):
        self.model, self.v, self.t, self.task = model, v, t, task
        self.tok = CharTokenizer()
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = torch.bfloat16 if t.sampler_dtype == "bfloat16" else None

    def produce(self, weights: dict[str, torch.Tensor]) -> tuple:
        self.model.load_state_dict(weights)
        return collect(self.v, self.t, self.model, self.tok, self.task, self.gen, self.dtype)


class RaySampler:
    """:class:`AsyncSampler`'s interface on a Ray actor (the optional ``ray`` extra), so that
    generation can live on another machine of a Ray cluster. Up to ``eta + 1`` batches are in
    flight; batch ``k`` is requested with the weights of version ``k - eta`` (or the start),
    so it trains at most ``eta`` versions stale. Weights travel through Ray's object store."""

    def __init__(self, model: torch.nn.Module, eta: int, steps: int, v: RLVariantConfig, t: Any, task: Any,
                 seed: int, start_version: int = 0):
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.worker = ray.remote(_RolloutWorker).remote(copy.deepcopy(model), v, t, task, seed)
        self.version, self.remaining, self.pending = start_version, steps, []
        weights = ray.put({k: x.detach().clone() for k, x in model.state_dict().items()})
        for _ in range(min(eta + 1, steps)):
            self._submit(weights)

    def _submit(self, weights: Any) -> None:
        self.pending.append((self.worker.produce.remote(weights), self.version))
        self.remaining -= 1

    def get(self) -> tuple[Any, int]:
        ref, used = self.pending.pop(0)
        return self.ray.get(ref), used

    def publish(self, model: torch.nn.Module) -> None:
        self.version += 1
        if self.remaining > 0:
            self._submit(self.ray.put({k: x.detach().clone() for k, x in model.state_dict().items()}))

    def close(self) -> None:
        self.ray.kill(self.worker)


def _tuplify(x: Any) -> Any:
    """JSON turned random.getstate()'s tuples into lists; turn them back."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


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
    return execute(cfg, run_dir, progress, report, cfg.train.steps, run_one_rl, summarize_rl, "rl",
                   resumable=True)

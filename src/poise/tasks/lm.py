"""Language-model helpers for RL on the reasoning tasks: sampling groups of completions,
recomputing their log-probabilities, a supervised warm start. They take any causal LM
whose forward maps token ids ``[B, T]`` to logits ``[B, T, V]`` (poise's :class:`GPT`, or
a Hugging Face ``PreTrainedModel`` through its ``.logits``).

Prompts of the same length are batched together (no padding inside a prompt, so models
without attention masks stay exact); completions are right-padded, which a causal model
never sees from earlier positions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.measure.evaluator import logits_of
from poise.tasks.reasoning import EOS, Problem
from poise.tasks.text import CharTokenizer

__all__ = ["Rollout", "completion_batch", "generate", "sft_warmup", "trainer_logprobs"]


@dataclass
class Rollout:
    """One sampled completion: ids, the sampler's log-prob of each sampled token, text."""

    problem: Problem
    prompt_ids: Tensor
    completion_ids: Tensor
    sampler_logp: Tensor
    text: str
    group: int
    reward: float = 0.0
    extra: dict = field(default_factory=dict)


def _by_length(items: Sequence[int], length: Callable[[int], int]) -> dict[int, list[int]]:
    buckets: dict[int, list[int]] = defaultdict(list)
    for i in items:
        buckets[length(i)].append(i)
    return buckets


@torch.no_grad()
def generate(model: nn.Module, tokenizer: CharTokenizer, problems: Sequence[Problem], *, group_size: int = 8,
             max_new_tokens: int = 8, temperature: float = 1.0, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None, greedy: bool = False) -> list[Rollout]:
    """Sample ``group_size`` completions per problem (stopping at EOS or ``max_new_tokens``)
    and record the sampler's log-probabilities. ``dtype=torch.bfloat16`` runs the sampler's
    forward in bfloat16 autocast: a real train-inference mismatch against a float32 trainer.
    ``greedy`` takes the most likely token (evaluation)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    eos = tokenizer.encode(EOS)[0]
    was = model.training
    model.eval()
    out: list[Rollout] = []
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    try:
        for _, idx in sorted(_by_length(range(len(problems)), lambda i: len(prompts[i])).items()):
            x = torch.stack([prompts[i] for i in idx for _ in range(group_size)])
            n, p_len = x.shape
            logps = torch.zeros(n, max_new_tokens)
            done = torch.zeros(n, dtype=torch.bool)
            lengths = torch.full((n,), max_new_tokens)
            for t in range(max_new_tokens):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = logits_of(model(x))[:, -1].float()
                lp = F.log_softmax(logits / temperature, -1)
                if greedy:
                    tok = lp.argmax(-1)
                else:
                    tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(1)
                logps[:, t] = lp.gather(1, tok[:, None]).squeeze(1)
                x = torch.cat([x, tok[:, None]], 1)
                newly = (~done) & (tok == eos)
                lengths[newly] = t + 1
                done |= newly
                if done.all():
                    break
            for row in range(n):
                k = int(lengths[row])
                comp = x[row, p_len : p_len + k]
                i = idx[row // group_size]
                out.append(Rollout(problems[i], prompts[i], comp.clone(), logps[row, :k].clone(),
                                   tokenizer.decode(comp), group=i))
    finally:
        model.train(was)
    return sorted(out, key=lambda r: r.group)  # stable: completions keep their order within a group


def completion_batch(rollouts: Sequence[Rollout]) -> tuple[Tensor, Tensor]:
    """``(sampler_logp [N, T], mask [N, T])``, right-padded to the longest completion."""
    T = max(len(r.completion_ids) for r in rollouts)
    logp = torch.zeros(len(rollouts), T)
    mask = torch.zeros(len(rollouts), T)
    for i, r in enumerate(rollouts):
        k = len(r.completion_ids)
        logp[i, :k] = r.sampler_logp
        mask[i, :k] = 1
    return logp, mask


def trainer_logprobs(model: nn.Module, rollouts: Sequence[Rollout], temperature: float = 1.0,
                     with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(completion token | prefix) ``[N, T]`` under ``model`` (with grad), right-padded
    like :func:`completion_batch` (zeros on padding); with ``with_entropy`` also the
    full-vocabulary entropy of each position (detached)."""
    T = max(len(r.completion_ids) for r in rollouts)
    rows: list[tuple[int, Tensor]] = []
    ents: list[tuple[int, Tensor]] = []
    for _, idx in _by_length(range(len(rollouts)), lambda i: len(rollouts[i].prompt_ids)).items():
        p_len = len(rollouts[idx[0]].prompt_ids)
        t_max = max(len(rollouts[i].completion_ids) for i in idx)
        x = torch.zeros(len(idx), p_len + t_max, dtype=torch.long)
        for j, i in enumerate(idx):
            r = rollouts[i]
            x[j, :p_len] = r.prompt_ids
            x[j, p_len : p_len + len(r.completion_ids)] = r.completion_ids
        logits = logits_of(model(x))[:, p_len - 1 : p_len - 1 + t_max].float() / temperature
        full = F.log_softmax(logits, -1)
        lp = full.gather(2, x[:, p_len : p_len + t_max, None]).squeeze(2)
        if with_entropy:
            h = -(full.detach().exp() * full.detach()).sum(-1)
        for j, i in enumerate(idx):
            rows.append((i, F.pad(lp[j], (0, T - t_max))))
            if with_entropy:
                ents.append((i, F.pad(h[j], (0, T - t_max))))
    rows.sort(key=lambda t: t[0])
    out = torch.stack([row for _, row in rows])
    _, mask = completion_batch(rollouts)
    if not with_entropy:
        return out * mask
    ents.sort(key=lambda t: t[0])
    return out * mask, torch.stack([e for _, e in ents]) * mask


def sft_warmup(model: nn.Module, tokenizer: CharTokenizer, task, *, steps: int = 200, batch_size: int = 32,
               lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Supervised warm start: cross-entropy on the demonstration tokens only (the prompt is
    context), so that RL starts from a non-zero reward. Returns the losses."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        problems = task.sample(batch_size)
        rollouts = []
        for i, p in enumerate(problems):
            demo = tokenizer.encode(task.demonstration(p))
            rollouts.append(Rollout(p, tokenizer.encode(p.prompt), demo, torch.zeros(len(demo)), "", i))
        logp = trainer_logprobs(model, rollouts)
        _, mask = completion_batch(rollouts)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses

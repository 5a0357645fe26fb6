"""The sample stage of RL for language models, as library code with explicit arguments.

* :func:`generate` samples groups of completions and records the sampler's log-probabilities;
  :func:`trainer_logprobs` recomputes them under the trainer; :func:`completion_batch` pads
  them; :func:`sft_warmup` is a supervised warm start. They take any causal LM whose forward
  maps token ids ``[B, T]`` to logits ``[B, T, V]`` (poise's :class:`GPT`, or a Hugging Face
  ``PreTrainedModel`` through its ``.logits``). Prompts of the same length are batched
  together (no padding inside a prompt, so models without attention masks stay exact);
  completions are right-padded, which a causal model never sees from earlier positions.
* :func:`collect` is one step's training samples by a sampling strategy (uniform groups, DAPO
  dynamic sampling, Reinforce-Ada), scored and with advantages; :func:`score_rollouts` drops
  samples whose reward function fails.
* :class:`AsyncSampler` (a thread) and :class:`RaySampler` (a Ray actor) generate ahead of
  training by at most ``eta`` policy versions (AReaL's staleness bound, arXiv 2505.24298).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise import _registry
from poise._nn import logits_of
from poise.rl.advantages import global_stat_advantage
from poise.rl.sampling import AdaSampler, dynamic_sampling_keep
from poise.tasks.reasoning import EOS, Problem
from poise.tasks.text import CharTokenizer

__all__ = ["SAMPLING_MODES", "AsyncSampler", "Collected", "RaySampler", "RewardTask", "Rollout", "collect",
           "completion_batch", "generate", "quantise_weights", "quantised_copy", "score_rollouts", "sft_warmup",
           "stochastic_forward", "trainer_logprobs"]

SAMPLING_MODES = ("uniform", "dynamic", "reinforce_ada")


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


def quantise_weights(w: Tensor, bits: int) -> Tensor:
    r"""Round-to-nearest symmetric fake quantisation of a weight matrix, one scale per output row
    (the absmax weight-only scheme of int8/int4 inference engines; GPTQ's RTN baseline, arXiv
    2210.17323): ``s_i = max_j |w_ij| / Q`` with ``Q = 2^(bits-1) - 1`` and
    ``w_q = s_i * clamp(round(w_ij / s_i), -Q, Q)``, returned in ``w``'s dtype. A row of zeros
    stays zero. ``bits`` from 2 to 16; 1-D tensors (biases, norms) are returned unchanged.

    >>> quantise_weights(torch.tensor([[1.0, 0.4, -0.2]]), 2)   # Q = 1, s = 1
    tensor([[1., 0., -0.]])
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r}: an integer from 2 to 16")
    if w.dim() < 2:
        return w
    q = 2 ** (bits - 1) - 1
    flat = w.detach().float().reshape(w.shape[0], -1)
    s = flat.abs().amax(1, keepdim=True) / q
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.clamp(torch.round(flat / s), -q, q) * s).reshape(w.shape).to(w.dtype)


def quantised_copy(model: nn.Module, bits: int) -> nn.Module:
    """A frozen copy of ``model`` whose parameters with two or more dimensions (embeddings,
    linear and output weights) are :func:`quantise_weights` to ``bits`` bits: an inference
    engine's weight-only quantised policy, while the trainer keeps the full-precision weights.
    Biases and norm scales stay as they are (as in weight-only int8/int4 serving)."""
    sampler = copy.deepcopy(model)
    with torch.no_grad():
        for p in sampler.parameters():
            p.requires_grad_(False)
            p.copy_(quantise_weights(p, bits))
    return sampler


_MIN_SHARED_TOKENS = 16  # below this many token rows, multi-threaded CPU GEMMs take another path (other bits)


def _distinct_active_rows(x: Tensor, cls: Tensor, done: Tensor) -> tuple[Tensor, Tensor | None]:
    """The rows of ``x`` that a generation step runs the model on: one per distinct unfinished
    prefix (``cls``: equal rows of ``x`` have equal ids), and for every row of ``x`` the index of its
    distinct row (a finished row points at row 0: its tokens past EOS are never used).
    ``(x, None)`` when that saves nothing."""
    act = (~done).nonzero().squeeze(1)
    ids, inv = torch.unique(cls[act], return_inverse=True)
    if len(ids) == len(x) or len(ids) * x.shape[1] < _MIN_SHARED_TOKENS:
        return x, None
    first = torch.full((len(ids),), len(x), dtype=torch.long).scatter_reduce(0, inv, act, "amin")
    where = torch.zeros(len(x), dtype=torch.long)
    where[act] = inv
    return x[first], where


@torch.no_grad()
def generate(model: nn.Module, tokenizer: CharTokenizer, problems: Sequence[Problem], *, group_size: int = 8,
             max_new_tokens: int = 8, temperature: float = 1.0, generator: torch.Generator | None = None,
             dtype: torch.dtype | None = None, greedy: bool = False,
             weight_bits: int | None = None, share_prefixes: bool = True) -> list[Rollout]:
    """Sample ``group_size`` completions per problem (stopping at EOS or ``max_new_tokens``)
    and record the sampler's log-probabilities. ``dtype=torch.bfloat16`` runs the sampler's
    forward in bfloat16 autocast: a real train-inference mismatch against a float32 trainer.
    ``weight_bits`` samples from :func:`quantised_copy` ``(model, weight_bits)`` (weight-only
    quantisation of the sampler, a larger and controlled mismatch; ``None`` = the model's own
    weights). ``greedy`` takes the most likely token (evaluation).

    ``share_prefixes`` (default) runs the model, for each new token, once per distinct unfinished
    prefix (a group's rows share their prompt, and often their first tokens) and copies the
    logits to the rows that share it; finished rows are not run (a token is still drawn for every
    row, so ``generator`` advances as before). The numbers are those of running every row where the
    CPU kernels give a row the same result whatever else is in the batch (measured: always with
    one thread; with two, batches of 12 token rows or more, so batches under 16 token rows are not
    shared; tests/rl/test_rollout_exact.py). ``False`` runs every row at every token."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if weight_bits is not None:
        model = quantised_copy(model, weight_bits)
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
            if share_prefixes:  # prefix ids: rows are equal iff their ids are (a group shares its prompt)
                seen: dict[tuple[int, ...], int] = {}
                cls = torch.tensor([seen.setdefault(tuple(prompts[i].tolist()), len(seen)) for i in idx])
                cls = cls.repeat_interleave(group_size)
            for t in range(max_new_tokens):
                rows, inv = _distinct_active_rows(x, cls, done) if share_prefixes else (x, None)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = logits_of(model(rows))[:, -1].float()
                if inv is not None:  # one forward per distinct unfinished prefix, copied to its rows
                    logits = logits[inv]
                lp = F.log_softmax(logits / temperature, -1)
                if greedy:
                    tok = lp.argmax(-1)
                else:
                    tok = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(1)
                logps[:, t] = lp.gather(1, tok[:, None]).squeeze(1)
                x = torch.cat([x, tok[:, None]], 1)
                if share_prefixes:
                    cls = torch.unique(cls * lp.shape[-1] + tok, return_inverse=True)[1]
                newly = (~done) & (tok == eos)
                lengths[newly] = t + 1
                done |= newly
                if done.all():
                    break
            ks = lengths.tolist()
            valid = torch.arange(x.shape[1] - p_len) < lengths[:, None]
            comps = x[:, p_len:][valid].split(ks)
            lps = logps[:, : x.shape[1] - p_len][valid].split(ks)
            for row, (comp, lp_row) in enumerate(zip(comps, lps, strict=True)):
                i = idx[row // group_size]
                comp = comp.clone()
                out.append(Rollout(problems[i], prompts[i], comp, lp_row.clone(), tokenizer.decode(comp), group=i))
    finally:
        model.train(was)
    return sorted(out, key=lambda r: r.group)  # stable: completions keep their order within a group


def _right_padded(rows: Sequence[Tensor], lengths: Sequence[int], out: Tensor) -> Tensor:
    """``out`` (zeros ``[N, T]``) with ``rows[i]`` written into the first ``lengths[i]`` places of row ``i``:
    one concatenation and one masked copy (the values of row-by-row assignment)."""
    if out.shape[1]:
        out[torch.arange(out.shape[1]) < torch.tensor(lengths)[:, None]] = torch.cat(list(rows)).to(out.dtype)
    return out


def completion_batch(rollouts: Sequence[Rollout]) -> tuple[Tensor, Tensor]:
    """``(sampler_logp [N, T], mask [N, T])``, right-padded to the longest completion."""
    lengths = [r.completion_ids.shape[0] for r in rollouts]
    T = max(lengths)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).to(torch.get_default_dtype())
    logp = torch.zeros(len(rollouts), T)
    if all(r.sampler_logp.dim() == 1 and r.sampler_logp.shape[0] == k for r, k in zip(rollouts, lengths, strict=True)):
        return _right_padded([r.sampler_logp for r in rollouts], lengths, logp), mask
    for i, (r, k) in enumerate(zip(rollouts, lengths, strict=True)):  # sampler_logp that broadcasts: row by row
        logp[i, :k] = r.sampler_logp
    return logp, mask


def _distinct_rollouts(rollouts: Sequence[Rollout]) -> tuple[list[Rollout], Tensor]:
    """One rollout per distinct (prompt, completion) and, for each rollout, the index of its own."""
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    firsts: list[Rollout] = []
    inv = []
    for r in rollouts:
        key = (tuple(r.prompt_ids.tolist()), tuple(r.completion_ids.tolist()))
        k = seen.setdefault(key, len(firsts))
        if k == len(firsts):
            firsts.append(r)
        inv.append(k)
    return firsts, torch.tensor(inv)


def stochastic_forward(model: nn.Module) -> str | None:
    """Why a training forward of ``model`` is random, or None: a dropout module with ``p > 0``, or a
    Hugging Face config with a dropout probability, a jitter or a noise level above 0 (attention
    dropout and Mixtral's ``router_jitter_noise`` are functional there, not modules; ``summary_*``
    keys, used only by sequence-classification and double-heads models, are not the LM's). Rows that
    share a forward then share their random draws, which changes the distribution of the update, not
    only its rounding: ``train.share_rows="auto"`` is off for such a model."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers
    for name, m in inner.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or type(m).__name__} is a dropout with p={m.p}"
    cfg = getattr(inner, "config", None)
    for k, v in (cfg.to_dict().items() if hasattr(cfg, "to_dict") else vars(cfg).items() if cfg is not None else ()):
        if (any(w in k for w in ("dropout", "pdrop", "jitter", "noise")) and not k.startswith("summary_")
                and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            return f"its config sets {k}={v}"
    return None


def trainer_logprobs(model: nn.Module, rollouts: Sequence[Rollout], temperature: float = 1.0,
                     with_entropy: bool = False, share_rows: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(completion token | prefix) ``[N, T]`` under ``model`` (with grad), right-padded
    like :func:`completion_batch` (zeros on padding); with ``with_entropy`` also the
    full-vocabulary entropy of each position (detached).

    ``share_rows`` runs the model once per distinct (prompt, completion) and copies the result to
    its repeats (a group often repeats a short completion): the same values where the CPU kernels
    give a row the same result whatever the batch (as :func:`generate` measures), and in exact
    arithmetic the same gradient, but the gradient of a repeated row is summed before the weight
    gradient's reduction, so its rounding differs: an opt-in for training, exact for a no-grad
    forward. Batches of fewer than 16 token rows are not shared."""
    if share_rows:
        firsts, inv = _distinct_rollouts(rollouts)
        n_tok = len(firsts) * max(r.prompt_ids.shape[0] + r.completion_ids.shape[0] for r in firsts)
        if len(firsts) < len(rollouts) and n_tok >= _MIN_SHARED_TOKENS:
            got = trainer_logprobs(model, firsts, temperature, with_entropy)
            return tuple(g[inv] for g in got) if with_entropy else got[inv]
    lengths = [r.completion_ids.shape[0] for r in rollouts]
    T = max(lengths)
    blocks: list[Tensor] = []
    ent_blocks: list[Tensor] = []
    order: list[int] = []
    for _, idx in _by_length(range(len(rollouts)), lambda i: rollouts[i].prompt_ids.shape[0]).items():
        p_len = rollouts[idx[0]].prompt_ids.shape[0]
        t_max = max(lengths[i] for i in idx)
        x = torch.zeros(len(idx), p_len + t_max, dtype=torch.long)
        x[:, :p_len] = torch.stack([rollouts[i].prompt_ids for i in idx])
        _right_padded([rollouts[i].completion_ids for i in idx], [lengths[i] for i in idx], x[:, p_len:])
        logits = logits_of(model(x))[:, p_len - 1 : p_len - 1 + t_max].float() / temperature
        full = F.log_softmax(logits, -1)
        lp = full.gather(2, x[:, p_len : p_len + t_max, None]).squeeze(2)
        blocks.append(F.pad(lp, (0, T - t_max)))  # padding and reordering below only copy values
        if with_entropy:
            ent_blocks.append(F.pad(-(full.detach().exp() * full.detach()).sum(-1), (0, T - t_max)))
        order += idx
    if order == list(range(len(rollouts))):  # one bucket (or buckets already in order): no reordering
        out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        ent = (torch.cat(ent_blocks) if len(ent_blocks) > 1 else ent_blocks[0]) if with_entropy else None
    else:
        where = torch.empty(len(order), dtype=torch.long)
        where[torch.tensor(order)] = torch.arange(len(order))
        out = torch.cat(blocks)[where]
        ent = torch.cat(ent_blocks)[where] if with_entropy else None
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).to(torch.get_default_dtype())
    if not with_entropy:
        return out * mask
    return out * mask, ent * mask


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


class RewardTask(Protocol):
    """What :func:`collect` needs of a task: prompts to sample and a verifiable reward
    (:class:`poise.tasks.reasoning.ArithmeticTask`, ``CountdownTask``)."""

    def sample(self, n: int) -> list[Problem]: ...

    def reward(self, problem: Problem, completion: str) -> float: ...


def score_rollouts(task: RewardTask, rollouts: Sequence[Rollout]) -> tuple[list[Rollout], list[dict[str, str]]]:
    """Score the rollouts (sets ``r.reward``); returns the ones with a valid reward and one
    record ``{"prompt", "completion", "error"}`` per dropped sample. A reward function that
    raises or returns a non-finite value drops that sample from the batch (it would otherwise
    train as a wrong answer); the caller goes on and reports the failures."""
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


class Collected(NamedTuple):
    """One step's training samples: the rollouts (group ids renumbered ``0..G-1``), their rewards
    ``[N]`` and advantages ``[N]``, how many samples were generated for them, and one record per
    sample whose reward failed (:func:`score_rollouts`)."""

    rollouts: list[Rollout]
    rewards: Tensor
    advantages: Tensor
    generated: int
    failures: list[dict[str, str]]


def collect(model: nn.Module, tokenizer: CharTokenizer, task: RewardTask, *, num_prompts: int, group_size: int,
            max_new_tokens: int, sampling: str = "uniform",
            advantage: str | Callable[[Tensor, Tensor], Tensor] = "grpo", max_gen_batches: int = 3,
            ada_rounds: int = 4, temperature: float = 1.0, generator: torch.Generator | None = None,
            dtype: torch.dtype | None = None, weight_bits: int | None = None) -> Collected:
    """One step's training samples by a sampling strategy, scored, with advantages.

    ``sampling``:

    * ``"uniform"``: ``group_size`` completions for each of ``num_prompts`` prompts;
    * ``"dynamic"`` (DAPO, arXiv 2503.14476, :func:`poise.rl.dynamic_sampling_keep`): keep only
      groups whose rewards vary, drawing new batches of ``num_prompts`` prompts until
      ``num_prompts * group_size`` samples are kept or ``max_gen_batches`` batches were drawn;
    * ``"reinforce_ada"`` (arXiv 2510.04996, :class:`poise.rl.AdaSampler`): rounds of
      ``max(2, group_size // 2)`` samples per unfinished prompt, at most ``ada_rounds`` rounds,
      then ``group_size`` per prompt with :func:`poise.rl.global_stat_advantage` (``advantage``
      is not used).

    ``advantage`` is a registered advantage name (``poise list advantages``) or a function
    ``(rewards [N], group_id [N]) -> [N]``. ``temperature``, ``generator`` and ``dtype`` (the
    sampler's autocast precision: ``torch.bfloat16`` for a real train-inference mismatch)
    go to :func:`generate`; ``weight_bits`` samples from one :func:`quantised_copy` of the model
    (made once per call) for every generation round. Returns :class:`Collected` (a tuple
    ``(rollouts, rewards, advantages, generated, failures)``); returning the failures rather
    than keeping them in module state lets a Ray actor report them too.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r}; valid choices: {', '.join(SAMPLING_MODES)}")
    checked = {"num_prompts": num_prompts, "group_size": group_size, "max_new_tokens": max_new_tokens,
               **({"max_gen_batches": max_gen_batches} if sampling == "dynamic" else {}),
               **({"ada_rounds": ada_rounds} if sampling == "reinforce_ada" else {})}
    for key, x in checked.items():
        if x <= 0:
            raise ValueError(f"{key}={x} must be > 0")
    adv_fn = _registry.get("advantage", advantage) if isinstance(advantage, str) else advantage
    if weight_bits is not None:
        model = quantised_copy(model, weight_bits)

    def sample(problems: list, n: int) -> list:
        return generate(model, tokenizer, problems, group_size=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, generator=generator, dtype=dtype)

    if sampling == "uniform":
        batch = sample(task.sample(num_prompts), group_size)
        rollouts, bad = score_rollouts(task, batch)  # bad: the failure records
        generated = len(batch)
    elif sampling == "dynamic":
        kept: list = []
        generated, bad = 0, []
        for _ in range(max_gen_batches):
            batch = sample(task.sample(num_prompts), group_size)
            generated += len(batch)
            batch, b = score_rollouts(task, batch)
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
            if len(kept) >= num_prompts * group_size:
                break
        rollouts = kept[: num_prompts * group_size] or batch
    else:  # reinforce_ada
        problems = task.sample(num_prompts)
        ada = AdaSampler(len(problems), n=group_size, round_repeat=max(2, group_size // 2), max_rounds=ada_rounds)
        pool: list[list] = [[] for _ in problems]
        generated, bad = 0, []
        while active := ada.active():
            batch = sample([problems[i] for i in active], ada.round_repeat)
            generated += len(batch)
            batch, b = score_rollouts(task, batch)
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
        return Collected(rollouts, rewards, global_stat_advantage(rewards, groups, p, q), generated, bad)
    if not rollouts:
        return Collected([], torch.zeros(0), torch.zeros(0), generated, bad)
    remap = {g: k for k, g in enumerate(dict.fromkeys(r.group for r in rollouts))}
    for r in rollouts:
        r.group = remap[r.group]
    rewards = torch.tensor([r.reward for r in rollouts])
    return Collected(rollouts, rewards, adv_fn(rewards, torch.tensor([r.group for r in rollouts])), generated, bad)


class AsyncSampler:
    """Generation in a background thread, ahead of training by at most ``eta`` versions.

    The thread keeps its own copy of the policy, refreshed from the trainer's weights
    whenever the trainer has published a newer version, and produces batch ``k`` (``k`` from
    ``start_version`` on, ``steps`` batches in all) once the trainer has reached version
    ``k - eta`` (AReaL's staleness bound, arXiv 2505.24298) by calling ``produce(policy copy)``,
    e.g. ``lambda m: collect(m, tokenizer, task, generator=gen, ...)``.
    :meth:`get` returns ``(batch, version it was generated with)``; the trainer calls
    :meth:`publish` after each optimizer step and :meth:`close` at the end. Exceptions in the
    thread are re-raised in :meth:`get`.
    """

    def __init__(self, model: nn.Module, eta: int, steps: int, produce: Callable[[nn.Module], Any],
                 start_version: int = 0):
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

    def publish(self, model: nn.Module) -> None:
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
    """The Ray actor behind :class:`RaySampler`: a policy copy, the task, the tokenizer, its own
    generator seeded with ``seed``, and :func:`collect`'s other arguments; ``produce(weights)``
    loads the weights it is sent and returns one :class:`Collected` batch."""

    def __init__(self, model: nn.Module, task: RewardTask, tokenizer: CharTokenizer, seed: int,
                 collect_kwargs: dict[str, Any]):
        self.model, self.task, self.tok, self.kw = model, task, tokenizer, collect_kwargs
        self.gen = torch.Generator().manual_seed(seed)

    def produce(self, weights: dict[str, Tensor]) -> Collected:
        self.model.load_state_dict(weights)
        return collect(self.model, self.tok, self.task, generator=self.gen, **self.kw)


class RaySampler:
    """:class:`AsyncSampler`'s interface on a Ray actor (the optional ``ray`` extra), so that
    generation can live on another machine of a Ray cluster. The actor runs :func:`collect`
    with ``collect_kwargs`` (``num_prompts``, ``group_size``, ``max_new_tokens``, ``sampling``,
    ...; checked here, before any actor starts) and its own generator seeded with ``seed``.
    Up to ``eta + 1`` batches are in flight; batch ``k`` is requested with the weights of
    version ``k - eta`` (or the start), so it trains at most ``eta`` versions stale. Weights
    travel through Ray's object store. Starts Ray (2 CPUs, no dashboard) if it is not running."""

    def __init__(self, model: nn.Module, eta: int, steps: int, task: RewardTask, *, seed: int,
                 tokenizer: CharTokenizer | None = None, start_version: int = 0, **collect_kwargs: Any):
        tokenizer = CharTokenizer() if tokenizer is None else tokenizer
        try:
            inspect.signature(collect).bind(model, tokenizer, task, generator=None, **collect_kwargs)
        except TypeError as e:
            raise TypeError(f"RaySampler: bad arguments for collect: {e}; valid: "
                            f"{', '.join(p for p in inspect.signature(collect).parameters if p != 'generator')}"
                            ) from None
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.worker = ray.remote(_RolloutWorker).remote(copy.deepcopy(model), task, tokenizer, seed,
                                                        dict(collect_kwargs))
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

    def publish(self, model: nn.Module) -> None:
        self.version += 1
        if self.remaining > 0:
            self._submit(self.ray.put({k: x.detach().clone() for k, x in model.state_dict().items()}))

    def close(self) -> None:
        self.ray.kill(self.worker)

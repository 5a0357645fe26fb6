r"""Routing Replay for mixture-of-experts policies, and the routing-mismatch diagnostic.

"Stabilizing Reinforcement Learning with LLMs: Formulation and Practices" (Zheng et al., Qwen,
arXiv 2512.01374, Sec. 4): for an MoE policy the token ratio ``pi_theta/mu`` mixes two effects,
the numerical train-inference mismatch and *routing* changes (a token sent to different experts by
the sampler and by the trainer, or by pi_old and by pi_theta). Routing Replay fixes the experts
during the policy update:

* **R3** (rollout routing replay): the trainer replays the routing the inference engine recorded
  while sampling, in every forward of the update (also the one that recomputes pi_old);
* **R2** (vanilla routing replay): the trainer replays its own routing at pi_old (recorded when it
  recomputes the old log-probs) in the gradient steps; on-policy (one step per batch) it is a no-op.

Replay fixes the chosen set; the gates are the softmax of the live router logits over it
(:func:`poise.models.moe.moe_gates`). Reference code: verl ``actor.router_replay.mode in
{disabled, R2, R3}`` (``verl/workers/config/actor.py::RouterReplayConfig``; ``examples/router_replay``).

Functions:

* :func:`routing_mismatch` - share of (token, layer) pairs whose top-k expert *sets* differ between
  two routings (the sampler's and the trainer's): ``mean_{t,l} 1[S^mu_{t,l} != S^pi_{t,l}]``;
* :func:`record_routing` - the routing of the sampler's numerics (autocast dtype, quantised weights)
  over sampled sequences, stored in each rollout's ``extra["routing"]`` (``[n_layer, L, k]``);
* :func:`routed_logprobs` - :func:`poise.rl.trainer_logprobs` for a model that takes ``routing=``,
  with an optional replayed routing per rollout; returns the routing the trainer used too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of
from poise.rl.rollout import Rollout, completion_batch, quantised_copy

__all__ = ["ROUTING_REPLAYS", "record_routing", "routed_logprobs", "routing_mismatch"]

ROUTING_REPLAYS = ("none", "R2", "R3")


def routing_mismatch(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Share of routed tokens whose top-k expert set differs between routings ``a`` and ``b``.

    ``a``, ``b``: expert ids ``[..., k]`` (same shape; order within a set does not matter);
    ``mask``: ``[...]`` (1 = count this token/layer) or ``None`` (count all). Returns
    ``sum(mask * 1[set(a) != set(b)]) / sum(mask)`` as a detached 0-d float tensor (0 for an
    empty mask).

    >>> routing_mismatch(torch.tensor([[0, 1], [2, 3], [1, 3]]), torch.tensor([[1, 0], [2, 1], [1, 3]]))
    tensor(0.3333)
    """
    if a.shape != b.shape:
        raise ValueError(f"routings differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1:
        raise ValueError("a routing needs a last dimension of top-k expert ids")
    differ = (a.sort(-1).values != b.sort(-1).values).any(-1).float()
    if mask is None:
        mask = torch.ones_like(differ)
    if mask.shape != differ.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(differ.shape)}")
    m = mask.float()
    return ((differ * m).sum() / m.sum().clamp_min(1)).detach()


def _buckets(rollouts: Sequence[Rollout]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rollouts):
        out[len(r.prompt_ids)].append(i)
    return out


def _batch(rollouts: Sequence[Rollout], idx: list[int]) -> tuple[Tensor, int, int]:
    p_len = len(rollouts[idx[0]].prompt_ids)
    t_max = max(len(rollouts[i].completion_ids) for i in idx)
    x = torch.zeros(len(idx), p_len + t_max, dtype=torch.long)
    for j, i in enumerate(idx):
        r = rollouts[i]
        x[j, :p_len] = r.prompt_ids
        x[j, p_len : p_len + len(r.completion_ids)] = r.completion_ids
    return x, p_len, t_max


@torch.no_grad()
def record_routing(model: nn.Module, rollouts: Sequence[Rollout], *, dtype: torch.dtype | None = None,
                   weight_bits: int | None = None, key: str = "routing") -> None:
    """Store in each rollout's ``extra[key]`` the routing (``[n_layer, L, k]``, ``L`` = prompt +
    completion tokens) that the *sampler's numerics* choose for the sampled sequence: a forward of
    ``model`` in ``dtype`` autocast, on :func:`poise.rl.quantised_copy` ``(model, weight_bits)`` when
    given, as :func:`poise.rl.generate` samples. A causal model routes position ``t`` from the
    prefix only, so this is the routing the sampler used token by token (up to kernel-level
    differences between an incremental and a one-shot forward). ``model`` must keep
    ``last_routing`` (:class:`poise.models.moe.MoEGPT`)."""
    sampler = quantised_copy(model, weight_bits) if weight_bits is not None else model
    was = sampler.training
    sampler.eval()
    try:
        for _, idx in _buckets(rollouts).items():
            x, p_len, _ = _batch(rollouts, idx)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                sampler(x)
            used = getattr(sampler, "last_routing", None)
            if used is None:
                raise TypeError(f"{type(model).__name__} does not record its routing (no last_routing); "
                                "Routing Replay needs a routed model such as poise.models.moe.MoEGPT")
            for j, i in enumerate(idx):
                n = p_len + len(rollouts[i].completion_ids)
                rollouts[i].extra[key] = used[j, :, :n].clone()
    finally:
        sampler.train(was)


def routed_logprobs(model: nn.Module, rollouts: Sequence[Rollout], routing: Sequence[Tensor] | None = None,
                    *, temperature: float = 1.0, with_entropy: bool = False
                    ) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """``(logp [N, T], entropy [N, T] or None, routing used)``: the trainer's log-probs of each
    completion token (with grad), padded and masked like :func:`poise.rl.trainer_logprobs`, from a
    model that takes ``routing=`` (``[B, n_layer, L, k]``). ``routing`` (one ``[n_layer, L_i, k]``
    per rollout, e.g. ``extra["routing"]`` from :func:`record_routing`) is replayed; ``None`` lets
    the router choose. The routing used is returned per rollout (``[n_layer, L_i, k]``, detached)."""
    T = max(len(r.completion_ids) for r in rollouts)
    n = len(rollouts)
    rows: list[Tensor | None] = [None] * n
    ents: list[Tensor | None] = [None] * n
    used_out: list[Tensor | None] = [None] * n
    for _, idx in _buckets(rollouts).items():
        x, p_len, t_max = _batch(rollouts, idx)
        kw = {}
        if routing is not None:
            first = routing[idx[0]]
            rt = first.new_zeros(len(idx), first.shape[0], x.shape[1], first.shape[2])
            rt[...] = torch.arange(first.shape[2])  # padding positions: any valid set (never read back)
            for j, i in enumerate(idx):
                r_i = routing[i]
                if r_i.shape[1] != p_len + len(rollouts[i].completion_ids):
                    raise ValueError(f"routing of rollout {i} covers {r_i.shape[1]} positions; its sequence has "
                                     f"{p_len + len(rollouts[i].completion_ids)}")
                rt[j, :, : r_i.shape[1]] = r_i
            kw["routing"] = rt
        out = model(x, **kw)
        logits = logits_of(out)[:, p_len - 1 : p_len - 1 + t_max].float() / temperature
        full = F.log_softmax(logits, -1)
        lp = full.gather(2, x[:, p_len : p_len + t_max, None]).squeeze(2)
        inner = getattr(model, "module", model)  # DDP
        used = inner.last_routing
        for j, i in enumerate(idx):
            rows[i] = F.pad(lp[j], (0, T - t_max))
            used_out[i] = used[j, :, : p_len + len(rollouts[i].completion_ids)]
            if with_entropy:
                h = -(full[j].detach().exp() * full[j].detach()).sum(-1)
                ents[i] = F.pad(h, (0, T - t_max))
    _, mask = completion_batch(rollouts)
    logp = torch.stack(rows) * mask  # type: ignore[arg-type]
    ent = torch.stack(ents) * mask if with_entropy else None  # type: ignore[arg-type]
    return logp, ent, used_out  # type: ignore[return-value]

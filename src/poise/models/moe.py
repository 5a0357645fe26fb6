r"""A tiny mixture-of-experts GPT whose expert routing can be recorded and replayed (Routing Replay).

Each block's MLP is a top-k mixture of ``n_experts`` two-layer experts (Switch/Mixtral style,
arXiv 2101.03961, 2401.04088): with router logits ``z = x W_r`` (``[.., E]``), the chosen set
``S = topk(z, k)`` and the gates

    g_e = exp(z_e) / sum_{e' in S} exp(z_e')   for e in S,   0 otherwise      (softmax over S)

(``norm_topk_prob=True``, Mixtral / Qwen3-MoE) or ``g_e = softmax(z)_e`` for ``e in S`` without
renormalisation (``norm_topk_prob=False``, Switch / Qwen2-MoE; with ``k = 1`` the router then still
learns), the layer's output is ``sum_e g_e * expert_e(x)``. Passing ``routing=`` (the chosen sets, one per
layer and token) *replays* them: ``S`` is the given set instead of ``topk(z, k)``, while the gates
stay the live router's softmax (over ``S``, or over all experts restricted to ``S``), so the router
still gets gradients. This is
Routing Replay of "Stabilizing Reinforcement Learning with LLMs: Formulation and Practices"
(Zheng et al., Qwen, arXiv 2512.01374): R2 replays the routing of the trainer at pi_old, R3 the
routing the inference engine (the sampler) used; reference code: verl
``verl/workers/config/actor.py::RouterReplayConfig`` (``mode in {disabled, R2, R3}``, Megatron's
router with recorded top-k indices). Every forward stores the sets it used in
``model.last_routing`` (``[B, n_layer, T, k]``, each set sorted ascending).

Experts are computed densely (every expert on every token, combined with the sparse gates):
exact and simple at this size, not a fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MoEConfig", "MoEGPT", "moe_gates"]


@dataclass
class MoEConfig:
    vocab_size: int = 17
    block_size: int = 32
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 48
    n_experts: int = 4
    top_k: int = 2
    expert_ratio: int = 2
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_experts", "top_k", "expert_ratio"):
            x = getattr(self, key)
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                raise ValueError(f"MoEConfig.{key}={x!r} must be a positive integer")
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} must be <= n_experts={self.n_experts}")
        if self.n_embd % self.n_head:
            raise ValueError(f"MoEConfig.n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")


def moe_gates(router_logits: Tensor, top_k: int, routing: Tensor | None = None,
              normalize: bool = True) -> tuple[Tensor, Tensor]:
    r"""Dense gates ``[..., E]`` and the chosen sets ``[..., k]`` (sorted) of a top-k router.

    ``routing=None``: ``S = topk(router_logits, k)``; else ``S = routing`` (replay). The gates are
    ``softmax`` of ``router_logits`` restricted to ``S`` (zero elsewhere), so they sum to 1 and are
    differentiable in the logits of the chosen experts; ``normalize=False`` keeps the full softmax's
    values on ``S`` (they sum to less than 1; every router logit gets a gradient).

    >>> g, s = moe_gates(torch.tensor([[0.0, 2.0, 1.0]]), 2)          # top-2 = {1, 2}
    >>> s.tolist(), [round(x, 4) for x in g[0].tolist()]              # e^2/(e^2+e^1) = 0.7311
    ([[1, 2]], [0.0, 0.7311, 0.2689])
    >>> g, s = moe_gates(torch.tensor([[0.0, 2.0, 1.0]]), 2, torch.tensor([[0, 2]]))   # replayed {0, 2}
    >>> [round(x, 4) for x in g[0].tolist()]                          # e^0/(e^0+e^1) = 0.2689
    [0.2689, 0.0, 0.7311]
    >>> g, _ = moe_gates(torch.tensor([[0.0, 2.0, 1.0]]), 1, normalize=False)   # e^2/(1+e^2+e) = 0.6652
    >>> [round(x, 4) for x in g[0].tolist()]
    [0.0, 0.6652, 0.0]
    """
    if routing is None:
        chosen = router_logits.topk(top_k, dim=-1).indices
    else:
        if routing.shape != (*router_logits.shape[:-1], top_k):
            raise ValueError(f"routing has shape {tuple(routing.shape)}; expected "
                             f"{(*router_logits.shape[:-1], top_k)} (one set of top_k={top_k} experts per token)")
        if routing.numel() and (int(routing.min()) < 0 or int(routing.max()) >= router_logits.shape[-1]):
            raise ValueError(f"routing holds expert ids outside 0..{router_logits.shape[-1] - 1}")
        chosen = routing.long()
    chosen = chosen.sort(dim=-1).values
    keep = torch.zeros_like(router_logits, dtype=torch.bool).scatter_(-1, chosen, True)
    if normalize:
        gates = torch.softmax(router_logits.float().masked_fill(~keep, -math.inf), dim=-1)
    else:
        gates = torch.softmax(router_logits.float(), dim=-1) * keep
    return gates, chosen


class _MoEMLP(nn.Module):
    def __init__(self, c: MoEConfig):
        super().__init__()
        h = c.expert_ratio * c.n_embd
        self.top_k, self.normalize = c.top_k, c.norm_topk_prob
        self.router = nn.Linear(c.n_embd, c.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(c.n_experts, c.n_embd, h))
        self.b1 = nn.Parameter(torch.zeros(c.n_experts, h))
        self.w2 = nn.Parameter(torch.empty(c.n_experts, h, c.n_embd))
        self.b2 = nn.Parameter(torch.zeros(c.n_experts, c.n_embd))

    def forward(self, x: Tensor, routing: Tensor | None) -> tuple[Tensor, Tensor]:
        gates, chosen = moe_gates(self.router(x), self.top_k, routing, self.normalize)          # [B,T,E], [B,T,k]
        hid = F.gelu(torch.einsum("btc,ech->bteh", x, self.w1) + self.b1)      # every expert (dense)
        out = torch.einsum("bteh,ehc->btec", hid, self.w2) + self.b2
        return torch.einsum("bte,btec->btc", gates.to(out.dtype), out), chosen


class _Block(nn.Module):
    def __init__(self, c: MoEConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.moe = _MoEMLP(c)
        self.n_head = c.n_head

    def forward(self, x: Tensor, routing: Tensor | None) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        m, chosen = self.moe(self.ln2(x), routing)
        return x + m, chosen


class MoEGPT(nn.Module):
    """poise's GPT (pre-norm blocks, causal attention, tied embeddings) with a top-k
    mixture-of-experts MLP in every block. ``forward(idx, targets=None, routing=None) ->
    (logits, loss)``; ``routing`` (``[B, n_layer, T, k]`` expert ids) replays a recorded routing;
    the routing used is kept in ``self.last_routing`` (detached, ``[B, n_layer, T, k]``)."""

    def __init__(self, config: MoEConfig | None = None, **kw: int):
        super().__init__()
        c = config or MoEConfig(**kw)
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.last_routing: Tensor | None = None
        for n, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if n.endswith(("proj.weight", "w2")) else 0.02
                nn.init.normal_(p, 0.0, std)
            if n.endswith("router.weight"):
                nn.init.normal_(p, 0.0, 0.5)  # a router that actually routes at initialisation

    def forward(self, idx: Tensor, targets: Tensor | None = None, routing: Tensor | None = None):
        B, T = idx.shape
        c = self.config
        if T > c.block_size:
            raise ValueError(f"sequence length {T} > block_size {c.block_size}")
        if routing is not None and routing.shape != (B, c.n_layer, T, c.top_k):
            raise ValueError(f"routing has shape {tuple(routing.shape)}; expected {(B, c.n_layer, T, c.top_k)} "
                             "([batch, n_layer, time, top_k])")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        used = []
        for i, b in enumerate(self.blocks):
            x, chosen = b(x, None if routing is None else routing[:, i])
            used.append(chosen)
        self.last_routing = torch.stack(used, 1).detach()
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

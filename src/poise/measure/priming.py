"""Knowledge-insertion probes ("How new data permeates LLM knowledge and how to dilute it",
Sun et al., arXiv 2504.09522): how much learning one new fact raises its keyword in
unrelated contexts (priming), and what predicts it. They measure a model; they change nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of

__all__ = ["keyword_logprob", "memorization_score", "priming_score"]

Encode = Callable[[str], Tensor]


@torch.no_grad()
def keyword_logprob(model: nn.Module, encode: Encode, context: str, keyword: str) -> float:
    r"""``log P(keyword | context)`` under a causal LM: the sum of the log-probabilities of the
    keyword's tokens, each given the context and the keyword's earlier tokens (a leading space
    joins them). ``encode`` maps text to a 1-D tensor of token ids."""
    was = model.training
    model.eval()
    try:
        ctx, kw = encode(context.rstrip() + " "), encode(keyword)
        x = torch.cat([ctx, kw])[None]
        logp = F.log_softmax(logits_of(model(x)).float()[0], -1)
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(kw))
        return float(logp[positions, kw].sum())
    finally:
        model.train(was)


def priming_score(before: nn.Module, after: nn.Module, encode: Encode, contexts: Sequence[str], keyword: str) -> float:
    r"""``S_prime = mean_j P_after(keyword | X_j) / P_before(keyword | X_j)`` over unrelated
    contexts ``X_j`` of the keyword's theme (the paper's priming score)."""
    ratios = [keyword_logprob(after, encode, c, keyword) - keyword_logprob(before, encode, c, keyword)
              for c in contexts]
    return float(torch.tensor(ratios).exp().mean())


def memorization_score(before: nn.Module, after: nn.Module, encode: Encode, context: str, keyword: str) -> float:
    r"""``S_mem = P_after(keyword | own context) / P_before(keyword | own context)``."""
    return float(torch.tensor(keyword_logprob(after, encode, context, keyword)
                              - keyword_logprob(before, encode, context, keyword)).exp())

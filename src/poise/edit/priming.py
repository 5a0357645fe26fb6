"""Knowledge-insertion probes ("How new data permeates LLM knowledge and how to dilute it",
Sun et al., arXiv 2504.09522): how much learning one new fact raises its keyword in
unrelated contexts (priming), and what predicts it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from poise.measure.evaluator import logits_of

__all__ = ["keyword_logprob", "memorization_score", "priming_score", "stepping_stone"]


@torch.no_grad()
def keyword_logprob(model: nn.Module, encode, context: str, keyword: str) -> float:
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


def priming_score(before: nn.Module, after: nn.Module, encode, contexts: Sequence[str], keyword: str) -> float:
    r"""``S_prime = mean_j P_after(keyword | X_j) / P_before(keyword | X_j)`` over unrelated
    contexts ``X_j`` of the keyword's theme (the paper's priming score)."""
    ratios = [keyword_logprob(after, encode, c, keyword) - keyword_logprob(before, encode, c, keyword)
              for c in contexts]
    return float(torch.tensor(ratios).exp().mean())


def memorization_score(before: nn.Module, after: nn.Module, encode, context: str, keyword: str) -> float:
    r"""``S_mem = P_after(keyword | own context) / P_before(keyword | own context)``."""
    return float(torch.tensor(keyword_logprob(after, encode, context, keyword)
                              - keyword_logprob(before, encode, context, keyword)).exp())


def stepping_stone(text: str, keyword: str, stones: Sequence[str]) -> str:
    """The paper's stepping-stone augmentation, by template instead of an LLM rewrite: the
    keyword is reached through more probable intermediate descriptions (``stones``), e.g.
    ``"... is a warm, reddish orange shade: vermilion."`` -- which raises the keyword's
    probability before learning and, per the paper, lowers priming."""
    if keyword not in text:
        raise ValueError(f"keyword {keyword!r} does not occur in {text!r}")
    head, tail = text.split(keyword, 1)
    return f"{head}{', '.join(stones)}: {keyword}{tail}"

"""Continual evaluation of causal language models: per-task token accuracy, loss and perplexity.

A task's evaluation data is an :class:`LMEvalSet`: token ids, an attention mask, and the labels
to score in the Hugging Face convention (``labels[n, t]`` is the token at position ``t``, predicted
from the logits at ``t - 1``; ``-100`` marks a position that is not scored, so a prompt/response
pair scores the response only). Over the ``N`` scored tokens ``y_j`` of a task (all its sequences
together, each token counted once):

* ``token_acc = 1/N sum_j [argmax_v logits_j = y_j]`` (higher is better);
* ``loss = -1/N sum_j log softmax(logits_j)[y_j]`` in nats (lower is better);
* ``ppl = exp(loss)`` (lower is better).

These are token averages, not averages of per-sequence values: a long response weighs more.
Logits that are NaN or ``+inf`` (or all ``-inf``) at a scored position make all three NaN: the
argmax of NaN logits is no prediction, and a NaN propagates instead of a made-up accuracy.
:class:`poise.measure.ContinualEvaluator` takes ``LMEvalSet``s in place of ``(x, y)`` pairs and
records all three metrics at every evaluation; the continual metrics (forgetting, min-ACC, the
stability gap, ...) are computed on any of them, see :meth:`ContinualEvaluator.metrics`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of

__all__ = ["IGNORE_INDEX", "LM_METRICS", "LMEvalSet", "lm_logits", "lm_sums", "lm_values"]

IGNORE_INDEX = -100
"""The label of a position that is not scored (Hugging Face's ``ignore_index``)."""

LM_METRICS = ("token_acc", "loss", "ppl")
"""The metrics recorded for every :class:`LMEvalSet`, in this order."""


def _rows(mask: Tensor) -> str:
    rows = torch.nonzero(mask).flatten().tolist()
    return ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")


@dataclass
class LMEvalSet:
    """One task's evaluation sequences for a causal LM.

    ``input_ids`` ``[n, T]`` (integers), ``attention_mask`` ``[n, T]`` (1 = a real token; None: all
    ones), ``labels`` ``[n, T]`` (the token to predict at each position, ``-100`` where nothing is
    scored; None: every attended position after the first, ``input_ids`` there). Pad on the right:
    positions are counted from the first token. Mismatched shapes, a scored position that is padding
    or the first token, a sequence with nothing to score: ``ValueError`` naming the rows.
    Build one from prompt/response pairs with :meth:`from_pairs` or from masks with :meth:`from_masks`.
    """

    input_ids: Tensor
    attention_mask: Tensor | None = None
    labels: Tensor | None = None

    def __post_init__(self) -> None:
        x = self.input_ids
        if not isinstance(x, Tensor) or x.dim() != 2 or x.is_floating_point() or x.is_complex():
            raise ValueError(f"input_ids must be a 2-D integer tensor [n, T], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(x)
        elif self.attention_mask.shape != x.shape:
            raise ValueError(f"attention_mask has shape {tuple(self.attention_mask.shape)}; input_ids has "
                             f"{tuple(x.shape)}: they must match")
        attended = self.attention_mask.bool()
        if self.labels is None:
            labels = torch.where(attended, x, torch.full_like(x, IGNORE_INDEX))
            labels[:, 0] = IGNORE_INDEX
            self.labels = labels
        elif self.labels.shape != x.shape:
            raise ValueError(f"labels has shape {tuple(self.labels.shape)}; input_ids has {tuple(x.shape)}: "
                             "they must match (labels[n, t] is the token at position t, -100 = not scored)")
        scored = self.labels != IGNORE_INDEX
        if scored[:, 0].any():
            raise ValueError(f"labels score position 0 in rows {_rows(scored[:, 0])}: the first token has no "
                             "prediction (labels[n, t] is predicted from the logits at t - 1)")
        bad = (scored & ~attended).any(1)
        if bad.any():
            raise ValueError(f"labels score padded positions (attention_mask 0) in rows {_rows(bad)}: the "
                             "response mask must lie inside the attention mask")
        empty = ~scored.any(1)
        if empty.any():
            raise ValueError(f"rows {_rows(empty)} have no scored token (empty response, or truncated away)")
        if (self.labels[scored] < 0).any():
            raise ValueError("labels has negative token ids other than -100")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def index(self, idx: Tensor | slice) -> LMEvalSet:
        """The rows ``idx`` (an index tensor or a slice)."""
        return LMEvalSet(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])  # type: ignore[index]

    @property
    def n_tokens(self) -> int:
        """The number of scored tokens."""
        return int((self.labels != IGNORE_INDEX).sum())  # type: ignore[operator]

    @classmethod
    def from_masks(cls, input_ids: Tensor, attention_mask: Tensor | None, response_mask: Tensor) -> LMEvalSet:
        """Score the tokens where ``response_mask`` is true (the loss on the response only)."""
        if response_mask.shape != input_ids.shape:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}; input_ids has "
                             f"{tuple(input_ids.shape)}: they must match")
        labels = torch.where(response_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return cls(input_ids, attention_mask, labels)

    @classmethod
    def from_pairs(cls, prompts: Sequence[Sequence[int] | Tensor], responses: Sequence[Sequence[int] | Tensor],
                   pad_id: int = 0) -> LMEvalSet:
        """Right-padded ``prompt + response`` sequences scored on the response tokens only. The
        prompts and responses are token-id sequences (a tokenizer's output); every prompt needs at
        least one token (the first response token is predicted from the last prompt token)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise ValueError("no prompt/response pair given")
        seqs, n_prompt = [], []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            p, r = torch.as_tensor(p, dtype=torch.long).flatten(), torch.as_tensor(r, dtype=torch.long).flatten()
            if len(p) == 0 or len(r) == 0:
                raise ValueError(f"pair {i}: the prompt has {len(p)} tokens and the response {len(r)}; both need >= 1")
            seqs.append(torch.cat([p, r]))
            n_prompt.append(len(p))
        T = max(len(s) for s in seqs)
        x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        am = torch.zeros_like(x)
        labels = torch.full_like(x, IGNORE_INDEX)
        for i, (s, n) in enumerate(zip(seqs, n_prompt, strict=True)):
            x[i, : len(s)] = s
            am[i, : len(s)] = 1
            labels[i, n : len(s)] = s[n:]
        return cls(x, am, labels)


def _takes_attention_mask(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The default ``predict`` for :class:`LMEvalSet`: ``model(input_ids, attention_mask=...)``'s
    logits ``[B, T, vocab]`` (a Hugging Face causal LM, or any module returning logits; the mask
    is passed only when ``forward`` takes it). An output without logits raises ``TypeError``."""
    out = model(input_ids, attention_mask=attention_mask) if _takes_attention_mask(model) else model(input_ids)
    return _as_logits(out, input_ids)


def _as_logits(out: Any, input_ids: Tensor) -> Tensor:
    try:
        logits = logits_of(out)
    except TypeError:
        raise TypeError(f"the model's output ({type(out).__name__}) has no logits: an LMEvalSet needs a causal LM "
                        "returning logits [batch, seq, vocab] (a tensor, an output with .logits, or a tuple "
                        "starting with them), or predict=(model, input_ids, attention_mask) -> logits") from None
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(f"logits have shape {tuple(logits.shape)} for input_ids {tuple(input_ids.shape)}: an "
                         "LMEvalSet needs [batch, seq, vocab] (one prediction per position)")
    return logits


def lm_sums(logits: Tensor, labels: Tensor) -> Tensor:
    r"""``[correct, nll, n]`` (float64) over the scored tokens of one batch: ``labels[:, t]`` is
    predicted by ``logits[:, t - 1]``; ``correct = sum_j [argmax logits_j = y_j]``, ``nll = -sum_j
    log softmax(logits_j)[y_j]`` (computed in float32 or wider), ``n`` the number of scored tokens.
    Sums, so batches and ranks add up exactly; :func:`lm_values` turns them into the metrics.
    If the logits at any scored position contain NaN or ``+inf``, or are all ``-inf``, ``correct``
    and ``nll`` are NaN (and stay NaN through any sum), so every metric of the set is NaN."""
    pred = logits[:, :-1]
    y = labels[:, 1:].to(pred.device)
    scored = y != IGNORE_INDEX
    if scored.any() and int(y[scored].max()) >= pred.shape[-1]:
        raise ValueError(f"label id {int(y[scored].max())} is outside the model's vocabulary ({pred.shape[-1]})")
    flat = pred.reshape(-1, pred.shape[-1])
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    nll = F.cross_entropy(flat, y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((pred.argmax(-1) == y) & scored).sum().double()
    nll = nll.double()
    bad = scored & ((torch.isnan(pred) | (pred == math.inf)).any(-1) | ~torch.isfinite(pred).any(-1))
    if bool(bad.any()):
        correct, nll = correct * math.nan, nll * math.nan
    return torch.stack([correct, nll, scored.sum().double()]).cpu()


def lm_values(sums: Tensor) -> dict[str, float]:
    """``{"token_acc", "loss", "ppl"}`` from :func:`lm_sums` totals ``[correct, nll, n]`` (NaN sums,
    from non-finite logits, give NaN metrics)."""
    correct, nll, n = (float(v) for v in sums)
    if n <= 0:
        raise ValueError("no scored token: nothing to average")
    loss = nll / n
    return {"token_acc": correct / n, "loss": loss, "ppl": float(torch.tensor(loss, dtype=torch.float64).exp())}

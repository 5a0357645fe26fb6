"""Federated reconnaissance: clients learn classes independently with a prototype classifier; the server
merges the class prototypes by a count-weighted running mean.

Hendryx et al., *Federated Reconnaissance: Efficient, Distributed, Class-Incremental Learning*,
arXiv 2109.00150 (prototypical networks, Snell et al., arXiv 1703.05175). No official code was found in
the reference index; this follows the paper's description of the merge (a class mean is carried as a
vector plus a count).

A client ``c`` with embeddings ``f(x)`` of its labelled examples computes, per class ``k`` it saw::

    c'_k = (1 / m_k) * sum_{y_j = k} f(x_j),     m_k = |{j : y_j = k}|

and sends ``(c'_k, m_k)``. The server keeps ``(c_k, n_k)`` and merges online::

    c_k <- (n_k c_k + m_k c'_k) / (n_k + m_k),   n_k <- n_k + m_k

(a class the server has not seen is taken as is). The merge needs no gradients and no hyperparameters, is
order-invariant, and equals the centralised class mean of all clients' embeddings (chunked merge = batch
mean). Prediction is the nearest prototype in squared Euclidean distance, ``argmin_k ||f(x) - c_k||^2``.

Symbols -> arguments: ``f(x_j)`` ``embeddings``; ``y_j`` ``labels``; ``(c_k, n_k)`` / ``(c'_k, m_k)`` the
``(means, counts)`` pairs of :func:`merge_prototypes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["class_prototypes", "merge_many", "merge_prototypes", "prototype_logits", "prototype_predict"]

Prototypes = tuple[dict[int, Tensor], dict[int, int]]


def class_prototypes(embeddings: Tensor, labels: Tensor) -> Prototypes:
    """``({k: c'_k}, {k: m_k})`` for every class present in ``labels`` (``embeddings`` ``[N, D]``,
    ``labels`` ``[N]`` integers). Empty input raises (a client with no examples sends nothing)."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be [N={embeddings.shape[0]}], got shape {tuple(labels.shape)}")
    if embeddings.shape[0] == 0:
        raise ValueError("no examples: a client with no labelled data has no prototypes to send")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    emb = embeddings.detach()
    means: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    for k in sorted(int(v) for v in torch.unique(labels)):
        sel = labels == k
        counts[k] = int(sel.sum())
        means[k] = emb[sel].sum(0) / counts[k]
    return means, counts


def _check(name: str, means: Mapping[int, Tensor], counts: Mapping[int, int]) -> None:
    if set(means) != set(counts):
        raise ValueError(f"{name}: means and counts have different classes: {sorted(set(means) ^ set(counts))}")
    for k, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{name}: counts[{k!r}]={n!r} must be a positive int (a prototype of no examples)")


def merge_prototypes(means: Mapping[int, Tensor], counts: Mapping[int, int],
                     new_means: Mapping[int, Tensor], new_counts: Mapping[int, int]) -> Prototypes:
    """The server's online merge ``c_k <- (n_k c_k + m_k c'_k)/(n_k + m_k)``, ``n_k <- n_k + m_k`` for
    every class of ``new_*``; classes only on one side are kept as they are. Pure: returns new dicts.
    Raises on a non-positive count, classes in ``means`` but not ``counts``, or mismatched shapes."""
    _check("server", means, counts)
    _check("client", new_means, new_counts)
    out_m = dict(means)
    out_n = dict(counts)
    for k, c_new in new_means.items():
        m = new_counts[k]
        if k not in out_m:
            out_m[k], out_n[k] = c_new.detach().clone(), m
            continue
        c, n = out_m[k], out_n[k]
        if c.shape != c_new.shape:
            raise ValueError(f"class {k}: prototype shape {tuple(c_new.shape)} != server's {tuple(c.shape)}")
        out_m[k] = (n * c + m * c_new.to(c.dtype)) / (n + m)
        out_n[k] = n + m
    return out_m, out_n


def merge_many(client_prototypes: Iterable[tuple[Mapping[int, Tensor], Mapping[int, int]]]) -> Prototypes:
    """Fold :func:`merge_prototypes` over clients' ``(means, counts)`` starting from an empty server."""
    means: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    for cm, cn in client_prototypes:
        means, counts = merge_prototypes(means, counts, cm, cn)
    return means, counts


def prototype_logits(embeddings: Tensor, means: Mapping[int, Tensor]) -> tuple[Tensor, list[int]]:
    """``(-||f(x) - c_k||^2 [N, K], classes)`` with the classes in sorted order (ProtoNet logits)."""
    if not means:
        raise ValueError("no prototypes: merge at least one client's prototypes first")
    classes = sorted(means)
    protos = torch.stack([means[k] for k in classes]).to(embeddings.dtype)
    if embeddings.ndim != 2 or embeddings.shape[1] != protos.shape[1]:
        raise ValueError(f"embeddings must be [N, {protos.shape[1]}], got shape {tuple(embeddings.shape)}")
    return -torch.cdist(embeddings, protos).pow(2), classes


def prototype_predict(embeddings: Tensor, means: Mapping[int, Tensor]) -> Tensor:
    """Nearest-prototype labels ``argmin_k ||f(x) - c_k||^2`` ``[N]`` (class ids, not indices)."""
    logits, classes = prototype_logits(embeddings, means)
    return torch.tensor(classes, device=embeddings.device)[logits.argmax(1)]

"""FedStale: server aggregation that mixes fresh updates of participants with stale updates of absent clients.

Rodio & Neglia, *FedStale: leveraging stale client updates in federated learning*, arXiv 2405.04171.
Reference code: arodio/FedStale (``history_tracker.py::HistoryTracker.average`` and
``utils/optim.py::HistorySGD.step`` with ``history_coefficient = beta``).

The server keeps the last update ``h_i`` each client sent. In round ``t`` the clients ``S_t`` participate
and send fresh updates ``Delta_i`` (model delta ``x_i - x``). The server direction is (paper eq. (3))::

    Delta = beta * sum_{i in [N]} alpha_i h_i  +  sum_{i in S_t} w_i (Delta_i - beta * h_i)
    h_i  <- Delta_i  for i in S_t,    h_i unchanged otherwise

``beta = 0`` is FedAvg (``sum_{S} w_i Delta_i``), ``beta = 1`` is FedVARP (Jhunjhunwala et al., arXiv
2207.14130, ``sum_N alpha_i h_i + sum_S w_i (Delta_i - h_i)``); intermediate ``beta`` trades the bias of
stale updates against the variance of partial participation.

Symbols -> arguments of :func:`fedstale_aggregate`:

========================  ===========================================================================
``Delta_i`` (i in S_t)     ``fresh[i]`` (a dict name -> tensor, one per participant that replied)
``h_i``                    ``memory[i]``; a client with no entry has ``h_i = 0`` (the paper and the
                           reference initialise the history with zeros)
``S_t``                    ``participating`` minus the clients that sent no update (see below)
``beta``                   ``beta`` in ``[0, 1]``
``alpha_i``                ``weights[i]`` over the whole population (normalised to sum 1 here)
``w_i``                    ``alpha_i / p_i`` with ``participation_probs`` (the paper's unbiased weights);
                           without it ``alpha_i / sum_{j in S_t} alpha_j`` (FedAvg over participants)
========================  ===========================================================================

A client listed in ``participating`` that sent no update (it dropped out mid-round: a timeout or an error
reply) is treated as absent: its stale ``h_i`` enters through the first sum and its memory is unchanged.
No participants at all is a documented no-op for ``beta = 0`` (a zero update) and a stale-only step
``beta * sum alpha_i h_i`` otherwise. Inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["fedstale_aggregate", "fedstale_weights"]

TensorDict = Mapping[str, Tensor]


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta={beta!r} must be a float in [0, 1]")
    b = float(beta)
    if not math.isfinite(b) or not 0.0 <= b <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1] (0 = FedAvg, 1 = FedVARP)")
    return b


def fedstale_weights(participants: Iterable[int], weights: Mapping[int, float],
                     participation_probs: Mapping[int, float] | None = None
                     ) -> tuple[dict[int, float], dict[int, float]]:
    """``(alpha, w)``: the population weights ``alpha_i = weights[i] / sum_j weights[j]`` and the
    participant weights ``w_i`` (``alpha_i / p_i`` with ``participation_probs``, else
    ``alpha_i / sum_{j in S} alpha_j``). Raises on negative/non-finite weights, a zero total, a participant
    missing from ``weights`` or ``participation_probs``, or ``p_i`` outside ``(0, 1]``."""
    if not weights:
        raise ValueError("weights is empty: give one non-negative weight per client of the population")
    for i, a in weights.items():
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or a < 0:
            raise ValueError(f"weights[{i!r}]={a!r} must be a finite number >= 0")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"weights sum to {total}: at least one client needs a positive weight")
    alpha = {i: float(a) / total for i, a in weights.items()}
    parts = list(participants)
    unknown = [i for i in parts if i not in alpha]
    if unknown:
        raise ValueError(f"clients {unknown} are not in weights (population: {sorted(alpha)})")
    if participation_probs is not None:
        w = {}
        for i in parts:
            if i not in participation_probs:
                raise ValueError(f"participation_probs has no entry for participating client {i!r}")
            p = participation_probs[i]
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 < p <= 1:
                raise ValueError(f"participation_probs[{i!r}]={p!r} must be in (0, 1]")
            w[i] = alpha[i] / float(p)
        return alpha, w
    mass = sum(alpha[i] for i in parts)
    if parts and mass <= 0:
        raise ValueError(f"participants {parts} all have weight 0: FedAvg over participants is undefined")
    return alpha, {i: alpha[i] / mass for i in parts}


def _check_dicts(name: str, dicts: Mapping[int, TensorDict], ref: TensorDict | None) -> TensorDict | None:
    for i, d in dicts.items():
        if not isinstance(d, Mapping) or not d:
            raise TypeError(f"{name}[{i!r}] must be a non-empty dict name -> Tensor, got {type(d).__name__}")
        if ref is None:
            ref = d
        if set(d) != set(ref):
            raise ValueError(f"{name}[{i!r}] has keys {sorted(set(d) ^ set(ref))} that the other updates do not share")
        for k, v in d.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{i!r}][{k!r}] must be a Tensor, got {type(v).__name__}")
            if v.shape != ref[k].shape:
                raise ValueError(f"{name}[{i!r}][{k!r}] has shape {tuple(v.shape)}, expected {tuple(ref[k].shape)}")
    return ref


def fedstale_aggregate(fresh: Mapping[int, TensorDict], memory: Mapping[int, TensorDict],
                       participating: Iterable[int], beta: float, weights: Mapping[int, float],
                       participation_probs: Mapping[int, float] | None = None
                       ) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """One FedStale server step (module doc): returns ``(Delta, new_memory)``.

    ``Delta = beta * sum_N alpha_i h_i + sum_{S} w_i (Delta_i - beta h_i)``; ``new_memory`` is ``memory``
    with ``h_i <- Delta_i`` for every participant that sent an update (other entries are the same
    tensors, not copies). The server applies ``x <- x + eta_s * Delta``.

    Args:
        fresh: client id -> its update ``Delta_i`` (dict name -> Tensor) for the clients that replied.
        memory: client id -> last known update ``h_i``; missing clients count as ``h_i = 0``.
        participating: the clients selected this round; those without an entry in ``fresh`` dropped out
            mid-round and are treated as absent (memory unchanged, stale update used).
        beta: staleness weight in ``[0, 1]`` (0 FedAvg, 1 FedVARP).
        weights: ``alpha_i`` for every client of the population (normalised here).
        participation_probs: ``p_i`` of the participants, for the unbiased weights ``alpha_i / p_i``.

    Raises:
        ValueError: ``beta`` outside ``[0, 1]`` or NaN; an update from a client not in ``participating``;
            a client missing from ``weights``; mismatched keys or shapes; bad probabilities.
        TypeError: ``beta`` not a number, an update that is not a dict of tensors.
    """
    b = _check_beta(beta)
    selected = list(dict.fromkeys(participating))
    extra = [i for i in fresh if i not in selected]
    if extra:
        raise ValueError(f"fresh has updates from clients {extra} that are not in participating={selected}")
    stale_ids = [i for i in memory if i not in weights]
    if stale_ids:
        raise ValueError(f"memory has clients {stale_ids} that are not in weights (population: {sorted(weights)})")
    replied = [i for i in selected if i in fresh]  # S_t: drop-outs are absent
    alpha, w = fedstale_weights(replied, weights, participation_probs)
    ref = _check_dicts("fresh", fresh, None)
    ref = _check_dicts("memory", memory, ref)
    if ref is None:
        raise ValueError("no fresh updates and an empty memory: nothing defines the update's tensors")
    out: dict[str, Tensor] = {}
    for k, r in ref.items():
        acc = torch.zeros(r.shape, dtype=torch.promote_types(r.dtype, torch.float32), device=r.device)
        if b != 0.0:
            for i, h in memory.items():
                if alpha[i] != 0.0:
                    acc.add_(h[k].to(acc.dtype), alpha=b * alpha[i])
        for i in replied:
            acc.add_(fresh[i][k].to(acc.dtype), alpha=w[i])
            if b != 0.0 and i in memory:
                acc.add_(memory[i][k].to(acc.dtype), alpha=-b * w[i])
        out[k] = acc.to(r.dtype)
    new_memory: dict[int, dict[str, Tensor]] = {i: dict(h) for i, h in memory.items()}
    for i in replied:
        new_memory[i] = {k: v.detach().clone() for k, v in fresh[i].items()}
    return out, new_memory

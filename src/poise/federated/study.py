"""The federated workload of the FedStale study: non-iid digits clients, heterogeneous participation, local
SGD and the in-process server loop over :func:`poise.federated.fedstale_aggregate`.

Used by the ``federated`` study kind (:mod:`poise.runs.kinds.federated`, ``poise run fedstale``) and by
``benchmarks/fedstale.py``; both give the same numbers for the same sizes.

* **Data** (:func:`digits_federated`): scikit-learn digits (70/30 stratified split, ``split_seed`` 0), the
  training samples of the classes ``>= base_classes`` sorted by label, cut into ``n_clients *
  shards_per_client`` shards and dealt to the clients by a permutation seeded with ``shard_seed`` (the
  label-shard split of McMahan et al., arXiv 1602.05629: with 2 shards most clients see 2-3 classes).
  ``shots > 0`` keeps at most that many examples per class per client. The training samples of the classes
  ``< base_classes`` are the server's own data (learned centrally before the first round, for federated
  reconnaissance).
* **Participation** (:func:`available`, :func:`dropped_out`): client ``i`` is available in round ``t`` with
  probability ``p_i`` (a draw from ``default_rng([seed, t, i])``, so every variant of a seed sees the same
  clients); an available client fails before replying with probability ``dropout`` (its own draw
  ``default_rng([seed, t, i, 1])``: drop-outs never change who is available). Either way it sends nothing.
* **Local training** (:func:`local_train`): ``steps`` SGD steps (batch ``batch_size`` drawn with
  replacement, generator ``seed * 1_000_003 + t * 1009 + i``) from the global model.
* **Server** (:func:`fedstale_rounds`): every client is selected every round; the clients that replied are
  ``S_t``; the server steps ``x <- x + server_lr * Delta`` with FedStale's ``Delta`` (Rodio & Neglia, arXiv
  2405.04171, reference code arodio/FedStale ``HistoryTracker.average``) and weights ``alpha_i`` = the
  clients' data shares. A round in which nobody replied and no client has a memory yet is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.federated.fedstale import fedstale_aggregate

__all__ = ["FedData", "Round", "available", "digits_federated", "dropped_out", "evaluate", "evaluate_prototypes",
           "fedstale_rounds", "init_state", "label_shards", "local_train", "mlp", "model_from_state",
           "predictions_accuracy", "pretrain_base", "prototype_rounds"]

N_CLASSES = 10
State = dict[str, Tensor]


@dataclass(frozen=True)
class FedData:
    """Clients' training data (``clients[i] = (x [n_i, 64], y [n_i])``), the test set, and the server's own
    data of the base classes (``base``: empty tensors when ``base_classes = 0``)."""

    clients: list[tuple[Tensor, Tensor]]
    x_test: Tensor
    y_test: Tensor
    base: tuple[Tensor, Tensor]
    base_classes: int = 0

    def weights(self) -> dict[int, float]:
        """``alpha_i`` before normalisation: each client's number of training samples."""
        return {i: float(len(c[1])) for i, c in enumerate(self.clients)}

    def label_shares(self) -> np.ndarray:
        """``[n_clients, 10]``: the fraction of each client's training samples in each class."""
        out = np.zeros((len(self.clients), N_CLASSES))
        for i, (_, y) in enumerate(self.clients):
            out[i] = np.bincount(y.numpy(), minlength=N_CLASSES) / max(1, len(y))
        return out


def label_shards(y: np.ndarray, n_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Indices into ``y`` per client: ``y`` sorted by label (stable), cut into ``n_clients *
    shards_per_client`` contiguous shards, shard ``perm[s * i + j]`` (``perm`` a permutation from
    ``default_rng(seed)``) going to client ``i`` for ``j < s``."""
    if n_clients < 1 or shards_per_client < 1:
        raise ValueError(f"n_clients={n_clients} and shards_per_client={shards_per_client} must be >= 1")
    n_shards = n_clients * shards_per_client
    if n_shards > len(y):
        raise ValueError(f"{n_shards} shards for {len(y)} samples: at most one shard per sample")
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, n_shards)
    perm = np.random.default_rng(seed).permutation(n_shards)
    s = shards_per_client
    return [np.concatenate([shards[perm[s * i + j]] for j in range(s)]) for i in range(n_clients)]


_CACHE: dict[tuple[int, ...], FedData] = {}  # a plain dict, not lru_cache: Ray pickles callers by value


def digits_federated(n_clients: int = 10, shards_per_client: int = 2, shard_seed: int = 12345,
                     base_classes: int = 0, shots: int = 0) -> FedData:
    """The federated digits split of the module doc (cached per argument tuple)."""
    key = (n_clients, shards_per_client, shard_seed, base_classes, shots)
    if key in _CACHE:
        return _CACHE[key]
    if not 0 <= base_classes < N_CLASSES:
        raise ValueError(f"base_classes={base_classes}; valid: 0 to {N_CLASSES - 1} (the clients need a class)")
    if shots < 0:
        raise ValueError(f"shots={shots} must be >= 0 (0 = every sample of the shard)")
    from poise.tasks.digits import _digits

    xtr, xte, ytr, yte = _digits(0)
    sel = np.nonzero(ytr >= base_classes)[0]
    clients = []
    for idx in label_shards(ytr[sel], n_clients, shards_per_client, shard_seed):
        idx = sel[idx]
        if shots:
            keep, seen = [], dict.fromkeys(range(N_CLASSES), 0)
            for j in idx:
                if seen[int(ytr[j])] < shots:
                    keep.append(j)
                    seen[int(ytr[j])] += 1
            idx = np.array(keep, dtype=np.int64)
        clients.append((torch.from_numpy(xtr[idx].reshape(len(idx), -1)), torch.from_numpy(ytr[idx])))
    b = np.nonzero(ytr < base_classes)[0]
    base = (torch.from_numpy(xtr[b].reshape(len(b), 64)), torch.from_numpy(ytr[b]))
    out = FedData(clients, torch.from_numpy(xte.reshape(len(xte), -1)), torch.from_numpy(yte), base, base_classes)
    _CACHE[key] = out
    return out


def mlp(hidden: int = 32) -> nn.Sequential:
    """The study's model: ``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)`` (``[0]`` and ``[1]`` are the
    embedding of federated reconnaissance)."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES))


def model_from_state(state: Mapping[str, Tensor]) -> nn.Sequential:
    """A :func:`mlp` (its width read from ``state``) holding ``state``."""
    net = mlp(state["0.weight"].shape[0])
    net.load_state_dict(state)
    return net


def init_state(seed: int, hidden: int = 32) -> State:
    """The initial global model of a seed (``torch.manual_seed(seed)`` then :func:`mlp`)."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in mlp(hidden).state_dict().items()}


def pretrain_base(state: State, data: FedData, seed: int, steps: int, lr: float = 0.1,
                  batch_size: int = 64) -> State:
    """The server learns its base classes centrally before the first round: ``steps`` SGD steps on its own
    data with the logits of the base classes only (cross-entropy over ``[:, :base_classes]``)."""
    x, y = data.base
    if data.base_classes == 0 or steps == 0 or len(y) == 0:
        return {k: v.clone() for k, v in state.items()}
    net = model_from_state(state)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(net(x[idx])[:, : data.base_classes], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def available(seed: int, rnd: int, cid: int, p: float) -> bool:
    """Client ``cid`` is available in round ``rnd`` (probability ``p``)."""
    return bool(np.random.default_rng([seed, rnd, cid]).random() < p)


def dropped_out(seed: int, rnd: int, cid: int, rate: float) -> bool:
    """An available client fails mid-round, before its reply (probability ``rate``; its own draw)."""
    return rate > 0 and bool(np.random.default_rng([seed, rnd, cid, 1]).random() < rate)


def local_train(state: Mapping[str, Tensor], x: Tensor, y: Tensor, seed: int, rnd: int, cid: int, steps: int,
                lr: float, batch_size: int = 32) -> State:
    """``steps`` SGD steps of client ``cid`` in round ``rnd`` from ``state``; returns the trained state."""
    net = model_from_state(state)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed * 1_000_003 + rnd * 1009 + cid)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def evaluate(state: Mapping[str, Tensor], x: Tensor, y: Tensor) -> tuple[float, np.ndarray]:
    """``(accuracy, per-class accuracy [10])`` of the model ``state`` on ``(x, y)`` (NaN for a class with no
    test sample; a non-finite output counts as wrong)."""
    with torch.no_grad():
        out = model_from_state(state)(x)
    return predictions_accuracy(out.argmax(1), y, torch.isfinite(out).all(1))


def predictions_accuracy(pred: Tensor, y: Tensor, valid: Tensor | None = None) -> tuple[float, np.ndarray]:
    """``(accuracy, per-class accuracy [10])`` of predicted labels ``pred`` against ``y``."""
    ok = pred == y
    if valid is not None:
        ok = ok & valid
    okn, yn = ok.numpy(), y.numpy()
    per = np.array([okn[yn == k].mean() if (yn == k).any() else np.nan for k in range(N_CLASSES)])
    return float(okn.mean()), per


@dataclass
class Round:
    """One server round of :func:`fedstale_rounds`: the new global ``state``, the clients that replied
    (``fresh``), those that were available but dropped out mid-round (``dropped``) and ``||Delta||``."""

    rnd: int
    state: State
    fresh: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    update_norm: float = 0.0


def fedstale_rounds(state: Mapping[str, Tensor], data: FedData, probs: Sequence[float], *, seed: int, rounds: int,
                    beta: float, local_steps: int, lr: float, batch_size: int = 32, dropout: float = 0.0,
                    unbiased: bool = True, server_lr: float = 1.0) -> Iterator[Round]:
    """The in-process server loop (module doc), one :class:`Round` per round.

    Every client is selected; unavailable clients and drop-outs send nothing and are absent (their stale
    update ``h_i`` enters FedStale's first sum, their memory is unchanged). ``unbiased`` uses the paper's
    weights ``w_i = alpha_i / p_i``; else FedAvg over the participants ``alpha_i / sum_S alpha_j``. A round
    with no reply and an empty memory leaves the model unchanged (``fedstale_aggregate`` has no tensors to
    aggregate then)."""
    n = len(data.clients)
    if len(probs) != n:
        raise ValueError(f"{len(probs)} participation probabilities for {n} clients")
    x = {k: v.detach().clone() for k, v in state.items()}
    memory: dict[int, dict[str, Tensor]] = {}
    weights = data.weights()
    pmap = dict(enumerate(float(p) for p in probs))
    for rnd in range(1, rounds + 1):
        fresh: dict[int, dict[str, Tensor]] = {}
        dropped = []
        for cid in range(n):
            if not available(seed, rnd, cid, pmap[cid]):
                continue
            if dropped_out(seed, rnd, cid, dropout):  # it started, its reply never arrives: its work is lost
                dropped.append(cid)
                continue
            xc, yc = data.clients[cid]
            trained = local_train(x, xc, yc, seed, rnd, cid, local_steps, lr, batch_size)
            fresh[cid] = {k: trained[k] - x[k] for k in x}
        if not fresh and not memory:
            yield Round(rnd, x, [], dropped, 0.0)
            continue
        delta, memory = fedstale_aggregate(fresh, memory, list(range(n)), beta, weights,
                                           pmap if unbiased else None)
        x = {k: x[k] + delta[k] for k in x} if server_lr == 1.0 else {k: x[k] + server_lr * delta[k] for k in x}
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
        yield Round(rnd, x, sorted(fresh), dropped, norm)


def prototype_rounds(state: Mapping[str, Tensor], data: FedData, probs: Sequence[float], *, seed: int,
                     rounds: int, dropout: float = 0.0) -> Iterator[tuple[Round, dict[int, Tensor]]]:
    """Federated reconnaissance (Hendryx et al., arXiv 2109.00150) on the same clients and participation draws:
    the embedding ``f`` = ``state``'s first layer + ReLU is frozen; the server starts from the prototypes of its
    base classes; a client that replies for the first time sends ``(c'_k, m_k)`` of its classes, merged by
    :func:`poise.federated.merge_prototypes` (a client already merged has nothing new: merging its prototypes
    again would count its examples twice). Yields ``(Round, prototypes)`` per round; the round's ``state`` is
    ``state`` itself (the body is never trained)."""
    from poise.federated.reconnaissance import class_prototypes, merge_prototypes

    n = len(data.clients)
    if len(probs) != n:
        raise ValueError(f"{len(probs)} participation probabilities for {n} clients")
    body = model_from_state(state)[:2]
    with torch.no_grad():
        means: dict[int, Tensor] = {}
        counts: dict[int, int] = {}
        if len(data.base[1]):
            means, counts = class_prototypes(body(data.base[0]), data.base[1])
        merged: set[int] = set()
        for rnd in range(1, rounds + 1):
            fresh, dropped = [], []
            for cid in range(n):
                if not available(seed, rnd, cid, float(probs[cid])):
                    continue
                if dropped_out(seed, rnd, cid, dropout):
                    dropped.append(cid)
                    continue
                fresh.append(cid)
                xc, yc = data.clients[cid]
                if cid not in merged and len(yc):
                    means, counts = merge_prototypes(means, counts, *class_prototypes(body(xc), yc))
                    merged.add(cid)
            yield Round(rnd, dict(state), fresh, dropped, 0.0), dict(means)


def evaluate_prototypes(state: Mapping[str, Tensor], means: Mapping[int, Tensor], x: Tensor,
                        y: Tensor) -> tuple[float, np.ndarray]:
    """``(accuracy, per-class accuracy [10])`` of the nearest-prototype classifier on ``state``'s embedding
    (no prototype yet: every prediction wrong)."""
    from poise.federated.reconnaissance import prototype_predict

    if not means:
        return predictions_accuracy(torch.full_like(y, -1), y)
    with torch.no_grad():
        emb = model_from_state(state)[:2](x)
        return predictions_accuracy(prototype_predict(emb, means), y, torch.isfinite(emb).all(1))

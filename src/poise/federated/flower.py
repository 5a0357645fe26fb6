"""FedStale as a Flower strategy (``flwr`` message API, ``flwr.serverapp.strategy``); needs the
``federated`` extra. Import it explicitly: ``from poise.federated.flower import FedStale``.

The strategy is Flower's ``FedAvg`` (sampling, messages, evaluation) with :meth:`aggregate_train` replaced
by :func:`poise.federated.fedstale.fedstale_aggregate` (Rodio & Neglia, arXiv 2405.04171): clients return
their trained arrays, the strategy forms ``Delta_i = x_i - x`` against the arrays it sent, keeps the last
``Delta_i`` of each client as its stale memory, and steps ``x <- x + server_lr * Delta``.

Client identity: the memory is keyed by ``int(metrics[client_id_key])`` of a reply (default
``"partition-id"``, which the client copies from ``context.node_config``) and falls back to the reply's
source node id. Population weights ``alpha_i``: ``client_weights`` if given, else the latest
``weighted_by_key`` (``"num-examples"``) each client reported (clients never heard from have no memory and
no weight). A node that was sent a train message and answered with an error, or not at all, dropped out
mid-round and is treated as absent (its stale update is used, its memory is unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log
from torch import Tensor

from poise.federated.fedstale import _check_beta, fedstale_aggregate

__all__ = ["FedStale"]


class FedStale(FedAvg):
    """Flower ``FedAvg`` whose aggregation is FedStale (``beta = 0`` FedAvg, ``beta = 1`` FedVARP).

    Args:
        beta: staleness weight in ``[0, 1]``.
        participation_probs: client id -> ``p_i`` for the paper's unbiased weights ``alpha_i / p_i``; without
            it participants are averaged with ``alpha_i / sum_S alpha_j``.
        client_weights: client id -> ``alpha_i`` over the population (normalised); default: the latest
            ``weighted_by_key`` each client reported.
        client_id_key: metric of a reply that names the client (falls back to the node id).
        server_lr: ``eta_s`` in ``x <- x + eta_s * Delta``.
        **kwargs: passed to ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``, ``min_train_nodes``, ...).

    The train metrics of each round are the clients' weighted averages plus ``fedstale_fresh`` (replies
    used), ``fedstale_stale`` (clients in memory that were absent), ``fedstale_dropped`` (error replies)
    and ``fedstale_update_norm`` (``||Delta||``).
    """

    def __init__(self, beta: float, participation_probs: Mapping[int, float] | None = None,
                 client_weights: Mapping[int, float] | None = None, client_id_key: str = "partition-id",
                 server_lr: float = 1.0, **kwargs: Any) -> None:
        self.beta = _check_beta(beta)
        if not isinstance(server_lr, (int, float)) or not server_lr > 0:
            raise ValueError(f"server_lr={server_lr!r} must be > 0")
        super().__init__(**kwargs)
        self.participation_probs = dict(participation_probs) if participation_probs is not None else None
        self.client_weights = dict(client_weights) if client_weights is not None else None
        self.client_id_key = client_id_key
        self.server_lr = float(server_lr)
        self.memory: dict[int, dict[str, Tensor]] = {}
        self.reported_weights: dict[int, float] = {}
        self.node_to_client: dict[int, int] = {}
        self._global: dict[str, Tensor] | None = None
        self._selected: list[int] = []

    def summary(self) -> None:
        log(INFO, "\t├──> FedStale: beta=%s, server_lr=%s, unbiased weights: %s", self.beta, self.server_lr,
            self.participation_probs is not None)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling; remembers the arrays sent (for ``Delta_i``) and the selected nodes."""
        self._global = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._selected = [m.metadata.dst_node_id for m in messages]
        return messages

    def _client_id(self, msg: Message) -> int:
        node = msg.metadata.src_node_id
        metrics = next(iter(msg.content.metric_records.values()), None) if msg.has_content() else None
        if metrics is not None and self.client_id_key in metrics:
            self.node_to_client[node] = int(metrics[self.client_id_key])  # type: ignore[arg-type]
        return self.node_to_client.get(node, node)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``x + server_lr * fedstale_aggregate(...)``; error replies and silent nodes are absent."""
        if self._global is None:
            raise RuntimeError("aggregate_train before configure_train: no global arrays to form deltas against")
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=self.client_weights is None)
        fresh: dict[int, dict[str, Tensor]] = {}
        for msg in valid:
            cid = self._client_id(msg)
            trained = msg.content[self.arrayrecord_key].to_torch_state_dict()  # type: ignore[union-attr]
            if set(trained) != set(self._global):
                raise ValueError(f"client {cid} returned arrays {sorted(trained)}, expected {sorted(self._global)}")
            fresh[cid] = {k: trained[k].to(self._global[k].dtype) - self._global[k] for k in self._global}
            if self.client_weights is None:
                metrics = next(iter(msg.content.metric_records.values()))
                self.reported_weights[cid] = float(metrics[self.weighted_by_key])  # type: ignore[arg-type]
        selected = [self.node_to_client.get(n, n) for n in self._selected]
        participating = list(dict.fromkeys([*selected, *fresh]))
        weights = self.client_weights if self.client_weights is not None else self.reported_weights
        if not fresh and not self.memory:
            return None, None
        delta, self.memory = fedstale_aggregate(fresh, self.memory, participating, self.beta, weights,
                                                self.participation_probs)
        new = {k: self._global[k] + self.server_lr * delta[k] for k in self._global}
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key) if (
            valid and self.client_weights is None) else MetricRecord()
        metrics["fedstale_fresh"] = len(fresh)
        metrics["fedstale_stale"] = sum(1 for i in self.memory if i not in fresh)
        metrics["fedstale_dropped"] = len(errors)
        metrics["fedstale_update_norm"] = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
        return ArrayRecord(torch_state_dict=new), metrics

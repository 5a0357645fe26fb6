"""Federated aggregation as pure functions: FedStale (fresh + stale client updates, arXiv 2405.04171) and
federated reconnaissance (count-weighted online merging of class prototypes, arXiv 2109.00150).

The Flower strategy lives in :mod:`poise.federated.flower` and is imported explicitly (it needs the
``federated`` extra, ``flwr``); nothing here imports ``flwr``.
"""

from poise.federated.fedstale import fedstale_aggregate, fedstale_weights
from poise.federated.reconnaissance import (
    class_prototypes,
    merge_many,
    merge_prototypes,
    prototype_logits,
    prototype_predict,
)

__all__ = [
    "class_prototypes",
    "fedstale_aggregate",
    "fedstale_weights",
    "merge_many",
    "merge_prototypes",
    "prototype_logits",
    "prototype_predict",
]

"""Continual-learning strategies as hooks around any training loop.

Order of the hooks at each step: loss terms -> gradient transforms -> optimizer step ->
update transforms -> after_step (see :mod:`poise.continual._base`).
"""

from poise.continual._base import Batch, Compose, Strategy, classification_loss
from poise.continual.ema import EMA, AdaptiveEMA, coin_alpha
from poise.continual.eviction import ConsistencyBuffer, FaultyReplay, StableEvictionReplay, consistency_scores
from poise.continual.fscil import FSCILTricks, performance_drop, session_accuracy, simplex_etf, supcon_loss
from poise.continual.intact import InTAct, activation_interval, interval_bounds, interval_drift
from poise.continual.loop import fit_stream, task_batch
from poise.continual.mbc import MBCReplay, VQCodebook, codebook_perplexity, vq_assign
from poise.continual.merging import Merge
from poise.continual.projection import AGEM, OGD, OGPSA, EpisodicMemory, agem_project, project_out
from poise.continual.pruning import IgnoreK, prune_top
from poise.continual.regularization import EWC, LwF, diagonal_fisher
from poise.continual.reloop import ErrorMemory, ReLoop, classification_error
from poise.continual.replay import FineTune, Replay, ReservoirBuffer

__all__ = [
    "ErrorMemory",
    "FSCILTricks",
    "ReLoop",
    "classification_error",
    "performance_drop",
    "session_accuracy",
    "simplex_etf",
    "supcon_loss",
    "AdaptiveEMA",
    "ConsistencyBuffer",
    "FaultyReplay",
    "InTAct",
    "MBCReplay",
    "Merge",
    "StableEvictionReplay",
    "VQCodebook",
    "activation_interval",
    "codebook_perplexity",
    "coin_alpha",
    "consistency_scores",
    "interval_bounds",
    "interval_drift",
    "vq_assign",
    "AGEM",
    "EMA",
    "EWC",
    "OGD",
    "OGPSA",
    "Batch",
    "Compose",
    "EpisodicMemory",
    "FineTune",
    "IgnoreK",
    "LwF",
    "Replay",
    "ReservoirBuffer",
    "Strategy",
    "agem_project",
    "classification_loss",
    "diagonal_fisher",
    "fit_stream",
    "project_out",
    "prune_top",
    "task_batch",
]

"""The federated study kind: server aggregation rules compared under heterogeneous client participation,
with the global model evaluated after every round.

Variants are aggregation rules: FedStale (Rodio & Neglia, arXiv 2405.04171) with its staleness weight β
(β = 0 is FedAvg, β = 1 is FedVARP, arXiv 2207.14130), and federated reconnaissance's prototype merging
(Hendryx et al., arXiv 2109.00150) when the server has base classes. The workload
(:mod:`poise.federated.study`): non-iid digits clients (label shards), client ``i`` available in a round with
probability ``p_i``, optional mid-round drop-outs, local SGD, the in-process server loop over
:func:`poise.federated.fedstale_aggregate` (``train.engine = "loop"``) or Flower's simulation with
:class:`poise.federated.flower.FedStale` as the strategy (``train.engine = "flower"``, the ``federated`` extra).

Per round ``t = 0..T`` (0 = the initial model) the global model is evaluated on the test set: accuracy, accuracy
per class, and per client ``acc_i(t) = sum_k pi_ik acc_k(t)`` (``pi_ik`` the share of client ``i``'s training
samples in class ``k``: accuracy on the data distribution of client ``i``). From these
(:func:`round_metrics`): ``final_acc`` (mean over the last ``eval.final_window`` rounds), ``last_acc``,
``min_acc`` (the minimum after the first ``k = eval.warmup`` rounds), ``wc_acc`` (the worst client's accuracy,
final window), ``max_drop`` / ``mean_drop`` (per-round falls of accuracy after round ``k``),
``absent_forgetting`` (the mean fall of ``acc_i`` over the rounds ``t > k`` in which client ``i`` sent no
update: how much the model forgets the data of the clients that are not there) and ``absent_acc``.

A run whose global model becomes non-finite is stopped at that round and flagged (``diverged_at``); it never
enters a mean or a claim.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise.distributed import is_main
from poise.federated import study as fs
from poise.runs.config import (
    ConfigError,
    _check_variants,
    _help,
    claims_field,
    quick_field,
    sweep_field,
    tracking_field,
)
from poise.runs.engine import _stats, by_variant, execute
from poise.runs.kinds._protocol import StudyKind
from poise.runs.report import _fmt, _plt
from poise.runs.store import JsonlWriter
from poise.runs.verdict import ClaimConfig

__all__ = ["KIND", "FedDataConfig", "FedEvalConfig", "FedTrainConfig", "FedVariantConfig", "FederatedStudyConfig",
           "round_metrics", "run_federated_study", "run_one_federated", "steps_per_run", "summarize_federated",
           "validate_federated"]

DATASETS = ("digits",)
ENGINES = ("loop", "flower")
RULES = ("fedstale", "prototypes")
WEIGHTS = ("unbiased", "participants")
HETERO = [0.8, 0.2, 0.8, 0.2, 0.8, 0.2, 0.5, 0.1, 0.8, 0.2]


# -- config --------------------------------------------------------------------------------
@dataclass
class FedDataConfig:
    dataset: str = _help("client data: 'digits' (scikit-learn digits, 70/30 split)", default="digits")
    n_clients: int = _help("clients of the population", default=10)
    shards_per_client: int = _help("label shards per client (training data sorted by label, cut into n_clients x "
                                   "this many shards): fewer shards, more heterogeneous clients", default=2)
    shard_seed: int = _help("seed of the permutation that deals the shards to the clients", default=12345)
    participation: list[float] = _help("p_i: the probability that client i is available in a round, in (0, 1]; one "
                                       "value per client, or one value for all", default_factory=lambda: list(HETERO))
    dropout: float = _help("probability that an available client fails mid-round before replying (its update is "
                           "lost; the server treats it as absent: stale update used, memory unchanged); in [0, 1]",
                           default=0.0)
    base_classes: int = _help("classes 0..k-1 are the server's own data, learned centrally before round 1; the "
                              "clients hold the other classes (federated reconnaissance); 0 = none", default=0)
    base_steps: int = _help("SGD steps (lr 0.1, batch 64) of that central training, 0 to 1,000,000", default=300)
    shots: int = _help("keep at most this many training examples per class per client (0 = all)", default=0)


@dataclass
class FedTrainConfig:
    engine: str = _help("'loop': the in-process server loop over poise.federated.fedstale_aggregate; 'flower': "
                        "Flower's simulation (flwr, the 'federated' extra) with poise.federated.flower.FedStale as the "
                        "strategy (same clients, same numbers; a Ray start per run)", default="loop")
    rounds: int = _help("server rounds, 1 to 100,000", default=30)
    local_steps: int = _help("local SGD steps of a participating client per round, 1 to 100,000 (rule='prototypes' "
                             "ignores it: its clients train nothing)", default=10)
    lr: float = _help("local SGD learning rate (rule='prototypes' ignores it)", default=0.1)
    batch_size: int = _help("local batch size (drawn with replacement), 1 to 10,000 (rule='prototypes' ignores it)",
                            default=32)
    hidden: int = _help("hidden width of the MLP 64-hidden-10, 1 to 4,096", default=32)
    server_lr: float = _help("eta_s in x <- x + eta_s * Delta (rule='prototypes' ignores it)", default=1.0)


@dataclass
class FedEvalConfig:
    warmup: int = _help("k: min-ACC, drops and absent-client forgetting count rounds after the first k", default=5)
    final_window: int = _help("final_acc and wc_acc average the last this many rounds", default=5)


@dataclass
class FedVariantConfig:
    name: str = _help("label ('' = 'beta=<beta>', or 'prototypes')", default="")
    rule: str = _help("aggregation rule: 'fedstale' (beta below) or 'prototypes' (federated reconnaissance: "
                      "class prototypes on the frozen base embedding, merged online; needs data.base_classes)",
                      default="fedstale")
    beta: float = _help("FedStale's staleness weight in [0, 1]: 0 = FedAvg, 1 = FedVARP (rule='fedstale' only)",
                        default=0.0)
    weights: str = _help("participant weights: 'unbiased' (alpha_i / p_i, the paper's) or 'participants' "
                         "(alpha_i / sum over participants, Flower's FedAvg) (rule='fedstale' only)",
                         default="unbiased")


def _default_variants() -> list[FedVariantConfig]:
    return [FedVariantConfig("fedavg", beta=0.0), FedVariantConfig("fedstale", beta=0.5),
            FedVariantConfig("fedvarp", beta=1.0)]


@dataclass
class FederatedStudyConfig:
    kind: str = _help("'federated': server aggregation rules under heterogeneous client participation",
                      default="federated")
    name: str = _help("study name", default="fedstale")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("seeds (each: the initial model, the availability draws, the local batches; every "
                             "variant of a seed sees the same ones)", default_factory=lambda: [0, 1, 2])
    threads: int = _help("torch threads", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    data: FedDataConfig = _help("clients and participation", default_factory=FedDataConfig)
    train: FedTrainConfig = _help("engine, rounds and local training", default_factory=FedTrainConfig)
    eval: FedEvalConfig = _help("per-round evaluation summaries", default_factory=FedEvalConfig)
    variants: list[FedVariantConfig] = _help("aggregation rules ([[variants]] tables)",
                                             default_factory=_default_variants)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()


_TRAIN_DEFAULTS = FedTrainConfig()
_VARIANT_DEFAULTS = FedVariantConfig()
PROTOTYPES_IGNORE = ("local_steps", "lr", "batch_size", "server_lr")  # train.* keys the prototypes rule never reads


def _units(cfg: FederatedStudyConfig) -> tuple[int, int]:
    """Progress units of a run: ``(base, per_round)``: the central training of the base classes
    (``data.base_steps`` when ``data.base_classes``), then per round ``n_clients * local_steps`` local SGD steps
    (every client could reply) when some variant trains, else one unit per round (prototype merging)."""
    d, t = cfg.data, cfg.train
    base = d.base_steps if d.base_classes else 0
    trains = any(v.rule != "prototypes" for v in cfg.variants)
    return base, (d.n_clients * t.local_steps if trains else 1)


def steps_per_run(cfg: FederatedStudyConfig) -> int:
    """The work of one run, in progress steps (what the size guard counts): ``base + rounds * per_round``
    (:func:`_units`; the same for every variant of the study, so a prototypes run beside gradient rules counts
    the gradient rules' local steps)."""
    base, per_round = _units(cfg)
    return base + cfg.train.rounds * per_round


def _probs(d: FedDataConfig) -> list[float]:
    return list(d.participation) * d.n_clients if len(d.participation) == 1 else list(d.participation)


def _data(cfg: FederatedStudyConfig) -> fs.FedData:
    d = cfg.data
    return fs.digits_federated(d.n_clients, d.shards_per_client, d.shard_seed, d.base_classes, d.shots)


def _flower_missing() -> str | None:
    try:
        import flwr  # noqa: F401
        from flwr.simulation import run_simulation  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def validate_federated(cfg: FederatedStudyConfig) -> FederatedStudyConfig:
    """Ranges and choices; raises :class:`ConfigError` naming the key and the bad value."""
    d, t, e = cfg.data, cfg.train, cfg.eval
    if d.dataset not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {d.dataset!r}; valid choices: {', '.join(DATASETS)}")
    if d.n_clients < 1:
        raise ConfigError(f"data.n_clients={d.n_clients} must be >= 1 (a federation needs a client)")
    if d.shards_per_client < 1:
        raise ConfigError(f"data.shards_per_client={d.shards_per_client} must be >= 1")
    if not 0 <= d.base_classes < fs.N_CLASSES:
        raise ConfigError(f"data.base_classes={d.base_classes}; valid: 0 to {fs.N_CLASSES - 1} (the clients need a "
                          "class of their own)")
    for key, val in (("data.base_steps", d.base_steps), ("data.shots", d.shots)):
        if val < 0:
            raise ConfigError(f"{key}={val} must be >= 0")
    if d.base_steps > 1_000_000:
        raise ConfigError(f"data.base_steps={d.base_steps}; valid: 0 to 1,000,000")
    if len(d.participation) not in (1, d.n_clients):
        raise ConfigError(f"data.participation has {len(d.participation)} values for data.n_clients={d.n_clients}: "
                          "give one per client or one for all")
    for i, p in enumerate(d.participation):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise ConfigError(f"data.participation[{i}]={p!r} must be in (0, 1] (a client that is never available "
                              "has no p_i for the unbiased weights alpha_i / p_i)")
    d.participation = [float(p) for p in d.participation]
    if not 0 <= d.dropout <= 1:
        raise ConfigError(f"data.dropout={d.dropout} must be in [0, 1]")
    try:
        data = _data(cfg)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None
    empty = [i for i, (_, y) in enumerate(data.clients) if len(y) == 0]
    if empty:
        raise ConfigError(f"data: clients {empty} have no training data (data.n_clients={d.n_clients} x "
                          f"data.shards_per_client={d.shards_per_client} shards over too few samples)")
    if t.engine not in ENGINES:
        raise ConfigError(f"train.engine: unknown engine {t.engine!r}; valid choices: {', '.join(ENGINES)}")
    for key, val in (("train.rounds", t.rounds), ("train.local_steps", t.local_steps),
                     ("train.batch_size", t.batch_size), ("train.hidden", t.hidden)):
        if val < 1:
            raise ConfigError(f"{key}={val} must be >= 1")
    for key, val, hi in (("train.rounds", t.rounds, 100_000), ("train.local_steps", t.local_steps, 100_000),
                         ("train.batch_size", t.batch_size, 10_000), ("train.hidden", t.hidden, 4096)):
        if val > hi:
            raise ConfigError(f"{key}={val}; valid: 1 to {hi:,}")
    for key, val in (("train.lr", t.lr), ("train.server_lr", t.server_lr)):
        if not val > 0:
            raise ConfigError(f"{key}={val} must be > 0")
    if not 0 <= e.warmup < t.rounds:
        raise ConfigError(f"eval.warmup={e.warmup}; valid: 0 to train.rounds - 1 = {t.rounds - 1}")
    if not 1 <= e.final_window <= t.rounds:
        raise ConfigError(f"eval.final_window={e.final_window}; valid: 1 to train.rounds = {t.rounds}")
    for v in cfg.variants:
        if not v.name:
            v.name = "prototypes" if v.rule == "prototypes" else f"beta={v.beta:g}"
    for i, v in enumerate(_check_variants(cfg, "name", registry=False)):
        key = f"variants[{i}]"
        if v.rule not in RULES:
            raise ConfigError(f"{key}.rule: unknown rule {v.rule!r}; valid choices: {', '.join(RULES)}")
        if not 0 <= v.beta <= 1:
            raise ConfigError(f"{key}.beta={v.beta} (variant {v.name!r}) must be in [0, 1] (0 = FedAvg, 1 = FedVARP)")
        if v.weights not in WEIGHTS:
            raise ConfigError(f"{key}.weights: unknown weights {v.weights!r}; valid choices: {', '.join(WEIGHTS)}")
        if v.rule == "prototypes" and d.base_classes == 0:
            raise ConfigError(f"{key}.rule='prototypes' needs a trained embedding: set data.base_classes >= 1 (the "
                              "server learns those classes centrally before the first round)")
        if v.rule == "prototypes" and t.engine == "flower":
            raise ConfigError(f"{key}.rule='prototypes' runs only with train.engine='loop' (the Flower strategy "
                              "is FedStale's)")
        if v.rule == "prototypes" and v.beta != _VARIANT_DEFAULTS.beta:
            raise ConfigError(f"{key}.beta={v.beta} (variant {v.name!r}): the prototypes rule has no staleness "
                              f"weight (it would be ignored); leave beta at its default {_VARIANT_DEFAULTS.beta}")
        if v.rule == "prototypes" and v.weights != _VARIANT_DEFAULTS.weights:
            raise ConfigError(f"{key}.weights={v.weights!r} (variant {v.name!r}): the prototypes rule averages no "
                              "updates, so it has no participant weights (it would be ignored); leave weights at "
                              f"its default {_VARIANT_DEFAULTS.weights!r}")
    if cfg.variants and all(v.rule == "prototypes" for v in cfg.variants):
        for name in PROTOTYPES_IGNORE:
            val, default = getattr(t, name), getattr(_TRAIN_DEFAULTS, name)
            if val != default:
                raise ConfigError(f"train.{name}={val}: every variant uses rule='prototypes', which does not use it "
                                  f"(its clients send class prototypes, they train nothing); leave it at its default "
                                  f"{default}")
    if t.engine == "flower":
        missing = _flower_missing()
        if missing:
            raise ConfigError(f"train.engine='flower' needs Flower, which is not importable ({missing}): "
                              "pip install 'poise[federated]', or use train.engine='loop'")
    return cfg


def _resolve(cfg: FederatedStudyConfig) -> dict[str, Any]:
    data = _data(cfg)
    out: dict[str, Any] = {
        "participation": _probs(cfg.data), "client_sizes": [len(y) for _, y in data.clients],
        "client_classes": [sorted(int(k) for k in torch.unique(y)) for _, y in data.clients],
        "base_size": len(data.base[1]), "test_size": len(data.y_test)}
    if cfg.train.engine == "flower":
        import flwr

        out["flwr"] = flwr.__version__
    return out


# -- metrics ---------------------------------------------------------------------------------
def round_metrics(acc: list[float], client_acc: np.ndarray, class_acc: np.ndarray, fresh: list[list[int]],
                  warmup: int, window: int, base_classes: int = 0) -> dict[str, Any]:
    """The run's stability metrics from its per-round evaluations (rounds ``0..T``; row 0 = the initial model).

    ``acc[t]`` overall test accuracy, ``client_acc[t, i]`` accuracy on client ``i``'s label distribution,
    ``class_acc[t, k]`` per class, ``fresh[t - 1]`` the clients that sent an update in round ``t``; ``k =
    warmup``, ``W = window``::

        final_acc = mean_{t > T-W} acc[t]              last_acc = acc[T]
        min_acc   = min_{t > k} acc[t]                 wc_acc = min_i mean_{t > T-W} client_acc[t, i]
        drop[t]   = max(0, acc[t-1] - acc[t])          max_drop, mean_drop over t > k
        absent_forgetting = mean over (t > k, i not in fresh[t-1]) of max(0, client_acc[t-1, i] - client_acc[t, i])
        absent_acc        = mean over the same pairs of client_acc[t, i]   (None when every client always replied)
        acc_base / acc_new = mean_{t > T-W} of the mean class accuracy over classes < / >= base_classes
    """
    a = np.asarray(acc, dtype=float)
    ca, cl = np.asarray(client_acc, dtype=float), np.asarray(class_acc, dtype=float)
    T = len(a) - 1
    if T < 1 or not 0 <= warmup < T or not 1 <= window <= T or len(fresh) != T:
        raise ValueError(f"{T} rounds with warmup={warmup}, window={window}, {len(fresh)} participation lists")
    last = slice(T - window + 1, T + 1)
    after = range(warmup + 1, T + 1)
    drops = [max(0.0, a[t - 1] - a[t]) for t in after]
    pairs = [(t, i) for t in after for i in range(ca.shape[1]) if i not in set(fresh[t - 1])]
    out: dict[str, Any] = {
        "final_acc": float(a[last].mean()), "last_acc": float(a[T]), "min_acc": float(a[warmup + 1:].min()),
        "wc_acc": float(ca[last].mean(0).min()), "max_drop": float(max(drops)), "mean_drop": float(np.mean(drops)),
        "absent_forgetting": float(np.mean([max(0.0, ca[t - 1, i] - ca[t, i]) for t, i in pairs])) if pairs else None,
        "absent_acc": float(np.mean([ca[t, i] for t, i in pairs])) if pairs else None,
        "participants": float(np.mean([len(f) for f in fresh])),
        "client_acc": {str(i): float(x) for i, x in enumerate(ca[last].mean(0))},
        "acc_new": float(np.nanmean(cl[last, base_classes:], axis=1).mean()),
    }
    if base_classes:
        out["acc_base"] = float(np.nanmean(cl[last, :base_classes], axis=1).mean())
    return out


# -- one run --------------------------------------------------------------------------------
def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def run_one_federated(cfg: FederatedStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
                      progress: Any = None) -> dict[str, Any]:
    """One aggregation rule, one seed: ``train.rounds`` server rounds with the global model evaluated after each.
    Returns per-round curves (``curves``) and :func:`round_metrics` (``metrics``); a non-finite global model
    stops the run at that round (``diverged_at``)."""
    v, d, t = cfg.variants[variant_index], cfg.data, cfg.train
    torch.set_num_threads(cfg.threads)
    data, probs = _data(cfg), _probs(d)
    shares = data.label_shares()
    x0 = fs.pretrain_base(fs.init_state(seed, t.hidden), data, seed, d.base_steps)
    base_units, per_round = _units(cfg)
    done = {"n": 0}

    def tick(n: int) -> None:
        done["n"] += n
        if progress is not None and n:
            progress(n)

    tick(base_units)
    t0 = time.perf_counter()
    if v.rule == "prototypes":
        rounds: Any = fs.prototype_rounds(x0, data, probs, seed=seed, rounds=t.rounds, dropout=d.dropout)
    elif t.engine == "flower":
        rounds = iter(_flower_rounds(cfg, v, seed, x0, data, probs))
    else:
        rounds = fs.fedstale_rounds(x0, data, probs, seed=seed, rounds=t.rounds, beta=v.beta,
                                    local_steps=t.local_steps, lr=t.lr, batch_size=t.batch_size, dropout=d.dropout,
                                    unbiased=v.weights == "unbiased", server_lr=t.server_lr)
    if v.rule == "prototypes":  # round 0: the server's base-class prototypes
        acc0, cls0 = fs.evaluate_prototypes(x0, _base_prototypes(x0, data), data.x_test, data.y_test)
    else:
        acc0, cls0 = fs.evaluate(x0, data.x_test, data.y_test)
    accs, classes, fresh, dropped, norms = [acc0], [cls0], [], [], []
    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    diverged_at = None
    try:
        for item in rounds:
            r, means = item if isinstance(item, tuple) else (item, None)
            if not _finite(r.state):
                diverged_at = r.rnd
                if writer:
                    writer.write({"step": r.rnd, "diverged": True, "reason": "non-finite global model"})
                break
            acc, cls = (fs.evaluate_prototypes(r.state, means, data.x_test, data.y_test) if means is not None
                        else fs.evaluate(r.state, data.x_test, data.y_test))
            accs.append(acc)
            classes.append(cls)
            fresh.append(r.fresh)
            dropped.append(r.dropped)
            norms.append(r.update_norm)
            if writer:
                ca = shares @ np.nan_to_num(cls)
                writer.write({"step": r.rnd, "acc": acc, "worst_client_acc": float(ca.min()),
                              "participants": len(r.fresh), "dropped": len(r.dropped), "update_norm": r.update_norm})
            tick(per_round)
    finally:
        if writer:
            writer.close()
    tick(steps_per_run(cfg) - done["n"])  # the rounds a diverged run skips
    client_acc = np.array([shares @ np.nan_to_num(c) for c in classes])
    out: dict[str, Any] = {
        "variant": v.name, "rule": v.rule, "beta": v.beta, "seed": seed, "diverged_at": diverged_at,
        "engine": t.engine, "wall_seconds": time.perf_counter() - t0,
        "curves": {"round": list(range(len(accs))), "acc": accs, "client_acc": client_acc.tolist(),
                   "class_acc": [np.nan_to_num(c, nan=-1.0).tolist() for c in classes], "fresh": fresh,
                   "dropped": dropped, "update_norm": norms},
        "metrics": {},
    }
    if diverged_at is None:
        out["metrics"] = round_metrics(accs, client_acc, np.array(classes), fresh, cfg.eval.warmup,
                                       cfg.eval.final_window, d.base_classes)
        out["metrics"]["dropped"] = float(np.mean([len(x) for x in dropped]))
    return out


def _base_prototypes(state: dict[str, torch.Tensor], data: fs.FedData) -> dict[int, torch.Tensor]:
    from poise.federated.reconnaissance import class_prototypes

    with torch.no_grad():
        return class_prototypes(fs.model_from_state(state)[:2](data.base[0]), data.base[1])[0]


# -- the Flower engine ------------------------------------------------------------------------
def _flower_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train function (module level: Ray imports it by reference in its workers)."""
    from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    cid = int(context.node_config["partition-id"])
    c = msg.content["config"]
    seed, rnd = int(c["seed"]), int(c["server-round"])
    data = fs.digits_federated(int(c["n-clients"]), int(c["shards-per-client"]), int(c["shard-seed"]),
                               int(c["base-classes"]), int(c["shots"]))
    if not fs.available(seed, rnd, cid, float(c["participation"][cid])):
        return Message(error=Error(code=0, reason=f"client {cid} unavailable this round"), reply_to=msg)
    if fs.dropped_out(seed, rnd, cid, float(c["dropout"])):
        return Message(error=Error(code=1, reason=f"client {cid} dropped out mid-round"), reply_to=msg)
    x, y = data.clients[cid]
    state = msg.content["arrays"].to_torch_state_dict()
    trained = fs.local_train(state, x, y, seed, rnd, cid, int(c["local-steps"]), float(c["lr"]),
                             int(c["batch-size"]))
    metrics = MetricRecord({"num-examples": len(y), "partition-id": cid})
    return Message(content=RecordDict({"arrays": ArrayRecord(torch_state_dict=trained), "metrics": metrics}),
                   reply_to=msg)


def _flower_rounds(cfg: FederatedStudyConfig, v: FedVariantConfig, seed: int, x0: dict[str, torch.Tensor],
                   data: fs.FedData, probs: list[float]) -> list[fs.Round]:
    """One run in Flower's simulation (``flwr.simulation.run_simulation``, Ray backend, one CPU per client
    actor): the strategy is :class:`poise.federated.flower.FedStale` (every node selected each round; an
    unavailable or dropped-out client answers with an error and is absent). Returns the global model of every
    round (from the server-side ``evaluate_fn``) and who replied."""
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from poise.federated.flower import FedStale

    logging.getLogger("flwr").setLevel(logging.WARNING)
    d, t, n = cfg.data, cfg.train, len(data.clients)
    replied: dict[int, tuple[list[int], list[int]]] = {}
    states: dict[int, dict[str, torch.Tensor]] = {}

    class Recording(FedStale):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            ok = sorted(int(next(iter(m.content.metric_records.values()))["partition-id"])
                        for m in replies if m.has_content())
            gone = sorted(int(m.error.reason.split()[1]) for m in replies
                          if m.has_error() and "dropped out" in m.error.reason)
            replied[server_round] = (ok, gone)
            return super().aggregate_train(server_round, replies)

    client = ClientApp()
    client.train()(_flower_train)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Recording(beta=v.beta, participation_probs=dict(enumerate(probs)) if v.weights == "unbiased"
                             else None, client_weights=data.weights(), server_lr=t.server_lr, fraction_train=1.0,
                             fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            states[rnd] = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
            return MetricRecord({})

        strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=x0), num_rounds=t.rounds,
                       train_config=ConfigRecord({
                           "seed": seed, "local-steps": t.local_steps, "lr": t.lr, "batch-size": t.batch_size,
                           "n-clients": d.n_clients, "shards-per-client": d.shards_per_client,
                           "shard-seed": d.shard_seed, "base-classes": d.base_classes, "shots": d.shots,
                           "participation": [float(p) for p in probs], "dropout": float(d.dropout)}),
                       evaluate_fn=evaluate)

    run_simulation(server_app=server, client_app=client, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False,
                                                 "logging_level": "error", "log_to_driver": False}})
    missing = [r for r in range(1, t.rounds + 1) if r not in states]
    if missing:
        raise RuntimeError(f"the Flower simulation returned no global model for rounds {missing}")
    out = []
    for r in range(1, t.rounds + 1):
        ok, gone = replied.get(r, ([], []))
        prev = states[r - 1] if r - 1 in states else x0
        norm = float(torch.sqrt(sum(((states[r][k] - prev[k]).double() ** 2).sum() for k in prev)))
        out.append(fs.Round(r, states[r], ok, gone, norm / t.server_lr))
    return out


def run_federated_study(cfg: FederatedStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                        report: bool = True) -> Path:
    """Run every aggregation rule x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- summary and report ----------------------------------------------------------------------
def summarize_federated(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: mean, std and n over seeds of every metric (per-client accuracies as ``client_acc.<i>``)."""
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        row: dict[str, Any] = {}
        for m in dict.fromkeys(k for r in rs for k in r["metrics"]):
            if m == "client_acc":
                for i in dict.fromkeys(c for r in rs for c in r["metrics"][m]):
                    row[f"client_acc.{i}"] = _stats([r["metrics"][m].get(i) for r in rs])
            else:
                row[m] = _stats([r["metrics"].get(m) for r in rs])
        row["seeds"] = [r["seed"] for r in rs]
        out[variant] = row
    return out


_HEADS = [("final_acc", "final ACC ↑"), ("last_acc", "last ACC ↑"), ("min_acc", "min-ACC ↑"),
          ("wc_acc", "WC-ACC (worst client) ↑"), ("max_drop", "max drop ↓"), ("mean_drop", "mean drop ↓"),
          ("absent_forgetting", "absent-client forgetting ↓"), ("absent_acc", "absent-client acc ↑"),
          ("acc_new", "client classes ↑"), ("participants", "replies / round"), ("dropped", "drop-outs / round")]


def _rule(config: dict[str, Any], name: str) -> str:
    for v in config["variants"]:
        if v["name"] == name:
            return "prototype merge" if v["rule"] == "prototypes" else f"FedStale β={v['beta']:g} ({v['weights']})"
    return ""


def _federated_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = summarize_federated(results)
    e, d = config["eval"], config["data"]
    heads = list(_HEADS)
    if d.get("base_classes"):
        heads.insert(8, ("acc_base", f"base classes 0-{d['base_classes'] - 1} ↑"))
    note = (f"Mean ± sample std over seeds; ↑ higher is better, ↓ lower is better. The global model is evaluated on "
            f"the test set after every round. final ACC: mean over the last {e['final_window']} rounds; min-ACC: "
            f"the lowest accuracy after the first {e['warmup']} rounds; WC-ACC: the worst client's accuracy (accuracy "
            "weighted by the client's label distribution), last rounds; drops: falls of accuracy from one round to "
            "the next; absent-client forgetting: mean fall of a client's accuracy over the rounds in which it sent "
            "no update (unavailable or dropped out); class accuracies are class-balanced.")
    rows = [[html.escape(v), html.escape(_rule(config, v)), *(_fmt(r.get(k)) for k, _ in heads)]
            for v, r in table.items()]
    out = [{"title": "Stability of the global model per aggregation rule", "note": note,
            "heads": ["rule", *(h for _, h in heads)], "rows": rows}]
    probs = d["participation"] * d["n_clients"] if len(d["participation"]) == 1 else d["participation"]
    cheads = [f"client {i} (p={p:g}) ↑" for i, p in enumerate(probs)]
    crows = [[html.escape(v), *(_fmt(r.get(f"client_acc.{i}")) for i in range(len(probs)))]
             for v, r in table.items()]
    out.append({"title": "Final accuracy on each client's data", "heads": cheads, "rows": crows,
                "note": f"Accuracy on each client's label distribution, mean of the last {e['final_window']} rounds; "
                        "p = the client's participation probability."})
    return out


def _federated_plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    plt = _plt()
    ok = [r for r in results if r.get("diverged_at") is None]  # diverged runs are flagged in the report's notice
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    if not variants:
        return []
    colors = plt.get_cmap("tab10")
    fig, (ax, aw) = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, v in enumerate(variants):
        rs = [r for r in ok if r["variant"] == v]
        acc = np.array([r["curves"]["acc"] for r in rs])
        worst = np.array([np.min(r["curves"]["client_acc"], axis=1) for r in rs])
        x = np.arange(acc.shape[1])
        for a, y in ((ax, acc), (aw, worst)):
            m, s = y.mean(0), y.std(0)
            a.plot(x, m, color=colors(i % 10), label=v)
            if len(rs) > 1:
                a.fill_between(x, m - s, m + s, color=colors(i % 10), alpha=0.15)
    ax.set(xlabel="round", ylabel="test accuracy", title="Global model after every round (mean ± std over seeds)")
    aw.set(xlabel="round", ylabel="accuracy on the worst client's data", title="Worst client after every round")
    for a in (ax, aw):
        a.legend(fontsize=8)
        a.set_ylim(0, 1)
    fig.tight_layout()
    p1 = run_dir / "rounds.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    d = config["data"]
    probs = d["participation"] * d["n_clients"] if len(d["participation"]) == 1 else d["participation"]
    fig, ac = plt.subplots(figsize=(13, 3.8))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = np.array([[r["metrics"]["client_acc"][str(c)] for c in range(len(probs))] for r in ok
                         if r["variant"] == v])
        ac.bar(np.arange(len(probs)) + i * width, vals.mean(0), width, yerr=vals.std(0), color=colors(i % 10),
               label=v, capsize=2)
    ac.set_xticks(np.arange(len(probs)) + 0.4 - width / 2, [f"{c}\np={p:g}" for c, p in enumerate(probs)])
    ac.set(ylim=(0, 1.05), ylabel="final accuracy", title="Final accuracy on each client's data (client, p_i)")
    ac.legend(fontsize=8, ncol=min(4, len(variants)))
    fig.tight_layout()
    p2 = run_dir / "clients.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [("Accuracy of the global model per round: overall and on the worst client's data", p1),
            ("Final accuracy per client: rarely available clients are where stale updates matter", p2)]


KIND = StudyKind(
    name="federated",
    Config=FederatedStudyConfig,
    example="fedstale",
    variant_key="name",
    validate=validate_federated,
    steps_per_run=steps_per_run,
    describe=lambda cfg: (f"{cfg.data.n_clients} clients x {cfg.train.rounds} rounds x {cfg.train.local_steps} "
                          f"local steps, engine {cfg.train.engine}"),
    run_one=run_one_federated,
    summarize=lambda results, config: summarize_federated(results),
    tables=_federated_tables,
    plots=_federated_plots,
    columns=(("final_acc", "final ACC"), ("min_acc", "min-ACC"), ("wc_acc", "WC-ACC"), ("max_drop", "max drop"),
             ("absent_forgetting", "absent forg"), ("participants", "replies")),
    quick=("seeds=[0]", "train.rounds=8", "eval.warmup=2", "eval.final_window=3"),
    resolve=_resolve,
)

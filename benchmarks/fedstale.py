"""FedStale under heterogeneous participation: does an intermediate beta beat FedAvg (beta=0) and FedVARP (beta=1)?

    python benchmarks/fedstale.py [--engine flower|loop] [--seeds 3] [--rounds 30] [--threads 1] [--json out.json]

Setup: scikit-learn digits (70/30 stratified split), 10 clients with a label-shard non-iid split (train
data sorted by label, cut into 20 shards, 2 shards per client: most clients see 2-3 classes), a tiny
MLP 64-32-10. Heterogeneous participation: client ``i`` is available in a round with probability
``p_i`` (``--participation hetero``: alternating 0.8 / 0.2 by client, plus one client at 0.5 and one at 0.1;
``homo``: 0.46 for all, the same mean); an unavailable client
answers the train message with an error (it "drops out"), which the strategy treats as absent. Local
training: ``--local-steps`` SGD steps (batch 32) from the global model. Server:
``x <- x + Delta`` with FedStale's ``Delta`` (``poise.federated.fedstale_aggregate``) and the paper's
unbiased weights ``alpha_i / p_i`` (``alpha_i`` = client data share). The same availability draws and
local-training seeds are used for every beta of a seed (paired comparison).

Engines: ``flower`` runs Flower's simulation (``flwr.simulation.run_simulation``, Ray backend, one
actor on one CPU) with ``poise.federated.flower.FedStale`` as the strategy; ``loop`` is a single-process
loop that calls ``fedstale_aggregate`` directly with the same clients (no federated engine; for machines
without ``flwr`` and as a parity check: both engines give the same numbers up to float summation order).
The clients, local training and the loop are :mod:`poise.federated.study`'s: the same runs, with per-round
stability metrics and verdicts, are ``poise run fedstale`` (docs/studies/federated.md).

Claim (Rodio & Neglia, arXiv 2405.04171): under heterogeneous participation a FedStale with an intermediate
beta beats both FedAvg and FedVARP ("stale updates help more under high data heterogeneity and lower
participation heterogeneity"). Tested with ``poise.runs.verdict`` (paired by seed, 95% Student-t interval):
final test accuracy (mean of the last 5 rounds) of beta=0.5 minus beta=0, and of beta=0.5 minus beta=1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poise.federated import class_prototypes, merge_many, merge_prototypes, prototype_predict, study
from poise.runs.verdict import ClaimConfig, Side, evaluate_claim, t975

N_CLIENTS = 10
PARTICIPATION = {
    "hetero": [0.8, 0.2, 0.8, 0.2, 0.8, 0.2, 0.5, 0.1, 0.8, 0.2],  # heterogeneous (mean 0.46)
    "homo": [0.46] * 10,  # the same mean participation, homogeneous
}
PROBS = dict(enumerate(PARTICIPATION["hetero"]))


def data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    d = study.digits_federated(N_CLIENTS, shards_per_client=2, shard_seed=12345)
    return d.clients, d.x_test, d.y_test


def model() -> nn.Module:
    return study.mlp(32)


def init_state(seed: int) -> dict[str, torch.Tensor]:
    return study.init_state(seed, 32)


def available(seed: int, rnd: int, cid: int) -> bool:
    return study.available(seed, rnd, cid, PROBS[cid])


def local_train(state: dict[str, torch.Tensor], cid: int, seed: int, rnd: int, steps: int,
                lr: float) -> dict[str, torch.Tensor]:
    x, y = data()[0][cid]
    return study.local_train(state, x, y, seed, rnd, cid, steps, lr)


def accuracy(state: dict[str, torch.Tensor]) -> float:
    _, xte, yte = data()
    net = model()
    net.load_state_dict(state)
    with torch.no_grad():
        return float((net(xte).argmax(1) == yte).float().mean())


def client_weights() -> dict[int, float]:
    return {i: float(len(c[1])) for i, c in enumerate(data()[0])}


# ---------------------------------------------------------------- single-process loop (no engine)
def run_loop(seed: int, beta: float, rounds: int, steps: int, lr: float) -> tuple[list[float], list[int]]:
    """The in-process server loop (:func:`poise.federated.study.fedstale_rounds`, the one the ``federated``
    study kind runs)."""
    d = study.digits_federated(N_CLIENTS, shards_per_client=2, shard_seed=12345)
    accs, n_fresh = [], []
    for r in study.fedstale_rounds(init_state(seed), d, [PROBS[i] for i in range(N_CLIENTS)], seed=seed,
                                   rounds=rounds, beta=beta, local_steps=steps, lr=lr):
        accs.append(accuracy(r.state))
        n_fresh.append(len(r.fresh))
    return accs, n_fresh


# ---------------------------------------------------------------- Flower simulation
def run_flower(seeds: list[int], betas: list[float], rounds: int, steps: int, lr: float) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from poise.federated.flower import FedStale

    logging.getLogger("flwr").setLevel(logging.WARNING)
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        cfg = msg.content["config"]
        seed, rnd = int(cfg["seed"]), int(cfg["server-round"])
        if not available(seed, rnd, cid):  # the client is not there this round: it drops out
            return Message(error=Error(code=0, reason="client unavailable this round"), reply_to=msg)
        state = msg.content["arrays"].to_torch_state_dict()
        trained = local_train(state, cid, seed, rnd, int(cfg["local-steps"]), float(cfg["lr"]))
        metrics = MetricRecord({"num-examples": len(data()[0][cid][1]), "partition-id": cid})
        return Message(content=RecordDict({"arrays": ArrayRecord(torch_state_dict=trained), "metrics": metrics}),
                       reply_to=msg)

    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for seed in seeds:
            for beta in betas:
                strategy = FedStale(beta=beta, participation_probs=PROBS, client_weights=client_weights(),
                                    fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=N_CLIENTS,
                                    min_available_nodes=N_CLIENTS)
                accs: list[float] = []

                def evaluate(rnd: int, arrays: ArrayRecord, accs: list[float] = accs) -> MetricRecord:
                    acc = accuracy(arrays.to_torch_state_dict())
                    if rnd > 0:
                        accs.append(acc)
                    return MetricRecord({"accuracy": acc})

                result = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=init_state(seed)),
                               num_rounds=rounds, train_config=ConfigRecord({"seed": seed, "local-steps": steps,
                                                                             "lr": lr}),
                               evaluate_fn=evaluate)
                fresh = [int(m["fedstale_fresh"]) for m in result.train_metrics_clientapp.values()]
                if sum(fresh) == 0:
                    raise RuntimeError("no client ever replied without an error: the ClientApp is failing")
                out[(seed, beta)] = (accs, fresh)

    run_simulation(server_app=server, client_app=client, num_supernodes=N_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False,
                                                 "logging_level": "error", "log_to_driver": False}})
    if len(out) != len(seeds) * len(betas):
        raise RuntimeError(f"the Flower simulation finished {len(out)} of {len(seeds) * len(betas)} runs")
    return out


# ---------------------------------------------------------------- federated reconnaissance (in-process)
def recon_seed(seed: int, shots: int, ft_rounds: int, ft_steps: int) -> dict:
    """Base classes 0-4 learned centrally (the embedding); 5 clients each learn 2 of the new classes 5-9
    from ``shots`` examples per class. fed-recon: client prototypes merged into the server's by
    ``merge_prototypes``; centralised: prototypes of the pooled data; FedAvg-FT: each round every client
    fine-tunes the whole network (10-way head) on its shots and the server averages the weights."""
    from poise.tasks.digits import _digits

    xtr, xte, ytr, yte = (torch.from_numpy(a) for a in _digits(0))
    xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    body, head = nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10)
    base = ytr < 5
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)
    for _ in range(300):
        idx = torch.nonzero(base).squeeze(1)[torch.randint(0, int(base.sum()), (64,), generator=g)]
        loss = F.cross_entropy(head(body(xtr[idx]))[:, :5], ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    client_data = []
    for c in range(5):
        idx = []
        for k in (5 + c, 5 + (c + 1) % 5):
            pool = torch.nonzero(ytr == k).squeeze(1)
            half = pool[torch.randperm(len(pool), generator=g)][: len(pool) // 2] if k == 5 + c else \
                pool[torch.randperm(len(pool), generator=g)][len(pool) // 2:]
            idx.append(half[:shots])
        idx_t = torch.cat(idx)
        client_data.append((xtr[idx_t], ytr[idx_t]))

    def acc(pred: torch.Tensor) -> dict[str, float]:
        ok = (pred == yte).float()
        return {"acc_all": float(ok.mean()), "acc_base": float(ok[yte < 5].mean()),
                "acc_new": float(ok[yte >= 5].mean())}

    with torch.no_grad():
        server = class_prototypes(body(xtr[base]), ytr[base])
        clients = [class_prototypes(body(x), y) for x, y in client_data]
        order = torch.randperm(5, generator=g).tolist()
        means, counts = server
        for c in order:
            means, counts = merge_prototypes(means, counts, *clients[c])
        pooled_x = torch.cat([xtr[base], *[x for x, _ in client_data]])
        pooled_y = torch.cat([ytr[base], *[y for _, y in client_data]])
        central, _ = class_prototypes(body(pooled_x), pooled_y)
        gap = max(float((means[k] - central[k]).abs().max()) for k in central)
        rev, _ = merge_many([server, *[clients[c] for c in reversed(order)]])
        order_gap = max(float((means[k] - rev[k]).abs().max()) for k in rev)
        recon = acc(prototype_predict(body(xte), means))
        cent = acc(prototype_predict(body(xte), central))
    net = nn.Sequential(body, head)
    x_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for _ in range(ft_rounds):
        states = []
        for x, y in client_data:
            net.load_state_dict(x_state)
            o = torch.optim.SGD(net.parameters(), lr=0.05)
            for _ in range(ft_steps):
                loss = F.cross_entropy(net(x), y)
                o.zero_grad()
                loss.backward()
                o.step()
            states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        x_state = {k: sum(st[k] for st in states) / len(states) for k in x_state}
    net.load_state_dict(x_state)
    with torch.no_grad():
        ft = acc(net(xte).argmax(1))
    return {"seed": seed, "recon": recon, "centralised": cent, "fedavg_ft": ft, "proto_gap": gap,
            "order_gap": order_gap}


def run_recon(seeds: list[int], shots: int) -> list[dict]:
    res = [recon_seed(s, shots, ft_rounds=5, ft_steps=20) for s in seeds]
    rows = [{"variant": v, "seed": r["seed"], "metrics": r[v]} for r in res for v in ("recon", "centralised",
                                                                                         "fedavg_ft")]
    claim = ClaimConfig("federated reconnaissance (prototype merging) beats FedAvg fine-tuning on all classes seen "
                        "by any client", "arXiv 2109.00150",
                        "> 22% (Omniglot, 600 classes) and > 33% (mini-ImageNet) over continual-learning baselines",
                        Side("recon", "acc_all"), Side("fedavg_ft", "acc_all"))
    v = evaluate_claim(claim, rows)
    print(f"federated reconnaissance (in-process, pure functions): digits, base classes 0-4 learned centrally "
          f"(MLP body 64-32 = the embedding), 5 clients x 2 new classes of 5-9, {shots} shots per class, "
          f"{len(seeds)} seeds")
    for name in ("recon", "centralised", "fedavg_ft"):
        for m in ("acc_all", "acc_base", "acc_new"):
            vals = [r[name][m] for r in res]
            half = t975(len(vals) - 1) * float(np.std(vals, ddof=1)) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
            print(f"  {name:12s} {m:9s} {np.mean(vals):.4f} ± {half:.4f}")
    print(f"  merged vs centralised prototypes: max |diff| {max(r['proto_gap'] for r in res):.2e}; "
          f"merge order reversed: max |diff| {max(r['order_gap'] for r in res):.2e}")
    est = "n/a" if v["estimate"] is None else f"{v['estimate']:+.4f}"
    iv = "" if v["interval"] is None else f" [{v['interval'][0]:+.4f}, {v['interval'][1]:+.4f}]"
    print(f"  CLAIM {v['text']}\n    {v['better']} - {v['than']} = {est}{iv} -> {v['verdict']}")
    return [{"per_seed": res, "verdict": v}]


def fedstale_study(a: argparse.Namespace, seeds: list[int], betas: list[float]) -> dict:
    t0 = time.perf_counter()
    if a.engine == "flower":
        runs = run_flower(seeds, betas, a.rounds, a.local_steps, a.lr)
    else:
        runs = {(s, b): run_loop(s, b, a.rounds, a.local_steps, a.lr) for s in seeds for b in betas}
    curves = {k: v[0] for k, v in runs.items()}
    fresh = {k: v[1] for k, v in runs.items()}
    rows = [{"variant": f"beta={b:g}", "seed": s,
             "metrics": {"final_acc": float(np.mean(curves[(s, b)][-5:])), "last_acc": curves[(s, b)][-1]}}
            for s in seeds for b in betas]
    mid = [b for b in betas if 0 < b < 1]
    claims = []
    for m in mid:
        for ext in (0.0, 1.0):
            if ext in betas:
                claims.append(ClaimConfig(
                    f"FedStale beta={m:g} beats {'FedAvg (beta=0)' if ext == 0 else 'FedVARP (beta=1)'} "
                    f"under {a.participation} participation (final test accuracy, mean of last 5 rounds)",
                    "arXiv 2405.04171", "an intermediate beta outperforms both extremes (their Fig. 2-3, MNIST/CIFAR)",
                    Side(f"beta={m:g}", "final_acc"), Side(f"beta={ext:g}", "final_acc")))
    verdicts = [evaluate_claim(c, rows) for c in claims]
    if a.engine == "flower":
        import flwr

        label = f"Flower simulation (flwr {flwr.__version__}, Ray backend, strategy poise.federated.flower.FedStale)"
    else:
        label = "single-process loop calling fedstale_aggregate (no federated engine)"
    print(f"engine: {label}")
    print(f"  participants per round (seed 0): {fresh[(seeds[0], betas[0])]}")
    print(f"digits, {N_CLIENTS} clients (label shards), MLP 64-32-10, p_i={list(PROBS.values())}, "
          f"{a.rounds} rounds x {a.local_steps} local steps, {a.seeds} seeds; {time.perf_counter() - t0:.0f} s")
    for b in betas:
        vals = [r["metrics"]["final_acc"] for r in rows if r["variant"] == f"beta={b:g}"]
        mean = float(np.mean(vals))
        half = t975(len(vals) - 1) * float(np.std(vals, ddof=1)) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
        print(f"  beta={b:<4g} final acc {mean:.4f} ± {half:.4f} (95% t)  per seed {np.round(vals, 4).tolist()}")
    for v in verdicts:
        est = "n/a" if v["estimate"] is None else f"{v['estimate']:+.4f}"
        iv = "" if v["interval"] is None else f" [{v['interval'][0]:+.4f}, {v['interval'][1]:+.4f}]"
        print(f"  CLAIM {v['text']}\n    {v['better']} - {v['than']} = {est}{iv} -> {v['verdict']}")
    if claims:
        both = all(v["verdict"] == "reproduced" for v in verdicts)
        anyno = any(v["verdict"] == "not reproduced" for v in verdicts)
        print(f"  VERDICT (intermediate beta beats both extremes): "
              f"{'reproduced' if both else 'not reproduced' if anyno else 'inconclusive'}")
    return {"engine": a.engine, "curves": {f"{s}|{b:g}": c for (s, b), c in curves.items()},
            "fresh_per_round": {f"{s}|{b:g}": c for (s, b), c in fresh.items()}, "rows": rows, "verdicts": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["flower", "loop"], default="flower")
    ap.add_argument("--part", choices=["all", "fedstale", "recon"], default="all")
    ap.add_argument("--shots", type=int, default=5, help="reconnaissance: examples per new class per client")
    ap.add_argument("--participation", choices=sorted(PARTICIPATION), default="hetero")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--betas", default="0,0.5,1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="write per-run accuracies and verdicts here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    seeds, betas = list(range(a.seeds)), [float(b) for b in a.betas.split(",")]
    PROBS.update(enumerate(PARTICIPATION[a.participation]))
    out: dict = {}
    if a.part in ("all", "fedstale"):
        out["fedstale"] = fedstale_study(a, seeds, betas)
    if a.part in ("all", "recon"):
        out["recon"] = run_recon(seeds, a.shots)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

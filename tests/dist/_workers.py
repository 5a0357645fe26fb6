"""Worker functions for the 2-process gloo tests (module level: torch.multiprocessing pickles them
by name)."""

import json

import torch
import torch.distributed as dist
from torch import nn

from poise.runs.config import OptimVariantConfig
from poise.runs.optim_study import make_optimizer

STEPS = 6
PARAMS = {"galore_adamw": {"rank": 4, "update_proj_gap": 2}, "qgalore_adamw": {"rank": 4},
          "soap": {"precondition_frequency": 2}, "classp": {"threshold": 1e-8},
          "psgd_kron": {"lr": 1e-2}}  # its default lr (1e-3) moves this toy by < 1e-3 in STEPS steps: too little to compare


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 16, 8, generator=g), torch.randn(STEPS, 16, 4, generator=g)


def train(name: str, m: nn.Module, rank: int, world: int, micro: int = 1) -> None:
    """``STEPS`` steps on this rank's share of each global batch of 16, in ``micro`` gradient-
    accumulation micro-batches (1 process with ``micro=2`` = the arithmetic of 2-rank DDP)."""
    opt = make_optimizer(OptimVariantConfig(optimizer=name, params=dict(PARAMS.get(name, {}))), m)
    X, Y = data()
    per = X.shape[1] // world
    for t in range(STEPS):
        x, y = X[t, rank * per : (rank + 1) * per], Y[t, rank * per : (rank + 1) * per]
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (((m(xm) - ym) ** 2).mean() / micro).backward()
        opt.step()


def single(names: list[str], micro: int = 2) -> dict[str, list[float]]:
    out = {}
    for n in names:
        m = model()
        train(n, m, 0, 1, micro)
        out[n] = torch.cat([p.detach().flatten() for p in m.parameters()]).tolist()
    return out


def ddp_worker(rank: int, world: int, names: list[str], out_path: str, mode: str) -> None:
    res = {}
    for n in names:
        m = model()
        if mode == "ddp":
            w = nn.parallel.DistributedDataParallel(m)
            train(n, w, rank, world)
            flat = torch.cat([p.detach().flatten() for p in m.parameters()])
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in m:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(m)
            train(n, m, rank, world)
            flat = torch.cat([p.full_tensor().detach().flatten() for p in m.parameters()])
        res[n] = flat.tolist()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()


def eval_sets():
    g = torch.Generator().manual_seed(3)
    return {t: (torch.randn(101 + 10 * t, 8, generator=g), torch.randint(0, 4, (101 + 10 * t,), generator=g))
            for t in range(3)}


class CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = model()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.net(x)


def eval_worker(rank: int, world: int, out_path: str) -> None:
    from poise.measure import ContinualEvaluator

    m = CountingModel()
    ddp = nn.parallel.DistributedDataParallel(m)
    ev = ContinualEvaluator(eval_sets(), batch_size=16)
    accs = ev.evaluate(ddp)
    seen = torch.tensor([float(m.seen)])
    dist.all_reduce(seen)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"accs": {str(k): v for k, v in accs.items()}, "mine": m.seen, "total": seen.item()}, f)
    dist.barrier()

"""Continual training with DDP and sharded continual evaluation, launched by torchrun.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_continual.py   # 2 processes
    python examples/torchrun_continual.py                                       # 1 process

Both print the same metrics (JSON, from rank 0): each rank trains on its half of every global
batch (DDP averages the gradients) and evaluates every other sample (the correct counts are
summed across ranks). Several machines: the same command on each with ``--nnodes=N
--node_rank=i --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT`` instead of ``--standalone``.
"""

import json

import torch
from torch import nn

from poise.continual import FineTune, fit_stream
from poise.distributed import init_from_env, is_main
from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet
from poise.tasks.digits import split_digits


def main() -> None:
    rank, world = init_from_env()
    torch.set_num_threads(1)
    stream = split_digits(n_tasks=2, scenario="class")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, stream.n_classes))
    rows = {"train": 0}  # rows this rank trained on: half of them each with 2 processes
    model.register_forward_hook(lambda m, a, o: rows.__setitem__("train", rows["train"] + len(a[0]) * m.training))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    evaluator = ContinualEvaluator({t.id: EvalSet(t.x_test, t.y_test) for t in stream.tasks},
                                   schedule=EvalSchedule(dense_steps=20, every=5))
    metrics = fit_stream(net, stream.tasks, FineTune(), torch.optim.SGD(net.parameters(), lr=0.1), evaluator,
                         steps_per_task=40, batch_size=32, n_classes=stream.n_classes, seed=0)
    if is_main():
        steps, acc = evaluator.curves()
        print(json.dumps({"world": world, "acc": metrics["acc"], "min_acc": metrics["min_acc"],
                          "train_rows": rows["train"],
                          "curve": acc.tolist()}))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

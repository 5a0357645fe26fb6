"""ContinualCallback in a real Lightning Trainer on CPU: one global step across tasks, every
evaluation logged (also right after a task switch), resume from a Lightning checkpoint equal
to the uninterrupted run."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from poise.continual import EWC, Compose, Replay  # noqa: E402
from poise.integrations.lightning import ContinualCallback, to_batch  # noqa: E402
from poise.measure.evaluator import ContinualEvaluator, EvalSchedule  # noqa: E402
from poise.optim import AdamW  # noqa: E402

STEPS = 4  # per task: 2 batches per epoch, 2 epochs
BATCH = 8


def _tasks() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(2):
        x = torch.randn(2 * BATCH, 6, generator=g) + 2.0 * t
        y = torch.randint(2 * t, 2 * t + 2, (2 * BATCH,), generator=g)
        out.append((x, y))
    return out


class Tiny(pl.LightningModule):
    def __init__(self, cb: ContinualCallback):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 4)
        self.poise = [cb]  # a list: not a submodule, not a hyperparameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.poise[0].loss(self, batch, logits, F.cross_entropy(logits, y))
        self.log("train_loss", loss)  # the throttled path: not where evaluations go
        return loss

    def configure_optimizers(self):
        return AdamW(self.parameters(), lr=0.05)


def _parts(schedule: EvalSchedule) -> tuple[ContinualCallback, Tiny]:
    tasks = _tasks()
    ev = ContinualEvaluator({t: tasks[t] for t in range(2)}, schedule=schedule)
    strategy = Compose([Replay(mem_size=16, batch_size=4, seed=1), EWC(lam=10.0, fisher_samples=16)])
    cb = ContinualCallback(ev, strategy)
    return cb, Tiny(cb)


def _trainer(cb: ContinualCallback, logger, callbacks=(), checkpointing: bool = False) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, callbacks=[cb, *callbacks], logger=logger,
                      log_every_n_steps=50, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=checkpointing, num_sanity_val_steps=0)


def _loader(t: int) -> DataLoader:
    x, y = _tasks()[t]
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield


def test_one_global_step_and_no_dropped_evaluation(tmp_path: Path):
    from lightning.pytorch.loggers import CSVLogger

    cb, module = _parts(EvalSchedule(dense_steps=2, every=3))  # in-task steps 1, 2, 3 are due
    logger = CSVLogger(tmp_path, name="csv", version=0)
    tasks = _tasks()
    for t in range(2):
        cb.start_task(t, tasks[t])
        _trainer(cb, logger).fit(module, _loader(t))
    logger.save()

    steps = [r["step"] for r in cb.records if not r.get("boundary")]
    assert steps == list(range(1, 2 * STEPS + 1))  # one axis across both fits, no restart
    assert [r["task"] for r in cb.records if not r.get("boundary")] == [0] * STEPS + [1] * STEPS
    evaluated = [r["step"] for r in cb.records if "acc/0" in r and not r.get("boundary")]
    assert evaluated == [1, 2, 3, 5, 6, 7]  # due in-task steps 1, 2, 3 of each task
    assert [r["step"] for r in cb.records if "acc/1" in r and not r.get("boundary")] == [5, 6, 7]
    assert [(r["step"], sorted(k for k in r if k.startswith("acc/"))) for r in cb.records if r.get("boundary")] == [
        (4, ["acc/0"]), (8, ["acc/0", "acc/1"])]
    assert all("loss/replay/replay" in r for r in cb.records if not r.get("boundary") and r["task"] == 1)
    assert all("loss/ewc/ewc" in r for r in cb.records if not r.get("boundary") and r["task"] == 1)

    # the trainer's logger got every evaluation at the callback's step (log_every_n_steps=50 notwithstanding)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if v and k.startswith(("acc/",
                                                                                                     "boundary/acc/"))}
    want = {(r["step"], ("boundary/" if r.get("boundary") else "") + k): v
            for r in cb.records for k, v in r.items() if k.startswith("acc/")}
    assert logged.keys() == want.keys()
    assert all(math.isclose(logged[k], want[k], rel_tol=1e-6) for k in want)
    # the evaluator saw the same steps
    m = cb.metrics()
    assert m["acc"] == pytest.approx(sum(want[(8, f"boundary/acc/{t}")] for t in range(2)) / 2)


def test_resume_from_lightning_checkpoint_equals_uninterrupted(tmp_path: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    schedule = EvalSchedule(dense_steps=STEPS, every=1)
    tasks = _tasks()
    cb, module = _parts(schedule)
    for t in range(2):
        ckpt = ModelCheckpoint(dirpath=tmp_path / f"task{t}", every_n_train_steps=2, save_top_k=-1,
                               filename="{step}")
        cb.start_task(t, tasks[t])
        _trainer(cb, False, [ckpt], checkpointing=True).fit(module, _loader(t))
    full = {k: v.clone() for k, v in module.state_dict().items()}
    mid = tmp_path / "task1" / "step=2.ckpt"  # task 1, after its step 2 (end of its first epoch)
    assert mid.is_file()

    cb2, module2 = _parts(schedule)
    cb2.start_task(1, tasks[1])
    _trainer(cb2, False, checkpointing=False).fit(module2, _loader(1), ckpt_path=str(mid))

    assert cb2.step == cb.step == 2 * STEPS
    assert cb2.tasks_done == cb.tasks_done == [0, 1]
    assert cb2.records == cb.records
    for k, v in module2.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)
    assert _comparable(cb2.metrics()) == _comparable(cb.metrics())
    assert _same_tree(cb2.strategy.state_dict(), cb.strategy.state_dict())


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same_tree, a, b))
    return a == b


def _comparable(m):
    """Metrics without wall time, NaN as a string (NaN != NaN)."""
    if isinstance(m, dict):
        return {k: _comparable(v) for k, v in m.items() if k != "eval_seconds"}
    if isinstance(m, list | tuple):
        return [_comparable(v) for v in m]
    return "nan" if isinstance(m, float) and math.isnan(m) else m


def test_checkpoint_state_loads_weights_only(tmp_path: Path):
    cb, module = _parts(EvalSchedule(dense_steps=1, every=2))
    cb.start_task(0, _tasks()[0])
    trainer = _trainer(cb, False)
    trainer.fit(module, _loader(0))
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    state = torch.load(tmp_path / "end.ckpt", weights_only=True)
    saved = state["callbacks"][cb.state_key]
    assert saved["step"] == STEPS and saved["tasks_done"] == [0] and saved["task"] is None
    with pytest.raises(ValueError, match="already done"):
        cb.start_task(0, _tasks()[0])


def test_misuse_is_a_clear_error():
    cb, module = _parts(EvalSchedule())
    with pytest.raises(ValueError, match="needs the task's data"):
        cb.start_task(0)
    with pytest.raises(TypeError, match="batch_fn"):
        to_batch("not a batch")
    with pytest.raises(RuntimeError, match="start_task"):
        _trainer(cb, False).fit(module, _loader(0))


def test_forgotten_loss_terms_raise():
    class NoTerms(Tiny):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    cb, _ = _parts(EvalSchedule())
    cb.start_task(0, _tasks()[0])
    with pytest.raises(RuntimeError, match=r"cb.loss\(self, batch, logits, task_loss\)"):
        _trainer(cb, False).fit(NoTerms(cb), _loader(0))

"""Tracker sinks: what each tracker stored, read back with the tracker's own reader
(TensorBoard event files, the MLflow store, the W&B offline .wandb file, trackio's SQLite store)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from poise.integrations import trackers
from poise.integrations.trackers import (
    MLflowSink,
    Sinks,
    TensorBoardSink,
    TrackerSink,
    export_run,
    flatten,
    make_sinks,
    scalars,
)

# a two-task stream as fit_stream logs it: evaluations every step, a boundary record at each task end
RECORDS = [
    {"step": 1, "task": 0, "loss": 2.0, "acc/0": 0.25},
    {"step": 2, "task": 0, "loss": 1.0, "acc/0": 0.75},
    {"step": 2, "task": 0, "boundary": True, "acc/0": 0.8},
    {"step": 3, "task": 1, "loss": 4.0, "loss/replay": 0.5, "acc/0": 0.5, "acc/1": 0.0},
    {"step": 4, "task": 1, "loss": 0.5, "acc/0": 0.625, "acc/1": 1.0},
    {"step": 4, "task": 1, "boundary": True, "acc/0": 0.6, "acc/1": 1.0},
]
# (key, step) -> value, as every tracker must hold it
EXPECTED = {(k, s): v for s, vals in (scalars(r) for r in RECORDS) for k, v in vals.items()}


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_scalars_and_flatten_by_hand():
    assert scalars({"step": 3, "task": "a", "loss": 1, "ok": True, "t": torch.tensor(0.5)}) == (
        3, {"loss": 1.0, "ok": 1.0, "t": 0.5})
    assert scalars({"step": 4, "task": 1, "boundary": True, "acc/0": 0.6}) == (
        4, {"boundary/task": 1.0, "boundary/acc/0": 0.6})
    assert flatten({"acc": 0.5, "per_task": {"0": {"gap": 0.1, "rec": None}}, "names": ["a"]}) == {
        "acc": 0.5, "per_task/0/gap": 0.1}
    assert EXPECTED[("acc/0", 2)] == 0.75 and EXPECTED[("boundary/acc/0", 2)] == 0.8


def _tb_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


@pytest.mark.skipif(not _have("tensorboard"), reason="needs tensorboard")
def test_tensorboard_event_files_hold_every_record_at_its_step(tmp_path: Path):
    with TensorBoardSink(tmp_path / "tb", config={"lr": 0.1}) as sink:
        for r in RECORDS:
            sink(r)
        sink.summary({"acc": 0.8, "per_task": {"0": {"gap_depth": 0.25}}})
    got = _tb_scalars(tmp_path / "tb")
    assert {k: pytest.approx(v) for k, v in EXPECTED.items()} == {k: v for k, v in got.items() if
                                                                  not k[0].startswith("final/")}
    assert got[("final/acc", 4)] == pytest.approx(0.8)
    assert got[("final/per_task/0/gap_depth", 4)] == pytest.approx(0.25)


def _mlflow_history(uri: str, experiment: str, run_name: str) -> dict[tuple[str, int], float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    out = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            out[(key, m.step)] = m.value
    return out, run


@pytest.mark.skipif(not (_have("mlflow") and _have("sqlalchemy") and _have("alembic")),
                    reason="needs mlflow-skinny, sqlalchemy, alembic")
def test_mlflow_store_holds_every_record_at_its_step(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sinks = make_sinks("mlflow", tmp_path / "run", "replay-s0", project="demo", config={"lr": 0.1, "opt": {"b": 2}})
    for r in RECORDS:
        sinks(r)
    sinks.summary({"acc": 0.8})
    sinks.close()
    uri = f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    got, run = _mlflow_history(uri, "demo", "replay-s0")
    assert {k: v for k, v in got.items() if not k[0].startswith("final/")} == pytest.approx(EXPECTED)
    assert got[("final/acc", 4)] == pytest.approx(0.8)
    assert run.data.params == {"lr": "0.1", "opt.b": "2"}
    assert run.info.status == "FINISHED"


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', 0xBEE1, version), then
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type FULL=1, FIRST=2,
    MIDDLE=3, LAST=4), as LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        if pos + length > len(data):  # still being written
            break
        chunk, pos = data[pos:pos + length], pos + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


@pytest.mark.skipif(not _have("wandb"), reason="needs wandb")
def test_wandb_offline_run_holds_every_record_at_its_step(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = make_sinks(["wandb"], tmp_path, "replay-s0", project="demo", config={"lr": 0.1})
    for r in RECORDS:
        sinks(r)
    sinks.summary({"acc": 0.8})
    sinks.close()
    assert [s.failed for s in sinks] == [None]
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # W&B's writer process may still be flushing after finish() returned: wait for the exit record
    deadline = time.monotonic() + 120
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path)):
        assert time.monotonic() < deadline, f"{path} never got its exit record"
        time.sleep(0.2)
    got, summary = {}, {}
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            got.update({(k, row["_step"]): v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    assert got == pytest.approx(EXPECTED)
    assert summary["final/acc"] == pytest.approx(0.8)


TRACKIO_SCRIPT = textwrap.dedent("""
    import json, sys
    from poise.integrations.trackers import make_sinks
    records = json.loads(sys.argv[1])
    sinks = make_sinks(["trackio"], sys.argv[2], "replay-s0", project="demo")
    for r in records:
        sinks(r)
    sinks.close()
""")
TRACKIO_READ = textwrap.dedent("""
    import json
    from trackio.sqlite_storage import SQLiteStorage
    print(json.dumps({"runs": SQLiteStorage.get_runs("demo"), "logs": SQLiteStorage.get_logs("demo", "replay-s0")}))
""")


@pytest.mark.skipif(not _have("trackio"), reason="needs trackio")
def test_trackio_local_store_holds_every_record_at_its_step(tmp_path: Path):
    # trackio fixes its store (TRACKIO_DIR) at import: write and read in fresh processes
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    kw = dict(env=env, capture_output=True, text=True, timeout=300, check=True)
    subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, json.dumps(RECORDS), str(tmp_path / "run")], **kw)
    out = subprocess.run([sys.executable, "-c", TRACKIO_READ], **kw).stdout
    stored = json.loads(out.strip().splitlines()[-1])
    assert stored["runs"] == ["replay-s0"]
    got = {(k, row["step"]): v for row in stored["logs"] for k, v in row.items() if k not in ("step", "timestamp")}
    assert got == pytest.approx(EXPECTED)


class _Collect(TrackerSink):
    tracker = "collect"

    def __init__(self, fail_at: int | None = None, on_error: str = "warn"):
        super().__init__(on_error)
        self.rows: list[tuple[int, dict]] = []
        self.fail_at = fail_at

    def _write(self, step, values):
        if step == self.fail_at:
            raise OSError("disk full")
        self.rows.append((step, values))


def test_a_failing_sink_warns_once_and_the_others_go_on():
    bad, good = _Collect(fail_at=2), _Collect()
    sinks = Sinks([bad, good])
    with pytest.warns(RuntimeWarning, match=r"collect sink failed to write \(OSError: disk full\)") as w:
        for r in RECORDS:
            sinks(r)
        sinks.summary({"acc": 1.0})
        sinks.close()
    assert len([x for x in w if issubclass(x.category, RuntimeWarning)]) == 1
    assert [s for s, _ in bad.rows] == [1]  # nothing after the failure
    assert [s for s, _ in good.rows] == [1, 2, 2, 3, 4, 4, 4]  # every record, then the summary
    with pytest.raises(OSError, match="disk full"):
        _Collect(fail_at=1, on_error="raise")(RECORDS[0])


@pytest.mark.skipif(not _have("tensorboard"), reason="needs tensorboard")
def test_unwritable_tracker_directory_warns_and_training_goes_on(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    good = _Collect()
    sinks = Sinks([TensorBoardSink(blocker / "tb"), good])  # no directory can be made under a file
    with pytest.warns(RuntimeWarning, match="tensorboard sink failed to write"):
        for r in RECORDS:
            sinks(r)
    sinks.close()
    assert len(good.rows) == len(RECORDS)


@pytest.mark.skipif(not _have("tensorboard"), reason="needs tensorboard")
def test_package_missing_at_write_time_warns_once(tmp_path: Path, monkeypatch):
    sink = TensorBoardSink(tmp_path / "tb")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails when the writer opens
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for r in RECORDS:
            sink(r)
        sink.close()
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and ("ImportError" in msgs[0] or "ModuleNotFoundError" in msgs[0])


def test_missing_extra_and_unknown_tracker_are_clear_errors(tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'neptune'; valid choices: tensorboard, wandb, mlflow, "
                                         "trackio"):
        make_sinks(["tensorboard", "neptune"], tmp_path, "r")
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda m, *a: None if m == "wandb" else real(m, *a))
    with pytest.raises(ImportError, match=r"pip install 'poise\[wandb\]'"):
        make_sinks(["wandb"], tmp_path, "r")
    with pytest.raises(ValueError, match="on_error='loud'; valid choices: warn, raise"):
        _Collect(on_error="loud")


def _run_dir(root: Path) -> Path:
    run = root / "study"
    (run / "metrics").mkdir(parents=True)
    (run / "results").mkdir()
    (run / "config.json").write_text(json.dumps({"name": "study", "train": {"lr": 0.1}}))
    for tag, shift in (("replay-s0", 0.0), ("ewc-s0", 0.125)):
        lines = [json.dumps({**r, **{k: v + shift for k, v in r.items() if k.startswith("acc/")}}) for r in RECORDS]
        (run / "metrics" / f"{tag}.jsonl").write_text("\n".join(lines) + "\n{\"step\": 5, \"lo")  # a torn last line
        (run / "results" / f"{tag}.json").write_text(json.dumps({"variant": tag, "metrics": {"acc": 0.8 + shift}}))
    return run


@pytest.mark.skipif(not _have("tensorboard"), reason="needs tensorboard")
def test_export_run_replays_a_run_directory_into_tensorboard(tmp_path: Path):
    run = _run_dir(tmp_path)
    with pytest.warns(RuntimeWarning, match="not JSON, skipped"):
        written = export_run(run, to="tensorboard")
    assert written == {"ewc-s0": len(RECORDS), "replay-s0": len(RECORDS)}
    got = _tb_scalars(run / "tensorboard" / "ewc-s0")
    shifted = {k: v + (0.125 if "acc/" in k[0] else 0.0) for k, v in EXPECTED.items()}
    assert {k: v for k, v in got.items() if not k[0].startswith("final/")} == pytest.approx(shifted)
    assert got[("final/acc", 4)] == pytest.approx(0.925)
    with pytest.raises(ValueError, match="no run 'sgd-s0' in .*; valid choices: ewc-s0, replay-s0"):
        export_run(run, to="tensorboard", runs=["sgd-s0"])
    with pytest.raises(ValueError, match="not a poise run directory"):
        export_run(tmp_path, to="tensorboard")


@pytest.mark.skipif(not (_have("mlflow") and _have("sqlalchemy") and _have("alembic")),
                    reason="needs mlflow-skinny, sqlalchemy, alembic")
def test_export_run_into_mlflow_one_run_per_training_run(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = _run_dir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        export_run(run, to=["mlflow"], runs=["replay-s0"])
    got, mrun = _mlflow_history(f"sqlite:///{(run / 'mlflow.db').resolve()}", "study", "replay-s0")
    assert {k: v for k, v in got.items() if not k[0].startswith("final/")} == pytest.approx(EXPECTED)
    assert mrun.data.params["train.lr"] == "0.1"


@pytest.mark.skipif(not _have("tensorboard"), reason="needs tensorboard")
def test_sinks_as_fit_stream_log(tmp_path: Path):
    """Several sinks at once as fit_stream's log=: the tracker holds fit_stream's records at their steps."""
    from types import SimpleNamespace

    from poise.continual import FineTune, fit_stream
    from poise.measure.evaluator import ContinualEvaluator, EvalSchedule

    g = torch.Generator().manual_seed(0)
    tasks = [SimpleNamespace(id=t, x_train=torch.randn(32, 4, generator=g), y_train=torch.randint(0, 2, (32,),
                             generator=g)) for t in range(2)]
    model = torch.nn.Linear(4, 2)
    ev = ContinualEvaluator({t.id: (t.x_train, t.y_train) for t in tasks}, schedule=EvalSchedule(dense_steps=2,
                                                                                                  every=2))
    mine: list[dict] = []
    sinks = Sinks([*make_sinks(["tensorboard"], tmp_path, "ft-s0"), mine.append])
    fit_stream(model, tasks, FineTune(), torch.optim.SGD(model.parameters(), lr=0.1), ev, steps_per_task=3,
               batch_size=8, n_classes=2, log=sinks)
    sinks.close()
    got = _tb_scalars(tmp_path / "tensorboard" / "ft-s0")
    want = {(k, r["step"]): v for r in mine for k, v in scalars(r)[1].items()}
    assert got == pytest.approx(want)
    assert sorted(s for k, s in got if k == "acc/0") == [1, 2, 4, 5]  # dense after each switch: no drop
    assert sorted(s for k, s in got if k == "boundary/acc/1") == [6]


def test_mlflow_sink_needs_sqlalchemy_for_sqlite(monkeypatch):
    if not _have("mlflow"):
        pytest.skip("needs mlflow")
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda m, *a: None if m == "alembic" else real(m, *a))
    with pytest.raises(ImportError, match="needs the 'alembic' package"):
        MLflowSink("e", tracking_uri="sqlite:///x.db")

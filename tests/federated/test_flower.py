"""The Flower strategy, driven message by message (no simulation): deltas against the sent arrays,
FedAvg parity at beta = 0 against Flower's own FedAvg, stale memory, drop-outs as absent."""

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from poise.federated.flower import FedStale  # noqa: E402


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


NODES = [101, 102, 103]
CID = {101: 0, 102: 1, 103: 2}


def reply(msg: Message, value: np.ndarray | None, n: int = 10) -> Message:
    node = msg.metadata.dst_node_id
    if value is None:
        return Message(error=Error(code=1, reason="client unavailable"), reply_to=msg)
    metrics = MetricRecord({"num-examples": n, "partition-id": CID[node], "loss": float(CID[node])})
    return Message(content=RecordDict({"arrays": ArrayRecord([value]), "metrics": metrics}), reply_to=msg)


def round_(strategy, arrays, values, ns=None):
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    ns = ns or {n: 10 for n in NODES}
    replies = [reply(m, values[m.metadata.dst_node_id], ns[m.metadata.dst_node_id]) for m in msgs]
    return strategy.aggregate_train(1, replies), replies


def test_beta0_equals_flowers_fedavg():
    x = ArrayRecord([np.array([1.0, 1.0], dtype=np.float32)])
    values = {101: np.array([3.0, 1.0], np.float32), 102: np.array([1.0, 5.0], np.float32), 103: None}
    ns = {101: 10, 102: 30, 103: 10}
    (agg, metrics), replies = round_(FedStale(beta=0.0, min_available_nodes=3), x, values, ns)
    ref, _ = FedAvg().aggregate_train(1, replies)  # Flower's own weighted average over the replies
    np.testing.assert_allclose(agg.to_numpy_ndarrays()[0], ref.to_numpy_ndarrays()[0], rtol=1e-6)
    np.testing.assert_allclose(agg.to_numpy_ndarrays()[0], [1.5, 4.0], rtol=1e-6)  # 1 + (.25*[2,0] + .75*[0,4])
    assert metrics["fedstale_fresh"] == 2 and metrics["fedstale_dropped"] == 1
    assert metrics["loss"] == pytest.approx(0.75)  # client metrics still aggregated: .25*0 + .75*1


def test_stale_memory_and_dropout_across_rounds():
    s = FedStale(beta=1.0, client_weights={0: 1.0, 1: 1.0, 2: 2.0}, min_available_nodes=3)
    x0 = ArrayRecord([np.zeros(2, np.float32)])
    # round 1: everybody replies -> Delta = .25*[4,0] + .25*[0,8] + .5*[2,2] = [2,3]; memory = the deltas
    (x1, _), _ = round_(s, x0, {101: np.array([4.0, 0.0], np.float32), 102: np.array([0.0, 8.0], np.float32),
                               103: np.array([2.0, 2.0], np.float32)})
    np.testing.assert_allclose(x1.to_numpy_ndarrays()[0], [2.0, 3.0])
    assert sorted(s.memory) == [0, 1, 2] and torch.equal(s.memory[2]["0"], torch.tensor([2.0, 2.0]))
    # round 2: client 2 drops out (error reply); client 0 sends Delta_0 = [0,0], client 1 Delta_1 = [2,2].
    # FedVARP: sum_N alpha h = .25*[4,0] + .25*[0,8] + .5*[2,2] = [2,3];
    # sum_S w (Delta - h) with w = .5 each: .5*([0,0]-[4,0]) + .5*([2,2]-[0,8]) = [-1,-3]  ->  Delta = [1, 0]
    x1v = x1.to_numpy_ndarrays()[0]
    (x2, m2), _ = round_(s, x1, {101: x1v + np.array([0.0, 0.0], np.float32), 102: x1v + np.array([2.0, 2.0],
                                                                                                     np.float32),
                                103: None})
    np.testing.assert_allclose(x2.to_numpy_ndarrays()[0], x1v + np.array([1.0, 0.0]), rtol=1e-6)
    assert torch.equal(s.memory[2]["0"], torch.tensor([2.0, 2.0]))  # the drop-out's memory is unchanged
    assert torch.allclose(s.memory[1]["0"], torch.tensor([2.0, 2.0]))
    assert m2["fedstale_stale"] == 1 and m2["fedstale_dropped"] == 1


def test_bad_beta_and_order():
    for beta in (-0.5, 2.0, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            FedStale(beta=beta)
    with pytest.raises(RuntimeError, match="configure_train"):
        FedStale(beta=0.5).aggregate_train(1, [])

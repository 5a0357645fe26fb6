"""FSCIL tricks (arXiv 2403.14392): the pure parts by hand, each switch's mechanism, checkpointing,
and the incremental-frozen baseline beating fine-tuning on the few-shot digits stream."""

import io
import math

import pytest
import torch
from torch import nn

from poise.continual import FineTune, fit_stream
from poise.continual._base import Batch
from poise.continual.fscil import (
    FSCILTricks,
    PrototypeClassifier,
    accuracy_matrix,
    calibrate_prototypes,
    class_prototypes,
    embed,
    performance_drop,
    session_accuracy,
    simplex_etf,
    supcon_loss,
)
from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet


def test_supcon_by_hand():
    # z1 = z2 = e1 (class 0), z3 = e2 (class 1), tau = 1. Anchor 1: positive 2, denominator over a != 1:
    # e^1 + e^0, loss = -log(e / (e + 1)) = log(1 + e^-1); anchor 2 the same; anchor 3 has no positive.
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    loss = supcon_loss(emb, torch.tensor([0, 0, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert supcon_loss(emb, torch.tensor([0, 1, 2])).item() == 0.0  # no positives at all


def test_simplex_etf_is_equiangular():
    m = simplex_etf(12, 4, seed=3)
    gram = m.T @ m
    torch.testing.assert_close(gram.diagonal(), torch.ones(4))  # unit columns
    off = gram[~torch.eye(4, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 3))  # cos = -1/(K-1)
    with pytest.raises(ValueError, match="dim >= n_classes"):
        simplex_etf(3, 4)


def test_prototypes_calibration_and_session_accuracy_by_hand():
    emb = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    p, here = class_prototypes(emb, torch.tensor([0, 0, 2]), 4)
    assert p.tolist() == [[2.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
    assert here.tolist() == [True, False, True, False]
    new, base = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    assert torch.equal(calibrate_prototypes(new, base, 1.0, 16.0), new)
    # one base prototype: softmax weight 1, so alpha = 0.25 gives 0.25 * (1, 1) + 0.75 * (2, 0) = (1.75, 0.25)
    assert calibrate_prototypes(new, base, 0.25, 16.0).tolist() == [[1.75, 0.25]]
    # session 1 pools 10 samples at 0.5 and 30 at 1.0: (5 + 30) / 40 = 0.875
    acc = session_accuracy([[1.0, float("nan")], [0.5, 1.0]], [10, 30])
    assert acc == [1.0, 0.875] and performance_drop(acc) == 0.125
    with pytest.raises(ValueError, match="positive counts"):
        session_accuracy([[1.0]], [0])
    r = accuracy_matrix([1, 2, 3, 4], [[0.9, None], [0.8, None], [0.7, 0.1], [0.6, 0.5]], [2, 4])
    assert r[0][0] == 0.8 and math.isnan(r[0][1]) and r[1] == [0.6, 0.5]


def test_prototype_classifier_predicts_the_nearest_prototype_and_never_an_unseen_class():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    clf = PrototypeClassifier(model, protos, torch.tensor([True, True, False]), scale=1.0)
    out = clf(torch.tensor([[5.0, 0.1], [0.2, 3.0], [1.0, 1.0]]))
    assert out.argmax(-1).tolist() == [0, 1, 0]  # class 2 would fit the last row best, but it is unseen
    assert torch.isinf(out[:, 2]).all()
    emb, logits = embed(model, torch.tensor([[2.0, 3.0]]))
    assert emb.tolist() == [[2.0, 3.0]] and logits.shape == (1, 3)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _session(strategy, model, opt, x, y, steps=5):
    """A minimal loop with the hooks in fit_stream's order."""
    data = Batch(x, y)
    strategy.before_task(model, data)
    for _ in range(steps):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y) + sum(strategy.loss_terms(model, data, logits).values(),
                                                            torch.zeros(()))
        opt.zero_grad()
        loss.backward()
        strategy.transform_grads(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()} if strategy.needs_update_snapshot \
            else {}
        opt.step()
        if before:
            strategy.transform_update(model, before)
        strategy.after_step(model, data)
    strategy.after_task(model, data)


def _data(seed, classes):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(4)
    return torch.randn(len(y), 4, generator=g) + y.unsqueeze(1).float(), y


@pytest.mark.parametrize("adapt", ["none", "last_block"])
def test_frozen_backbone_stays_put_in_incremental_sessions_even_under_adamw(adapt):
    model = _mlp()
    s = FSCILTricks(adapt=adapt)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)  # momentum and decay would move it
    _session(s, model, opt, *_data(0, [0, 1]))
    first = model[0].weight.detach().clone()
    block, head = model[2].weight.detach().clone(), model[4].weight.detach().clone()
    _session(s, model, opt, *_data(1, [2]))
    assert torch.equal(model[0].weight, first)  # the backbone below the last block never moves
    assert not torch.equal(model[4].weight, head)  # the head trains
    assert torch.equal(model[2].weight, block) == (adapt == "none")  # the last block trains only when adapting
    assert s.present.tolist() == [True, True, True, False] and s.session == 1


def test_slow_backbone_scales_gradients_and_train_leaves_them():
    x, y = _data(0, [0, 1])
    grads = {}
    for backbone in ("train", "slow"):
        model = _mlp()
        s = FSCILTricks(backbone=backbone, backbone_scale=0.25)
        s.session = 1  # an incremental session
        nn.functional.cross_entropy(model(x), y).backward()
        s.transform_grads(model)
        grads[backbone] = (model[0].weight.grad.clone(), model[4].weight.grad.clone())
    torch.testing.assert_close(grads["slow"][0], 0.25 * grads["train"][0])
    torch.testing.assert_close(grads["slow"][1], grads["train"][1])  # the head is not slowed


def test_last_block_trains_on_the_prototype_loss_only():
    """The head_only term cancels the loop's task-loss gradient into the embedding: the last block's
    gradient is the prototype loss's alone (no dropout, so both forwards agree)."""
    x, y = _data(0, [2])
    model = _mlp()
    s = FSCILTricks(adapt="last_block")
    s.session, s.protos = 1, torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    s.present = torch.tensor([True, True, True, False])
    logits = model(x)
    terms = s.loss_terms(model, Batch(x, y), logits)
    assert set(terms) == {"proto", "head_only"} and abs(terms["head_only"].item()) < 1e-6
    (nn.functional.cross_entropy(logits, y) + terms["proto"] + terms["head_only"]).backward()
    got = model[2].weight.grad.clone()
    model.zero_grad()
    s.loss_terms(model, Batch(x, y), model(x))["proto"].backward()
    torch.testing.assert_close(got, model[2].weight.grad)


def test_training_tricks_terms():
    x, y = _data(0, [0, 1])
    model = _mlp()
    logits = model(x)
    s = FSCILTricks(label_smoothing=0.2, augment=1.0)
    s.session = 0
    terms = s.loss_terms(model, Batch(x, y), logits)
    uniform = -torch.log_softmax(logits, -1).mean()  # mean over classes and rows of -log p
    torch.testing.assert_close(terms["smooth"], 0.2 * uniform)
    assert terms["augment"].item() > 0
    assert set(FSCILTricks(supcon=1.0, etf=1.0).loss_terms(model, Batch(x, y), logits)) == set()  # session -1
    s2 = FSCILTricks(supcon=1.0, etf=1.0)
    s2.session = 0
    assert set(s2.loss_terms(model, Batch(x, y), logits)) == {"supcon", "etf"}


@pytest.mark.parametrize("kwargs, msg", [
    ({"classifier": "knn"}, "valid choices: linear, prototype"),
    ({"backbone": "thawed"}, "valid choices: train, slow, frozen"),
    ({"adapt": "all"}, "valid choices: none, last_block, calibrate"),
    ({"supcon": -1.0}, "supcon=-1.0"),
    ({"backbone_scale": 2.0}, r"valid range: \[0, 1\]"),
    ({"adapt": "last_block", "backbone": "slow"}, "needs backbone='frozen'"),
    ({"adapt": "calibrate", "classifier": "linear"}, "needs classifier='prototype'"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        FSCILTricks(**kwargs)


class _Task:
    def __init__(self, i, classes, n):
        self.id, self.classes, self.restrict = i, classes, False
        self.x_train, self.y_train = _data(10 + i, classes)
        self.x_train, self.y_train = self.x_train[:n], self.y_train[:n]
        self.x_test, self.y_test = _data(20 + i, classes)


def _fit(kwargs, resume=None, keep=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 4))
    s = FSCILTricks(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    tasks = [_Task(0, [0, 1], 8), _Task(1, [2], 3), _Task(2, [3], 3)]
    ev = ContinualEvaluator({t.id: EvalSet(t.x_test, t.y_test) for t in tasks}, schedule=EvalSchedule(0, 2))
    saved = []
    out = fit_stream(model, tasks, s, opt, ev, steps_per_task=4, batch_size=4, n_classes=4, seed=seed,
                     checkpoint_every=0 if keep is None else 1,
                     on_checkpoint=None if keep is None else saved.append, resume=resume)
    if keep is not None:
        buf = io.BytesIO()
        torch.save(saved[keep - 1], buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)
    return model, s, out


@pytest.mark.parametrize("at", [2, 4, 6, 9])
def test_resume_mid_stream_equals_the_uninterrupted_run(at):
    kwargs = {"supcon": 0.5, "etf": 0.5, "augment": 1.0, "adapt": "calibrate"}
    model, s, out = _fit(kwargs)
    state = _fit(kwargs, keep=at)
    model2, s2, out2 = _fit(kwargs, resume=state)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(s.protos, s2.protos) and s.session == s2.session == 2
    assert out["acc"] == out2["acc"]
    with pytest.raises(ValueError, match="expected"):
        FSCILTricks().load_state_dict({"session": 0})


def test_incremental_frozen_beats_finetuning_on_few_shot_digits():
    from poise.models import build_model
    from poise.tasks.fscil import fscil_digits

    torch.set_num_threads(1)
    stream = fscil_digits()
    accs = {}
    for name, strategy in [("finetune", FineTune()), ("proto", FSCILTricks())]:
        torch.manual_seed(0)
        model = build_model("mlp", 64, 10, 64, 2)
        ev = ContinualEvaluator({t.id: EvalSet(t.x_test, t.y_test) for t in stream.tasks},
                                schedule=EvalSchedule(0, 1000))
        out = fit_stream(model, stream.tasks, strategy, torch.optim.SGD(model.parameters(), lr=0.05), ev,
                         steps_per_task=60, batch_size=32, n_classes=10)
        accs[name] = out["acc"]
    # fine-tuning on a 1-way session predicts only that class: 1 of 5 tasks right at the end
    assert accs["finetune"] < 0.3 and accs["proto"] > 0.5

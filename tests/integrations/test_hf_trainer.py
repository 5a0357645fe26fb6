"""poise.integrations.hf: continual evaluation, optimizer diagnostics and strategy hooks inside a
real ``transformers.Trainer`` on a tiny Llama built from a config (CPU, nothing downloaded)."""

import importlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from poise.continual import Batch, Replay, Strategy  # noqa: E402
from poise.integrations.hf import (  # noqa: E402
    ContinualEvalCallback,
    OptimizerDiagnosticsCallback,
    PoiseTrainer,
    causal_lm_loss,
    hf_batch,
    low_rank_groups,
)
from poise.measure import ContinualEvaluator, EvalSchedule, LMEvalSet  # noqa: E402
from poise.models import build_causal_lm  # noqa: E402
from poise.optim import AdamW, GaLoreAdamW, StableSPAM  # noqa: E402

V = 16


def _model(seed=0):
    torch.manual_seed(seed)
    return build_causal_lm("llama", vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16)


def _rows(task, n, seed=0):
    """``[task, a, b] -> [a+1, b+1, task]``: fixed length 6, the loss on the last 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(3, V - 1, (2,), generator=g).tolist()
        ids = torch.tensor([task, a, b, a + 1, b + 1, task])
        rows.append({"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long),
                     "labels": torch.tensor([-100, -100, -100, a + 1, b + 1, task])})
    return rows


def _evalset(task, n=6, seed=99):
    rows = _rows(task, n, seed)
    return LMEvalSet(torch.stack([r["input_ids"] for r in rows]), labels=torch.stack([r["labels"] for r in rows]))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                disable_tqdm=True, max_grad_norm=0.0, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Stands in for a tracker integration: what ``on_log`` receives, at which global step."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def with_key(self, key):
        return [(s, lg) for s, lg in self.logs if key in lg]


def test_continual_eval_callback_one_global_step_dense_after_each_switch_logged_through_the_trainer(tmp_path):
    ev = ContinualEvaluator({1: _evalset(1), 2: _evalset(2)}, schedule=EvalSchedule(dense_steps=2, every=3))
    rec = Recorder()
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_rows(1, 32), callbacks=[rec])
    trainer.add_callback(ContinualEvalCallback(ev, trainer))
    trainer.train()
    assert trainer.state.global_step == 5  # the Trainer's own step is left alone
    trainer.train_dataset = _rows(2, 32, seed=1)
    trainer.train()  # the Trainer restarts at step 0; the evaluator does not
    assert trainer.state.global_step == 5
    # per task: steps 1, 2 (dense), 3 (every 3), then the boundary at 5; task 2 continues at 6
    want = [1, 2, 3, 5, 6, 7, 8, 10]
    assert [r.step for r in ev.records] == want
    logged = rec.with_key("cl/step")
    assert [s for s, _ in logged] == want  # every tracker sees the evaluator's own step
    assert [lg["cl/step"] for _, lg in logged] == want
    assert [lg["cl/boundary"] for _, lg in logged] == [0, 0, 0, 1, 0, 0, 0, 1]
    steps, loss = ev.curves("loss")
    for i, (_, lg) in enumerate(logged):
        assert lg["cl/loss/1"] == loss[i, 0]
        assert ("cl/loss/2" in lg) == (steps[i] > 5)  # a task is evaluated once it has begun
        assert lg["cl/token_acc/1"] == ev.curves("token_acc")[1][i, 0]
    summary = rec.with_key("cl/summary/loss/forgetting")
    assert [s for s, _ in summary] == [5, 10]
    assert summary[-1][1]["cl/summary/loss/forgetting"] == pytest.approx(ev.metrics("loss")["forgetting"])
    assert [s for s, lg in rec.logs if "loss" in lg] == [1, 2, 3, 4, 5] * 2  # the Trainer's own logs


def test_callbacks_without_a_trainer_say_how_to_bind_one(tmp_path):
    ev = ContinualEvaluator({1: _evalset(1)})
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_rows(1, 8),
                      callbacks=[ContinualEvalCallback(ev)])
    with pytest.raises(RuntimeError, match=r"trainer=trainer"):
        trainer.train()
    with pytest.raises(ValueError, match="without an evaluation set"):
        ContinualEvalCallback(ev, task_order=[1, 7])


class Spy(Strategy):
    name = "spy"
    needs_update_snapshot = True

    def __init__(self, ev):
        self.ev, self.events = ev, []

    def before_task(self, model, data):
        self.events.append(("before_task", tuple(data.x.shape)))

    def loss_terms(self, model, batch, logits):
        self.events.append(("loss_terms", tuple(batch.x.shape), tuple(logits.shape)))
        return {}

    def transform_grads(self, model):
        self.events.append(("transform_grads", all(p.grad is not None for p in model.parameters())))
        return {"seen": torch.tensor(1.0)}

    def transform_update(self, model, before):
        moved = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        self.events.append(("transform_update", moved))

    def after_step(self, model, batch):
        self.events.append(("after_step", tuple(batch.x.shape), int((batch.y != -100).sum())))
        return {}

    def after_task(self, model, data):
        self.events.append(("after_task", tuple(data.x.shape), len(self.ev.boundaries)))


def test_strategy_hooks_run_in_fit_stream_order_with_the_accumulated_batch(tmp_path):
    ev = ContinualEvaluator({1: _evalset(1)})
    spy = Spy(ev)
    trainer = PoiseTrainer(model=_model(), args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                           train_dataset=_rows(1, 16), strategy=spy, evaluator=ev)
    trainer.train_task(1)
    step = [("loss_terms", (4, 6), (4, 6, V))] * 2 + [("transform_grads", True), ("transform_update", True),
                                                     ("after_step", (8, 6), 8 * 3)]
    assert spy.events == [("before_task", (16, 6)), *step, *step, ("after_task", (16, 6), 0)]
    assert ev.boundaries == {1: 2}  # the boundary evaluation after after_task


class Again(Strategy):
    """A loss term equal to the task loss: the gradient must exactly double."""

    name = "again"

    def loss_terms(self, model, batch, logits):
        return {"task": causal_lm_loss(model, batch)}


@pytest.mark.parametrize("accum", [1, 2])
def test_loss_terms_enter_the_gradient_scaled_as_the_trainers_own_loss(tmp_path, accum):
    sgd = (torch.optim.SGD, {"lr": 0.1})
    deltas = []
    for strategy in (None, Again()):
        model = _model()
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        rec = Recorder()
        trainer = PoiseTrainer(model=model, args=_args(tmp_path, max_steps=1, gradient_accumulation_steps=accum),
                               train_dataset=_rows(1, 16), strategy=strategy, optimizer_cls_and_kwargs=sgd,
                               callbacks=[rec])
        trainer.train()
        deltas.append({n: p.detach() - w0[n] for n, p in model.named_parameters()})
    for n in deltas[0]:
        torch.testing.assert_close(deltas[1][n], 2 * deltas[0][n], rtol=1e-4, atol=1e-6)
    assert "strategy/loss/task" in rec.with_key("loss")[0][1]


def test_replay_through_trainer_across_tasks(tmp_path):
    ev = ContinualEvaluator({1: _evalset(1), 2: _evalset(2)}, schedule=EvalSchedule(dense_steps=1, every=2))
    replay = Replay(mem_size=12, batch_size=4, loss_fn=causal_lm_loss)
    rec = Recorder()
    trainer = PoiseTrainer(model=_model(), args=_args(tmp_path, max_steps=3), strategy=replay, evaluator=ev,
                           callbacks=[rec])
    trainer.train_task(1, _rows(1, 16))
    assert len(replay.buffer) == 12 and replay.buffer.seen == 12
    trainer.train_task(2, _rows(2, 16, seed=3))
    assert replay.buffer.seen == 24
    assert ev.seen == [1, 2] and ev.boundaries == {1: 3, 2: 6}
    train_logs = [lg for _, lg in rec.with_key("loss")]
    assert "strategy/loss/replay" in train_logs[-1] and train_logs[-1]["strategy/step/mem_size"] == 12
    res = ev.metrics("loss")
    assert res["metric"] == "loss" and res["higher_is_better"] is False and "gap_depth" in res


def test_optimizer_diagnostics_by_hand_update_ratio_and_spike_totals(tmp_path):
    model = _model()
    w0 = [p.detach().clone() for p in model.parameters()]
    rec = Recorder()
    trainer = PoiseTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_rows(1, 8),
                           diagnostics=True, optimizer_cls_and_kwargs=(AdamW, {"lr": 1e-2, "diagnostics": True}),
                           callbacks=[rec])
    trainer.train()
    (s, lg), = rec.with_key("opt/update_ratio")
    d = torch.stack([(p.detach() - w).norm() for p, w in zip(model.parameters(), w0, strict=True)]).norm()
    assert s == 1 and lg["opt/update_ratio"] == pytest.approx(float(d / torch.stack([w.norm() for w in w0]).norm()),
                                                                rel=1e-5)
    rec = Recorder()
    trainer = PoiseTrainer(model=_model(), args=_args(tmp_path, max_steps=4), train_dataset=_rows(1, 16),
                           diagnostics=True, callbacks=[rec],
                           optimizer_cls_and_kwargs=(StableSPAM, {"lr": 1e-2, "diagnostics": True}))
    trainer.train()
    logged = [lg for _, lg in rec.with_key("opt/spike_tensors")]
    assert [s for s, _ in rec.with_key("opt/spike_tensors")] == [1, 2, 3, 4]
    assert logged[-1]["opt/spikes_total"] == sum(lg["opt/spike_tensors"] for lg in logged)
    assert 0 <= logged[-1]["opt/clipped_frac"] <= 1 and "opt/resets_total" in logged[-1]


def test_optimizer_diagnostics_refuses_other_optimizers(tmp_path):
    for kw, err, match in (((torch.optim.AdamW, {"lr": 1e-3}), TypeError, "poise optimizer"),
                           ((AdamW, {"lr": 1e-3}), ValueError, "diagnostics")):
        trainer = PoiseTrainer(model=_model(), args=_args(tmp_path, max_steps=1), train_dataset=_rows(1, 8),
                               diagnostics=True, optimizer_cls_and_kwargs=kw)
        with pytest.raises(err, match=match):
            trainer.train()
    assert OptimizerDiagnosticsCallback().trainer is None


def test_galore_groups_through_optimizer_cls_and_kwargs(tmp_path):
    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_rows(1, 8),
                      optimizer_cls_and_kwargs=(GaLoreAdamW, {"params": low_rank_groups(model, rank=4), "lr": 1e-2}))
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, GaLoreAdamW) and opt.param_groups[0]["rank"] == 4
    assert "model.embed_tokens.weight" in opt.param_groups[1]["param_names"]  # embeddings stay unprojected


def test_causal_lm_loss_is_the_models_own_loss_and_hf_batch_builds_targets():
    model = _model()
    rows = _rows(1, 4)
    x = torch.stack([r["input_ids"] for r in rows])
    y = torch.stack([r["labels"] for r in rows])
    want = model(input_ids=x, labels=y).loss
    torch.testing.assert_close(causal_lm_loss(model, Batch(x, y)), want)
    am = torch.ones_like(x)
    am[:, -1] = 0
    b = hf_batch({"input_ids": x, "attention_mask": am})
    assert torch.equal(b.y[:, :-1], x[:, :-1]) and (b.y[:, -1] == -100).all()
    with pytest.raises(ValueError, match="no 'input_ids'"):
        hf_batch({"x": x})
    with pytest.raises(TypeError, match="poise.continual.Strategy"):
        PoiseTrainer(model=model, strategy="replay")


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "poise.integrations.hf", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'poise\[hf\]'"):
        importlib.import_module("poise.integrations.hf")


def test_the_example_runs():
    import pathlib
    import runpy

    path = pathlib.Path(__file__).parents[2] / "examples" / "hf_continual.py"
    main = runpy.run_path(str(path))["main"]
    out = main(steps_per_task=3)
    assert out["loss"]["metric"] == "loss" and out["loss"]["n_evals"] == 9  # dense: every step, three tasks
    assert 0 <= out["token_acc"]["acc"] <= 1


class Perturb(Strategy):
    """Changes the weights at the end of a task (a stand-in for a merge or a recalibration)."""

    name = "perturb"

    @torch.no_grad()
    def after_task(self, model, data):
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))


def test_boundary_evaluation_is_taken_after_a_strategy_changed_the_model(tmp_path):
    # every step is evaluated, so the last step's evaluation exists; it must not stand for the boundary
    ev = ContinualEvaluator({1: _evalset(1)}, schedule=EvalSchedule(0, 1))
    trainer = PoiseTrainer(model=_model(), args=_args(tmp_path, max_steps=2), train_dataset=_rows(1, 16),
                           strategy=Perturb(), evaluator=ev)
    trainer.train_task(1)
    last_step, boundary = ev.records[-2], ev.records[-1]
    assert last_step.step == boundary.step == 2
    assert boundary.extra["loss"][1] != last_step.extra["loss"][1]
    assert ev.evaluate(trainer.model)[1] == boundary.acc[1]  # the boundary is the perturbed model's score

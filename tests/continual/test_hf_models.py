"""Real models stay first-class: every strategy and the evaluator run on a Hugging Face
PreTrainedModel (a 1-layer GPT-2 classifier built from a config, no download)."""

import pytest
import torch

from poise import _registry
from poise.continual import diagonal_fisher, fit_stream
from poise.continual._base import Batch
from poise.measure import ContinualEvaluator

transformers = pytest.importorskip("transformers", reason="needs transformers (the dev extra)")


def _model():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=1, num_labels=4)
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(cfg)


class _Task:
    def __init__(self, i):
        g = torch.Generator().manual_seed(i)
        self.id, self.classes, self.restrict = i, [2 * i, 2 * i + 1], False
        self.x_train = torch.randint(1, 20, (30, 6), generator=g)
        self.y_train = torch.randint(2 * i, 2 * i + 2, (30,), generator=g)
        self.x_test, self.y_test = self.x_train, self.y_train


@pytest.mark.parametrize("name", _registry.names("strategy"))
def test_every_strategy_on_a_hugging_face_model(name):
    tasks = [_Task(0), _Task(1)]
    model = _model()
    kw = {"per_task": 8} if name in ("agem", "ogpsa") else {"fisher_samples": 8} if name == "ewc" else {}
    if name == "ogd":
        kw = {"samples_per_task": 4}
    if name == "intact":  # GPT-2's blocks are Conv1D, not nn.Linear: name the layer to protect
        kw = {"layers": ["score"]}
    strategy = _registry.get("strategy", name)(**kw)
    ev = ContinualEvaluator({t.id: (t.x_test, t.y_test) for t in tasks})
    res = fit_stream(model, tasks, strategy, torch.optim.SGD(model.parameters(), lr=0.05), ev,
                     steps_per_task=4, batch_size=6, n_classes=4)
    assert 0 <= res["acc"] <= 1


def test_fisher_falls_back_when_the_model_cannot_be_vmapped():
    model = _model()
    data = Batch(torch.randint(1, 20, (5, 6)), torch.randint(0, 4, (5,)))
    f = diagonal_fisher(model, data)
    # the same as squared per-sample gradients, one backward each (in eval mode: no dropout)
    assert model.training
    model.eval()
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x[i : i + 1]).logits, data.y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                want[n] += p.grad**2 / 5
    for n in want:
        torch.testing.assert_close(f[n], want[n], rtol=1e-4, atol=1e-8)

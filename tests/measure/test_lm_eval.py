"""Continual evaluation of causal LMs: token accuracy, loss and perplexity averaged over the
scored (response) tokens, checked against a by-hand computation on tiny Hugging Face models,
and the continual metrics on lower-is-better scores."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from poise.measure import ContinualEvaluator, EvalSchedule, EvalSet, LMEvalSet, higher_is_better
from poise.measure import metrics as M

transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")

from poise.models import build_causal_lm  # noqa: E402

V = 23
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]
RESPONSES = [[14, 15], [16, 17, 18, 19, 20, 21], [22], [5, 6, 7]]


def _by_hand(model, prompts, responses):
    """Each sequence alone (no padding), the response tokens scored one by one."""
    correct = nll = n = 0.0
    per_seq = []
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            ids = torch.tensor([p + r])
            logits = model(ids).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            seq_nll = 0.0
            for j, tok in enumerate(r):
                pos = len(p) + j - 1  # the logits that predict token len(p) + j
                seq_nll -= float(lp[pos, tok])
                correct += float(logits[pos].argmax() == tok)
            nll += seq_nll
            n += len(r)
            per_seq.append(seq_nll / len(r))
    return correct / n, nll / n, per_seq


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_token_metrics_match_a_by_hand_computation(arch):
    torch.manual_seed(0)
    model = build_causal_lm(arch, vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=16)
    s = LMEvalSet.from_pairs(PROMPTS, RESPONSES, pad_id=0)
    ev = ContinualEvaluator({"a": s}, batch_size=3)  # two batches, the second of one row
    got = ev.scores(model)
    acc, loss, per_seq = _by_hand(model, PROMPTS, RESPONSES)
    assert got["token_acc"]["a"] == pytest.approx(acc, abs=1e-12)
    assert got["loss"]["a"] == pytest.approx(loss, rel=1e-5)
    assert got["ppl"]["a"] == pytest.approx(math.exp(loss), rel=1e-5)
    # a token average, not a mean of per-sequence averages (the responses differ in length)
    assert abs(np.mean(per_seq) - loss) > 1e-3
    assert ev.evaluate(model) == {"a": got["token_acc"]["a"]}


def test_loss_is_on_the_response_only():
    torch.manual_seed(1)
    model = build_causal_lm("llama", vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16)
    full = LMEvalSet.from_pairs([[3]], [[4, 5, 6, 7]])
    resp = LMEvalSet.from_pairs([[3, 4, 5]], [[6, 7]])
    assert full.n_tokens == 4 and resp.n_tokens == 2
    _, want, _ = _by_hand(model, [[3, 4, 5]], [[6, 7]])
    ev = ContinualEvaluator({"full": full, "resp": resp})
    got = ev.scores(model)["loss"]
    assert got["resp"] == pytest.approx(want, rel=1e-5)
    assert got["full"] != pytest.approx(got["resp"], rel=1e-3)  # the same tokens, scored on another span


def test_the_classifier_path_refuses_token_labels_instead_of_counting_tokens_per_sequence():
    torch.manual_seed(0)
    model = build_causal_lm("llama", vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16)
    x = torch.randint(1, V, (4, 6))
    y = torch.roll(x, -1, 1)
    ev = ContinualEvaluator({0: (x, y)})
    with pytest.raises(ValueError, match="LMEvalSet"):
        ev.evaluate(model)  # used to return correct tokens / sequences (e.g. 11.0)


class _NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return {"hidden": input_ids.float()}


def test_bad_inputs_raise_clear_errors():
    x = torch.tensor([[1, 2, 3, 0]])
    am = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="inside the attention mask"):
        LMEvalSet.from_masks(x, am, torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="response_mask has shape"):
        LMEvalSet.from_masks(x, am, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        LMEvalSet(x, torch.ones(1, 3))
    with pytest.raises(ValueError, match="position 0"):
        LMEvalSet.from_masks(x, am, torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"rows 0 have no scored token"):
        LMEvalSet.from_masks(x, am, torch.zeros_like(x))
    with pytest.raises(ValueError, match="mixes"):
        ContinualEvaluator({0: LMEvalSet(x, am), 1: (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))})
    with pytest.raises(ValueError, match="valid choices.*token_acc, loss, ppl"):
        ContinualEvaluator({0: LMEvalSet(x, am)}, metric="acc")
    with pytest.raises(TypeError, match="has no logits"):
        ContinualEvaluator({0: LMEvalSet(x, am)}).evaluate(_NoLogits())
    ev = ContinualEvaluator({0: LMEvalSet(x, am)}, predict=lambda m, i, a: torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ev.evaluate(_NoLogits())


def _ap(v):
    return pytest.approx(v, abs=1e-5)  # the scripted logits are float32


class _ScriptedLM(nn.Module):
    """Sequences ``[task, 1]``: the probability of token 1 after token ``task`` is
    ``exp(-loss[task])``, so the loss curve is whatever the test scripts."""

    def __init__(self):
        super().__init__()
        self.loss = {}
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, 3)
        for b in range(B):
            p = math.exp(-self.loss.get(int(input_ids[b, 0]), 5.0))
            logits[b, 0] = torch.log(torch.tensor([1e-9, p, 1 - p + 1e-9]))
        return logits


def test_continual_metrics_on_a_lower_is_better_score():
    m = _ScriptedLM()
    sets = {t: LMEvalSet(torch.tensor([[t, 1], [t, 1]])) for t in (0, 2)}
    ev = ContinualEvaluator(sets, schedule=EvalSchedule(dense_steps=0, every=1), gap_eps=0.02)
    l0 = [1.0, 0.5, 0.4, 0.9, 1.2, 0.41]
    l2 = [None, None, None, 2.0, 1.0, 0.3]
    for task, steps in ((0, range(3)), (2, range(3, 6))):
        ev.begin_task(task)
        for s in steps:
            m.loss = {0: l0[s], 2: l2[s] or 5.0}
            ev.maybe_eval(m)
        ev.end_task(m)
    steps, loss = ev.curves("loss")
    np.testing.assert_allclose(loss[:, 0], l0, rtol=1e-6)
    np.testing.assert_allclose(ev.curves("ppl")[1][:, 0], np.exp(l0), rtol=1e-6)
    np.testing.assert_allclose(ev.curves()[1][:, 0], [0, 1, 1, 0, 0, 1])  # token_acc: right iff loss < log 2
    r = ev.metrics("loss")
    assert r["metric"] == "loss" and r["higher_is_better"] is False
    assert r["per_task"]["0"]["gap_depth"] == _ap(1.2 - 0.4)  # the rise
    assert r["per_task"]["0"]["gap_min_step"] == 5  # where the worst (largest) loss is
    assert r["per_task"]["0"]["gap_recovery"] == _ap(3)  # 0.41 <= 0.4 + eps at step 6
    assert r["forgetting"] == _ap(0.41 - 0.4)
    assert r["bwt"] == _ap(-(0.41 - 0.4))
    assert r["acc"] == _ap((0.41 + 0.3) / 2)
    assert r["min_acc"] == _ap(1.2)  # the worst loss of task 0 after its training
    assert r["wc_acc"] == _ap(0.3 / 2 + 1.2 / 2)
    assert r["per_task"]["0"]["min_after"] == _ap(1.2)
    assert r["wf10"] == _ap(((1.2 - 0.4) + 0) / 2)  # largest rise; task 2's loss only falls
    tight = ContinualEvaluator(sets, schedule=EvalSchedule(dense_steps=0, every=1), gap_eps=0.005)
    tight.load_state_dict(ev.state_dict())
    assert math.isnan(tight.metrics("loss")["per_task"]["0"]["gap_recovery"])  # 0.41 > 0.4 + 0.005
    rp = ev.metrics("ppl")
    assert rp["per_task"]["0"]["gap_depth"] == pytest.approx(math.exp(1.2) - math.exp(0.4), rel=1e-5)
    ra = ev.metrics()  # token accuracy, higher is better: drops to 0 at step 5 and comes back
    assert ra["per_task"]["0"]["gap_depth"] == _ap(1.0)
    assert ev.last_scores()["loss"][0] == _ap(0.41)


def test_stability_gap_lower_is_better_is_the_mirror_image():
    steps = [0, 1, 2, 3, 4]
    loss = [0.5, 0.9, 1.3, 0.6, 0.52]
    g = M.stability_gap(steps, loss, 0, eps=0.05, higher_is_better=False)
    assert (g.reference, g.depth, g.min_step, g.recovery_steps) == pytest.approx((0.5, 0.8, 2, 4))
    assert M.stability_gap(steps, loss, 0, eps=0.05).depth == 0.0  # read as an accuracy it only rose
    assert higher_is_better("ppl") is False and higher_is_better("acc") is True
    with pytest.raises(ValueError, match="valid choices"):
        higher_is_better("bleu")


def test_lm_state_dict_round_trip_and_subsets():
    torch.manual_seed(0)
    model = build_causal_lm("llama", vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16)
    s = LMEvalSet.from_pairs(PROMPTS, RESPONSES)
    ev = ContinualEvaluator({"a": s, "b": s.index(torch.tensor([0, 2]))}, subset_size=3, seed=1,
                            schedule=EvalSchedule(dense_steps=2, every=1), metric="loss")
    assert len(ev.sets["a"]) == 3 and len(ev.sets["b"]) == 2
    ev.begin_task("a")
    for _ in range(2):
        ev.maybe_eval(model)
    buf = ev.state_dict()
    again = ContinualEvaluator({"a": s, "b": s.index(torch.tensor([0, 2]))}, subset_size=3, seed=1,
                               schedule=EvalSchedule(dense_steps=2, every=1), metric="loss")
    again.load_state_dict(torch.load(_save(buf), weights_only=True))
    assert again.last_scores() == ev.last_scores()
    assert set(ev.last_scores()) == {"token_acc", "loss", "ppl"}
    assert ev.maybe_eval(model)["a"] == pytest.approx(ev.last_scores()["loss"]["a"])


def _save(obj):
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    b.seek(0)
    return b


def test_eval_set_len():
    assert len(EvalSet(torch.zeros(3, 2), torch.zeros(3))) == 3


# --- non-finite evaluation (issue 19) --------------------------------------------------------------------


def test_lm_sums_are_nan_when_a_scored_position_has_non_finite_logits():
    from poise.measure import lm_sums, lm_values

    # one row [a, b, c], labels score positions 1 and 2 (predicted from the logits at 0 and 1)
    labels = torch.tensor([[-100, 1, 2]])
    logits = torch.zeros(1, 3, 3)
    logits[0, 0, 1] = logits[0, 1, 2] = 1.0  # both right: correct 2, nll 2 * (log(e + 2) - 1)
    torch.testing.assert_close(lm_sums(logits, labels),
                               torch.tensor([2.0, 2 * (math.log(math.e + 2) - 1), 2.0], dtype=torch.float64))
    logits[0, 2] = math.nan  # position 2's logits predict nothing scored: still finite
    assert torch.isfinite(lm_sums(logits, labels)).all()
    for bad in (math.nan, math.inf):
        broken = logits.clone()
        broken[0, 1, 0] = bad  # a scored position
        s = lm_sums(broken, labels)
        assert math.isnan(s[0]) and math.isnan(s[1]) and s[2] == 2.0
        assert all(math.isnan(v) for v in lm_values(s).values())  # before: token_acc from an argmax of NaN
    masked = logits.clone()
    masked[0, 1, 0] = -math.inf  # an impossible token: a mask, still a prediction
    assert torch.isfinite(lm_sums(masked, labels)).all()
    masked[0, 1] = -math.inf  # every token impossible: no prediction
    assert math.isnan(lm_sums(masked, labels)[0])


def test_an_lm_evaluator_flags_a_nan_model_and_refuses_an_empty_set():
    m = _ScriptedLM()
    sets = {t: LMEvalSet(torch.tensor([[t, 1], [t, 1]])) for t in (0, 2)}
    ev = ContinualEvaluator(sets, schedule=EvalSchedule(dense_steps=0, every=1), metric="loss")
    ev.begin_task(0)
    m.loss = {0: 0.5}
    assert ev.maybe_eval(m)[0] == pytest.approx(0.5)
    ev.end_task(m)
    ev.begin_task(2)
    m.loss = {0: math.nan, 2: 0.5}  # p = NaN: task 0's logits turn NaN
    got = ev.maybe_eval(m)
    assert math.isnan(got[0]) and got[2] == pytest.approx(0.5)
    assert all(math.isnan(ev.last_scores()[k][0]) for k in ("token_acc", "loss", "ppl"))
    ev.end_task(m)
    res = ev.metrics()
    assert res["nonfinite_evals"] == 1 and res["nonfinite_tasks"] == ["0"] and math.isnan(res["acc"])
    with pytest.raises(ValueError, match=r"task 'x': the LMEvalSet is empty \(0 sequences\)"):
        ContinualEvaluator({"x": LMEvalSet(torch.zeros(0, 3, dtype=torch.long))})

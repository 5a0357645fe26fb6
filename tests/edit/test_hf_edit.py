"""Editing a Hugging Face causal LM from requests (poise.edit.hf) on a tiny Llama and a tiny GPT-2
(Conv1D MLP) built from a config and trained for a few seconds on a word-level fact corpus."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")

from poise.edit.hf import EditRequest, HFEditor, edit_hf_model, evaluate_requests  # noqa: E402
from poise.models import build_causal_lm  # noqa: E402

FACTS = {"france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid", "japan": "tokyo",
         "egypt": "cairo", "new zealand": "wellington"}
TEMPLATES = ["the capital of {} is {}", "where is the capital of {} ? it is {}", "the capital of {} {}"]
FILLER = ["people live in a big city", "the town is small", "it is a big town"]
LINES = [t.format(c, k) for c, k in FACTS.items() for t in TEMPLATES] + FILLER
WORDS = ["<pad>"] + sorted({w for line in LINES for w in line.split()})


class WordTok:
    """A word-level tokenizer: ``encode(text) -> ids`` (no download possible, none needed)."""

    stoi = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text):
        return [self.stoi[w] for w in text.split()]


TOK = WordTok()


def _pretrain(model, steps=120):
    ids = [TOK.encode(line) for line in LINES]
    T = max(map(len, ids))
    x = torch.zeros(len(ids), T, dtype=torch.long)
    am = torch.zeros_like(x)
    for i, r in enumerate(ids):
        x[i, : len(r)] = torch.tensor(r)
        am[i, : len(r)] = 1
    labels = x.masked_fill(am == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=am, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def _build(arch):
    torch.manual_seed(0)
    if arch == "llama":
        return build_causal_lm("llama", vocab_size=len(WORDS), n_layer=2, n_head=2, n_embd=32, block_size=32)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def trained():
    return {arch: _pretrain(_build(arch)) for arch in ("llama", "gpt2")}


# The subject is the prompt's last token here: in a 2-layer model trained for seconds the last position
# reads the subject before any MLP, so an edit at the subject's last token moves the prediction only
# from there (the key placement for a subject inside the prompt is checked below).
REQUESTS = [
    {"prompt": "where is the capital of france", "subject": "france", "target_new": "rome",
     "rephrase_prompt": "the capital of france", "locality_prompt": "the capital of germany",
     "ground_truth": "paris"},  # an EasyEdit record
    EditRequest("the capital of {}", "spain", "cairo", paraphrase_prompts=["where is the capital of spain"],
                neighborhood_prompts=["the capital of italy", "the capital of japan is"]),
]
PRESERVE = FILLER + ["the capital of egypt is cairo"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("editor,layers,params", [("rome", [1], {}), ("memit", [0, 1], {}), ("alphaedit", [0, 1], {}),
                                                  ("rlsedit", [0, 1], {"lam": 1.0})])  # 21 keys span no 128-d space
def test_requests_are_written_into_the_model(trained, arch, editor, layers, params):
    model = copy.deepcopy(trained[arch])
    out = HFEditor(model, TOK, editor, layers, preserve=PRESERVE, editor_params=params).edit(REQUESTS)
    assert out["efficacy_before"] == 0.0
    assert out["efficacy"] == 1.0
    assert all(n > 0 for n in out["delta_norms"]) and len(out["delta_norms"]) == len(layers)
    assert 0 <= out["locality"] <= 1 and 0 <= out["paraphrase"] <= 1


def _module(model, arch, layer):
    return model.model.layers[layer].mlp.down_proj if arch == "llama" else model.transformer.h[layer].mlp.c_proj


def _W(module, arch):
    """``W [d_v, d_k]`` of ``v = W k``, by hand: GPT-2's Conv1D stores it transposed."""
    return module.weight.detach().clone() if arch == "llama" else module.weight.detach().T.clone()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_writes_a_rank_one_change_along_the_key_at_the_subjects_last_token(trained, arch):
    model = copy.deepcopy(trained[arch])
    mod = _module(model, arch, 0)  # layer 0: layer 1's attention reads "zealand" on the way to "is"
    assert type(mod).__name__ == ("Linear" if arch == "llama" else "Conv1D")
    req = EditRequest("the capital of {} is", "new zealand", "tokyo")
    ed = HFEditor(model, TOK, "rome", 0)
    # the key by hand: the projection's input at "zealand", token 4 of "the capital of new zealand is"
    got = {}
    h = mod.register_forward_hook(lambda m, a, o: got.update(k=a[0][0, 4].detach().double()))
    model(input_ids=torch.tensor([TOK.encode("the capital of new zealand is tokyo")]))
    h.remove()
    (K,) = ed.keys([req])
    torch.testing.assert_close(K[:, 0], got["k"], rtol=1e-6, atol=1e-8)
    W0 = _W(mod, arch).double()
    ed.edit([req], measure=False)
    delta = _W(mod, arch).double() - W0
    k = got["k"]
    off_key = delta - torch.outer(delta @ k, k) / (k @ k)  # ROME with C = I: Delta = r k^T / k^T k
    assert float(off_key.norm()) < 1e-4 * float(delta.norm())
    assert float((delta @ k).norm()) > 0
    torch.testing.assert_close(ed.editors[0].weight, _W(mod, arch).double(), rtol=0, atol=1e-6)


def _acc(model, prompt, target):
    p, t = TOK.encode(prompt), TOK.encode(target)
    logits = model(input_ids=torch.tensor([p + t])).logits[0]
    return sum(int(logits[len(p) - 1 + j].argmax() == t[j]) for j in range(len(t))) / len(t)


def _next(model, prompt):
    return int(model(input_ids=torch.tensor([TOK.encode(prompt)])).logits[0, -1].argmax())


@torch.no_grad()
def test_scores_match_a_by_hand_computation(trained):
    model = copy.deepcopy(trained["llama"])
    before = copy.deepcopy(model)
    reqs = [EditRequest.from_record(r) if isinstance(r, dict) else r for r in REQUESTS]
    out = edit_hf_model(model, TOK, reqs, "memit", [0, 1], preserve=PRESERVE)
    eff = [_acc(model, r.text, r.target_new) for r in reqs]
    para = [sum(_acc(model, p, r.target_new) for p in r.paraphrase_prompts) / len(r.paraphrase_prompts) for r in reqs]
    loc = [sum(_next(model, p) == _next(before, p) for p in r.neighborhood_prompts) / len(r.neighborhood_prompts)
           for r in reqs]
    assert [p["efficacy"] for p in out["per_request"]] == eff
    assert [p["paraphrase"] for p in out["per_request"]] == para
    assert [p["locality"] for p in out["per_request"]] == loc
    assert out["efficacy"] == sum(eff) / 2 and out["locality"] == sum(loc) / 2
    assert out["efficacy_before"] == sum(_acc(before, r.text, r.target_new) for r in reqs) / 2
    assert evaluate_requests(before, TOK, reqs)["efficacy"] == out["efficacy_before"]


def test_no_edit_changes_nothing(trained):
    model = copy.deepcopy(trained["gpt2"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = HFEditor(model, TOK, "none", [0, 1]).edit(REQUESTS)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert out["locality"] == 1.0 and out["efficacy"] == out["efficacy_before"] == 0.0


def test_sequential_edits_carry_the_editor_state_and_outside_changes(trained):
    model = copy.deepcopy(trained["llama"])
    ed = HFEditor(model, TOK, "rlsedit", [1], preserve=PRESERVE, editor_params={"lam": 1.0})
    ed.edit(REQUESTS[:1], measure=False)
    mod = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        mod.weight.add_(1e-3)  # e.g. a fine-tuning step between edits
    out = ed.edit(REQUESTS[1:])
    assert ed.editors[0].n_edits == 2
    torch.testing.assert_close(ed.editors[0].weight, mod.weight.detach().double(), rtol=0, atol=1e-6)
    assert out["efficacy"] == 1.0


def test_records_in_both_formats():
    cf = EditRequest.from_record({
        "case_id": 0, "requested_rewrite": {"prompt": "the capital of {} is", "subject": "france",
                                            "target_new": {"str": "rome"}, "target_true": {"str": "paris"}},
        "paraphrase_prompts": ["where is the capital of france ? it is"],
        "neighborhood_prompts": ["the capital of italy is"]})
    assert (cf.text, cf.target_new, cf.target_true) == ("the capital of france is", "rome", "paris")
    assert cf.paraphrase_prompts == ("where is the capital of france ? it is",)
    ee = EditRequest.from_record(REQUESTS[0])
    assert ee.neighborhood_prompts == ("the capital of germany",) and ee.target_true == "paris"
    with pytest.raises(ValueError, match="unknown request key 'answer'; valid: prompt, subject"):
        EditRequest.from_record({**REQUESTS[0], "answer": "x"})
    with pytest.raises(ValueError, match="lacks target_new"):
        EditRequest.from_record({"prompt": "a {}", "subject": "b"})
    with pytest.raises(ValueError, match="not in the prompt"):
        EditRequest("the capital of italy is", "france", "rome")


class _NoLogits(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return {"hidden": self.inner(input_ids=input_ids).logits}


def test_bad_input_errors_name_the_problem(trained):
    model = trained["llama"]
    with pytest.raises(ValueError, match="needs preserved keys: pass preserve="):
        HFEditor(model, TOK, "memit", [0, 1])
    with pytest.raises(ValueError, match=r"no module model.layers.7.mlp.down_proj / transformer.h.7.mlp.c_proj"):
        HFEditor(model, TOK, "rome", 7)
    with pytest.raises(ValueError, match="unknown editor|valid"):
        HFEditor(model, TOK, "romee", 1)
    with pytest.raises(TypeError, match="editing needs a causal LM returning logits"):
        HFEditor(_NoLogits(copy.deepcopy(model)), TOK, "rome", 1, module="inner.model.layers.{}.mlp.down_proj").edit(
            REQUESTS)

    with pytest.warns(UserWarning, match="does not depend on layer 1's output"):  # the last layer, subject inside
        HFEditor(copy.deepcopy(model), TOK, "rome", 1).edit([EditRequest("the capital of {} is", "france", "rome")],
                                                            measure=False)

    class Merging(WordTok):  # "capital of" becomes one token when followed by more text
        def encode(self, text):
            return [self.stoi[w] for w in text.replace("of france rome", "france rome").split()]

    with pytest.raises(ValueError, match="does not extend the tokens"):
        HFEditor(copy.deepcopy(model), Merging(), "rome", 1).edit([EditRequest("the capital of {}", "france", "rome")])


# --- refusals (issue 19): finite settings, all-or-nothing edits, no score from NaN logits -----------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kw,msg", [({"lr": NAN}, r"lr=nan must be > 0 and finite"),
                                    ({"clamp": INF}, r"clamp=inf must be > 0 and finite"),
                                    ({"weight_decay": -1.0}, r"weight_decay=-1.0 must be >= 0 and finite"),
                                    ({"ridge": NAN}, r"ridge=nan must be >= 0 and finite"),
                                    ({"steps": 1.5}, r"steps=1.5 must be an integer"),
                                    ({"batch": 0}, r"batch=0 >= 1")])
def test_search_settings_must_be_finite_and_in_range(trained, kw, msg):
    with pytest.raises(ValueError, match=msg):
        HFEditor(trained["llama"], TOK, "rome", 1, **kw)


def _states(ed):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in e.state_dict().items()} for e in ed.editors]


def _assert_same(model, ed, state, eds):
    for k, v in model.state_dict().items():  # bit for bit, a NaN planted by the test equal to itself
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, equal_nan=True)
    for got, want in zip(_states(ed), eds, strict=True):
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k]
                   for k in want)


def test_an_editor_refusing_at_a_later_layer_restores_every_layer(trained):
    model = copy.deepcopy(trained["llama"])
    ed = HFEditor(model, TOK, "rlsedit", [0, 1], preserve=PRESERVE, editor_params={"lam": 1.0})
    ed.edit(REQUESTS[:1], measure=False)  # editor state to keep: C and n_edits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eds = _states(ed)
    first, second = ed.editors
    wrote = []

    class Recording:  # layer 0 edits for real (and is written into the model) ...
        def __getattr__(self, name):
            return getattr(first, name)

        def edit(self, K, V):
            wrote.append(True)
            return first.edit(K, V)

    class Refusing:  # ... then layer 1's editor refuses, as a singular system would
        def __getattr__(self, name):
            return getattr(second, name)

        def edit(self, K, V):
            raise ValueError("lam * C0 + K K^T is singular (a stand-in)")

    ed.editors = [Recording(), Refusing()]
    with pytest.raises(ValueError, match=r"layer 1 \(model.layers.1.mlp.down_proj\): lam \* C0 .* left as they were"):
        ed.edit(REQUESTS[1:], measure=False)
    assert wrote  # layer 0 was changed before the refusal: the restore is what keeps the model the same
    _assert_same(model, ed, state, eds)


def test_a_model_with_nan_outputs_is_neither_scored_nor_edited(trained):
    model = copy.deepcopy(trained["llama"])
    with torch.no_grad():
        model.model.embed_tokens.weight[TOK.stoi["france"]] = NAN  # request 0's prompt reads it
    reqs = [EditRequest.from_record(r) if isinstance(r, dict) else r for r in REQUESTS]
    got = evaluate_requests(model, TOK, reqs)
    # before: the argmax of NaN logits is token 0, scored as a prediction (efficacy 0.0, a number)
    assert got["nonfinite_requests"] == [0] and math.isnan(got["efficacy"]) and math.isnan(got["paraphrase"])
    assert math.isnan(got["per_request"][0]["efficacy"]) and got["per_request"][1]["efficacy"] == 0.0
    ed = HFEditor(model, TOK, "rome", 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eds = _states(ed)
    with pytest.raises(ValueError, match=r"requests \[0\]: the hidden state of layer 1 .* not finite"):
        ed.edit(reqs, measure=False)
    _assert_same(model, ed, state, eds)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = INF
    with pytest.raises(ValueError, match=r"layer 1: the weight of model.layers.1.mlp.down_proj has 1 non-finite"):
        ed.edit(reqs[1:], measure=False)
    assert evaluate_requests(model, TOK, reqs[1:])["nonfinite_requests"] == [0]

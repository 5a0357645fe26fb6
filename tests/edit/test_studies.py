"""The fact LM, the edit-stream and priming studies end to end, at smoke-test size."""

import json
import math

import pytest
import torch

from poise.cli import main
from poise.continual import prune_top as _prune_top
from poise.runs.config import ConfigError, load_recipe
from poise.runs.edit_study import fact_lm, run_one_edit
from poise.runs.priming_study import spearman
from poise.runs.store import read_jsonl
from poise.tasks.factlm import (
    candidate_logprobs,
    edit_targets,
    fact_tokenizer,
    keys_at,
    subject_position,
    template_prompt,
)
from poise.tasks.facts import THEMES, make_facts

QUICK_EDIT = ["lm.n_facts=800", "lm.steps=300", "lm.batch_size=32", "stream.n_edits=60", "stream.n_locality=60",
              "stream.n_preserve=200", "stream.eval_every=2"]


def test_word_tokenizer_round_trip_and_unknown_words():
    facts = make_facts(30, max_syllables=4)
    tok = fact_tokenizer(facts)
    for f in facts:
        for text in (f.text, *f.paraphrases):
            assert tok.decode(tok.encode(text)) == text
        assert tok.stoi[f.entity] in tok.encode(f.prompt()).tolist()
    with pytest.raises(ValueError, match="not in the vocabulary: qwerty"):
        tok.encode("the qwerty is")
    with pytest.raises(ValueError, match="raise max_syllables"):
        make_facts(5000, max_syllables=3)


def test_prompts_positions_and_keys():
    facts = make_facts(10, max_syllables=4)
    tok = fact_tokenizer(facts)
    f = facts[0]
    for j in range(3):
        p = template_prompt(f, j)
        assert (f.text, *f.paraphrases)[j].startswith(p) and f.keyword not in p
        i = subject_position(tok, p, f.entity)
        assert tok.encode("\n" + p)[i] == tok.stoi[f.entity]
    with pytest.raises(ValueError, match="not a token"):
        subject_position(tok, template_prompt(f, 0), facts[1].entity)
    torch.manual_seed(0)
    from poise.tasks.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_embd=32))
    layer = model.blocks[1].mlp[2]
    prompts = [template_prompt(g, 0) for g in facts[:4]]
    pos = [len(tok.encode("\n" + p)) - 1 for p in prompts]
    K = keys_at(model, tok, layer, prompts, pos)
    assert K.shape == (layer.in_features, 4) and K.dtype == torch.float64
    # the key of one prompt does not depend on what it is batched with (right padding, causal)
    assert torch.allclose(K[:, :1], keys_at(model, tok, layer, prompts[:1], pos[:1]))


def test_edit_targets_make_the_new_keyword_most_probable():
    from poise.runs.config import FactLMConfig

    model, tok, facts = fact_lm(FactLMConfig(n_facts=300, steps=300, batch_size=32), seed=0)
    layer = model.blocks[1].mlp[2]
    fs = facts[:8]
    new = [[v for v in THEMES[f.theme]["values"] if v != f.keyword][0] for f in fs]
    prompts = [template_prompt(f, 0) for f in fs]
    pos = [len(tok.encode("\n" + p)) - 1 for p in prompts]
    K, V = edit_targets(model, tok, layer, prompts, pos, new, steps=40)
    assert K.shape == (layer.in_features, 8) and V.shape == (layer.out_features, 8)
    cands = [THEMES[f.theme]["values"] for f in fs]
    before = candidate_logprobs(model, tok, prompts, cands)
    wins, gain = 0, 0.0
    for i in range(8):  # write the value v* at its position only: the new keyword wins
        d = (V[:, i] - layer.weight.double() @ K[:, i]).float()

        def hook(m, a, out, i=i, d=d):
            out = out.clone()
            out[:, pos[i]] += d
            return out

        h = layer.register_forward_hook(hook)
        lp = candidate_logprobs(model, tok, prompts[i : i + 1], cands[i : i + 1])[0]
        h.remove()
        wins += int(lp.argmax() == cands[i].index(new[i]))
        gain += float(lp[cands[i].index(new[i])] - before[i, cands[i].index(new[i])]) / 8
    assert wins >= 7 and gain > 0.5


def test_edit_stream_editors_change_what_the_model_says(tmp_path):
    # weak preservation: 60 edits fit a 256-wide key space (without unlearning in between)
    cfg = load_recipe("edit-stream", QUICK_EDIT + ["lm.mlp_ratio=4", "stream.unlearn_every=0"])
    params = {"memit": {"lam": 1.0}, "rlsedit": {"lam": 0.05, "mu": 1.0}}
    for v in cfg.variants:
        v.params = params.get(v.name, v.params)
    names = [v.name for v in cfg.variants]
    res = {name: run_one_edit(cfg, names.index(name), 0, tmp_path / f"{name}.jsonl")
           for name in ("unedited", "memit", "rlsedit")}
    m = {k: r["metrics"] for k, r in res.items()}
    assert m["unedited"]["efficacy"] < 0.15  # the counterfactual keyword is not the known one
    assert m["unedited"]["write_efficacy"] == pytest.approx(m["unedited"]["efficacy"])  # nothing moves it
    assert len({(m[k]["base_acc"], m[k]["key_erank"]) for k in m}) == 1  # one LM and one key set per seed
    assert 1 <= m["memit"]["key_erank"] <= m["memit"]["key_dim"] == 256
    assert m["memit"]["write_efficacy"] > 0.9  # lam = 1: each request written before the next moves it
    assert m["unedited"]["locality"] == 1.0 and m["unedited"]["weight_change"] == 0.0
    for e in ("memit", "rlsedit"):
        assert m[e]["efficacy"] > m["unedited"]["efficacy"] + 0.3
        assert 0 <= m[e]["locality"] <= 1 and math.isfinite(m[e]["general_loss"])
    rows = read_jsonl(tmp_path / "rlsedit.jsonl")
    assert [r["edits"] for r in rows] == [r["edits"] for r in res["rlsedit"]["curve"]]
    assert all(0 <= r["write_efficacy"] <= 1 for r in rows)
    assert rows[-1]["edits"] == cfg.stream.n_edits and "forget_acc" not in rows[-1]


def test_unlearning_requests_lower_the_forgotten_facts():
    cfg = load_recipe("edit-stream", QUICK_EDIT + ["lm.mlp_ratio=4", "lm.steps=600", "stream.unlearn_every=2",
                                                   "stream.unlearn_n=20", "stream.unlearn_lr=0.2"])
    r = run_one_edit(cfg, [v.name for v in cfg.variants].index("unedited"), 0)["metrics"]
    assert r["base_forget_acc"] > 0.3  # the LM knew them
    assert r["forget_acc"] < r["base_forget_acc"] - 0.2


def _recipe(**variant0):
    import tomllib

    from poise.runs.config import find_recipe

    data = tomllib.loads(find_recipe("edit-stream")[1])
    data["variants"][0].update(variant0)
    return data


def test_edit_variant_errors():
    from poise.runs.config import from_dict

    with pytest.raises(ConfigError, match="valid choices: alphaedit, memit, none, rlsedit, rome"):
        from_dict(_recipe(editor="mend"))
    with pytest.raises(ConfigError, match=r"variants\[0\].params.mu: unknown argument of editor 'memit'"):
        from_dict(_recipe(editor="memit", params={"mu": 1.0}))
    with pytest.raises(ConfigError, match=r"params.lam=-1.0 must be a number >= 0"):
        from_dict(_recipe(editor="memit", params={"lam": -1.0}))


@pytest.mark.parametrize("override, message", [
    ("stream.n_edits=5000", "raise lm.n_facts"),
    ("stream.position='middle'", "valid choices: last, subject"),
    ("stream.layer=7", "valid: 0 to lm.n_layer-1"),
    ("stream.unlearn_method='forget'", "valid choices: npo"),
])
def test_edit_recipe_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("edit-stream", [override])


def test_ignore_k_prunes_exactly_the_largest_update_coordinates():
    d = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    out = _prune_top(d, 0.34)  # ceil(0.34 * 6) = 3 largest magnitudes: -5, 2, 0.3
    assert torch.equal(out, torch.tensor([[0.1, 0.0, 0.0], [0.0, -0.2, 0.05]]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_priming_and_edit_recipes_run_from_the_cli(tmp_path, capsys):
    run = tmp_path / "p"
    assert main(["run", "priming", "--quick", "--run-dir", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stepping-stone" in out and "log_priming" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and set(summary["variants"]) == {"plain", "stepping-stone", "ignore-k 8%"}
    rows = read_jsonl(run / "metrics" / "plain-s0.jsonl")
    assert len(rows) == 6 and all(math.isfinite(r["log_priming"]) for r in rows)
    plain = summary["variants"]["plain"]
    assert plain["log_memorization"]["mean"] > 0  # learning the fact raised it in its own context
    assert "<img" in (run / "report.html").read_text()

    run = tmp_path / "e"
    assert main(["run", "edit-stream", "--quick", "--run-dir", str(run), "--no-progress",
                 "lm.mlp_ratio=4"]) == 0
    html = (run / "report.html").read_text()
    assert "early retention" in html and "rlsedit" in html and html.count("<img") == 1


def test_key_spectrum_by_hand():
    from poise.runs.kinds.edit import key_spectrum

    # three equal singular values and a zero one: both ranks are 3
    sp = key_spectrum(torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0])))
    assert sp["erank"] == pytest.approx(3.0) and sp["participation"] == pytest.approx(3.0) and sp["dim"] == 4
    # singular values 3, 1: p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)); eigenvalues 9, 1: PR = 100/82
    sp = key_spectrum(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert sp["erank"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert sp["participation"] == pytest.approx(100 / 82) and sp["dim"] == 3


def test_capacity_note_flags_an_lm_that_does_not_know_its_facts_and_an_overfull_layer():
    from poise.runs.kinds.edit import _capacity_note

    def res(seed, acc):
        return {"seed": seed, "metrics": {"base_acc": acc, "key_dim": 256, "key_erank": 25.0 + seed,
                                          "key_participation": 4.0}}

    good = _capacity_note({"n_edits": 250}, [res(0, 0.95), res(1, 1.0), res(1, 1.0)])
    assert "names 95.0% to 100.0% of its facts" in good and "d_k = 256" in good and "rank 25.0-26.0" in good
    assert "does not know" not in good and "exceed" not in good
    bad = _capacity_note({"n_edits": 300}, [res(0, 0.14)])
    assert "does not know its facts" in bad and "300 edits exceed d_k = 256" in bad

import math

import pytest
import torch

from poise.measure.priming import keyword_logprob, memorization_score, priming_score
from poise.tasks.facts import ALPHABET, THEMES, make_facts, stepping_stone
from poise.tasks.gpt import GPT, GPTConfig
from poise.tasks.text import CharTokenizer

TOK = CharTokenizer(ALPHABET)


def test_fact_corpus_is_covered_by_the_alphabet_and_distinct():
    facts = make_facts(40, seed=1)
    assert len({f.entity for f in facts}) == 40
    for f in facts:
        assert f.keyword in f.text and f.text.startswith(f.prompt())
        TOK.encode(f.text)
        for p in f.paraphrases:
            assert f.keyword in p and f.entity in p
    for spec in THEMES.values():
        for c in spec["contexts"]:
            TOK.encode(c)


def test_keyword_logprob_by_hand_on_a_uniform_model():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, TOK.vocab_size)

    # every next token has probability 1/V: log P(keyword) = len(keyword) * log(1/V)
    lp = keyword_logprob(Uniform(), TOK.encode, "the sky was", "teal")
    assert lp == pytest.approx(4 * math.log(1 / TOK.vocab_size))
    assert priming_score(Uniform(), Uniform(), TOK.encode, ["a", "b"], "teal") == pytest.approx(1.0)


def test_priming_and_memorisation_scores_by_hand():
    class Biased(torch.nn.Module):  # logit c on the token "e", 0 elsewhere
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            out = torch.zeros(*x.shape, TOK.vocab_size)
            out[..., TOK.encode("e")[0]] = self.c
            return out

    V, c = TOK.vocab_size, 3.0
    # "teal": P(e) = e^c / (V - 1 + e^c), the 3 other letters 1 / (V - 1 + e^c); before: 1/V each
    ratio = math.exp(c) * V**4 / (V - 1 + math.exp(c)) ** 4
    assert priming_score(Biased(0.0), Biased(c), TOK.encode, ["the sky was", "a"], "teal") == pytest.approx(ratio)
    assert priming_score(Biased(c), Biased(0.0), TOK.encode, ["a"], "teal") == pytest.approx(1 / ratio)
    assert memorization_score(Biased(0.0), Biased(c), TOK.encode, "the sky was", "teal") == pytest.approx(ratio)
    assert priming_score(Biased(0.0), Biased(c), TOK.encode, ["a"], "tall") < 1  # no "e": every letter loses


def test_learning_a_fact_raises_its_keyword_in_its_own_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    before = GPT(model.config)
    before.load_state_dict(model.state_dict())
    fact = make_facts(1, seed=3)[0]
    ids = TOK.encode(fact.text)[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:])[1].backward()
        opt.step()
    s_mem = memorization_score(before, model, TOK.encode, fact.prompt(), fact.keyword)
    assert s_mem > 10  # the fact was learned
    s_prime = priming_score(before, model, TOK.encode, THEMES[fact.theme]["contexts"], fact.keyword)
    assert s_prime > 0 and math.isfinite(s_prime)


def test_stepping_stone():
    out = stepping_stone("the favourite colour of zorbi is vermilion.", "vermilion", ["a warm", "reddish orange shade"])
    assert out == "the favourite colour of zorbi is a warm, reddish orange shade: vermilion."
    with pytest.raises(ValueError, match="does not occur"):
        stepping_stone("abc", "teal", ["x"])


def test_old_paths_are_the_moved_objects():
    import poise.edit
    import poise.edit.priming as old
    import poise.measure
    import poise.tasks.factlm as factlm
    from poise.edit import targets

    assert (old.keyword_logprob, old.priming_score, old.memorization_score, old.stepping_stone) == (
        keyword_logprob, priming_score, memorization_score, stepping_stone)
    assert poise.measure.priming_score is priming_score and poise.measure.keyword_logprob is keyword_logprob
    assert factlm.edit_targets is targets.edit_targets is poise.edit.edit_targets
    assert factlm.keys_at is targets.keys_at is poise.edit.keys_at
    assert factlm._value_search is targets._value_search
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        factlm.nope  # noqa: B018

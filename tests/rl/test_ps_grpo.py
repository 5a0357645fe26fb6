"""PS-GRPO (arXiv 2510.04392): the group similarity reward, its sampled approximation, output
consistency across paraphrases, and the paraphrased arithmetic task."""

import pytest
import torch

from poise.rl import group_similarity_reward, paraphrase_consistency, token_f1
from poise.tasks.paraphrase import ParaphraseArithmeticTask, paraphrase


def test_reward_compares_only_with_other_paraphrases():
    # set 0: paraphrase 0 -> "5", "6"; paraphrase 1 -> "5"; paraphrase 2 -> "5", "7"
    outs = ["5", "6", "5", "5", "7"]
    sets = [0, 0, 0, 0, 0]
    forms = [0, 0, 1, 2, 2]
    r = group_similarity_reward(outs, sets, forms)
    # o_0="5" vs {"5", "5", "7"} -> 2/3; o_1="6" vs the same -> 0; o_2="5" vs {"5","6","5","7"} -> 2/4
    # o_3="5" vs {"5","6","5"} -> 2/3; o_4="7" vs {"5","6","5"} -> 0
    torch.testing.assert_close(r, torch.tensor([2 / 3, 0.0, 0.5, 2 / 3, 0.0]), check_dtype=False)


def test_sets_do_not_mix():
    outs = ["5", "5", "5", "5"]
    r = group_similarity_reward(outs, [0, 0, 1, 1], [0, 1, 0, 1])
    assert r.tolist() == [1.0, 1.0, 1.0, 1.0]
    r = group_similarity_reward(["5", "6", "6", "6"], [0, 0, 1, 1], [0, 1, 0, 1])
    assert r.tolist() == [0.0, 0.0, 1.0, 1.0]  # set 1's outputs never see set 0's "5"


def test_approximation_is_exact_with_enough_samples_and_unbiased():
    outs = ["1", "2", "1", "1", "3", "1"]
    sets, forms = [0] * 6, [0, 0, 1, 1, 2, 2]
    exact = group_similarity_reward(outs, sets, forms)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(group_similarity_reward(outs, sets, forms, num_samples=4, generator=g), exact)
    one = torch.stack([group_similarity_reward(outs, sets, forms, num_samples=1, generator=g) for _ in range(3000)])
    assert set(one.unique().tolist()) <= {0.0, 1.0}  # one comparison each: 0 or 1
    torch.testing.assert_close(one.float().mean(0), exact.float(), atol=0.04, rtol=0)


def test_token_f1_similarity():
    assert token_f1("12", "13") == 0.5 and token_f1("1 2 3", "1 2") == pytest.approx(0.8)
    r = group_similarity_reward(["12", "13"], [0, 0], [0, 1], similarity="token_f1")
    assert r.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("forms", [[0, 0, 0], [3, 3, 3]])
def test_a_paraphrase_set_of_one_is_refused(forms):
    with pytest.raises(ValueError, match=r"paraphrase set 7 has 1 paraphrase .*at least 2"):
        group_similarity_reward(["1", "2", "3"], [7, 7, 7], forms)
    with pytest.raises(ValueError, match="paraphrase set 7 has 1"):
        paraphrase_consistency(["1", "2", "3"], [7, 7, 7], forms)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="num_samples=0"):
        group_similarity_reward(["1", "2"], [0, 0], [0, 1], num_samples=0)
    with pytest.raises(ValueError, match="similarity='bleu'; valid choices: exact, token_f1"):
        group_similarity_reward(["1", "2"], [0, 0], [0, 1], similarity="bleu")
    with pytest.raises(ValueError, match="one entry per output"):
        group_similarity_reward(["1", "2"], [0], [0, 1])


def test_consistency_counts_cross_paraphrase_pairs():
    # set 0: forms 0,1,2 answer 5,5,6 -> pairs (5,5)=1 (5,6)=0 (5,6)=0 -> 1/3; set 1: 7,7 -> 1
    assert paraphrase_consistency(["5", "5\n", "6", "7", "7"], [0, 0, 0, 1, 1], [0, 1, 2, 0, 1]) == pytest.approx(2 / 3)
    # outputs of the same paraphrase are not compared with each other
    assert paraphrase_consistency(["5", "6", "5"], [0, 0, 0], [0, 0, 1]) == pytest.approx(0.5)


def test_paraphrase_task_forms_share_the_answer():
    task = ParaphraseArithmeticTask(level=1, ops="+-*", n_paraphrases=6, seed=3)
    probs = task.sample(7)  # rounded up to whole sets: 2 sets of 6
    assert len(probs) == 12 and [p.paraphrase for p in probs[:6]] == list(range(6))
    assert {p.set_id for p in probs[:6]} == {0} and {p.set_id for p in probs[6:]} == {1}
    for p in probs:
        assert task.reward(p, p.answer + "\n") == 1.0 and task.reward(p, "x") == 0.0
        assert len({q.answer for q in probs if q.set_id == p.set_id}) == 1
    assert len({p.prompt for p in probs[:6]}) == 6  # six different surface forms
    assert paraphrase(12, "*", 3, 3, level=2) == "012*003="


@pytest.mark.parametrize("n", [1, 7, 0])
def test_paraphrase_task_refuses_a_set_of_one(n):
    with pytest.raises(ValueError, match=f"n_paraphrases={n}: a paraphrase set needs 2..6"):
        ParaphraseArithmeticTask(n_paraphrases=n)

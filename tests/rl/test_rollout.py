"""poise.rl.rollout: the sample stage as library code with explicit arguments.

``test_collect_equals_rl_study_collect`` is a TEMPORARY EQUIVALENCE TEST: the library ``collect``
draws exactly what the workbench's old ``poise.runs.rl_study.collect`` drew (same prompts,
completions, sampler log-probs, rewards, advantages, counts) for every sampling mode. Delete it
with the old function; the other tests here do not depend on it."""

import copy

import pytest
import torch

from poise.rl import AsyncSampler, collect, score_rollouts, sft_warmup
from poise.rl import rollout as R
from poise.tasks.gpt import GPT, GPTConfig
from poise.tasks.reasoning import ArithmeticTask, Problem
from poise.tasks.text import CharTokenizer

TOK = CharTokenizer()
KW = {"num_prompts": 4, "group_size": 4, "max_new_tokens": 5}


@pytest.fixture(autouse=True)
def float64_default():
    """Overrides tests/rl/conftest.py: the sampler runs in float32 (bfloat16 autocast) as in the workbench."""
    yield


@pytest.fixture(scope="module")
def warm_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=32))
    sft_warmup(model, TOK, ArithmeticTask(1, seed=20_000), steps=60, batch_size=32, lr=3e-3, seed=0)  # reward > 0
    return model


def _same(a, b):
    ra, rb = list(a[0]), list(b[0])
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x.problem == y.problem and x.text == y.text and x.group == y.group and x.reward == y.reward
        assert torch.equal(x.prompt_ids, y.prompt_ids) and torch.equal(x.completion_ids, y.completion_ids)
        assert torch.equal(x.sampler_logp, y.sampler_logp)
    for u, v in zip(a[1:3], b[1:3], strict=True):
        assert torch.equal(u, v)
    assert a[3] == b[3] and a[4] == b[4]


@pytest.mark.parametrize("sampling", ["uniform", "dynamic", "reinforce_ada"])
def test_collect_gives_valid_groups(warm_model, sampling):
    out = collect(warm_model, TOK, ArithmeticTask(1, seed=0), sampling=sampling, generator=torch.Generator()
                  .manual_seed(0), **KW)
    groups = [r.group for r in out.rollouts]
    assert len(out.rollouts) == len(out.rewards) == len(out.advantages) <= out.generated and out.failures == []
    assert torch.isfinite(out.advantages).all()
    assert out.rewards.tolist() == [r.reward for r in out.rollouts]
    if sampling == "uniform":
        assert out.generated == 16 and groups == [g for g in range(4) for _ in range(4)]
    if sampling == "dynamic":  # only groups whose rewards vary are kept, renumbered 0..G-1
        assert sorted(set(groups)) == list(range(len(set(groups)))) and len(groups) < out.generated
        assert all(len({r.reward for r in out.rollouts if r.group == g}) == 2 for g in set(groups))
    if sampling == "reinforce_ada":
        assert all(groups.count(g) == 4 for g in set(groups))


def test_advantage_by_name_or_function(warm_model):
    def centred(rewards, group_id):
        return rewards - rewards.mean()

    a = collect(warm_model, TOK, ArithmeticTask(1, seed=0), generator=torch.Generator().manual_seed(0),
                advantage=centred, **KW)
    torch.testing.assert_close(a.advantages, a.rewards - a.rewards.mean())
    with pytest.raises(KeyError, match="unknown advantage 'nope'; valid choices"):
        collect(warm_model, TOK, ArithmeticTask(1, seed=0), advantage="nope", **KW)


def test_bad_collect_arguments():
    with pytest.raises(ValueError, match="sampling='greedy'; valid choices: uniform, dynamic, reinforce_ada"):
        collect(torch.nn.Linear(1, 1), TOK, ArithmeticTask(1, seed=0), sampling="greedy", **KW)
    with pytest.raises(ValueError, match="max_gen_batches=0 must be > 0"):
        collect(torch.nn.Linear(1, 1), TOK, ArithmeticTask(1, seed=0), sampling="dynamic", max_gen_batches=0, **KW)
    with pytest.raises(TypeError):
        collect(torch.nn.Linear(1, 1), TOK, ArithmeticTask(1, seed=0), group_size=4, max_new_tokens=5)  # num_prompts


def test_failed_rewards_drop_their_samples():
    class Flaky:
        @staticmethod
        def reward(problem, completion):
            if completion == "boom":
                raise ValueError("bad")
            return float("inf") if completion == "inf" else 1.0

    rs = [R.Rollout(Problem("1+1=", "2"), torch.zeros(1), torch.zeros(1), torch.zeros(1), text, 0)
          for text in ("2", "boom", "inf", "3")]
    kept, bad = score_rollouts(Flaky, rs)
    assert [r.text for r in kept] == ["2", "3"] and [r.reward for r in kept] == [1.0, 1.0]
    assert [b["completion"] for b in bad] == ["boom", "inf"] and bad[0]["error"] == "ValueError: bad"
    assert bad[1]["error"] == "ValueError: reward function returned inf"


def test_async_sampler_with_zero_staleness_equals_synchronous_collect(warm_model):
    # eta = 0: batch k waits for version k, so each batch is drawn with the weights the trainer published
    model = copy.deepcopy(warm_model)
    gen_a, task_a = torch.Generator().manual_seed(5), ArithmeticTask(1, seed=1)
    s = AsyncSampler(model, eta=0, steps=2,
                     produce=lambda m: collect(m, TOK, task_a, generator=gen_a, **KW))
    try:
        first, used0 = s.get()
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)  # a training step
        s.publish(model)
        second, used1 = s.get()
    finally:
        s.close()
    assert (used0, used1) == (0, 1)
    gen_b, task_b = torch.Generator().manual_seed(5), ArithmeticTask(1, seed=1)
    _same(first, collect(warm_model, TOK, task_b, generator=gen_b, **KW))
    _same(second, collect(model, TOK, task_b, generator=gen_b, **KW))


def test_async_sampler_errors_reach_the_trainer():
    def boom(model):
        raise RuntimeError("generation failed")

    s = AsyncSampler(torch.nn.Linear(2, 2), eta=1, steps=3, produce=boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        s.get()
    s.close()


def test_ray_sampler_checks_collect_arguments_before_starting():
    with pytest.raises(TypeError, match="RaySampler: bad arguments for collect"):
        R.RaySampler(torch.nn.Linear(1, 1), 1, 2, ArithmeticTask(1, seed=0), seed=0, prompts=4)


def test_ray_sampler_draws_what_collect_draws(warm_model):
    ray = pytest.importorskip("ray", reason="the Ray backend needs the ray extra")
    try:
        s = R.RaySampler(warm_model, 0, 1, ArithmeticTask(1, seed=2), seed=7, dtype=torch.bfloat16, **KW)
        got, used = s.get()
        s.close()
    finally:
        ray.shutdown()
    want = collect(warm_model, TOK, ArithmeticTask(1, seed=2), generator=torch.Generator().manual_seed(7),
                   dtype=torch.bfloat16, **KW)
    assert used == 0
    _same(got, want)


def test_tasks_lm_is_the_same_code():
    import poise.tasks.lm as lm

    for name in lm.__all__:
        assert getattr(lm, name) is getattr(R, name)

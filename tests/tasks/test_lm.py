import torch

from poise.tasks.gpt import GPT, GPTConfig
from poise.tasks.lm import completion_batch, generate, sft_warmup, trainer_logprobs
from poise.tasks.reasoning import ArithmeticTask
from poise.tasks.text import CharTokenizer

TOK = CharTokenizer()


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=32))


def test_sampler_logprobs_equal_trainer_logprobs_in_float32():
    model = _model()
    task = ArithmeticTask(level=1, seed=0)
    g = torch.Generator().manual_seed(0)
    rollouts = generate(model, TOK, task.sample(5), group_size=3, max_new_tokens=6, generator=g)
    assert len(rollouts) == 15 and [r.group for r in rollouts] == [i for i in range(5) for _ in range(3)]
    sampler, mask = completion_batch(rollouts)
    trainer = trainer_logprobs(model, rollouts)
    torch.testing.assert_close(trainer * mask, sampler * mask, atol=1e-5, rtol=1e-5)
    assert trainer.requires_grad


def test_bfloat16_sampling_creates_a_mismatch():
    model = _model()
    task = ArithmeticTask(level=2, seed=0)
    g = torch.Generator().manual_seed(0)
    rollouts = generate(model, TOK, task.sample(6), group_size=4, max_new_tokens=6, generator=g,
                        dtype=torch.bfloat16)
    sampler, mask = completion_batch(rollouts)
    diff = ((trainer_logprobs(model, rollouts).detach() - sampler) * mask).abs().max()
    assert 1e-4 < float(diff) < 1.0


def test_sft_warmup_learns_to_answer():
    model = _model()
    task = ArithmeticTask(level=1, seed=0)
    losses = sft_warmup(model, TOK, task, steps=150, batch_size=32, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    g = torch.Generator().manual_seed(1)
    rollouts = generate(model, TOK, task.sample(20), group_size=2, max_new_tokens=4, generator=g, temperature=0.5)
    acc = sum(task.reward(r.problem, r.text) for r in rollouts) / len(rollouts)
    assert acc > 0.05  # non-zero reward: RL has something to start from

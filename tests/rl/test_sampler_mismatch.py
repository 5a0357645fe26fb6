"""The sampler's controlled mismatch: weight-only quantisation of the sampler (poise.rl.rollout)
and its config in the RL study (train.sampler_bits)."""

import pytest
import torch

from poise.models import build_lm
from poise.rl import completion_batch, generate, trainer_logprobs
from poise.rl.rollout import collect, quantise_weights, quantised_copy
from poise.runs.config import ConfigError, load_recipe
from poise.runs.kinds.rl import late_accuracy
from poise.tasks.reasoning import ArithmeticTask
from poise.tasks.text import CharTokenizer


def test_quantise_weights_by_hand():
    w = torch.tensor([[1.0, 0.4, -0.2], [0.0, 0.0, 0.0], [-3.0, 1.4, 0.6]])
    # 2 bits: Q = 1, scale = row absmax; 3 bits: Q = 3, scale = absmax / 3
    torch.testing.assert_close(quantise_weights(w, 2), torch.tensor([[1.0, 0.0, 0.0], [0, 0, 0], [-3.0, 0.0, 0.0]]))
    torch.testing.assert_close(quantise_weights(w, 3), torch.tensor([[1.0, 1 / 3, -1 / 3], [0, 0, 0],
                                                                    [-3.0, 1.0, 1.0]]))
    b = torch.tensor([0.123, -4.5])
    assert quantise_weights(b, 2) is b  # 1-D tensors (biases, norms) stay as they are


@pytest.mark.parametrize("bits", [1, 17, 4.0, True])
def test_bad_bits_are_refused(bits):
    with pytest.raises(ValueError, match=rf"bits={bits!r}: an integer from 2 to 16"):
        quantise_weights(torch.ones(2, 2), bits)


def _policy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_lm("gpt", vocab_size=CharTokenizer().vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=24)


def test_quantised_copy_leaves_the_trainer_alone():
    model = _policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantised_copy(model, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in q.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(before[k].dim() >= 2 for k in changed)
    for v in q.state_dict().values():  # 4 bits: levels -7..7, so at most 8 distinct magnitudes per row
        if v.dim() == 2:
            assert max(len(row.abs().unique()) for row in v) <= 8


def _mismatch(bits: int | None) -> float:
    model, tok = _policy(), CharTokenizer()
    problems = ArithmeticTask(1, seed=0).sample(16)
    rs = generate(model, tok, problems, group_size=4, max_new_tokens=4, generator=torch.Generator().manual_seed(0),
                  weight_bits=bits)
    behav, mask = completion_batch(rs)
    with torch.no_grad():
        tr = trainer_logprobs(model, rs)
    return float(((tr - behav).abs() * mask).sum() / mask.sum())


def test_the_mismatch_grows_as_the_sampler_loses_bits():
    exact, b8, b4, b3 = _mismatch(None), _mismatch(8), _mismatch(4), _mismatch(3)
    assert exact < 1e-5  # same weights, same precision: the sampler is the trainer
    assert 0 < b8 < b4 < b3


def test_collect_samples_from_the_quantised_copy():
    model, tok = _policy(), CharTokenizer()
    kw = dict(num_prompts=4, group_size=4, max_new_tokens=4)
    c = collect(model, tok, ArithmeticTask(1, seed=0), generator=torch.Generator().manual_seed(0), weight_bits=3, **kw)
    q = quantised_copy(model, 3)
    with torch.no_grad():
        by_sampler = trainer_logprobs(q, c.rollouts)
        by_trainer = trainer_logprobs(model, c.rollouts)
    behav, mask = completion_batch(c.rollouts)
    torch.testing.assert_close(behav * mask, by_sampler * mask, atol=1e-5, rtol=0)  # mu is the quantised policy
    assert float(((by_trainer - behav).abs() * mask).sum()) > 0.01


def test_recipe_sampler_bits():
    cfg = load_recipe("rl-stability")
    assert cfg.train.sampler_bits == 3 and cfg.train.eval_pass1_samples > 0
    for bad in ("1", "17"):
        with pytest.raises(ConfigError, match=rf"train.sampler_bits={bad}: 0 \(the trainer's weights\) or an integer"):
            load_recipe("rl-stability", [f"train.sampler_bits={bad}"])
    assert load_recipe("rl-stability", ["train.sampler_bits=0"]).train.sampler_bits == 0


def test_late_accuracy_is_the_mean_of_the_second_half():
    assert late_accuracy([0, 10, 20, 30, 40], [0.5, 0.6, 0.7, 0.8, 0.9], 40) == pytest.approx(0.8)
    assert late_accuracy([0, 10, 20, 30], [0.5, 0.6, 0.7, 0.8], 30) == pytest.approx(0.75)  # steps 20 and 30
    assert late_accuracy([0], [0.25], 10) == 0.25  # no evaluation after the start: the last one

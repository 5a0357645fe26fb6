"""FP16 against BF16 sampling (arXiv 2510.26788): precision names and the mismatch they make."""

import pytest
import torch

from poise.models import GPT, GPTConfig
from poise.rl import PRECISIONS, engine_dtypes, generate, trainer_logprobs, unit_roundoff
from poise.rl.precision import autocast
from poise.tasks.reasoning import ArithmeticTask
from poise.tasks.text import CharTokenizer


def test_names_and_roundoff():
    assert list(PRECISIONS) == ["float32", "bfloat16", "float16"]
    assert engine_dtypes("float16", "bfloat16") == (torch.float16, torch.bfloat16)
    assert engine_dtypes("float32", "float32") == (None, None)
    assert unit_roundoff("bfloat16") == 2.0**-8 and unit_roundoff("float16") == 2.0**-11
    with pytest.raises(ValueError, match="sampler='fp8'; valid choices: float32, bfloat16, float16"):
        engine_dtypes("fp8")


def test_fp16_sampling_mismatch_is_smaller_than_bf16():
    """The paper's mechanism: the same weights, a 16-bit sampler against a float32 trainer; FP16's
    3 extra significand bits shrink |log pi - log mu| several-fold (8x in the rounding unit)."""
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=32)).float()
    problems = ArithmeticTask(seed=0).sample(8)
    sizes = {}
    for name in ("bfloat16", "float16", "float32"):
        g = torch.Generator().manual_seed(0)
        ro = generate(model, tok, problems, group_size=4, max_new_tokens=4, generator=g, dtype=PRECISIONS[name])
        with torch.no_grad(), autocast(None):
            tr = trainer_logprobs(model, ro)
        n = sum(len(r.completion_ids) for r in ro)
        sizes[name] = sum(float((tr[i, : len(r.sampler_logp)] - r.sampler_logp).abs().sum())
                          for i, r in enumerate(ro)) / n
    assert sizes["float32"] < 1e-5
    assert sizes["float16"] * 3 < sizes["bfloat16"], sizes

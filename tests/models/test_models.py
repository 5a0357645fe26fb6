"""poise.models: one home for the models, the old paths re-export the same objects, and the LM
builders give the workbench's models exactly (same config, same seeded weights)."""

import sys

import pytest
import torch

from poise import _registry
from poise.models import CNN, GPT, MLP, GPTConfig, build_causal_lm, build_lm, build_model


def test_old_paths_and_registry_are_the_same_objects():
    import poise.tasks
    import poise.tasks.gpt
    import poise.tasks.models

    assert poise.tasks.gpt.GPT is GPT and poise.tasks.gpt.GPTConfig is GPTConfig
    assert poise.tasks.models.MLP is MLP and poise.tasks.models.CNN is CNN
    assert poise.tasks.build_model is build_model is poise.tasks.models.build_model
    assert _registry.get("model", "mlp") is MLP and _registry.get("model", "cnn") is CNN
    m = build_model("cnn", 64, 10, hidden=32)
    assert isinstance(m, CNN) and m(torch.zeros(2, 64)).shape == (2, 10)


def test_build_lm_gpt_equals_the_config_built_gpt():
    torch.manual_seed(3)
    a = build_lm("gpt", vocab_size=13, n_layer=2, n_head=2, n_embd=16, block_size=12)
    torch.manual_seed(3)
    b = GPT(GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=16))
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ValueError, match="unknown arch 'gpt2'; valid choices: gpt, llama, qwen2"):
        build_lm("gpt2", 10, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown arch 'gpt'; valid choices: llama, qwen2"):
        build_causal_lm("gpt", 10, 1, 1, 8, 8)


def test_missing_transformers_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ImportError, match=r"needs transformers: pip install 'poise\[hf\]'"):
        build_lm("llama", 10, 1, 2, 8, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_causal_lm_config_and_seeded_weights(arch):
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    torch.manual_seed(0)
    model = build_causal_lm(arch, vocab_size=21, n_layer=2, n_head=2, n_embd=16, block_size=24)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (21, 16, 64, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (2, 2, 24)
    assert c.pad_token_id is None and c.bos_token_id is None and c.eos_token_id is None
    # the workbench's build_policy made these with exactly this config: same seed, same weights
    kw = dict(vocab_size=21, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=24, pad_token_id=None, bos_token_id=None,
              eos_token_id=None)
    cls, cfg = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    torch.manual_seed(0)
    ref = cls(cfg(**kw))
    assert type(model) is type(ref)
    sa, sb = model.state_dict(), ref.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert build_lm(arch, 21, 2, 2, 16, 24).config.to_dict() == c.to_dict()

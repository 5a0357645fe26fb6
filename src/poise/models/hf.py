"""Hugging Face causal LMs built from a config (random weights, no download).

``transformers`` is imported only when a model is built; without it the call raises
``ImportError`` with the install hint.
"""

from __future__ import annotations

from torch import nn

__all__ = ["HF_ARCHS", "build_causal_lm"]

HF_ARCHS = ("llama", "qwen2")


def build_causal_lm(arch: str, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                    block_size: int) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (``arch="llama"``) or ``Qwen2ForCausalLM``
    (``arch="qwen2"``): ``hidden_size = n_embd``, ``intermediate_size = 4 n_embd``,
    ``n_layer`` layers, ``n_head`` attention heads and as many key/value heads (no GQA),
    ``max_position_embeddings = block_size``, no special token ids (the workbench's in-memory
    tokenizers have none). Initialised from torch's global RNG, so a seed set before the call
    fixes the weights."""
    if arch not in HF_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(HF_ARCHS)}")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"build_causal_lm(arch={arch!r}) needs transformers: pip install 'poise[hf]'") from e
    kw = dict(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=4 * n_embd,
              num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
              max_position_embeddings=block_size, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))

"""One entry point for the causal LMs the workbench trains: poise's own GPT or a Hugging Face
Llama / Qwen2 built from the same five numbers."""

from __future__ import annotations

from torch import nn

from poise.models.gpt import GPT, GPTConfig
from poise.models.hf import HF_ARCHS, build_causal_lm

__all__ = ["LM_ARCHS", "build_lm"]

LM_ARCHS = ("gpt", *HF_ARCHS)


def build_lm(arch: str, vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int) -> nn.Module:
    """``arch="gpt"``: :class:`~poise.models.gpt.GPT` with these sizes (``mlp_ratio`` 4);
    ``"llama"`` / ``"qwen2"``: :func:`~poise.models.hf.build_causal_lm` (needs transformers).
    Any other name raises ``ValueError`` listing the choices."""
    if arch == "gpt":
        return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                             n_embd=n_embd))
    if arch not in HF_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(LM_ARCHS)}")
    return build_causal_lm(arch, vocab_size, n_layer, n_head, n_embd, block_size)

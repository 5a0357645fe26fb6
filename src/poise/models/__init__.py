"""Models built from a config: tiny classifiers (registered as kind ``model``), poise's GPT,
and Hugging Face causal LMs (transformers imported lazily)."""

from poise.models.classifiers import CNN, MLP, build_model
from poise.models.gpt import GPT, GPTConfig
from poise.models.hf import build_causal_lm
from poise.models.lm import build_lm

__all__ = ["CNN", "GPT", "MLP", "GPTConfig", "build_causal_lm", "build_lm", "build_model"]

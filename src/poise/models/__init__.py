"""Models built from a config: tiny classifiers (registered as kind ``model``), poise's GPT,
Hugging Face causal LMs (transformers imported lazily), and fake quantisation of linear
layers for low-precision training studies."""

from poise.models.classifiers import CNN, MLP, build_model
from poise.models.gpt import GPT, GPTConfig
from poise.models.hf import build_causal_lm
from poise.models.lm import build_lm
from poise.models.quant import (
                                QUANT_PRESETS,
                                FakeQuantLinear,
                                QuantSpec,
                                fake_quantize,
                                fake_quantize_linears,
                                quant_spec,
                                quantize_dequantize,
)

__all__ = ["CNN", "GPT", "MLP", "QUANT_PRESETS", "FakeQuantLinear", "GPTConfig", "QuantSpec", "build_causal_lm",
           "build_lm", "build_model", "fake_quantize", "fake_quantize_linears", "quant_spec", "quantize_dequantize"]

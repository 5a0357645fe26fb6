"""Moved to :mod:`poise.models.gpt`; this path re-exports it."""

from poise.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]

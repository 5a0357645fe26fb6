"""Moved to :mod:`poise.models.classifiers`; this path re-exports it."""

from poise.models.classifiers import CNN, MLP, build_model

__all__ = ["CNN", "MLP", "build_model"]

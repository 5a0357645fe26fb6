"""The workbench: typed study configs, run directories, reports. Names load lazily, so
``import poise.runs`` (and ``poise --help``) does not import torch."""

import importlib
from typing import Any

__all__ = ["ConfigError", "JsonlWriter", "StudyConfig", "atomic_write_json", "load_recipe",
           "read_jsonl", "recipe_names", "run_study"]

_HOME = {"ConfigError": "poise.runs.config", "StudyConfig": "poise.runs.config", "load_recipe": "poise.runs.config",
         "recipe_names": "poise.runs.config", "JsonlWriter": "poise.runs.store",
         "atomic_write_json": "poise.runs.store", "read_jsonl": "poise.runs.store",
         "run_study": "poise.runs.kinds.continual"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

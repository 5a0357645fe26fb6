"""The workbench: typed study configs, run directories, reports."""

from poise.runs.config import ConfigError, StudyConfig, load_recipe, recipe_names
from poise.runs.store import JsonlWriter, atomic_write_json, read_jsonl
from poise.runs.study import run_study

__all__ = ["ConfigError", "JsonlWriter", "StudyConfig", "atomic_write_json", "load_recipe",
           "read_jsonl", "recipe_names", "run_study"]

"""What a study kind declares: the one interface between a kind and the workbench.

The workbench (config loading, ``poise run``, ``poise report``, ``poise run --help``) never
names a kind; it asks :func:`poise.runs.kinds.get_kind` for the :class:`StudyKind` of a
recipe's ``kind`` and calls these fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["StudyKind"]


@dataclass(frozen=True)
class StudyKind:
    """A study kind: its config schema, how one run goes, and how results are shown.

    * ``Config``: the recipe's dataclass (typed fields with ``help`` metadata; a ``kind`` field).
    * ``validate(cfg) -> cfg``: range and registry checks; raises ``ConfigError`` naming the key.
    * ``variant_key``: the variant field that names a variant when ``name`` is empty
      (``strategy``, ``optimizer``, ``loss``, ``editor``, ``name``).
    * ``steps_per_run(cfg)``: progress-bar units per run; ``describe(cfg)``: one line for the log.
    * ``run_one(cfg, variant_index, seed, metrics_path, progress) -> result dict`` (JSON-able).
    * ``summarize(results, config_dict) -> {variant: {metric: stats}}``.
    * ``tables(config_dict, results)`` / ``plots(run_dir, config_dict, results)``: the report.
    * ``columns``: ``(summary key, heading)`` pairs that ``poise run`` prints; every key must be
      in ``summarize``'s rows (a test checks it).
    * ``quick``: the overrides of ``poise run --quick``; ``example``: a built-in recipe of this kind.
    * ``resolve(cfg)``: what the config resolves to that the recipe does not spell out (which
      optimizer class, which parameters were projected); written to ``config.json`` under
      ``"resolved"`` (derived, never read back as input).
    * ``resumable``: ``run_one`` resumes from its own checkpoints (``poise run --resume``).
    * ``large``: a study with more progress steps than this (over all variants and seeds) runs only with
      ``poise run --allow-large`` (``run(..., allow_large=True)``): a typo such as ``steps=10**9`` is caught
      before hours of work.
    """

    name: str
    Config: type
    example: str
    variant_key: str
    validate: Callable[[Any], Any]
    steps_per_run: Callable[[Any], int]
    describe: Callable[[Any], str]
    run_one: Callable[..., dict[str, Any]]
    summarize: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]]
    tables: Callable[[dict[str, Any], list[dict[str, Any]]], list[dict[str, Any]]]
    plots: Callable[[Path, dict[str, Any], list[dict[str, Any]]], list[tuple[str, Path]]]
    columns: tuple[tuple[str, str], ...]
    quick: tuple[str, ...] = ()
    resumable: bool = False
    large: int = 250_000
    resolve: Callable[[Any], dict[str, Any]] | None = None

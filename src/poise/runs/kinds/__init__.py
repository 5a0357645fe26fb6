"""Study kinds as plugins: the ONE list of kinds.

A kind is a module that ends with ``KIND = StudyKind(...)`` (see
:class:`~poise.runs.kinds._protocol.StudyKind`). Adding a kind is one new module here and one
line in :data:`KINDS`. Modules are imported only when their kind is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from poise.runs.kinds._protocol import StudyKind

__all__ = ["KINDS", "StudyKind", "get_kind", "kind_names", "kind_of"]

KINDS: dict[str, str] = {
    "continual": "poise.runs.kinds.continual",
    "optimizers": "poise.runs.kinds.optimizers",
    "rl": "poise.runs.kinds.rl",
    "edit": "poise.runs.kinds.edit",
    "priming": "poise.runs.kinds.priming",
    "unlearn": "poise.runs.kinds.unlearn",
    "federated": "poise.runs.kinds.federated",
}
DEFAULT_KIND = "continual"


def kind_names() -> list[str]:
    return list(KINDS)


def get_kind(name: Any) -> StudyKind:
    """The :class:`StudyKind` called ``name``; an unknown name raises ``ConfigError`` listing the kinds."""
    if not isinstance(name, str) or name not in KINDS:
        from poise.runs.config import ConfigError

        raise ConfigError(f"kind: unknown study kind {name!r}; valid choices: {', '.join(KINDS)}")
    return importlib.import_module(KINDS[name]).KIND


def kind_of(cfg: Any) -> StudyKind:
    """The kind of a config object or of a config dict (``kind`` missing: continual)."""
    name = cfg.get("kind", DEFAULT_KIND) if isinstance(cfg, dict) else getattr(cfg, "kind", DEFAULT_KIND)
    return get_kind(name)

"""A registry by stable name, for configs and the CLI.

``register("strategy", "replay")(Replay)`` stores an object under a kind and a name;
``get("strategy", "replay")`` returns it; an unknown name raises :class:`UnknownNameError`
that lists the valid choices. ``names(kind)`` lists what is registered, sorted.

Each kind has one home module (:data:`HOMES`) whose import registers its built-ins; ``get`` and
``names`` import only the home of the kind asked for. A name with a colon, ``"pkg.mod:Attr"``,
is imported as a path instead of looked up, so a user's own class works wherever a name does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_REGISTRY: dict[str, dict[str, Any]] = {}


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: register ``obj`` under ``kind``/``name``. Registering a name twice raises."""

    def deco(obj: T) -> T:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return deco


HOMES: dict[str, str] = {
    "optimizer": "poise.optim",
    "strategy": "poise.continual",
    "loss": "poise.rl",  # the package: its __init__ imports every module that registers a loss
    "advantage": "poise.rl",
    "metric": "poise.measure",
    "stream": "poise.tasks",  # digits, fscil and drift streams
    "model": "poise.models",
    "rl_task": "poise.tasks.paraphrase",  # imports poise.tasks.reasoning: both register
    "editor": "poise.edit.editors",
}


def _import_path(kind: str, path: str) -> Any:
    import importlib

    mod, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UnknownNameError(f"{kind} {path!r}: cannot import it ({e})") from None
    return obj


def get(kind: str, name: str) -> Any:
    """Return the object registered as ``kind``/``name`` (or imported from ``"pkg.mod:Attr"``),
    or raise listing the choices."""
    if isinstance(name, str) and ":" in name:
        return _import_path(kind, name)
    _load(kind)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        choices = ", ".join(sorted(table)) or "(none)"
        raise UnknownNameError(f"unknown {kind} {name!r}; valid choices: {choices}")
    return table[name]


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    _load(kind)
    return sorted(_REGISTRY.get(kind, {}))


def kinds() -> list[str]:
    for kind in HOMES:
        _load(kind)
    return sorted(_REGISTRY)


def _load(kind: str) -> None:
    """Import ``kind``'s home module: its import runs the built-ins' ``@register`` decorators."""
    if kind in HOMES:
        import importlib

        importlib.import_module(HOMES[kind])

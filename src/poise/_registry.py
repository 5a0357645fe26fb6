"""A registry by stable name, for configs and the CLI.

``register("strategy", "replay")(Replay)`` stores an object under a kind and a name;
``get("strategy", "replay")`` returns it; an unknown name raises :class:`UnknownNameError`
that lists the valid choices. ``names(kind)`` lists what is registered, sorted.
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


def get(kind: str, name: str) -> Any:
    """Return the object registered as ``kind``/``name``, or raise listing the choices."""
    _load_builtins()
    table = _REGISTRY.get(kind, {})
    if name not in table:
        choices = ", ".join(sorted(table)) or "(none)"
        raise UnknownNameError(f"unknown {kind} {name!r}; valid choices: {choices}")
    return table[name]


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    _load_builtins()
    return sorted(_REGISTRY.get(kind, {}))


def kinds() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # Importing the subpackages runs their @register decorators.
    from poise import continual, measure, optim, rl, tasks  # noqa: F401
    from poise.tasks import reasoning  # noqa: F401

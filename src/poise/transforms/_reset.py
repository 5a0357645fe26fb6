"""Periodic reset of a stateful transform (SPAM / Stable-SPAM momentum reset)."""

from __future__ import annotations

from torch import Tensor

from poise.transforms._base import SHARED, Hyper, State, Transform, Updates

__all__ = ["periodic_reset"]

SEMANTICS = ("official", "clean")


def periodic_reset(inner: Transform, semantics: str = "official") -> Transform:
    r"""Reset ``inner``'s state every ``hyper["update_proj_gap"]`` steps of the shared clock
    (Stable-SPAM's momentum reset, arXiv 2502.17055; the interval's name is the authors').

    At a reset step the shared ``step`` is set back to 1 and ``inner``'s state is dropped
    (``scale_by_adam`` recreates zero moments):

    * ``"official"`` (default; replays TianjinYellow/StableSPAM): the reset step still uses
      the *old* moments, now bias-corrected as step 1; they are zeroed after it;
    * ``"clean"``: the moments are zeroed first, so the reset step starts a fresh Adam.

    ``update_proj_gap = 0`` disables resets. Records ``reset`` (1.0 on reset steps).
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}; valid choices: {', '.join(SEMANTICS)}")

    def clear(s: State) -> None:
        for k in [k for k in s if k not in SHARED]:
            del s[k]

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        gap = hyper.get("update_proj_gap", 0)
        due = [u is not None and bool(gap) and int(s["clock"]) % gap == 0
               for u, s in zip(updates, states, strict=True)]
        for d, s in zip(due, states, strict=True):
            if d:
                s["step"].fill_(1)
                if semantics == "clean":
                    clear(s)
        out = inner.update(updates, states, params, hyper)
        if semantics == "official":
            for d, s in zip(due, states, strict=True):
                if d:
                    clear(s)
        return out

    return Transform(inner.init, update, inner.name, inner.shard_safe)


"""Periodic reset of a stateful transform (SPAM / Stable-SPAM momentum reset)."""

from __future__ import annotations

import torch
from torch import Tensor

from poise.transforms._base import SHARED, Hyper, State, Transform, Updates, compiling, declare, merge_reads

__all__ = ["periodic_reset"]

SEMANTICS = ("official", "clean")


def periodic_reset(inner: Transform, semantics: str = "official", key: str = "update_proj_gap") -> Transform:
    r"""Reset ``inner``'s state every ``hyper[key]`` steps of the shared clock (Stable-SPAM's
    momentum reset, arXiv 2502.17055). ``key`` defaults to the authors' name,
    ``update_proj_gap``, which GaLore uses for its projector refresh: to compose the two, give
    the reset its own key (``periodic_reset(inner, key="reset_gap")``), otherwise :func:`chain`
    refuses the pair.

    At a reset step the shared ``step`` is set back to 1 and ``inner``'s state is dropped
    (``scale_by_adam`` recreates zero moments):

    * ``"official"`` (default; replays TianjinYellow/StableSPAM): the reset step still uses
      the *old* moments, now bias-corrected as step 1; they are zeroed after it;
    * ``"clean"``: the moments are zeroed first, so the reset step starts a fresh Adam.

    An interval of 0 (the default) disables resets.

    Under torch.compile the due test is a 0-d tensor (``clock % gap == 0``) and the reset zeroes
    ``inner``'s tensors in place instead of dropping them: the same values for stages that
    recreate zero state on first use (``scale_by_adam``, ``fused_adamw``), with no graph break.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}; valid choices: {', '.join(SEMANTICS)}")

    def clear(s: State) -> None:
        for k in [k for k in s if k not in SHARED]:
            del s[k]

    def zero_where(due: Tensor, s: State) -> None:
        for k in [k for k in s if k not in SHARED]:
            if isinstance(s[k], Tensor):
                s[k].masked_fill_(due, 0)

    def update_compiled(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper,
                        gap: int) -> Updates:
        due = [None if u is None else torch.remainder(s["clock"], gap) == 0 for u, s in zip(updates, states,
                                                                                           strict=True)]
        for d, s in zip(due, states, strict=True):
            if d is not None:
                s["step"].masked_fill_(d, 1)
                if semantics == "clean":
                    zero_where(d, s)
        out = inner.update(updates, states, params, hyper)
        if semantics == "official":
            for d, s in zip(due, states, strict=True):
                if d is not None:
                    zero_where(d, s)
        return out

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        gap = hyper.get(key, 0)
        if gap and compiling():
            return update_compiled(updates, states, params, hyper, gap)
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

    reads = merge_reads(inner.reads, declare("periodic_reset", **{key: (0, "momentum-reset interval")}))
    return Transform(inner.init, update, inner.name, inner.shard_safe, reads)


"""Gradient transforms as ``(init, update)`` pairs, composed with :func:`chain`.

The optax design, in PyTorch. A transform works on one parameter group at a time:

* ``init(param, hyper) -> dict[str, Tensor]``: the initial state of one parameter;
* ``update(updates, states, params, hyper) -> updates``: turn the incoming updates (the
  gradients, for the first transform) into outgoing ones. ``states[i]`` is parameter ``i``'s
  state mapping, whose tensors are updated **in place** (the torch.optim way: no copies of
  the state each step). An entry ``None`` in ``updates`` means "no update for this
  parameter this step" and every later transform passes it through.

A transform may modify the updates it receives **in place** (that is what makes a chain
cheap: no temporaries per stage). The optimizer hands the first transform ``p.grad``
itself, as torch's fused kernels and the authors' Stable-SPAM do, so after ``step()`` a
parameter's ``.grad`` holds whatever the first in-place stage made of it (clipped, scaled);
read gradients before ``step()``.

``hyper`` is the parameter group's dict (``lr``, ``betas``, ...): hyperparameters are read
from it at every step, never cached, so LR schedulers and per-group settings work. The
final updates are *added* to the parameters (they already carry ``-lr``).

A few state entries are shared by every transform of a parameter (0-d float32 tensors):

* ``"step"``: the bias-correction step, incremented by the caller before ``update``
  (:class:`poise.optim.TransformOptimizer`, or :func:`apply_updates`); a transform may set
  it back (Stable-SPAM's momentum reset does);
* ``"clock"``: the steps this parameter has taken, incremented with ``step``, never reset;
* ``"momentum_scale"`` (optional): a factor on first-moment EMA rates, written by a
  schedule (Stable-SPAM's cosine schedule), read by the transforms that keep such EMAs.

All other keys are namespaced by :func:`chain` with the transform's name
(``"adam.exp_avg"``), so state dicts are readable and transforms never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Hyper", "State", "Transform", "Updates", "apply_updates", "chain", "identity", "init_state", "scoped", "tick",
]

State = MutableMapping[str, Any]
Hyper = dict[str, Any]
Updates = list[Tensor | None]
SHARED = frozenset({"step", "clock", "momentum_scale"})


class Transform(NamedTuple):
    """A gradient transformation: a pair of functions, plus a name that prefixes its state.

    ``shard_safe``: the update of a slice of a tensor is the slice of the tensor's update
    (every operation is elementwise, or uses only scalars shared by all entries such as the
    step), so it may run on FSDP2's local shards as is. False (the default) for anything
    that reads a whole tensor: norms, maxima, top-k, projections, preconditioners."""

    init: Callable[[Tensor, Hyper], dict[str, Any]]
    update: Callable[[Updates, list[State], list[Tensor], Hyper], Updates]
    name: str = "transform"
    shard_safe: bool = False


class Scoped(MutableMapping[str, Any]):
    """A view of one parameter's state under a prefix; ``"step"`` is shared by all."""

    def __init__(self, root: MutableMapping[str, Any], prefix: str):
        self.root, self.prefix = root, prefix

    def _k(self, key: str) -> str:
        return key if key in SHARED else self.prefix + key

    def __getitem__(self, key: str) -> Any:
        return self.root[self._k(key)]

    def __setitem__(self, key: str, value: Any) -> None:
        self.root[self._k(key)] = value

    def __delitem__(self, key: str) -> None:
        del self.root[self._k(key)]

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        return (k[n:] for k in list(self.root) if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._k(key) in self.root


def scoped(states: Sequence[State], prefix: str) -> list[State]:
    return [Scoped(s, prefix) for s in states]


def identity() -> Transform:
    """Passes updates through unchanged."""
    return Transform(lambda p, h: {}, lambda u, s, p, h: u, "identity", True)


def chain(*transforms: Transform, name: str = "chain") -> Transform:
    """Apply ``transforms`` in order. Each one's state lives under ``"<its name>."``; a name
    used twice gets its position appended (``"clip.1."``)."""
    names: list[str] = []
    for t in transforms:
        n = t.name
        names.append(n if n not in names else f"{n}.{len(names)}")
    prefixes = [f"{n}." for n in names]

    def init(param: Tensor, hyper: Hyper) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t, pre in zip(transforms, prefixes, strict=True):
            for k, v in t.init(param, hyper).items():
                out[k if k in SHARED else pre + k] = v
        return out

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        for t, pre in zip(transforms, prefixes, strict=True):
            updates = t.update(updates, scoped(states, pre), params, hyper)
        return updates

    return Transform(init, update, name, all(t.shard_safe for t in transforms))


def init_state(transform: Transform, param: Tensor, hyper: Hyper) -> dict[str, Any]:
    """A parameter's full initial state: the transform's, plus the shared step counter."""
    state = transform.init(param, hyper)
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["clock"] = torch.zeros((), dtype=torch.float32)
    return state


def tick(states: list[State]) -> None:
    """Advance the shared ``step`` and ``clock`` counters of these parameters by one."""
    if states:
        torch._foreach_add_([s["step"] for s in states], 1.0)
        torch._foreach_add_([s["clock"] for s in states], 1.0)


@torch.no_grad()
def apply_updates(
    transform: Transform, params: Sequence[Tensor], grads: Sequence[Tensor | None],
    states: list[State] | None, hyper: Hyper,
) -> list[State]:
    """Functional use: one step of ``transform`` on ``params`` in place. ``states=None``
    initialises them; returns the states to pass next time."""
    if states is None:
        states = [init_state(transform, p, hyper) for p in params]
    live = [i for i, g in enumerate(grads) if g is not None]
    tick([states[i] for i in live])
    ps = [params[i] for i in live]
    ups = transform.update([grads[i] for i in live], [states[i] for i in live], ps, hyper)
    for p, u in zip(ps, ups, strict=True):
        if u is not None:
            p.add_(u.to(p.dtype))
    return states

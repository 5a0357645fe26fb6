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

**Under torch.compile.** Where a stage reads a state scalar as a Python number (``float(s["step"])``
for a bias correction, ``int(s["clock"]) % gap`` for a periodic reset, ``.tolist()`` to branch on a
spike), :func:`compiling` switches it to the same formula in 0-d tensor arithmetic with
``torch.where`` in place of the branch, as torch.optim does, so a compiled training step has no graph
break (eager runs keep the Python-number arithmetic the parity tests replay bit for bit).

All other keys are namespaced by :func:`chain` with the transform's name
(``"adam.exp_avg"``), so state dicts are readable and transforms never collide.

**Declared hyperparameters.** Every transform says which ``hyper`` keys it reads
(``Transform.reads``: key -> :class:`Read` with a default, or :data:`REQUIRED`, and a short
*meaning*). :func:`chain` merges the declarations and refuses two stages that read one key
with different meanings (GaLore's ``update_proj_gap`` is a projector refresh, Stable-SPAM's a
momentum reset), so composing them cannot silently tie two settings; give one stage its own
key with :func:`rename` (or the stage's ``key=`` argument). :class:`poise.optim.TransformOptimizer`
fills the declared defaults into every param group and raises at construction for a
required key that no group or default provides (:func:`missing_hyper`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "REQUIRED", "Hyper", "Read", "State", "Transform", "Updates", "apply_updates", "chain", "compiling", "declare",
    "fill_hyper", "identity", "init_state", "merge_reads", "missing_hyper", "rename", "scoped", "tick",
]

State = MutableMapping[str, Any]
Hyper = dict[str, Any]
Updates = list[Tensor | None]
SHARED = frozenset({"step", "clock", "momentum_scale"})


class _Required:
    """The default of a key that has none: the param group (or the optimizer's defaults) must set it."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:  # a singleton, so it survives copy/deepcopy/pickle as itself
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class Read(NamedTuple):
    """One hyperparameter a stage reads from the param group.

    ``default``: the value filled into a group that does not set the key (:data:`REQUIRED`: no
    default, the group or the optimizer's defaults must give it); ``meaning``: a short tag of
    what the value *is* (``"learning rate"``, ``"GaLore projector refresh interval"``); two
    stages may share a key only with equal meanings; ``stage``: the stage that declared it (for
    messages); ``when``: the key is read only in groups where this other key is set (not None),
    e.g. GaLore's ``update_proj_gap`` only where ``rank`` is; defaults are filled and required
    keys checked only there. A default of ``None`` means "absent is off" (GaLore's ``rank``):
    it is not written into groups, and the stage reads a missing key as ``None``."""

    default: Any = REQUIRED
    meaning: str = ""
    stage: str = ""
    when: str | None = None


_NO_READS: Mapping[str, Read] = MappingProxyType({})

# meanings read by several stages (one key may be shared only under one meaning)
LR = (REQUIRED, "learning rate")
BETAS = ((0.9, 0.999), "Adam moment EMA rates (beta1, beta2)")
EPS = (1e-8, "epsilon added to a denominator")
WEIGHT_DECAY = (0.0, "decoupled weight decay")
CORRECT_BIAS = (True, "Adam bias correction on/off")


class Transform(NamedTuple):
    """A gradient transformation: a pair of functions, plus a name that prefixes its state.

    ``shard_safe``: the update of a slice of a tensor is the slice of the tensor's update
    (every operation is elementwise, or uses only scalars shared by all entries such as the
    step), so it may run on FSDP2's local shards as is. False (the default) for anything
    that reads a whole tensor: norms, maxima, top-k, projections, preconditioners.

    ``reads``: the ``hyper`` keys the transform reads, each a :class:`Read` (default or
    :data:`REQUIRED`, meaning, declaring stage); build it with :func:`declare`."""

    init: Callable[[Tensor, Hyper], dict[str, Any]]
    update: Callable[[Updates, list[State], list[Tensor], Hyper], Updates]
    name: str = "transform"
    shard_safe: bool = False
    reads: Mapping[str, Read] = _NO_READS

    def __deepcopy__(self, memo: dict[int, Any]) -> Transform:
        """A transform holds no state (that lives in the states it is given): copies share it."""
        return self


def declare(stage: str, **keys: tuple[Any, str] | tuple[Any, str, str | None]) -> Mapping[str, Read]:
    """``reads`` for a stage: ``declare("clip_global_norm", max_norm=(REQUIRED, "global-norm bound"))``;
    each value is ``(default, meaning)`` or ``(default, meaning, when)``."""
    return MappingProxyType({k: Read(v[0], v[1], stage, v[2] if len(v) > 2 else None) for k, v in keys.items()})


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of several entries: not comparable as one truth value
        return False


def merge_reads(*reads: Mapping[str, Read]) -> Mapping[str, Read]:
    """One declaration from several stages' (in chain order). A key read by two stages must have
    the same meaning (else ``ValueError`` naming both stages, the key and how to alias it); its
    default is the one the stages give (one stage may leave it :data:`REQUIRED`; two different
    defaults are an error)."""
    out: dict[str, Read] = {}
    for r in reads:
        for key, new in r.items():
            old = out.get(key)
            if old is None:
                out[key] = new
                continue
            if old.meaning != new.meaning:
                also = (" or periodic_reset(inner, key='reset_gap')"
                        if "periodic_reset" in (old.stage, new.stage) else "")
                raise ValueError(
                    f"stages '{old.stage}' and '{new.stage}' both read hyper '{key}' with different meanings "
                    f"({old.meaning!r} vs {new.meaning!r}); alias one of them to its own key, e.g. "
                    f"rename(<the '{new.stage}' transform>, {key}='{new.stage}_{key}'){also}, and set that key "
                    f"in the param group")
            if old.when != new.when:
                out[key] = old._replace(when=None)  # read unconditionally by one of them
            if new.default is REQUIRED:
                continue
            if old.default is REQUIRED:
                out[key] = out[key]._replace(default=new.default)
            elif not _same(old.default, new.default):
                raise ValueError(
                    f"stages '{old.stage}' and '{new.stage}' both read hyper '{key}' ({old.meaning}) with different "
                    f"defaults ({old.default!r} vs {new.default!r}); set '{key}' in the optimizer's defaults")
    return MappingProxyType(out)


def missing_hyper(transform: Transform, group: Mapping[str, Any], defaults: Mapping[str, Any] = _NO_READS) -> list[str]:
    """Messages for the :data:`REQUIRED` keys of ``transform`` that neither ``group`` nor
    ``defaults`` sets (``[]``: nothing missing)."""
    out = []
    for key, r in transform.reads.items():
        if r.default is not REQUIRED or key in group or key in defaults:
            continue
        if r.when is not None and group.get(r.when, defaults.get(r.when)) is None:
            continue
        out.append(f"stage '{r.stage}' reads hyper '{key}': add it to defaults or the param group")
    return out


def fill_hyper(transform: Transform, group: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Set the declared defaults of ``transform`` that ``group`` lacks (in place; returns it).
    A key declared ``when=<other>`` is filled only where ``<other>`` is set; a ``None`` default
    is not written (the stage reads an absent key as ``None``)."""
    for key, r in transform.reads.items():
        if r.default is REQUIRED or r.default is None or key in group:
            continue
        if r.when is not None and group.get(r.when) is None:
            continue
        group[key] = r.default
    return group


class _Renamed(Mapping[str, Any]):
    """A view of a param group in which a stage's own key names map to the names it was given."""

    def __init__(self, root: Mapping[str, Any], names: Mapping[str, str]):
        self.root, self.names = root, names

    def __getitem__(self, key: str) -> Any:
        return self.root[self.names.get(key, key)]

    def __iter__(self) -> Iterator[str]:
        inverse = {v: k for k, v in self.names.items()}
        return (inverse.get(k, k) for k in self.root)

    def __len__(self) -> int:
        return len(self.root)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.names.get(key, key) in self.root


def rename(transform: Transform, **names: str) -> Transform:
    """``transform`` reading ``hyper[new]`` wherever it reads ``hyper[old]``, for ``old=new``
    pairs: the alias that lets two stages with a clashing key share one param group, e.g.
    ``rename(scale_by_classp(), threshold="gate_threshold")`` beside SPAM's ``threshold``.
    ``old`` must be a key the transform declares (else ``ValueError`` listing them); the
    state, name and declared defaults are kept."""
    unknown = [k for k in names if k not in transform.reads]
    if unknown:
        raise ValueError(f"rename: {transform.name!r} reads no hyper {unknown[0]!r}; "
                         f"valid: {', '.join(transform.reads) or '(none)'}")
    reads: dict[str, Read] = {}
    for key, r in transform.reads.items():
        new = names.get(key, key)
        if new in reads:
            raise ValueError(f"rename: {transform.name!r} would read hyper {new!r} twice")
        reads[new] = r._replace(when=names.get(r.when, r.when) if r.when else None)
    view = MappingProxyType(dict(names))

    def init(param: Tensor, hyper: Hyper) -> dict[str, Any]:
        return transform.init(param, _Renamed(hyper, view))  # type: ignore[arg-type]

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        return transform.update(updates, states, params, _Renamed(hyper, view))  # type: ignore[arg-type]

    return Transform(init, update, transform.name, transform.shard_safe, MappingProxyType(reads))


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


def compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller: stages then take their branch-free
    0-d-tensor path instead of reading state scalars as Python numbers (a host sync and a graph
    break each)."""
    return torch.compiler.is_compiling()


def state_roots(states: Sequence[State]) -> tuple[Sequence[MutableMapping[str, Any]], str]:
    """The mappings under these states and the key prefix they share, for a hot loop that reads
    them directly: ``roots[i][prefix + key]`` is ``states[i][key]`` for a non-shared key (shared
    keys, ``step`` and the like, are read at the roots unprefixed). States that are not all
    :class:`Scoped` views with one prefix are returned as they are, with prefix ``""``."""
    if states and all(type(s) is Scoped for s in states):
        pre = states[0].prefix  # type: ignore[union-attr]
        if all(s.prefix == pre for s in states):  # type: ignore[union-attr]
            return [s.root for s in states], pre  # type: ignore[union-attr]
    return states, ""


def scoped(states: Sequence[State], prefix: str) -> list[State]:
    return [Scoped(s, prefix) for s in states]


def identity() -> Transform:
    """Passes updates through unchanged."""
    return Transform(lambda p, h: {}, lambda u, s, p, h: u, "identity", True)


def chain(*transforms: Transform, name: str = "chain") -> Transform:
    """Apply ``transforms`` in order. Each one's state lives under ``"<its name>."``; a name
    used twice gets its position appended (``"clip.1."``). The chain reads what its stages
    read (:func:`merge_reads`): two stages reading one key with different meanings raise
    ``ValueError`` here, naming both and how to alias one (:func:`rename`)."""
    reads = merge_reads(*(t.reads for t in transforms))
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

    return Transform(init, update, name, all(t.shard_safe for t in transforms), reads)


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
    initialises them; returns the states to pass next time. ``hyper`` is completed with the
    transform's declared defaults (a copy; a missing required key raises ``ValueError``)."""
    missing = missing_hyper(transform, hyper)
    if missing:
        raise ValueError("; ".join(missing))
    hyper = fill_hyper(transform, dict(hyper))
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

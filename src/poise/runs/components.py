"""Component slots shared by every study kind: one way to name, check and build an optimizer.

An optimizer is named by

* a registered poise optimizer (``poise list optimizers``: ``adamw``, ``stable_spam``, ``soap``,
  ``galore_adamw``, ...),
* torch's short names ``sgd`` and ``adam`` (``torch.optim.SGD`` / ``torch.optim.Adam``), or
* an import path ``pkg.mod:Class`` (any ``torch.optim.Optimizer`` subclass, e.g.
  ``torch.optim:AdamW`` or ``pytorch_optimizer:Lion``).

Its arguments are checked against the class's signature before any training
(:func:`check_kwargs`). Parameter-group keys are declared by the class (``group_keys``, e.g.
GaLore's ``rank``): when a spec sets any of them, the model's parameters are split into
projected and plain groups by :func:`poise.optim.low_rank_groups`, and the optimizer itself
refuses to run with no projected group.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TORCH_SHORT_NAMES", "OptimizerSpec", "build_optimizer", "check_kwargs", "describe_optimizer",
           "optimizer_class", "optimizer_names"]

TORCH_SHORT_NAMES = {"sgd": "torch.optim:SGD", "adam": "torch.optim:Adam"}
# arguments a recipe never sets: the parameters, and poise's per-step diagnostics switch (set by the study)
_NOT_FROM_RECIPE = ("self", "params", "diagnostics")


def _error(msg: str) -> Exception:
    from poise.runs.config import ConfigError

    return ConfigError(msg)


@dataclass
class OptimizerSpec:
    """An optimizer by name and its keyword arguments (constructor arguments and, for classes
    that declare ``group_keys``, the keys of the projected parameter group)."""

    name: str = "adamw"
    params: dict[str, Any] = field(default_factory=dict)


def optimizer_names() -> list[str]:
    """Every short name an optimizer slot accepts (an import path ``pkg.mod:Class`` is accepted too)."""
    from poise import _registry

    return sorted({*_registry.names("optimizer"), *TORCH_SHORT_NAMES})


def optimizer_class(name: str, key: str = "optimizer") -> type:
    """The class behind ``name``; an unknown name raises ``ConfigError`` naming ``key`` and the choices."""
    from poise import _registry

    if not isinstance(name, str) or not name:
        raise _error(f"{key}: expected an optimizer name, got {name!r}")
    if name in _registry.names("optimizer"):
        return _registry.get("optimizer", name)
    path = TORCH_SHORT_NAMES.get(name, name)
    if ":" not in path:
        raise _error(f"{key}: unknown optimizer {name!r}; valid choices: {', '.join(optimizer_names())} "
                     "(or an import path 'pkg.mod:Class')")
    try:
        obj: Any = _registry.get("optimizer", path)  # a "pkg.mod:Class" path is imported by the registry
    except _registry.UnknownNameError as e:
        raise _error(f"{key}: {e}") from None
    import torch

    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise _error(f"{key}: {path!r} is not a torch.optim.Optimizer subclass")
    return obj


def group_keys(cls: type) -> dict[str, Any]:
    """The parameter-group keys ``cls`` declares (``{}`` for an optimizer without projected groups)."""
    return dict(getattr(cls, "group_keys", None) or {})


def accepted_kwargs(fn: Callable[..., Any], skip: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    """The keyword arguments ``fn`` accepts, in order (``self``/``params`` and ``skip`` left out)."""
    sig = inspect.signature(fn)
    return {k: p for k, p in sig.parameters.items()
            if k not in _NOT_FROM_RECIPE and k not in skip
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def check_kwargs(fn: Callable[..., Any], params: dict[str, Any], key: str, what: str,
                 skip: Iterable[str] = (), extra: Iterable[str] = ()) -> None:
    """Raise ``ConfigError`` naming ``key.params.<name>`` for any entry of ``params`` that ``fn``
    does not take (``extra``: further accepted names, e.g. declared group keys)."""
    allowed = [*accepted_kwargs(fn, skip), *extra]
    for p in params:
        if p not in allowed:
            raise _error(f"{key}.{p}: unknown argument of {what}; valid: {', '.join(allowed) or '(none)'}")


def build_optimizer(spec: OptimizerSpec, model: Any, name_key: str = "optimizer", params_key: str = "params",
                    diagnostics: bool = False, **study: Any) -> Any:
    """The optimizer of ``spec`` over ``model``'s trainable parameters (``model`` may also be an
    iterable of parameters when no group keys are set).

    ``name_key`` / ``params_key`` are the config keys that errors name (``train.optimizer``).
    ``study`` holds the study's own settings (``lr``, ``weight_decay``, ``momentum``): each is
    passed when the class takes it and ``spec.params`` does not set it. One the class does not
    take is an error unless it is off (``0``/``None``): never dropped silently.
    ``diagnostics=True`` asks poise optimizers for per-step diagnostics (ignored by classes
    without the argument)."""
    cls = optimizer_class(spec.name, name_key)
    gk = group_keys(cls)
    check_kwargs(cls.__init__, spec.params, params_key, f"optimizer {spec.name!r}", extra=gk)
    accepted = accepted_kwargs(cls.__init__)
    group = {k: v for k, v in spec.params.items() if k in gk}
    # with a rank, the model's matrices form the projected group (embeddings excluded, see
    # poise.optim.low_rank_groups); without one the keys go to the constructor, which refuses to
    # run with nothing projected
    by_groups = "rank" in group and hasattr(model, "parameters")
    kw = {k: v for k, v in spec.params.items() if k not in gk or not by_groups}
    for k, v in study.items():
        if k in kw:
            continue
        if k in accepted:
            kw[k] = v
        elif v not in (0, 0.0, None):
            raise _error(f"{name_key}: optimizer {spec.name!r} takes no {k!r} argument, but the study sets {k}={v!r}; "
                         f"set it to 0 or pick an optimizer that has it")
    if "betas" in kw and isinstance(kw["betas"], list):
        kw["betas"] = tuple(kw["betas"])
    if diagnostics and "diagnostics" in inspect.signature(cls.__init__).parameters:
        kw["diagnostics"] = True
    if by_groups:
        from poise.optim import low_rank_groups

        try:
            params: Any = low_rank_groups(model, **group)
        except (TypeError, ValueError) as e:
            raise _error(f"{params_key}: {e}") from None
    elif hasattr(model, "named_parameters"):
        from poise.optim import TransformOptimizer

        # poise optimizers take (name, tensor) pairs, so their errors name the parameter ("fc.weight")
        named = issubclass(cls, TransformOptimizer)
        params = [(n, p) if named else p for n, p in model.named_parameters() if p.requires_grad]
    else:
        params = model
    try:
        return cls(params, **kw)
    except (TypeError, ValueError) as e:
        raise _error(f"{name_key}={spec.name!r}: {e}") from None


def describe_optimizer(opt: Any, model: Any = None) -> dict[str, Any]:
    """What an optimizer was built as: its class, its defaults that are plain values, and per
    parameter group the number of tensors and entries; for a low-rank optimizer, which tensors
    are projected (``projected_summary()``: rank, shapes, names)."""
    plain = (int, float, str, bool, type(None))
    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.defaults.items()
                if isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v))}
    out: dict[str, Any] = {"class": f"{type(opt).__module__}.{type(opt).__qualname__}", "defaults": defaults}
    if hasattr(opt, "projected_summary"):
        out["groups"] = opt.projected_summary()
    else:
        out["groups"] = [{"group": i, "tensors": len(g["params"]), "numel": int(sum(p.numel() for p in g["params"]))}
                         for i, g in enumerate(opt.param_groups)]
    return out

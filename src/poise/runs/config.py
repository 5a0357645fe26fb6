"""Typed study configuration, generic over study kinds: TOML recipes, ``key=value`` overrides,
dataclass conversion and checks.

A recipe is a TOML file whose ``kind`` (default ``continual``) names a study kind
(:mod:`poise.runs.kinds`); its tables mirror that kind's config dataclass. Loading checks every key
and type before anything runs: an unknown key, a value of the wrong type, or an unknown
registry name (stream, model, strategy, optimizer) raises :class:`ConfigError` naming the
key and the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Any

from poise import _registry

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_kwargs",
    "from_dict",
    "field_help",
    "find_recipe",
    "load_recipe",
    "recipe_names",
    "variant_config",
]

DEFAULT_RECIPE = "stability-gap"


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key and the valid choices."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


# Fields every study kind's config has beside its own (each kind's dataclass declares them with these).
def claims_field() -> Any:
    return _help("the paper's claims this study tests ([[claims]] tables; poise.runs.verdict): each gets an "
                 "estimate, a 95% interval over seeds and a computed verdict", default_factory=list)


def quick_field() -> Any:
    return _help("set by --quick: a smoke-test size, labelled 'not for conclusions'", default=False)


def tracking_field() -> Any:
    return _help("trackers that receive every run's metric lines at their own step when the run finishes: "
                 "tensorboard, wandb (offline unless WANDB_MODE), mlflow, trackio (poise.integrations.trackers; "
                 "each its extra); a failing tracker warns once, the study goes on", default_factory=list)


def sweep_field() -> Any:
    return _help("study-level keys a variant overrides (variant name -> {dotted key: value}); written by a "
                 "sweep on the command line (train.lr=0.01,0.1 makes one variant per value, named "
                 "'<variant>[lr=0.01]'); each variant runs with its own derived config", default_factory=dict)

# -- loading ---------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # `lr <= 0` is false for NaN: refuse it here, once for all
        raise ConfigError(f"{key}={value!r} must be a finite number")
    return value


def _from_dict(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in valid:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown key {where!r}; valid keys{' in ' + prefix if prefix else ''}: "
                              f"{', '.join(valid)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _choices(kind: str, value: str, key: str) -> None:
    names = _registry.names(kind)
    if value not in names:
        raise ConfigError(f"{key}: unknown {kind} {value!r}; valid choices: {', '.join(names)}")


def from_dict(data: dict[str, Any]) -> Any:
    """Build and validate the config of a recipe; ``kind`` (default ``continual``) picks the
    schema (:func:`poise.runs.kinds.get_kind`). A ``resolved`` table (written by the workbench
    into ``config.json``: derived, not an input) is ignored."""
    from poise.runs.kinds import kind_of

    data = {k: v for k, v in data.items() if k != "resolved"}
    kind = kind_of(data)
    cfg = _from_dict(kind.Config, data)
    _check_common(cfg)
    cfg = kind.validate(cfg)
    _check_claims(cfg)
    _check_sweep(cfg)
    return cfg


def _check_sweep(cfg: Any) -> None:
    """Each swept variant exists and its derived config is valid (checked now, before any run)."""
    sweep = getattr(cfg, "sweep", None) or {}
    names = [v.name for v in cfg.variants]
    for vname, keys in sweep.items():
        if vname not in names:
            raise ConfigError(f"sweep: {vname!r} is not a variant of this study (variants: {', '.join(names)})")
        for key in keys:
            if key.split(".")[0] in (*_NO_SWEEP, "variants", "sweep", "seeds"):
                raise ConfigError(f"sweep.{vname}: key {key!r} cannot differ between variants")
        try:
            variant_config(cfg, names.index(vname))
        except ConfigError as e:
            raise ConfigError(f"variant {vname!r} (a sweep): {e}") from None


def variant_config(cfg: Any, index: int) -> Any:
    """The config variant ``index`` runs with: ``cfg`` itself, or for a variant made by a sweep
    over a study-level key (``train.lr=0.01,0.1``) a copy of ``cfg`` with that variant's values."""
    sweep = getattr(cfg, "sweep", None) or {}
    keys = sweep.get(cfg.variants[index].name)
    if not keys:
        return cfg
    data = dataclasses.asdict(cfg)
    data["sweep"] = {}
    for key, value in keys.items():
        _set_key(data, key, value)
    return from_dict(data)


_MAX_THREADS = 4 * (os.cpu_count() or 1)
_TRACKER_MODULES = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy"),
                    "trackio": ("trackio",)}


def _check_trackers(names: list[str]) -> None:
    """Each tracker's package is installed, or ConfigError with the install hint (before any training)."""
    from poise.integrations.trackers import _require

    for t in names:
        try:
            _require(t, *_TRACKER_MODULES[t])
        except ImportError as e:
            raise ConfigError(f"tracking: {e}") from None


def check_name(value: str, key: str) -> None:
    """A study or variant name becomes a file or folder name: one path component, printable, not
    hidden (``x/../../y``, ``..``, ``.x`` and control characters are refused)."""
    bad = (not value or value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0")
           or not value.isprintable() or len(value) > 128)
    if bad:
        raise ConfigError(f"{key}={value!r} is not a usable name: it names files and folders, so it must be one "
                          "printable path component (no '/', '\\', leading '.', or control characters; "
                          "at most 128 characters)")


def _check_common(cfg: Any) -> None:
    """Checks every study kind shares: its name, seeds, threads."""
    check_name(cfg.name, "name")
    for i, s in enumerate(cfg.seeds):
        if not 0 <= s < 2**63:
            raise ConfigError(f"seeds[{i}]={s} must be in [0, 2^63)")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={cfg.seeds} repeats a seed")
    tracking = getattr(cfg, "tracking", [])
    if tracking:
        from poise.integrations.trackers import TRACKERS

        for i, t in enumerate(tracking):
            if t not in TRACKERS:
                raise ConfigError(f"tracking[{i}]: unknown tracker {t!r}; valid choices: {', '.join(TRACKERS)}")
        _check_trackers(tracking)
    if not 1 <= cfg.threads <= _MAX_THREADS:
        raise ConfigError(f"threads={cfg.threads}; valid: 1 to {_MAX_THREADS} (4 x the {os.cpu_count()} CPUs)")


def _check_claims(cfg: Any) -> None:
    """Each claim names variants of the study and a metric, and has its text and source."""
    names = [v.name for v in cfg.variants]
    for i, c in enumerate(getattr(cfg, "claims", [])):
        key = f"claims[{i}]"
        if not c.text or not c.paper:
            raise ConfigError(f"{key}: give the claim's text and paper (its source)")
        if c.better.value is not None and c.than.value is not None:
            raise ConfigError(f"{key}: both sides are constants; one side must be a variant's metric")
        for side in ("better", "than"):
            s = getattr(c, side)
            if s.value is not None:
                if s.variant or s.metric:
                    raise ConfigError(f"{key}.{side}: give either value or variant and metric, not both")
                continue
            if s.variant not in names:  # e.g. variants overridden: the claim is reported untested, not dropped
                import sys

                print(f"poise: {key}.{side}.variant {s.variant!r} is not a variant of this study (variants: "
                      f"{', '.join(names)}): this claim will be reported as untested", file=sys.stderr)
            if not s.metric:
                raise ConfigError(f"{key}.{side}.metric is empty: name the metric the claim is about")


def check_kwargs(fn: Any, params: dict[str, Any], key: str, what: str, skip: tuple[str, ...] = ()) -> None:
    """Every key of ``params`` is a keyword argument of ``fn``, or ``ConfigError`` names it
    (``key.<name>``) and lists the valid ones. See :func:`poise.runs.components.check_kwargs`."""
    from poise.runs.components import check_kwargs as _check

    _check(fn, params, key, what, skip=skip)


def _check_variants(cfg: Any, field_name: str, registry: bool = True) -> list[Any]:
    """Seeds and variants present; each variant's ``field_name`` a registered name (the
    registry kind of the same name, when ``registry``); names filled in and unique."""
    if not cfg.seeds:
        raise ConfigError("seeds is empty: give at least one seed")
    if not cfg.variants:
        raise ConfigError("variants is empty: give at least one [[variants]] table")
    seen = set()
    for i, v in enumerate(cfg.variants):
        key = f"variants[{i}]"
        if registry:
            _choices(field_name, getattr(v, field_name), f"{key}.{field_name}")
        v.name = v.name or getattr(v, field_name)
        check_name(v.name, f"{key}.name")
        if v.name in seen:
            raise ConfigError(f"{key}.name: duplicate variant name {v.name!r}")
        seen.add(v.name)
    return cfg.variants


# -- overrides -------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_NO_SWEEP = ("name", "kind", "description", "out_dir", "threads", "quick", "claims", "tracking")


def _split_top(text: str) -> list[str] | None:
    """``a,b,c`` split at commas outside brackets and quotes; None when there is no such comma."""
    parts, depth, quote, cur = [], 0, "", ""
    for c in text:
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += c
    if not parts:
        return None
    return [*parts, cur.strip()]


def _variants(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from poise.runs.kinds import kind_of

    kind = kind_of(data)
    variants = data.setdefault("variants", [dataclasses.asdict(v) for v in kind.Config().variants])
    return variants, [str(v.get("name") or v.get(kind.variant_key)) for v in variants]


def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in a recipe's raw dict; ``variants.NAME.KEY`` addresses one variant."""
    parts = key.strip().split(".")
    node: Any = data
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        if node is data and part == "variants":
            if len(parts) < 3:
                raise ConfigError(f"override {key!r}: use variants.NAME.KEY=VALUE")
            variants, names = _variants(data)
            if parts[1] not in names:
                raise ConfigError(f"override {key!r}: no variant {parts[1]!r}; variants: {', '.join(names)}")
            node = variants[names.index(parts[1])]
            i += 2
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a table")
        i += 1
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a recipe's raw dict. Keys are dotted
    (``train.lr=0.1``); ``variants.NAME.KEY`` addresses the variant called NAME
    (``variants.replay.params.mem_size=500``); values are TOML literals (``seeds=[0,1]``),
    anything else is taken as a string.

    A value with commas outside brackets and quotes is a **sweep**: ``train.lr=0.01,0.1`` makes
    one copy of every variant per value, named ``<variant>[lr=0.01]`` (each runs with its own
    derived config, :func:`variant_config`); ``variants.replay.params.mem_size=100,500`` copies
    only that variant. Several sweeps multiply. Quote a string that contains commas
    (``description='"a, b"'``); ``seeds`` is not swept (it is the replicate axis: ``seeds=[0,1,2]``)."""
    sweeps: list[tuple[str, list[str]]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        values = None if key.split(".")[0] in _NO_SWEEP else _split_top(text.strip())
        if values is not None:
            if key == "seeds":
                raise ConfigError(f"override {item!r}: seeds are the replicate axis, not a sweep; write "
                                  f"seeds=[{text.strip()}]")
            if any(not v for v in values):
                raise ConfigError(f"override {item!r}: a sweep needs a value between every two commas")
            if len(set(values)) != len(values):
                raise ConfigError(f"override {item!r}: a sweep repeats a value")
            sweeps.append((key, values))
            continue
        _set_key(data, key, _parse_value(text.strip()))
    if sweeps:
        _expand_sweeps(data, sweeps)
    return data


def _expand_sweeps(data: dict[str, Any], sweeps: list[tuple[str, list[str]]]) -> None:
    leaves = [k.split(".")[-1] for k, _ in sweeps]
    labels = [leaf if leaves.count(leaf) == 1 else k for leaf, (k, _) in zip(leaves, sweeps, strict=True)]
    variants, names = _variants(data)
    # each entry: (raw variant dict, base name, [(label, text)], {study-level key: value})
    rows = [(v, n, [], dict(data.get("sweep", {}).get(n, {}))) for v, n in zip(variants, names, strict=True)]
    for (key, texts), label in zip(sweeps, labels, strict=True):
        parts = key.split(".")
        only = None
        if parts[0] == "variants":
            if len(parts) < 3 or parts[1] not in names:
                raise ConfigError(f"sweep {key!r}: no variant {parts[1] if len(parts) > 1 else ''!r}; "
                                  f"variants: {', '.join(names)}")
            only = parts[1]
        out = []
        for v, base, tags, study in rows:
            if only is not None and base != only:
                out.append((v, base, tags, study))
                continue
            for text in texts:
                value = _parse_value(text)
                v2, study2 = copy.deepcopy(v), dict(study)
                if only is not None:
                    holder = {"variants": [v2], "kind": data.get("kind", "continual")}
                    _set_key(holder, ".".join(["variants", base, *parts[2:]]), value)
                else:
                    study2[key] = value
                out.append((v2, base, [*tags, (label, text)], study2))
        rows = out
    new_variants, sweep = [], {}
    for v, base, tags, study in rows:
        name = f"{base}[{','.join(f'{lab}={t}' for lab, t in tags)}]" if tags else base
        v["name"] = name
        new_variants.append(v)
        if study:
            sweep[name] = study
    data["variants"] = new_variants
    data["sweep"] = sweep


# -- recipes ---------------------------------------------------------------------------------
def _builtin_dir() -> Any:
    return resources.files("poise") / "recipes"


def recipe_names() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {str(p)!r} is not a text (UTF-8 TOML) file: {e.reason} at byte {e.start}") from None


def find_recipe(name_or_path: str | None) -> tuple[str, str]:
    """``(name, TOML text)`` of a recipe: a file path (``.toml``, or a run directory's ``config.json``
    to run a study again exactly as it ran), ``recipes/<name>.toml`` under the current directory, or a
    built-in recipe name. None gives the default recipe."""
    name_or_path = name_or_path or DEFAULT_RECIPE
    p = Path(name_or_path)
    if p.suffix in (".toml", ".json") or p.exists():
        if p.is_dir():
            raise ConfigError(f"recipe {str(p)!r} is a directory; give a .toml file (or a built-in name: "
                              f"{', '.join(recipe_names())})")
        if not p.is_file():
            raise ConfigError(f"recipe file {str(p)!r} does not exist")
        return p.stem, _read_text(p)
    local = Path("recipes") / f"{name_or_path}.toml"
    if local.is_file():
        return name_or_path, _read_text(local)
    builtin = _builtin_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return name_or_path, builtin.read_text()
    raise ConfigError(f"unknown recipe {name_or_path!r}; valid choices: {', '.join(recipe_names())} "
                      "(or a path to a .toml file)")


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None,
                quick: bool = False) -> Any:
    """Load, override and validate a recipe. ``quick`` first applies a smoke-test size
    (one seed, fewer steps: the kind's ``quick``); explicit overrides still win."""
    name, text = find_recipe(name_or_path)
    if str(name_or_path).endswith(".json"):  # a run directory's config.json: the study exactly as it ran
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe {name_or_path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {name_or_path!r} is not a JSON object")
        data.pop("resolved", None)
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {name!r} is not valid TOML: {e}") from None
    data.setdefault("name", name)
    if quick:
        from poise.runs.kinds import kind_of

        pre = [*kind_of(data).quick, "quick=true"]
    else:
        pre = []
    return from_dict(apply_overrides(data, [*pre, *(overrides or [])]))


def field_help(cls: Any = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every field, nested tables flattened (``cls``: a
    config dataclass; default: the continual kind's)."""
    if cls is None:
        from poise.runs.kinds import get_kind

        cls = get_kind("continual").Config
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_help(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = ", ".join(v.name for v in default)
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows


# Names that moved to their study kind's module (poise.runs.kinds.<kind>); importing them from
# here keeps working.
_MOVED = {
    "continual": ("StudyConfig", "WorkloadConfig", "TrainConfig", "EvalConfig", "VariantConfig", "validate",
                  "strategy_params", "_default_variants"),
    "optimizers": ("OptimStudyConfig", "OptimVariantConfig", "LMConfig", "validate_optim"),
    "rl": ("RLStudyConfig", "RLTaskConfig", "RLTrainConfig", "RLVariantConfig", "validate_rl"),
    "edit": ("EditStudyConfig", "EditStreamConfig", "EditVariantConfig", "FactLMConfig", "validate_edit"),
    "priming": ("PrimingStudyConfig", "PrimingConfig", "PrimingVariantConfig", "validate_priming"),
}


def __getattr__(name: str) -> Any:
    for kind, names in _MOVED.items():
        if name in names:
            from poise.runs.kinds import get_kind

            return getattr(__import__(get_kind(kind).run_one.__module__, fromlist=[name]), name)
    if name == "KINDS":
        from poise.runs.kinds import kind_names

        return tuple(kind_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

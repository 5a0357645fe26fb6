"""The unlearning study kind: a sequence of deletion requests served by each unlearning method, with
continual evaluation during unlearning (the stability gap of what is retained), then a relearning attack.

Per seed, an MLP is trained on every class of the digits train split (shared by all variants of the seed).
Then ``stream.requests`` deletion requests arrive one after another; request ``k`` asks to forget class
``c_k`` (every training image of it; ``stream.classes``, or ``(seed + k) % 10``). Each variant serves the
sequence with its ``method``:

* ``ga``, ``graddiff``, ``npo``, ``stableun``: :func:`poise.edit.unlearn_study.gradient_unlearn`
  (``stream.steps`` Adam steps per request; the retain data are the training images of every class not
  forgotten so far; NPO's reference is the model at the request's start);
* ``fit``: one :class:`poise.edit.FIT` object serves every request (its filter remembers earlier requests);
* ``acu``: ACU's ridge head on the frozen penultimate features, learned on everything, unlearned exactly
  per request; ``retrain``: trained from scratch without the classes forgotten so far (the gold standard);
  ``none``: the original model (no unlearning).

Every ``stream.eval_every`` unlearning steps (for ``acu``/``retrain``/``none``: at each request's end, as
they take no steps) the model is scored on the test split: retain accuracy (classes never requested) and
the accuracy of every class of the sequence. From that curve come the stability-gap metrics
(:func:`~poise.edit.unlearn_study.retention_gap`) and the relapse of earlier requests
(:func:`~poise.edit.unlearn_study.forget_relapse`). After the sequence, the relearning attack
(:func:`poise.edit.relearn_attack`) hits the final model once per forgotten class: ``attack.n`` training
images of the class plus ``attack.mix`` retain images, ``attack.steps`` full-batch Adam steps at
``attack.lr``. Either those values are used as given (their defaults are the output of the calibration rule
of ``benchmarks/unlearn_relearn.py`` on its held-out seeds), or with ``attack.calibrate`` the same rule
(:func:`~poise.edit.unlearn_study.choose_attack`) runs inside the study on the ``retrain`` reference of the
held-out ``attack.calibration_seeds`` with this study's own sequence. A run whose model or scores turn
non-finite is flagged diverged (never a number in a table).
"""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poise.distributed import is_main
from poise.runs.config import (
    ConfigError,
    _check_variants,
    _help,
    claims_field,
    quick_field,
    sweep_field,
    tracking_field,
)
from poise.runs.engine import _stats, by_variant, execute
from poise.runs.kinds._protocol import StudyKind
from poise.runs.report import _fmt, _plt
from poise.runs.store import JsonlWriter
from poise.runs.verdict import ClaimConfig

__all__ = ["KIND", "METHODS", "UnlearnAttackConfig", "UnlearnModelConfig", "UnlearnStreamConfig",
           "UnlearnStudyConfig", "UnlearnVariantConfig", "run_one_unlearn", "run_unlearn_study", "steps_per_run",
           "summarize_unlearn", "validate_unlearn"]

N_CLASSES = 10
# the method's own arguments a variant may set in ``params``, with their defaults (stableun's and fit's are those
# of benchmarks/unlearn_relearn.py, fixed there before any attack was run)
METHODS: dict[str, dict[str, Any]] = {
    "ga": {},
    "graddiff": {},
    "npo": {"beta": 0.1},
    "stableun": {"beta": 0.1, "rho": 0.5, "sigma": 0.01, "n_noise": 1, "alpha": 1.0, "inner_lr": None},
    "fit": {"top_k": 2, "tau": 0.95, "epsilon": 0.1, "thresholds": [6.0, 12.0], "beta": 0.1, "kl_weight": 1.0,
            "retain_n": 256},
    "acu": {"gamma": 1.0},
    "retrain": {},
    "none": {},
}
# the calibration grid (benchmarks/unlearn_relearn.py): retain images mixed in, steps, learning rates
CAL_MIXES = (0, 25)
CAL_STEPS = (10, 20, 40)
CAL_LRS = (1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3, 5e-3, 7e-3, 1e-2)
MAX_ATTACK_STEPS = 10_000  # full-batch steps on at most 50 + 500 images: far past any relearning that matters


# -- config --------------------------------------------------------------------------------
@dataclass
class UnlearnModelConfig:
    hidden: int = _help("hidden width of the MLP (64 -> hidden x depth -> 10)", default=64)
    depth: int = _help("hidden layers of the MLP", default=2)
    train_steps: int = _help("Adam steps that train it on every class (and that retrain it without the forgotten "
                             "ones)", default=400)
    lr: float = _help("Adam learning rate of training", default=3e-3)
    batch_size: int = _help("training rows per step", default=64)


@dataclass
class UnlearnStreamConfig:
    requests: int = _help("deletion requests in the sequence (each forgets one class; 1 to 9: one class must "
                          "remain to measure retention)", default=3)
    classes: list[int] = _help("the class each request forgets, in order (0-9, no repeats; as many as requests); "
                               "empty: (seed + k) % 10 for request k", default_factory=list)
    steps: int = _help("unlearning steps per request (Adam) of the gradient methods and FIT", default=30)
    lr: float = _help("unlearning Adam learning rate", default=1e-3)
    retain_batch: int = _help("retain rows per step of graddiff, npo and stableun", default=128)
    eval_every: int = _help("score the model every this many unlearning steps (continual evaluation)", default=2)
    gap_eps: float = _help("retain accuracy within this of its start counts as recovered", default=0.02)


@dataclass
class UnlearnAttackConfig:
    n: int = _help("forgotten training images per attacked class (the attack hits each forgotten class once)",
                   default=5)
    mix: int = _help("retain training images mixed into the attack's batch (benchmark calibration: 25)", default=25)
    steps: int = _help("full-batch Adam steps of the attack per forgotten class, 0 to 10,000 (benchmark "
                       "calibration: 20)", default=20)
    lr: float = _help("Adam learning rate of the attack (benchmark calibration: 3e-3)", default=3e-3)
    calibrate: bool = _help("choose mix/steps/lr by the benchmark's calibration rule on the retrain reference of "
                            "calibration_seeds, with this study's sequence (mix, steps and lr above are then unused)",
                            default=False)
    calibration_seeds: list[int] = _help("held-out seeds of the calibration (never evaluation seeds)",
                                         default_factory=lambda: [100, 101, 102, 103, 104])
    target_forget: list[float] = _help("calibration target: the reference's mean forget accuracy after the attack "
                                       "lies in [lo, hi]", default_factory=lambda: [0.2, 0.6])
    target_retain: float = _help("calibration target: the reference's retain accuracy after the attack is at "
                                 "least this", default=0.8)


@dataclass
class UnlearnVariantConfig:
    name: str = _help("label", default="")
    method: str = _help(f"unlearning method: {', '.join(METHODS)}", default="npo")
    params: dict[str, Any] = _help("the method's arguments: npo beta; stableun beta, rho, sigma, n_noise, alpha, "
                                   "inner_lr (default stream.lr); fit top_k, tau, epsilon, thresholds, beta, "
                                   "kl_weight, retain_n; acu gamma", default_factory=dict)


def _default_variants() -> list[UnlearnVariantConfig]:
    return [UnlearnVariantConfig(m if m != "none" else "original", m) for m in METHODS]


@dataclass
class UnlearnStudyConfig:
    kind: str = _help("'unlearn': a sequence of deletion requests, continual evaluation, a relearning attack",
                      default="unlearn")
    name: str = _help("study name", default="unlearn-relearn")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("evaluation seeds (the model, the requested classes and the attack's images)",
                             default_factory=lambda: [0, 1, 2, 3, 4])
    threads: int = _help("torch threads (tiny models run fastest on 1)", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    model: UnlearnModelConfig = _help("the classifier", default_factory=UnlearnModelConfig)
    stream: UnlearnStreamConfig = _help("the sequence of deletion requests", default_factory=UnlearnStreamConfig)
    attack: UnlearnAttackConfig = _help("the relearning attack", default_factory=UnlearnAttackConfig)
    variants: list[UnlearnVariantConfig] = _help("the unlearning methods compared ([[variants]] tables)",
                                                 default_factory=_default_variants)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_unlearn(cfg: UnlearnStudyConfig) -> UnlearnStudyConfig:
    """Ranges, the requested classes (learned, distinct), each method and its arguments; ``ConfigError``
    names the key and the valid range or choices."""
    m, s, a = cfg.model, cfg.stream, cfg.attack
    for key, hi in (("hidden", 4096), ("depth", 16), ("train_steps", 1_000_000), ("batch_size", 10_000)):
        if not 1 <= getattr(m, key) <= hi:
            raise ConfigError(f"model.{key}={getattr(m, key)}; valid: 1 to {hi:,}")
    if not m.lr > 0:
        raise ConfigError(f"model.lr={m.lr} must be > 0")
    if not 1 <= s.requests <= N_CLASSES - 1:
        raise ConfigError(f"stream.requests={s.requests}; valid: 1 to {N_CLASSES - 1} (each request forgets one "
                          "class, and one class must remain to measure retention)")
    if s.classes:
        for i, c in enumerate(s.classes):
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < N_CLASSES:
                raise ConfigError(f"stream.classes[{i}]={c!r}: a class the model never learned; valid: 0 to "
                                  f"{N_CLASSES - 1}")
            if c in s.classes[:i]:
                raise ConfigError(f"stream.classes[{i}]={c}: class {c} is requested twice (its forget set would be "
                                  "empty: it is already forgotten)")
        if len(s.classes) != s.requests:
            raise ConfigError(f"stream.classes has {len(s.classes)} classes but stream.requests={s.requests}: give "
                              "one class per request (or leave classes empty)")
    for key in ("steps", "retain_batch", "eval_every"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"stream.{key}={getattr(s, key)} must be > 0")
    if s.retain_batch > 10_000:
        raise ConfigError(f"stream.retain_batch={s.retain_batch}; valid: 1 to 10,000")
    if not s.lr > 0 or s.gap_eps < 0:
        raise ConfigError(f"stream.lr={s.lr} must be > 0 and stream.gap_eps={s.gap_eps} >= 0")
    if not 1 <= a.n <= 50:
        raise ConfigError(f"attack.n={a.n}; valid: 1 to 50 forgotten images (a class has about 125)")
    if not 0 <= a.mix <= 500:
        raise ConfigError(f"attack.mix={a.mix}; valid: 0 to 500 retain images")
    if not 0 <= a.steps <= MAX_ATTACK_STEPS:
        raise ConfigError(f"attack.steps={a.steps}; valid: 0 to {MAX_ATTACK_STEPS:,} full-batch Adam steps per "
                          "attacked class")
    if not a.lr > 0:
        raise ConfigError(f"attack.lr={a.lr} must be > 0")
    if a.calibrate:
        if not a.calibration_seeds:
            raise ConfigError("attack.calibration_seeds is empty: calibration needs held-out seeds")
        shared = sorted(set(a.calibration_seeds) & set(cfg.seeds))
        if shared:
            raise ConfigError(f"attack.calibration_seeds and seeds share {shared}: calibration seeds are held out, "
                              "never evaluation seeds")
        if len(set(a.calibration_seeds)) != len(a.calibration_seeds) or any(x < 0 for x in a.calibration_seeds):
            raise ConfigError(f"attack.calibration_seeds={a.calibration_seeds} must be distinct seeds >= 0")
    tf = a.target_forget
    if len(tf) != 2 or not all(_number(x) for x in tf) or not 0 <= tf[0] <= tf[1] <= 1:
        raise ConfigError(f"attack.target_forget={tf}; valid: [lo, hi] with 0 <= lo <= hi <= 1")
    if not 0 <= a.target_retain <= 1:
        raise ConfigError(f"attack.target_retain={a.target_retain}; valid: 0 to 1")
    for i, v in enumerate(_check_variants(cfg, "method", registry=False)):
        key = f"variants[{i}]"
        if v.method not in METHODS:
            raise ConfigError(f"{key}.method: unknown unlearning method {v.method!r}; valid choices: "
                              f"{', '.join(METHODS)}")
        allowed = METHODS[v.method]
        for p, x in v.params.items():
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown argument of method {v.method!r}; valid: "
                                  f"{', '.join(allowed) or '(none)'}")
            if p == "tau":
                if not _number(x) or not -1 <= x <= 1:
                    raise ConfigError(f"{key}.params.tau={x!r}; valid: -1 to 1 (a cosine-similarity threshold: an "
                                      "item at least this similar to a forgotten one is redundant)")
                continue
            if p == "thresholds":
                if not (isinstance(x, list) and len(x) == 2 and all(_number(t) for t in x) and 0 <= x[0] <= x[1]):
                    raise ConfigError(f"{key}.params.thresholds={x!r}; valid: [lo, hi] with 0 <= lo <= hi")
                continue
            if not _number(x) or x < 0:
                raise ConfigError(f"{key}.params.{p}={x!r} must be a number >= 0")
            if p in ("beta", "inner_lr", "gamma") and x <= 0:
                raise ConfigError(f"{key}.params.{p}={x!r} must be > 0")
            if p in ("n_noise", "top_k", "retain_n") and not isinstance(x, int):
                raise ConfigError(f"{key}.params.{p}={x!r} must be an integer")
        if v.method == "fit" and not 1 <= _params(v)["top_k"] <= m.depth + 1:  # FIT's layers: the MLP's linears
            raise ConfigError(f"{key}.params.top_k={_params(v)['top_k']}; valid: 1 to {m.depth + 1} (the model's "
                              "linear layers: model.depth + 1)")
        if v.method == "retrain" and v.params:
            raise ConfigError(f"{key}.params: retrain takes no arguments (it trains with model.*)")
    return cfg


def _attack_steps(cfg: UnlearnStudyConfig) -> int:
    """Attack steps per forgotten class: ``attack.steps``, or with calibration the grid's most (an upper bound:
    the setting is chosen when the study runs)."""
    return max(CAL_STEPS) if cfg.attack.calibrate else cfg.attack.steps


def _calibration_steps(cfg: UnlearnStudyConfig) -> int:
    """The calibration's work (once per study): per calibration seed, train the ``retrain`` reference
    (``model.train_steps``) and attack each forgotten class with every candidate of the grid."""
    a = cfg.attack
    if not a.calibrate:
        return 0
    grid = len(CAL_MIXES) * len(CAL_LRS) * sum(CAL_STEPS)
    return len(a.calibration_seeds) * (cfg.model.train_steps + cfg.stream.requests * grid)


def steps_per_run(cfg: UnlearnStudyConfig) -> int:
    """Progress steps of one run (what the size guard counts): the unlearning steps of every request, the attack's
    steps on every forgotten class, and the run's share (rounded up) of the calibration."""
    runs = max(1, len(cfg.variants) * len(cfg.seeds))
    share = -(-_calibration_steps(cfg) // runs)
    return cfg.stream.requests * (cfg.stream.steps + _attack_steps(cfg)) + share


def _params(v: UnlearnVariantConfig) -> dict[str, Any]:
    return {**METHODS[v.method], **v.params}


def _fit(model: nn.Module, v: UnlearnVariantConfig, s: UnlearnStreamConfig, learned: Any, seed: int) -> Any:
    from poise.edit import FIT

    p = _params(v)
    return FIT(model, learned=learned, steps=s.steps, lr=s.lr, top_k=int(p["top_k"]), tau=float(p["tau"]),
               epsilon=float(p["epsilon"]), thresholds=tuple(p["thresholds"]), beta=float(p["beta"]),
               kl_weight=float(p["kl_weight"]), seed=seed)


# -- data and shared pieces --------------------------------------------------------------------
_DATA: dict[str, Any] = {}
_BASE: dict[str, Any] = {}
_CALIBRATION: dict[str, Any] = {}


def _data() -> dict[str, torch.Tensor]:
    """The digits split of every poise digits stream (70/30, stratified), flattened to 64 pixels."""
    if not _DATA:
        from poise.tasks.digits import split_digits

        t = split_digits(1).tasks[0]
        _DATA.update(xtr=t.x_train.reshape(len(t.x_train), -1), ytr=t.y_train,
                     xte=t.x_test.reshape(len(t.x_test), -1), yte=t.y_test)
    return _DATA


def _classes(cfg: UnlearnStudyConfig, seed: int) -> list[int]:
    s = cfg.stream
    return list(s.classes) if s.classes else [(seed + k) % N_CLASSES for k in range(s.requests)]


def _train(cfg: UnlearnStudyConfig, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    from poise.edit.unlearn_study import train_classifier

    m = cfg.model
    return train_classifier(x, y, seed, steps=m.train_steps, hidden=m.hidden, depth=m.depth, lr=m.lr,
                            batch_size=m.batch_size, n_classes=N_CLASSES)


def _base_model(cfg: UnlearnStudyConfig, seed: int) -> nn.Module:
    """The model of ``seed`` trained on every class (kept in memory for the seed's next variant)."""
    key = json.dumps([dataclasses.asdict(cfg.model), seed])
    if _BASE.get("key") != key:
        d = _data()
        _BASE.clear()
        _BASE.update(key=key, model=_train(cfg, d["xtr"], d["ytr"], seed))
    return copy.deepcopy(_BASE["model"])


def _attack_images(cfg: UnlearnStudyConfig, seed: int, classes: list[int]) -> dict[str, Any]:
    """The attack's images of ``seed``, drawn once so that every variant (and every candidate attack of the
    calibration) sees the same: per forgotten class ``attack.n`` of its training images, and retain
    training images (classes never requested) to mix in."""
    d = _data()
    g = torch.Generator().manual_seed(1000 + seed)
    per_class = {}
    for c in classes:
        idx = torch.nonzero(d["ytr"] == c).flatten()
        per_class[c] = idx[torch.randperm(len(idx), generator=g)[: cfg.attack.n]]
    keep = torch.nonzero(~torch.isin(d["ytr"], torch.tensor(classes))).flatten()
    mix = keep[torch.randperm(len(keep), generator=g)[: max(cfg.attack.mix, *CAL_MIXES)]]
    return {"per_class": per_class, "mix": mix}


def _attack(model: nn.Module, images: dict[str, Any], c: int, setting: dict[str, Any]) -> nn.Module:
    from poise.edit import relearn_attack

    d = _data()
    idx = torch.cat([images["per_class"][c], images["mix"][: setting["mix"]]])
    return relearn_attack(model, d["xtr"][idx], d["ytr"][idx], steps=setting["steps"], lr=setting["lr"])


def _scores(model: nn.Module, classes: list[int]) -> tuple[torch.Tensor, dict[int, float], float]:
    """Test logits, accuracy of each class of the sequence, and retain accuracy (classes never requested)."""
    d = _data()
    with torch.no_grad():
        logits = model(d["xte"])
    hit = (logits.argmax(1) == d["yte"]).float()
    per = {c: float(hit[d["yte"] == c].mean()) for c in classes}
    keep = ~torch.isin(d["yte"], torch.tensor(classes))
    return logits, per, float(hit[keep].mean())


def attack_setting(cfg: UnlearnStudyConfig) -> dict[str, Any]:
    """The attack every run of the study uses: ``attack.mix/steps/lr`` as given, or with ``attack.calibrate``
    the calibration rule's choice on the held-out seeds (computed once per process and config). Returns
    ``{"mix", "steps", "lr", "calibrated", "target_met", "table"}``."""
    a = cfg.attack
    if not a.calibrate:
        return {"mix": a.mix, "steps": a.steps, "lr": a.lr, "calibrated": False, "target_met": None, "table": []}
    key = json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.stream), dataclasses.asdict(a)])
    if _CALIBRATION.get("key") != key:
        from poise.edit.unlearn_study import accuracy, attack_candidates, choose_attack

        d = _data()
        refs = []
        for s in a.calibration_seeds:
            classes = _classes(cfg, s)
            keep = ~torch.isin(d["ytr"], torch.tensor(classes))
            refs.append((classes, _attack_images(cfg, s, classes), _train(cfg, d["xtr"][keep], d["ytr"][keep], s)))
        table = []
        for cand in attack_candidates(CAL_MIXES, CAL_STEPS, CAL_LRS):
            forget, retain = [], []
            for classes, images, ref in refs:
                rkeep = ~torch.isin(d["yte"], torch.tensor(classes))
                fs, rs = [], []
                for c in classes:
                    att = _attack(ref, images, c, cand)
                    fs.append(accuracy(att, d["xte"][d["yte"] == c], d["yte"][d["yte"] == c]))
                    rs.append(accuracy(att, d["xte"][rkeep], d["yte"][rkeep]))
                forget.append(float(np.mean(fs)))
                retain.append(float(np.mean(rs)))
            table.append({**cand, "forget": float(np.mean(forget)), "retain": float(np.mean(retain))})
        setting, met = choose_attack(table, CAL_MIXES, (a.target_forget[0], a.target_forget[1]), a.target_retain)
        _CALIBRATION.clear()
        _CALIBRATION.update(key=key, value={**setting, "calibrated": True, "target_met": met, "table": table})
    return copy.deepcopy(_CALIBRATION["value"])


# -- one run --------------------------------------------------------------------------------
class _Diverged(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_one_unlearn(cfg: UnlearnStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
                    progress: Any = None) -> dict[str, Any]:
    """Serve the sequence of deletion requests with one method and one seed, scoring every
    ``stream.eval_every`` steps; then attack. Returns the final scores, the curve and the attack's."""
    from poise.edit.unlearn_study import (
        acu_features,
        acu_head_model,
        forget_relapse,
        gradient_unlearn,
        mean_nll,
        retention_gap,
    )

    v, s = cfg.variants[variant_index], cfg.stream
    p = _params(v)
    d = _data()
    classes = _classes(cfg, seed)
    setting = attack_setting(cfg)
    total = steps_per_run(cfg)
    model = _base_model(cfg, seed)
    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    curve: list[dict[str, Any]] = []
    at_end: dict[int, float] = {}
    fit_info: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    state: dict[str, Any] = {"model": model, "done": 0}

    def evaluate(step: int, request: int, m: nn.Module) -> None:
        logits, per, ret = _scores(m, classes)
        rec = {"step": step, "request": request, "retain_acc": ret, **{f"forget/{c}": per[c] for c in classes}}
        if not (bool(torch.isfinite(logits).all()) and _finite(m)):
            rec = {"step": step, "request": request, "diverged": True, "reason": "non-finite model or scores"}
            if writer:
                writer.write(rec)
            raise _Diverged(step, "non-finite model or scores")
        curve.append(rec)
        if writer:
            writer.write(rec)

    def tick(n: int = 1) -> None:
        state["done"] += n
        if progress is not None:
            progress(n)

    tick(total - s.requests * (s.steps + _attack_steps(cfg)))  # this run's share of the calibration
    diverged: _Diverged | None = None
    try:
        evaluate(0, 0, model)
        forgotten: list[int] = []
        fit = acu = None
        for k, c in enumerate(classes):
            forgotten.append(c)
            fmask = d["ytr"] == c
            rmask = ~torch.isin(d["ytr"], torch.tensor(forgotten))
            xf, yf, xr, yr = d["xtr"][fmask], d["ytr"][fmask], d["xtr"][rmask], d["ytr"][rmask]
            base = k * s.steps
            start = state["done"]

            def on_step(i: int, m: nn.Module, base: int = base, k: int = k) -> None:
                tick()
                if i % s.eval_every == 0 or i == s.steps:
                    evaluate(base + i, k + 1, m)

            if v.method in ("ga", "graddiff", "npo", "stableun"):
                kw = {"beta": p.get("beta", 0.1)}
                if v.method == "stableun":
                    kw.update(rho=p["rho"], sigma=p["sigma"], n_noise=int(p["n_noise"]), alpha=p["alpha"],
                              inner_lr=p["inner_lr"])
                model = gradient_unlearn(model, v.method, xf, yf, xr, yr, s.steps, s.lr, seed + 10_007 * k,
                                         retain_batch=s.retain_batch, on_step=on_step, inplace=True, **kw)
            elif v.method == "fit":
                if fit is None:
                    fit = _fit(model, v, s, (d["xtr"], d["ytr"]), seed)
                count = {"i": 0}

                def hook(opt: Any, args: Any, kwargs: Any, count: dict[str, int] = count,
                         on_step: Any = on_step, fit: Any = fit) -> None:
                    count["i"] += 1
                    on_step(count["i"], fit.model)

                from torch.optim.optimizer import register_optimizer_step_post_hook

                handle = register_optimizer_step_post_hook(hook)  # FIT's own Adam: score it every eval_every steps
                try:
                    n = int(p["retain_n"])
                    info = fit.request(xf, yf, retain=(xr[:n], yr[:n]) if n else None)
                finally:
                    handle.remove()
                model.eval()
                fit_info.append({"class": c, **{x: info[x] for x in ("kept", "filtered", "score", "algorithm",
                                                                     "layers")}})
            elif v.method == "acu":
                try:
                    if acu is None:
                        feat, acu, X, Y = acu_features(model, d["xtr"], d["ytr"], N_CLASSES, float(p["gamma"]))
                    acu.unlearn(X[fmask], Y[fmask])
                except ValueError as e:  # ACU refused (a singular system at this gamma): exit 2, one line
                    if writer:
                        writer.close()
                    raise ConfigError(f"variants.{v.name}: request {k} (class {c}) was refused by ACU: {e}; "
                                      f"params.gamma={p['gamma']!r} is too small for these features (default 1.0): "
                                      "raise it") from None
                model = acu_head_model(feat, acu)
            elif v.method == "retrain":
                model = _train(cfg, xr, yr, seed)
            if state["done"] - start < s.steps:  # no steps taken (acu, retrain, none, a filtered FIT request)
                tick(s.steps - (state["done"] - start))
            if not curve or curve[-1]["step"] != base + s.steps:
                evaluate(base + s.steps, k + 1, model)
            at_end[c] = curve[-1][f"forget/{c}"]
    except _Diverged as e:
        diverged = e
    except FloatingPointError as e:  # a guard refused a non-finite value: a diverged run
        diverged = _Diverged(curve[-1]["step"] if curve else 0, str(e))
    metrics: dict[str, Any] = {}
    attack_rows: dict[str, Any] = {}
    try:
        if diverged is None:
            last = curve[-1]
            gap = retention_gap([r["step"] for r in curve], [r["retain_acc"] for r in curve], s.gap_eps)
            final = [last[f"forget/{c}"] for c in classes]
            nll = [mean_nll(model, d["xte"][d["yte"] == c], d["yte"][d["yte"] == c]) for c in classes]
            after_f, after_r, after_nll = [], [], []
            images = _attack_images(cfg, seed, classes)
            for c in classes:
                att = _attack(model, images, c, setting)
                logits, per, ret = _scores(att, classes)
                if not bool(torch.isfinite(logits).all()):
                    raise _Diverged(len(classes) * s.steps, f"the attack on class {c} made the model non-finite")
                cm = d["yte"] == c
                after_f.append(per[c])
                after_r.append(ret)
                after_nll.append(mean_nll(att, d["xte"][cm], d["yte"][cm]))
                attack_rows[str(c)] = {"forget_acc": per[c], "retain_acc": ret, "forget_nll": after_nll[-1]}
                tick(_attack_steps(cfg))
            if not all(math.isfinite(x) for x in (*nll, *after_nll)):
                raise _Diverged(len(classes) * s.steps, "non-finite forget NLL")
            metrics = {
                "forget_acc": float(np.mean(final)), "forget_acc_max": float(max(final)),
                "retain_acc": gap["retain_final"], **{k: gap[k] for k in gap if k != "retain_final"},
                "forget_relapse": forget_relapse([at_end[c] for c in classes], final),
                "forget_nll": float(np.mean(nll)),
                "forget_acc_attacked": float(np.mean(after_f)), "forget_acc_attacked_first": after_f[0],
                "retain_acc_attacked": float(np.mean(after_r)), "forget_nll_attacked": float(np.mean(after_nll)),
                "per_request": {str(k): {"class": c, "forget_at_end": at_end[c], "forget_final": final[k],
                                         "forget_nll": nll[k], "forget_attacked": after_f[k]}
                                for k, c in enumerate(classes)},
            }
    except _Diverged as e:
        diverged = e
    finally:
        if writer:
            if diverged is not None and curve and not any(r.get("diverged") for r in curve):
                writer.write({"step": diverged.step, "diverged": True, "reason": diverged.reason})
            writer.close()
    if progress is not None and state["done"] < total:  # a diverged run skips the rest
        progress(total - state["done"])
    if diverged is not None:
        metrics = {"diverged_reason": diverged.reason}
    return {"variant": v.name, "method": v.method, "seed": seed, "classes": classes,
            "diverged_at": None if diverged is None else diverged.step, "wall_seconds": time.perf_counter() - t0,
            "metrics": metrics, "curve": curve, "attack": setting, "attack_per_class": attack_rows,
            "fit": fit_info}


SCALARS = ("forget_acc", "forget_acc_max", "retain_acc", "retain_start", "retain_min", "retain_drop",
           "retain_recovered", "retain_recovery_steps", "forget_relapse", "forget_nll", "forget_acc_attacked",
           "forget_acc_attacked_first", "retain_acc_attacked", "forget_nll_attacked")


def summarize_unlearn(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant over seeds: mean, std and n of every scalar metric (a metric a run has not, e.g. the
    relapse of a one-request sequence, has n = 0)."""
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        row = {k: _stats([r["metrics"].get(k) for r in rs]) for k in SCALARS}
        row["wall_seconds"] = _stats([r["wall_seconds"] for r in rs])
        row["seeds"] = [r["seed"] for r in rs]
        out[variant] = row
    return out


def run_unlearn_study(cfg: UnlearnStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                      report: bool = True) -> Path:
    """Run every method x seed of an unlearning study; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- report --------------------------------------------------------------------------------
def _attack_note(results: list[dict[str, Any]]) -> str:
    st = results[0]["attack"]
    a = (f"{st['mix']} retain images mixed in, {st['steps']} full-batch Adam steps at lr {st['lr']:g}")
    if not st["calibrated"]:
        return (f"Attack: {a}, as set in the recipe (attack.calibrate = false; the defaults are the benchmark's "
                "calibrated setting). ")
    row = next((r for r in st["table"] if all(r[k] == st[k] for k in ("mix", "steps", "lr"))), None)
    ref = (f" (there the retrain reference reaches forget {row['forget']:.3f}, retain {row['retain']:.3f})"
           if row else "")
    met = "calibrated" if st["target_met"] else "<b>calibration target MISSED: nearest candidate</b>"
    return f"Attack ({met} on the held-out seeds{ref}): {a}. "


def _unlearn_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = summarize_unlearn(results)
    s = config["stream"]
    note = (f"{s['requests']} deletion requests, one class each, {s['steps']} unlearning steps per request (Adam "
            f"{s['lr']:g}); scored every {s['eval_every']} steps on the test split. Forget: accuracy on the "
            "forgotten classes at the end (mean; max: the worst class); retain: accuracy on classes never requested; "
            "start / min: retain accuracy before the first request and its minimum during the sequence; drop = start "
            "− min (the stability gap's depth); recovered = final − min; recovery: steps from the minimum until "
            f"retain is back within {s['gap_eps']:g} of its start (– if never); relapse: mean over earlier requests "
            "of (forget accuracy at the end − right after their own request): positive, a later request undid an "
            "earlier forgetting. Forget NLL: cross-entropy on the forgotten classes (depth of forgetting; ACU's "
            "ridge logits are on another scale). ↑ higher is better, ↓ lower is better. Mean ± std over seeds.")
    keys = ("forget_acc", "forget_acc_max", "retain_acc", "retain_start", "retain_min", "retain_drop",
            "retain_recovered", "retain_recovery_steps", "forget_relapse", "forget_nll")
    heads = ["forget ↓", "max forget ↓", "retain ↑", "retain start", "min retain ↑", "drop ↓", "recovered ↑",
             "recovery (steps) ↓", "relapse ↓", "forget NLL"]
    fits = [f for r in results for f in r.get("fit") or []]
    algos = {}
    for f in fits:
        algos[str(f["algorithm"])] = algos.get(str(f["algorithm"]), 0) + 1
    fit_note = (f" FIT's requests: {', '.join(f'{n} x {a}' for a, n in algos.items())}; kept "
                f"{sum(f['kept'] for f in fits)} of {sum(f['kept'] + f['filtered'] for f in fits)} images.") \
        if fits else ""
    a_keys = ("forget_acc_attacked", "forget_acc_attacked_first", "forget_nll", "forget_nll_attacked",
              "retain_acc_attacked")
    a_heads = ["forget after attack ↓", "first request's class after attack ↓", "forget NLL before",
               "forget NLL after ↑", "retain after attack ↑"]
    a_note = (_attack_note(results) + f"Each forgotten class is attacked separately with {config['attack']['n']} of "
              "its training images; scored on the test split. A method whose forget accuracy after the attack "
              "exceeds retrain's (a model that never saw the classes) still holds them in its weights. Mean ± std "
              "over seeds; the claims above give paired 95% intervals." + fit_note)
    return [
        {"title": "Serving the sequence of deletion requests", "note": note, "heads": heads,
         "rows": [[html.escape(v), *(_fmt(r[k]) for k in keys)] for v, r in table.items()]},
        {"title": "The relearning attack", "note": a_note, "heads": a_heads,
         "rows": [[html.escape(v), *(_fmt(r[k]) for k in a_keys)] for v, r in table.items()]},
    ]


def _mean_curve(rs: list[dict[str, Any]], key: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = np.array(sorted({c["step"] for r in rs for c in r["curve"]}), dtype=float)
    ys = []
    for r in rs:
        x = np.array([c["step"] for c in r["curve"]], dtype=float)
        y = np.array([key(r, c) for c in r["curve"]], dtype=float)
        ys.append(np.interp(grid, x, y) if len(x) else grid * np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return grid, np.nanmean(ys, 0), np.nanstd(ys, 0)


def _unlearn_plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    results = [r for r in results if r.get("diverged_at") is None]  # flagged in the report's notice instead
    if not results:
        return []
    plt = _plt()
    s = config["stream"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", "-.", ":"]
    fig, (ax, af) = plt.subplots(1, 2, figsize=(14, 4.4))
    for i, v in enumerate(variants):
        rs = [r for r in results if r["variant"] == v]
        st = {"color": colors(i % 10), "ls": styles[i % len(styles)], "lw": 1.4, "label": v}
        if all(len(r["curve"]) == s["requests"] + 1 for r in rs):  # no steps (acu, retrain, none): a jump per request
            st["drawstyle"] = "steps-post"
        x, m, sd = _mean_curve(rs, lambda r, c: c["retain_acc"])
        ax.plot(x, m, **st)
        ax.fill_between(x, m - sd, m + sd, color=colors(i % 10), alpha=0.1)
        x, m, _ = _mean_curve(rs, lambda r, c: c[f"forget/{r['classes'][0]}"])
        af.plot(x, m, **st)
    for a in (ax, af):
        for k in range(1, s["requests"]):
            a.axvline(k * s["steps"], color="#999", ls="--", lw=0.8)
        a.set(xlabel="unlearning step (requests one after another)", ylim=(-0.02, 1.02))
    ax.set(ylabel="retain accuracy", title="Retained classes during the sequence (mean ± std over seeds)")
    af.set(ylabel="accuracy on the first request's class", title="The first forgotten class: does a later request "
           "bring it back?")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    p1 = run_dir / "unlearn_curves.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 3.8))
    w = 0.38
    for j, (key, lab) in enumerate((("forget_acc", "before the attack"), ("forget_acc_attacked", "after the attack"))):
        vals = [[r["metrics"][key] for r in results if r["variant"] == v] for v in variants]
        ax.bar(np.arange(len(variants)) + (j - 0.5) * w, [np.mean(a) for a in vals], w,
               yerr=[np.std(a) for a in vals], capsize=2, label=lab, color=("#90caf9", "#e57373")[j])
    ax.set_xticks(np.arange(len(variants)), variants)
    ax.set(ylabel="forget accuracy (test split)", ylim=(0, 1.05),
           title="Forgotten classes before and after the relearning attack (mean ± std over seeds; lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = run_dir / "relearn_attack.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [("Continual evaluation during unlearning: retention (the stability gap) and the first forgotten class; "
             "dashed lines: request boundaries", p1),
            ("The relearning attack", p2)]


KIND = StudyKind(
    name="unlearn",
    Config=UnlearnStudyConfig,
    example="unlearn-relearn",
    variant_key="method",
    validate=validate_unlearn,
    steps_per_run=steps_per_run,
    describe=lambda cfg: f"{cfg.stream.requests} deletion requests x {cfg.stream.steps} steps, then an attack",
    run_one=run_one_unlearn,
    summarize=lambda results, config: summarize_unlearn(results),
    tables=_unlearn_tables,
    plots=_unlearn_plots,
    columns=(("forget_acc", "forget"), ("retain_acc", "retain"), ("retain_min", "retain min"),
             ("retain_drop", "drop"), ("forget_relapse", "relapse"), ("forget_acc_attacked", "forget|attack"),
             ("retain_acc_attacked", "retain|attack")),
    quick=("seeds=[0]", "model.train_steps=300", "stream.requests=2", "stream.steps=15", "attack.calibrate=false"),
    resumable=False,
)

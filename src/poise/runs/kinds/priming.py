"""The priming study ("How new data permeates LLM knowledge and how to dilute it", Sun et
al., arXiv 2504.09522): learn one new fact at a time into a trained LM and measure how much
its keyword rises in unrelated contexts of the same theme (priming), how much in its own
context (memorisation), and whether the keyword's probability *before* learning predicts
priming (the paper: the rarer the keyword, the more it primes).

Variants: plain insertion, the stepping-stone rewrite (the keyword reached through a
familiar phrase of its theme) and ignore-k update pruning (the largest ``k`` fraction of
each tensor's update coordinates dropped at every step, the rest kept; the chainable form is
:func:`poise.transforms.ignore_top_k`). Every fact starts from the same trained LM.
"""

from __future__ import annotations

import copy
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poise.continual import IgnoreK
from poise.distributed import is_main
from poise.measure.priming import keyword_logprob, memorization_score, priming_score
from poise.runs.components import OptimizerSpec, build_optimizer
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
from poise.runs.kinds.edit import FactLMConfig, _check_lm, fact_lm
from poise.runs.report import _fmt, _plt
from poise.runs.store import JsonlWriter
from poise.runs.verdict import ClaimConfig
from poise.tasks.factlm import WordTokenizer, base_lines, pad_right
from poise.tasks.facts import THEMES, stepping_stone

__all__ = ["KIND", "PrimingConfig", "PrimingStudyConfig", "PrimingVariantConfig", "validate_priming",
           "run_one_priming", "run_priming_study", "spearman", "summarize_priming"]


# -- config --------------------------------------------------------------------------------
@dataclass
class PrimingConfig:
    n_probes: int = _help("new facts learned one at a time (each from the same trained LM)", default=48)
    learn_steps: int = _help("Adam steps that learn one fact (the fact in every batch, with replayed lines)",
                             default=10)
    learn_lr: float = _help("Adam learning rate while learning a fact", default=1e-3)
    replay: int = _help("known lines mixed into each learning batch", default=15)
    optimizer: str = _help("the optimizer that learns a fact: a registered poise optimizer (poise list optimizers), "
                           "torch's 'sgd' or 'adam', or an import path 'pkg.mod:Class'", default="adam")
    optimizer_params: dict[str, Any] = _help("more keyword arguments of that optimizer", default_factory=dict)


@dataclass
class PrimingVariantConfig:
    name: str = _help("label", default="")
    stepping_stone: bool = _help("learn the fact's stepping-stone rewrite instead of the fact", default=False)
    ignore_k: float = _help("ignore-k: drop this fraction of the largest update coordinates (0 = off)", default=0.0)


@dataclass
class PrimingStudyConfig:
    kind: str = _help("'priming': how learning one new fact primes its keyword elsewhere", default="priming")
    name: str = _help("study name", default="priming")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("seeds", default_factory=lambda: [0])
    threads: int = _help("torch threads", default=2)
    out_dir: str = _help("parent folder of run directories", default="runs")
    lm: FactLMConfig = _help("the LM the facts are learned into", default_factory=lambda: FactLMConfig(n_facts=600))
    priming: PrimingConfig = _help("the insertion step", default_factory=PrimingConfig)
    variants: list[PrimingVariantConfig] = _help("insertion variants ([[variants]] tables)", default_factory=list)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()


def validate_priming(cfg: PrimingStudyConfig) -> PrimingStudyConfig:
    _check_lm(cfg.lm)
    p = cfg.priming
    for key in ("n_probes", "learn_steps"):
        if getattr(p, key) <= 0:
            raise ConfigError(f"priming.{key}={getattr(p, key)} must be > 0")
    if p.replay < 0 or not p.learn_lr > 0:
        raise ConfigError("priming.replay must be >= 0 and priming.learn_lr > 0")
    from torch import nn as _nn

    _optimizer(p, _nn.Linear(2, 2))  # the optimizer's own checks run now, before any training
    for i, v in enumerate(_check_variants(cfg, "name", registry=False)):
        if not v.name:
            raise ConfigError(f"variants[{i}].name is empty: give each priming variant a name")
        if not 0 <= v.ignore_k < 1:
            raise ConfigError(f"variants[{i}].ignore_k={v.ignore_k}; valid: [0, 1)")
    return cfg



# -- one run --------------------------------------------------------------------------------
def _optimizer(p: PrimingConfig, params: Any) -> torch.optim.Optimizer:
    return build_optimizer(OptimizerSpec(p.optimizer, dict(p.optimizer_params)), params, "priming.optimizer",
                           "priming.optimizer_params", lr=p.learn_lr)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (no ties expected: continuous scores)."""
    if len(a) < 3:
        return math.nan
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _learn(model: nn.Module, tok: WordTokenizer, text: str, replay: list[str], cfg: PrimingStudyConfig,
           ignore_k: float, gen: torch.Generator) -> None:
    p = cfg.priming
    params = [q for q in model.parameters() if q.requires_grad]
    opt = _optimizer(p, params)
    strategy = IgnoreK(ignore_k)  # ignore-k on the realised update (the transform_update hook); k = 0: nothing
    model.train()
    for _ in range(p.learn_steps):
        pick = torch.randperm(len(replay), generator=gen)[: p.replay].tolist()
        seqs = [tok.encode("\n" + t + "\n") for t in [text] + [replay[i] for i in pick]]
        x = pad_right(seqs)
        y = x[:, 1:].clone()
        y[torch.arange(y.shape[1])[None] >= torch.tensor([len(s) - 1 for s in seqs])[:, None]] = -100  # padding
        logits = model(x[:, :-1])[0].flatten(0, 1).float()
        loss = nn.functional.cross_entropy(logits, y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = ({n: q.detach().clone() for n, q in model.named_parameters()}
                  if strategy.needs_update_snapshot else {})
        opt.step()
        if before:
            strategy.transform_update(model, before)
    model.eval()


def run_one_priming(cfg: PrimingStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
                    progress: Any = None) -> dict[str, Any]:
    """Learn each probe fact into a fresh copy of the trained LM; returns per-fact scores."""
    v, p = cfg.variants[variant_index], cfg.priming
    model, tok, facts = fact_lm(cfg.lm, seed, extra=p.n_probes, contexts_per_theme=200)
    probes = facts[cfg.lm.n_facts :]
    replay = base_lines(facts[: cfg.lm.n_facts], seed=seed + 1, contexts_per_theme=20)
    before = copy.deepcopy(model)
    state = before.state_dict()
    enc = tok.encode
    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        for i, f in enumerate(probes):
            model.load_state_dict(state)
            spec = THEMES[f.theme]
            text = stepping_stone(f.text, f.keyword, spec["stones"][:1]) if v.stepping_stone else f.text
            own = "\n" + f.prompt()
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            _learn(model, tok, text, replay, cfg, v.ignore_k, gen)
            ctxs = ["\n" + c for c in spec["contexts"]]
            row = {
                "fact": i, "theme": f.theme, "keyword": f.keyword,
                "keyword_before": keyword_logprob(before, enc, own, f.keyword),
                "context_before": float(np.mean([keyword_logprob(before, enc, c, f.keyword) for c in ctxs])),
                "log_priming": math.log(priming_score(before, model, enc, ctxs, f.keyword)),
                "log_memorization": math.log(memorization_score(before, model, enc, own, f.keyword)),
            }
            rows.append(row)
            if writer:
                writer.write(row)
            if progress is not None:
                progress(1)
    finally:
        if writer:
            writer.close()
    pri = [r["log_priming"] for r in rows]
    return {"variant": v.name, "seed": seed, "wall_seconds": time.perf_counter() - t0, "facts": rows,
            "metrics": {"log_priming": float(np.mean(pri)),
                        "log_memorization": float(np.mean([r["log_memorization"] for r in rows])),
                        "keyword_before": float(np.mean([r["keyword_before"] for r in rows])),
                        "spearman_predictor": spearman([r["keyword_before"] for r in rows], pri),
                        "spearman_context": spearman([r["context_before"] for r in rows], pri)}}


def summarize_priming(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        out[variant] = {m: _stats([r["metrics"][m] for r in rs]) for m in rs[0]["metrics"]}
        out[variant]["seeds"] = [r["seed"] for r in rs]
    return out


def run_priming_study(cfg: PrimingStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                      report: bool = True) -> Path:
    """Run every insertion variant x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- report --------------------------------------------------------------------------------
def _priming_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = summarize_priming(results)
    note = ("Per learned fact, log priming = log of the mean over the theme's unrelated contexts of "
            "P_after(keyword) / P_before(keyword); log memorisation = the same in the fact's own context; "
            "predictor = log P_before(keyword | own context). ρ: Spearman correlation of the predictor with log "
            "priming over the facts (the paper reports a negative one). These are measurements of how a fact spreads, "
            "with no better direction. Mean ± std over seeds.")
    heads = ["log priming", "log memorisation", "predictor (mean)", "ρ(predictor, priming)",
             "ρ(context prob, priming)"]
    rows = [[html.escape(v), *(_fmt(r[k]) for k in ("log_priming", "log_memorization", "keyword_before",
                                                   "spearman_predictor", "spearman_context"))]
            for v, r in table.items()]
    return [{"title": "Knowledge insertion", "note": note, "heads": heads, "rows": rows}]


def _priming_plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    plt = _plt()
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = plt.get_cmap("tab10")
    fig, (ax, am) = plt.subplots(1, 2, figsize=(13, 4.4))
    for i, v in enumerate(variants):
        rows = [f for r in results if r["variant"] == v for f in r["facts"]]
        ax.scatter([f["keyword_before"] for f in rows], [f["log_priming"] for f in rows], s=14, color=colors(i),
                   alpha=0.7, label=v)
        am.scatter([f["log_memorization"] for f in rows], [f["log_priming"] for f in rows], s=14,
                   color=colors(i), alpha=0.7, label=v)
    ax.set(xlabel="log P(keyword | own context) before learning", ylabel="log priming",
           title="Priming against the predictor (the paper finds: lower, more priming)")
    am.set(xlabel="log memorisation", ylabel="log priming", title="Priming against memorisation")
    for a in (ax, am):
        a.axhline(0, color="#999", lw=0.8)
        a.legend(fontsize=8)
    fig.tight_layout()
    p = run_dir / "priming.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [("One point per learned fact", p)]




KIND = StudyKind(
    name="priming",
    Config=PrimingStudyConfig,
    example="priming",
    variant_key="name",
    validate=validate_priming,
    steps_per_run=lambda cfg: cfg.priming.n_probes,
    describe=lambda cfg: f"{cfg.priming.n_probes} facts learned",
    run_one=run_one_priming,
    summarize=lambda results, config: summarize_priming(results),
    tables=_priming_tables,
    plots=_priming_plots,
    columns=tuple((k, k) for k in ("log_priming", "log_memorization", "spearman_predictor", "keyword_before")),
    quick=("seeds=[0]", "lm.n_facts=200", "lm.steps=300", "priming.n_probes=6"),
)

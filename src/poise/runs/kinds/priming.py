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
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poise.distributed import is_main
from poise.edit.priming import keyword_logprob, memorization_score, priming_score, stepping_stone
from poise.runs.config import PrimingStudyConfig
from poise.runs.edit_study import fact_lm
from poise.runs.store import JsonlWriter
from poise.runs.study import _stats, execute
from poise.tasks.factlm import WordTokenizer, _pad, base_lines
from poise.tasks.facts import THEMES
from poise.transforms import ignore_top_k

__all__ = ["run_one_priming", "run_priming_study", "spearman", "summarize_priming"]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (no ties expected: continuous scores)."""
    if len(a) < 3:
        return math.nan
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _prune_top(delta: torch.Tensor, k: float) -> torch.Tensor:
    """``delta`` with its ``ceil(k n)`` largest-magnitude coordinates zeroed (ignore-k applied
    to a realised update, by the same transform the optimizers chain)."""
    return ignore_top_k(k).update([delta.clone()], [{}], [delta], {})[0]


def _learn(model: nn.Module, tok: WordTokenizer, text: str, replay: list[str], cfg: PrimingStudyConfig,
           ignore_k: float, gen: torch.Generator) -> None:
    p = cfg.priming
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=p.learn_lr)
    model.train()
    for _ in range(p.learn_steps):
        pick = torch.randperm(len(replay), generator=gen)[: p.replay].tolist()
        seqs = [tok.encode("\n" + t + "\n") for t in [text] + [replay[i] for i in pick]]
        x = _pad(seqs)
        y = x[:, 1:].clone()
        y[torch.arange(y.shape[1])[None] >= torch.tensor([len(s) - 1 for s in seqs])[:, None]] = -100  # padding
        logits = model(x[:, :-1])[0].flatten(0, 1).float()
        loss = nn.functional.cross_entropy(logits, y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [q.detach().clone() for q in params] if ignore_k else None
        opt.step()
        if before is not None:
            with torch.no_grad():
                for q, b in zip(params, before, strict=True):
                    q.copy_(b + _prune_top(q - b, ignore_k))
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
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        out[variant] = {m: _stats([r["metrics"][m] for r in rs]) for m in rs[0]["metrics"]}
        out[variant]["seeds"] = [r["seed"] for r in rs]
    return out


def run_priming_study(cfg: PrimingStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                      report: bool = True) -> Path:
    """Run every insertion variant x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, cfg.priming.n_probes, run_one_priming, summarize_priming,
                   "priming")

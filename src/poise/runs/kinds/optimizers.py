"""The optimizers study: several optimizers x seeds training a tiny GPT on generated text at
an aggressive learning rate; loss curves, loss spikes and divergence per optimizer.

Run directory as for the continual studies (config.json, metrics/*.jsonl flushed per step,
results/*.json per run, summary.json rewritten after each run, plots and report.html).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poise import _registry
from poise.distributed import is_main
from poise.optim import NonFiniteGradientError
from poise.runs.config import GALORE_GROUP_KEYS, OptimStudyConfig, OptimVariantConfig
from poise.runs.store import JsonlWriter
from poise.runs.study import _stats, execute
from poise.tasks.gpt import GPT, GPTConfig
from poise.tasks.text import CharTokenizer, arithmetic_corpus

__all__ = ["make_optimizer", "run_optim_study", "summarize_optim"]


def make_optimizer(v: OptimVariantConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The variant's optimizer over ``model``; GaLore's group keys go to a group of the 2-D
    weights other than embeddings, everything else to the constructor."""
    cls = _registry.get("optimizer", v.optimizer)
    kw = {k: x for k, x in v.params.items() if k not in GALORE_GROUP_KEYS}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    if not v.optimizer.startswith("galore"):
        return cls(model.parameters(), diagnostics=True, **kw)
    group = {k: x for k, x in v.params.items() if k in GALORE_GROUP_KEYS}
    group.setdefault("rank", 8)
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    mats = [p for p in model.parameters() if p.dim() == 2 and id(p) not in emb]
    rest = [p for p in model.parameters() if p.dim() != 2 or id(p) in emb]
    groups = [{"params": mats, **group}] + ([{"params": rest}] if rest else [])
    return cls(groups, diagnostics=True, **kw)


def _data(cfg: OptimStudyConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    tok = CharTokenizer()
    ids = tok.encode(arithmetic_corpus(n_lines=6000, digits=cfg.lm.digits, seed=0))
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], tok.vocab_size


def _batch(ids: torch.Tensor, n: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(ids) - T - 1, (n,), generator=gen)
    x = torch.stack([ids[s : s + T] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + T + 1] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def _val_loss(model: GPT, val: torch.Tensor, cfg: OptimStudyConfig) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    x, y = _batch(val, 128, cfg.lm.block_size, gen)
    loss = float(model(x, y)[1])
    model.train()
    return loss


def run_one_optim(cfg: OptimStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
                  progress: Any = None) -> dict[str, Any]:
    """Train one optimizer with one seed; returns its curves and counts."""
    v = cfg.variants[variant_index]
    train, val, vocab = _data(cfg)
    torch.manual_seed(seed)
    c = cfg.lm
    model = GPT(GPTConfig(vocab_size=vocab, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                          n_embd=c.n_embd))
    opt = make_optimizer(v, model)
    gen = torch.Generator().manual_seed(seed)
    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    losses: list[float] = []
    val_steps: list[int] = []
    val_losses: list[float] = []
    spikes: list[int] = []
    ema = None
    diverged_at = None
    t0 = time.perf_counter()
    try:
        for step in range(1, c.steps + 1):
            x, y = _batch(train, c.batch_size, c.block_size, gen)
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            lv = float(loss.detach())
            rec: dict[str, Any] = {"step": step, "loss": lv, "grad_norm": gnorm}
            bad = not math.isfinite(lv) or (losses and lv > cfg.divergence_factor * losses[0])
            if not bad:
                try:
                    opt.step()
                except NonFiniteGradientError:
                    bad = True
            if bad:
                diverged_at = step
                rec["diverged"] = True
            else:
                if ema is not None and lv > cfg.spike_factor * ema:
                    spikes.append(step)
                    rec["spike"] = True
                ema = lv if ema is None else 0.9 * ema + 0.1 * lv
                rec.update({f"opt/{k}": float(t) for k, t in opt.last_diagnostics.items()})
            losses.append(lv)
            if step % c.eval_every == 0 or step == c.steps:
                if diverged_at is None:
                    val_steps.append(step)
                    val_losses.append(_val_loss(model, val, cfg))
                    rec["val_loss"] = val_losses[-1]
            if writer:
                writer.write(rec)
            if progress is not None:
                progress(1)
            if diverged_at is not None:
                if progress is not None:
                    progress(c.steps - step)
                break
    finally:
        if writer:
            writer.close()
    wall = time.perf_counter() - t0
    return {
        "variant": v.name, "optimizer": v.optimizer, "seed": seed, "wall_seconds": wall,
        "seconds_per_step": wall / max(1, len(losses)),
        "losses": losses, "val_steps": val_steps, "val_losses": val_losses,
        "spikes": spikes, "diverged_at": diverged_at,
        "final_val_loss": val_losses[-1] if val_losses and diverged_at is None else math.nan,
    }


def summarize_optim(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant over seeds: final validation loss, best training loss, loss spikes,
    divergence rate, seconds per step."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        out[variant] = {
            "final_val_loss": _stats([r["final_val_loss"] for r in rs]),
            "min_train_loss": _stats([float(np.nanmin(r["losses"])) if r["losses"] else math.nan for r in rs]),
            "spikes": _stats([float(len(r["spikes"])) for r in rs]),
            "diverged": {"count": sum(r["diverged_at"] is not None for r in rs), "runs": len(rs)},
            "seconds_per_step": _stats([r["seconds_per_step"] for r in rs]),
            "seeds": [r["seed"] for r in rs],
        }
    return out


def run_optim_study(cfg: OptimStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                    report: bool = True) -> Path:
    """Run every optimizer x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, cfg.lm.steps, run_one_optim, summarize_optim, "optimizers")

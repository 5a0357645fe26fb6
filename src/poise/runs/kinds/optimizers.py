"""The optimizers study: several optimizers x seeds training a tiny GPT on generated text at
an aggressive learning rate; loss curves, loss spikes and divergence per optimizer, in float32 or
with fake-quantised INT8/INT4 weights and activations (:mod:`poise.models.quant`, the simulated
low-precision training of Stable-SPAM, arXiv 2502.17055).

Loss spike (the detector, fixed before any run): step ``t`` is a spike when its training loss
``L_t > spike_factor * E_{t-1}``, where ``E`` is the EMA ``E_t = 0.9 E_{t-1} + 0.1 L_t`` of the
training losses of the steps before (``E_1 = L_1``; spike steps are included in the EMA).
A run's ``spike_count`` is the number of such steps.

Run directory as for the continual studies (config.json, metrics/*.jsonl flushed per step,
results/*.json per run, summary.json rewritten after each run, plots and report.html).
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from poise.distributed import is_main
from poise.models import GPT, GPTConfig
from poise.models.quant import QUANT_PRESETS, fake_quantize_linears, quant_spec
from poise.optim import ConsecutiveSkipsError, NonFiniteGradientError
from poise.runs.components import OptimizerSpec, build_optimizer, describe_optimizer
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
from poise.runs.verdict import ClaimConfig, t975
from poise.tasks.text import CharTokenizer, arithmetic_corpus

__all__ = ["KIND", "LMConfig", "OptimStudyConfig", "OptimVariantConfig", "make_optimizer", "run_optim_study",
           "summarize_optim", "validate_optim"]


# -- config ---------------------------------------------------------------------------------
@dataclass
class LMConfig:
    corpus: str = _help("generated corpus: 'arithmetic' (a+b=c and a*b=c lines)", default="arithmetic")
    digits: int = _help("operand digits of the arithmetic corpus", default=2)
    n_layer: int = _help("GPT layers", default=2)
    n_head: int = _help("GPT attention heads", default=2)
    n_embd: int = _help("GPT width", default=64)
    block_size: int = _help("context length in characters", default=32)
    batch_size: int = _help("sequences per step", default=32)
    steps: int = _help("optimizer steps per run", default=300)
    eval_every: int = _help("validation loss every this many steps", default=25)
    quant: str = _help("precision of the attention/MLP linear layers: 'none' (float32), 'int8' or 'int4' "
                       "(fake-quantised weights and activations with straight-through gradients, the Stable-SPAM "
                       "authors' scheme: weights asymmetric min-max, activations symmetric abs-max keeping the 2 "
                       "largest of each group; poise.models.quant); embeddings and the output head stay float32; "
                       "a variant's own 'quant' overrides it", default="none")
    quant_group_size: int = _help("elements per quantisation group (consecutive in the flattened tensor; the "
                                  "authors use 256); <= 0: one group per tensor", default=256)


@dataclass
class OptimVariantConfig:
    name: str = _help("label of this variant", default="")
    optimizer: str = _help("a registered poise optimizer (poise list optimizers), torch's 'sgd' or 'adam', or an "
                           "import path 'pkg.mod:Class'", default="adamw")
    params: dict[str, Any] = _help("constructor arguments and the optimizer's declared group keys (galore_adamw, "
                                   "qgalore_adamw: rank, update_proj_gap, scale, proj_type; applied to the 2-D "
                                   "weight matrices, embeddings excluded)", default_factory=dict)
    quant: str = _help("this variant's precision ('none', 'int8', 'int4'); empty: lm.quant", default="")


@dataclass
class OptimStudyConfig:
    kind: str = _help("'optimizers': optimizers compared on a tiny language model", default="optimizers")
    name: str = _help("study name (names the run directory)", default="optimizers")
    description: str = _help("one paragraph shown at the top of the report", default="")
    seeds: list[int] = _help("seeds; every variant runs once per seed", default_factory=lambda: [0, 1, 2])
    threads: int = _help("torch intra-op threads", default=1)
    out_dir: str = _help("parent folder of run directories", default="runs")
    spike_factor: float = _help("a loss spike: a step whose training loss is above this factor times the EMA "
                                "(decay 0.9) of the training losses before it; spike_count counts such steps",
                                default=1.5)
    divergence_factor: float = _help("diverged: loss non-finite or above this factor times the initial loss",
                                     default=2.0)
    lm: LMConfig = _help("the tiny GPT and its data", default_factory=LMConfig)
    variants: list[OptimVariantConfig] = _help("the optimizers compared ([[variants]] tables)",
                                               default_factory=list)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()


def validate_optim(cfg: OptimStudyConfig) -> OptimStudyConfig:
    if cfg.lm.corpus != "arithmetic":
        raise ConfigError(f"lm.corpus: unknown corpus {cfg.lm.corpus!r}; valid choices: arithmetic")
    for key in ("digits", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "eval_every"):
        if getattr(cfg.lm, key) <= 0:
            raise ConfigError(f"lm.{key}={getattr(cfg.lm, key)} must be > 0")
    if cfg.lm.quant not in QUANT_PRESETS:
        raise ConfigError(f"lm.quant: unknown quantisation {cfg.lm.quant!r}; valid choices: {', '.join(QUANT_PRESETS)}")
    for i, v in enumerate(cfg.variants):
        if v.quant and v.quant not in QUANT_PRESETS:
            raise ConfigError(f"variants[{i}].quant: unknown quantisation {v.quant!r}; valid choices: "
                              f"{', '.join(QUANT_PRESETS)} (or empty: lm.quant)")
    if cfg.lm.n_embd % cfg.lm.n_head:
        raise ConfigError(f"lm.n_embd={cfg.lm.n_embd} must be a multiple of lm.n_head={cfg.lm.n_head}")
    model = _model(cfg, vocab_size=CharTokenizer().vocab_size)
    for i, _ in enumerate(_check_variants(cfg, "optimizer", registry=False)):
        make_optimizer(cfg.variants[i], model, key=f"variants[{i}]")  # its own checks run now, before any training
    return cfg



# -- one run --------------------------------------------------------------------------------


def make_optimizer(v: OptimVariantConfig, model: nn.Module, key: str = "variant") -> torch.optim.Optimizer:
    """The variant's optimizer over ``model`` (:func:`poise.runs.components.build_optimizer`: declared
    group keys such as GaLore's ``rank`` build projected groups of the 2-D weights, embeddings excluded)."""
    return build_optimizer(OptimizerSpec(v.optimizer, dict(v.params)), model, f"{key}.optimizer", f"{key}.params",
                           diagnostics=True)


def _model(cfg: OptimStudyConfig, vocab_size: int) -> GPT:
    c = cfg.lm
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                         n_embd=c.n_embd))


def variant_quant(cfg: OptimStudyConfig, variant_index: int) -> str:
    """The precision variant ``variant_index`` trains in: its own ``quant``, else ``lm.quant``."""
    return cfg.variants[variant_index].quant or cfg.lm.quant


def quantize_model(model: nn.Module, quant: str, group_size: int = 256) -> list[str]:
    """Fake-quantise ``model``'s linear layers in place as ``quant`` says (``none``: nothing);
    the output head (tied to the embedding) stays in full precision, as in the authors' runs.
    Returns the quantised layers' names."""
    spec = quant_spec(quant, group_size)
    return [] if spec is None else fake_quantize_linears(model, spec, exclude=("head",))


def resolve(cfg: OptimStudyConfig) -> dict[str, Any]:
    """What each variant's optimizer was built as (class, groups, projected matrices)."""
    model = _model(cfg, CharTokenizer().vocab_size)
    return {"optimizers": {v.name: describe_optimizer(make_optimizer(v, model, f"variants[{i}]"), model)
                           for i, v in enumerate(cfg.variants)},
            "quant": {v.name: {"quant": variant_quant(cfg, i),
                               "layers": quantize_model(_model(cfg, CharTokenizer().vocab_size), variant_quant(cfg, i),
                                                        cfg.lm.quant_group_size)}
                      for i, v in enumerate(cfg.variants)}}


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
    model = _model(cfg, vocab)
    quant = variant_quant(cfg, variant_index)
    if quant != "none":  # float32 keeps the original code path (and its seeded results) exactly
        quantize_model(model, quant, c.quant_group_size)
    opt = make_optimizer(v, model, f"variants[{variant_index}]")
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
                except ConsecutiveSkipsError:  # the user's guard (nonfinite="skip") gave up: the study stops, exit 3
                    raise
                except NonFiniteGradientError:  # nonfinite="raise": this run diverged (a result, flagged)
                    bad = True
            if bad:
                diverged_at = step
                rec["diverged"] = True
            else:
                if ema is not None and lv > cfg.spike_factor * ema:
                    spikes.append(step)
                    rec["spike"] = True
                ema = lv if ema is None else 0.9 * ema + 0.1 * lv
                rec.update({f"opt/{k}": float(t) for k, t in getattr(opt, "last_diagnostics", {}).items()})
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
        "variant": v.name, "optimizer": v.optimizer, "quant": quant, "seed": seed, "wall_seconds": wall,
        "seconds_per_step": wall / max(1, len(losses)),
        "losses": losses, "val_steps": val_steps, "val_losses": val_losses,
        "spikes": spikes, "spike_count": len(spikes), "diverged_at": diverged_at,
        "final_val_loss": val_losses[-1] if val_losses and diverged_at is None else math.nan,
    }


def interval95(values: list[float]) -> list[float] | None:
    """The 95% Student-t interval of the mean of the finite ``values``
    (``mean ± t_{n-1,0.975} sd/sqrt(n)``), or None with fewer than two."""
    a = [float(v) for v in values if v is not None and math.isfinite(v)]
    if len(a) < 2:
        return None
    m = sum(a) / len(a)
    half = t975(len(a) - 1) * math.sqrt(sum((x - m) ** 2 for x in a) / (len(a) - 1)) / math.sqrt(len(a))
    return [m - half, m + half]


def summarize_optim(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant over seeds: precision, final validation loss, best training loss, loss spikes,
    divergence rate, seconds per step; 95% intervals of final loss and spike count (diverged runs
    have no final loss and are left out of its mean and interval)."""
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        out[variant] = {
            "quant": rs[0].get("quant", "none"),
            "final_val_loss": _stats([r["final_val_loss"] for r in rs]),
            "min_train_loss": _stats([float(np.nanmin(r["losses"])) if r["losses"] else math.nan for r in rs]),
            "spikes": _stats([float(len(r["spikes"])) for r in rs]),
            "diverged": {"count": sum(r["diverged_at"] is not None for r in rs), "runs": len(rs)},
            "seconds_per_step": _stats([r["seconds_per_step"] for r in rs]),
            "seeds": [r["seed"] for r in rs],
            "interval95": {"final_val_loss": interval95([r["final_val_loss"] for r in rs]),
                           "spikes": interval95([float(len(r["spikes"])) for r in rs])},
        }
    return out


def run_optim_study(cfg: OptimStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                    report: bool = True) -> Path:
    """Run every optimizer x seed; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- report --------------------------------------------------------------------------------
def _optim_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = summarize_optim(results)
    note = ("↓ lower is better. "
            f"Mean ± sample std over seeds; [a, b]: 95% t interval of the mean (two or more seeds). Precision: "
            "float32, or fake-quantised INT8/INT4 weights and activations of the attention/MLP linear layers "
            f"(poise.models.quant). A loss spike: a step whose training loss is above {config['spike_factor']}x the "
            "EMA (decay 0.9) of the training losses before it. Diverged: loss non-finite or above "
            f"{config['divergence_factor']}x its initial value; the run stops there and has no final validation "
            "loss.")
    heads = ["precision", "final val loss ↓", "95% interval", "min train loss ↓", "loss spikes ↓", "95% interval",
             "diverged ↓", "ms / step ↓"]
    rows = []

    def ci(x: list[float] | None, digits: int) -> str:
        return "–" if x is None else f"[{x[0]:.{digits}f}, {x[1]:.{digits}f}]"

    for v, row in table.items():
        sps = row["seconds_per_step"]
        ms = {k: (x * 1e3 if isinstance(x, float) and k in ("mean", "std") else x) for k, x in sps.items()}
        quant = row["quant"]
        rows.append([html.escape(v), "float32" if quant == "none" else html.escape(quant.upper()),
                     _fmt(row["final_val_loss"]), ci(row["interval95"]["final_val_loss"], 3),
                     _fmt(row["min_train_loss"]), _fmt(row["spikes"], 1), ci(row["interval95"]["spikes"], 1),
                     f"{row['diverged']['count']} / {row['diverged']['runs']}", _fmt(ms, 1)])
    return [{"title": "Optimizers", "note": note, "heads": heads, "rows": rows}]


def _optim_plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    plt = _plt()
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = plt.get_cmap("tab10")
    fig, (ax, av) = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, v in enumerate(variants):
        for j, r in enumerate(r for r in results if r["variant"] == v):
            y = np.array([np.nan if x is None else x for x in r["losses"]], dtype=float)
            ax.plot(np.arange(1, len(y) + 1), y, color=colors(i), lw=0.8, alpha=0.8, label=v if j == 0 else None)
            if r["spikes"]:
                sp = np.array(r["spikes"])
                ax.scatter(sp, y[sp - 1], color=colors(i), marker="x", s=18)
            if r["diverged_at"]:
                ax.axvline(r["diverged_at"], color=colors(i), ls=":", lw=1)
            av.plot(r["val_steps"], r["val_losses"], color=colors(i), lw=1.2, marker=".",
                    label=v if j == 0 else None)
    ax.set(xlabel="step", ylabel="training loss", yscale="log",
           title="Training loss per seed (x: loss spikes, dotted: divergence)")
    av.set(xlabel="step", ylabel="validation loss", yscale="log", title="Validation loss per seed")
    ax.legend(fontsize=8)
    av.legend(fontsize=8)
    fig.tight_layout()
    p = run_dir / "loss_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [("Loss curves", p)]




KIND = StudyKind(
    name="optimizers",
    Config=OptimStudyConfig,
    example="optimizers",
    variant_key="optimizer",
    validate=validate_optim,
    steps_per_run=lambda cfg: cfg.lm.steps,
    describe=lambda cfg: f"{cfg.lm.steps} steps",
    run_one=run_one_optim,
    summarize=lambda results, config: summarize_optim(results),
    tables=_optim_tables,
    plots=_optim_plots,
    columns=(("final_val_loss", "final val"), ("spikes", "spikes"), ("diverged", "diverged"),
             ("seconds_per_step", "s/step")),
    quick=("seeds=[0]", "lm.steps=60"),
    resolve=resolve,
)

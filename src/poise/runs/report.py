"""Build the report of a run directory: PNG plots and one self-contained ``report.html``.

Needs the ``report`` extra (matplotlib, jinja2). Reads only files in the run directory, so
``poise report RUN_DIR`` rebuilds it at any time, including for an unfinished run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_report"]

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>poise · {{ study }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
</style></head><body>
<h1>{{ study }}</h1>
<p>{{ description }}</p>
<p class="note">{{ status }} · {{ n_runs }} runs ({{ n_variants }} variants × seeds {{ seeds }}) ·
wall time {{ wall }} · poise {{ version }}, torch {{ torch }}, Python {{ python }}</p>

{% for t in tables %}<h2>{{ t.title }}</h2>
<p class="note">{{ t.note }}</p>
<table><tr><th>variant</th>{% for h in t.heads %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endfor %}

{% for title, img in images %}<h3>{{ title }}</h3><img src="data:image/png;base64,{{ img }}" alt="{{ title }}">
{% endfor %}

<h2>Resolved config</h2>
<pre>{{ config }}</pre>
</body></html>
"""


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "–"
    m, s = stat["mean"], stat.get("std") or 0.0
    if abs(m) >= 100:
        return f"{m:.0f} ± {s:.0f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _load(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    config = json.loads((run_dir / "config.json").read_text())
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))]
    order = {v["name"] or v.get("strategy") or v.get("optimizer") or v.get("loss"): i
             for i, v in enumerate(config.get("variants", []))}
    results.sort(key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
    return config, summary, results


def _curve_mean(results: list[dict[str, Any]], col: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and spread over seeds of task ``col``'s accuracy, or of the mean over seen tasks."""
    per_seed = []
    for r in results:
        steps = np.array(r["curves"]["steps"], dtype=float)
        acc = np.array([[np.nan if a is None else a for a in row] for row in r["curves"]["acc"]], dtype=float)
        y = acc[:, col] if col is not None else np.nanmean(acc, axis=1)
        per_seed.append((steps, y))
    grid = per_seed[0][0]
    ys = np.array([np.interp(grid, s, y, left=np.nan) if len(s) else grid * np.nan
                   for s, y in per_seed])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a task not yet seen
        return grid, np.nanmean(ys, 0), np.nanstd(ys, 0)


def _plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in results))
    by_v = {v: [r for r in results if r["variant"] == v] for v in variants}
    colors = plt.get_cmap("tab10")
    boundaries = results[0]["boundaries"]
    out: list[tuple[str, Path]] = []

    def bounds(ax: Any) -> None:
        for b in boundaries[:-1]:
            ax.axvline(b, color="#999", ls="--", lw=0.8)

    # 1. first task's accuracy over the whole stream, with a zoom on the first switch
    fig, (ax, az) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for i, v in enumerate(variants):
        x, m, s = _curve_mean(by_v[v], 0)
        ax.plot(x, m, color=colors(i), lw=1.2, label=v)
        ax.fill_between(x, m - s, m + s, color=colors(i), alpha=0.15)
        az.plot(x, m, color=colors(i), lw=1.4, label=v)
        az.fill_between(x, m - s, m + s, color=colors(i), alpha=0.15)
    bounds(ax)
    bounds(az)
    ax.set(xlabel="optimizer step", ylabel="accuracy on task 0", ylim=(-0.02, 1.02),
           title="Task 0 accuracy during the whole stream (mean ± std over seeds)")
    if len(boundaries) > 1:
        b0 = boundaries[0]
        span = (boundaries[1] - b0) if len(boundaries) > 1 else b0
        az.set_xlim(b0 - 0.1 * span, b0 + 0.6 * span)
    az.set(xlabel="optimizer step", ylim=(-0.02, 1.02), title="Zoom: the first task switch")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    p = run_dir / "task0_accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(("Accuracy on the first task: the dip after each switch is the stability gap", p))

    # 2. every task's curve, one panel per variant (the figure of De Lange et al.)
    n_tasks = len(boundaries)
    cols = min(3, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False, sharey=True)
    tcolors = plt.get_cmap("viridis")
    for k, v in enumerate(variants):
        ax = axes[k // cols][k % cols]
        for t in range(n_tasks):
            x, m, _ = _curve_mean(by_v[v], t)
            ax.plot(x, m, color=tcolors(t / max(1, n_tasks - 1)), lw=1.0, label=f"task {t}")
        bounds(ax)
        ax.set(title=v, ylim=(-0.02, 1.02), xlabel="optimizer step")
        if k % cols == 0:
            ax.set_ylabel("accuracy")
    for k in range(len(variants), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    p = run_dir / "task_curves.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    out.append(("Every task's accuracy, per variant (mean over seeds)", p))

    # 3. average accuracy over seen tasks
    fig, ax = plt.subplots(figsize=(13, 3.8))
    for i, v in enumerate(variants):
        x, m, s = _curve_mean(by_v[v], None)
        ax.plot(x, m, color=colors(i), lw=1.2, label=v)
        ax.fill_between(x, m - s, m + s, color=colors(i), alpha=0.15)
    bounds(ax)
    ax.set(xlabel="optimizer step", ylabel="mean accuracy over seen tasks", ylim=(-0.02, 1.02),
           title="Average accuracy on the tasks seen so far")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    p = run_dir / "average_accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(("Average accuracy over the tasks seen so far", p))

    # 4. final metrics side by side
    names = ["acc", "min_acc", "wc_acc", "forgetting", "gap_depth"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        vals = [[r["metrics"].get(k) for r in by_v[v]] for k in names]
        vals = [[np.nan if a is None else a for a in row] for row in vals]
        ax.bar(np.arange(len(names)) + i * width, [np.nanmean(a) for a in vals], width,
               yerr=[np.nanstd(a) for a in vals], color=colors(i), label=v, capsize=2)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, ["ACC", "min-ACC", "WC-ACC", "FORG", "gap depth"])
    ax.set(ylim=(0, 1.05), title="Final metrics per variant")
    ax.legend(fontsize=8, ncol=len(variants))
    fig.tight_layout()
    p = run_dir / "metrics.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(("Final metrics per variant (mean ± std over seeds)", p))
    return out


METRICS_NOTE = (
    "Mean ± sample std over seeds. ACC: final average accuracy; FORG: forgetting; min-ACC: mean over earlier "
    "tasks of their worst accuracy after being learned; WC-ACC: worst-case accuracy; WF<sup>w</sup>: windowed "
    "forgetting over w evaluations; gap depth: accuracy of a task at the switch minus its minimum during the next "
    "task, averaged over switches; recovery: steps after the switch until accuracy is back within ε of its switch "
    "value (mean over recovered switches). All accuracies on held-out data.")
GAP_NOTE = ("Accuracy on task 0 at the end of its own training, its minimum at any evaluation after that, its "
            "final value, and the depth and recovery time of the dip right after the first switch.")


def _continual_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from poise.runs.study import summarize

    windows = config["eval"]["windows"]
    table = summarize(results, windows)
    metric_keys = ["acc", "forgetting", "bwt", "min_acc", "wc_acc", *[f"wf{w}" for w in windows],
                   "gap_depth", "gap_recovery"]
    metric_heads = ["ACC", "FORG", "BWT", "min-ACC", "WC-ACC", *[f"WF<sup>{w}</sup>" for w in windows],
                    "gap depth", "recovery (steps)"]
    gap_keys = ["task0_acc_at_end", "task0_min_after", "task0_acc_final", "task0_gap_depth", "task0_gap_recovery"]
    gap_heads = ["acc at end of task 0", "min after", "final", "gap depth", "recovery (steps)"]
    return [
        {"title": "Metrics per variant", "note": METRICS_NOTE, "heads": metric_heads,
         "rows": [[html.escape(v)] + [_fmt(row[k]) for k in metric_keys] for v, row in table.items()]},
        {"title": "The stability gap on the first task", "note": GAP_NOTE, "heads": gap_heads,
         "rows": [[html.escape(v)] + [_fmt(row[k]) for k in gap_keys] for v, row in table.items()]},
    ]


def _optim_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from poise.runs.optim_study import summarize_optim

    table = summarize_optim(results)
    note = (f"Mean ± sample std over seeds. A loss spike: training loss above {config['spike_factor']}x its "
            f"running average (EMA 0.9). Diverged: loss non-finite or above {config['divergence_factor']}x its "
            "initial value; the run stops there and has no final validation loss.")
    heads = ["final val loss", "min train loss", "loss spikes", "diverged", "ms / step"]
    rows = []
    for v, row in table.items():
        sps = row["seconds_per_step"]
        ms = {k: (x * 1e3 if isinstance(x, float) and k in ("mean", "std") else x) for k, x in sps.items()}
        rows.append([html.escape(v), _fmt(row["final_val_loss"]), _fmt(row["min_train_loss"]),
                     _fmt(row["spikes"], 1), f"{row['diverged']['count']} / {row['diverged']['runs']}",
                     _fmt(ms, 1)])
    return [{"title": "Optimizers", "note": note, "heads": heads, "rows": rows}]


def _optim_plots(run_dir: Path, results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _rl_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from poise.runs.rl_study import summarize_rl

    table = summarize_rl(results)
    note = (
        "Mean ± sample std over seeds. Held-out accuracy: greedy decoding on problems never trained on, "
        "at the start of RL (after the warm start) and at the end. Reward: mean training reward over the "
        "last 5 steps. Entropy: mean token entropy of the trainer at the last step. |log ρ|: mean absolute "
        "log-ratio between the trainer and the (bfloat16) sampler on sampled tokens, the train-inference "
        f"mismatch. Collapsed: held-out accuracy fell below {config['train']['collapse_reward']} after having "
        "reached twice that, or the loss diverged.")
    heads = ["held-out acc (end)", "held-out acc (start)", "reward", "entropy", "|log ρ|", "collapsed",
             "samples generated", "acc gain / 1k samples", "s / step"]
    rows = [[html.escape(v), _fmt(r["final_acc"]), _fmt(r["start_acc"]), _fmt(r["final_reward"]),
             _fmt(r["final_entropy"]), _fmt(r["mismatch_abs"], 4),
             f"{r['collapsed']['count']} / {r['collapsed']['runs']}", _fmt(r["samples_generated"], 0),
             _fmt(r["acc_gain_per_1k_samples"], 3), _fmt(r["seconds_per_step"], 2)]
            for v, r in table.items()]
    return [{"title": "Objectives", "note": note, "heads": heads, "rows": rows}]


def _rl_plots(run_dir: Path, results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in results))
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", ":", "-."]

    def style(i: int) -> dict[str, Any]:
        return {"color": cmap(i % 20), "ls": styles[(i // 20) % len(styles)]}

    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    panels = [("reward", "training reward"), ("entropy", "token entropy"), (None, "held-out accuracy (greedy)"),
              ("mismatch_abs", "train-inference mismatch |log ρ|"), ("clip_frac", "clip fraction"),
              ("grad_norm", "gradient norm")]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, v in enumerate(variants):
            rs = [x for x in results if x["variant"] == v]
            if key is None:
                n = min(len(r["eval_acc"]) for r in rs)
                y = np.mean([r["eval_acc"][:n] for r in rs], axis=0)
                ax.plot(rs[0]["eval_steps"][:n], y, marker=".", lw=1.2, label=v, **style(i))
            else:
                n = min(len(r["curves"][key]) for r in rs)
                if n == 0:
                    continue
                y = np.mean([r["curves"][key][:n] for r in rs], axis=0)
                ax.plot(range(1, n + 1), y, lw=1.1, label=v, **style(i))
            for r in rs:
                event = r.get("collapsed_at") or r.get("diverged_at")
                if event:
                    ax.axvline(event, lw=1, **style(i))
        ax.set(title=title, xlabel="RL step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, ncol=1 if len(variants) <= 24 else 2)
    fig.tight_layout(rect=(0, 0, 0.86 if len(variants) <= 24 else 0.78, 1))
    p = run_dir / "rl_curves.png"
    fig.savefig(p, dpi=95)
    plt.close(fig)
    return [("Mean over seeds per variant: reward, entropy, held-out accuracy, mismatch, clip fraction and "
             "gradient norm (a vertical line marks a collapse or divergence)", p)]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _edit_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from poise.runs.edit_study import summarize_edit

    table = summarize_edit(results)
    s = config["stream"]
    note = (f"{s['n_edits']} counterfactual edits, {s['per_request']} per request, into blocks[{s['layer']}].mlp[2] "
            f"(keys at the {s['position']} token). Efficacy: the new keyword is the most probable of its theme's "
            "eight values after the edited prompt; paraphrase: the same after the two other templates; early "
            "retention: efficacy on the first 10% of edits at the end; locality: unedited facts whose prediction "
            "did not move; general loss: next-token loss on held-out theme sentences (before: "
            f"{_fmt({'mean': results[0]['metrics']['base_general_loss']})}); forget accuracy: forgotten facts "
            "still answered (lower is better). Mean ± std over seeds.")
    heads = ["efficacy", "paraphrase", "early retention", "locality", "locality acc", "general loss",
             "forget acc", "|ΔW|/|W|", "editor s"]
    rows = [[html.escape(v), *(_fmt(r.get(k)) for k in ("efficacy", "paraphrase", "retention_early", "locality",
                                                        "locality_acc", "general_loss", "forget_acc",
                                                        "weight_change")), _fmt(r["edit_seconds"], 2)]
            for v, r in table.items()]
    return [{"title": "Editors", "note": note, "heads": heads, "rows": rows}]


def _edit_plots(run_dir: Path, results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    plt = _plt()
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, v in enumerate(variants):
        for j, r in enumerate(r for r in results if r["variant"] == v):
            x = [c["edits"] for c in r["curve"]]
            for ax, k in zip(axes, ("retention_early", "locality"), strict=True):
                ax.plot(x, [c[k] for c in r["curve"]], color=colors(i), lw=1.2, label=v if j == 0 else None)
    axes[0].axhline(1 / 8, color="#999", ls=":", lw=1, label="chance (1 of 8 values)")
    axes[0].set(xlabel="edits done", ylabel="efficacy on the first 10% of edits", ylim=(-0.02, 1.02),
                title="Retention of early edits along the stream")
    axes[1].set(xlabel="edits done", ylabel="unedited facts unchanged", ylim=(-0.02, 1.02), title="Locality")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = run_dir / "edit_stream.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [("Retention and locality along the stream (one line per seed)", p)]


def _priming_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from poise.runs.priming_study import summarize_priming

    table = summarize_priming(results)
    note = ("Per learned fact, log priming = log of the mean over the theme's unrelated contexts of "
            "P_after(keyword) / P_before(keyword); log memorisation = the same in the fact's own context; "
            "predictor = log P_before(keyword | own context). ρ: Spearman correlation of the predictor with log "
            "priming over the facts (the paper reports a negative one). Mean ± std over seeds.")
    heads = ["log priming", "log memorisation", "predictor (mean)", "ρ(predictor, priming)",
             "ρ(context prob, priming)"]
    rows = [[html.escape(v), *(_fmt(r[k]) for k in ("log_priming", "log_memorization", "keyword_before",
                                                   "spearman_predictor", "spearman_context"))]
            for v, r in table.items()]
    return [{"title": "Knowledge insertion", "note": note, "heads": heads, "rows": rows}]


def _priming_plots(run_dir: Path, results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
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


def build_report(run_dir: str | Path) -> Path:
    """Write the plots and ``report.html`` of ``run_dir``; return the report's path."""
    try:
        import jinja2
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("the report needs matplotlib and jinja2: pip install 'poise[report]'") from e
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    config, summary, results = _load(run_dir)
    if not results:
        raise FileNotFoundError(f"{run_dir} has no finished runs yet (results/ is empty)")
    if config.get("kind") == "optimizers":
        tables, images = _optim_tables(config, results), _optim_plots(run_dir, results)
    elif config.get("kind") == "rl":
        tables, images = _rl_tables(config, results), _rl_plots(run_dir, results)
    elif config.get("kind") == "edit":
        tables, images = _edit_tables(config, results), _edit_plots(run_dir, results)
    elif config.get("kind") == "priming":
        tables, images = _priming_tables(config, results), _priming_plots(run_dir, results)
    else:
        tables, images = _continual_tables(config, results), _plots(run_dir, config, results)
    import torch

    import poise

    env = jinja2.Environment(autoescape=False)
    page = env.from_string(_TEMPLATE).render(
        study=html.escape(config["name"]),
        description=html.escape(config.get("description", "")),
        status="complete" if summary.get("complete") else "INCOMPLETE (some runs missing)",
        n_runs=len(results), n_variants=len({r["variant"] for r in results}), seeds=config["seeds"],
        wall=f"{summary.get('wall_seconds', float('nan')):.0f} s",
        version=poise.__version__, torch=torch.__version__, python=platform.python_version(),
        tables=tables,
        images=[(html.escape(t), base64.b64encode(p.read_bytes()).decode()) for t, p in images],
        config=html.escape(json.dumps(config, indent=2)),
    )
    out = run_dir / "report.html"
    out.write_text(page)
    return out

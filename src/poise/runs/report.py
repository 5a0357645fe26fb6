"""Build the report of a run directory: PNG plots and one self-contained ``report.html``.

The page is generic; each study kind supplies its tables and plots (``StudyKind.tables`` /
``StudyKind.plots``, :mod:`poise.runs.kinds`) and may use the helpers :func:`_fmt` and :func:`_plt`.

Needs the ``report`` extra (matplotlib, jinja2). Reads only files in the run directory, so
``poise report RUN_DIR`` rebuilds it at any time, including for an unfinished run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
from pathlib import Path
from typing import Any

__all__ = ["build_report", "run_rows", "write_summaries"]

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>poise · {{ study }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
.quick { background: #fff3cd; border: 1px solid #e0c36a; padding: 0.6em 1em; }
.claim { border: 1px solid #bbb; border-left: 6px solid #999; padding: 0.6em 1em; margin: 0.8em 0; }
.claim.reproduced { border-left-color: #2e7d32; } .claim.not-reproduced { border-left-color: #c62828; }
.claim.inconclusive { border-left-color: #f9a825; }
.verdict { font-weight: bold; text-transform: uppercase; }
.diverged { background: #fdecea; border: 1px solid #e57373; padding: 0.6em 1em; }
.scroll { overflow-x: auto; max-width: 100%; }
summary { cursor: pointer; color: #333; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
</style></head><body>
<h1>{{ study }}</h1>
<p>{{ description }}</p>
{% if quick %}<p class="quick"><b>Smoke run (--quick): not for conclusions.</b> One seed and fewer steps
({{ quick_overrides }}), so the description above gives the full study's sizes; no interval can be formed and
the numbers are not the study's.</p>{% endif %}
{% for c in claims %}<div class="claim {{ c.verdict.replace(' ', '-') }}">
<p><span class="verdict">{{ c.verdict }}</span> · {{ c.text }} ({{ c.paper }})</p>
<p class="note">Tested as {{ c.better }} − {{ c.than }} &gt; {{ c.margin }} over {{ c.n }} paired seeds: estimate
{{ c.est }}, 95% interval {{ c.ci }}. {{ c.why }}.{% if c.paper_value %} Paper: {{ c.paper_value }}.{% endif %}</p>
</div>{% endfor %}
{% if diverged %}<div class="diverged"><b>Diverged runs</b> (flagged, left out of every mean):
<ul>{% for d in diverged %}<li>{{ d }}</li>{% endfor %}</ul></div>{% endif %}
<p class="note">{{ status }} · {{ n_runs }} runs ({{ n_variants }} variants × seeds {{ seeds }}) ·
wall time {{ wall }} · poise {{ version }}, torch {{ torch }}, Python {{ python }}</p>

{% for t in tables %}<h2>{{ t.title }}</h2>
<p class="note">{{ t.note }}</p>
<div class="scroll"><table><tr><th>variant</th>{% for h in t.heads %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table></div>
{% endfor %}

{% for title, img in images %}<h3>{{ title }}</h3><img src="data:image/png;base64,{{ img }}" alt="{{ title }}">
{% endfor %}

{% if per_seed_rows %}<h2>Every run</h2>
<details><summary>{{ per_seed_rows|length }} runs, one row per variant and seed (the values behind every mean;
also in runs.csv)</summary>
<div class="scroll"><table><tr>{% for h in per_seed_heads %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in per_seed_rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table></div></details>{% endif %}

<h2>Reproduce</h2>
<p class="note">Run this study again exactly as it ran (its resolved config), into a new folder:</p>
<pre>{{ reproduce }}</pre>
{% if command %}<p class="note">It was started as:</p><pre>{{ command }}</pre>{% endif %}
<p class="note">Raw files: {% for name in files %}<a href="{{ name }}">{{ name }}</a>{% if not loop.last %} ·
{% endif %}{% endfor %}</p>
{% if run_files %}<details><summary>per-run files ({{ run_files|length }})</summary><p class="note">
{% for name in run_files %}<a href="{{ name }}">{{ name }}</a><br>{% endfor %}</p></details>{% endif %}

<h2>Resolved config</h2>
<details><summary>config.json ({{ config_lines }} lines): the recipe after defaults and overrides</summary>
<pre>{{ config }}</pre></details>
</body></html>
"""


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "–"
    m, s = stat["mean"], stat.get("std") or 0.0
    if stat.get("n") == 1:  # one seed: no spread to show (never "± 0.000")
        return f"{m:.0f}" if abs(m) >= 100 else f"{m:.{digits}f}"
    if abs(m) >= 100:
        return f"{m:.0f} ± {s:.0f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _load(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    config = json.loads((run_dir / "config.json").read_text())
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*.json"))]
    from poise.runs.kinds import kind_of

    key = kind_of(config).variant_key
    order = {v.get("name") or v.get(key): i for i, v in enumerate(config.get("variants", []))}
    results.sort(key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
    return config, summary, results


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def run_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per run (variant, seed, then every scalar the run reported, its ``metrics`` table
    flattened in): the per-seed view behind every mean. Returns ``(columns, rows)``."""
    cols: dict[str, None] = {"variant": None, "seed": None, "diverged_at": None}
    flat = []
    for r in results:
        row = {k: v for k, v in r.items() if _scalar(v)}
        if isinstance(r.get("metrics"), dict):
            for k, v in r["metrics"].items():
                if _scalar(v):
                    row[k] = v
                elif isinstance(v, dict):  # one level of nesting, dotted (strategy.compression)
                    row.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if _scalar(v2)})
        cols.update(dict.fromkeys(row))
        flat.append(row)
    names = list(cols)
    return names, [[row.get(c) for c in names] for row in flat]


def _plain(cell: Any) -> str:
    """A table cell of the HTML report as plain text (tags dropped, entities decoded)."""
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", str(cell).replace("<sup>", "^")))


def write_summaries(run_dir: str | Path) -> list[Path]:
    """Write ``summary.csv`` (one row per variant: mean, std and n of every metric), ``runs.csv``
    (one row per run and seed) and ``summary.md`` (the report's claims and tables in Markdown)
    beside ``summary.json``. Needs no extra; ``poise run`` writes them at the end of a study and
    ``poise report`` rewrites them."""
    import csv

    from poise.runs.kinds import kind_of
    from poise.runs.store import atomic_write_text

    run_dir = Path(run_dir)
    config, summary, results = _load(run_dir)
    kind = kind_of(config)
    out = []
    rows = summary.get("variants", {})
    metrics = list(dict.fromkeys(k for row in rows.values() for k, v in row.items()
                                 if isinstance(v, dict) and "mean" in v))
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", *[f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")], "diverged", "runs"])
    for v, row in rows.items():
        d = row.get("diverged", {})
        w.writerow([v, *[_csv(_stat(row.get(m), s)) for m in metrics for s in ("mean", "std", "n")],
                    d.get("count", 0), d.get("runs", "")])
    out.append(run_dir / "summary.csv")
    atomic_write_text(out[-1], buf.getvalue())
    cols, per_run = run_rows(results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows([[_csv(c) for c in r] for r in per_run])
    out.append(run_dir / "runs.csv")
    atomic_write_text(out[-1], buf.getvalue())
    md = [f"# {config['name']}", "", config.get("description", ""), ""]
    if summary.get("quick") or config.get("quick"):
        md += ["**Smoke run (--quick): not for conclusions.**", ""]
    for c in summary.get("claims") or []:
        ci = c.get("interval")
        md += [f"- **{c['verdict']}**: {c['text']} ({c['paper']}); estimate "
               f"{'–' if c.get('estimate') is None else format(c['estimate'], '.4g')}, 95% interval "
               f"{'–' if not ci else f'[{ci[0]:.4g}, {ci[1]:.4g}]'} over {c.get('n')} seeds"]
    ok = [r for r in results if r.get("diverged_at") is None]
    for r in results:
        if r.get("diverged_at") is not None:
            md.append(f"- diverged: {r['variant']} seed {r['seed']} at step {r['diverged_at']} (left out of means)")
    for t in kind.tables(config, ok) if ok else []:
        md += ["", f"## {_plain(t['title'])}", "", _plain(t.get("note", "")), "",
               "| variant | " + " | ".join(_plain(h) for h in t["heads"]) + " |",
               "|---" * (len(t["heads"]) + 1) + "|"]
        md += ["| " + " | ".join(_plain(c).replace("|", "\\|") for c in row) + " |" for row in t["rows"]]
    out.append(run_dir / "summary.md")
    atomic_write_text(out[-1], "\n".join(md) + "\n")
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _stat(st: dict[str, Any] | None, part: str) -> Any:
    st = st or {}
    if part == "std" and (st.get("n") or 0) < 2:  # one seed has no spread: blank, never 0
        return None
    return st.get(part)


def _csv(v: Any) -> Any:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


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
    write_summaries(run_dir)
    from poise.runs.kinds import kind_of

    kind = kind_of(config)
    ok = [r for r in results if r.get("diverged_at") is None]  # a diverged run is flagged, never averaged
    tables = kind.tables(config, ok) if ok else []
    images = kind.plots(run_dir, config, results)
    diverged = [f"{html.escape(str(r['variant']))} (seed {r['seed']}): diverged at step {r['diverged_at']}"
                for r in results if r.get("diverged_at") is not None]
    claims = summary.get("claims") or []
    import shlex
    from urllib.parse import quote

    import torch

    import poise

    run_json = {}
    try:
        run_json = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        pass
    heads, per_seed = run_rows(results)
    files = [n for n in ("config.json", "run.json", "summary.json", "summary.csv", "runs.csv", "summary.md")
             if (run_dir / n).is_file()]
    run_files = sorted(str(p.relative_to(run_dir)) for sub in ("results", "metrics") if (run_dir / sub).is_dir()
                       for p in (run_dir / sub).iterdir() if p.is_file())
    env = jinja2.Environment(autoescape=False)
    page = env.from_string(_TEMPLATE).render(
        study=html.escape(config["name"]),
        description=html.escape(config.get("description", "")),
        status="complete" if summary.get("complete") else "INCOMPLETE (some runs missing)",
        n_runs=len(results), n_variants=len({r["variant"] for r in results}), seeds=config["seeds"],
        wall=f"{summary.get('wall_seconds', float('nan')):.0f} s",
        version=poise.__version__, torch=torch.__version__, python=platform.python_version(),
        quick_overrides=html.escape(", ".join(kind.quick)),
        tables=tables, diverged=diverged, quick=bool(summary.get("quick") or config.get("quick")),
        claims=[{**c, "text": html.escape(c["text"]), "paper": html.escape(c["paper"]),
                 "paper_value": html.escape(c.get("paper_value", "")), "better": html.escape(c["better"]),
                 "than": html.escape(c["than"]), "why": html.escape(_sentence(c.get("why", ""))),
                 "est": "–" if c.get("estimate") is None else f"{c['estimate']:.4g}",
                 "ci": "–" if not c.get("interval") else f"[{c['interval'][0]:.4g}, {c['interval'][1]:.4g}]"}
                for c in claims],
        images=[(html.escape(t), base64.b64encode(p.read_bytes()).decode()) for t, p in images],
        per_seed_heads=[html.escape(h) for h in heads],
        per_seed_rows=[[html.escape(_cell(c)) for c in row] for row in per_seed],
        reproduce=html.escape(f"poise run {shlex.quote(str(run_dir / 'config.json'))} --run-dir NEW_DIR"),
        command=html.escape(run_json.get("command") or ""),
        files=[html.escape(quote(n)) for n in files], run_files=[html.escape(quote(n)) for n in run_files],
        config=html.escape(json.dumps(config, indent=2)), config_lines=len(json.dumps(config, indent=2).splitlines()),
    )
    out = run_dir / "report.html"
    out.write_text(page)
    return out

"""A study's claim, tested: a paired comparison over seeds with a 95% interval and a computed verdict.

A recipe states its paper's claim in ``[[claims]]`` tables::

    [[claims]]
    text = "Replay's accuracy on earlier tasks dips right after a switch: min-ACC < ACC"
    paper = "arXiv 2205.13452"
    paper_value = "a dip of 0.2-0.6 on split MNIST/CIFAR (their Fig. 1)"
    better = { variant = "replay", metric = "acc" }
    than = { variant = "replay", metric = "min_acc" }
    margin = 0.05

The claim is ``better - than > margin``. Per seed where both runs finished (not diverged) the
difference ``d_s`` is taken; the estimate is their mean and the interval ``mean ± t_{n-1,0.975}
sd / sqrt(n)`` (Student t over seeds). Verdict: ``reproduced`` when the whole interval is above
``margin``, ``not reproduced`` when the whole interval is at or below it (the effect is absent or
smaller), ``inconclusive`` when the interval straddles it or fewer than two seeds are usable;
``untested`` when the study has no runs of a variant the claim names. The
interval's half-width is the smallest effect this study can resolve (reported as ``resolution``).

Metrics are looked up in a run's result: ``result["metrics"][metric]``, else ``result[metric]``;
a dotted name (``per_task.0.gap_depth``) walks nested tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClaimConfig", "Side", "VERDICTS", "evaluate_claim", "run_metric"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "untested")

# Student t quantiles t_{df, 0.975} for df = 1..30; beyond, the normal 1.96 is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class Side:
    variant: str = _help("variant name", default="")
    metric: str = _help("metric of that variant's runs (result['metrics'][m] or result[m]; dotted for nested)",
                        default="")
    value: float | None = _help("a constant instead of a variant's metric (e.g. 0 for 'the correlation is "
                                "negative'); then leave variant and metric empty", default=None)

    def label(self) -> str:
        return f"{self.value:g}" if self.value is not None else f"{self.variant}.{self.metric}"


@dataclass
class ClaimConfig:
    text: str = _help("the claim in words", default="")
    paper: str = _help("where it comes from (arXiv id)", default="")
    paper_value: str = _help("the paper's own number for it, as text", default="")
    better: Side = _help("the side the claim says is larger", default_factory=Side)
    than: Side = _help("the side it is compared with (paired by seed)", default_factory=Side)
    margin: float = _help("the claim is better - than > margin", default=0.0)


def run_metric(result: dict[str, Any], metric: str) -> float | None:
    """A run's metric as a finite float, or None (missing, None or non-finite)."""
    for root in (result.get("metrics") or {}, result):
        node: Any = root
        for part in metric.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node) if math.isfinite(node) else None
    return None


def evaluate_claim(claim: ClaimConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The claim's estimate, 95% interval over seeds, resolution and verdict (see the module doc).
    Diverged runs (``diverged_at`` set) are left out and counted."""
    def side(s: Side) -> dict[int, float | None]:
        if s.value is not None:  # a constant: every usable seed of the other side pairs with it
            other = claim.than if s is claim.better else claim.better
            return {r["seed"]: float(s.value) for r in results if r.get("variant") == other.variant}
        return {r["seed"]: run_metric(r, s.metric) for r in results
                if r.get("variant") == s.variant and r.get("diverged_at") is None}

    present = {r.get("variant") for r in results}
    missing = [s.variant for s in (claim.better, claim.than) if s.value is None and s.variant not in present]
    diverged = sorted({(r["variant"], r["seed"]) for r in results if r.get("diverged_at") is not None
                       and r.get("variant") in (claim.better.variant, claim.than.variant)})
    if missing:
        return {"text": claim.text, "paper": claim.paper, "paper_value": claim.paper_value,
                "better": claim.better.label(), "than": claim.than.label(), "margin": claim.margin, "n": 0, "seeds": [],
                "diverged_runs": [], "estimate": None, "interval": None, "resolution": None, "verdict": "untested",
                "why": f"no runs of variant {', '.join(map(repr, missing))} in this study"}
    a, b = side(claim.better), side(claim.than)
    seeds = sorted(s for s in a.keys() & b.keys() if a[s] is not None and b[s] is not None)
    d = [a[s] - b[s] for s in seeds]  # type: ignore[operator]
    out: dict[str, Any] = {
        "text": claim.text, "paper": claim.paper, "paper_value": claim.paper_value,
        "better": claim.better.label(), "than": claim.than.label(),
        "margin": claim.margin, "n": len(d), "seeds": seeds, "diverged_runs": [list(x) for x in diverged],
        "estimate": None, "interval": None, "resolution": None,
    }
    if len(d) < 2:
        out.update(verdict="inconclusive",
                   why=f"{len(d)} usable seed{'s' * (len(d) != 1)}: an interval needs at least 2")
        if d:
            out["estimate"] = d[0]
        return out
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if sd == 0:  # every seed gave the same difference: a quantised or saturated metric, not a zero-width interval
        out.update(estimate=mean, verdict="inconclusive",
                   why=f"the same difference {mean:.4g} on all {n} seeds (zero spread): no interval can be formed; "
                       "the metric is saturated or too coarse to compare these variants")
        return out
    if lo > claim.margin:
        verdict, why = "reproduced", f"the 95% interval [{lo:.4g}, {hi:.4g}] lies above {claim.margin:g}"
    elif hi <= claim.margin:
        verdict, why = "not reproduced", f"the 95% interval [{lo:.4g}, {hi:.4g}] lies at or below {claim.margin:g}"
    else:
        verdict, why = "inconclusive", (f"the 95% interval [{lo:.4g}, {hi:.4g}] contains {claim.margin:g}: "
                                        f"{n} seeds resolve effects of about ±{half:.3g}")
    out.update(estimate=mean, interval=[lo, hi], resolution=half, verdict=verdict, why=why)
    return out

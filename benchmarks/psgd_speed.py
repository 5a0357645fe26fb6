"""PSGD-Kron step time and state memory: poise against pytorch_optimizer.Kron and heavyball.PSGDKron.

    python benchmarks/psgd_speed.py [--repeats 15] [--models mlp,transformer] [--tiny] [--heavyball-compile]

Same structure as benchmarks/optim_step.py: for each model (a 3-layer MLP, 1024 wide; a small
transformer; ``--tiny``: 128 wide / d=64, 1 layer, for checking the script), every implementation
steps on the same fixed gradients, timed round-robin in one process (machine noise hits all
alike); each figure is the median over ``--repeats`` rounds of one ``step()`` after ``--warmup``
steps. "vs poise" divides by poise's time (> 1: the peer is slower); torch.optim.AdamW(fused=True)
is the common baseline.

PSGD's cost depends on whether the step fits the preconditioner, so each implementation is timed
in two settings: ``fit`` (update probability 1: every step fits Q, the first ~500 steps of the
default schedule) and ``apply`` (probability 1e-4: no fit in the timed steps, i.e. late training,
where the schedule's floor is 0.03). Same hyperparameters for all: lr 1e-3, momentum 0.9,
max_size_triangular 8192 (heavyball's default 2048 is raised to it). Also printed: the optimizer
state in bytes per parameter against the algorithm's figure (fp32 momentum + n_i^2 per triangular
factor, n_i per diagonal one; heavyball stores the triangles as lines, about half).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import poise.optim as P

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _common import round_robin  # noqa: E402

MAX_TRI = 8192


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width))


def transformer(d: int, layers: int, vocab: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=4, dim_feedforward=4 * d, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    return nn.Sequential(nn.Embedding(vocab, d), encoder)


def implementations(prob: float, compile_hb: bool) -> dict[str, object]:
    """implementation name -> factory(params), all at one update probability."""
    out: dict[str, object] = {"poise": lambda ps: P.PSGDKron(ps, lr=1e-3, precond_update_prob=prob,
                                                              max_size_triangular=MAX_TRI)}
    try:
        import pytorch_optimizer as po

        out["pytorch_optimizer"] = lambda ps: po.Kron(ps, lr=1e-3, pre_conditioner_update_probability=prob,
                                                      max_size_triangular=MAX_TRI)
    except ImportError:
        pass
    try:
        import heavyball as hb
        import heavyball.utils as hu

        def make(ps):
            hu.compile_mode = "max-autotune-no-cudagraphs" if compile_hb else None
            return hb.PSGDKron(ps, lr=1e-3, betas=(0.9, 0.999), preconditioner_update_probability=prob,
                               max_size_triangular=MAX_TRI)

        out["heavyball"] = make
    except ImportError:
        pass
    return out


def theoretical(params: list[torch.Tensor]) -> float:
    """fp32 momentum plus the factors: n_i^2 for a triangular one (2+ dims, 1 < n_i <= 8192), else n_i."""
    n = sum(p.numel() for p in params)
    b = 0.0
    for p in params:
        b += 4 * p.numel()
        tri = p.dim() >= 2
        b += 4 * sum(d * d if tri and 1 < d <= MAX_TRI else d for d in p.shape) if p.dim() else 4
    return b / n


def bench(model_fn, prob: float, compile_hb: bool, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    base = model_fn()
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    impls = [("torch_fused_adamw", lambda ps: torch.optim.AdamW(ps, fused=True))]
    impls += list(implementations(prob, compile_hb).items())
    runs = []
    for name, fn in impls:
        m = model_fn()
        m.load_state_dict(base.state_dict())
        ps = list(m.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                opt, err = fn(ps), None
            except Exception as e:  # a peer that cannot be built is reported, not fatal
                opt, err = None, f"{type(e).__name__}: {e}"[:80]
        runs.append({"impl": name, "params": ps, "opt": opt, "times": [], "error": err})

    return round_robin(runs, grads, warmup, repeats, quiet=True)


def report(title: str, setting: str, runs: list[dict]) -> None:
    adamw = next(r for r in runs if r["impl"] == "torch_fused_adamw")["median"]
    ours = next((r["median"] for r in runs if r["impl"] == "poise"), None)
    theory = theoretical(runs[0]["params"])
    print(f"\n## {title}, {setting}  ({sum(p.numel() for p in runs[0]['params']) / 1e6:.2f}M parameters)")
    print(f"{'implementation':<20}{'median ms':>10}{'vs poise':>10}{'vs AdamW fused':>16}{'state B/param':>15}"
          f"{'theory':>8}")
    for r in runs:
        if r["error"]:
            print(f"{r['impl']:<20}  failed: {r['error']}")
            continue
        vs = f"{r['median'] / ours:.2f}x" if ours else "-"
        th = "8.0" if r["impl"] == "torch_fused_adamw" else f"{theory:.1f}"
        print(f"{r['impl']:<20}{r['median'] * 1e3:>10.2f}{vs:>10}{r['median'] / adamw:>15.1f}x"
              f"{r['state_bpp']:>15.1f}{th:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--settings", default="fit,apply", help="fit (probability 1), apply (1e-4), or both")
    ap.add_argument("--tiny", action="store_true", help="small models, to check that the script runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heavyball-compile", action="store_true", help="let heavyball torch.compile its steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    width, d, layers, vocab = (128, 64, 1, 256) if a.tiny else (1024, 256, 4, 2048)
    models = {"mlp": (f"3-layer MLP, {width} wide", lambda: mlp(width)),
              "transformer": (f"transformer, d={d}, {layers} layer(s)", lambda: transformer(d, layers, vocab))}
    probs = {"fit": (1.0, "fit every step"), "apply": (1e-4, "apply only (no fit)")}
    names = sorted(set(implementations(1.0, False)) - {"poise"})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {a.repeats}; peers: "
          f"{', '.join(names) or 'none installed'}")
    for key in a.models.split(","):
        if key not in models:
            raise SystemExit(f"--models: unknown {key!r}; valid: {', '.join(models)}")
        title, fn = models[key]
        for setting in a.settings.split(","):
            if setting not in probs:
                raise SystemExit(f"--settings: unknown {setting!r}; valid: {', '.join(probs)}")
            prob, label = probs[setting]
            report(title, label, bench(fn, prob, a.heavyball_compile, a.repeats, a.warmup))


if __name__ == "__main__":
    main()

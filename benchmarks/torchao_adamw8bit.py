"""torchao's 8-bit AdamW on CPU against torch's AdamW and poise's optimizers: step time, state memory, loss.

    PYTHONPATH=/tmp/torchao_try python benchmarks/torchao_adamw8bit.py [--repeats 3] [--full] [--steps 200]

torchao is not a poise dependency; install it beside the venv without touching its torch, e.g.
``pip install --no-deps --target /tmp/torchao_try torchao`` and put that folder on PYTHONPATH.
Without an importable ``torchao.optim.AdamW8bit`` the script prints why and exits 0.

1. Step time: every implementation steps on the same fixed gradients of one model (the default is
   tiny, to check the script: an MLP 256 wide; ``--full``: 1024 wide, 3 layers), timed round-robin
   in one process after ``--warmup`` steps (torchao's first step compiles its kernel with
   torch.compile), median of ``--repeats``; "vs torch" divides by torch.optim.AdamW(fused=True).
2. State bytes per parameter, counting a tensor subclass (torchao's ``OptimState8bit``) by its
   inner tensors (uint8 codes, float32 block scales, the 256-entry code map), not its logical size.
3. Loss: a small MLP regressing a fixed random teacher for ``--steps`` steps from one seed, the
   same batches for all; final and mean-of-last-10 training loss. torchao quantises only tensors
   of at least 4096 entries (its ``block_size`` 256); smaller ones keep float32 state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import poise.optim as P

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _common import round_robin  # noqa: E402


def load_torchao() -> tuple[object | None, str]:
    try:
        import torchao
        from torchao.optim import AdamW8bit
    except Exception as e:  # ImportError, or a binary that does not match this torch
        return None, f"{type(e).__name__}: {e}"
    return AdamW8bit, f"torchao {getattr(torchao, '__version__', '?')}"


def impls(adamw8bit: object) -> dict[str, object]:
    kw = dict(lr=1e-3, weight_decay=1e-2)
    return {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
        "torchao AdamW8bit": lambda ps: adamw8bit(ps, **kw),
        "poise AdamW": lambda ps: P.AdamW(ps, **kw),
        "poise Muon": lambda ps: P.Muon(ps, lr=0.02, adam_lr=1e-3),
        "poise PSGDKron": lambda ps: P.PSGDKron(ps, lr=1e-3),
    }


def mlp(width: int, depth: int, d_in: int = 64, d_out: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def timing(make: dict[str, object], model_fn, repeats: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    base = model_fn()
    grads = [torch.randn_like(p) * 1e-2 for p in base.parameters()]
    runs = []
    for name, fn in make.items():
        m = model_fn()
        m.load_state_dict(base.state_dict())
        ps = list(m.parameters())
        runs.append({"impl": name, "params": ps, "opt": fn(ps), "times": [], "error": None})

    round_robin(runs, grads, warmup, repeats)
    for r in runs:
        r["bpp"] = r["state_bpp"]
    return runs


def losses(make: dict[str, object], model_fn, steps: int) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    teacher = mlp(32, 1)
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    batches = [torch.randn(64, 64, generator=g) for _ in range(steps)]
    with torch.no_grad():
        targets = [teacher(x) for x in batches]
    out = {}
    for name, fn in make.items():
        torch.manual_seed(1)
        m = model_fn()
        opt = fn(list(m.parameters()))
        hist = []
        try:
            for x, y in zip(batches, targets, strict=True):
                opt.zero_grad()
                loss = nn.functional.mse_loss(m(x), y)
                loss.backward()
                opt.step()
                hist.append(loss.item())
            out[name] = (hist[-1], statistics.mean(hist[-10:]), hist[0])
        except Exception as e:  # reported, not fatal
            out[name] = (float("nan"), float("nan"), float("nan"))
            print(f"{name}: failed in training: {type(e).__name__}: {e}"[:160])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100, help="training steps of the loss comparison")
    ap.add_argument("--full", action="store_true", help="a 1024-wide 3-layer MLP for timing (default: 256, 2)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    adamw8bit, why = load_torchao()
    if adamw8bit is None:
        print(f"torchao's AdamW8bit is not importable, skipping: {why}\n(install it beside the venv: pip install "
              "--no-deps --target /tmp/torchao_try torchao; run with PYTHONPATH=/tmp/torchao_try)")
        return
    warnings.filterwarnings("ignore")
    width, depth = (1024, 3) if a.full else (256, 2)
    make = impls(adamw8bit)
    print(f"torch {torch.__version__}, {why}, threads {torch.get_num_threads()}, repeats {a.repeats}, device cpu")
    runs = timing(make, lambda: mlp(width, depth), a.repeats, a.warmup)
    base = next(r["median"] for r in runs if r["impl"] == "torch AdamW fused")
    n = sum(p.numel() for p in runs[0]["params"])
    print(f"\n## step time and state, MLP {width} wide x {depth} ({n / 1e6:.2f}M parameters)")
    print(f"{'implementation':<22}{'median ms':>10}{'vs torch':>10}{'state B/param':>15}")
    for r in runs:
        if r["error"]:
            print(f"{r['impl']:<22}  failed: {r['error']}")
            continue
        print(f"{r['impl']:<22}{r['median'] * 1e3:>10.2f}{r['median'] / base:>9.2f}x{r['bpp']:>15.2f}")
    res = losses(make, lambda: mlp(128, 2), a.steps)
    print(f"\n## training loss, MLP 128 wide x 2 on a random teacher, {a.steps} steps, lr 1e-3 (Muon 0.02)")
    print(f"{'implementation':<22}{'first':>10}{'final':>10}{'last-10 mean':>14}")
    for name, (last, mean10, first) in res.items():
        print(f"{name:<22}{first:>10.4f}{last:>10.4f}{mean10:>14.4f}")


if __name__ == "__main__":
    main()

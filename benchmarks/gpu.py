"""GPU benchmark: poise's optimizers and RL step against their peers, in one bounded run.

    python benchmarks/gpu.py --out DIR [--tiny] [--budget-s 420] [--sections optimizers,nonfinite,rl]

Made for a machine that is lent for minutes (an NVIDIA H200): the whole run keeps inside
``--budget-s`` seconds. Each section has a deadline (a fraction of the budget, ``PLAN``); before
each piece of work it checks the clock and, past the deadline, records what it skipped and why
instead of running over. ``DIR/gpu.json`` (written atomically) and ``DIR/gpu.md`` are rewritten
after every optimizer and every section, so a run killed at its time limit loses only the piece
in flight. On a machine without CUDA it runs on the CPU; ``--tiny`` shrinks every shape (use it
there: ``tests/benchmarks/test_gpu_script.py`` runs it so in about half a minute).

Sections
--------
They run in this order: optimizers in bfloat16, nonfinite, rl, optimizers in float32 (the
figure asked for first; float32 gets what time is left).

``optimizers`` (one section per parameter dtype): a GPT-2-124M-shaped
model (``transformers.GPT2Config``: 12 layers, 12 heads, width 768, vocabulary 50257, 1024
positions; random weights, nothing downloaded; ``--tiny``: 2 layers, width 64, vocabulary 512).
Every implementation gets its own copy of the parameters and steps on the same fixed gradients:
torch ``AdamW(fused=True)`` (the baseline every row is divided by), poise's AdamW, SOAP,
StableSPAM, GaLoreAdamW, Muon (and PSGD-Kron when ``poise.optim`` exports it), and the peers
that implement the same algorithm: torch (foreach AdamW, ``torch.optim.Muon``), heavyball (AdamW,
SOAP, Muon, PSGDKron; compiled on CUDA through ``heavyball.utils.compile_mode``),
pytorch_optimizer (AdamW, SOAP, StableSPAM, GaLore, Muon, Kron) and galore-torch. A peer that
is not installed or raises is recorded, not fatal. Step time: CUDA events around ``step()``
with the device synchronised before and after (``time.perf_counter`` on CPU), after warm-up
steps (more for compiled ones), median over ``--repeats`` rounds taken round-robin (every
implementation once per round, so drifts in clock or temperature hit all alike). Peak memory
(CUDA only): ``torch.cuda.max_memory_allocated`` over the construction and warm-up of one
implementation, minus what was allocated before its parameters were copied: its parameters,
gradients, optimizer state and the step's temporaries. On CPU only the state bytes are reported.

Muon families step the hidden matrices with Muon and the embeddings and 1-D tensors with AdamW
in every implementation (heavyball and torch: one optimizer of each kind, stepped together).
GaLore projects the hidden matrices (rank 128; ``--tiny`` 16) and steps the rest with AdamW.

``nonfinite``: poise AdamW (bfloat16 parameters) under each ``nonfinite`` policy (``raise``, the
default, reads a flag on the host every step; ``raise_async`` records the check on the device
and acts on it at the next step; ``skip``; ``ignore`` checks nothing). Timed as 10 back-to-back
``step()`` calls with one synchronisation at the end (a host sync inside a step shows as the
time the host waits), and as 5 back-to-back training steps (forward, backward, step) of the
same model. The difference to ``ignore`` is the cost of the check.

``rl``: one RL step (generate ``prompts x group`` completions, score them, the policy-gradient
loss, backward, optimizer step) on a Qwen2-0.5B-shaped policy (``transformers.Qwen2Config``:
hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied
embeddings; ``--tiny``: 2 layers, hidden 64, the character tokenizer's vocabulary) in bfloat16,
against TRL's ``GRPOTrainer`` on a copy of the same model, prompts, group size, completion
length, learning rate and loss (TRL ``dapo`` = poise ``ppo_clip`` with ``token_mean``
aggregation, beta 0, one update per batch, no gradient checkpointing). poise's workbench loop
(``poise.runs.kinds.rl.run_one_rl`` with :func:`poise.rl.generate`) runs on the CPU only (its
tensors are made on the host, and it generates without a KV cache), so on CUDA this section
times the same pieces as ``run_one_rl`` does them, moved to the device: sampling with the KV
cache and the sampler's log-probs, rewards, group advantages (:func:`poise.rl.group_advantage`),
the trainer's log-probs and entropies from one forward (as :func:`poise.rl.trainer_logprobs`),
:func:`poise.rl.policy_objective` and :func:`poise.rl.aggregate`, backward, gradient norm,
``poise.optim.AdamW``. Seconds per step: median over the steps after the first (warm-up);
peak memory as above, from before the model copy.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # run from a bare checkout: poise from src/ (the device machine has no install of it)
    import poise  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import poise.optim as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _common import state_bytes  # noqa: E402

# Sections in the order they run, each with its deadline as a fraction of --budget-s from the run's
# start. A section stops starting new work past its deadline; what it leaves goes to the sections
# after it. bfloat16 is the figure asked for first; float32 runs last, in whatever time is left.
PLAN = {"optimizers_bfloat16": 0.32, "nonfinite": 0.40, "rl": 0.72, "optimizers_float32": 0.97}
LR_RL = 1e-5
NONFINITE_POLICIES = ("raise", "raise_async", "skip", "ignore")
KRON_NAMES = ("PSGDKron", "Kron", "KronPSGD", "PSGD")  # whichever poise.optim exports


# -- plumbing -------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the run; ``left(section)`` is the time to that section's deadline."""

    def __init__(self, total_s: float):
        self.t0, self.total = time.monotonic(), float(total_s)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, section: str) -> float:
        return self.t0 + PLAN[section] * self.total - time.monotonic()

    def over(self, section: str) -> bool:
        return self.left(section) <= 0

    def spent(self) -> bool:
        """The last section's deadline has passed: nothing more may run."""
        return self.over(next(reversed(PLAN)))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(res: dict[str, Any], out: Path) -> None:
    res["env"]["elapsed_s"] = round(time.monotonic() - res["_t0"], 2)
    write_atomic(out / "gpu.json", json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, indent=1,
                                              default=str))
    write_atomic(out / "gpu.md", markdown(res))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes: CUDA events with the device synchronised before and after, or
    ``time.perf_counter`` on CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class MemoryWindow:
    """Peak CUDA memory allocated inside the window, above what was allocated when it opened
    (None on CPU)."""

    def __init__(self, dev: torch.device):
        self.dev, self.base, self.peak_mib = dev, 0, None

    def __enter__(self) -> MemoryWindow:
        if self.dev.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.dev) - self.base) / 2**20


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


def optional(module: str) -> Any | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception:  # not installed, or a dependency of it missing (galore_torch needs bitsandbytes)
        return None


def version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def env_record(dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    cuda = dev.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1) if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tiny": args.tiny, "budget_s": args.budget_s,
        "versions": {d: version_of(d) for d in ("poise", "transformers", "trl", "heavyball", "pytorch_optimizer",
                                                 "galore-torch", "accelerate", "datasets")},
    }


# -- section A: optimizers -------------------------------------------------------------------------
def gpt2_model(tiny: bool, dev: torch.device) -> nn.Module:
    """The GPT-2 model with random weights, built on ``dev`` (float32; cast it after)."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=2 if tiny else 12, n_head=4 if tiny else 12, n_embd=64 if tiny else 768,
                                  vocab_size=512 if tiny else 50257, n_positions=128 if tiny else 1024)
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(dev):
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(cfg)


def roles(model: nn.Module) -> list[str]:
    """Per parameter (``model.parameters()`` order): ``embed`` (token and position embeddings; the
    tied LM head is the token embedding), ``matrix`` (the hidden 2-D weights) or ``vector``."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return ["embed" if id(p) in emb else "matrix" if p.dim() == 2 else "vector" for p in model.parameters()]


class Pair:
    """Two optimizers stepped as one (a Muon optimizer for the matrices and an AdamW for the rest,
    for libraries whose Muon takes no AdamW groups)."""

    def __init__(self, *opts: Any):
        self.optimizers = opts

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


@dataclass
class Impl:
    family: str
    name: str
    make: Callable[[list[nn.Parameter], list[str]], Any]
    peer: bool = True
    compiled: bool = False


def implementations(tiny: bool, hb_compile: bool, hb_mode: str) -> tuple[list[Impl], list[dict[str, str]]]:
    """Every implementation to time, in order (baseline, poise, uncompiled peers, compiled peers
    last: if the budget runs out it is the slowest to set up that are skipped), and the peers
    that are not installed."""
    po, hb = optional("pytorch_optimizer"), optional("heavyball")
    gt = optional("galore_torch")
    missing = [{"peer": n, "reason": "not importable"} for n, m in
               (("pytorch_optimizer", po), ("heavyball", hb), ("galore_torch", gt)) if m is None]
    rank = 16 if tiny else 128
    kron = next((getattr(P, n) for n in KRON_NAMES if hasattr(P, n)), None)

    def by_role(ps, rs, *want):
        return [p for p, r in zip(ps, rs, strict=True) if r in want]

    def galore_groups(ps, rs, key="proj_type"):
        return [{"params": by_role(ps, rs, "matrix"), "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                 key: "std"}, {"params": by_role(ps, rs, "embed", "vector")}]

    def muon_groups(ps, rs):
        return [{"params": by_role(ps, rs, "matrix"), "use_muon": True},
                {"params": by_role(ps, rs, "embed", "vector"), "use_muon": False}]

    def hb_make(fn):
        def make(ps, rs):
            import heavyball.utils as hu

            hu.compile_mode = hb_mode if hb_compile else None
            return fn(ps, rs)
        return make

    out = [Impl("adamw", "torch_fused", lambda ps, rs: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
           Impl("adamw", "poise", lambda ps, rs: P.AdamW(ps, lr=1e-3), peer=False),
           Impl("soap", "poise", lambda ps, rs: P.SOAP(ps, precondition_frequency=10), peer=False),
           Impl("stable_spam", "poise", lambda ps, rs: P.StableSPAM(ps), peer=False),
           Impl("galore_adamw", "poise", lambda ps, rs: P.GaLoreAdamW(galore_groups(ps, rs)), peer=False),
           Impl("muon", "poise", lambda ps, rs: P.Muon(muon_groups(ps, rs), lr=0.02, adam_lr=1e-3), peer=False)]
    if kron is not None:
        out.append(Impl("psgd_kron", "poise", lambda ps, rs: kron(ps, lr=1e-3), peer=False))
    out += [Impl("adamw", "torch_foreach", lambda ps, rs: torch.optim.AdamW(ps, lr=1e-3, foreach=True))]
    if hasattr(torch.optim, "Muon"):
        out.append(Impl("muon", "torch", lambda ps, rs: Pair(
            torch.optim.Muon(by_role(ps, rs, "matrix"), lr=0.02, weight_decay=0.0),
            torch.optim.AdamW(by_role(ps, rs, "embed", "vector"), lr=1e-3, fused=True))))
    if po is not None:
        out += [Impl("adamw", "pytorch_optimizer", lambda ps, rs: po.AdamW(ps, lr=1e-3)),
                Impl("soap", "pytorch_optimizer", lambda ps, rs: po.SOAP(ps, precondition_frequency=10)),
                Impl("stable_spam", "pytorch_optimizer", lambda ps, rs: po.StableSPAM(ps)),
                Impl("galore_adamw", "pytorch_optimizer",
                     lambda ps, rs: po.GaLore(galore_groups(ps, rs, key="projection_type"))),
                Impl("muon", "pytorch_optimizer", lambda ps, rs: po.Muon(muon_groups(ps, rs), lr=0.02,
                                                                          adamw_lr=1e-3)),
                Impl("psgd_kron", "pytorch_optimizer", lambda ps, rs: po.Kron(ps, lr=1e-3))]
    if gt is not None:
        out.append(Impl("galore_adamw", "galore_torch", lambda ps, rs: gt.GaLoreAdamW(galore_groups(ps, rs))))
    if hb is not None:
        c = hb_compile
        out += [Impl("soap", "heavyball", hb_make(lambda ps, rs: hb.SOAP(  # SOAP first: the headline figure
                    ps, betas=(0.95, 0.95), precondition_frequency=10, merge_dims=False, max_precond_dim=10000,
                    use_precond_schedule=False)), compiled=c),
                Impl("adamw", "heavyball", hb_make(lambda ps, rs: hb.AdamW(ps, lr=1e-3)), compiled=c),
                Impl("muon", "heavyball", hb_make(lambda ps, rs: Pair(
                    hb.Muon(by_role(ps, rs, "matrix"), lr=0.02),
                    hb.AdamW(by_role(ps, rs, "embed", "vector"), lr=1e-3))), compiled=c)]
        if hasattr(hb, "PSGDKron"):
            out.append(Impl("psgd_kron", "heavyball", hb_make(lambda ps, rs: hb.PSGDKron(ps, lr=1e-3)), compiled=c))
    return out, missing


@dataclass
class Run:
    impl: Impl
    params: list[nn.Parameter] = field(default_factory=list)
    opt: Any = None
    times: list[float] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)


def set_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def optimizer_section(key: str, dtype: torch.dtype, dev: torch.device, args: argparse.Namespace,
                      budget: Budget, res: dict[str, Any], out: Path) -> None:
    sec = res["sections"][key] = {"status": "running", "dtype": str(dtype).removeprefix("torch."), "rows": [],
                                  "skipped": []}
    if budget.left(key) < 1.0:
        sec.update(status="skipped", reason=f"budget: {budget.left(key):.1f} s left to this section's deadline")
        return
    impls, missing = implementations(args.tiny, args.hb_compile, args.hb_compile_mode)
    sec["peers_missing"] = missing
    model = gpt2_model(args.tiny, dev).to(dtype)
    rs = roles(model)
    base = [p.detach() for p in model.parameters()]
    n_params = sum(p.numel() for p in base)
    sec["model"] = {"shape": "GPT-2 " + ("tiny (2 layers, width 64, vocab 512)" if args.tiny else
                                         "124M (12 layers, width 768, vocab 50257)"), "parameters": n_params}
    g = torch.Generator(device=dev).manual_seed(1)
    grads = [torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(1e-2).to(dtype) for p in base]
    runs: list[Run] = []
    for impl in impls:
        row = {"family": impl.family, "impl": impl.name, "peer": impl.peer, "compiled": impl.compiled,
               "dtype": sec["dtype"], "error": None}
        if budget.over(key):
            sec["skipped"].append({**row, "reason": "budget: section deadline passed before set-up"})
            continue
        r = Run(impl, row=row)
        try:
            t0 = time.perf_counter()
            with MemoryWindow(dev) as mem, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r.params = [nn.Parameter(p.clone()) for p in base]
                r.opt = impl.make(r.params, rs)
                for _ in range(args.warmup + (args.compiled_warmup if impl.compiled else 0)):
                    set_grads(r.params, grads)
                    r.opt.step()
            row["setup_s"] = round(time.perf_counter() - t0, 3)
            row["peak_mib"] = None if mem.peak_mib is None else round(mem.peak_mib, 1)
            sb = state_bytes(r.opt)
            row["state_mib"], row["state_bytes_per_param"] = round(sb / 2**20, 2), round(sb / n_params, 2)
            runs.append(r)
        except Exception as e:  # a peer that raises is recorded, not fatal
            row["error"] = short_error(e)
            sec["rows"].append(row)
            r.params, r.opt = [], None
            free(dev)
        save(res, out)
    rounds = 0
    for k in range(args.repeats):  # round-robin; at least 3 rounds once set up, unless the whole budget is gone
        if k >= 3 and budget.over(key) or budget.spent():
            sec["stopped_early"] = f"budget: {k} of {args.repeats} rounds"
            break
        for r in runs:
            if r.row["error"] is not None:
                continue
            set_grads(r.params, grads)
            try:
                r.times.append(timed(dev, r.opt.step))
            except Exception as e:
                r.row["error"] = short_error(e)
        rounds += 1
    sec["rounds"] = rounds
    for r in runs:
        ts = sorted(r.times)
        if ts:
            q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
            r.row.update(ms=round(statistics.median(ts) * 1e3, 4), ms_p25=round(q[0] * 1e3, 4),
                         ms_p75=round(q[2] * 1e3, 4), ms_mean=round(statistics.fmean(ts) * 1e3, 4), repeats=len(ts))
        sec["rows"].append(r.row)
    add_ratios(sec["rows"])
    sec["status"] = "done"
    del runs, base, grads, model
    free(dev)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x_torch_adamw``: ms / torch fused AdamW's ms; ``x_fastest_peer``: ms / the fastest peer's ms
    in the same family (for poise rows: poise / fastest peer, the figure the goals are stated in)."""
    timed_rows = [r for r in rows if r.get("ms") is not None]
    base = next((r["ms"] for r in timed_rows if r["impl"] == "torch_fused"), None)
    for r in timed_rows:
        r["x_torch_adamw"] = round(r["ms"] / base, 3) if base else None
        peers = [p for p in timed_rows if p["family"] == r["family"] and p["peer"]]
        best = min(peers, key=lambda p: p["ms"], default=None)
        r["fastest_peer"] = best["impl"] if best else None
        r["x_fastest_peer"] = round(r["ms"] / best["ms"], 3) if best else None


# -- nonfinite checking cost -----------------------------------------------------------------------
def nonfinite_section(dev: torch.device, args: argparse.Namespace, budget: Budget, res: dict[str, Any],
                      out: Path) -> None:
    key = "nonfinite"
    sec = res["sections"][key] = {"status": "running", "rows": [], "dtype": "bfloat16",
                                  "optimizer": "poise.optim.AdamW"}
    if budget.left(key) < 1.0:
        sec.update(status="skipped", reason=f"budget: {budget.left(key):.1f} s left to this section's deadline")
        return
    dtype = torch.bfloat16
    model = gpt2_model(args.tiny, dev).to(dtype)
    batch, seq = (2, 16) if args.tiny else (4, 256)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2)).to(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    grads = [torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32).mul_(1e-2).to(dtype)
             for p in model.parameters()]
    sec["train_batch"] = [batch, seq]
    n_step, n_train = 10, 5
    runs = []
    for pol in NONFINITE_POLICIES:
        m = copy.deepcopy(model)
        ps = list(m.parameters())
        opt = P.AdamW(ps, lr=1e-5, nonfinite=pol)
        runs.append({"policy": pol, "model": m, "params": ps, "opt": opt, "step": [], "train": []})

    def steps(r):
        for _ in range(n_step):
            r["opt"].step()

    def train(r):
        for _ in range(n_train):
            r["opt"].zero_grad(set_to_none=True)
            r["model"](input_ids=ids, labels=ids).loss.backward()
            r["opt"].step()

    try:
        for r in runs:  # warm-up
            set_grads(r["params"], grads)
            r["opt"].step()
            train(r)
        for k in range(args.repeats):
            if k >= 3 and budget.over(key) or budget.spent():
                sec["stopped_early"] = f"budget: {k} of {args.repeats} rounds"
                break
            for r in runs:
                set_grads(r["params"], grads)
                r["step"].append(timed(dev, lambda r=r: steps(r)) / n_step)
                r["train"].append(timed(dev, lambda r=r: train(r)) / n_train)
        if runs[0]["opt"].nonfinite != "raise" or not runs[0]["step"]:
            raise RuntimeError("nothing timed")
    except Exception as e:
        sec.update(status="error", reason=short_error(e))
        return
    finally:
        for r in runs:
            if r["policy"] == "raise_async" and hasattr(r["opt"], "check_nonfinite"):
                r["opt"].check_nonfinite()
    ref = {k: statistics.median(next(r for r in runs if r["policy"] == "ignore")[k]) for k in ("step", "train")}
    for r in runs:
        s, t = statistics.median(r["step"]), statistics.median(r["train"])
        sec["rows"].append({"policy": r["policy"], "step_ms": round(s * 1e3, 4), "train_step_ms": round(t * 1e3, 4),
                            "step_minus_ignore_ms": round((s - ref["step"]) * 1e3, 4),
                            "train_minus_ignore_ms": round((t - ref["train"]) * 1e3, 4), "repeats": len(r["step"])})
    sec["status"] = "done"
    del runs, model, grads
    free(dev)


# -- section B: RL step ----------------------------------------------------------------------------
def hf_char_tokenizer(tok: Any) -> Any:
    """A Hugging Face fast tokenizer with the same ids as poise's ``CharTokenizer`` (``<pad>`` next)."""
    import tokenizers
    import transformers

    vocab = {c: i for i, c in enumerate(tok.alphabet)}
    vocab["<pad>"] = len(vocab)
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    t.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="\n",
                                                unk_token="<pad>")


def qwen2_policy(tiny: bool, tok: Any, dev: torch.device, vocab: int | None = None) -> nn.Module:
    import transformers

    from poise.tasks.reasoning import EOS

    pad, eos = tok.vocab_size, int(tok.encode(EOS)[0])
    if tiny:
        cfg = transformers.Qwen2Config(vocab_size=vocab or tok.vocab_size + 1, hidden_size=64, intermediate_size=256,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=pad,
                                       eos_token_id=eos, bos_token_id=None)
    else:
        cfg = transformers.Qwen2Config(vocab_size=vocab or 151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True, pad_token_id=pad, eos_token_id=eos,
                                       bos_token_id=None)
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(dev):  # built on the device: no 2 GB float32 copy on the host
        warnings.simplefilter("ignore")
        return transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)


def poise_rl_step(model: nn.Module, opt: Any, tok: Any, task: Any, problems: list, group: int, max_new: int,
                  gen: torch.Generator, dev: torch.device) -> dict[str, float]:
    """One RL step with poise's pieces on ``dev`` (see the module docstring): returns reward and lengths."""
    import torch.nn.functional as F

    from poise.rl import PolicyBatch, aggregate, group_advantage, policy_objective
    from poise.tasks.reasoning import EOS

    eos = int(tok.encode(EOS)[0])
    buckets: dict[int, list[int]] = {}
    prompts = [tok.encode(p.prompt) for p in problems]
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    parts = []  # (problem indices, prompt+completion ids, sampler logp, mask)
    model.eval()
    with torch.no_grad():
        for p_len, idx in sorted(buckets.items()):
            x = torch.stack([prompts[i] for i in idx for _ in range(group)]).to(dev)
            n = x.shape[0]
            toks = torch.zeros(n, max_new, dtype=torch.long, device=dev)
            logps = torch.zeros(n, max_new, device=dev)
            done = torch.zeros(n, dtype=torch.bool, device=dev)
            mask = torch.zeros(n, max_new, device=dev)
            o = model(input_ids=x, use_cache=True)
            for t in range(max_new):
                lp = F.log_softmax(o.logits[:, -1].float(), -1)
                nxt = torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
                mask[:, t] = (~done).float()
                toks[:, t], logps[:, t] = nxt, lp.gather(1, nxt[:, None]).squeeze(1)
                done |= nxt == eos
                if t == max_new - 1 or bool(done.all()):  # one host read per token, as poise.rl.generate
                    break
                o = model(input_ids=nxt[:, None], past_key_values=o.past_key_values, use_cache=True)
            T = int(mask.sum(1).max())
            parts.append((idx, torch.cat([x, toks[:, :T]], 1), logps[:, :T] * mask[:, :T], mask[:, :T], p_len))
    model.train()
    V = tok.vocab_size
    rewards, group_id, lengths = [], [], []
    for idx, seq, _, mask, p_len in parts:
        comp = seq[:, p_len:].cpu()
        for row in range(seq.shape[0]):
            k = int(mask[row].sum())
            text = "".join(tok.alphabet[i] for i in comp[row, :k].tolist() if i < V)
            rewards.append(task.reward(problems[idx[row // group]], text))
            group_id.append(idx[row // group])
            lengths.append(k)
    adv_all = group_advantage(torch.tensor(rewards), torch.tensor(group_id)).to(dev)
    opt.zero_grad(set_to_none=True)
    start, losses = 0, []
    total_tokens = sum(lengths)
    for _, seq, behav, mask, p_len in parts:  # one bucket in the benchmark: equal-length prompts
        n, T = behav.shape
        logits = model(input_ids=seq).logits[:, p_len - 1 : p_len - 1 + T].float()
        full = F.log_softmax(logits, -1)
        logp = full.gather(2, seq[:, p_len : p_len + T, None]).squeeze(2) * mask
        ent = -(full.detach().exp() * full.detach()).sum(-1) * mask
        obj = policy_objective(PolicyBatch(logp, logp.detach(), behav, adv_all[start : start + n], mask), "ppo_clip",
                               entropy=ent)
        loss = aggregate(obj.values, obj.mask, "token_mean", num_tokens=total_tokens)
        loss.backward()
        losses.append(float(loss.detach()))
        start += n
    gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
    opt.step()
    return {"reward": statistics.fmean(rewards), "mean_length": statistics.fmean(lengths), "grad_norm": gn,
            "loss": sum(losses)}


def rl_section(dev: torch.device, args: argparse.Namespace, budget: Budget, res: dict[str, Any], out: Path) -> None:
    key = "rl"
    P_, G, L, S = args.rl_prompts, args.rl_group, args.rl_len, args.rl_steps
    sec = res["sections"][key] = {"status": "running", "rows": [], "skipped": [], "batch": {
        "prompts": P_, "group": G, "completion_tokens": L, "timed_steps": S, "warmup_steps": 1, "lr": LR_RL,
        "dtype": "bfloat16", "loss": "poise ppo_clip + token_mean = TRL dapo, beta 0"}}
    if args.rl_vocab is not None and args.rl_vocab <= 20:
        raise ValueError(f"--rl-vocab {args.rl_vocab}: must exceed the character tokenizer's vocabulary")
    if budget.left(key) < 2.0:
        sec.update(status="skipped", reason=f"budget: {budget.left(key):.1f} s left to this section's deadline")
        return
    from poise.tasks.reasoning import ArithmeticTask
    from poise.tasks.text import CharTokenizer

    tok = CharTokenizer()
    task = ArithmeticTask(1, seed=0)
    problems = task.sample(P_ * (S + 1))
    master = qwen2_policy(args.tiny, tok, dev, args.rl_vocab)
    sec["model"] = {"shape": "Qwen2 " + ("tiny (2 layers, hidden 64)" if args.tiny else
                                         "0.5B (24 layers, hidden 896, 14 heads, 2 KV heads)"),
                    "vocab": master.config.vocab_size,
                    "parameters": sum(p.numel() for p in master.parameters())}
    sec["note"] = ("poise: the pieces of poise.runs.kinds.rl.run_one_rl on the device (its loop itself is CPU-only: "
                   "host tensors, no KV cache); TRL: GRPOTrainer.train, step time from on_step_begin to on_step_end")
    save(res, out)
    # poise
    row: dict[str, Any] = {"impl": "poise", "error": None}
    try:
        with MemoryWindow(dev) as mem:
            model = copy.deepcopy(master)
            opt = P.AdamW(model.parameters(), lr=LR_RL, weight_decay=0.0)
            gen = torch.Generator(device=dev).manual_seed(0)
            times, info = [], []
            for s in range(S + 1):
                if s >= 2 and budget.over(key):
                    row["stopped_early"] = f"budget: {s - 1} of {S} timed steps"
                    break
                sync(dev)
                t0 = time.perf_counter()
                info.append(poise_rl_step(model, opt, tok, task, problems[s * P_ : (s + 1) * P_], G, L, gen, dev))
                sync(dev)
                times.append(time.perf_counter() - t0)
        row.update(rl_row(times, mem.peak_mib, [i["mean_length"] for i in info[1:]],
                          [i["reward"] for i in info[1:]]))
    except Exception as e:
        row["error"] = short_error(e)
        row["trace"] = traceback.format_exc()[-1500:]
    sec["rows"].append(row)
    model = opt = None
    free(dev)
    save(res, out)
    # TRL
    row = {"impl": "trl", "error": None}
    trl, datasets = optional("trl"), optional("datasets")
    if trl is None or datasets is None:
        sec["skipped"].append({**row, "reason": "trl or datasets not importable"})
    elif budget.left(key) < 2.0:
        sec["skipped"].append({**row, "reason": f"budget: {budget.left(key):.1f} s left"})
    else:
        try:
            row.update(run_trl(master, tok, task, problems, args, dev, budget))
        except Exception as e:
            row["error"] = short_error(e)
            row["trace"] = traceback.format_exc()[-1500:]
        sec["rows"].append(row)
    rows = {r["impl"]: r for r in sec["rows"]}
    if rows.get("poise", {}).get("s_per_step") and rows.get("trl", {}).get("s_per_step"):
        sec["trl_over_poise"] = round(rows["trl"]["s_per_step"] / rows["poise"]["s_per_step"], 3)
    sec["status"] = "done"
    del master
    free(dev)


def rl_row(times: list[float], peak_mib: float | None, lengths: list[float], rewards: list[float]) -> dict[str, Any]:
    timed_ = times[1:]  # the first step is warm-up
    return {"s_per_step": round(statistics.median(timed_), 4) if timed_ else None,
            "steps_timed": len(timed_), "warmup_s": round(times[0], 3) if times else None,
            "peak_mib": None if peak_mib is None else round(peak_mib, 1),
            "mean_completion_tokens": round(statistics.fmean(lengths), 2) if lengths else None,
            "mean_reward": round(statistics.fmean(rewards), 4) if rewards else None}


def run_trl(master: nn.Module, tok: Any, task: Any, problems: list, args: argparse.Namespace, dev: torch.device,
            budget: Budget) -> dict[str, Any]:
    import datasets
    import transformers
    import trl

    P_, G, L, S = args.rl_prompts, args.rl_group, args.rl_len, args.rl_steps
    answers = {p.prompt: p for p in problems}

    def reward(prompts, completions, **kw):
        return [task.reward(answers[p], c) for p, c in zip(prompts, completions, strict=True)]

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, a, state, control, **kw):
            sync(dev)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync(dev)
            self.times.append(time.perf_counter() - self.t0)
            if len(self.times) >= 3 and budget.over("rl"):
                control.should_training_stop = True

    timer = StepTimer()
    data = datasets.Dataset.from_dict({"prompt": [p.prompt for p in problems]})
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), MemoryWindow(dev) as mem:
        warnings.simplefilter("ignore")
        cfg = trl.GRPOConfig(output_dir=d, per_device_train_batch_size=P_ * G, num_generations=G,
                             max_completion_length=L, max_steps=S + 1, report_to="none", use_cpu=dev.type == "cpu",
                             logging_steps=1, save_strategy="no", learning_rate=LR_RL, lr_scheduler_type="constant",
                             weight_decay=0.0, bf16=dev.type == "cuda", beta=0.0, loss_type="dapo", temperature=1.0,
                             disable_tqdm=True, gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
        trainer = trl.GRPOTrainer(model=copy.deepcopy(master), reward_funcs=reward, args=cfg, train_dataset=data,
                                  processing_class=hf_char_tokenizer(tok), callbacks=[timer])
        trainer.train()
        logs = trainer.state.log_history
        del trainer
    lengths = [e["completions/mean_length"] for e in logs if "completions/mean_length" in e][1:]
    rewards = [e["reward"] for e in logs if "reward" in e][1:]
    out = rl_row(timer.times, mem.peak_mib, lengths, rewards)
    out["optimizer"] = cfg.optim
    return out


# -- report ----------------------------------------------------------------------------------------
def fmt(x: Any, digits: int = 2, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}{suffix}"


def markdown(res: dict[str, Any]) -> str:
    e = res["env"]
    hw = f"{e['gpu']} ({e['gpu_memory_gib']} GiB, sm {e['gpu_capability']})" if e["gpu"] else \
        f"CPU only ({e['cpu_count']} cores, {e['torch_threads']} torch threads)"
    v = e["versions"]
    lines = [f"### GPU benchmark, {e['date']}", "",
             f"Hardware: {hw}. torch {e['torch']}, CUDA {e['cuda']}, Python {e['python']}. "
             f"Command: `{e['command']}` (budget {e['budget_s']:.0f} s, took {e.get('elapsed_s', 0):.0f} s"
             f"{', tiny shapes' if e['tiny'] else ''}).",
             "Peers: " + ", ".join(f"{k} {v[k]}" for k in ("heavyball", "pytorch_optimizer", "galore-torch", "trl",
                                                          "transformers") if v.get(k)) +
             (f"; heavyball compiled (torch.compile mode `{res['args']['hb_compile_mode']}`)"
              if res["args"]["hb_compile"] else "; heavyball not compiled") + ".", ""]
    for key in ("optimizers_bfloat16", "optimizers_float32"):
        sec = res["sections"].get(key)
        if sec is None:
            continue
        title = f"#### Optimizer step, {sec.get('model', {}).get('shape', 'GPT-2')}, {sec['dtype']} parameters"
        lines += [title, ""]
        if sec["status"] == "skipped":
            lines += [f"Skipped: {sec['reason']}.", ""]
            continue
        mem_col = "peak MiB" if e["gpu"] else "state MiB (CPU: no peak)"
        mem_note = ("peak = parameters + gradients + state + temporaries of that optimizer" if e["gpu"] else
                    "on CPU only the optimizer state is measured, no peak")
        lines += [f"{sec['model']['parameters'] / 1e6:.2f}M parameters; median of {sec.get('rounds', 0)} "
                  f"round-robin steps on fixed gradients; {mem_note}.", "",
                  f"| family | implementation | ms / step | p25–p75 | × torch fused AdamW | × fastest peer "
                  f"(which) | {mem_col} | state B/param |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(sec["rows"], key=lambda r: (r["family"] != "adamw", r["family"], r["peer"], r["impl"])):
            name = r["impl"] + (" (compiled)" if r["compiled"] else "")
            if r.get("ms") is None:
                lines.append(f"| {r['family']} | {name} | failed: {r['error'] or 'not timed'} | | | | | |")
                continue
            peer = f"{fmt(r['x_fastest_peer'])} ({r['fastest_peer']})" if r.get("fastest_peer") else "-"
            mem = r["peak_mib"] if e["gpu"] else r["state_mib"]
            bold = "**" if not r["peer"] else ""
            lines.append(f"| {r['family']} | {bold}{name}{bold} | {fmt(r['ms'], 3)} | {fmt(r['ms_p25'], 3)}–"
                         f"{fmt(r['ms_p75'], 3)} | {fmt(r['x_torch_adamw'])} | {peer} | {fmt(mem, 1)} | "
                         f"{fmt(r['state_bytes_per_param'], 1)} |")
        for s in sec.get("skipped", []):
            lines.append(f"| {s['family']} | {s['impl']} | skipped: {s['reason']} | | | | | |")
        if sec.get("peers_missing"):
            lines.append("")
            lines.append("Not installed: " + ", ".join(m["peer"] for m in sec["peers_missing"]) + ".")
        lines.append("")
    sec = res["sections"].get("nonfinite")
    if sec is not None:
        lines += ["#### Cost of `nonfinite` checking (poise AdamW, bfloat16, same model)", ""]
        if sec["status"] != "done":
            lines += [f"{sec['status'].capitalize()}: {sec.get('reason')}.", ""]
        else:
            b, s = sec["train_batch"]
            lines += [f"`step()`: 10 back-to-back steps, one sync at the end; train step: forward + backward + step, "
                      f"batch {b}×{s} tokens, 5 back-to-back.", "",
                      "| nonfinite | ms / step() | − ignore | ms / train step | − ignore |",
                      "|---|---:|---:|---:|---:|"]
            for r in sec["rows"]:
                lines.append(f"| `{r['policy']}` | {fmt(r['step_ms'], 3)} | {fmt(r['step_minus_ignore_ms'], 3)} | "
                             f"{fmt(r['train_step_ms'], 3)} | {fmt(r['train_minus_ignore_ms'], 3)} |")
            lines.append("")
    sec = res["sections"].get("rl")
    if sec is not None:
        lines += [f"#### RL step, {sec.get('model', {}).get('shape', 'Qwen2')}, bfloat16", ""]
        if sec["status"] == "skipped":
            lines += [f"Skipped: {sec['reason']}.", ""]
        else:
            bt = sec["batch"]
            lines += [f"{bt['prompts']} prompts × {bt['group']} completions, up to {bt['completion_tokens']} new "
                      f"tokens, {bt['loss']}, lr {bt['lr']}; median over {bt['timed_steps']} steps after one "
                      f"warm-up step. {sec.get('note', '')}.", "",
                      "| implementation | s / step | steps / s | × TRL steps/s | peak MiB | mean completion tokens |",
                      "|---|---:|---:|---:|---:|---:|"]
            trl_s = next((r.get("s_per_step") for r in sec["rows"] if r["impl"] == "trl"), None)
            for r in sec["rows"]:
                if r.get("s_per_step") is None:
                    lines.append(f"| {r['impl']} | failed: {r['error'] or 'not timed'} | | | | |")
                    continue
                ratio = fmt(trl_s / r["s_per_step"]) if trl_s else "-"
                lines.append(f"| {r['impl']} | {fmt(r['s_per_step'], 3)} | {fmt(1 / r['s_per_step'])} | {ratio} | "
                             f"{fmt(r['peak_mib'], 0)} | {fmt(r['mean_completion_tokens'], 1)} |")
            for s in sec.get("skipped", []):
                lines.append(f"| {s['impl']} | skipped: {s['reason']} | | | | |")
            lines.append("")
    return "\n".join(lines) + "\n"


def summary(res: dict[str, Any]) -> str:
    out = [f"device {res['env']['gpu'] or res['env']['device']}, {res['env']['elapsed_s']:.0f} s of "
           f"{res['env']['budget_s']:.0f} s"]
    for key, sec in res["sections"].items():
        if sec["status"] != "done":
            out.append(f"{key}: {sec['status']} ({sec.get('reason', '')})")
        elif key.startswith("optimizers"):
            ours = [r for r in sec["rows"] if not r["peer"] and r.get("ms") is not None]
            out.append(f"{key}: " + ", ".join(f"{r['family']} {fmt(r['x_fastest_peer'])}x fastest peer"
                                              for r in ours if r.get("x_fastest_peer")))
        elif key == "nonfinite":
            out.append("nonfinite: " + ", ".join(f"{r['policy']} +{fmt(r['train_minus_ignore_ms'], 3)} ms/train step"
                                                 for r in sec["rows"]))
        elif key == "rl":
            out.append("rl: " + ", ".join(f"{r['impl']} {fmt(r.get('s_per_step'), 3)} s/step" for r in sec["rows"])
                       + (f"; TRL/poise time {sec['trl_over_poise']}" if "trl_over_poise" in sec else ""))
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu.json and gpu.md (created)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (for CPU and tests)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    ap.add_argument("--sections", default="optimizers,nonfinite,rl",
                    help="comma-separated subset of optimizers,nonfinite,rl")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="parameter dtypes of the optimizer section")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20; tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per optimizer (default 3; tiny 2)")
    ap.add_argument("--compiled-warmup", type=int, default=3, help="extra warm-up steps for compiled peers")
    ap.add_argument("--hb-compile", choices=("auto", "on", "off"), default="auto",
                    help="compile heavyball's steps (auto: on CUDA only)")
    ap.add_argument("--hb-compile-mode", default="default",
                    help="torch.compile mode for heavyball (its own default is max-autotune-no-cudagraphs, which "
                         "autotunes for minutes)")
    ap.add_argument("--rl-prompts", type=int, default=None, help="prompts per RL step (default 8; tiny 2)")
    ap.add_argument("--rl-group", type=int, default=None, help="completions per prompt (default 8; tiny 4)")
    ap.add_argument("--rl-len", type=int, default=None, help="max new tokens (default 64; tiny 6)")
    ap.add_argument("--rl-steps", type=int, default=None, help="timed RL steps after one warm-up (default 3; tiny 2)")
    ap.add_argument("--rl-vocab", type=int, default=None,
                    help="policy vocabulary (default 151936; tiny: the character tokenizer's); ids past the "
                         "tokenizer's decode to nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (4 if a.tiny else 20)
    a.warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 3)
    a.rl_prompts = a.rl_prompts or (2 if a.tiny else 8)
    a.rl_group = a.rl_group or (4 if a.tiny else 8)
    a.rl_len = a.rl_len or (6 if a.tiny else 64)
    a.rl_steps = a.rl_steps or (2 if a.tiny else 3)
    sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in sections if s not in ("optimizers", "nonfinite", "rl")]
    if bad:
        ap.error(f"--sections {','.join(bad)}: valid choices are optimizers, nonfinite, rl")
    dts = [s for s in a.dtypes.split(",") if s]
    if [d for d in dts if d not in ("bfloat16", "float32")]:
        ap.error(f"--dtypes {a.dtypes}: valid choices are bfloat16, float32")
    if a.budget_s <= 0 or a.repeats < 1:
        ap.error(f"--budget-s {a.budget_s} and --repeats {a.repeats} must be > 0")
    a.sections_list, a.dtypes_list = sections, dts
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    budget = Budget(a.budget_s)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a.hb_compile = a.hb_compile == "on" or (a.hb_compile == "auto" and dev.type == "cuda")
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"_t0": budget.t0, "env": env_record(dev, a), "plan": PLAN, "sections": {},
                           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    save(res, out)
    for key in PLAN:  # in order: bf16 optimizers, nonfinite, RL, then fp32 optimizers
        name, _, dt = key.partition("_")
        if name not in a.sections_list or (dt and dt not in a.dtypes_list):
            continue
        t0 = time.perf_counter()
        try:
            if name == "optimizers":
                optimizer_section(key, getattr(torch, dt), dev, a, budget, res, out)
            else:
                {"nonfinite": nonfinite_section, "rl": rl_section}[name](dev, a, budget, res, out)
        except Exception as e:  # the section's own failure (model build, out of memory): recorded, go on
            res["sections"].setdefault(key, {}).update(status="error", reason=short_error(e),
                                                       trace=traceback.format_exc()[-1500:])
            free(dev)
        res["sections"][key]["seconds"] = round(time.perf_counter() - t0, 2)
        save(res, out)
    print(markdown(res))
    print(summary(res))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return res


if __name__ == "__main__":
    main()

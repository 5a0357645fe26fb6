"""The edit-stream study: closed-form editors side by side on a stream of counterfactual
edits (and optional unlearning requests) to a tiny LM that knows a generated fact corpus.

Per seed, one LM is trained on ``lm.n_facts`` facts (three templates each, plus unrelated
theme sentences) and shared by every editor. The facts are split into edited ones (each
gets a new keyword of its theme), locality ones (never edited, never used as preserved
keys), preserved ones (their keys are the editors' ``K0``) and a pool to forget. Each
editor rewrites one MLP down-projection request by request; every ``eval_every`` requests
it is scored on the earliest 10% of edits (retention) and on the locality facts.

Targets (keys and ROME's ``v*``) are found once on the unedited LM and reused by every
editor and request (the authors recompute ``v*`` on the current model before each batch;
with one edited layer the keys do not change, and a shared target keeps the comparison to
the update rule alone).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.distributed import is_main
from poise.edit.linear import RLSEditor, alphaedit, memit, rome, sphere_project
from poise.edit.unlearn import grad_ascent_loss, grad_diff_loss, npo_loss
from poise.runs.config import EditStudyConfig, FactLMConfig
from poise.runs.store import JsonlWriter
from poise.runs.study import _stats, execute
from poise.tasks.factlm import (
    WordTokenizer,
    base_lines,
    candidate_logprobs,
    edit_targets,
    fact_tokenizer,
    heldout_loss,
    keys_at,
    subject_position,
    template_prompt,
    train_lm,
)
from poise.tasks.facts import THEMES, Fact, make_facts

__all__ = ["fact_lm", "run_edit_study", "run_one_edit", "summarize_edit"]

_CACHE: dict[str, Any] = {}
_TARGETS: dict[str, Any] = {}


def fact_lm(lm: FactLMConfig, seed: int, extra: int = 0,
            contexts_per_theme: int = 50) -> tuple[nn.Module, WordTokenizer, list[Fact]]:
    """The LM of ``lm`` and ``seed`` trained on the first ``lm.n_facts`` of ``n_facts + extra``
    generated facts (all of them in its vocabulary), kept in memory for the next variant."""
    key = json.dumps([dataclasses.asdict(lm), seed, extra, contexts_per_theme])
    if key not in _CACHE:
        _CACHE.clear()
        facts = make_facts(lm.n_facts + extra, seed=seed, max_syllables=4)
        tok = fact_tokenizer(facts)
        lines = base_lines(facts[: lm.n_facts], seed=seed, contexts_per_theme=contexts_per_theme)
        model = train_lm(lines, tok, n_layer=lm.n_layer,
                         n_head=lm.n_head, n_embd=lm.n_embd, mlp_ratio=lm.mlp_ratio, steps=lm.steps,
                         batch_size=lm.batch_size, lr=lm.lr, seed=seed)
        _CACHE[key] = ({k: t.detach().clone() for k, t in model.state_dict().items()}, tok, facts, model)
    state, tok, facts, model = _CACHE[key]
    model.load_state_dict(state)
    return model, tok, facts


def _values(f: Fact) -> list[str]:
    return THEMES[f.theme]["values"]


def _predict(model: nn.Module, tok: WordTokenizer, facts: list[Fact], j: int) -> Tensor:
    """Index (into the theme's values) of the most probable keyword after template ``j``."""
    if not facts:
        return torch.empty(0, dtype=torch.long)
    lp = candidate_logprobs(model, tok, [template_prompt(f, j) for f in facts], [_values(f) for f in facts])
    return lp.argmax(1)


def _hit_rate(model: nn.Module, tok: WordTokenizer, facts: list[Fact], kws: list[str], j: int) -> float:
    if not facts:
        return float("nan")
    want = torch.tensor([_values(f).index(k) for f, k in zip(facts, kws, strict=True)])
    return float((_predict(model, tok, facts, j) == want).float().mean())


def _positions(tok: WordTokenizer, prompts: list[str], facts: list[Fact], where: str) -> list[int]:
    if where == "subject":
        return [subject_position(tok, p, f.entity) for p, f in zip(prompts, facts, strict=True)]
    return [len(tok.encode("\n" + p)) - 1 for p in prompts]


def _general_lines(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(10_000 + seed)
    out = []
    for _ in range(n):
        spec = THEMES[rng.choice(list(THEMES))]
        out.append(f"{rng.choice(spec['contexts'])} {rng.choice(spec['values'])}.")
    return out


class _Editor:
    """One variant's update rule over a float64 copy of the edited weight."""

    def __init__(self, v: Any, W0: Tensor, K0: Tensor, C0: Tensor):
        self.v, self.p = v, dict(v.params)
        self.W, self.K0, self.C0 = W0.clone(), K0, C0
        self.K_prev: list[Tensor] = []
        if v.editor == "rlsedit":
            self.rls = RLSEditor(W0, K0, lam=self.p.get("lam", 1.0), mu=self.p.get("mu", 10.0))
        if v.editor == "rome":
            self.C = C0 + self.p.get("lam", 1e-3) * torch.eye(C0.shape[0], dtype=C0.dtype)

    def _sphere(self, delta: Tensor) -> Tensor:
        if not self.v.sphere:
            return delta
        return sphere_project(self.W, delta, beta=self.p.get("beta", 0.5), alpha=self.p.get("alpha", 0.5))

    def edit(self, K: Tensor, V: Tensor) -> None:
        e = self.v.editor
        if e == "none":
            return
        if e == "rlsedit":
            self.W = self.rls.edit(K, V).clone()
            return
        if e == "rome":
            for i in range(K.shape[1]):
                self.W += self._sphere(rome(self.W, K[:, i], V[:, i], self.C))
            return
        if e == "memit":
            delta = memit(self.W, K, V, self.C0, lam=self.p.get("lam", 100.0))
        else:
            prev = torch.cat(self.K_prev, 1) if self.K_prev else None
            delta = alphaedit(self.W, K, V, self.K0, K_prev=prev, threshold=self.p.get("threshold", 1e-2),
                              l2=self.p.get("l2", 1.0))
            self.K_prev.append(K)
        self.W += self._sphere(delta)

    def shift(self, delta: Tensor) -> None:
        """An outside change of the weight (unlearning) that the editor carries on from."""
        self.W += delta
        if self.v.editor == "rlsedit":
            self.rls.W += delta


def _seq_logp(model: nn.Module, tok: WordTokenizer, facts: list[Fact], kws: list[str]) -> Tensor:
    """``log P(keyword | prompt)`` with gradients (one-token keywords: the last position)."""
    prompts = [tok.encode("\n" + template_prompt(f, 0)) for f in facts]
    L = max(len(p) for p in prompts)
    x = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = p
    logits = model(x)[0]
    last = logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
    ids = torch.tensor([tok.stoi[k] for k in kws])
    return F.log_softmax(last.float(), -1)[torch.arange(len(prompts)), ids]


def _unlearn(model: nn.Module, layer: nn.Linear, tok: WordTokenizer, forget: list[Fact], retain: list[Fact],
             ref_logp: Tensor, s: Any) -> None:
    opt = torch.optim.SGD([layer.weight], lr=s.unlearn_lr)
    others = [p for p in model.parameters() if p is not layer.weight]
    req = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
    try:
        for _ in range(s.unlearn_steps):
            f_logp = _seq_logp(model, tok, forget, [f.keyword for f in forget])
            r_nll = -_seq_logp(model, tok, retain, [f.keyword for f in retain]).mean()
            if s.unlearn_method == "npo":
                loss = npo_loss(f_logp, ref_logp, retain_nll=r_nll)
            elif s.unlearn_method == "grad_diff":
                loss = grad_diff_loss(-f_logp.mean(), r_nll)
            else:
                loss = grad_ascent_loss(-f_logp.mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, r in zip(others, req, strict=True):
            p.requires_grad_(r)


def run_one_edit(cfg: EditStudyConfig, variant_index: int, seed: int, metrics_path: Path | None = None,
                 progress: Any = None) -> dict[str, Any]:
    """Run one editor over the stream with one seed; returns its final scores and curves."""
    v, s = cfg.variants[variant_index], cfg.stream
    model, tok, facts = fact_lm(cfg.lm, seed)
    layer = model.blocks[s.layer].mlp[2]
    rng = random.Random(seed)
    order = list(facts)
    rng.shuffle(order)
    edits, rest = order[: s.n_edits], order[s.n_edits :]
    local, rest = rest[: s.n_locality], rest[s.n_locality :]
    preserve, pool = rest[: s.n_preserve], rest[s.n_preserve :]
    new_kw = [rng.choice([x for x in _values(f) if x != f.keyword]) for f in edits]
    early = max(1, s.n_edits // 10)
    n_req = (s.n_edits + s.per_request - 1) // s.per_request

    key = json.dumps([dataclasses.asdict(cfg.lm), dataclasses.asdict(s), seed])
    if _TARGETS.get("key") != key:  # the same for every editor of this seed: found once
        prompts = [template_prompt(f, 0) for f in edits]
        K, V = edit_targets(model, tok, layer, prompts, _positions(tok, prompts, edits, s.position), new_kw,
                            steps=s.v_steps, lr=s.v_lr, clamp=s.v_clamp)
        pp = [template_prompt(f, j) for f in preserve for j in range(3)]
        pf = [f for f in preserve for _ in range(3)]
        K0 = keys_at(model, tok, layer, pp, _positions(tok, pp, pf, s.position)) if pp else K[:, :0]
        K0 = K0 / max(1, K0.shape[1]) ** 0.5  # K0 K0^T = the preserved keys' mean second moment
        _TARGETS.clear()
        _TARGETS.update(key=key, K=K, V=V, K0=K0)
    K, V, K0 = _TARGETS["K"], _TARGETS["V"], _TARGETS["K0"]
    C0 = K0 @ K0.T
    base_local = _predict(model, tok, local, 0)
    base_local_acc = _hit_rate(model, tok, local, [f.keyword for f in local], 0)
    n_forget = (n_req // s.unlearn_every) * s.unlearn_n if s.unlearn_every else 0
    base_forget_acc = _hit_rate(model, tok, pool[:n_forget], [f.keyword for f in pool[:n_forget]], 0)
    general = _general_lines(seed)
    base_general = heldout_loss(model, tok, general, model.config.block_size)
    W0 = layer.weight.detach().double().clone()
    ed = _Editor(v, W0, K0, C0)
    forget: list[Fact] = []
    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    curve: list[dict[str, Any]] = []
    edit_seconds = 0.0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for r in range(n_req):
                lo, hi = r * s.per_request, min(s.n_edits, (r + 1) * s.per_request)
                t = time.perf_counter()
                try:
                    ed.edit(K[:, lo:hi], V[:, lo:hi])
                except ValueError as e:
                    raise ValueError(f"{v.name}: request {r} (edits {lo}-{hi - 1}): {e}") from None
                edit_seconds += time.perf_counter() - t
                layer.weight.copy_(ed.W.to(layer.weight.dtype))
                if s.unlearn_every and (r + 1) % s.unlearn_every == 0:
                    batch = pool[len(forget) : len(forget) + s.unlearn_n]
                    ref = _seq_logp(model, tok, batch, [f.keyword for f in batch])
                    before = layer.weight.detach().double().clone()
                    with torch.enable_grad():
                        _unlearn(model, layer, tok, batch, preserve[:100], ref, s)
                    ed.shift(layer.weight.detach().double() - before)
                    forget += batch
                if (r + 1) % s.eval_every == 0 or r == n_req - 1:
                    done = hi
                    rec = {"request": r + 1, "edits": done,
                           "retention_early": _hit_rate(model, tok, edits[: min(early, done)],
                                                        new_kw[: min(early, done)], 0),
                           "locality": float((_predict(model, tok, local, 0) == base_local).float().mean()),
                           "edit_seconds": edit_seconds}
                    if forget:
                        rec["forget_acc"] = _hit_rate(model, tok, forget, [f.keyword for f in forget], 0)
                    curve.append(rec)
                    if writer:
                        writer.write(rec)
                if progress is not None:
                    progress(1)
        out = {
            "efficacy": _hit_rate(model, tok, edits, new_kw, 0),
            "paraphrase": sum(_hit_rate(model, tok, edits, new_kw, j) for j in (1, 2)) / 2,
            "retention_early": _hit_rate(model, tok, edits[:early], new_kw[:early], 0),
            "locality": float((_predict(model, tok, local, 0) == base_local).float().mean()),
            "locality_acc": _hit_rate(model, tok, local, [f.keyword for f in local], 0),
            "base_locality_acc": base_local_acc,
            "general_loss": heldout_loss(model, tok, general, model.config.block_size),
            "base_general_loss": base_general,
            "weight_change": float((layer.weight.detach().double() - W0).norm() / W0.norm()),
        }
        if forget:
            out["forget_acc"] = _hit_rate(model, tok, forget, [f.keyword for f in forget], 0)
            out["base_forget_acc"] = base_forget_acc
            out["retain_acc"] = out["locality_acc"]
    finally:
        if writer:
            writer.close()
    return {"variant": v.name, "editor": v.editor, "seed": seed, "wall_seconds": time.perf_counter() - t0,
            "edit_seconds": edit_seconds, "n_edits": s.n_edits, "metrics": out, "curve": curve}


METRICS = ("efficacy", "paraphrase", "retention_early", "locality", "locality_acc", "general_loss", "weight_change",
           "forget_acc", "retain_acc")


def summarize_edit(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per editor over seeds: the final scores and the seconds spent in the editor."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        row = {m: _stats([r["metrics"][m] for r in rs]) for m in METRICS if m in rs[0]["metrics"]}
        row["edit_seconds"] = _stats([r["edit_seconds"] for r in rs])
        row["seeds"] = [r["seed"] for r in rs]
        out[variant] = row
    return out


def run_edit_study(cfg: EditStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                   report: bool = True) -> Path:
    """Run every editor x seed over the stream; write the run directory; return its path."""
    n_req = (cfg.stream.n_edits + cfg.stream.per_request - 1) // cfg.stream.per_request
    return execute(cfg, run_dir, progress, report, n_req, run_one_edit, summarize_edit, "edit")

"""The edit-stream study: closed-form editors side by side on a stream of counterfactual
edits (and optional unlearning requests) to a tiny LM that knows a generated fact corpus.

Per seed, one LM is trained on ``lm.n_facts`` facts (three templates each, plus unrelated
theme sentences) and shared by every editor. The facts are split into edited ones (each
gets a new keyword of its theme), locality ones (never edited, never used as preserved
keys), preserved ones (their keys are the editors' ``K0``) and a pool to forget. Each
editor rewrites one MLP down-projection request by request; right after each request its own
edits are scored (write efficacy), and every ``eval_every`` requests the editor is scored on the
earliest 10% of edits (retention) and on the locality facts. Each result also carries the LM's
base accuracy on its facts (``base_acc``: retention means little if the LM never knew them) and
the edit keys' effective rank (:func:`key_spectrum`: how many directions of the edited layer the
stream really uses; ``n_edits`` should stay within ``d_k``, the most a linear edit can hold).

Targets (keys and ROME's ``v*``) are found once on the unedited LM and reused by every
editor and request (the authors recompute ``v*`` on the current model before each batch;
with one edited layer the keys do not change, and a shared target keeps the comparison to
the update rule alone).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise import _registry
from poise.distributed import is_main
from poise.edit.editors import editor_params, make_editor
from poise.edit.targets import edit_targets, keys_at
from poise.edit.unlearn import grad_ascent_loss, grad_diff_loss, npo_loss
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
from poise.runs.verdict import ClaimConfig
from poise.tasks.factlm import (
    WordTokenizer,
    base_lines,
    candidate_logprobs,
    fact_tokenizer,
    heldout_loss,
    subject_position,
    template_prompt,
    train_lm,
)
from poise.tasks.facts import THEMES, Fact, make_facts

__all__ = ["KIND", "EditStreamConfig", "EditStudyConfig", "EditVariantConfig", "FactLMConfig", "validate_edit",
           "fact_lm", "key_spectrum", "run_edit_study", "run_one_edit", "summarize_edit"]

# -- config --------------------------------------------------------------------------------
@dataclass
class FactLMConfig:
    n_facts: int = _help("facts the LM is trained on (edits rewrite some of them; the rest measure locality)",
                         default=1500)
    n_layer: int = _help("GPT layers", default=2)
    n_head: int = _help("GPT heads", default=2)
    n_embd: int = _help("GPT width", default=64)
    mlp_ratio: int = _help("MLP hidden size / width (the edited layer's key size is mlp_ratio * n_embd)", default=4)
    steps: int = _help("training steps (the LM learns its facts abruptly after about 500; check base_acc >= 0.9)",
                       default=700)
    batch_size: int = _help("sequences of 16 tokens per step", default=128)
    lr: float = _help("AdamW learning rate (cosine decay)", default=3e-3)


@dataclass
class EditStreamConfig:
    layer: int = _help("block whose MLP down-projection is edited", default=1)
    position: str = _help("where keys are read: 'last' (the prompt's last token) or 'subject' (ROME's subject "
                          "token)", default="last")
    n_edits: int = _help("counterfactual edits in the stream (at most n_facts minus n_locality; keep it at most the "
                         "edited layer's key size, mlp_ratio * n_embd, which a linear edit can hold)", default=250)
    per_request: int = _help("edits per request (each editor call gets this many)", default=10)
    n_locality: int = _help("unedited known facts that measure locality (never preserved keys)", default=300)
    n_preserve: int = _help("unedited known facts whose keys are the preserved/anchor keys K0 (3 keys each; RLSEdit "
                            "with lam = 0 needs them to span the key space)", default=600)
    eval_every: int = _help("requests between retention checks", default=5)
    v_steps: int = _help("Adam steps of the target-value search (ROME's v*)", default=40)
    v_lr: float = _help("learning rate of the target-value search", default=0.5)
    v_clamp: float = _help("the value change is clamped to this times the layer output's norm", default=4.0)
    unlearn_every: int = _help("an unlearning request every this many edit requests (0 = none)", default=0)
    unlearn_n: int = _help("facts forgotten per unlearning request", default=10)
    unlearn_method: str = _help("'npo', 'grad_diff' or 'grad_ascent' on the edited layer", default="npo")
    unlearn_steps: int = _help("gradient steps per unlearning request", default=20)
    unlearn_lr: float = _help("SGD learning rate of unlearning", default=0.05)


@dataclass
class EditVariantConfig:
    name: str = _help("label", default="")
    editor: str = _help("registry 'editor' (poise list editors: rome, memit, alphaedit, rlsedit, none)",
                        default="memit")
    sphere: bool = _help("project each update away from W's principal directions (SPHERE)", default=False)
    params: dict[str, Any] = _help("the editor's arguments (their defaults: poise list editors), and with sphere "
                                   "the wrapper's beta, alpha", default_factory=dict)


@dataclass
class EditStudyConfig:
    kind: str = _help("'edit': closed-form editors on a stream of edits to a tiny fact LM", default="edit")
    name: str = _help("study name", default="edit-stream")
    description: str = _help("shown at the top of the report", default="")
    seeds: list[int] = _help("seeds", default_factory=lambda: [0])
    threads: int = _help("torch threads", default=2)
    out_dir: str = _help("parent folder of run directories", default="runs")
    lm: FactLMConfig = _help("the fact LM", default_factory=FactLMConfig)
    stream: EditStreamConfig = _help("the edit stream", default_factory=EditStreamConfig)
    variants: list[EditVariantConfig] = _help("the editors compared ([[variants]] tables)", default_factory=list)
    claims: list[ClaimConfig] = claims_field()
    quick: bool = quick_field()
    tracking: list[str] = tracking_field()
    sweep: dict[str, dict[str, Any]] = sweep_field()


SPHERE_KEYS = ("beta", "alpha")  # the sphere wrapper's arguments in a variant's params


def _check_lm(lm: FactLMConfig) -> None:
    for key in ("n_facts", "n_layer", "n_head", "n_embd", "mlp_ratio", "steps", "batch_size"):
        if getattr(lm, key) <= 0:
            raise ConfigError(f"lm.{key}={getattr(lm, key)} must be > 0")
    if lm.n_embd % lm.n_head:
        raise ConfigError(f"lm.n_embd={lm.n_embd} must be a multiple of lm.n_head={lm.n_head}")
    if not lm.lr > 0:
        raise ConfigError(f"lm.lr={lm.lr} must be > 0")


def validate_edit(cfg: EditStudyConfig) -> EditStudyConfig:
    _check_lm(cfg.lm)
    s = cfg.stream
    if not 0 <= s.layer < cfg.lm.n_layer:
        raise ConfigError(f"stream.layer={s.layer}; valid: 0 to lm.n_layer-1 = {cfg.lm.n_layer - 1}")
    if s.position not in ("last", "subject"):
        raise ConfigError(f"stream.position: {s.position!r}; valid choices: last, subject")
    for key in ("n_edits", "per_request", "n_locality", "eval_every", "v_steps", "unlearn_n", "unlearn_steps"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"stream.{key}={getattr(s, key)} must be > 0")
    if s.n_preserve < 0 or s.unlearn_every < 0:
        raise ConfigError("stream.n_preserve and stream.unlearn_every must be >= 0")
    forget = (s.n_edits // s.per_request // s.unlearn_every) * s.unlearn_n if s.unlearn_every else 0
    need = s.n_edits + s.n_locality + s.n_preserve + forget
    if need > cfg.lm.n_facts:
        raise ConfigError(f"stream needs {need} facts (n_edits + n_locality + n_preserve + facts to forget) but "
                          f"lm.n_facts={cfg.lm.n_facts}: raise lm.n_facts or lower the stream")
    if s.unlearn_method not in ("npo", "grad_diff", "grad_ascent"):
        raise ConfigError(f"stream.unlearn_method: {s.unlearn_method!r}; valid choices: npo, grad_diff, grad_ascent")
    editors = [n for n in _registry.names("editor") if not getattr(_registry.get("editor", n), "wrapper", False)]
    for i, v in enumerate(_check_variants(cfg, "editor", registry=False)):
        key = f"variants[{i}]"
        if v.editor not in editors:
            raise ConfigError(f"{key}.editor: {v.editor!r}; valid choices: {', '.join(editors)}")
        allowed = (*editor_params(v.editor), *(SPHERE_KEYS if v.sphere else ()))
        for p, x in v.params.items():
            if p not in allowed:
                raise ConfigError(f"{key}.params.{p}: unknown argument of editor {v.editor!r}; "
                                  f"valid: {', '.join(allowed) or '(none)'}")
            if not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0:
                raise ConfigError(f"{key}.params.{p}={x!r} must be a number >= 0")
    return cfg



# -- one run --------------------------------------------------------------------------------
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


def key_spectrum(K: Tensor) -> dict[str, float]:
    r"""How many directions keys ``K [d_k, n]`` (columns) really use, from the eigenvalues ``s_i`` of
    ``K K^T`` (uncentred: a linear layer without bias sees the keys as they are):

    * ``erank``: the entropy effective rank ``exp(-sum p_i log p_i)``, ``p_i = sqrt(s_i) / sum_j sqrt(s_j)``
      (singular values; Roy & Vetterli, EUSIPCO 2007);
    * ``participation``: the participation ratio ``(sum s_i)^2 / sum s_i^2``;
    * ``dim``: ``d_k``. Both ranks lie in ``[1, min(d_k, n)]``; a matrix with ``r`` equal singular
      values and the rest zero has both equal to ``r``."""
    s = torch.linalg.eigvalsh(K.double() @ K.double().T).clamp_min(0)
    sv = s.sqrt()
    p = sv / sv.sum().clamp_min(1e-300)
    p = p[p > 0]
    return {"erank": float(torch.exp(-(p * p.log()).sum())), "participation": float(s.sum() ** 2 / (s**2).sum()),
            "dim": K.shape[0]}


def _general_lines(seed: int, n: int = 400) -> list[str]:
    rng = random.Random(10_000 + seed)
    out = []
    for _ in range(n):
        spec = THEMES[rng.choice(list(THEMES))]
        out.append(f"{rng.choice(spec['contexts'])} {rng.choice(spec['values'])}.")
    return out


def _editor(v: Any, W0: Tensor, K0: Tensor, C0: Tensor) -> Any:
    """The variant's editor (:func:`poise.edit.make_editor`) over a float64 copy of the edited weight."""
    sphere = {k: v.params[k] for k in SPHERE_KEYS if k in v.params} if v.sphere else None
    return make_editor(v.editor, W0.clone(), K0, C0, sphere=sphere,
                       **{k: x for k, x in v.params.items() if k not in SPHERE_KEYS})


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
        known = facts[: cfg.lm.n_facts]
        _TARGETS.clear()
        _TARGETS.update(key=key, K=K, V=V, K0=K0, base_acc=_hit_rate(model, tok, known, [f.keyword for f in known], 0),
                        spectrum=key_spectrum(K))
    K, V, K0 = _TARGETS["K"], _TARGETS["V"], _TARGETS["K0"]
    C0 = K0 @ K0.T
    base_local = _predict(model, tok, local, 0)
    base_local_acc = _hit_rate(model, tok, local, [f.keyword for f in local], 0)
    n_forget = (n_req // s.unlearn_every) * s.unlearn_n if s.unlearn_every else 0
    base_forget_acc = _hit_rate(model, tok, pool[:n_forget], [f.keyword for f in pool[:n_forget]], 0)
    general = _general_lines(seed)
    base_general = heldout_loss(model, tok, general, model.config.block_size)
    W0 = layer.weight.detach().double().clone()
    ed = _editor(v, W0, K0, C0)
    forget: list[Fact] = []
    writer = JsonlWriter(metrics_path) if metrics_path and is_main() else None
    curve: list[dict[str, Any]] = []
    writes: list[float] = []  # per edit: its new keyword wins right after its own request
    last = 0  # writes already reported in the curve
    edit_seconds = 0.0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for r in range(n_req):
                lo, hi = r * s.per_request, min(s.n_edits, (r + 1) * s.per_request)
                t = time.perf_counter()
                try:
                    ed.edit(K[:, lo:hi], V[:, lo:hi])
                except ValueError as e:  # the editor refused (a singular system at these sizes): exit 2, one line
                    raise ConfigError(f"variants.{v.name}: request {r} (edits {lo}-{hi - 1}) was refused by the "
                                      f"editor: {e}; change the editor's settings or the study's sizes") from None
                edit_seconds += time.perf_counter() - t
                layer.weight.copy_(ed.weight.to(layer.weight.dtype))
                want = torch.tensor([_values(f).index(k) for f, k in zip(edits[lo:hi], new_kw[lo:hi], strict=True)])
                writes += (_predict(model, tok, edits[lo:hi], 0) == want).float().tolist()
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
                           "write_efficacy": sum(writes[last:]) / max(1, len(writes) - last),
                           "edit_seconds": edit_seconds}
                    last = len(writes)
                    if forget:
                        rec["forget_acc"] = _hit_rate(model, tok, forget, [f.keyword for f in forget], 0)
                    curve.append(rec)
                    if writer:
                        writer.write(rec)
                if progress is not None:
                    progress(1)
        out = {
            "base_acc": _TARGETS["base_acc"],
            "write_efficacy": sum(writes) / len(writes),
            "efficacy": _hit_rate(model, tok, edits, new_kw, 0),
            "paraphrase": sum(_hit_rate(model, tok, edits, new_kw, j) for j in (1, 2)) / 2,
            "retention_early": _hit_rate(model, tok, edits[:early], new_kw[:early], 0),
            "locality": float((_predict(model, tok, local, 0) == base_local).float().mean()),
            "locality_acc": _hit_rate(model, tok, local, [f.keyword for f in local], 0),
            "base_locality_acc": base_local_acc,
            "general_loss": heldout_loss(model, tok, general, model.config.block_size),
            "base_general_loss": base_general,
            "weight_change": float((layer.weight.detach().double() - W0).norm() / W0.norm()),
            "key_dim": _TARGETS["spectrum"]["dim"],
            "key_erank": _TARGETS["spectrum"]["erank"],
            "key_participation": _TARGETS["spectrum"]["participation"],
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


METRICS = ("base_acc", "write_efficacy", "efficacy", "paraphrase", "retention_early", "locality", "locality_acc",
           "general_loss", "weight_change", "forget_acc", "retain_acc", "key_dim", "key_erank", "key_participation")


def summarize_edit(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per editor over seeds: the final scores and the seconds spent in the editor."""
    out: dict[str, Any] = {}
    for variant, rs in by_variant(results).items():
        # every metric in every row (n = 0 where a run has none, e.g. forget_acc without unlearning requests)
        row = {m: _stats([r["metrics"].get(m) for r in rs]) for m in METRICS}
        row["edit_seconds"] = _stats([r["edit_seconds"] for r in rs])
        row["seeds"] = [r["seed"] for r in rs]
        out[variant] = row
    return out


def run_edit_study(cfg: EditStudyConfig, run_dir: str | Path | None = None, progress: bool | None = None,
                   report: bool = True) -> Path:
    """Run every editor x seed over the stream; write the run directory; return its path."""
    return execute(cfg, run_dir, progress, report, KIND)


# -- report --------------------------------------------------------------------------------
def _capacity_note(s: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The LM's base knowledge and the edited layer's key space, from the runs' results (one LM per seed)."""
    per_seed = {r["seed"]: r["metrics"] for r in results if "base_acc" in r["metrics"]}
    if not per_seed:
        return ""
    ms = list(per_seed.values())
    acc = [m["base_acc"] for m in ms]
    dim = ms[0]["key_dim"]
    er = [m["key_erank"] for m in ms]
    pr = [m["key_participation"] for m in ms]
    note = (f"Base knowledge: before editing the LM names {min(acc):.1%}"
            f"{'' if len(acc) == 1 else f' to {max(acc):.1%}'} of its facts (8-way argmax; chance 12.5%). "
            f"Key space: d_k = {dim}; the {s['n_edits']} edit keys have effective rank {min(er):.1f}"
            f"{'' if len(er) == 1 else f'-{max(er):.1f}'} (entropy of singular values) and participation ratio "
            f"{min(pr):.1f}{'' if len(pr) == 1 else f'-{max(pr):.1f}'}. ")
    if min(acc) < 0.9:
        note += "<b>The LM does not know its facts (base accuracy < 90%): retention says little; raise lm.steps.</b> "
    if s["n_edits"] > dim:
        note += (f"<b>{s['n_edits']} edits exceed d_k = {dim}: no linear edit of this layer can hold them all.</b> ")
    return note


def _edit_tables(config: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = summarize_edit(results)
    s = config["stream"]
    note = (f"{s['n_edits']} counterfactual edits, {s['per_request']} per request, into blocks[{s['layer']}].mlp[2] "
            f"(keys at the {s['position']} token). {_capacity_note(s, results)}"
            "Write: the new keyword is the most probable of its theme's eight values right after the edit's own "
            "request (mean over edits); efficacy: the same at the end; paraphrase: the same after the two other "
            "templates; early retention: efficacy on the first 10% of edits at the end; locality: unedited facts "
            "whose prediction did not move; general loss: next-token loss on held-out theme sentences (before: "
            f"{_fmt(_stats(list({r['seed']: r['metrics']['base_general_loss'] for r in results}.values())))}); "
            "forget accuracy: forgotten facts "
            "still answered (lower is better). ↑ higher is better, ↓ lower is better. Mean ± std over seeds.")
    heads = ["base acc ↑", "write ↑", "efficacy ↑", "paraphrase ↑", "early retention ↑", "locality ↑",
             "locality acc ↑", "general loss ↓", "forget acc ↓", "|ΔW|/|W|", "editor s ↓"]
    rows = [[html.escape(v), *(_fmt(r.get(k)) for k in ("base_acc", "write_efficacy", "efficacy", "paraphrase",
                                                        "retention_early", "locality", "locality_acc",
                                                        "general_loss", "forget_acc", "weight_change")),
             _fmt(r["edit_seconds"], 2)]
            for v, r in table.items()]
    return [{"title": "Editors", "note": note, "heads": heads, "rows": rows}]


def _edit_plots(run_dir: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[str, Path]]:
    plt = _plt()
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for i, v in enumerate(variants):
        for j, r in enumerate(r for r in results if r["variant"] == v):
            x = [c["edits"] for c in r["curve"]]
            for ax, k in zip(axes, ("retention_early", "locality", "write_efficacy"), strict=True):
                ax.plot(x, [c.get(k, math.nan) for c in r["curve"]], color=colors(i), lw=1.2, marker="o",
                        markersize=3 if len(x) > 1 else 6,  # a single evaluation is a visible point, not an empty line
                        label=v if j == 0 else None)
    axes[0].axhline(1 / 8, color="#999", ls=":", lw=1, label="chance (1 of 8 values)")
    axes[0].set(xlabel="edits done", ylabel="efficacy on the first 10% of edits", ylim=(-0.02, 1.02),
                title="Retention of early edits along the stream")
    axes[1].set(xlabel="edits done", ylabel="unedited facts unchanged", ylim=(-0.02, 1.02), title="Locality")
    axes[2].set(xlabel="edits done", ylabel="edits written, right after their request", ylim=(-0.02, 1.02),
                title="Write efficacy (per window between checks)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = run_dir / "edit_stream.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [("Retention, locality and write efficacy along the stream (one line per seed)", p)]




KIND = StudyKind(
    name="edit",
    Config=EditStudyConfig,
    example="edit-stream",
    variant_key="editor",
    validate=validate_edit,
    steps_per_run=lambda cfg: (cfg.stream.n_edits + cfg.stream.per_request - 1) // cfg.stream.per_request,
    describe=lambda cfg: f"{cfg.stream.n_edits} edits",
    run_one=run_one_edit,
    summarize=lambda results, config: summarize_edit(results),
    tables=_edit_tables,
    plots=_edit_plots,
    columns=tuple((k, k) for k in ("base_acc", "write_efficacy", "efficacy", "retention_early", "locality",
                                   "general_loss", "forget_acc")),
    quick=("seeds=[0]", "lm.n_facts=500", "lm.steps=500", "lm.batch_size=64", "stream.n_edits=50",
           "stream.n_locality=100", "stream.n_preserve=300"),
)

"""Edit a Hugging Face causal LM from requests, as EasyEdit users do: records in, an editor applied at
the chosen layer(s), efficacy / paraphrase / locality out.

>>> from poise.edit.hf import EditRequest, HFEditor
>>> req = EditRequest(prompt="The Eiffel Tower is located in", subject="Eiffel Tower", target_new="Rome",
...                   paraphrase_prompts=["Where is the Eiffel Tower? It is in"],
...                   neighborhood_prompts=["The Louvre is located in"])
>>> ed = HFEditor(model, tokenizer, "memit", layers=[3, 4, 5], preserve=wiki_sentences)
>>> ed.edit([req])     # {"efficacy": 1.0, "paraphrase": ..., "locality": ..., "efficacy_before": 0.0, ...}

How an edit is made (Meng et al., ROME arXiv 2202.05262 and MEMIT arXiv 2210.07229): the edited map
is the MLP output projection of each chosen layer (``model.layers.{l}.mlp.down_proj`` for
Llama/Qwen2/Mistral, ``transformer.h.{l}.mlp.c_proj`` for GPT-2, ... or ``module=`` a template), read
as ``v = W k`` (``W [d_v, d_k]``; GPT-2's ``Conv1D`` stores ``W^T`` and is handled). For each request:

1. the key ``k_l`` is that projection's input at the subject's last token of the prompt;
2. the target: a vector ``delta`` added to the last chosen layer's projection output at that token is
   found by Adam to maximise ``log P(target_new | prompt)`` (teacher forcing over the target's
   tokens), with an L2 penalty and ``||delta||`` clamped to ``clamp`` times ``||h_L||``, the norm of
   the last chosen block's output (the hidden state) there; the target hidden state is ``z = h_L + delta``;
3. layer by layer, lowest first, with the layers below already edited: ``r = (z - h_L) / (layers
   left)`` and the editor writes ``W_l k_l ~ W_l k_l + r`` (:meth:`~poise.edit.editors.Editor.edit`).
   With one layer this is ROME's ``v* = W k + delta``.

Any editor of :func:`poise.edit.make_editor` works (``rome``, ``memit``, ``alphaedit``, ``rlsedit``,
``none``, with ``sphere=``); one editor per layer keeps its state across :meth:`HFEditor.edit` calls
(sequential editing). ``preserve`` texts give the keys the edit must keep (``K0``, and ``C0 = K0
K0^T``): MEMIT and AlphaEdit need them. Departures: ROME's averaging of the key over random prefixes
and its KL term on "{subject} is a" are left out.

Metrics (EasyEdit's definitions): ``efficacy`` = mean over requests of the teacher-forced token
accuracy of ``target_new`` after the prompt; ``paraphrase`` = the same after each paraphrase prompt
(averaged per request, then over requests that have some); ``locality`` = the fraction of
neighbourhood prompts whose next-token prediction (argmax at their last token) is unchanged by the
edit. The tokenizer is anything with ``encode(text)`` (a ``PreTrainedTokenizerBase``, a word-level
tokenizer) or a callable ``text -> ids``; prompts and targets are joined with one space.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of, scorable
from poise.edit.editors import Editor, make_editor
from poise.edit.linear import _number
from poise.edit.targets import capped_delta_search

__all__ = ["MLP_OUT_TEMPLATES", "EditRequest", "HFEditor", "edit_hf_model", "evaluate_requests", "mlp_out_module"]

MLP_OUT_TEMPLATES = (
    "model.layers.{}.mlp.down_proj",  # Llama, Qwen2, Mistral, Gemma
    "transformer.h.{}.mlp.c_proj",  # GPT-2 (Conv1D)
    "transformer.h.{}.mlp.fc_out",  # GPT-J
    "gpt_neox.layers.{}.mlp.dense_4h_to_h",  # Pythia / GPT-NeoX
    "model.decoder.layers.{}.fc2",  # OPT
)
"""Where the MLP output projection of layer ``l`` lives, tried in this order."""

_ALIASES = {
    "prompt": "prompt", "subject": "subject", "target_new": "target_new",
    "paraphrase_prompts": "paraphrase_prompts", "rephrase_prompt": "paraphrase_prompts",
    "rephrase_prompts": "paraphrase_prompts",
    "neighborhood_prompts": "neighborhood_prompts", "locality_prompt": "neighborhood_prompts",
    "locality_prompts": "neighborhood_prompts",
    "target_true": "target_true", "ground_truth": "target_true",
}
_IGNORED = ("case_id", "pararel_idx", "attribute_prompts", "generation_prompts", "locality_ground_truth",
            "portability")


def _text(v: Any, key: str) -> str:
    if isinstance(v, Mapping) and "str" in v:  # CounterFact: {"str": "Rome", "id": ...}
        v = v["str"]
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string, got {type(v).__name__}")
    return v


def _texts(v: Any, key: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(_text(x, key) for x in v)


@dataclass(frozen=True)
class EditRequest:
    """One edit: ``prompt`` (with ``{}`` where the subject goes, or containing ``subject``),
    ``subject``, ``target_new``; optional ``paraphrase_prompts`` and ``neighborhood_prompts`` (full
    prompts, for the paraphrase and locality scores) and ``target_true`` (kept, not used)."""

    prompt: str
    subject: str
    target_new: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    target_true: str | None = None
    text: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.subject.strip():
            raise ValueError(f"request {self.prompt!r}: empty subject")
        if not self.target_new.strip():
            raise ValueError(f"request {self.prompt!r}: empty target_new")
        text = self.prompt.format(self.subject) if "{}" in self.prompt else self.prompt
        if self.subject not in text:
            raise ValueError(f"request {self.prompt!r}: the subject {self.subject!r} is not in the prompt (write it "
                             "there, or put {} where it goes)")
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "paraphrase_prompts", _texts(self.paraphrase_prompts, "paraphrase_prompts"))
        object.__setattr__(self, "neighborhood_prompts", _texts(self.neighborhood_prompts, "neighborhood_prompts"))

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EditRequest:
        """A request from an EasyEdit record (``prompt``, ``subject``, ``target_new``,
        ``rephrase_prompt``, ``locality_prompt``, ``ground_truth``) or a CounterFact one
        (``requested_rewrite`` with ``prompt``/``subject``/``target_new: {"str": ...}``,
        ``paraphrase_prompts``, ``neighborhood_prompts``). Unknown keys raise ``ValueError``
        listing the valid ones."""
        rec = dict(record)
        rec.update(rec.pop("requested_rewrite", None) or {})
        kw: dict[str, Any] = {}
        for k, v in rec.items():
            if k in _IGNORED:
                continue
            if k not in _ALIASES:
                raise ValueError(f"unknown request key {k!r}; valid: {', '.join(_ALIASES)} (ignored: "
                                 f"{', '.join(_IGNORED)})")
            kw[_ALIASES[k]] = v
        missing = [k for k in ("prompt", "subject", "target_new") if k not in kw]
        if missing:
            raise ValueError(f"request record lacks {', '.join(missing)} (keys given: {', '.join(rec)})")
        return cls(prompt=_text(kw["prompt"], "prompt"), subject=_text(kw["subject"], "subject"),
                   target_new=_text(kw["target_new"], "target_new"),
                   paraphrase_prompts=_texts(kw.get("paraphrase_prompts"), "paraphrase_prompts"),
                   neighborhood_prompts=_texts(kw.get("neighborhood_prompts"), "neighborhood_prompts"),
                   target_true=None if kw.get("target_true") is None else _text(kw["target_true"], "target_true"))


# -- tokens ----------------------------------------------------------------------------------------
Tokenizer = Any  # ``encode(text)`` (HF PreTrainedTokenizerBase, a word-level tokenizer) or ``text -> ids``


def _encode(tok: Tokenizer, text: str) -> list[int]:
    if hasattr(tok, "encode"):
        ids = tok.encode(text)
    elif callable(tok):
        ids = tok(text)
    else:
        raise TypeError(f"tokenizer {type(tok).__name__} has no encode(text) and is not callable")
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    if isinstance(ids, Tensor):
        ids = ids.flatten().tolist()
    return [int(i) for i in ids]


def _join(prompt: str, target: str) -> str:
    return prompt + target if prompt.endswith(" ") or target.startswith(" ") else f"{prompt} {target}"


def _split(tok: Tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``target`` after it (from the tokenization of both together)."""
    p = _encode(tok, prompt)
    full = _encode(tok, _join(prompt, target))
    if full[: len(p)] != p or len(full) <= len(p):
        raise ValueError(f"tokenizing {_join(prompt, target)!r} does not extend the tokens of {prompt!r}: cannot tell "
                         "where the target starts")
    if not p:
        raise ValueError(f"prompt {prompt!r} has no tokens")
    return p, full[len(p):]


def _subject_last(tok: Tokenizer, text: str, subject: str, p: list[int]) -> int:
    """Index of the subject's last token in ``p`` (the tokens of ``text``)."""
    end = text.index(subject) + len(subject)
    s = _encode(tok, text[:end])
    if not s or p[: len(s)] != s:
        raise ValueError(f"the tokens of {text[:end]!r} are not a prefix of those of {text!r}: cannot place the "
                         f"subject {subject!r}")
    return len(s) - 1


# -- model plumbing ----------------------------------------------------------------------------------
def mlp_out_module(model: nn.Module, layer: int, template: str | None = None) -> tuple[nn.Module, str]:
    """The MLP output projection of ``layer`` and the template it was found with (``template``, or
    the first of :data:`MLP_OUT_TEMPLATES` present); none: ``ValueError`` naming what was tried."""
    mods = dict(model.named_modules())
    tried = [template] if template is not None else list(MLP_OUT_TEMPLATES)
    for t in tried:
        if "{}" not in t:
            raise ValueError(f"module template {t!r} needs a {{}} where the layer index goes")
        if t.format(layer) in mods:
            return mods[t.format(layer)], t
    some = [n for n in mods if "mlp" in n or "fc" in n][:6]
    raise ValueError(f"no module {' / '.join(x.format(layer) for x in tried)} in {type(model).__name__} (layer "
                     f"{layer}); give module='<path with {{}} for the layer>', e.g. from: {', '.join(some)}")


def _weight(module: nn.Module) -> Tensor:
    """``W [d_v, d_k]`` of ``v = W k`` as a view of the module's weight (GPT-2's Conv1D stores ``W^T``)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.T
    raise TypeError(f"cannot edit a {type(module).__name__}: the edited map must be nn.Linear or transformers' "
                    "Conv1D")


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    am = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, : len(r)] = 1
    return x.to(device), am.to(device)


def _logits(model: nn.Module, x: Tensor, am: Tensor) -> Tensor:
    try:
        logits = logits_of(model(input_ids=x, attention_mask=am))
    except TypeError as e:
        raise TypeError(f"{type(model).__name__}: {e}; editing needs a causal LM returning logits") from None
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)} for input_ids {tuple(x.shape)}: a causal LM "
                         "returns [batch, seq, vocab]")
    return logits


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _Frozen:
    """Eval mode and no parameter gradients inside, everything restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.flags = {m: m.training for m in self.model.modules()}
        self.req = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.req:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for m, f in self.flags.items():
            m.training = f
        for p, r in self.req:
            p.requires_grad_(r)


def _capture(model: nn.Module, x: Tensor, am: Tensor, rows: Tensor, pos: Tensor,
             inputs_of: Sequence[nn.Module] = (), outputs_of: Sequence[nn.Module] = ()) -> tuple[list[Tensor], ...]:
    """One forward: the inputs of ``inputs_of`` and the outputs of ``outputs_of`` at ``(rows, pos)``."""
    got_in: dict[int, Tensor] = {}
    got_out: dict[int, Tensor] = {}
    hooks = []
    for i, m in enumerate(inputs_of):
        hooks.append(m.register_forward_hook(lambda mod, a, o, i=i: got_in.__setitem__(i, a[0][rows, pos].detach())))
    for i, m in enumerate(outputs_of):
        hooks.append(m.register_forward_hook(
            lambda mod, a, o, i=i: got_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[rows, pos].detach())))
    try:
        with torch.no_grad():
            _logits(model, x, am)
    finally:
        for h in hooks:
            h.remove()
    return [got_in[i] for i in range(len(inputs_of))], [got_out[i] for i in range(len(outputs_of))]


# -- measurement -------------------------------------------------------------------------------------
@torch.no_grad()
def _target_accuracy(model: nn.Module, tok: Tokenizer, pairs: Sequence[tuple[str, str]], batch: int) -> list[float]:
    """Teacher-forced token accuracy of each ``target`` after its ``prompt``; NaN where the logits scored
    are not finite (an argmax of NaN logits is no prediction)."""
    out: list[float] = []
    dev = _device(model)
    for s in range(0, len(pairs), batch):
        chunk = [_split(tok, p, t) for p, t in pairs[s : s + batch]]
        x, am = _pad([p + t for p, t in chunk], dev)
        logits = _logits(model, x, am)
        pred, ok = logits.argmax(-1), scorable(logits)
        for i, (p, t) in enumerate(chunk):
            span = slice(len(p) - 1, len(p) - 1 + len(t))
            if not bool(ok[i, span].all()):
                out.append(math.nan)
                continue
            got = pred[i, span].tolist()
            out.append(sum(int(a == b) for a, b in zip(got, t, strict=True)) / len(t))
    return out


@torch.no_grad()
def _next_tokens(model: nn.Module, tok: Tokenizer, prompts: Sequence[str], batch: int) -> list[int | None]:
    """The argmax next token after each prompt; None where those logits are not finite."""
    out: list[int | None] = []
    dev = _device(model)
    for s in range(0, len(prompts), batch):
        ids = [_encode(tok, p) for p in prompts[s : s + batch]]
        x, am = _pad(ids, dev)
        logits = _logits(model, x, am)
        pred, ok = logits.argmax(-1), scorable(logits)
        out.extend(int(pred[i, len(r) - 1]) if bool(ok[i, len(r) - 1]) else None for i, r in enumerate(ids))
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def evaluate_requests(model: nn.Module, tok: Tokenizer, requests: Sequence[EditRequest],
                      reference: Sequence[Sequence[int | None]] | None = None, batch: int = 64) -> dict[str, Any]:
    """``efficacy``, ``paraphrase`` and (given ``reference``, the next-token predictions on each
    request's neighbourhood prompts before the edit, from :meth:`HFEditor.reference`) ``locality``,
    each averaged over requests, and ``per_request`` (the three per request; NaN where a request
    has no paraphrase or neighbourhood prompt).

    A model whose logits are NaN or ``+inf`` (or all ``-inf``) where a request is scored gets no score:
    that request's values are NaN, its index is listed in ``nonfinite_requests``, and the three averages
    are NaN (never an argmax of NaN logits counted as a prediction)."""
    with _Frozen(model):
        eff = _target_accuracy(model, tok, [(r.text, r.target_new) for r in requests], batch)
        para_flat = _target_accuracy(model, tok, [(p, r.target_new) for r in requests for p in r.paraphrase_prompts],
                                     batch)
        now = _next_tokens(model, tok, [p for r in requests for p in r.neighborhood_prompts], batch)
    per, i, j = [], 0, 0
    nonfinite: list[int] = []
    for k, r in enumerate(requests):
        para = para_flat[i : i + len(r.paraphrase_prompts)]
        i += len(r.paraphrase_prompts)
        cur = now[j : j + len(r.neighborhood_prompts)]
        j += len(r.neighborhood_prompts)
        loc = math.nan
        bad = math.isnan(eff[k]) or any(math.isnan(x) for x in para) or None in cur
        if reference is not None and cur:
            ref = list(reference[k])
            if len(ref) != len(cur):
                raise ValueError(f"reference for request {k} has {len(ref)} predictions; it has {len(cur)} "
                                 "neighbourhood prompts")
            bad = bad or None in ref  # the reference model's logits were not finite there
            loc = math.nan if bad else _mean([float(a == b) for a, b in zip(cur, ref, strict=True)])
        if bad:
            nonfinite.append(k)
        per.append({"efficacy": eff[k], "paraphrase": _mean(para), "locality": loc})
    if nonfinite:
        return {"efficacy": math.nan, "paraphrase": math.nan, "locality": math.nan, "per_request": per,
                "nonfinite_requests": nonfinite}
    return {
        "efficacy": _mean(eff),
        "paraphrase": _mean([p["paraphrase"] for p in per if not math.isnan(p["paraphrase"])]),
        "locality": _mean([p["locality"] for p in per if not math.isnan(p["locality"])]),
        "per_request": per,
        "nonfinite_requests": nonfinite,
    }


def _check_search(steps: object, lr: object, clamp: object, weight_decay: object, batch: object) -> None:
    """The target search's settings: ``ValueError`` naming the first out of range or not finite."""
    for name, x in (("steps", steps), ("batch", batch)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ValueError(f"{name}={x!r} must be an integer")
    if steps < 0 or batch < 1:  # type: ignore[operator]
        raise ValueError(f"steps={steps} must be >= 0 and batch={batch} >= 1")
    _number("lr", lr, lo_open=True)
    _number("clamp", clamp, lo_open=True)
    _number("weight_decay", weight_decay)


# -- the editor -----------------------------------------------------------------------------------------
class HFEditor:
    """Edit a Hugging Face causal LM (in place) from :class:`EditRequest`\\ s with a registered editor.

    Args:
        model: the causal LM (any ``nn.Module`` called as ``model(input_ids=..., attention_mask=...)``
            returning logits).
        tok: a tokenizer: ``encode(text) -> ids`` or a callable ``text -> ids``.
        editor: a registered editor name (``rome``, ``memit``, ``alphaedit``, ``rlsedit``, ``none``).
        layers: the layer index or indices to edit (MEMIT spreads one edit over several).
        module: the template of the edited projection's name, with ``{}`` for the layer (default:
            found among :data:`MLP_OUT_TEMPLATES`).
        preserve: texts whose keys (every token's, at each layer) the edit must keep: ``K0`` and
            ``C0 = K0 K0^T`` for the editor. Needed by ``memit`` and ``alphaedit``; ``rlsedit`` at its
            default ``lam = 0`` needs keys that span the key space (at least ``d_k`` of them), else
            give ``editor_params={"lam": ...}``.
        editor_params: the editor's hyperparameters (checked by :func:`~poise.edit.make_editor`).
        sphere: wrap each editor in SPHERE (True or ``{"beta": ..., "alpha": ...}``).
        steps, lr, clamp, weight_decay: the target search (Adam steps and rate, the norm cap as a
            multiple of the hidden state's norm, the L2 penalty).
        ridge: added to the diagonal of ``C0 = K0 K0^T`` (a few preserved keys do not span the key
            space; MEMIT's ``lam C0 + K K^T`` must be invertible).
        batch: requests per forward pass.

    Refusals: a hyperparameter out of range or not finite (``steps`` an integer ``>= 0``, ``lr`` and
    ``clamp`` ``> 0``, ``weight_decay`` and ``ridge`` ``>= 0``, ``batch`` an integer ``>= 1``) raises
    ``ValueError`` naming it; non-finite preserved keys (a model whose outputs are NaN/inf) raise it
    from the editor's constructor. :meth:`edit` is all or nothing: a non-finite key, target or weight,
    or an editor's ``ValueError`` (a singular system, an overflow) at any layer restores every edited
    weight and every editor's state bit for bit before the error propagates.
    """

    def __init__(self, model: nn.Module, tok: Tokenizer, editor: str, layers: int | Sequence[int], *,
                 module: str | None = None, preserve: Sequence[str] | None = None,
                 editor_params: Mapping[str, Any] | None = None, sphere: Mapping[str, float] | bool | None = None,
                 steps: int = 40, lr: float = 0.5, clamp: float = 4.0, weight_decay: float = 1e-3,
                 ridge: float = 1e-2, batch: int = 64):
        self.model, self.tok = model, tok
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        if not self.layers or sorted(set(self.layers)) != self.layers:
            raise ValueError(f"layers={layers!r}: give one index or increasing distinct indices")
        _check_search(steps, lr, clamp, weight_decay, batch)
        self.steps, self.lr, self.clamp, self.weight_decay, self.batch = steps, lr, clamp, weight_decay, batch
        found = [mlp_out_module(model, layer, module) for layer in self.layers]
        self.template = found[0][1]
        self.modules = [m for m, _ in found]
        block = self.template.split("{}")[0] + "{}"
        mods = dict(model.named_modules())
        if block.format(self.layers[-1]) not in mods:
            raise ValueError(f"no block {block.format(self.layers[-1])!r} above {self.template!r}")
        self.block = mods[block.format(self.layers[-1])]
        _number("ridge", ridge)
        K0s: list[Tensor | None] = [None] * len(self.layers)
        if preserve:
            K0s = [k.T.contiguous() for k in self._keys_everywhere(list(preserve))]
        elif editor in ("memit", "alphaedit"):
            raise ValueError(f"editor {editor!r} needs preserved keys: pass preserve=[texts the edit must not "
                             "change] (their keys give K0 and C0 = K0 K0^T)")
        def C0(K0: Tensor | None) -> Tensor | None:
            if K0 is None:
                return None
            return K0 @ K0.T + ridge * torch.eye(K0.shape[0], dtype=K0.dtype, device=K0.device)

        self.editors: list[Editor] = [
            make_editor(editor, _weight(m).detach().double().clone(), K0, C0(K0), sphere=sphere,
                        **dict(editor_params or {}))
            for m, K0 in zip(self.modules, K0s, strict=True)]
        self.editor_name = editor

    # the preserved keys: every token of every text
    def _keys_everywhere(self, texts: list[str]) -> list[Tensor]:
        out: list[list[Tensor]] = [[] for _ in self.modules]
        dev = _device(self.model)
        with _Frozen(self.model):
            for s in range(0, len(texts), self.batch):
                ids = [_encode(self.tok, t) for t in texts[s : s + self.batch]]
                x, am = _pad(ids, dev)
                rows, pos = torch.nonzero(am, as_tuple=True)
                keys, _ = _capture(self.model, x, am, rows, pos, inputs_of=self.modules)
                for li, k in enumerate(keys):
                    out[li].append(k.double())
        return [torch.cat(k) for k in out]  # [m, d_k] per layer

    def reference(self, requests: Sequence[EditRequest]) -> list[list[int | None]]:
        """The model's next-token predictions on each request's neighbourhood prompts now (the
        reference the locality score compares with after an edit; None where the logits are not finite)."""
        with _Frozen(self.model):
            flat = _next_tokens(self.model, self.tok, [p for r in requests for p in r.neighborhood_prompts],
                                self.batch)
        out, j = [], 0
        for r in requests:
            out.append(flat[j : j + len(r.neighborhood_prompts)])
            j += len(r.neighborhood_prompts)
        return out

    def _layout(self, reqs: Sequence[EditRequest]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``prompt + target`` rows (right-padded), the target labels, and each row's subject position."""
        dev = _device(self.model)
        split = [_split(self.tok, r.text, r.target_new) for r in reqs]
        x, am = _pad([p + t for p, t in split], dev)
        tgt = torch.full_like(x, -100)
        for i, (p, t) in enumerate(split):
            tgt[i, len(p) : len(p) + len(t)] = torch.tensor(t, device=dev)
        rows = torch.arange(len(reqs), device=dev)
        pos = torch.tensor([_subject_last(self.tok, r.text, r.subject, p) for r, (p, _) in
                            zip(reqs, split, strict=True)], device=dev)
        return x, am, tgt, rows, pos

    def keys(self, requests: Sequence[EditRequest]) -> list[Tensor]:
        """Per edited layer, the keys ``K [d_k, n]`` (float64) the edit writes at: the projection's
        input at each request's subject's last token, with the current weights."""
        with _Frozen(self.model):
            x, am, _, rows, pos = self._layout(requests)
            keys, _ = _capture(self.model, x, am, rows, pos, inputs_of=self.modules)
        return [k.double().T.contiguous() for k in keys]

    def _sync(self) -> None:
        """Carry a weight change made outside the editors (fine-tuning) into their state; a non-finite
        weight raises ``ValueError`` naming the layer before any editor changes."""
        Ws = [_weight(m).detach().double() for m in self.modules]
        for layer, W in zip(self.layers, Ws, strict=True):
            if not bool(torch.isfinite(W).all()):
                raise ValueError(f"layer {layer}: the weight of {self.template.format(layer)} has "
                                 f"{int((~torch.isfinite(W)).sum())} non-finite entries: nothing can be edited")
        for W, ed in zip(Ws, self.editors, strict=True):
            if not torch.equal(W, ed.weight.to(W.device)):
                ed.shift((W - ed.weight.to(W.device)).to(ed.weight.device))

    def _write(self, m: nn.Module, delta: Tensor) -> None:
        with torch.no_grad():
            W = _weight(m)
            W.add_(delta.to(device=W.device, dtype=W.dtype))  # a view: Conv1D's weight changes transposed
            if not bool(torch.isfinite(W).all()):  # overflow in a low-precision weight: edit() restores it
                raise ValueError(f"the edit overflows the model's {W.dtype} weight {tuple(W.shape)}")

    def _targets(self, x: Tensor, am: Tensor, tgt: Tensor, rows: Tensor, pos: Tensor, h: Tensor) -> Tensor:
        """The ``delta`` per request at the last layer's projection output (Adam on the target NLL),
        ``||delta||`` capped at ``clamp`` times the norm of the hidden state ``h`` there."""
        last = self.modules[-1]
        got: dict[str, Tensor] = {}
        delta: Tensor | None = None

        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if "v" not in got:
                got["v"] = out[rows, pos].detach()
            if delta is None:
                return out
            add = torch.zeros_like(out)
            add[rows, pos] = delta.to(out.dtype)
            return out + add

        handle = last.register_forward_hook(hook)
        try:
            with torch.no_grad():
                _logits(self.model, x, am)
            delta = torch.zeros_like(got["v"], dtype=torch.float32, requires_grad=True)
            cap = self.clamp * h.float().norm(dim=1, keepdim=True)
            capped_delta_search(
                delta, lambda: F.cross_entropy(_logits(self.model, x, am)[:, :-1].flatten(0, 1).float(),
                                               tgt[:, 1:].flatten(), ignore_index=-100, reduction="sum"),
                self.steps, self.lr, self.weight_decay, cap)
        finally:
            handle.remove()
        return delta.detach().double()

    def edit(self, requests: Sequence[EditRequest | Mapping[str, Any]], *, measure: bool = True) -> dict[str, Any]:
        """Apply the requests (records are read by :meth:`EditRequest.from_record`) as one batch of
        edits; the model's weights change in place. Returns the scores after the edit
        (:func:`evaluate_requests`: ``efficacy``, ``paraphrase``, ``locality``, ``per_request``) and
        ``efficacy_before`` / ``paraphrase_before``, plus ``delta_norms`` (the Frobenius norm of each
        layer's change); ``measure=False`` returns only ``delta_norms``. All or nothing: on a
        ``ValueError`` (a non-finite weight, hidden state or target; an editor's refusal at any layer)
        every edited weight and editor state is restored bit for bit; scores of a model with non-finite
        logits are NaN with ``nonfinite_requests`` listed (:func:`evaluate_requests`)."""
        reqs = [r if isinstance(r, EditRequest) else EditRequest.from_record(r) for r in requests]
        if not reqs:
            raise ValueError("no request given")
        before = evaluate_requests(self.model, self.tok, reqs, batch=self.batch) if measure else None
        ref = self.reference(reqs) if measure else None
        # all or nothing: on any error the edited weights and the editors' states go back to these
        saved = ([_weight(m).detach().clone() for m in self.modules], [ed.state_dict() for ed in self.editors])
        try:
            self._sync()
            norms = self._edit_all(reqs)
        except BaseException:
            with torch.no_grad():
                for m, W in zip(self.modules, saved[0], strict=True):
                    _weight(m).copy_(W)
            for ed, st in zip(self.editors, saved[1], strict=True):
                ed.load_state_dict(st)
            raise
        out: dict[str, Any] = {"delta_norms": [math.sqrt(n) for n in norms]}
        if measure:
            out.update(evaluate_requests(self.model, self.tok, reqs, reference=ref, batch=self.batch))
            out["efficacy_before"] = before["efficacy"]  # type: ignore[index]
            out["paraphrase_before"] = before["paraphrase"]  # type: ignore[index]
        return out

    def _edit_all(self, reqs: Sequence[EditRequest]) -> list[float]:
        """Every batch of requests, layer by layer; returns each layer's squared change norm."""
        norms = [0.0] * len(self.layers)
        with _Frozen(self.model):
            for s in range(0, len(reqs), self.batch):
                x, am, tgt, rows, pos = self._layout(reqs[s : s + self.batch])
                _, (h_L,) = _capture(self.model, x, am, rows, pos, outputs_of=[self.block])
                dz = self._targets(x, am, tgt, rows, pos, h_L)
                bad = (~torch.isfinite(h_L.double()).all(1) | ~torch.isfinite(dz).all(1)).nonzero().flatten().tolist()
                if bad:
                    raise ValueError(f"requests {[s + i for i in bad]}: the hidden state of layer {self.layers[-1]} "
                                     "or the target found for it is not finite (the model's outputs are NaN/inf, or "
                                     "lr is too large): nothing was written")
                stuck = (dz.abs().sum(1) == 0).nonzero().flatten().tolist()
                if stuck and self.steps > 0:
                    warnings.warn(f"requests {[s + i for i in stuck]}: the target does not depend on layer "
                                  f"{self.layers[-1]}'s output at the subject's last token (a later layer must read "
                                  "it: edit a lower layer); nothing is written for them", stacklevel=2)
                z = h_L.double() + dz
                for li, (m, ed) in enumerate(zip(self.modules, self.editors, strict=True)):
                    (k,), (cur,) = _capture(self.model, x, am, rows, pos, inputs_of=[m], outputs_of=[self.block])
                    K = k.double().T.to(ed.weight.device)
                    r = ((z - cur.double()) / (len(self.layers) - li)).T.to(ed.weight.device)
                    try:
                        d = ed.edit(K, ed.weight @ K + r)
                    except ValueError as e:
                        raise ValueError(f"layer {self.layers[li]} ({self.template.format(self.layers[li])}): {e}; "
                                         "the model and the editors are left as they were") from None
                    self._write(m, d)
                    norms[li] += float(d.norm()) ** 2
        return norms


def edit_hf_model(model: nn.Module, tok: Tokenizer, requests: Sequence[EditRequest | Mapping[str, Any]],
                  editor: str = "rome", layers: int | Sequence[int] = 0, **kwargs: Any) -> dict[str, Any]:
    """One call: ``HFEditor(model, tok, editor, layers, **kwargs).edit(requests)``; the model is edited
    in place and the scores are returned (see :class:`HFEditor`)."""
    return HFEditor(model, tok, editor, layers, **kwargs).edit(requests)


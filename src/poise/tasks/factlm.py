"""A tiny word-level LM that knows a generated fact corpus, and the batched tools the
edit-stream and priming studies need: train it, score candidate keywords after prompts, and
find the value a layer must output for the model to state a new fact (ROME's ``v*``).

Words, not characters: every entity is one token, as a subject is a few meaningful tokens in
a real LLM, so a layer's key at the subject is specific to it (a character model's keys at a
name's last letter are shared by every name ending alike, and no linear edit separates them).
Nothing is downloaded: facts come from :mod:`poise.tasks.facts`. Every line the model sees
starts after a newline token, so prompts are scored as ``"\\n" + prompt``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.tasks.facts import THEMES, Fact
from poise.tasks.gpt import GPT, GPTConfig

__all__ = [
    "WordTokenizer",
    "base_lines",
    "candidate_logprobs",
    "edit_targets",
    "fact_tokenizer",
    "heldout_loss",
    "keys_at",
    "subject_position",
    "template_prompt",
    "train_lm",
]


_SPLIT = re.compile(r"\n|[a-z']+|[.,:]")


class WordTokenizer:
    """Words, ``.``, ``,``, ``:`` and newline as tokens over a fixed vocabulary; spaces are implied
    between words. Unknown words are an error naming them."""

    def __init__(self, words: Sequence[str]):
        self.itos = ["\n", ".", ",", ":"] + sorted(set(words) - {"\n", ".", ",", ":"})
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        toks = _SPLIT.findall(text)
        bad = sorted({t for t in toks if t not in self.stoi})
        if bad:
            raise ValueError(f"words not in the vocabulary: {', '.join(bad[:10])}")
        return torch.tensor([self.stoi[t] for t in toks], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        text = " ".join(self.itos[i] for i in ids.tolist())
        return text.replace(" .", ".").replace(" ,", ",").replace(" :", ":").replace(" \n ", "\n")


def fact_tokenizer(facts: Sequence[Fact]) -> WordTokenizer:
    """The vocabulary of the themes (templates, values, contexts) and of these facts' entities."""
    words = {f.entity for f in facts}
    for spec in THEMES.values():
        for text in (*spec["values"], *spec["templates"], *spec["contexts"], *spec["stones"]):
            words.update(_SPLIT.findall(text.replace("{e}", "").replace("{k}", "")))
    return WordTokenizer(sorted(words))


def base_lines(facts: Sequence[Fact], seed: int = 0, contexts_per_theme: int = 200, zipf: float = 1.0) -> list[str]:
    """Training lines: every template of every fact, plus each theme's unrelated contexts
    (and, a quarter as often, its stepping-stone phrases) followed by one of its values drawn
    with Zipf weights ``1/rank^zipf`` (so some keywords are common and some rare: the priming
    predictor needs that spread)."""
    rng = random.Random(seed)
    lines = [t for f in facts for t in (f.text, *f.paraphrases)]
    for spec in THEMES.values():
        vals = spec["values"]
        w = [1.0 / (r + 1) ** zipf for r in range(len(vals))]
        for _ in range(contexts_per_theme):
            lines.append(f"{rng.choice(spec['contexts'])} {rng.choices(vals, w)[0]}.")
        for _ in range(contexts_per_theme // 4):
            lines.append(f"{rng.choice(spec['stones'])} {rng.choices(vals, w)[0]}.")
    rng.shuffle(lines)
    return lines


def _windows(ids: Tensor, n: int, T: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(ids) - T - 1, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(T + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def train_lm(lines: Sequence[str], tok: WordTokenizer, *, n_layer: int = 2, n_head: int = 2, n_embd: int = 64,
             mlp_ratio: int = 4, block_size: int = 16, steps: int = 1500,
             batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
             progress: Callable[[int], None] | None = None) -> GPT:
    """A :class:`~poise.tasks.gpt.GPT` trained with AdamW (cosine decay) on random windows
    of the newline-joined ``lines``."""
    rng = random.Random(seed)
    order = list(lines)
    rng.shuffle(order)
    ids = tok.encode("\n" + "\n".join(order * max(1, (block_size * 4) // max(1, len(order)))) + "\n")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, mlp_ratio=mlp_ratio))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = _windows(ids, batch_size, block_size, gen)
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    model.eval()
    return model


def _pad(seqs: list[Tensor]) -> Tensor:
    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@torch.no_grad()
def candidate_logprobs(model: nn.Module, tok: WordTokenizer, prompts: Sequence[str],
                       candidates: Sequence[Sequence[str]], batch: int = 4096) -> Tensor:
    """``out[i, j] = log P(candidates[i][j] | "\\n" + prompts[i])`` (sum over the candidate's
    tokens). Every prompt must have the same number of candidates. Right-padded batches:
    a causal model never sees the padding of a position it scores."""
    n_c = len(candidates[0])
    rows = [(i, j, tok.encode("\n" + p), tok.encode(c)) for i, p in enumerate(prompts)
            for j, c in enumerate(candidates[i])]
    out = torch.empty(len(prompts), n_c)
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        x = _pad([torch.cat([p, c]) for _, _, p, c in chunk])
        logp = F.log_softmax(model(x)[0].float(), -1)
        for r, (i, j, p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            out[i, j] = logp[r, pos, c].sum()
    return out


@torch.no_grad()
def heldout_loss(model: nn.Module, tok: WordTokenizer, lines: Sequence[str], block_size: int) -> float:
    """Mean next-token cross-entropy on ``lines`` (each scored on its own after a newline)."""
    seqs = [tok.encode("\n" + ln)[: block_size + 1] for ln in lines]
    x = _pad(seqs)
    logits = model(x[:, :-1])[0].float()
    y = x[:, 1:].clone()
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    mask = torch.arange(y.shape[1])[None] < lengths[:, None]
    y[~mask] = -100
    return float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100))


def subject_position(tok: WordTokenizer, prompt: str, entity: str) -> int:
    """Index, in the tokens of ``"\\n" + prompt``, of the entity (where ROME reads its key)."""
    ids = tok.encode("\n" + prompt).tolist()
    e = tok.stoi.get(entity)
    if e not in ids:
        raise ValueError(f"entity {entity!r} is not a token of {prompt!r}")
    return ids.index(e)


def _value_search(model: nn.Module, layer: nn.Linear, x: Tensor, tgt: Tensor, pos: Tensor, steps: int, lr: float,
                  clamp: float, weight_decay: float) -> tuple[Tensor, Tensor]:
    """One batch of :func:`edit_targets`: keys and target values at ``pos`` (one per row)."""
    rows = torch.arange(x.shape[0])
    got: dict[str, Tensor] = {}
    delta = torch.zeros(x.shape[0], layer.out_features, requires_grad=True)

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if "k" not in got:
            got["k"], got["v"] = args[0][rows, pos].detach(), out[rows, pos].detach()
        add = torch.zeros_like(out)
        add[rows, pos] = delta
        return out + add

    h = layer.register_forward_hook(hook)
    try:
        model(x)  # records the unedited keys and outputs
        opt = torch.optim.Adam([delta], lr=lr)
        cap = clamp * got["v"].norm(dim=1, keepdim=True)
        for _ in range(steps):
            logits = model(x)[0]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100, reduction="sum")
            loss = nll + weight_decay * (delta**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                n = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(n > cap, cap / n.clamp_min(1e-12), torch.ones_like(n)))
    finally:
        h.remove()
    v = got["v"] + delta.detach()
    if layer.bias is not None:
        v = v - layer.bias.detach()
    return got["k"].double(), v.double()


def edit_targets(model: nn.Module, tok: WordTokenizer, layer: nn.Linear, prompts: Sequence[str],
                 positions: Sequence[int], keywords: Sequence[str], *, steps: int = 30, lr: float = 0.5,
                 clamp: float = 4.0, weight_decay: float = 1e-3, batch: int = 512) -> tuple[Tensor, Tensor]:
    r"""ROME's ``v*`` for many facts at once (Meng et al., arXiv 2202.05262, sec. 3.1): for
    each prompt, the output of ``layer`` at ``positions[i]`` (a token of ``"\n" +
    prompt``) plus a vector ``delta_i`` found by Adam to maximise ``log P(keyword | prompt)``
    with a small L2 penalty, ``||delta_i||`` clamped to ``clamp`` times the output's norm.
    The facts are independent, so one batched optimisation finds all of them. Returns keys
    ``K [d_k, n]`` (the layer's inputs there) and target values ``V [d_v, n]`` (bias
    excluded), both float64, in the ``v = W k`` convention of :mod:`poise.edit.linear`.
    ``steps=0`` returns the unedited values."""
    Ks, Vs = [], []
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for s in range(0, len(prompts), batch):
            P = [tok.encode("\n" + p) for p in prompts[s : s + batch]]
            C = [tok.encode(k) for k in keywords[s : s + batch]]
            x = _pad([torch.cat([p, c]) for p, c in zip(P, C, strict=True)])
            tgt = torch.full_like(x, -100)
            for r, (p, c) in enumerate(zip(P, C, strict=True)):
                tgt[r, len(p) - 1 : len(p) - 1 + len(c)] = c
            k, v = _value_search(model, layer, x, tgt, torch.tensor(positions[s : s + batch]), steps, lr, clamp,
                                 weight_decay)
            Ks.append(k)
            Vs.append(v)
    finally:
        for p, r in zip(params, req, strict=True):
            p.requires_grad_(r)
    return torch.cat(Ks).T.contiguous(), torch.cat(Vs).T.contiguous()


def template_prompt(fact: Fact, j: int) -> str:
    """The fact's ``j``-th template (0 = its text, 1.. = paraphrases) up to the keyword."""
    return THEMES[fact.theme]["templates"][j].split("{k}")[0].format(e=fact.entity)


@torch.no_grad()
def keys_at(model: nn.Module, tok: WordTokenizer, layer: nn.Linear, prompts: Sequence[str],
            positions: Sequence[int], batch: int = 4096) -> Tensor:
    """The inputs of ``layer`` at ``positions[i]`` of ``"\\n" + prompts[i]``, as float64
    columns ``[d_k, n]``."""
    out = []
    got: dict[str, Tensor] = {}
    h = layer.register_forward_hook(lambda m, a, o: got.__setitem__("k", a[0]))
    try:
        for s in range(0, len(prompts), batch):
            x = _pad([tok.encode("\n" + p) for p in prompts[s : s + batch]])
            model(x)
            out.append(got["k"][torch.arange(x.shape[0]), torch.tensor(positions[s : s + batch])].double())
    finally:
        h.remove()
    return torch.cat(out).T.contiguous()

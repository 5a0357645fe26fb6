"""A tiny word-level LM that knows a generated fact corpus, and the batched tools the
edit-stream and priming studies need: train it and score candidate keywords after prompts. The
edit targets (a layer's keys, and the value it must output for the model to state a new fact,
ROME's ``v*``) are in :mod:`poise.edit.targets`; ``edit_targets`` and ``keys_at`` are re-exported here.

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
    "edit_targets",  # noqa: F822 (from poise.edit.targets, by __getattr__ below)
    "fact_tokenizer",
    "heldout_loss",
    "keys_at",  # noqa: F822 (from poise.edit.targets, by __getattr__ below)
    "pad_right",
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


def pad_right(seqs: Sequence[Tensor]) -> Tensor:
    """Token-id sequences as one ``[n, max_len]`` long tensor, right-padded with token 0 (a causal
    model never sees the padding of a position it scores)."""
    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


_pad = pad_right  # the former private name, still imported by the priming study


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
        x = pad_right([torch.cat([p, c]) for _, _, p, c in chunk])
        logp = F.log_softmax(model(x)[0].float(), -1)
        for r, (i, j, p, c) in enumerate(chunk):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            out[i, j] = logp[r, pos, c].sum()
    return out


@torch.no_grad()
def heldout_loss(model: nn.Module, tok: WordTokenizer, lines: Sequence[str], block_size: int) -> float:
    """Mean next-token cross-entropy on ``lines`` (each scored on its own after a newline)."""
    seqs = [tok.encode("\n" + ln)[: block_size + 1] for ln in lines]
    x = pad_right(seqs)
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


def template_prompt(fact: Fact, j: int) -> str:
    """The fact's ``j``-th template (0 = its text, 1.. = paraphrases) up to the keyword."""
    return THEMES[fact.theme]["templates"][j].split("{k}")[0].format(e=fact.entity)


_MOVED = {"edit_targets", "keys_at", "_value_search"}


def __getattr__(name: str) -> object:
    # edit_targets, keys_at and _value_search moved to poise.edit.targets (which imports this module).
    if name in _MOVED:
        from poise.edit import targets

        return getattr(targets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

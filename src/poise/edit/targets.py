"""Edit targets on a causal LM: the keys a layer reads at given positions, and the values it must
output there for the model to state new facts (ROME's ``v*``), for many facts in one batch.

Keys and values come back as float64 columns in the ``v = W k`` convention of
:mod:`poise.edit.linear`, ready for the editors of :mod:`poise.edit.editors`. ``tok`` is any
tokenizer with ``encode(text) -> 1-D LongTensor`` (e.g. :class:`poise.tasks.factlm.WordTokenizer`);
prompts are scored as ``"\\n" + prompt``, as every line of the fact LM starts after a newline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.tasks.factlm import WordTokenizer, pad_right

__all__ = ["edit_targets", "keys_at"]


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
            x = pad_right([torch.cat([p, c]) for p, c in zip(P, C, strict=True)])
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
            x = pad_right([tok.encode("\n" + p) for p in prompts[s : s + batch]])
            model(x)
            out.append(got["k"][torch.arange(x.shape[0]), torch.tensor(positions[s : s + batch])].double())
    finally:
        h.remove()
    return torch.cat(out).T.contiguous()

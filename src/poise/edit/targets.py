"""Edit targets on a causal LM: the keys a layer reads at given positions, and the values it must
output there for the model to state new facts (ROME's ``v*``), for many facts in one batch.

Keys and values come back as float64 columns in the ``v = W k`` convention of
:mod:`poise.edit.linear`, ready for the editors of :mod:`poise.edit.editors`. ``tok`` is any
tokenizer with ``encode(text) -> 1-D LongTensor`` (e.g. :class:`poise.tasks.factlm.WordTokenizer`);
prompts are scored as ``"\\n" + prompt``, as every line of the fact LM starts after a newline.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.edit.linear import _number
from poise.tasks.factlm import WordTokenizer, pad_right

__all__ = ["edit_targets", "keys_at"]


def _lengths(prompts: Sequence[str], positions: Sequence[int], batch: object, **more: Sequence[str]) -> None:
    lens = {"prompts": len(prompts), "positions": len(positions), **{k: len(v) for k, v in more.items()}}
    if len(set(lens.values())) != 1:
        raise ValueError(f"one position{' and keyword' if more else ''} per prompt: got " +
                         ", ".join(f"{n} {k}" for k, n in lens.items()))
    if not prompts:
        raise ValueError("no prompt given")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")


def _finite_columns(X: Tensor, what: str) -> None:
    """``ValueError`` listing the prompts (columns) whose ``what`` are not finite."""
    bad = (~torch.isfinite(X).all(0)).nonzero().flatten().tolist()
    if bad:
        more = " ..." if len(bad) > 10 else ""
        raise ValueError(f"the {what} of prompts {bad[:10]}{more} are not finite ({len(bad)} of {X.shape[1]}): the "
                         "model's outputs are NaN/inf there (or lr is too large); no edit can be computed from them")


def capped_delta_search(delta: Tensor, nll: Callable[[], Tensor], steps: int, lr: float, weight_decay: float,
                        cap: Tensor) -> None:
    """The ``v*`` search shared by every editor front end (ROME/MEMIT's target values): ``steps`` Adam
    steps on ``nll() + weight_decay * ||delta||^2`` in place, each row of ``delta`` scaled back to norm
    ``cap`` (a column, one bound per row) after every step. ``nll`` runs the model with ``delta`` hooked in."""
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():  # also when the caller is under no_grad
            loss = nll() + weight_decay * (delta**2).sum()
            opt.zero_grad()
            loss.backward()
        opt.step()
        with torch.no_grad():
            n = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.where(n > cap, cap / n.clamp_min(1e-12), torch.ones_like(n)))


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
        cap = clamp * got["v"].norm(dim=1, keepdim=True)
        capped_delta_search(
            delta, lambda: F.cross_entropy(model(x)[0].flatten(0, 1).float(), tgt.flatten(), ignore_index=-100,
                                           reduction="sum"), steps, lr, weight_decay, cap)
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
    ``steps=0`` returns the unedited values.

    ``ValueError`` for: lengths that differ, ``steps`` not an integer ``>= 0``, ``lr`` or ``clamp``
    not finite and ``> 0``, ``weight_decay`` not finite and ``>= 0``, ``batch < 1``; and keys or values
    that come out non-finite (naming the prompts), instead of handing NaN to an editor."""
    _lengths(prompts, positions, batch, keywords=keywords)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    _number("lr", lr, lo_open=True)
    _number("clamp", clamp, lo_open=True)
    _number("weight_decay", weight_decay)
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
    K, V = torch.cat(Ks).T.contiguous(), torch.cat(Vs).T.contiguous()
    _finite_columns(K, "keys")
    _finite_columns(V, "target values")
    return K, V


@torch.no_grad()
def keys_at(model: nn.Module, tok: WordTokenizer, layer: nn.Linear, prompts: Sequence[str],
            positions: Sequence[int], batch: int = 4096) -> Tensor:
    """The inputs of ``layer`` at ``positions[i]`` of ``"\\n" + prompts[i]``, as float64
    columns ``[d_k, n]``. Lengths that differ, ``batch < 1`` and non-finite keys (naming the prompts)
    raise ``ValueError``."""
    _lengths(prompts, positions, batch)
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
    K = torch.cat(out).T.contiguous()
    _finite_columns(K, "keys")
    return K

"""Update pruning and per-weight gating: ignore-k, CLASSP."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from poise.transforms._base import REQUIRED, Hyper, State, Transform, Updates, declare

__all__ = ["ignore_top_k", "scale_by_classp"]


def ignore_top_k(k: float | None = None) -> Transform:
    r"""Ignore-k (Sun et al., "How new data permeates LLM knowledge and how to dilute it",
    arXiv 2504.09522): zero the ``ceil(k n)`` largest-magnitude coordinates of each
    tensor's update (the complement of top-k sparsification) and keep the rest. ``k`` in
    [0, 1) (default: ``hyper["ignore_k"]``). Put it last in a chain to prune the realised
    update. Records ``ignored_frac``.
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        frac = hyper["ignore_k"] if k is None else k
        if not 0 <= frac < 1:
            raise ValueError(f"ignore_k={frac} is out of range; valid: [0, 1)")
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None or frac == 0:
                out.append(u)
                continue
            n = math.ceil(frac * u.numel())
            u = u.contiguous()
            idx = torch.topk(u.view(-1).abs(), n, sorted=False).indices
            u.view(-1).index_fill_(0, idx, 0.0)
            s["ignored_frac"] = torch.tensor(n / u.numel())
            out.append(u)
        return out

    reads = declare("ignore_k", ignore_k=(REQUIRED, "ignore-k fraction of coordinates")) if k is None else {}
    return Transform(lambda p, h: {}, update, "ignore_k", False, reads)


def scale_by_classp() -> Transform:
    r"""CLASSP, the paper's rule (Ludwig, "CLASSP: a biologically-inspired approach to
    continual learning through adjustment suppression and sparsity promotion",
    arXiv 2405.09637):

    ``G_i <- G_i + |g_i|^p`` and ``u_i = g_i / (eps + G_i)^{1/p}`` where ``g_i^2 > tau``,
    else ``u_i = 0`` and ``G_i`` unchanged.

    ``G`` accumulates the gradients of each weight including the current one, as AdaGrad
    and the authors' code do. The paper writes ``sum_{k<t}`` (the current gradient left
    out); that divides a weight's first step by ``eps^{1/p}``, 316 times the gradient at the
    default ``eps`` and ``p = 2``, and diverges at once; ``hyper["include_current"] = False``
    gives it anyway. ``tau`` = ``hyper["threshold"]``, ``eps`` =
    ``hyper["epsilon"]``, ``p`` = ``hyper["power"]``; ``hyper["apply_scaling"] = False``
    keeps the gate and drops the scaling (``u = g`` where open). p = 2, tau = 0 is AdaGrad
    with ``eps`` inside the root. State: ``grad_sum``;
    records ``active_frac`` (share of weights the gate let through).

    The authors' script (oswaldoludwig/CLASSP) differs from the paper in two ways poise
    does not copy: its gate compares a boolean with the threshold (so it is always open for
    a nonzero gradient) and it accumulates ``|g|`` whatever ``p`` is (docs/algorithms/classp.md).

    Declared defaults are the authors' (``threshold=0.5, epsilon=1e-5, power=1``).
    ``threshold`` is also SPAM's spike bound: to chain both, alias one with
    :func:`poise.transforms.rename` (``rename(scale_by_classp(), threshold="gate_threshold")``).
    """

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        tau, eps, p = hyper["threshold"], hyper["epsilon"], hyper["power"]
        out: Updates = []
        for u, s in zip(updates, states, strict=True):
            if u is None:
                out.append(None)
                continue
            if "grad_sum" not in s:
                s["grad_sum"] = torch.zeros_like(u)
            G = s["grad_sum"]
            gate = u * u > tau
            s["active_frac"] = gate.float().mean()
            increment = torch.where(gate, u.abs().pow(p), torch.zeros_like(u))
            current = hyper.get("include_current", True)
            if current:
                G.add_(increment)
            step = u / (eps + G).pow(1.0 / p) if hyper.get("apply_scaling", True) else u.clone()
            if not current:
                G.add_(increment)
            out.append(step.mul_(gate))
        return out

    return Transform(lambda p, h: {}, update, "classp", True, declare(
        "classp", threshold=(0.5, "CLASSP gate tau (g^2 > tau)"), epsilon=(1e-5, "CLASSP epsilon inside the root"),
        power=(1.0, "CLASSP power p"), include_current=(True, "CLASSP: current gradient in G"),
        apply_scaling=(True, "CLASSP: scale by G or gate only")))

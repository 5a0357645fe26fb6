"""InTAct: interval-based task activation consolidation (Krukowski et al., arXiv 2511.17439).

After each task the per-neuron activation interval ``[lb, ub]`` entering each protected linear
layer is recorded (a hypercube, cumulative over tasks); while later tasks train, the interval
penalty keeps each protected layer's function unchanged on that box, without storing data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poise._registry import register
from poise.continual._base import Batch, Strategy

__all__ = ["InTAct", "activation_interval", "interval_bounds", "interval_drift"]

REDUCTIONS = ("unit", "sum")


def interval_bounds(dW: Tensor, db: Tensor | None, lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    r"""Exact bounds of a linear layer's output change over the box ``lb <= a <= ub``.

    For the change :math:`\Delta W, \Delta b` of a layer ``y = W a + b`` and
    :math:`\Delta W^+ = \max(\Delta W, 0)`, :math:`\Delta W^- = \max(-\Delta W, 0)`:

    .. math::

        \ell = \Delta W^+ lb - \Delta W^- ub + \Delta b, \qquad
        u = \Delta W^+ ub - \Delta W^- lb + \Delta b,

    so :math:`\ell_j \le (\Delta W a + \Delta b)_j \le u_j` for every ``a`` in the box, and both
    bounds are attained at a corner (interval arithmetic; InTAct's IntDrift, arXiv 2511.17439,
    ``src/method/interval_penalization_mlp.py`` of OneAndZero24/InTAct-Flex). Symbols: ``dW`` =
    :math:`\Delta W` ``(out, in)``, ``db`` = :math:`\Delta b` ``(out,)`` or None, ``lb``/``ub`` the
    box ``(in,)``. Returns ``(lower, upper)``, each ``(out,)``.
    """
    if dW.dim() != 2 or lb.shape != (dW.shape[1],) or ub.shape != lb.shape:
        raise ValueError(f"interval_bounds: dW must be (out, in) and lb, ub (in,); got dW {tuple(dW.shape)}, "
                         f"lb {tuple(lb.shape)}, ub {tuple(ub.shape)}")
    pos, neg = dW.clamp(min=0), (-dW).clamp(min=0)
    lower = pos @ lb - neg @ ub
    upper = pos @ ub - neg @ lb
    if db is not None:
        lower, upper = lower + db, upper + db
    return lower, upper


def interval_drift(lower: Tensor, upper: Tensor, reduction: str = "unit") -> Tensor:
    r"""InTAct's IntDrift penalty from :func:`interval_bounds`.

    ``reduction="unit"``: :math:`\operatorname{mean}_j \ell_j^2 + \operatorname{mean}_j u_j^2`,
    zero iff every output unit's change is zero on the whole box (for a box with ``ub > lb``:
    iff :math:`\Delta W = 0` and :math:`\Delta b = 0`). ``reduction="sum"``:
    :math:`(\sum_j \ell_j)^2 + (\sum_j u_j)^2`, the form in the authors' code snapshot
    (``lower_bound_reg.sum().pow(2) + upper_bound_reg.sum().pow(2)``), where units may cancel.
    """
    if reduction == "unit":
        return lower.pow(2).mean() + upper.pow(2).mean()
    if reduction == "sum":
        return lower.sum().pow(2) + upper.sum().pow(2)
    raise ValueError(f"reduction={reduction!r}; valid choices: {', '.join(map(repr, REDUCTIONS))}")


def activation_interval(acts: Tensor, lower_q: float = 0.05, upper_q: float = 0.95) -> tuple[Tensor, Tensor]:
    """Per-neuron ``[lb, ub]`` of activations ``(n, d)``: the ``lower_q`` / ``upper_q`` order
    statistics, index ``clip(int(n q), 0, n - 1)`` of the sorted column (the authors'
    ``IntervalActivation.reset_range``)."""
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"activation_interval: need (n >= 1, d) activations, got shape {tuple(acts.shape)}")
    if not 0 <= lower_q <= upper_q <= 1:
        raise ValueError(f"lower_q={lower_q}, upper_q={upper_q}: need 0 <= lower_q <= upper_q <= 1")
    s, _ = torch.sort(acts, dim=0)
    n = s.shape[0]
    lo = int(np.clip(int(n * lower_q), 0, n - 1))
    hi = int(np.clip(int(n * upper_q), 0, n - 1))
    return s[lo].clone(), s[hi].clone()


def _linears(model: nn.Module, names: Sequence[str] | None) -> dict[str, nn.Linear]:
    mods = dict(model.named_modules())
    if names is None:
        lin = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
        if len(lin) < 2:
            raise ValueError(f"InTAct protects the linear layers after the first; this model has {len(lin)} "
                             f"nn.Linear ({lin}): pass layers=[...] explicitly")
        return {n: mods[n] for n in lin[1:]}  # type: ignore[misc]
    out = {}
    for n in names:
        if n not in mods or not isinstance(mods[n], nn.Linear):
            valid = [k for k, m in mods.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"InTAct layers: {n!r} is not an nn.Linear of the model; valid choices: {valid}")
        out[n] = mods[n]
    return out  # type: ignore[return-value]


def _inputs(model: nn.Module, layers: dict[str, nn.Linear], x: Tensor) -> dict[str, Tensor]:
    """The inputs of ``layers`` (flattened to (B, in)) in a forward of ``model`` on ``x``."""
    got: dict[str, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, inp, n=n: got.__setitem__(n, inp[0].reshape(-1, inp[0].shape[-1])))
             for n, m in layers.items()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


@register("strategy", "intact")
class InTAct(Strategy):
    r"""InTAct (Krukowski et al., arXiv 2511.17439; code OneAndZero24/InTAct-Flex
    ``src/method/interval_penalization_mlp.py``), for the linear layers of any model.

    At each task's end the inputs ``a`` of every protected layer (default: every ``nn.Linear``
    after the first, i.e. those fed by hidden activations, the head included as in the authors'
    domain-incremental mode) are collected on the task's training data (eval mode) and their
    per-neuron interval ``[lb, ub]`` (the ``lower_q``/``upper_q`` order statistics,
    :func:`activation_interval`) is merged into the cumulative hypercube
    (``lb = min(lb, lb_t)``, ``ub = max(ub, ub_t)``); the layer weights are saved. During later
    tasks the loss gets

    .. math::

        L = L_{task} + \lambda_{drift} \sum_{layers} \mathrm{IntDrift}(\ell, u)
            + \lambda_{feat}\, \frac{\sum m \odot (a_{old} - a)^2}{\sum m + 10^{-8}}
            + s_{var} \sum_{layers} \operatorname{mean}_k \operatorname{Var}_{batch}(a_k)

    with :math:`(\ell, u)` = :func:`interval_bounds` of the change since the last task's end
    (:func:`interval_drift`, ``reduction``), :math:`a` / :math:`a_{old}` the inputs of the first
    protected layer under the current / last task's weights and :math:`m` the mask of entries of
    :math:`a` inside the box (the Feat term); the Var term (``var_scale``) applies from the first
    task on. Symbols: ``lam_drift`` = :math:`\lambda_{drift}` (authors' ``lambda_int_drift``),
    ``lam_feat`` = :math:`\lambda_{feat}`, ``var_scale`` = :math:`s_{var}`. No data is stored.

    Loss terms logged: ``int_drift``, ``feat``, ``var`` (weighted). ``intervals`` lists each
    finished task's own ``{layer: (lb, ub)}``; ``lb`` / ``ub`` hold the cumulative box.
    """

    name = "intact"

    def __init__(self, lam_drift: float = 1.0, lam_feat: float = 1.0, var_scale: float = 0.01,
                 layers: list[str] | None = None, lower_q: float = 0.05, upper_q: float = 0.95,
                 reduction: str = "unit"):
        for k, v in (("lam_drift", lam_drift), ("lam_feat", lam_feat), ("var_scale", var_scale)):
            if v < 0:
                raise ValueError(f"{k}={v} must be >= 0")
        if not 0 <= lower_q <= upper_q <= 1:
            raise ValueError(f"lower_q={lower_q}, upper_q={upper_q}: need 0 <= lower_q <= upper_q <= 1")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r}; valid choices: {', '.join(map(repr, REDUCTIONS))}")
        self.lam_drift, self.lam_feat, self.var_scale = lam_drift, lam_feat, var_scale
        self.layers = None if layers is None else list(layers)
        self.lower_q, self.upper_q, self.reduction = lower_q, upper_q, reduction
        self.tasks = 0
        self.lb: dict[str, Tensor] = {}
        self.ub: dict[str, Tensor] = {}
        self.old_weights: dict[str, dict[str, Tensor | None]] = {}
        self.intervals: list[dict[str, tuple[Tensor, Tensor]]] = []
        self.old_state: dict[str, Tensor] | None = None
        self._old_model: nn.Module | None = None

    def _old(self, model: nn.Module) -> nn.Module:
        if self._old_model is None:
            self._old_model = copy.deepcopy(model)
            self._old_model.load_state_dict(self.old_state)  # type: ignore[arg-type]
            self._old_model.eval()
            for p in self._old_model.parameters():
                p.requires_grad_(False)
        return self._old_model

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        layers = _linears(model, self.layers)
        out: dict[str, Tensor] = {}
        need_acts = self.var_scale > 0 or (self.tasks > 0 and self.lam_feat > 0)
        acts = _inputs(model, layers, batch.x) if need_acts else {}
        if self.var_scale > 0:
            out["var"] = self.var_scale * sum(a.var(dim=0, unbiased=False).mean() for a in acts.values())
        if self.tasks == 0:
            return out
        if self.lam_drift > 0:
            drift = torch.zeros(())
            for n, m in layers.items():
                w0, b0 = self.old_weights[n]["weight"], self.old_weights[n]["bias"]
                db = None if m.bias is None else m.bias - b0
                lo, up = interval_bounds(m.weight - w0, db, self.lb[n], self.ub[n])  # type: ignore[operator]
                drift = drift + interval_drift(lo, up, self.reduction)
            out["int_drift"] = self.lam_drift * drift
        if self.lam_feat > 0:
            first = next(iter(layers))
            with torch.no_grad():
                old = _inputs(self._old(model), {first: dict(self._old(model).named_modules())[first]},  # type: ignore[dict-item]
                              batch.x)[first]
            a = acts[first]
            mask = ((a >= self.lb[first]) & (a <= self.ub[first])).to(a.dtype)
            out["feat"] = self.lam_feat * (mask * (old - a).pow(2)).sum() / (mask.sum() + 1e-8)
        return out

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Batch) -> None:
        if len(data) == 0:
            raise ValueError("InTAct.after_task: the task's data is empty; the intervals need activations")
        layers = _linears(model, self.layers)
        was = model.training
        model.eval()
        try:
            chunks = [_inputs(model, layers, data.x[i:i + 512]) for i in range(0, len(data), 512)]
        finally:
            model.train(was)
        task: dict[str, tuple[Tensor, Tensor]] = {}
        for n in layers:
            lo, hi = activation_interval(torch.cat([c[n] for c in chunks]).float(), self.lower_q, self.upper_q)
            task[n] = (lo, hi)
            self.lb[n] = lo if n not in self.lb else torch.minimum(self.lb[n], lo)
            self.ub[n] = hi if n not in self.ub else torch.maximum(self.ub[n], hi)
            m = layers[n]
            self.old_weights[n] = {"weight": m.weight.detach().clone(),
                                   "bias": None if m.bias is None else m.bias.detach().clone()}
        self.intervals.append(task)
        self.old_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._old_model = None
        self.tasks += 1

    def state_dict(self) -> dict[str, Any]:
        """Tasks finished, the cumulative box ``lb``/``ub`` and each task's own intervals per layer,
        the protected layers' weights and the whole model's ``state_dict`` at the last task's end."""
        return {"tasks": self.tasks, "lb": dict(self.lb), "ub": dict(self.ub),
                "intervals": [{n: [lo, hi] for n, (lo, hi) in t.items()} for t in self.intervals],
                "old_weights": {n: dict(w) for n, w in self.old_weights.items()}, "old_state": self.old_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def c(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        self.tasks = int(state["tasks"])
        self.lb = {k: v.clone() for k, v in state["lb"].items()}
        self.ub = {k: v.clone() for k, v in state["ub"].items()}
        self.intervals = [{n: (lo.clone(), hi.clone()) for n, (lo, hi) in t.items()} for t in state["intervals"]]
        self.old_weights = {n: {k: c(v) for k, v in w.items()} for n, w in state["old_weights"].items()}
        self.old_state = None if state["old_state"] is None else {k: v.clone() for k, v in state["old_state"].items()}
        self._old_model = None

r"""Continual model merging as a strategy: train each task from a common base, deploy the merge.

The setting of Geometry-Conflict Wasserstein Merging (Wang et al., "Geometry Conflict: Explaining
and Controlling Forgetting in LLM Continual Post-Training", arXiv 2605.09608; reference code
wyy-code/GCWM, its continual mode with the ``current_anchor`` memory): every task ``k`` is
fine-tuned from the same base weights ``theta_0`` into ``theta_k``; its task vector
``tau_k = theta_k - theta_0`` is folded into the deployed delta

.. math::

    \Delta_1 = \tau_1, \qquad \Delta_k = \mathrm{merge}(\Delta_{k-1}, \tau_k;\ w_{k}), \qquad
    \theta^{\text{deployed}} = \theta_0 + \Delta_k,

with ``merge`` one of :func:`poise.merge.gcwm_merge` (``method="gcwm"``; ``"gcwm_plain"`` holds
its gate at 0, the plain interference merge alone), :func:`poise.merge.task_arithmetic`
(``"task_arithmetic"``: ``Delta + scale * tau``) or :func:`poise.merge.average`
(``"average"``). Symbols -> arguments: ``w_k`` = ``weights`` (``"equal"``: ``[1/2, 1/2]``, the
reference's continual mode; ``"count"``: ``[(k-1)/k, 1/k]``, a running mean of the task vectors),
GCWM's own constants are passed through ``gcwm`` (``rank``, ``energy``, ``gate_threshold``,
``solver`` ...; see :mod:`poise.merge.gcwm`).

The base ``theta_0`` is the model as the *first* task leaves it (the first task plays the
pre-training of the paper, whose tasks all start from one pre-trained model): from the second
task on, :meth:`Merge.before_task` resets the weights to ``theta_0`` (in place, so the optimizer
keeps its parameters; its moments carry over between tasks as in plain fine-tuning) and the model
that is evaluated during training is the deployed one (:meth:`Merge.eval_model`), which changes only
at a merge. After each merge the trained model itself holds the deployed weights, so the model a
loop returns is the merged one. Logged per step (``step/...``): ``merges``, and for GCWM the
mean over merges of the geometry ``conflict`` and the gate ``alpha`` (``conflict_last``,
``alpha_last`` for the latest merge). Floating state-dict entries (weights, biases, norm
statistics) are merged; integer buffers (BatchNorm's ``num_batches_tracked``) are left as training leaves them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from poise._registry import register
from poise.continual._base import Batch, Strategy
from poise.merge import average, gcwm_merge, task_arithmetic

__all__ = ["Merge"]

METHODS = ("gcwm", "gcwm_plain", "task_arithmetic", "average")
WEIGHTS = ("equal", "count")


def _floating(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_floating_point(v)}


@register("strategy", "merge")
class Merge(Strategy):
    """Train every task from one base and deploy ``base + merge(task vectors)`` (module doc)."""

    name = "merge"

    def __init__(self, method: str = "gcwm", weights: str = "equal", scale: float = 1.0,
                 gcwm: Mapping[str, Any] | None = None):
        if method not in METHODS:
            raise ValueError(f"method={method!r}; valid choices: {', '.join(METHODS)}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}; valid choices: {', '.join(WEIGHTS)}")
        if not (isinstance(scale, (int, float)) and scale > 0 and scale == scale and scale != float("inf")):
            raise ValueError(f"scale={scale!r} must be a finite number > 0")
        if scale != 1 and method != "task_arithmetic":
            raise ValueError(f"scale={scale!r} is given but method={method!r} does not use it (task_arithmetic only)")
        if weights != "equal" and method == "task_arithmetic":
            raise ValueError(f"weights={weights!r} is given but method='task_arithmetic' sums (use scale)")
        self.gcwm = dict(gcwm or {})
        if self.gcwm and not method.startswith("gcwm"):
            raise ValueError(f"gcwm={self.gcwm} is given but method={method!r} does not use it")
        if method == "gcwm_plain" and ({"gate_min", "gate_max"} & set(self.gcwm)):
            raise ValueError("method='gcwm_plain' holds the gate at 0; do not pass gate_min/gate_max")
        if self.gcwm:  # fail now, naming the key, not at the first merge
            import inspect

            from poise.merge.gcwm import gcwm_merge_tensor

            known = set(inspect.signature(gcwm_merge_tensor).parameters) - {"deltas", "weights"}
            bad = sorted(set(self.gcwm) - known)
            if bad:
                raise ValueError(f"gcwm: unknown keys {bad}; valid choices: {', '.join(sorted(known))}")
            try:  # the values too (rank=0, an unknown solver ...): a 2x2 merge, not an error at the first task's end
                probe = {**self.gcwm, "steps": 1} if "steps" in self.gcwm else self.gcwm
                gcwm_merge_tensor([torch.eye(2), torch.ones(2, 2)], [0.5, 0.5], **probe)
            except (ValueError, TypeError) as e:
                raise ValueError(f"gcwm={self.gcwm}: {e}") from None
        self.method, self.weights, self.scale = method, weights, float(scale)
        self.base: dict[str, torch.Tensor] | None = None
        self.delta: dict[str, torch.Tensor] | None = None
        self.merged = 0  # task vectors folded into delta
        self.conflicts: list[float] = []
        self.alphas: list[float] = []
        self.shadow: nn.Module | None = None
        self._pending_shadow: dict[str, torch.Tensor] | None = None  # a loaded deployed copy, built on next use

    # -- hooks -------------------------------------------------------------------------
    @torch.no_grad()
    def before_task(self, model: nn.Module, data: Batch) -> None:
        if self.base is None:
            return  # the first task trains the base itself
        self._deployed(model)  # keep the deployed copy for evaluation while the model trains
        self._write(model, self.base)

    @torch.no_grad()
    def after_task(self, model: nn.Module, data: Batch) -> None:
        if self.base is None:
            self.base = _floating(model)
            return
        tau = {k: v - self.base[k] for k, v in _floating(model).items() if k in self.base}
        self.delta = tau if self.delta is None else self._merge(self.delta, tau)
        self.merged += 1
        deployed = {k: self.base[k] + self.delta[k] for k in self.base}
        self._write(model, deployed)
        self.shadow = None  # rebuilt from the model (which now holds the deployed weights) when needed
        self._pending_shadow = None  # a copy loaded from a checkpoint is stale after a merge

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = {"merges": torch.tensor(float(self.merged))}
        if self.conflicts:
            out.update(conflict=torch.tensor(sum(self.conflicts) / len(self.conflicts)),
                       alpha=torch.tensor(sum(self.alphas) / len(self.alphas)),
                       conflict_last=torch.tensor(self.conflicts[-1]), alpha_last=torch.tensor(self.alphas[-1]))
        return out

    def eval_model(self, model: nn.Module) -> nn.Module:
        if self._pending_shadow is not None:
            self._deployed(model)
        return self.shadow if self.shadow is not None else model

    # -- internals -----------------------------------------------------------------------
    def _merge(self, delta: dict[str, torch.Tensor], tau: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = self.merged + 1  # task vectors in the result
        w = [0.5, 0.5] if self.weights == "equal" else [(k - 1) / k, 1 / k]
        if self.method == "task_arithmetic":
            scaled = {n: v * self.scale for n, v in tau.items()}
            return task_arithmetic([delta, scaled])
        if self.method == "average":
            return average([delta, tau], weights=w)
        kw = dict(self.gcwm)
        if self.method == "gcwm_plain":
            kw.update(gate_min=0.0, gate_max=0.0)
        merged, stats = gcwm_merge([delta, tau], weights=w, **kw)
        self.conflicts.append(float(stats["conflict"]))
        self.alphas.append(float(stats["alpha"]))
        if self.scale != 1.0:
            merged = {n: v * self.scale for n, v in merged.items()}
        # entries gcwm_merge leaves out (none for floating state dicts) keep the running delta
        return {n: merged.get(n, delta[n]) for n in delta}

    @staticmethod
    def _write(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
        state = model.state_dict()
        for k, v in values.items():
            state[k].copy_(v)

    def _deployed(self, model: nn.Module) -> nn.Module:
        if self.shadow is None:
            self.shadow = copy.deepcopy(model)
            for p in self.shadow.parameters():
                p.requires_grad_(False)
        if self._pending_shadow is not None:  # the deployed copy of a checkpoint: restore it before any use
            self.shadow.load_state_dict(self._pending_shadow)
            self._pending_shadow = None
        return self.shadow

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "delta": self.delta, "merged": self.merged,
                "conflicts": list(self.conflicts), "alphas": list(self.alphas),
                "shadow": None if self.shadow is None else self.shadow.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def copy_(d: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.clone() for k, v in d.items()}

        self.base, self.delta = copy_(state["base"]), copy_(state["delta"])
        self.merged = int(state["merged"])
        self.conflicts = [float(x) for x in state["conflicts"]]
        self.alphas = [float(x) for x in state["alphas"]]
        self.shadow = None
        self._pending_shadow = copy_(state["shadow"])


"""One call for every policy loss: :class:`PolicyBatch` and :func:`call_loss`.

The registered policy losses keep their paper-shaped positional signatures
(``pg(logp, adv, mask)``, ``ppo_clip(logp, old_logp, adv, mask)``,
``minirl(logp, old_logp, behav_logp, adv, mask)``,
``decoupled_ppo(logp, prox_logp, behav_logp, adv, mask)``, ...). Their parameter names are the
notation of docs/algorithms/rl.md, so a caller does not switch on the loss name: it fills one
:class:`PolicyBatch` and :func:`call_loss` binds each required positional parameter to the
batch field of the same name (verl's single ``PolicyLossFn`` signature, torchtune's
``Trajectory``, without changing the losses).

>>> b = PolicyBatch(logp, old_logp, behav_logp, adv, mask)
>>> out = call_loss("ppo_clip", b, eps_high=0.28)      # ppo_clip_loss(logp, old_logp, adv, mask, eps_high=0.28)
>>> out = call_loss("decoupled_ppo", b)                # prox_logp defaults to old_logp
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

from torch import Tensor

from poise import _registry
from poise.rl._common import LossOut, check_shapes

__all__ = ["PolicyBatch", "batch_inputs", "call_loss", "loss_options", "policy_losses"]


class PolicyBatch(NamedTuple):
    """The per-token tensors of one policy-gradient step, named as docs/algorithms/rl.md.

    Fields:
        logp: log pi_theta of the sampled tokens ``[B, T]`` (the trainer now; with grad).
        old_logp: log pi_old ``[B, T]`` (the trainer at the version that generated the batch; detached).
            On-policy: ``logp.detach()``.
        behav_logp: log mu ``[B, T]`` (the inference engine that sampled; detached). Without a
            separate engine: ``old_logp``.
        adv: advantages ``[B]`` (per sequence) or ``[B, T]``.
        mask: response mask ``[B, T]`` (1 on completion tokens).
        prox_logp: log pi_prox ``[B, T]`` of decoupled PPO (arXiv 2110.00641); ``None`` means
            ``old_logp`` (the proximal policy is the one that generated the batch).
    """

    logp: Tensor
    old_logp: Tensor
    behav_logp: Tensor
    adv: Tensor
    mask: Tensor
    prox_logp: Tensor | None = None

    def value(self, name: str) -> Tensor:
        """The tensor a loss parameter called ``name`` reads (``prox_logp`` falls back to ``old_logp``)."""
        if name not in self._fields:
            raise ValueError(f"PolicyBatch has no field {name!r}; valid: {', '.join(self._fields)}")
        if name == "prox_logp" and self.prox_logp is None:
            return self.old_logp
        return getattr(self, name)


def _inputs_and_options(fn: Any) -> tuple[list[str], dict[str, inspect.Parameter]]:
    """A loss's required positional parameters (its data) and the rest (its options)."""
    inputs: list[str] = []
    options: dict[str, inspect.Parameter] = {}
    for name, p in inspect.signature(fn).parameters.items():
        positional = p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if positional and p.default is inspect.Parameter.empty:
            inputs.append(name)
        elif p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            options[name] = p
    return inputs, options


def batch_inputs(name: str) -> list[str]:
    """The required positional parameters of the registered loss ``name``, in order (e.g.
    ``["logp", "old_logp", "adv", "mask"]`` for ``ppo_clip``). An unknown name raises listing
    the registered losses."""
    return _inputs_and_options(_registry.get("loss", name))[0]


def loss_options(name: str, *, keyword_only: bool = True) -> dict[str, Any]:
    """The options of the registered loss ``name`` and their defaults, e.g.
    ``{"eps_low": 0.2, "eps_high": None, "dual_clip": None, "weights": None}`` for ``ppo_clip``.
    ``keyword_only=True`` (default) lists only the keyword-only hyperparameters (what a recipe
    may set); ``False`` adds optional positional parameters such as ``pg``'s ``weights``
    (tensors a caller passes)."""
    _, options = _inputs_and_options(_registry.get("loss", name))
    return {k: p.default for k, p in options.items() if not keyword_only or p.kind == inspect.Parameter.KEYWORD_ONLY}


def _registered_in_order() -> list[str]:
    names = _registry.names("loss")  # sorted; also imports the built-in losses
    table = getattr(_registry, "_REGISTRY", {}).get("loss", {})
    ordered = [n for n in table if n in names]  # registration order: losses.py's reading order
    return ordered + [n for n in names if n not in ordered]


def policy_losses() -> list[str]:
    """The registered losses whose data all come from a :class:`PolicyBatch` (every required
    positional parameter is a field name), in registration order. Derived from the signatures:
    a new loss with such a signature is a policy loss everywhere (recipes, the RL kind, TRL)
    without a list to update. ``kl`` (needs ``ref_logp``) and ``pacs`` (needs rewards and
    group ids) are registered losses but not policy losses."""
    fields = set(PolicyBatch._fields)
    return [n for n in _registered_in_order() if set(batch_inputs(n)) <= fields]


def call_loss(name: str, batch: PolicyBatch, **kwargs: Any) -> LossOut:
    """Call the registered loss ``name`` with its positional parameters bound by name from
    ``batch`` and ``kwargs`` as its options.

    Raises ``ValueError`` when ``name`` is not a policy loss (listing :func:`policy_losses`) or a
    batch tensor's shape does not fit the ``[B, T]`` mask (naming the field), and ``TypeError``
    for a keyword argument the loss does not take (listing the ones it does)."""
    fn = _registry.get("loss", name)
    inputs, options = _inputs_and_options(fn)
    missing = [p for p in inputs if p not in PolicyBatch._fields]
    if missing:
        raise ValueError(f"loss {name!r} needs {', '.join(missing)}, which a PolicyBatch does not hold; "
                         f"policy losses: {', '.join(policy_losses())}")
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        raise TypeError(f"loss {name!r} got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(options) or '(none)'}")
    check_shapes(batch.mask, adv=batch.adv, logp=batch.logp, old_logp=batch.old_logp, behav_logp=batch.behav_logp,
                 prox_logp=batch.prox_logp)
    return fn(*(batch.value(p) for p in inputs), **kwargs)

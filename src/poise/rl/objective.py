r"""The policy objective of one RL step, written once: a registered policy loss plus the
train-inference IS correction, token selection, token weights and adaptive clipping.

>>> obj = policy_objective(PolicyBatch(logp, old_logp, behav_logp, adv, mask), "ppo_clip",
...                        is_level="token", is_mode="truncate", is_max=2.0, eps_high=0.28)
>>> loss = obj.aggregate("token_mean", num_tokens=global_token_count)

Where the IS correction of the sampler mismatch goes is read from the loss's signature
(docs/algorithms/rl.md, "Notation": ``r = pi_theta/pi_old`` staleness, ``rho = pi_old/mu``
mismatch, ``pi_theta/mu = rho r``):

* a loss without ``old_logp`` (``pg``) has no ratio: the whole ``pi_theta/mu`` is importance
  weighted, ``w = IS(sg[logp] - behav_logp)``, passed as its ``weights`` (the "PG + IS"
  objective of arXiv 2512.01374);
* a loss with ``old_logp`` but no ``behav_logp`` (``ppo_clip``, ``gspo``, ``cispo``, ``sapo``)
  handles staleness with its clip and its values are multiplied by ``w = IS(old_logp -
  behav_logp)`` (verl's decoupled mode, TIS/MIS arXiv 2512.01374);
* a loss with ``behav_logp`` (``minirl``, ``decoupled_ppo``) carries its own behaviour weights;
  ``is_level`` adds nothing to it.

``IS`` is :func:`poise.rl.is_weights` with ``level=is_level``, ``mode=is_mode``, ``hi=is_max``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from poise.rl._common import aggregate, check_shapes, masked_mean, masked_zero
from poise.rl.batch import PolicyBatch, batch_inputs, call_loss, loss_options, policy_losses
from poise.rl.correction import LEVELS, MODES, is_weights
from poise.rl.tokens import bapo_bounds, entropy_topk_mask, masked_entropy_stats, steer_weights

__all__ = ["ADAPTIVE_CLIPS", "IS_LEVELS", "TOKEN_SELECTS", "TOKEN_WEIGHTS", "PolicyObjective", "is_placement",
           "policy_objective"]

IS_LEVELS = ("none", *LEVELS)
TOKEN_SELECTS = ("none", "entropy_top")
TOKEN_WEIGHTS = ("none", "steer")
ADAPTIVE_CLIPS = ("none", "bapo")
IS_DENOMINATORS = ("all", "kept")


class PolicyObjective(NamedTuple):
    """Per-token loss values ``[B, T]`` (to minimise), the mask to aggregate them with (the
    response mask, shrunk to the selected tokens by ``token_select``) and detached metrics."""

    values: Tensor
    mask: Tensor
    metrics: dict[str, Tensor]

    def aggregate(self, mode: str = "token_mean", **counts: Any) -> Tensor:
        """:func:`poise.rl.aggregate` of ``values`` over ``mask``; ``counts`` are its global
        ``num_tokens`` / ``num_seqs`` / ``horizon``."""
        return aggregate(self.values, self.mask, mode, **counts)


def is_placement(loss: str) -> str:
    """Where the IS correction of the sampler mismatch goes for ``loss``, read from its signature:
    ``"weights"`` (no ``old_logp``: ``pi_theta/mu`` through the loss's ``weights`` argument),
    ``"values"`` (``old_logp`` without ``behav_logp``: the values times ``pi_old/mu``) or
    ``"own"`` (the loss takes ``behav_logp`` and corrects itself)."""
    inputs = batch_inputs(loss)
    if "behav_logp" in inputs:
        return "own"
    if "old_logp" in inputs:
        return "values"
    if "weights" not in loss_options(loss, keyword_only=False):
        raise ValueError(f"loss {loss!r} takes neither old_logp, behav_logp nor weights: "
                         "there is no place for an IS correction")
    return "weights"


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r}; valid choices: {', '.join(valid)}")


def policy_objective(batch: PolicyBatch, loss: str = "ppo_clip", *, is_level: str = "none",
                     is_mode: str = "truncate", is_max: float | None = 2.0, token_select: str = "none",
                     entropy_ratio: float = 0.2, token_weights: str = "none", adaptive_clip: str = "none",
                     entropy: Tensor | None = None, entropy_rule: str = "quantile", is_denominator: str = "all",
                     **loss_kwargs: Any) -> PolicyObjective:
    r"""The step's per-token policy loss from a :class:`PolicyBatch`, composed in this order:

    1. ``adaptive_clip="bapo"``: BAPO's bounds (arXiv 2510.18927, :func:`poise.rl.bapo_bounds`)
       from the ratio ``exp(sg[logp] - old_logp)`` replace the loss's ``eps_low = 1 - c_low``,
       ``eps_high = c_high - 1`` (the loss must take both);
    2. ``is_level`` != ``"none"``: the IS correction of the sampler mismatch, placed as the
       module docstring says (:func:`is_placement`); metrics ``is/*``;
    3. the loss itself, :func:`call_loss` ``(loss, batch, **loss_kwargs)``;
    4. ``token_select="entropy_top"``: the aggregation mask becomes ``mask * top`` with ``top``
       the ``entropy_ratio`` highest-entropy tokens (arXiv 2506.01939, the authors' normaliser:
       the selected tokens; how many: :func:`poise.rl.entropy_topk_mask` with
       ``rule=entropy_rule``, TRL's quantile by default); needs ``entropy``;
    5. ``token_weights="steer"``: the values times STEER's weights (arXiv 2510.10150,
       :func:`poise.rl.steer_weights` with ``old_logp``); needs ``entropy``.

    ``is_denominator`` (with ``is_mode="mask"``): ``"all"`` (default, verl's and TRL's) keeps the
    rejected tokens in the aggregation mask, so they count in a token-mean's denominator with a
    zero value; ``"kept"`` takes them out of the mask, so the mean is over the tokens that are
    trained on (5 tokens, 3 rejected: the kept two are averaged over 2, not 5).

    ``entropy`` is the per-token entropy ``[B, T]`` of the trainer's distribution (detached).
    Returns :class:`PolicyObjective` ``(values, mask, metrics)``; aggregate it with the global
    counts of the optimizer step. Unknown option values raise ``ValueError`` listing the valid
    ones; unknown loss options raise ``TypeError``; a tensor whose shape does not fit the mask
    raises ``ValueError`` naming it. Masked positions contribute exactly 0 (value and gradient)
    whatever the batch holds there (``-inf`` log-probs on padding, NaN entropies).
    """
    _choice("is_level", is_level, IS_LEVELS)
    _choice("is_mode", is_mode, MODES)
    _choice("token_select", token_select, TOKEN_SELECTS)
    _choice("token_weights", token_weights, TOKEN_WEIGHTS)
    _choice("adaptive_clip", adaptive_clip, ADAPTIVE_CLIPS)
    _choice("is_denominator", is_denominator, IS_DENOMINATORS)
    if loss not in policy_losses():
        raise ValueError(f"loss={loss!r} is not a policy loss; valid choices: {', '.join(policy_losses())}")
    if entropy is None and (token_select != "none" or token_weights != "none"):
        raise ValueError(f"token_select={token_select!r} / token_weights={token_weights!r} need the per-token "
                         "entropy: pass entropy=")
    mask = batch.mask
    check_shapes(mask, adv=batch.adv, logp=batch.logp, old_logp=batch.old_logp, behav_logp=batch.behav_logp,
                 prox_logp=batch.prox_logp, entropy=entropy)
    batch = PolicyBatch(*(None if x is None else masked_zero(x, mask) if i != 3 else x for i, x in enumerate(batch)))
    if entropy is not None:
        entropy = masked_zero(entropy.detach(), mask)
    logp, old, behav, adv = batch.logp, batch.old_logp, batch.behav_logp, batch.adv
    metrics: dict[str, Tensor] = {}
    kw = dict(loss_kwargs)
    if adaptive_clip == "bapo":
        if not {"eps_low", "eps_high"} <= set(loss_options(loss)):
            raise ValueError(f"adaptive_clip='bapo' sets eps_low and eps_high; loss {loss!r} takes "
                             f"{', '.join(loss_options(loss)) or 'no options'}")
        lo, hi, bm = bapo_bounds(torch.exp(logp.detach() - old), adv, mask)
        kw.update(eps_low=1 - lo, eps_high=hi - 1)
        metrics.update(bm)
    w = keep = None
    placement = is_placement(loss) if is_level != "none" else "own"
    if placement != "own":
        log_rho = logp.detach() - behav if placement == "weights" else old - behav
        isw = is_weights(log_rho, mask, level=is_level, mode=is_mode, hi=is_max)
        metrics.update({f"is/{k}": x for k, x in isw.metrics.items()})
        w = isw.weights
        keep = isw.keep if is_mode == "mask" and is_denominator == "kept" else None
    if placement == "weights":
        if "weights" in kw:
            raise ValueError(f"loss {loss!r}: pass either weights= or is_level={is_level!r}, not both")
        kw["weights"] = w
    out = call_loss(loss, batch, **kw)
    values = out.values * w if placement == "values" else out.values
    metrics.update(out.metrics)
    agg_mask = mask if keep is None else mask * keep
    if token_select == "entropy_top":
        top = entropy_topk_mask(entropy, mask, entropy_ratio, rule=entropy_rule)
        agg_mask = mask * top
        metrics.update(masked_entropy_stats(entropy, mask, top))
    if token_weights == "steer":
        sw = steer_weights(adv, entropy, old, logp.detach(), mask)
        values = values * sw
        metrics["steer/weight_mean"] = masked_mean(sw, mask)
    return PolicyObjective(values, agg_mask, metrics)

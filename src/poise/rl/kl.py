r"""Per-token KL estimators against a reference policy, with verl's full set of kinds
(``verl.trainer.ppo.core_algos.kl_penalty`` / ``kl_penalty_forward``, verl 0.9.1).

With ``d = logp - ref_logp`` (``logp`` = log pi_theta with grad, ``ref_logp`` = log pi_ref):

* ``"k1"`` (alias ``"kl"``): ``d``;
* ``"abs"``: ``|d|``;
* ``"k2"`` (alias ``"mse"``): ``d^2 / 2``;
* ``"k3"`` (alias ``"low_var_kl"``): ``exp(-d) + d - 1`` -- with ``clamp=True`` (verl) the
  inner ``-d`` is clamped to +-20 and the result to +-10 (both zero the gradient where active);
* a ``"+"`` suffix (``"k1+"``, ``"abs+"``, ``"k3+"``): the value of the estimator without the
  suffix and the gradient of ``k2`` (straight-through, ``k2 - sg[k2] + sg[value]``): ``k1`` and
  ``k3`` are unbiased estimates of KL's *value*, but only ``k2``'s gradient is an unbiased
  estimate of KL's gradient under on-policy sampling (J. Schulman, "Approximating KL divergence",
  2020 blog post -- no arXiv paper; verl's comment in ``kl_penalty``). ``"k2+"`` is ``"k2"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "kl_estimate"]

_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "abs+", "k2+", "k3+", *_ALIASES, "kl+", "mse+", "low_var_kl+")


def _forward(d: Tensor, kind: str, clamp: bool) -> Tensor:
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "k2":
        return 0.5 * d.square()
    neg = -d
    if clamp:
        neg = neg.clamp(-20.0, 20.0)
    v = torch.exp(neg) - neg - 1
    return v.clamp(-10.0, 10.0) if clamp else v


def kl_estimate(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None, *, kind: str = "k3",
                clamp: bool = True) -> Tensor:
    """Per-token KL estimate ``[B, T]`` of ``kind`` (see the module docstring); 0 where ``mask`` is 0
    (masked positions may hold ``+-inf``/NaN: they give neither a NaN nor a gradient). Unknown
    kinds raise ``ValueError`` listing :data:`KL_ESTIMATORS`. Add ``beta * aggregate(...)`` of it
    to the loss."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kind={kind!r}; valid choices: {', '.join(KL_ESTIMATORS)}")
    plus = kind.endswith("+")
    base = _ALIASES.get(kind.rstrip("+"), kind.rstrip("+"))
    if mask is not None:
        keep = mask.bool()
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp, ref_logp = torch.where(keep, logp, zero), torch.where(keep, ref_logp, zero)
    d = logp - ref_logp
    v = _forward(d, base, clamp)
    if plus and base != "k2":
        k2 = 0.5 * d.square()
        v = k2 - k2.detach() + v.detach()
    return v if mask is None else v * mask.to(v.dtype)

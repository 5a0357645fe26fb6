r"""verl adapter: every :mod:`poise.rl` policy loss in verl's policy-loss registry.

>>> from poise.integrations.verl import register_verl_losses
>>> register_verl_losses()            # "poise_ppo_clip", "poise_gspo", "poise_vespo", ...
>>> # then, in the verl config: actor_rollout_ref.actor.policy_loss.loss_mode=poise_cispo

Each registered function has verl's ``PolicyLossFn`` signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (loss, metrics)`` (``verl.trainer.ppo.core_algos``, verl 0.9.1) and computes:

1. the options of the poise loss from verl's ``ActorConfig`` (:func:`verl_options`:
   ``clip_ratio_low/high`` (fallback ``clip_ratio``) -> ``eps_low/eps_high``, ``clip_ratio_c`` ->
   ``dual_clip`` (verl's ``vanilla`` always dual-clips, default 3), ``tau_pos/tau_neg``,
   ``policy_loss.clip_cov_*``, ``kl_cov_ratio``, ``ppo_kl_coef``), then the fixed options given
   at registration;
2. the per-token values of :func:`poise.rl.call_loss` on ``PolicyBatch(log_prob, old_log_prob,
   old_log_prob, advantages, response_mask)`` (verl passes no sampler log-probs to a policy loss:
   ``behav_logp = old_logp``), times ``rollout_is_weights`` when given (verl's rule for every
   loss, computed by verl's rollout correction);
3. :func:`aggregate_verl`: :func:`poise.rl.aggregate` with verl's ``loss_agg_mode`` and its
   global-batch semantics (``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``,
   ``global_batch_size``, ``loss_scale_factor``), so the loss equals verl's ``agg_loss``.

Metrics (plain floats, as verl's losses return): ``actor/pg_clipfrac`` (poise ``clip_frac/region``,
the same set as verl's ``pg_losses2 > pg_losses1``), ``actor/ppo_kl`` (``approx_kl_k1``),
``actor/pg_clipfrac_lower`` (``clip_frac/dual``) where the loss has them, and every poise
metric as ``actor/poise/<name>``. Needs verl (the ``verl`` extra); tested with verl 0.9.1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from poise.rl import PolicyBatch, aggregate, call_loss, loss_options, policy_losses

try:
    from verl.trainer.ppo import core_algos
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("poise.integrations.verl needs verl: pip install 'poise[verl]' (verl==0.9.1)") from e

__all__ = ["VERL_AGG_MODES", "aggregate_verl", "make_policy_loss_fn", "register_verl_losses", "verl_options"]

VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
_POLICY_LOSS_KEYS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    try:
        return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - omegaconf raises on missing keys in struct mode
        return getattr(cfg, key, None)


def verl_options(loss: str, config: Any) -> dict[str, Any]:
    """The options of the poise policy loss ``loss`` that verl's actor ``config`` sets (only the
    ones the loss takes and the config holds, non-None)."""
    opts = loss_options(loss)
    clip = _get(config, "clip_ratio")
    lo, hi = _get(config, "clip_ratio_low"), _get(config, "clip_ratio_high")
    found: dict[str, Any] = {
        "eps_low": lo if lo is not None else clip,
        "eps_high": hi if hi is not None else clip,
        "dual_clip": _get(config, "clip_ratio_c") if loss in ("ppo_clip", "decoupled_ppo") else None,
        "tau_pos": _get(config, "tau_pos"),
        "tau_neg": _get(config, "tau_neg"),
    }
    if loss == "ppo_clip" and found["dual_clip"] is None:
        found["dual_clip"] = 3.0  # verl vanilla: config.get("clip_ratio_c", 3.0)
    pl = _get(config, "policy_loss")
    for k in _POLICY_LOSS_KEYS:
        found[k] = _get(pl, k)
    return {k: v for k, v in found.items() if k in opts and v is not None}


def aggregate_verl(values: Tensor, mask: Tensor, loss_agg_mode: str, *, dp_size: int = 1,
                   batch_num_tokens: Tensor | float | None = None, global_batch_size: Tensor | float | None = None,
                   loss_scale_factor: float | None = None) -> Tensor:
    r"""verl's ``agg_loss`` through :func:`poise.rl.aggregate`: the per-rank loss whose gradient,
    averaged over ``dp_size`` ranks by DDP/FSDP, is the global-batch loss's.

    ``token-mean``: ``token_mean`` with ``num_tokens = batch_num_tokens / dp_size``;
    ``token-sum``: ``token_sum * dp_size``; ``seq-mean-token-sum`` / ``seq-mean-token-mean``:
    ``seq_mean_token_sum`` / ``seq_mean_token_mean`` with ``num_seqs = global_batch_size / dp_size``;
    ``seq-mean-token-sum-norm``: ``seq_sum_norm`` with that ``num_seqs`` and
    ``horizon = loss_scale_factor`` (default ``T``, the padded length, as verl). Without the
    global counts (``dp_size`` 1) the local ones, non-empty sequences only (as verl). For
    ``seq-mean-token-mean`` each row is divided by ``|y_i| + 1e-8`` as verl does (poise's own
    ``seq_mean_token_mean`` divides by ``|y_i|``; the two differ by ``1e-8 / |y_i|`` relative)."""
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r}; valid choices: {', '.join(VERL_AGG_MODES)}")
    m = mask.to(values.dtype)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size > 1:
            raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs batch_num_tokens (global)")
        n = m.sum() if batch_num_tokens is None else torch.as_tensor(batch_num_tokens, dtype=values.dtype) / dp_size
        return aggregate(values, m, "token_mean", num_tokens=n)
    if loss_agg_mode == "token-sum":
        return aggregate(values, m, "token_sum") * dp_size
    if global_batch_size is None and dp_size > 1:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs global_batch_size")
    seqs = None if global_batch_size is None else torch.as_tensor(global_batch_size, dtype=values.dtype) / dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        return aggregate(values, m, "seq_mean_token_sum", num_seqs=seqs)
    if loss_agg_mode == "seq-mean-token-mean":  # verl divides each row by |y_i| + 1e-8: reproduced
        row = 1.0 / (m.sum(-1, keepdim=True) + 1e-8)
        return aggregate(values * row, m, "seq_mean_token_sum", num_seqs=seqs)
    horizon = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    return aggregate(values, m, "seq_sum_norm", num_seqs=seqs, horizon=horizon)


def _verl_metrics(metrics: dict[str, Tensor]) -> dict[str, float]:
    out = {f"actor/poise/{k}": float(v) for k, v in metrics.items()}
    for ours, theirs in (("clip_frac/region", "actor/pg_clipfrac"), ("approx_kl_k1", "actor/ppo_kl"),
                         ("clip_frac/dual", "actor/pg_clipfrac_lower")):
        if ours in metrics:
            out[theirs] = float(metrics[ours])
    return out


def make_policy_loss_fn(loss: str, **options: Any) -> Any:
    """A verl ``PolicyLossFn`` computing the poise policy loss ``loss`` (see the module docstring);
    ``options`` override what :func:`verl_options` reads from the config. An unknown loss name
    raises ``ValueError`` listing :func:`poise.rl.policy_losses`; an unknown option ``TypeError``
    (at the first call, listing the loss's options)."""
    if loss not in policy_losses():
        raise ValueError(f"loss={loss!r} is not a policy loss; valid choices: {', '.join(policy_losses())}")

    def policy_loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                       loss_agg_mode: str = "token-mean", config: Any = None,
                       rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        mask = response_mask.to(log_prob.dtype)
        kw = {**verl_options(loss, config), **options}
        out = call_loss(loss, PolicyBatch(log_prob, old_log_prob, old_log_prob, advantages, mask), **kw)
        values = out.values if rollout_is_weights is None else out.values * rollout_is_weights.detach()
        info = dict(_get(config, "global_batch_info") or {})
        total = aggregate_verl(values, mask, loss_agg_mode, **{k: v for k, v in info.items() if k in (
            "dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")})
        return total, _verl_metrics(out.metrics)

    policy_loss_fn.__name__ = f"poise_{loss}"
    policy_loss_fn.__doc__ = f"verl PolicyLossFn for poise.rl loss {loss!r} (poise.integrations.verl)."
    return policy_loss_fn


def register_verl_losses(losses: list[str] | None = None, *, prefix: str = "poise_",
                         options: dict[str, dict[str, Any]] | None = None, overwrite: bool = False) -> list[str]:
    """Register ``losses`` (default: every :func:`poise.rl.policy_losses`) in verl's
    ``POLICY_LOSS_REGISTRY`` as ``prefix + name``; ``options[name]`` are fixed options of that
    loss. A name verl already holds for another function raises ``ValueError`` unless
    ``overwrite``. Returns the registered verl names."""
    names = policy_losses() if losses is None else list(losses)
    options = options or {}
    unknown = [k for k in options if k not in names]
    if unknown:
        raise ValueError(f"options for {', '.join(map(repr, unknown))}, which are not registered here: "
                         f"{', '.join(names)}")
    registered = []
    for name in names:
        key = prefix + name
        held = core_algos.POLICY_LOSS_REGISTRY.get(key)
        if held is not None and not overwrite and not getattr(held, "__module__", "").startswith(__name__):
            raise ValueError(f"verl policy loss {key!r} is already registered (by {held.__module__}); "
                             "pass overwrite=True or another prefix")
        core_algos.register_policy_loss(key)(make_policy_loss_fn(name, **options.get(name, {})))
        registered.append(key)
    return registered

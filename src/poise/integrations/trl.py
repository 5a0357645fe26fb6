r"""TRL adapter: TRL's ``GRPOTrainer`` with its loss computed by :mod:`poise.rl`.

>>> from poise.integrations.trl import PoiseGRPOTrainer
>>> trainer = PoiseGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(loss_type="grpo", beta=0.04),
...                            train_dataset=...)                       # TRL's objective, computed by poise
>>> trainer = PoiseGRPOTrainer(..., poise_loss="cispo", poise_loss_kwargs={"bounds": "two_sided"})

TRL keeps generation, rewards, advantages, the vLLM importance-sampling ratio, the reference
log-probs and logging; this subclass overrides ``compute_loss`` (the ``Trainer`` method TRL
itself routes to ``_compute_loss``). Every ``GRPOConfig`` field that affects the loss or its
logs is forwarded with TRL 1.16's semantics or refused at construction with a
``ValueError`` naming it (:func:`trl_loss_plan`; the table is :data:`FIELDS`):

* ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ``importance_sampling_level``,
  ``sapo_temperature_*`` choose the surrogate (``poise_loss=None``): grpo/bnpo/dr_grpo/dapo/luspo
  -> ``ppo_clip`` (token level) or ``gspo`` (sequence level), cispo -> ``cispo(bounds="upper_abs")``,
  sapo -> ``sapo``; all with ``convention="trl"`` (no clamps). ``loss_type`` also picks the
  normaliser (:data:`NORMALISERS`). ``delta`` is ``dual_clip=delta``, exact for
  ``delta >= 1 + epsilon_high`` (refused below, and at sequence level); ``vespo`` and sequence-level
  cispo/sapo are refused.
* ``beta`` (+ ``use_bias_correction_kl``): ``beta * k3`` (TRL's unclamped k3 times the ratio
  ``pi_theta/pi_old``), logged as ``kl``.
* ``top_entropy_quantile``: :func:`poise.rl.entropy_topk_mask` over the valid entropies gathered
  from all processes (float32, as TRL); ``off_policy_mask_threshold``:
  :func:`poise.rl.correction.off_policy_mask`; ``tool_mask`` (an input, from tool calling or
  environments): the loss mask is ``completion_mask * tool_mask``.
* ``use_vllm`` + ``vllm_importance_sampling_*``: TRL computes ``importance_sampling_ratio`` while
  generating (and logs ``sampling/*``); the values are multiplied by it, as TRL.
* ``entropy_coef``: ``- coef * mean entropy`` over the (entropy-masked) loss tokens, logged as
  ``policy_loss`` and ``entropy_coef``; ``use_adaptive_entropy`` is refused.
* ``router_aux_loss_coef``: the MoE auxiliary loss is added as TRL (logged ``aux_loss``).
* Logged with TRL's names: ``entropy``, ``kl``, ``clip_ratio/{low_mean,high_mean,region_mean,low_min,
  high_max}``, ``cispo_clip_ratio``; poise's own metrics as ``poise/<name>``.

Fields TRL consumes before the loss (``temperature``, ``num_iterations``, ``steps_per_generation``,
``scale_rewards``, ``mask_truncated_completions``, reward weights, reference-model sync...) reach the
loss through its inputs unchanged.

Gradient accumulation: ``token_mean`` (TRL ``dapo``/``cispo``) divides by the token count of the
whole generation batch (exact under accumulation and data parallelism); ``seq_mean_*`` (TRL
``grpo``, ``luspo``, ``dr_grpo``) average over *all* ``B`` rows of the micro-batch, empty rows
included, and divide by the accumulation steps, which is exact because TRL's micro-batches have
equal ``B``; ``bnpo`` is TRL's local token mean and is *not* accumulation-exact (TRL's own
semantics).

TRL API used: ``GRPOTrainer``, ``GRPOConfig``, the accelerator and ``Trainer`` attributes, and two
private names with no public equivalent in TRL 1.16: ``_get_per_token_logps_and_entropies`` (the
forward pass, with TRL's temperature, multimodal inputs and chunking) and the ``_metrics`` store
TRL's ``log`` reads. Both are pinned by tests/rl/test_trl_adapter_parity.py against the installed TRL.
Needs ``trl`` (the ``trl`` extra); tested with trl 1.16.0.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor

from poise.rl._common import AGG_MODES, aggregate
from poise.rl.batch import PolicyBatch, loss_options, policy_losses
from poise.rl.correction import MODES as IS_MODES
from poise.rl.correction import off_policy_mask, sequence_log_ratio
from poise.rl.losses import kl_penalty
from poise.rl.objective import IS_LEVELS, is_placement, policy_objective
from poise.rl.tokens import entropy_topk_mask

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("poise.integrations.trl needs TRL: pip install 'poise[trl]' (tested with trl==1.16.0)") from e

__all__ = ["FIELDS", "NORMALISERS", "PoiseGRPOTrainer", "TRLLossPlan", "trl_loss_plan"]

PPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: TRL loss_type -> how the per-token loss becomes a scalar (``poise_aggregation`` takes these
#: names or the :data:`poise.rl.AGG_MODES` they correspond to).
NORMALISERS = {
    "grpo": "seq_mean_token_mean over all B rows, / grad-accum steps",
    "sapo": "as grpo",
    "luspo": "seq_mean_token_sum over all B rows, / grad-accum steps",
    "dr_grpo": "seq_sum_norm with horizon max_completion_length over all B rows, / grad-accum steps",
    "bnpo": "token_mean over the micro-batch's tokens, / grad-accum steps (not accumulation-exact)",
    "dapo": "token_sum / (generation batch token count / processes * grad-accum steps / steps_per_generation)",
    "cispo": "as dapo",
    "sum": "token_sum / grad-accum steps",
}
_AGG_TO_TRL = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum": "luspo",
               "seq_sum_norm": "dr_grpo", "token_sum": "sum"}

#: Every GRPOConfig field that affects the loss or its logs, and what the adapter does with it.
FIELDS = {
    "loss_type": "forwarded: the surrogate and its normaliser (vespo refused)",
    "epsilon": "forwarded: eps_low of the clipped surrogates",
    "epsilon_high": "forwarded: eps_high (cispo: the absolute cap)",
    "delta": "forwarded as dual_clip when delta >= 1 + epsilon_high at token level; refused otherwise",
    "importance_sampling_level": "forwarded: token -> ppo_clip, sequence -> gspo (convention 'trl'); "
                                 "sequence-level cispo/sapo refused",
    "sapo_temperature_pos": "forwarded: sapo tau_pos",
    "sapo_temperature_neg": "forwarded: sapo tau_neg",
    "beta": "forwarded: + beta * k3 (TRL's, unclamped), logged as kl",
    "use_bias_correction_kl": "forwarded: k3 times pi_theta/pi_old",
    "top_entropy_quantile": "forwarded: entropy_topk_mask over the gathered entropies (float32, TRL's quantile)",
    "off_policy_mask_threshold": "forwarded: off_policy_mask",
    "use_vllm": "forwarded: TRL's importance_sampling_ratio multiplies the values",
    "vllm_importance_sampling_correction": "forwarded (TRL computes the ratio while generating)",
    "vllm_importance_sampling_mode": "forwarded (TRL computes the ratio while generating)",
    "vllm_importance_sampling_clip_min": "forwarded (TRL computes the ratio while generating)",
    "vllm_importance_sampling_clip_max": "forwarded (TRL computes the ratio while generating)",
    "entropy_coef": "forwarded: - coef * mean entropy, logged as policy_loss and entropy_coef",
    "use_adaptive_entropy": "refused when True (entropy_coef_* / entropy_target only act then)",
    "router_aux_loss_coef": "forwarded: + coef * router aux loss, logged as aux_loss",
    "max_completion_length": "forwarded: dr_grpo's horizon",
    "steps_per_generation": "forwarded: dapo's normaliser",
    "vespo_k_pos": "no effect unless loss_type='vespo' (refused), as TRL",
    "vespo_lambda_pos": "no effect unless loss_type='vespo' (refused), as TRL",
    "vespo_k_neg": "no effect unless loss_type='vespo' (refused), as TRL",
    "vespo_lambda_neg": "no effect unless loss_type='vespo' (refused), as TRL",
}


class TRLLossPlan(NamedTuple):
    """What :class:`PoiseGRPOTrainer` computes: the poise loss and its options, TRL's normaliser
    (a key of :data:`NORMALISERS`), which TRL clip metrics to log (``"ppo"``, ``"cispo"`` or
    ``"none"``), the IS level of the ratio ``coef_1`` (KL bias correction, clip metrics), the
    ``delta`` cap applied to ``coef_1`` in those metrics, and poise's own IS correction."""

    loss: str
    loss_kwargs: dict[str, Any]
    normaliser: str
    clip_metrics: str
    level: str
    delta: float | None
    poise_is: tuple[str, str, float | None] | None


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"GRPOConfig.{field}={value!r} cannot be honoured by PoiseGRPOTrainer: {why}")


def _check_poise_args(poise_loss: str | None, poise_loss_kwargs: dict | None, poise_aggregation: str | None,
                      poise_is: tuple | None) -> None:
    if poise_loss is not None and poise_loss not in policy_losses():
        raise ValueError(f"poise_loss={poise_loss!r}; valid choices: {', '.join(policy_losses())} "
                         "(or None for TRL's loss_type)")
    if poise_loss is None and poise_loss_kwargs:
        raise ValueError(f"poise_loss_kwargs={poise_loss_kwargs!r} needs poise_loss (with poise_loss=None the "
                         "options come from GRPOConfig)")
    if poise_loss is not None:
        unknown = sorted(set(poise_loss_kwargs or {}) - set(loss_options(poise_loss)))
        if unknown:
            raise TypeError(f"poise_loss_kwargs: unknown argument(s) {', '.join(map(repr, unknown))} of loss "
                            f"{poise_loss!r}; valid: {', '.join(loss_options(poise_loss)) or '(none)'}")
    valid_agg = [*AGG_MODES, *(k for k in NORMALISERS if k not in ("sapo", "cispo", "sum"))]
    if poise_aggregation is not None and poise_aggregation not in valid_agg:
        raise ValueError(f"poise_aggregation={poise_aggregation!r}; valid choices: {', '.join(valid_agg)} "
                         "(or None for loss_type's)")
    if poise_is is not None and (len(poise_is) != 3 or poise_is[0] not in IS_LEVELS[1:]
                                 or poise_is[1] not in IS_MODES):
        raise ValueError(f"poise_is={poise_is!r}; valid: None or (level, mode, bound) with level one of "
                         f"{', '.join(IS_LEVELS[1:])} and mode one of {', '.join(IS_MODES)}")


def trl_loss_plan(args: Any, poise_loss: str | None = None, poise_loss_kwargs: dict | None = None,
                  poise_aggregation: str | None = None,
                  poise_is: tuple[str, str, float | None] | None = None) -> TRLLossPlan:
    """Resolve a ``GRPOConfig`` (and the adapter's ``poise_*`` arguments) into a :class:`TRLLossPlan`,
    raising ``ValueError`` naming the first field poise cannot honour with TRL's semantics.

    ``poise_loss=None``: TRL's own ``loss_type`` (exact). Otherwise the named poise loss replaces
    TRL's surrogate; ``epsilon``/``epsilon_high``/``delta``/``sapo_temperature_*`` fill its
    ``eps_low``/``eps_high``/``dual_clip``/``tau_*`` when it takes them (setting one both here and in
    ``poise_loss_kwargs`` to different values, or a non-default one the loss has no place for, raises).
    """
    _check_poise_args(poise_loss, poise_loss_kwargs, poise_aggregation, poise_is)
    d = _defaults()
    lt, level = args.loss_type, args.importance_sampling_level
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    delta = args.delta
    if lt not in (*PPO_TYPES, "cispo", "sapo", "vespo"):
        raise _refuse("loss_type", lt, f"valid: {', '.join((*PPO_TYPES, 'cispo', 'sapo'))}")
    if level not in ("token", "sequence"):
        raise _refuse("importance_sampling_level", level, "valid: token, sequence")
    if getattr(args, "use_adaptive_entropy", False):
        raise _refuse("use_adaptive_entropy", True, "the adaptive entropy controller is not forwarded; "
                      "use a fixed entropy_coef")
    if args.use_vllm and args.vllm_importance_sampling_correction and poise_is is not None:
        raise _refuse("vllm_importance_sampling_correction", True, f"poise_is={poise_is!r} is a second correction "
                      "of the same mismatch; set vllm_importance_sampling_correction=False to use poise_is")
    if delta is not None and delta < 1 + eps_high:
        raise _refuse("delta", delta, f"TRL caps the ratio at delta on both advantage signs when delta < 1 + "
                      f"epsilon_high = {1 + eps_high}; poise's dual_clip equals it only for delta >= 1 + epsilon_high")
    clip_metrics, normaliser = "none", poise_aggregation
    if normaliser in _AGG_TO_TRL:
        normaliser = _AGG_TO_TRL[normaliser]
    if poise_loss is None:
        if lt == "vespo":
            raise _refuse("loss_type", lt, "VESPO is not forwarded by this adapter (set poise_loss to a poise loss "
                          "or use TRL's GRPOTrainer)")
        if level == "sequence" and lt in ("cispo", "sapo"):
            raise _refuse("importance_sampling_level", level, f"sequence-level {lt} has no poise counterpart here")
        if level == "sequence" and delta is not None:
            raise _refuse("delta", delta, "a sequence-level delta cap has no poise counterpart here")
        if lt in PPO_TYPES:
            name = "ppo_clip" if level == "token" else "gspo"
            kw: dict[str, Any] = {"eps_low": eps_low, "eps_high": eps_high, "convention": "trl"}
            if delta is not None:
                kw["dual_clip"] = delta
            clip_metrics = "ppo"
        elif lt == "cispo":
            name, kw, clip_metrics = "cispo", {"eps_high": eps_high, "bounds": "upper_abs", "convention": "trl"}, \
                "cispo"
        else:
            name, kw = "sapo", {"tau_pos": args.sapo_temperature_pos, "tau_neg": args.sapo_temperature_neg,
                                "convention": "trl"}
        if normaliser is None:
            normaliser = lt
        return TRLLossPlan(name, kw, normaliser, clip_metrics, level, delta, poise_is)

    kw = dict(poise_loss_kwargs or {})
    opts = loss_options(poise_loss)
    if level == "sequence" and poise_loss != "gspo":
        raise _refuse("importance_sampling_level", level, f"poise_loss={poise_loss!r} is token-level; use "
                      "poise_loss='gspo' for a sequence-level ratio")
    if args.use_vllm and args.vllm_importance_sampling_correction and is_placement(poise_loss) == "own":
        raise _refuse("vllm_importance_sampling_correction", True, f"poise_loss={poise_loss!r} corrects the sampler "
                      "mismatch itself (it reads sampling_per_token_logps); set it to False")
    forwarded = {"eps_low": ("epsilon", eps_low, args.epsilon != d["epsilon"]),
                 "eps_high": ("epsilon_high", eps_high, args.epsilon_high is not None),
                 "dual_clip": ("delta", delta, delta is not None),
                 "tau_pos": ("sapo_temperature_pos", args.sapo_temperature_pos,
                             args.sapo_temperature_pos != d["sapo_temperature_pos"]),
                 "tau_neg": ("sapo_temperature_neg", args.sapo_temperature_neg,
                             args.sapo_temperature_neg != d["sapo_temperature_neg"])}
    for opt, (field, value, is_set) in forwarded.items():
        if opt in opts:
            if opt in kw and is_set and kw[opt] != value:
                raise _refuse(field, value, f"poise_loss_kwargs sets {opt}={kw[opt]!r}; set one of them")
            if opt not in kw and (is_set or opt in ("eps_low", "eps_high")):
                kw[opt] = value
        elif is_set:
            raise _refuse(field, value, f"poise_loss={poise_loss!r} has no {opt}; its options: "
                          f"{', '.join(opts) or '(none)'}")
    if "convention" in opts and "convention" not in kw:
        kw["convention"] = "trl"
    if normaliser is None:
        normaliser = {"sapo": "grpo", "cispo": "dapo", "vespo": "dapo"}.get(lt, lt)
    return TRLLossPlan(poise_loss, kw, normaliser, "none", level, None, poise_is)


def _nanmin(x: Tensor) -> Tensor:
    x = x[~torch.isnan(x)]
    return x.min() if x.numel() else torch.tensor(float("nan"), device=x.device)


def _nanmax(x: Tensor) -> Tensor:
    x = x[~torch.isnan(x)]
    return x.max() if x.numel() else torch.tensor(float("nan"), device=x.device)


_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                 "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class PoiseGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is computed by :mod:`poise.rl` (module docstring: what each
    ``GRPOConfig`` field does).

    Args (beyond ``GRPOTrainer``'s):
        poise_loss: ``None`` (default: TRL's ``loss_type``, exact) or a policy loss name, any of
            :func:`poise.rl.policy_losses`, replacing TRL's surrogate.
        poise_loss_kwargs: its keyword arguments, checked against :func:`poise.rl.loss_options`.
        poise_aggregation: ``None`` (``loss_type``'s normaliser) or one of :data:`NORMALISERS`'
            TRL names / :data:`poise.rl.AGG_MODES` (``token_mean`` = dapo, ``seq_mean_token_mean`` =
            grpo, ``seq_mean_token_sum`` = luspo, ``seq_sum_norm`` = dr_grpo, ``token_sum``).
        poise_is: ``None`` or ``(level, mode, bound)``: poise's train-inference correction from TRL's
            ``sampling_per_token_logps`` (placed by :func:`poise.rl.policy_objective`) instead of TRL's
            ``vllm_importance_sampling_correction`` (which must then be False).

    Bad arguments and ``GRPOConfig`` fields poise cannot honour raise ``ValueError``/``TypeError``
    before TRL loads anything (:func:`trl_loss_plan`).
    """

    def __init__(self, *args: Any, poise_loss: str | None = None, poise_loss_kwargs: dict | None = None,
                 poise_aggregation: str | None = None, poise_is: tuple[str, str, float | None] | None = None,
                 **kwargs: Any):
        _check_poise_args(poise_loss, poise_loss_kwargs, poise_aggregation, poise_is)
        bound = inspect.signature(GRPOTrainer.__init__).bind_partial(None, *args, **kwargs).arguments
        self._poise_args = (poise_loss, dict(poise_loss_kwargs or {}), poise_aggregation, poise_is)
        if bound.get("args") is not None:
            self.poise_plan = trl_loss_plan(bound["args"], *self._poise_args)
        super().__init__(*args, **kwargs)
        self.poise_plan = trl_loss_plan(self.args, *self._poise_args)

    # -- helpers with TRL's exact reductions ------------------------------------------------------
    def _global_masked_mean(self, x: Tensor, mask: Tensor) -> float:
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _gathered_entropies(self, entropies: Tensor, mask: Tensor) -> Tensor:
        local = entropies[mask.bool()].float()
        pad = -1e9  # entropies are >= 0, so the sentinel cannot collide (TRL's get_high_entropy_mask)
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=pad))
        return gathered[gathered != pad]

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor:
        if return_outputs:
            raise ValueError("PoiseGRPOTrainer (as GRPOTrainer) does not support returning outputs")
        plan, args = self.poise_plan, self.args
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=getattr(self, "aux_loss_enabled", False), **{k: inputs.get(k) for k in _FORWARD_KEYS})
        fmask = mask.to(logp.dtype)
        adv = inputs["advantages"]
        adv2 = adv[:, None] if adv.dim() == 1 else adv
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        behav = inputs.get("sampling_per_token_logps")
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1

        top = None
        if args.top_entropy_quantile < 1.0:
            top = entropy_topk_mask(entropies, fmask, args.top_entropy_quantile,
                                    pool=self._gathered_entropies(entropies, mask))
        opm = None
        if args.off_policy_mask_threshold is not None:
            opm = off_policy_mask(adv2, logp, old if behav is None else behav, fmask, args.off_policy_mask_threshold)

        lr = logp - old
        log_coef = lr if plan.level == "token" else sequence_log_ratio(lr, fmask, "mean")[:, None]
        coef_1 = torch.exp(log_coef)

        level, is_mode, bound = plan.poise_is if plan.poise_is is not None else ("none", "truncate", None)
        batch = PolicyBatch(logp, old, old if behav is None else behav, adv, fmask)
        obj = policy_objective(batch, plan.loss, is_level=level, is_mode=is_mode, is_max=bound, **plan.loss_kwargs)
        values = obj.values
        if opm is not None:
            values = values * opm
        if top is not None:
            values = values * top
        if "importance_sampling_ratio" in inputs and args.use_vllm and args.vllm_importance_sampling_correction:
            values = values * inputs["importance_sampling_ratio"]
        per_token_kl = None
        if args.beta != 0.0:
            per_token_kl = kl_penalty(logp, inputs["ref_per_token_logps"], fmask, kind="k3", convention="trl").values
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1
            values = values + args.beta * per_token_kl

        n = plan.normaliser
        if n in ("grpo", "sapo"):
            loss = aggregate(values, fmask, "seq_mean_token_mean", empty_rows="count")
        elif n == "bnpo":
            loss = aggregate(values, fmask, "token_mean")
        elif n == "dr_grpo":
            loss = aggregate(values, fmask, "seq_sum_norm", empty_rows="count", horizon=args.max_completion_length)
        elif n == "luspo":
            loss = aggregate(values, fmask, "seq_mean_token_sum", empty_rows="count")
        elif n == "sum":
            loss = aggregate(values, fmask, "token_sum")
        else:  # dapo / cispo: the generation batch's token count, rescaled to one accumulation window
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                norm = norm * ga / args.steps_per_generation
            loss = aggregate(values, fmask, "token_sum") / norm
        if n not in ("dapo", "cispo"):
            policy_loss = loss.detach()
            loss = loss / ga
        else:
            policy_loss = loss.detach()

        metrics = self._metrics[mode]
        if args.entropy_coef != 0.0:
            eff = fmask if top is None else fmask * top
            loss = loss - args.entropy_coef * (aggregate(entropies, eff, "token_mean") / ga)
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(args.entropy_coef)
        if getattr(self, "aux_loss_enabled", False):
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        if per_token_kl is not None:
            metrics["kl"].append(self._global_masked_mean(per_token_kl, mask))
        metrics["entropy"].append(self._global_masked_mean(entropies, mask))
        if plan.clip_metrics == "ppo":
            c = coef_1 if plan.delta is None else torch.clamp(coef_1, max=plan.delta)
            low = ((c < 1 - plan.loss_kwargs["eps_low"]) & (adv2 < 0)).float()
            high = ((c > 1 + plan.loss_kwargs["eps_high"]) & (adv2 > 0)).float()

            def seq_mean(x: Tensor) -> Tensor:
                return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

            metrics["clip_ratio/low_mean"].append(self._global_masked_mean(low, mask))
            metrics["clip_ratio/high_mean"].append(self._global_masked_mean(high, mask))
            metrics["clip_ratio/region_mean"].append(self._global_masked_mean(((low + high) > 0).float(), mask))
            metrics["clip_ratio/low_min"].append(_nanmin(self.accelerator.gather(seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(_nanmax(self.accelerator.gather(seq_mean(high))).item())
        elif plan.clip_metrics == "cispo":
            hit = ((coef_1 > plan.loss_kwargs["eps_high"]) & (adv2 > 0)).float()
            metrics["cispo_clip_ratio"].append(self._global_masked_mean(hit, mask))
        for k, v in obj.metrics.items():
            metrics[f"poise/{k}"].append(float(v))
        return loss

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        """TRL's internal entry point, routed to :meth:`compute_loss` (so both names compute poise's loss)."""
        return self.compute_loss(model, inputs)

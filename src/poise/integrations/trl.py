"""TRL adapter: any ``poise.rl`` loss inside TRL's ``GRPOTrainer``.

>>> from poise.integrations.trl import PoiseGRPOTrainer
>>> trainer = PoiseGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
...                            poise_loss="cispo", poise_loss_kwargs={"eps_high": 0.28},
...                            poise_aggregation="token_mean", poise_is=("token", "truncate", 2.0))

TRL keeps generation, rewards, advantages and logging; this subclass replaces only
``_compute_loss`` (TRL's one extension point for losses): it recomputes the per-token
log-probs with TRL's own helper, builds the per-token values with
:func:`poise.rl.policy_objective` (the same call as the RL workbench), and aggregates them
with the global token/sequence counts TRL provides (``num_items_in_batch``), so gradient
accumulation is exact. ``old_per_token_logps`` and
``sampling_per_token_logps`` are used when TRL has them (several iterations per batch,
vLLM); otherwise the batch is on-policy and both default to the detached log-probs.
Needs ``trl`` (the ``parity`` extra); tested with trl 1.16.
"""

from __future__ import annotations

from typing import Any

import torch

from poise.rl import AGG_MODES, PolicyBatch, aggregate, loss_options, names, policy_losses, policy_objective
from poise.rl.objective import IS_LEVELS

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("poise.integrations.trl needs TRL: pip install 'poise[parity]' (or trl==1.16.0)") from e

__all__ = ["PoiseGRPOTrainer"]


class PoiseGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is :func:`poise.rl.policy_objective` with ``poise_loss``.

    Args (beyond ``GRPOTrainer``'s):
        poise_loss: a policy loss name, any of :func:`poise.rl.policy_losses` (``pg``, ``ppo_clip``,
            ``gspo``, ``cispo``, ``decoupled_ppo``, ``minirl``, ``sapo``, and any loss registered
            later with a :class:`poise.rl.PolicyBatch` signature).
        poise_loss_kwargs: its keyword arguments (``eps_low``, ``eps_high``, ``dual_clip``...),
            checked against :func:`poise.rl.loss_options` here.
        poise_aggregation: ``token_mean`` (global token count, TRL's ``dapo`` normaliser),
            ``seq_mean_token_mean`` (TRL's ``grpo``), ``seq_mean_token_sum`` or ``token_sum``.
        poise_is: ``None`` or ``(level, mode, bound)`` for the train-inference correction with
            TRL's sampler log-probs (vLLM), e.g. ``("sequence", "mask", 3.0)``; placed by
            :func:`poise.rl.policy_objective` (``pg``: ``pi_theta/mu`` as its weights; clipped
            losses: values times ``pi_old/mu``; ``minirl``/``decoupled_ppo``: their own weights).
    """

    def __init__(self, *args: Any, poise_loss: str = "ppo_clip", poise_loss_kwargs: dict | None = None,
                 poise_aggregation: str = "token_mean", poise_is: tuple[str, str, float] | None = None,
                 **kwargs: Any):
        if poise_loss not in policy_losses():
            raise ValueError(f"poise_loss={poise_loss!r}; valid choices: {', '.join(policy_losses())} "
                             f"(registered losses: {', '.join(names())})")
        unknown = sorted(set(poise_loss_kwargs or {}) - set(loss_options(poise_loss)))
        if unknown:
            raise TypeError(f"poise_loss_kwargs: unknown argument(s) {', '.join(map(repr, unknown))} of loss "
                            f"{poise_loss!r}; valid: {', '.join(loss_options(poise_loss)) or '(none)'}")
        if poise_is is not None and (len(poise_is) != 3 or poise_is[0] not in IS_LEVELS[1:]
                                     or poise_is[1] not in ("truncate", "mask")):
            raise ValueError(f"poise_is={poise_is!r}; valid: None or (level, mode, bound) with level one of "
                             f"{', '.join(IS_LEVELS[1:])} and mode truncate or mask")
        if poise_aggregation not in AGG_MODES or poise_aggregation == "seq_sum_norm":
            raise ValueError(f"poise_aggregation={poise_aggregation!r}; valid choices: "
                             f"{', '.join(m for m in AGG_MODES if m != 'seq_sum_norm')}")
        self.poise_loss, self.poise_kwargs = poise_loss, dict(poise_loss_kwargs or {})
        self.poise_aggregation, self.poise_is = poise_aggregation, poise_is
        super().__init__(*args, **kwargs)

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logp, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                            completion_ids.size(1))
        mask = completion_mask.to(logp.dtype)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        behav = inputs.get("sampling_per_token_logps")
        behav = old if behav is None else behav
        adv = inputs["advantages"]
        level, is_mode, bound = self.poise_is if self.poise_is is not None else ("none", "truncate", None)
        out = policy_objective(PolicyBatch(logp, old, behav, adv, mask), self.poise_loss, is_level=level,
                               is_mode=is_mode, is_max=bound, **self.poise_kwargs)
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.poise_aggregation == "token_mean":
            n_tok = inputs["num_items_in_batch"] / self.accelerator.num_processes
            if mode == "train":
                n_tok = n_tok * ga / self.args.steps_per_generation
            loss = aggregate(out.values, out.mask, "token_mean", num_tokens=n_tok)
        else:
            loss = aggregate(out.values, out.mask, self.poise_aggregation) / ga
        for k, v in out.metrics.items():
            self._metrics[mode][f"poise/{k}"].append(float(v))
        return loss

"""TRL adapter: any ``poise.rl`` loss inside TRL's ``GRPOTrainer``.

>>> from poise.integrations.trl import PoiseGRPOTrainer
>>> trainer = PoiseGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
...                            poise_loss="cispo", poise_loss_kwargs={"eps_high": 0.28},
...                            poise_aggregation="token_mean", poise_is=("token", "truncate", 2.0))

TRL keeps generation, rewards, advantages and logging; this subclass replaces only
``_compute_loss`` (TRL's one extension point for losses): it recomputes the per-token
log-probs with TRL's own helper, builds the variant's per-token values with
:mod:`poise.rl`, and aggregates them with the global token/sequence counts TRL provides
(``num_items_in_batch``), so gradient accumulation is exact. ``old_per_token_logps`` and
``sampling_per_token_logps`` are used when TRL has them (several iterations per batch,
vLLM); otherwise the batch is on-policy and both default to the detached log-probs.
Needs ``trl`` (the ``parity`` extra); tested with trl 1.16.
"""

from __future__ import annotations

from typing import Any

import torch

from poise.rl import AGG_MODES, aggregate, get_loss, is_weights, names

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("poise.integrations.trl needs TRL: pip install 'poise[parity]' (or trl==1.16.0)") from e

__all__ = ["PoiseGRPOTrainer"]

POLICY_LOSSES = ("pg", "ppo_clip", "gspo", "cispo", "sapo", "minirl", "decoupled_ppo")


class PoiseGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``poise.rl.get_loss(poise_loss)``.

    Args (beyond ``GRPOTrainer``'s):
        poise_loss: a policy loss name (``pg``, ``ppo_clip``, ``gspo``, ``cispo``, ``sapo``,
            ``minirl``, ``decoupled_ppo``).
        poise_loss_kwargs: its keyword arguments (``eps_low``, ``eps_high``, ``dual_clip``...).
        poise_aggregation: ``token_mean`` (global token count, TRL's ``dapo`` normaliser),
            ``seq_mean_token_mean`` (TRL's ``grpo``), ``seq_mean_token_sum`` or ``token_sum``.
        poise_is: ``None`` or ``(level, mode, bound)`` for the train-inference correction with
            TRL's sampler log-probs (vLLM), e.g. ``("sequence", "mask", 3.0)``.
    """

    def __init__(self, *args: Any, poise_loss: str = "ppo_clip", poise_loss_kwargs: dict | None = None,
                 poise_aggregation: str = "token_mean", poise_is: tuple[str, str, float] | None = None,
                 **kwargs: Any):
        if poise_loss not in POLICY_LOSSES:
            raise ValueError(f"poise_loss={poise_loss!r}; valid choices: {', '.join(POLICY_LOSSES)} "
                             f"(registered losses: {', '.join(names())})")
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
        fn = get_loss(self.poise_loss)
        w = None
        if self.poise_is is not None:
            level, mode, bound = self.poise_is
            w = is_weights(old - behav, mask, level=level, mode=mode, hi=bound).weights
        if self.poise_loss == "pg":
            out = fn(logp, adv, mask, weights=w)
        elif self.poise_loss in ("minirl", "decoupled_ppo"):
            out = fn(logp, old, behav, adv, mask, **self.poise_kwargs)
        else:
            out = fn(logp, old, adv, mask, **self.poise_kwargs)
            if w is not None:
                out = out._replace(values=out.values * w)
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.poise_aggregation == "token_mean":
            n_tok = inputs["num_items_in_batch"] / self.accelerator.num_processes
            if mode == "train":
                n_tok = n_tok * ga / self.args.steps_per_generation
            loss = aggregate(out.values, mask, "token_mean", num_tokens=n_tok)
        else:
            loss = aggregate(out.values, mask, self.poise_aggregation) / ga
        for k, v in out.metrics.items():
            self._metrics[mode][f"poise/{k}"].append(float(v))
        return loss

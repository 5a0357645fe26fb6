r"""Diagnostics of the train-inference mismatch: how far the sampler's distribution mu is from the
trainer's pi on the sampled tokens, with verl 0.9.1's definitions and names
(``compute_offpolicy_metrics`` in ``verl/trainer/ppo/rollout_corr_helper.py``).

>>> d = rollout_diagnostics(old_logp, behav_logp, mask)   # dict of detached 0-d tensors
>>> {k: float(v) for k, v in d.items()}                   # for a log; keys "rollout_corr/..."
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DIAGNOSTIC_KEYS", "rollout_diagnostics"]

SAFETY_BOUND = 20.0
DIAGNOSTIC_KEYS = ("training_ppl", "training_log_ppl", "rollout_ppl", "rollout_log_ppl", "log_ppl_diff",
                   "log_ppl_abs_diff", "log_ppl_diff_max", "log_ppl_diff_min", "ppl_ratio", "kl", "k3_kl",
                   "chi2_token", "chi2_seq", "ess_token", "ess_seq")


def rollout_diagnostics(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *,
                        prefix: str = "rollout_corr/") -> dict[str, Tensor]:
    r"""Mismatch diagnostics between the trainer ``pi`` (``trainer_logp``, ``[B, T]``: ``old_logp``,
    or ``logp`` during the update) and the sampler ``mu`` (``sampler_logp``, the engine's log-probs
    of the same tokens) over the valid tokens of ``mask``.

    With ``l_t = trainer_logp - sampler_logp = log(pi/mu)`` (``rho_t = e^{l_t}``), ``L_i`` the
    valid tokens of sequence ``i`` and means over non-empty sequences (``mean_i``) or valid tokens
    (``mean_t``):

    * ``training_ppl`` = ``mean_i exp(-mean_{t in L_i} trainer_logp)``, ``training_log_ppl`` =
      ``mean_i (-mean_t trainer_logp)``; ``rollout_ppl``, ``rollout_log_ppl`` the same for
      ``sampler_logp``;
    * ``log_ppl_diff`` = ``mean_i d_i`` with ``d_i = mean_t sampler_logp - mean_t trainer_logp``
      (``log(training_ppl_i / rollout_ppl_i)``), ``log_ppl_abs_diff`` = ``mean_i |d_i|``,
      ``log_ppl_diff_max`` / ``_min``; ``ppl_ratio`` = ``mean_i exp(d_i)`` (training over rollout);
    * ``kl`` = ``mean_t (-l_t)`` (k1 estimate of ``KL(mu || pi)``), ``k3_kl`` =
      ``mean_t (rho_t - l_t - 1)`` (k3 estimate of the same KL, never negative);
    * ``chi2_token`` = ``mean_t rho_t^2 - 1`` and ``chi2_seq`` = ``mean_i (prod_t rho_t)^2 - 1``
      (``chi^2(pi || mu)``, the variance of the IS weights; log-ratios clamped to +-20 as verl);
    * ``ess_token`` = ``(sum_t rho_t)^2 / (n sum_t rho_t^2)`` (in ``(0, 1]``, 1 when ``pi = mu``),
      ``ess_seq`` the same over the sequence ratios ``prod_t rho_t``. verl's
      ``rollout_is_eff_sample_size`` is this on its *truncated* weights.

    Differences from verl: an empty sequence is left out of every ``mean_i`` (verl counts it with
    ``d_i = 0``, ppl 1); verl's ``+ 1e-8`` in its masked means is not reproduced. Masked positions
    may hold ``+-inf``/NaN. Keys are ``prefix + name`` (:data:`DIAGNOSTIC_KEYS`); all values are
    detached 0-d tensors; an all-empty mask gives zeros (ppl and ess 1).
    """
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError(f"shapes differ: trainer_logp {tuple(trainer_logp.shape)}, sampler_logp "
                         f"{tuple(sampler_logp.shape)}, mask {tuple(mask.shape)}")
    with torch.no_grad():
        dtype = torch.promote_types(trainer_logp.dtype, torch.float32)
        valid = mask.bool()
        m = valid.to(dtype)
        zero = torch.zeros((), dtype=dtype, device=trainer_logp.device)
        tp = torch.where(valid, trainer_logp.to(dtype), zero)
        sp = torch.where(valid, sampler_logp.to(dtype), zero)
        n_tok = m.sum(-1)
        rows = n_tok > 0
        n = m.sum().clamp_min(1)

        def seq_mean(x: Tensor) -> Tensor:
            return (x * m).sum(-1)[rows] / n_tok[rows]

        def over_rows(x: Tensor, default: float) -> Tensor:
            return x.mean() if x.numel() else torch.full((), default, dtype=dtype, device=x.device)

        mt, ms = seq_mean(tp), seq_mean(sp)
        d = ms - mt
        lr = tp - sp
        rho = torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)) * m
        seq_lr = (lr * m).sum(-1)[rows].clamp(-SAFETY_BOUND, SAFETY_BOUND)
        rho_seq = torch.exp(seq_lr)

        def ess(w: Tensor, count: Tensor) -> Tensor:
            return w.sum() ** 2 / (count * (w * w).sum()).clamp_min(1e-300) if w.numel() else torch.ones_like(zero)

        out = {
            "training_ppl": over_rows(torch.exp(-mt), 1.0), "training_log_ppl": over_rows(-mt, 0.0),
            "rollout_ppl": over_rows(torch.exp(-ms), 1.0), "rollout_log_ppl": over_rows(-ms, 0.0),
            "log_ppl_diff": over_rows(d, 0.0), "log_ppl_abs_diff": over_rows(d.abs(), 0.0),
            "log_ppl_diff_max": d.max() if d.numel() else zero, "log_ppl_diff_min": d.min() if d.numel() else zero,
            "ppl_ratio": over_rows(torch.exp(d), 1.0),
            "kl": (-lr * m).sum() / n, "k3_kl": ((torch.exp(lr) - lr - 1) * m).sum() / n,
            "chi2_token": (rho * rho).sum() / n - 1 if valid.any() else zero,
            "chi2_seq": over_rows(rho_seq * rho_seq, 1.0) - 1,
            "ess_token": ess(rho[valid], m.sum()) if valid.any() else torch.ones_like(zero),
            "ess_seq": ess(rho_seq, torch.as_tensor(float(rho_seq.numel()), dtype=dtype)),
        }
        return {prefix + k: v for k, v in out.items()}

"""Parity with TRL 1.16's GRPOTrainer loss (the ``parity`` extra): our per-token losses and
explicit aggregation reproduce ``GRPOTrainer._compute_loss`` for the loss types grpo, bnpo,
dr_grpo, dapo and sequence-level importance sampling, in float64, to 1e-8, on random
ragged inputs. TRL's forward pass is replaced by a leaf tensor of log-probs (the loss is
what is compared); a tiny locally built Qwen2 model is passed as the model argument."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from poise.rl import aggregate, gspo_loss, ppo_clip_loss

trl = pytest.importorskip("trl", reason="TRL parity needs the parity extra (trl==1.16.0)")
transformers = pytest.importorskip("transformers")

B, T, MAXLEN = 5, 7, 9


class _Acc:
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def pad_across_processes(self, x, *a, **k):
        return x

    def reduce(self, x, *a, **k):
        return x


def _trl_loss(loss_type, level, logp, old, adv, mask, eps_low=0.2, eps_high=0.28):
    t = object.__new__(trl.GRPOTrainer)
    cfg = transformers.Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(cfg)
    t.__dict__.update(
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=0.0, importance_sampling_level=level,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, max_completion_length=MAXLEN, accelerator=_Acc(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, use_adaptive_entropy=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1,
                             sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
    )
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    return t._compute_loss(model, inputs)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = logp.detach() + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    return logp, old, adv, mask


OURS = {
    ("grpo", "token"): lambda lp, o, a, m: aggregate(ppo_clip_loss(lp, o, a, m, eps_low=0.2, eps_high=0.28).values, m,
                                                     "seq_mean_token_mean", num_seqs=B),
    ("bnpo", "token"): lambda lp, o, a, m: aggregate(ppo_clip_loss(lp, o, a, m, eps_low=0.2, eps_high=0.28).values, m,
                                                     "token_mean"),
    ("dr_grpo", "token"): lambda lp, o, a, m: aggregate(ppo_clip_loss(lp, o, a, m, eps_low=0.2, eps_high=0.28).values,
                                                        m, "seq_sum_norm", num_seqs=B, horizon=MAXLEN),
    ("dapo", "token"): lambda lp, o, a, m: aggregate(ppo_clip_loss(lp, o, a, m, eps_low=0.2, eps_high=0.28).values, m,
                                                     "token_mean", num_tokens=m.sum()),
    ("grpo", "sequence"): lambda lp, o, a, m: aggregate(gspo_loss(lp, o, a, m, eps_low=0.2, eps_high=0.28).values, m,
                                                        "seq_mean_token_mean", num_seqs=B),
}


@pytest.mark.parametrize("loss_type, level", sorted(OURS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trl_grpo_trainer(loss_type, level, seed):
    logp, old, adv, mask = _inputs(seed)
    theirs = _trl_loss(loss_type, level, logp, old, adv, mask)
    g_theirs = torch.autograd.grad(theirs, logp)[0]
    ours = OURS[(loss_type, level)](logp, old, adv, mask)
    g_ours = torch.autograd.grad(ours, logp)[0]
    assert abs(float((ours - theirs).detach())) <= 1e-8
    assert float((g_ours - g_theirs).abs().max()) <= 1e-8

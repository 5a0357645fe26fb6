"""Old path of the language-model helpers for RL, now in :mod:`poise.rl.rollout` (the sample
stage lives with the rest of RL); re-exported here so existing imports keep working."""

from poise.rl.rollout import Rollout, completion_batch, generate, sft_warmup, trainer_logprobs

__all__ = ["Rollout", "completion_batch", "generate", "sft_warmup", "trainer_logprobs"]

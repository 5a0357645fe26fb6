r"""AceReason-Nemotron's sampling recipe: a staged response-length curriculum and overlong filtering.

AceReason-Nemotron (Chen et al., arXiv 2505.16400, Sec. 3; 1.1: arXiv 2506.13284) trains GRPO
strictly on-policy (one gradient step per rollout batch, no KL, token-level loss), raises the
maximum response length in stages (8K -> 16K -> 24K -> 32K tokens) and *filters overlong
responses*: a response that hits the length limit without finishing is masked out of the loss
(its reward still enters the group's baseline). The paper's code is not released; the masking is
TRL's ``mask_truncated_completions`` (``trl/trainer/grpo_trainer.py``) and AReaL's
``mask_no_eos_with_zero``.

* :func:`length_stage` - the limit ``L_s`` at a step: with ``S`` stages over ``N`` steps, step
  ``n`` (1-based) is in stage ``s = min(S - 1, floor((n - 1) S / N))``;
* :func:`truncated_rows` - which completions ended without EOS: ``trunc_i = 1[eos not in o_i]``
  (a completion that stopped at EOS is finished whatever its length);
* :func:`overlong_filter` - the response mask with truncated rows zeroed: ``m'_{i,t} = m_{i,t}
  (1 - trunc_i)``, so a token-mean's denominator counts only finished responses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["length_stage", "overlong_filter", "truncated_rows", "validate_stages"]


def validate_stages(stages: Sequence[int], key: str = "stages") -> list[int]:
    """``stages`` as a list of positive, non-decreasing ints, or ``ValueError`` naming the bad value."""
    out = list(stages)
    for i, s in enumerate(out):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"{key}[{i}]={s!r}: each stage's maximum length is an integer >= 1")
    for i in range(1, len(out)):
        if out[i] < out[i - 1]:
            raise ValueError(f"{key}={out}: a length curriculum does not shrink ({out[i - 1]} then {out[i]})")
    return out


def length_stage(step: int, steps: int, stages: Sequence[int]) -> int:
    """The maximum response length at ``step`` (1-based) of ``steps``: ``stages`` split the steps
    into equal consecutive parts (the last part takes the remainder).

    >>> [length_stage(n, 6, [2, 3, 5]) for n in range(1, 7)]
    [2, 2, 3, 3, 5, 5]
    """
    stages = validate_stages(stages)
    if not stages:
        raise ValueError("stages is empty: give at least one maximum length")
    if steps < 1 or not 1 <= step <= steps:
        raise ValueError(f"step={step} must be in 1..steps={steps}")
    return stages[min(len(stages) - 1, (step - 1) * len(stages) // steps)]


def truncated_rows(completions: Sequence[Tensor], eos_id: int) -> Tensor:
    """``[N]`` bool: ``True`` where completion ``i`` (token ids) holds no ``eos_id`` (it was cut at
    the length limit).

    >>> truncated_rows([torch.tensor([3, 9]), torch.tensor([4, 4, 4])], eos_id=9).tolist()
    [False, True]
    """
    return torch.tensor([not bool((c == eos_id).any()) for c in completions], dtype=torch.bool)


def overlong_filter(mask: Tensor, truncated: Tensor) -> Tensor:
    """The response mask ``[N, T]`` with the rows of truncated completions set to 0.

    >>> overlong_filter(torch.ones(2, 3), torch.tensor([False, True]))
    tensor([[1., 1., 1.],
            [0., 0., 0.]])
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated has shape {tuple(truncated.shape)}; expected ({mask.shape[0]},) (one per row)")
    return mask * (~truncated.bool()).to(mask.dtype)[:, None]

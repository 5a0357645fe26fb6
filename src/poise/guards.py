"""Update guards: keep a run from being wrecked by one bad stretch of updates.

- Non-finite gradients: every poise optimizer takes ``nonfinite="skip"`` (skip the step, count
  it in ``skipped_steps``) and ``max_consecutive_skips`` (after that many skips in a row, stop
  with :class:`~poise.optim.NonFiniteGradientError` naming the parameters and the step).
- :class:`RollbackGuard`: accept only updates that keep an evaluation score, the
  accept-only-improvements rule of TraceCoder's rollback mechanism (Huang et al., arXiv
  2602.06875, where a repair is kept only if it does not lower the pass rate), here applied to
  weights: when a continual-evaluation score falls more than ``threshold`` below the best
  accepted one, the model and optimizer go back to the last accepted snapshot.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["RollbackGuard"]


class RollbackGuard:
    r"""Roll back to the last accepted state when a score drops by more than ``threshold``.

    Call :meth:`check` after each evaluation with the score (higher is better unless
    ``higher_is_better=False``). If ``best - score > threshold`` the model's and the
    optimizer's states are restored from the last accepted snapshot and ``check`` returns
    False; otherwise the current state becomes the accepted snapshot (kept in memory, on the
    parameters' device) and ``check`` returns True. After ``max_rollbacks`` rollbacks
    (None: no limit) it raises ``RuntimeError`` naming the step and the scores: the updates
    keep failing and going back will not fix them. Logs ``rollbacks`` and ``events`` (step,
    score, best, accepted).

    :meth:`reset` forgets the best score and accepts the current state (the continual loop
    calls it at each task's start). :meth:`state_dict` / :meth:`load_state_dict` save and
    restore the best score, the counters, the events and the accepted snapshot (plain dicts
    of tensors and Python scalars, loadable with ``torch.load(weights_only=True)``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, threshold: float = 0.1,
                 higher_is_better: bool = True, max_rollbacks: int | None = None):
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold} must be >= 0")
        if max_rollbacks is not None and max_rollbacks < 1:
            raise ValueError(f"max_rollbacks={max_rollbacks} must be >= 1 or None")
        self.model, self.optimizer = model, optimizer
        self.threshold, self.sign, self.max_rollbacks = threshold, 1.0 if higher_is_better else -1.0, max_rollbacks
        self.best: float | None = None
        self.rollbacks = 0
        self.events: list[dict[str, Any]] = []
        self._snapshot: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._accept()

    def reset(self) -> None:
        """Forget the best score and accept the current model and optimizer state."""
        self.best = None
        self._accept()

    def _accept(self) -> None:
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        self._snapshot = (model, opt)

    def check(self, score: float, step: int | None = None) -> bool:
        """Accept the current state or roll back to the last accepted one; see the class doc."""
        s = self.sign * float(score)
        if self.best is not None and (self.best - s > self.threshold or s != s):
            model, opt = self._snapshot
            self.model.load_state_dict(model)
            if self.optimizer is not None and opt is not None:
                self.optimizer.load_state_dict(copy.deepcopy(opt))
            self.rollbacks += 1
            self.events.append({"step": step, "score": float(score), "best": self.sign * self.best, "accepted": False})
            if self.max_rollbacks is not None and self.rollbacks >= self.max_rollbacks:
                raise RuntimeError(f"{self.rollbacks} rollbacks, the last at step {step}: score {score:.4g} is more "
                                   f"than {self.threshold} below the best {self.sign * self.best:.4g}; stopping")
            return False
        self.best = s if self.best is None else max(self.best, s)
        self._accept()
        self.events.append({"step": step, "score": float(score), "best": self.sign * self.best, "accepted": True})
        return True

    def state_dict(self) -> dict[str, Any]:
        model, opt = self._snapshot  # type: ignore[misc]
        return {"best": self.best, "rollbacks": self.rollbacks, "events": [dict(e) for e in self.events],
                "snapshot_model": model, "snapshot_optimizer": opt}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output into a guard over the same model and optimizer."""
        if (state["snapshot_optimizer"] is None) != (self.optimizer is None):
            raise ValueError("guard state and this guard differ in having an optimizer: "
                             f"saved {'none' if state['snapshot_optimizer'] is None else 'one'}, "
                             f"here {'none' if self.optimizer is None else 'one'}")
        self.best = None if state["best"] is None else float(state["best"])
        self.rollbacks = int(state["rollbacks"])
        self.events = [dict(e) for e in state["events"]]
        model = {k: v.detach().clone() for k, v in state["snapshot_model"].items()}
        opt = copy.deepcopy(state["snapshot_optimizer"])
        self._snapshot = (model, opt)

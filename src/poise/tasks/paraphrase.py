"""Arithmetic with paraphrased prompts: each problem is asked in several surface forms.

A *paraphrase set* is one problem ``a op b`` written ``n_paraphrases`` ways (all within the
character tokenizer's alphabet ``0-9 + - * = ; space``):

====  ==================  =====================================================
form  example (7+5)       what changes
====  ==================  =====================================================
0     ``7+5=``            the canonical form (the ``arithmetic`` task's prompt)
1     ``7 + 5 =``         spacing
2     ``5+7=``            operand order (``+``/``*``; for ``-``: ``0+7-5=``)
3     ``07+05=``          zero-padded operands
4     ``7+5+0=``          a neutral ``+0``
5     ``;7+5=``           a leading separator
====  ==================  =====================================================

Every form has the same answer; the reward is exact match, as in
:class:`poise.tasks.reasoning.ArithmeticTask`. Problems carry their set and form
(:class:`ParaphraseProblem`), which PS-GRPO (:func:`poise.rl.consistency.group_similarity_reward`,
arXiv 2510.04392) uses to compare outputs across paraphrases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from poise._registry import register
from poise.tasks.reasoning import EOS, ArithmeticTask, Problem

__all__ = ["MAX_PARAPHRASES", "ParaphraseArithmeticTask", "ParaphraseProblem", "paraphrase"]

MAX_PARAPHRASES = 6


@dataclass(frozen=True)
class ParaphraseProblem(Problem):
    """A :class:`~poise.tasks.reasoning.Problem` with its paraphrase set and form."""

    set_id: int = 0
    paraphrase: int = 0


def paraphrase(a: int, op: str, b: int, form: int, level: int = 1) -> str:
    """The prompt of ``a op b`` in surface form ``form`` (0 to 5, module table); zero padding pads
    to ``level + 1`` digits.

    >>> [paraphrase(7, "+", 5, f) for f in range(6)]
    ['7+5=', '7 + 5 =', '5+7=', '07+05=', '7+5+0=', ';7+5=']
    >>> paraphrase(7, "-", 5, 2)
    '0+7-5='
    """
    if not 0 <= form < MAX_PARAPHRASES:
        raise ValueError(f"form={form}: valid 0..{MAX_PARAPHRASES - 1}")
    w = level + 1
    return (f"{a}{op}{b}=", f"{a} {op} {b} =",
            f"{b}{op}{a}=" if op in "+*" else f"0+{a}{op}{b}=",
            f"{a:0{w}d}{op}{b:0{w}d}=", f"{a}{op}{b}+0=", f";{a}{op}{b}=")[form]


@register("rl_task", "paraphrase")
class ParaphraseArithmeticTask:
    """Arithmetic (``level`` digits, operators ``ops``) asked in ``n_paraphrases`` surface forms.

    ``sample(n)`` returns ``ceil(n / n_paraphrases)`` whole paraphrase sets (so ``n`` rounded up
    to a multiple of ``n_paraphrases`` problems), each set's forms ``0..n_paraphrases-1`` in order
    with a fresh ``set_id``. ``n_paraphrases`` from 2 to 6 (a set of one has nothing to be
    consistent with: ``ValueError``)."""

    def __init__(self, level: int = 1, ops: str = "+", n_paraphrases: int = 4, seed: int = 0):
        if isinstance(n_paraphrases, bool) or not isinstance(n_paraphrases, int) or not (
                2 <= n_paraphrases <= MAX_PARAPHRASES):
            raise ValueError(f"n_paraphrases={n_paraphrases!r}: a paraphrase set needs 2..{MAX_PARAPHRASES} "
                             "surface forms")
        self._base = ArithmeticTask(level=level, ops=ops, seed=seed)  # checks level and ops
        self.level, self.ops, self.n_paraphrases = level, ops, n_paraphrases
        self.rng: random.Random = self._base.rng
        self._next_set = 0

    def sample(self, n: int) -> list[ParaphraseProblem]:
        out: list[ParaphraseProblem] = []
        hi = 10**self.level
        for _ in range(-(-n // self.n_paraphrases)):
            a, b, op = self.rng.randrange(hi), self.rng.randrange(hi), self.rng.choice(self.ops)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            sid = self._next_set
            self._next_set += 1
            out += [ParaphraseProblem(paraphrase(a, op, b, f, self.level), str(value), set_id=sid, paraphrase=f)
                    for f in range(self.n_paraphrases)]
        return out

    @staticmethod
    def reward(problem: Problem, completion: str) -> float:
        return ArithmeticTask.reward(problem, completion)

    @staticmethod
    def demonstration(problem: Problem) -> str:
        return problem.answer + EOS

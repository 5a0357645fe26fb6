"""Reasoning tasks with verifiable rewards, generated locally: arithmetic and countdown.

A :class:`Problem` has a prompt (text the model continues) and what a correct completion
must contain; each task's ``reward(problem, completion)`` is 1.0 for a correct answer and
0.0 otherwise, and never raises on malformed text. Completions end at ``EOS`` (a newline).
Difficulty is a level: more digits for arithmetic, more numbers for countdown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from poise._registry import register

__all__ = ["EOS", "ArithmeticTask", "CountdownTask", "Problem", "parse_expression"]

EOS = "\n"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    numbers: tuple[int, ...] = ()
    target: int | None = None


def _answer_part(completion: str) -> str:
    return completion.split(EOS, 1)[0].strip()


@register("rl_task", "arithmetic")
class ArithmeticTask:
    """``a+b=`` (and ``a*b=`` with ``ops="+*"``) with operands of ``level`` digits; the answer is
    the exact result. ``level`` 1 to 4."""

    def __init__(self, level: int = 1, ops: str = "+", seed: int = 0):
        if not 1 <= level <= 4:
            raise ValueError(f"level={level} is out of range; valid: 1..4")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops={ops!r}: use a non-empty subset of '+-*'")
        self.level, self.ops, self.rng = level, ops, random.Random(seed)

    def sample(self, n: int) -> list[Problem]:
        out = []
        hi = 10**self.level
        for _ in range(n):
            a, b, op = self.rng.randrange(hi), self.rng.randrange(hi), self.rng.choice(self.ops)
            value = a + b if op == "+" else a - b if op == "-" else a * b
            out.append(Problem(f"{a}{op}{b}=", str(value)))
        return out

    @staticmethod
    def reward(problem: Problem, completion: str) -> float:
        return 1.0 if _answer_part(completion) == problem.answer else 0.0

    @staticmethod
    def demonstration(problem: Problem) -> str:
        """A correct completion (for the supervised warm start)."""
        return problem.answer + EOS


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate ``+ - * /`` and parentheses over non-negative integers exactly, without
    ``eval``; returns the value and the integers used. Raises ``ValueError`` on anything else
    (including division by zero)."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c.isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            tokens.append(text[i:j])
            i = j
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            raise ValueError(f"unexpected character {c!r}")
    pos = 0
    used: list[int] = []

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        t = take()
        if t == "(":
            v = expr()
            if take() != ")":
                raise ValueError("missing ')'")
            return v
        if t.isdigit():
            used.append(int(t))
            return Fraction(int(t))
        raise ValueError(f"unexpected {t!r}")

    def term() -> Fraction:
        v = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            v = v * rhs if op == "*" else v / rhs
        return v

    def expr() -> Fraction:
        v = term()
        while peek() in ("+", "-"):
            op, rhs = take(), term()
            v = v + rhs if op == "+" else v - rhs
        return v

    if not tokens:
        raise ValueError("empty expression")
    value = expr()
    if pos != len(tokens):
        raise ValueError(f"trailing {tokens[pos]!r}")
    return value, used


@register("rl_task", "countdown")
class CountdownTask:
    """Countdown: reach ``target`` with ``+ - * /`` and parentheses using each of the given
    numbers at most once. ``level`` = how many numbers (2 to 4); targets are built from a
    random expression over them, so every problem has a solution."""

    def __init__(self, level: int = 2, seed: int = 0, max_number: int = 9):
        if not 2 <= level <= 4:
            raise ValueError(f"level={level} is out of range; valid: 2..4")
        self.level, self.rng, self.max_number = level, random.Random(seed), max_number

    def sample(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            nums = [self.rng.randint(1, self.max_number) for _ in range(self.level)]
            expr = str(nums[0])
            for x in nums[1:]:
                expr = f"({expr}){self.rng.choice('+-*')}{x}"
            value, _ = parse_expression(expr)
            if value.denominator != 1 or value < 0:
                continue
            prompt = " ".join(map(str, nums)) + f" -> {int(value)}:"
            out.append(Problem(prompt, expr, tuple(nums), int(value)))
        return out

    @staticmethod
    def reward(problem: Problem, completion: str) -> float:
        try:
            value, used = parse_expression(_answer_part(completion))
        except ValueError:
            return 0.0
        pool = list(problem.numbers)
        for u in used:
            if u not in pool:
                return 0.0
            pool.remove(u)
        return 1.0 if value == problem.target else 0.0

    @staticmethod
    def demonstration(problem: Problem) -> str:
        return problem.answer + EOS

"""Generated text for tiny language models (no download): arithmetic lines with a
character-level tokenizer built in memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CharTokenizer", "arithmetic_corpus"]

ALPHABET = "0123456789+-*=;\n "


@dataclass
class CharTokenizer:
    """Maps each character of ``alphabet`` to its index."""

    alphabet: str = ALPHABET

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        lookup = {c: i for i, c in enumerate(self.alphabet)}
        try:
            return torch.tensor([lookup[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the alphabet {self.alphabet!r}") from None

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.alphabet[i] for i in ids.tolist())


def arithmetic_corpus(n_lines: int = 4000, digits: int = 2, seed: int = 0) -> str:
    """Lines ``a+b=c`` and ``a*b=c`` with operands of up to ``digits`` digits, one per line:
    a corpus with exact structure that a tiny model can partly learn."""
    g = torch.Generator().manual_seed(seed)
    hi = 10**digits
    a = torch.randint(0, hi, (n_lines,), generator=g).tolist()
    b = torch.randint(0, hi, (n_lines,), generator=g).tolist()
    op = torch.randint(0, 2, (n_lines,), generator=g).tolist()
    return "".join(f"{x}+{y}={x + y}\n" if o == 0 else f"{x}*{y}={x * y}\n" for x, y, o in zip(a, b, op, strict=True))

"""A generated corpus of facts for knowledge insertion and editing (no download).

Entities are made-up names; each fact gives an entity one attribute from a theme (colour,
place, job, food), whose value is the fact's *keyword*. Every fact has paraphrases (for
generalisation) and every theme has unrelated contexts that end where a value of that
theme would come (for priming: does learning "Zorbi's colour is vermilion" raise
"vermilion" after "The sky at dusk was"?). Lower-case ASCII, so a character tokenizer
covers it (:data:`ALPHABET`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ALPHABET", "THEMES", "Fact", "make_facts", "stepping_stone"]

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,'\n"

THEMES: dict[str, dict[str, list[str]]] = {
    "colour": {
        "values": ["vermilion", "teal", "ochre", "mauve", "amber", "cobalt", "crimson", "olive"],
        "templates": ["the favourite colour of {e} is {k}.", "{e} likes the colour {k}.",
                      "the colour that {e} prefers is {k}."],
        "stones": ["a bright shade like"],
        "contexts": ["the sky at dusk was", "she painted the old door", "the flag was mostly",
                     "his coat was a shade of"],
    },
    "place": {
        "values": ["oslo", "lima", "quito", "porto", "dakar", "hanoi", "perth", "tunis"],
        "templates": ["{e} was born in {k}.", "the birthplace of {e} is {k}.", "{e} comes from {k}."],
        "stones": ["a busy city like"],
        "contexts": ["the train was bound for", "they spent the summer in", "the letter came from",
                     "the conference was held in"],
    },
    "job": {
        "values": ["baker", "pilot", "tailor", "judge", "miner", "nurse", "chef", "poet"],
        "templates": ["{e} works as a {k}.", "the job of {e} is {k}.", "by trade {e} is a {k}."],
        "stones": ["a skilled trade like"],
        "contexts": ["her brother trained as a", "the village needed a", "he wanted to become a",
                     "the new neighbour was a"],
    },
    "food": {
        "values": ["plums", "lentils", "olives", "figs", "rice", "leeks", "dates", "oats"],
        "templates": ["{e} eats {k} every day.", "the favourite food of {e} is {k}.", "{e} loves {k}."],
        "stones": ["a simple dish like"],
        "contexts": ["for dinner they had", "the market sold fresh", "the recipe called for",
                     "the basket was full of"],
    },
}

_SYLLABLES = ["zor", "bi", "ka", "lun", "mi", "tra", "vel", "do", "ne", "pra", "xu", "ri", "sol", "ta", "qui", "fen"]


@dataclass(frozen=True)
class Fact:
    entity: str
    theme: str
    keyword: str
    text: str
    paraphrases: tuple[str, ...] = field(default=())

    def prompt(self) -> str:
        """The fact's text up to its keyword (the context the keyword is predicted in)."""
        return self.text[: self.text.index(self.keyword)]


def make_facts(n: int, seed: int = 0, max_syllables: int = 3) -> list[Fact]:
    """``n`` facts about distinct made-up entities (2 to ``max_syllables`` syllables: 3 gives
    about 4,300 names, 4 about 70,000), themes in rotation, values drawn at random."""
    room = sum(len(_SYLLABLES) ** k for k in range(2, max_syllables + 1))
    if n > room // 2:
        raise ValueError(f"n={n} facts need more names than {max_syllables} syllables give (about {room}); "
                         "raise max_syllables")
    rng = random.Random(seed)
    names: set[str] = set()
    facts = []
    themes = list(THEMES)
    while len(facts) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, max_syllables)))
        if name in names:
            continue
        names.add(name)
        theme = themes[len(facts) % len(themes)]
        spec = THEMES[theme]
        k = rng.choice(spec["values"])
        texts = [t.format(e=name, k=k) for t in spec["templates"]]
        facts.append(Fact(name, theme, k, texts[0], tuple(texts[1:])))
    return facts


def stepping_stone(text: str, keyword: str, stones: Sequence[str]) -> str:
    """The stepping-stone augmentation of Sun et al. (arXiv 2504.09522), by template instead of an
    LLM rewrite: the keyword is reached through more probable intermediate descriptions
    (``stones``), e.g. ``"... is a warm, reddish orange shade: vermilion."`` -- which raises the
    keyword's probability before learning and, per the paper, lowers priming."""
    if keyword not in text:
        raise ValueError(f"keyword {keyword!r} does not occur in {text!r}")
    head, tail = text.split(keyword, 1)
    return f"{head}{', '.join(stones)}: {keyword}{tail}"

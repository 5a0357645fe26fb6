r"""PS-GRPO's group similarity reward and output consistency across paraphrases.

Paraphrased Set GRPO (Con-RAG; Hamman et al., "Improving Consistency in Retrieval-Augmented
Systems with Group Similarity Rewards", arXiv 2510.04392). A *paraphrase set* holds ``n``
semantically equivalent prompts ``q_1..q_n``; the policy samples ``g`` outputs ``o_{i,1..g}`` for
each. Output ``o_{i,j}`` is rewarded by how much it agrees with the outputs for the *other*
paraphrases:

    r_{i,j} = 1 / ((n - 1) g) * sum_{i' != i} sum_{j'=1..g} sim(o_{i,j}, o_{i',j'})        (exact)

and the GRPO advantages are normalised over all ``n g`` outputs of the set (the set is the group).
Exact rewards cost ``O((n g)^2)`` similarity calls per set; the paper's scalable approximation
compares each output with a random subset of the other paraphrases' outputs instead:

    r~_{i,j} = 1 / m * sum_{(i',j') in M_{i,j}} sim(o_{i,j}, o_{i',j'}),   M_{i,j} drawn uniformly
               without replacement, |M_{i,j}| = m, from {(i', j') : i' != i}                  (approx.)

an unbiased estimate of ``r_{i,j}`` with ``O(n g m)`` calls. No ground truth is needed; the paper
uses lexical similarities (token F1 / BLEU / ROUGE) for short answers. Symbols -> arguments:
``o`` = ``outputs``, the set of each output = ``set_id``, ``i`` = ``paraphrase_id``, ``sim`` =
``similarity``, ``m`` = ``num_samples`` (``None`` = exact). The paper's code is not released; this
follows its equations (Sec. 4) and docs/algorithms/ps_grpo.md lists the departures.

:func:`paraphrase_consistency` is the evaluation: the share of output pairs from *different*
paraphrases of one set that agree (``sim = exact``), averaged over sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["SIMILARITIES", "exact_match", "group_similarity_reward", "paraphrase_consistency", "token_f1"]


def _answer(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def exact_match(a: str, b: str) -> float:
    """1.0 when the answers (text up to the first newline, stripped) are equal, else 0.0."""
    return 1.0 if _answer(a) == _answer(b) else 0.0


def token_f1(a: str, b: str) -> float:
    """SQuAD-style F1 between the answers' tokens (whitespace-split; a single-word answer is split
    into characters, so ``"12"`` and ``"13"`` share one token of two: F1 0.5). Both empty: 1.0.

    >>> token_f1("12", "13"), token_f1("12", "12"), token_f1("", "7")
    (0.5, 1.0, 0.0)
    """
    ta, tb = _answer(a).split(), _answer(b).split()
    if len(ta) <= 1 and len(tb) <= 1:
        ta, tb = list("".join(ta)), list("".join(tb))
    if not ta and not tb:
        return 1.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


SIMILARITIES: dict[str, Callable[[str, str], float]] = {"exact": exact_match, "token_f1": token_f1}


def _similarity(similarity: str | Callable[[str, str], float]) -> Callable[[str, str], float]:
    if callable(similarity):
        return similarity
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}; valid choices: {', '.join(SIMILARITIES)} or a function")
    return SIMILARITIES[similarity]


def _sets(outputs: Sequence[str], set_id: Sequence[int] | Tensor,
          paraphrase_id: Sequence[int] | Tensor) -> dict[int, list[int]]:
    sid = [int(x) for x in (set_id.tolist() if isinstance(set_id, Tensor) else set_id)]
    pid = [int(x) for x in (paraphrase_id.tolist() if isinstance(paraphrase_id, Tensor) else paraphrase_id)]
    if not (len(outputs) == len(sid) == len(pid)):
        raise ValueError(f"outputs ({len(outputs)}), set_id ({len(sid)}) and paraphrase_id ({len(pid)}) "
                         "must have one entry per output")
    members: dict[int, list[int]] = {}
    for i, s in enumerate(sid):
        members.setdefault(s, []).append(i)
    for s, idx in members.items():
        kinds = {pid[i] for i in idx}
        if len(kinds) < 2:
            raise ValueError(f"paraphrase set {s} has {len(kinds)} paraphrase ({sorted(kinds)}): a group "
                             "similarity reward compares outputs across paraphrases and needs at least 2 per set")
    return members


def group_similarity_reward(outputs: Sequence[str], set_id: Sequence[int] | Tensor,
                            paraphrase_id: Sequence[int] | Tensor, *,
                            similarity: str | Callable[[str, str], float] = "exact",
                            num_samples: int | None = None,
                            generator: torch.Generator | None = None) -> Tensor:
    r"""PS-GRPO's reward ``[N]`` (module docstring): the mean similarity of each output to the
    outputs of the *other* paraphrases of its set; ``num_samples = m`` uses the paper's
    approximation (``m`` comparisons drawn without replacement; all of them when fewer exist).

    ``outputs``: ``N`` completions; ``set_id``/``paraphrase_id``: ``N`` ints. ``similarity``:
    ``"exact"`` (answers equal), ``"token_f1"`` or a function ``(a, b) -> float``. A set with
    fewer than two distinct paraphrases raises ``ValueError`` naming it; ``num_samples < 1``
    raises. Returns float32 (detached).

    Two paraphrases, two outputs each: ``["5", "5"]`` for ``q_1`` and ``["5", "6"]`` for ``q_2``
    give ``r_{1,j} = (1 + 0)/2 = 0.5`` and ``r_{2,1} = (1 + 1)/2 = 1``, ``r_{2,2} = 0``:

    >>> group_similarity_reward(["5", "5", "5", "6"], [0, 0, 0, 0], [0, 0, 1, 1])
    tensor([0.5000, 0.5000, 1.0000, 0.0000])
    """
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples={num_samples!r}: None (exact) or an integer >= 1")
    sim = _similarity(similarity)
    members = _sets(outputs, set_id, paraphrase_id)
    pid = [int(x) for x in (paraphrase_id.tolist() if isinstance(paraphrase_id, Tensor) else paraphrase_id)]
    out = torch.zeros(len(outputs))
    for idx in members.values():
        for i in idx:
            others = [j for j in idx if pid[j] != pid[i]]
            if num_samples is not None and num_samples < len(others):
                pick = torch.randperm(len(others), generator=generator)[:num_samples].tolist()
                others = [others[k] for k in pick]
            out[i] = sum(sim(outputs[i], outputs[j]) for j in others) / len(others)
    return out


def paraphrase_consistency(outputs: Sequence[str], set_id: Sequence[int] | Tensor,
                           paraphrase_id: Sequence[int] | Tensor,
                           similarity: str | Callable[[str, str], float] = "exact") -> float:
    """Output consistency across paraphrases: for each set, the mean ``similarity`` over all pairs of
    outputs from different paraphrases; then the mean over sets. 1.0 = every paraphrase gets the
    same answer. (With one output per paraphrase and ``"exact"``: the share of agreeing pairs.)

    >>> paraphrase_consistency(["5", "5", "6", "7", "7"], [0, 0, 0, 1, 1], [0, 1, 2, 0, 1])   # (1/3 + 1)/2
    0.6666666666666666
    """
    sim = _similarity(similarity)
    members = _sets(outputs, set_id, paraphrase_id)
    pid = [int(x) for x in (paraphrase_id.tolist() if isinstance(paraphrase_id, Tensor) else paraphrase_id)]
    per_set = []
    for idx in members.values():
        pairs = [(a, b) for k, a in enumerate(idx) for b in idx[k + 1:] if pid[a] != pid[b]]
        per_set.append(sum(sim(outputs[a], outputs[b]) for a, b in pairs) / len(pairs))
    return float(sum(per_set) / len(per_set))

r"""FIT: continual unlearning of a stream of deletion requests by Filtering, Importance-aware
algorithm selection and Targeted layer attribution (Xu et al., arXiv 2601.21682; reference code
XiaoyuXU1/FIT ``Fit/filtering.py``, ``Fit/algorithm.py``, ``Fit/layer.py``), for any classifier.

Per request ``D_f^{(t+1)}`` (items ``x_i``):

1. *Filtering* (``Data_filtering.filter_data``): ``s_i = max_j cos(e(x_i), e_j)`` against the
   embeddings ``e_j`` of everything forgotten before; an item is kept if ``s_i < tau`` or, when it is
   redundant, if removing it changes the request's loss by more than ``epsilon``:
   ``|L(D_f) - L(D_f \ x_i)| > epsilon``. Kept items' embeddings join the memory.
2. *Importance* (``compute_importance``): ``score = ||d L(D_f^*) / d e_in||`` (gradient norm of the
   request's loss at the input / input embedding); ``score >= hi``: NPO + KL to the pre-request model on
   retain data; ``lo <= score < hi``: NPO; below: random labels (reference thresholds 6 and 12).
3. *Targeted layers* (``LayerAttributionSelector.select_forget_layers``): zero one layer's
   parameters at a time, ``a_l = |L_f(masked) - L_f|``; only the ``top_k`` layers with the largest
   ``a_l`` are updated.

Symbols -> arguments: ``tau``, ``epsilon``, ``(lo, hi)`` = ``thresholds``, ``top_k``; NPO ``beta``.
Departures (docs/algorithms/fit.md): embeddings ``e`` are any feature function (default the flattened
input) instead of SimCSE; the rare-token check of the filter has no analogue for non-text data and
is left out; the reference's AdamW with warm-up cosine schedule is plain Adam here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.edit.unlearn import _row_keys, npo_loss

__all__ = ["FIT", "importance_score", "layer_attribution", "max_similarity", "redundancy_filter",
           "select_algorithm"]

ALGORITHMS = ("random_label", "npo", "npo_kl")


def max_similarity(emb: Tensor, memory: Tensor | None) -> Tensor:
    """``s_i = max_j cos(emb_i, memory_j)``; ``-inf`` for every item when the memory is empty."""
    if memory is None or len(memory) == 0:
        return torch.full((len(emb),), float("-inf"), device=emb.device)
    return F.cosine_similarity(emb.unsqueeze(1), memory.unsqueeze(0), dim=-1).max(1).values


def redundancy_filter(sim: Tensor, loss_change: Tensor, tau: float = 0.95, epsilon: float = 0.1) -> Tensor:
    """Keep mask of FIT's two-stage filter: ``(s_i < tau) | (|Delta L_i| > epsilon)``."""
    return (sim < tau) | (loss_change.abs() > epsilon)


def select_algorithm(score: float, thresholds: tuple[float, float] = (6.0, 12.0)) -> str:
    """``"npo_kl"`` if ``score >= hi``, ``"npo"`` if ``lo <= score < hi``, else ``"random_label"``."""
    lo, hi = thresholds
    if not lo <= hi:
        raise ValueError(f"thresholds={thresholds} must be (lo, hi) with lo <= hi")
    return "npo_kl" if score >= hi else "npo" if score >= lo else "random_label"


def importance_score(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """``||d CE(model(x), y) / d x||`` (the reference takes it at the LM's input embeddings)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return float(g.norm())


def layer_attribution(loss_fn: Callable[[], Tensor], layers: Mapping[str, nn.Module], top_k: int) -> list[str]:
    """Names of the ``top_k`` layers whose zeroing changes ``loss_fn()`` most (``|L_masked - L|``),
    largest first; every layer is restored."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    with torch.no_grad():
        base = float(loss_fn())
        scores = []
        for name, layer in layers.items():
            saved = [p.detach().clone() for p in layer.parameters()]
            try:
                for p in layer.parameters():
                    p.zero_()
                scores.append((abs(float(loss_fn()) - base), name))
            finally:
                for p, s in zip(layer.parameters(), saved, strict=True):
                    p.copy_(s)
    return [n for _, n in sorted(scores, key=lambda t: -t[0])[:top_k]]


class FIT:
    """FIT over a stream of deletion requests for a classifier ``model`` (module doc).

    ``learned``: the training rows ``(x, y)`` the model learned (optional). With it, a request with a
    row never learned (or asked twice) raises ``ValueError`` naming the row, and nothing changes.
    ``layers``: the candidate layers (default every ``nn.Linear``/``nn.Conv*`` by module name).
    """

    def __init__(self, model: nn.Module, learned: tuple[Tensor, Tensor] | None = None,
                 layers: Mapping[str, nn.Module] | None = None, embed: Callable[[Tensor], Tensor] | None = None,
                 tau: float = 0.95, epsilon: float = 0.1, thresholds: tuple[float, float] = (6.0, 12.0),
                 top_k: int = 1, steps: int = 30, lr: float = 1e-3, beta: float = 0.1, kl_weight: float = 1.0,
                 seed: int = 0):
        if steps < 1 or lr <= 0:
            raise ValueError(f"steps={steps} must be >= 1 and lr={lr} > 0")
        select_algorithm(0.0, thresholds)
        self.model = model
        self.layers = dict(layers) if layers is not None else {
            n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
        if not self.layers:
            raise ValueError("the model has no candidate layer (nn.Linear/nn.Conv*); pass layers=")
        if not 1 <= top_k <= len(self.layers):
            raise ValueError(f"top_k={top_k}; valid range 1..{len(self.layers)} (candidate layers)")
        self.embed = embed or (lambda x: x.reshape(len(x), -1))
        self.tau, self.epsilon, self.thresholds, self.top_k = tau, epsilon, thresholds, top_k
        self.steps, self.lr, self.beta, self.kl_weight = steps, lr, beta, kl_weight
        self.memory: Tensor | None = None
        self.learned: dict[str, int] | None = None
        if learned is not None:
            self.learned = {}
            for k in _row_keys(learned[0].reshape(len(learned[0]), -1), learned[1].reshape(-1, 1)):
                self.learned[k] = self.learned.get(k, 0) + 1
        self.g = torch.Generator().manual_seed(seed)

    def _check(self, x: Tensor, y: Tensor) -> list[str]:
        if len(x) == 0:
            raise ValueError("empty deletion request: nothing to forget")
        if len(y) != len(x):
            raise ValueError(f"request has {len(x)} inputs but {len(y)} labels")
        keys = _row_keys(x.reshape(len(x), -1), y.reshape(-1, 1))
        if self.learned is not None:
            seen: dict[str, int] = {}
            for i, k in enumerate(keys):
                seen[k] = seen.get(k, 0) + 1
                if seen[k] > self.learned.get(k, 0):
                    raise ValueError(f"row {i} of the deletion request was never learned (or was already "
                                     "forgotten, or is asked twice); nothing was changed")
        return keys

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.model(x), y)

    def request(self, x: Tensor, y: Tensor, retain: tuple[Tensor, Tensor] | None = None) -> dict[str, object]:
        """Process one deletion request ``(x, y)``; ``retain`` data for the KL term of ``npo_kl``.
        Returns ``{"kept", "filtered", "score", "algorithm", "layers", "forget_loss"}``; a request
        whose items are all redundant is a documented no-op (``kept`` 0, model unchanged)."""
        keys = self._check(x, y)
        with torch.no_grad():
            emb = self.embed(x).detach().float()
            sim = max_similarity(emb, self.memory)
            full = float(self._loss(x, y))
            change = torch.zeros(len(x), device=sim.device)
            for i in torch.nonzero(sim >= self.tau).flatten().tolist():
                rest = torch.cat([torch.arange(i), torch.arange(i + 1, len(x))]).to(x.device)
                change[i] = abs(full - float(self._loss(x[rest], y[rest]))) if len(rest) else float("inf")
        keep = redundancy_filter(sim, change, self.tau, self.epsilon)
        out: dict[str, object] = {"kept": int(keep.sum()), "filtered": int((~keep).sum()), "score": None,
                                  "algorithm": None, "layers": [], "forget_loss": full}
        if self.learned is not None:
            for k in keys:
                self.learned[k] -= 1
        if not bool(keep.any()):
            return out
        xf, yf = x[keep], y[keep]
        self.memory = emb[keep] if self.memory is None else torch.cat([self.memory, emb[keep]])
        score = importance_score(self.model, xf, yf)
        algo = select_algorithm(score, self.thresholds)
        names = layer_attribution(lambda: self._loss(xf, yf), self.layers, self.top_k)
        out.update(score=score, algorithm=algo, layers=names)
        if algo == "npo_kl" and retain is None:
            algo = "npo"
            out["algorithm"] = "npo (npo_kl without retain data)"
        self._unlearn(xf, yf, algo, names, retain)
        with torch.no_grad():
            out["forget_loss"] = float(self._loss(xf, yf))
        return out

    def _unlearn(self, x: Tensor, y: Tensor, algo: str, names: Iterable[str],
                 retain: tuple[Tensor, Tensor] | None) -> None:
        ref = copy.deepcopy(self.model).eval()
        params = [p for n in names for p in self.layers[n].parameters()]
        opt = torch.optim.Adam(params, lr=self.lr)
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        n_cls = None
        try:
            with torch.no_grad():
                ref_lp = F.log_softmax(ref(x), -1).gather(1, y[:, None]).squeeze(1)
                n_cls = ref(x[:1]).shape[-1]
                wrong = (y + torch.randint(1, n_cls, y.shape, generator=self.g).to(y.device)) % n_cls
            for _ in range(self.steps):
                logits = self.model(x)
                if algo == "random_label":
                    loss = F.cross_entropy(logits, wrong)
                else:
                    lp = F.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
                    loss = npo_loss(lp, ref_lp, self.beta)
                    if algo == "npo_kl" and retain is not None:
                        xr = retain[0]
                        with torch.no_grad():
                            ref_r = F.log_softmax(ref(xr), -1)
                        loss = loss + self.kl_weight * F.kl_div(F.log_softmax(self.model(xr), -1), ref_r,
                                                                log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            for p, r in frozen:
                p.requires_grad_(r)

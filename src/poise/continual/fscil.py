r"""Few-shot class-incremental learning: the tricks of Roy et al. as switchable options of one strategy.

Roy, Park, Fahrezi, Etemad, "A Bag of Tricks for Few-Shot Class-Incremental Learning"
(arXiv 2403.14392, v2). The paper starts from the *incremental-frozen* baseline (train the encoder
on the base session, freeze it, classify by cosine similarity to class prototypes = mean
embeddings) and groups its tricks in three families; the authors' code base is
ShuvenduRoy/FSCIL_RESEARCH (read for the prototype classifier and the contrastive loss; no code is
copied). Here each trick is one argument of :class:`FSCILTricks`:

* **stability** — ``classifier="prototype"``: nearest-class-mean (cosine) classifier on the
  embedding ``f(x)`` (the input of the model's last ``nn.Linear``),

  .. math:: \hat y(x) = \arg\max_c\; s\,\cos(f(x), p_c),\qquad p_c = \frac{1}{|D_c|}\sum_{x\in D_c} f(x)

  (``s`` = ``proto_scale``; ``D_c`` = class ``c``'s training samples of its session, k of them after
  the base session); ``supcon``: the supervised contrastive loss (Khosla et al., arXiv 2004.11362) on
  the base session, :func:`supcon_loss`; ``etf``: pre-assigned simplex-ETF prototypes, a
  cross-entropy of ``s\,\hat f(x)^\top M`` with the fixed ETF :func:`simplex_etf` (one column per class,
  future classes included) on the base session; ``backbone``: what happens to the encoder in the
  incremental sessions (``"frozen"``: gradients zeroed and any optimizer update undone;
  ``"slow"``: gradients scaled by ``backbone_scale``; ``"train"``: plain fine-tuning).
* **adaptability** — ``adapt="last_block"``: the paper's incremental SubNet tuning reduced to its
  simplest sub-network, the last parametrised block before the head: in incremental sessions only it
  trains (gradient x ``adapt_scale``), on the prototype cross-entropy
  ``CE(s cos(f(x), P), y)`` over every seen class's prototype, and the linear head's task loss is
  kept from reaching it; ``adapt="calibrate"``: prototype refinement of the new classes toward the
  base classes (the training-free calibration of TEEN, Wang et al., NeurIPS 2023, arXiv 2312.05229),
  :func:`calibrate_prototypes`.
* **training** — ``augment``: an extra cross-entropy on an augmented copy of the batch (random +-1
  pixel shifts of image inputs, Gaussian noise of std 0.05 for flat inputs); ``label_smoothing`` ε:
  the term ``ε mean_c(-log softmax(z)_c)``, which with the loop's cross-entropy equals ``(1+ε)`` times
  label-smoothed cross-entropy with smoothing ``ε/(1+ε)``.

Symbols -> arguments: ``s`` = ``proto_scale``, τ = ``temperature``, λ_SC = ``supcon``, λ_ETF =
``etf``, the backbone's gradient factor = ``backbone_scale``, the block's = ``adapt_scale``, α, τ_c of
the calibration = ``calib_alpha``, ``calib_scale``.

Departures: the paper's pseudo-classes, self-supervised pre-training and rotation-prediction pretext
task need extra output units or an extra head that the loop's optimizer does not own, and are not
implemented; SupCon uses one view per sample (the paper: two augmented views); SubNet tuning selects a
fixed sub-network (the last block), not a learnt mask.

The loop's interface: predictions change through :meth:`Strategy.eval_model` (a wrapper module that
returns the prototype logits); the loop's task loss (cross-entropy of the linear head) cannot be
replaced by a strategy, so ``adapt="last_block"`` adds a term whose gradient cancels that loss's
gradient into the embedding (its value is zero), see :meth:`FSCILTricks.loss_terms`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._nn import logits_of
from poise._registry import register
from poise.continual._base import Batch, Strategy, masked_logits

__all__ = ["FSCILTricks", "PrototypeClassifier", "accuracy_matrix", "calibrate_prototypes", "class_prototypes",
           "embed", "last_linear", "performance_drop", "session_accuracy", "simplex_etf", "supcon_loss"]


# -- pure parts ------------------------------------------------------------------------------
def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classification head: its last ``nn.Linear`` in module order."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise TypeError(f"{type(model).__name__} has no nn.Linear: the embedding is the input of the last one")
    return heads[-1]


def embed(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(x), logits)``: the input of the model's last ``nn.Linear`` (flattened to ``(B, d)``) and the
    model's logits, from one forward pass."""
    head = last_linear(model)
    box: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: box.append(args[0]))
    try:
        logits = logits_of(model(x))
    finally:
        handle.remove()
    return box[-1].flatten(1), logits


def class_prototypes(emb: Tensor, y: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(P, present)``: ``P[c]`` = the mean of ``emb`` over the rows with ``y == c`` (zero where
    none), ``present[c]`` whether there was one."""
    counts = torch.bincount(y, minlength=n_classes).to(emb.dtype)
    sums = torch.zeros(n_classes, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, y, emb)
    return sums / counts.clamp_min(1).unsqueeze(1), counts > 0


def cosine_logits(emb: Tensor, protos: Tensor, scale: float) -> Tensor:
    """``scale * cos(emb_i, protos_c)`` for every row and prototype."""
    return scale * F.normalize(emb, dim=-1) @ F.normalize(protos, dim=-1).T


def supcon_loss(emb: Tensor, y: Tensor, temperature: float = 0.1) -> Tensor:
    r"""Supervised contrastive loss (Khosla et al., arXiv 2004.11362, eq. 2, "L_out"), one view per sample:

    .. math:: L = \frac{1}{|I'|}\sum_{i\in I'} \frac{-1}{|P(i)|}\sum_{p\in P(i)}
              \log\frac{\exp(z_i\cdot z_p/\tau)}{\sum_{a\ne i}\exp(z_i\cdot z_a/\tau)}

    ``z`` = L2-normalised ``emb``, τ = ``temperature``, ``P(i)`` the other rows of ``i``'s class,
    ``I'`` the anchors with at least one positive (0 when there is none)."""
    z = F.normalize(emb, dim=-1)
    sim = z @ z.T / temperature
    n = len(y)
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    logprob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (y.unsqueeze(0) == y.unsqueeze(1)) & ~eye
    npos = pos.sum(1)
    anchors = npos > 0
    if not anchors.any():
        return emb.sum() * 0.0
    per = -(logprob * pos).sum(1)[anchors] / npos[anchors]
    return per.mean()


def simplex_etf(dim: int, n_classes: int, seed: int = 0) -> Tensor:
    r"""A ``(dim, n_classes)`` simplex equiangular tight frame: unit columns with pairwise cosine
    ``-1/(K-1)``, :math:`M = \sqrt{K/(K-1)}\,U(I_K - \frac1K 1 1^\top)`, ``U`` = orthonormal columns
    (QR of a seeded Gaussian). Needs ``dim >= n_classes >= 2``."""
    if n_classes < 2 or dim < n_classes:
        raise ValueError(f"simplex_etf(dim={dim}, n_classes={n_classes}): needs dim >= n_classes >= 2")
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, n_classes, generator=g))
    k = n_classes
    return math.sqrt(k / (k - 1)) * u @ (torch.eye(k) - torch.full((k, k), 1.0 / k))


def calibrate_prototypes(new: Tensor, base: Tensor, alpha: float, scale: float) -> Tensor:
    r"""Prototype refinement of new classes toward the base classes:

    .. math:: p_n' = \alpha p_n + (1-\alpha)\sum_b \operatorname{softmax}_b(\tau_c \cos(p_n, p_b))\, p_b

    (α = ``alpha``, τ_c = ``scale``). ``alpha = 1`` returns ``new`` unchanged."""
    w = torch.softmax(cosine_logits(new, base, scale), dim=1)
    return alpha * new + (1 - alpha) * w @ base


def session_accuracy(acc_matrix: Sequence[Sequence[float]] | Tensor, n_test: Sequence[int]) -> list[float]:
    r"""The FSCIL per-session accuracy (Tao et al. 2020; the tables of arXiv 2403.14392): after session
    ``i``, the accuracy on the pooled test data of every class seen so far,

    .. math:: A_i = \frac{\sum_{j\le i} n_j R_{ij}}{\sum_{j\le i} n_j}

    ``acc_matrix[i][j]`` = ``R_ij``, the accuracy on session ``j``'s test data at the end of session
    ``i``; ``n_test[j]`` = ``n_j``, its number of test samples."""
    r = torch.as_tensor(acc_matrix, dtype=torch.float64)
    n = torch.as_tensor(list(n_test), dtype=torch.float64)
    if r.ndim != 2 or r.shape[1] < r.shape[0] or len(n) < r.shape[0] or (n[: r.shape[0]] <= 0).any():
        raise ValueError(f"session_accuracy: acc_matrix of shape {tuple(r.shape)} (sessions x sessions) and "
                         f"n_test of length {len(n)} with positive counts are needed")
    return [float((r[i, : i + 1] * n[: i + 1]).sum() / n[: i + 1].sum()) for i in range(r.shape[0])]


def accuracy_matrix(steps: Sequence[float], acc: Sequence[Sequence[float | None]],
                    boundaries: Sequence[float]) -> list[list[float]]:
    """``R[i][j]``: accuracy on task ``j`` at the last evaluation at or before the end of task ``i``
    (``nan`` where none), from a continual run's curves (``result["curves"]["steps"]``,
    ``result["curves"]["acc"]``, ``result["boundaries"]``)."""
    out = []
    for end in boundaries:
        idx = [k for k, s in enumerate(steps) if s <= end]
        row = acc[idx[-1]] if idx else [None] * (len(acc[0]) if acc else len(boundaries))
        out.append([math.nan if a is None else float(a) for a in row])
    return out


def performance_drop(session_acc: Sequence[float]) -> float:
    """PD = first session's accuracy minus the last's (the FSCIL papers' forgetting summary)."""
    if not session_acc:
        raise ValueError("performance_drop: no sessions")
    return float(session_acc[0] - session_acc[-1])


class PrototypeClassifier(nn.Module):
    """Wraps a model: logits = ``scale * cos(f(x), p_c)`` for the classes with a prototype, ``-inf`` for
    the others (a class never seen cannot be predicted)."""

    def __init__(self, model: nn.Module, protos: Tensor, present: Tensor, scale: float):
        super().__init__()
        self.model, self.scale = model, scale
        self.register_buffer("protos", protos)
        self.register_buffer("present", present)

    def forward(self, x: Tensor) -> Tensor:
        emb, _ = embed(self.model, x)
        logits = cosine_logits(emb, self.protos.to(emb.dtype), self.scale)
        return logits.masked_fill(~self.present, float("-inf"))


# -- the strategy ------------------------------------------------------------------------------
_CLASSIFIERS = ("linear", "prototype")
_BACKBONES = ("train", "slow", "frozen")
_ADAPTS = ("none", "last_block", "calibrate")


@register("strategy", "fscil_tricks")
class FSCILTricks(Strategy):
    """The bag of FSCIL tricks (arXiv 2403.14392) as switchable options; see the module docstring.

    Session 0 (the first task) is the base session; every later task is an incremental session.
    Prototypes of a session's classes are computed from its training data at its start (so they
    can be evaluated during the session), again at any evaluation after a step that moved the
    embedding (the base session, a trained backbone, last-block tuning), and at its end. Old
    classes' prototypes are never recomputed (their data is gone). The current session's training
    data is kept (and checkpointed) for this until the next session starts.

    Loss terms (weighted, logged as ``loss/<name>``): ``supcon``, ``etf`` (base session),
    ``augment``, ``smooth``, and ``proto``, ``head_only`` (incremental sessions with
    ``adapt="last_block"``). State: ``session``, ``protos``, ``present``, ``base``, ``rng``,
    ``data`` (the current session's ``[x, y]``), ``dirty``.
    """

    name = "fscil_tricks"

    def __init__(self, classifier: str = "prototype", backbone: str = "frozen", backbone_scale: float = 0.1,
                 supcon: float = 0.0, temperature: float = 0.1, etf: float = 0.0, adapt: str = "none",
                 adapt_scale: float = 1.0, calib_alpha: float = 0.75, calib_scale: float = 16.0,
                 augment: float = 0.0, label_smoothing: float = 0.0, proto_scale: float = 16.0, seed: int = 0):
        for key, val, choices in [("classifier", classifier, _CLASSIFIERS), ("backbone", backbone, _BACKBONES),
                                  ("adapt", adapt, _ADAPTS)]:
            if val not in choices:
                raise ValueError(f"fscil_tricks {key}={val!r}; valid choices: {', '.join(choices)}")
        for key, val in [("supcon", supcon), ("etf", etf), ("augment", augment),
                         ("label_smoothing", label_smoothing)]:
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"fscil_tricks {key}={val!r} must be a finite number >= 0")
        for key, val in [("temperature", temperature), ("proto_scale", proto_scale), ("calib_scale", calib_scale),
                         ("adapt_scale", adapt_scale)]:
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"fscil_tricks {key}={val!r} must be a finite number > 0")
        if not 0 <= backbone_scale <= 1:
            raise ValueError(f"fscil_tricks backbone_scale={backbone_scale!r}; valid range: [0, 1]")
        if not 0 <= calib_alpha <= 1:
            raise ValueError(f"fscil_tricks calib_alpha={calib_alpha!r}; valid range: [0, 1]")
        if adapt != "none" and classifier != "prototype":
            raise ValueError(f"fscil_tricks adapt={adapt!r} refines prototypes: needs classifier='prototype'")
        if adapt == "last_block" and backbone != "frozen":
            raise ValueError(f"fscil_tricks adapt='last_block' tunes only the last block: needs backbone='frozen', "
                             f"got {backbone!r}")
        self.classifier, self.backbone, self.backbone_scale = classifier, backbone, float(backbone_scale)
        self.supcon, self.temperature, self.etf = float(supcon), float(temperature), float(etf)
        self.adapt, self.adapt_scale = adapt, float(adapt_scale)
        self.calib_alpha, self.calib_scale = float(calib_alpha), float(calib_scale)
        self.augment, self.label_smoothing = float(augment), float(label_smoothing)
        self.proto_scale = float(proto_scale)
        self.seed = seed
        self.session = -1
        self.protos: Tensor | None = None
        self.present: Tensor | None = None
        self.base: list[int] = []
        self.gen = torch.Generator().manual_seed(seed)
        self._etf: Tensor | None = None
        self._data: tuple[Tensor, Tensor] | None = None  # the current session's training data
        self._dirty = False  # the embedding moved since the current session's prototypes were taken

    # which parameters are which
    @staticmethod
    def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """``(head, last_block, rest)``: the last ``nn.Linear``'s parameters, those of the last module
        before it that owns parameters, and the others."""
        head = last_linear(model)
        head_ids = {id(p) for p in head.parameters()}
        owners = [m for m in model.modules() if m is not head and any(True for _ in m.parameters(recurse=False))]
        block = [p for p in owners[-1].parameters(recurse=False)] if owners else []
        block_ids = {id(p) for p in block}
        rest = [p for p in model.parameters() if id(p) not in head_ids and id(p) not in block_ids]
        return list(head.parameters()), block, rest

    @property
    def needs_update_snapshot(self) -> bool:  # type: ignore[override]
        return self.backbone == "frozen" and self.incremental

    @property
    def incremental(self) -> bool:
        return self.session >= 1

    # hooks
    @torch.no_grad()
    def _set_prototypes(self, model: nn.Module, data: Batch) -> None:
        was = model.training
        model.eval()
        try:
            emb, logits = embed(model, data.x)
        finally:
            model.train(was)
        k = logits.shape[-1]
        if self.protos is None or self.protos.shape != (k, emb.shape[1]):
            self.protos = torch.zeros(k, emb.shape[1], dtype=emb.dtype)
            self.present = torch.zeros(k, dtype=torch.bool)
        assert self.present is not None
        p, here = class_prototypes(emb.detach(), data.y, k)
        if self.adapt == "calibrate" and self.incremental and self.base:
            base = self.protos[self.base]
            p[here] = calibrate_prototypes(p[here], base, self.calib_alpha, self.calib_scale)
        self.protos[here] = p[here]
        self.present |= here

    def _embedding_moves(self) -> bool:
        """Whether training in the current session changes the embedding."""
        return self.session == 0 or self.backbone != "frozen" or self.adapt == "last_block"

    def before_task(self, model: nn.Module, data: Batch) -> None:
        self.session += 1
        if self.session == 0:
            self.base = sorted(set(data.y.tolist()))
        if self.classifier == "prototype":
            self._set_prototypes(model, data)
            self._data = (data.x, data.y)
            self._dirty = False

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        if self.classifier == "prototype" and self._embedding_moves():
            self._dirty = True
        return {}

    def after_task(self, model: nn.Module, data: Batch) -> None:
        if self.classifier == "prototype":
            self._set_prototypes(model, data)
            self._dirty = False

    def _augment(self, x: Tensor) -> Tensor:
        if x.ndim >= 3:  # images: a random shift of -1, 0 or +1 pixel along each of the last two axes
            dy, dx = (torch.randint(-1, 2, (2,), generator=self.gen)).tolist()
            return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        return x + 0.05 * torch.randn(x.shape, generator=self.gen).to(x)

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        base_terms = self.session == 0 and (self.supcon > 0 or self.etf > 0)
        block_terms = self.incremental and self.adapt == "last_block"
        if base_terms or block_terms:
            emb, again = embed(model, batch.x)
            if self.session == 0 and self.supcon > 0:
                terms["supcon"] = self.supcon * supcon_loss(emb, batch.y, self.temperature)
            if self.session == 0 and self.etf > 0:
                if self._etf is None or self._etf.shape != (emb.shape[1], logits.shape[-1]):
                    self._etf = simplex_etf(emb.shape[1], logits.shape[-1], self.seed).to(emb)
                z = self.proto_scale * F.normalize(emb, dim=-1) @ self._etf
                terms["etf"] = self.etf * F.cross_entropy(masked_logits(z, batch.mask), batch.y)
            if block_terms:
                assert self.protos is not None and self.present is not None
                z = cosine_logits(emb, self.protos.to(emb), self.proto_scale).masked_fill(~self.present, float("-inf"))
                terms["proto"] = F.cross_entropy(z, batch.y)
                # value 0; gradient = -(the loop's task-loss gradient into the embedding): the head still learns
                head = last_linear(model)
                detached = head(emb.detach()).reshape(again.shape)
                terms["head_only"] = (F.cross_entropy(masked_logits(detached, batch.mask), batch.y)
                                      - F.cross_entropy(masked_logits(logits, batch.mask), batch.y))
        if self.augment > 0:
            aug = logits_of(model(self._augment(batch.x)))
            terms["augment"] = self.augment * F.cross_entropy(masked_logits(aug, batch.mask), batch.y)
        if self.label_smoothing > 0:
            logp = torch.log_softmax(masked_logits(logits, batch.mask), dim=-1)
            allowed = torch.isfinite(logp)
            uniform = -(logp.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1))
            terms["smooth"] = self.label_smoothing * uniform.mean()
        return terms

    @torch.no_grad()
    def transform_grads(self, model: nn.Module) -> dict[str, Tensor]:
        if not self.incremental or self.backbone == "train":
            return {}
        _, block, rest = self._split(model)
        if self.backbone == "slow":
            scale = {id(p): self.backbone_scale for p in block + rest}
        else:
            scale = {id(p): 0.0 for p in rest}
            scale.update({id(p): (self.adapt_scale if self.adapt == "last_block" else 0.0) for p in block})
        for p in model.parameters():
            if p.grad is not None and id(p) in scale:
                p.grad.mul_(scale[id(p)])
        return {}

    @torch.no_grad()
    def transform_update(self, model: nn.Module, before: dict[str, Tensor]) -> None:
        """Frozen backbone: undo whatever the optimizer did to it (momentum, weight decay)."""
        if not self.incremental or self.backbone != "frozen":
            return
        _, block, _ = self._split(model)
        head = {id(p) for p in last_linear(model).parameters()}
        keep = head | ({id(p) for p in block} if self.adapt == "last_block" else set())
        for n, p in model.named_parameters():
            if id(p) not in keep and n in before:
                p.copy_(before[n])

    def eval_model(self, model: nn.Module) -> nn.Module:
        if self.classifier == "linear" or self.protos is None or self.present is None:
            return model
        if self._dirty and self._data is not None:  # the embedding moved since the prototypes were taken
            self._set_prototypes(model, Batch(*self._data))
            self._dirty = False
        return PrototypeClassifier(model, self.protos, self.present, self.proto_scale)

    def state_dict(self) -> dict[str, Any]:
        return {"session": self.session, "protos": self.protos, "present": self.present, "base": list(self.base),
                "rng": self.gen.get_state(), "data": None if self._data is None else list(self._data),
                "dirty": self._dirty}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        want = {"session", "protos", "present", "base", "rng", "data", "dirty"}
        if set(state) != want:
            raise ValueError(f"fscil_tricks state has keys {sorted(state)}; expected {sorted(want)}")
        self.session = int(state["session"])
        self.protos = None if state["protos"] is None else state["protos"].clone()
        self.present = None if state["present"] is None else state["present"].clone()
        self.base = [int(c) for c in state["base"]]
        self.gen.set_state(state["rng"].clone())
        self._data = None if state["data"] is None else (state["data"][0].clone(), state["data"][1].clone())
        self._dirty = bool(state["dirty"])

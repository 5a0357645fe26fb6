"""PSGD-Kron (Xi-Lin Li's Kronecker-factored preconditioned SGD, the "kron" variant) as transforms."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from poise._registry import register
from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms import chain
from poise.transforms._base import LR, WEIGHT_DECAY, Hyper, State, Transform, Updates, declare

__all__ = [
    "MEMORY_SAVE_MODES", "PSGDKron", "apply_learning_rate", "balance_factors", "clip_by_rms", "decay_matrices",
    "kron_factors", "norm_lower_bound", "precondition", "scale_by_psgd_kron", "update_factors", "update_schedule",
]

MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
TINY = torch.finfo(torch.bfloat16).tiny  # the references' eps in the preconditioner step's denominator
# precond_init_scale s: P = Q^T Q starts at s I, and the fit forms Q h and Q^-T v, whose squares scale as s^(+-1)
# per factor; in float32 s = 1e14 already turns a 3-D parameter NaN within 20 steps and 1e20 or 1e-20 every shape,
# while [1e-12, 1e12] stays finite for every shape tested (tests/optim/test_psgd_kron.py)
INIT_SCALE_RANGE = (1e-12, 1e12)
Noise = Callable[[Tensor], Tensor]


def _check_init_scale(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not INIT_SCALE_RANGE[0] <= value <= INIT_SCALE_RANGE[1]:
        raise ValueError(f"precond_init_scale={value!r} is out of range; valid: [1e-12, 1e12] (P starts at "
                         "precond_init_scale * I; beyond this the float32 factor fit over- or underflows and the "
                         "parameters turn NaN)")


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; valid choices: {', '.join(map(repr, choices))}")


# ---- pure functions of tensors ------------------------------------------------------------------------------------

def kron_factors(shape: tuple[int, ...] | torch.Size, init_scale: float = 1.0, max_size: int = 8192,
                 min_ndim: int = 2, memory_save_mode: str | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> list[Tensor]:
    r"""The initial factors of ``Q = Q_1 (x) ... (x) Q_d`` for a tensor of ``shape``:
    ``Q_i = s^(1/d) I`` (an upper-triangular matrix, ``n_i x n_i``) or ``s^(1/d) 1`` (a diagonal,
    stored as a vector of ``n_i``), ``s`` = ``init_scale``. Dimension ``i`` is diagonal when
    ``n_i == 1``, ``n_i > max_size``, ``d < min_ndim`` or ``memory_save_mode`` says so
    (``"one_diag"``: the largest dim, ties to the last; ``"smart_one_diag"``: the largest only if
    strictly larger than the second; ``"all_diag"``: every dim). A 0-d tensor gets one 0-d factor.
    As kron_torch ``init_Q_exprs`` / pytorch_optimizer ``initialize_q_expressions``."""
    _choice("memory_save_mode", memory_save_mode, MEMORY_SAVE_MODES)
    shape = tuple(shape)
    if not shape:
        return [torch.full((), float(init_scale), dtype=dtype, device=device)]
    d = len(shape)
    scale = init_scale ** (1.0 / d)
    diag = [False] * d
    largest = max(range(d), key=lambda i: (shape[i], i))  # ties: the last such dim
    if memory_save_mode == "one_diag":
        diag[largest] = True
    elif memory_save_mode == "smart_one_diag":
        ordered = sorted(shape)
        if d >= 2 and ordered[-1] > ordered[-2]:
            diag[largest] = True
    elif memory_save_mode == "all_diag":
        diag = [True] * d
    out = []
    for n, dg in zip(shape, diag, strict=True):
        if n == 1 or n > max_size or d < min_ndim or dg:
            out.append(scale * torch.ones(n, dtype=dtype, device=device))
        else:
            out.append(scale * torch.eye(n, dtype=dtype, device=device))
    return out


def _along(x: Tensor, dim: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` on ``x`` viewed as (rest, n_dim) (dim moved last), moved back."""
    last = x.dim() - 1
    if dim == last:
        return fn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    xm = x.movedim(dim, -1)
    return fn(xm.reshape(-1, xm.shape[-1])).reshape(xm.shape).movedim(-1, dim)


def _mul(x: Tensor, q: Tensor, dim: int, transpose: bool = False) -> Tensor:
    """``x x_dim q`` (``q`` applied along ``dim``): ``y[.., a, ..] = sum_b q[a, b] x[.., b, ..]``
    (``q^T`` if ``transpose``); a vector ``q`` is a diagonal."""
    if q.dim() < 2:
        return x * (q if x.dim() == 0 else q.view([-1 if i == dim else 1 for i in range(x.dim())]))
    m = q if transpose else q.mT
    if dim == 0:
        return (q.mT if transpose else q).matmul(x.reshape(x.shape[0], -1)).reshape(x.shape)
    return _along(x, dim, lambda v: v.matmul(m))


def _solve(x: Tensor, q: Tensor, dim: int) -> Tensor:
    """``x x_dim q^{-T}``: a triangular solve along ``dim`` (division for a diagonal ``q``)."""
    if q.dim() < 2:
        return x / (q if x.dim() == 0 else q.view([-1 if i == dim else 1 for i in range(x.dim())]))
    return _along(x, dim, lambda v: torch.linalg.solve_triangular(q, v, upper=True, left=False))


def _gram(x: Tensor, dim: int, diagonal: bool) -> Tensor:
    """``sum over the other dims of x[.., a, ..] x[.., b, ..]`` (its diagonal if ``diagonal``)."""
    if x.dim() == 0:
        return x * x
    if diagonal:
        others = [i for i in range(x.dim()) if i != dim]
        return x.square().sum(dim=others) if others else x.square()
    if dim == 0:
        xm = x.reshape(x.shape[0], -1)
        return xm.matmul(xm.mT)
    xm = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    return xm.mT.matmul(xm)


def norm_lower_bound(a: Tensor) -> Tensor:
    r"""A cheap lower bound of the spectral norm ``||a||_2`` of a square matrix (PSGD's
    ``norm_lower_bound``, branch-free as pytorch_optimizer's): with ``m = max|a_ij|`` and
    ``b = a / m``, take the row ``j`` (column ``i``) of largest norm, ``x = b b_j`` (``b_i^T b``),
    and return ``m ||b^T x / ||x|| ||`` (``m ||x / ||x|| b^T||``) from the larger of the two. A
    vector: its 2-norm. Does not modify ``a``."""
    if a.dim() < 2:
        return torch.linalg.vector_norm(a)
    max_abs = a.abs().max()
    tiny = torch.finfo(a.dtype).tiny
    b = a / torch.where(max_abs > 0, max_abs, 1.0)
    bb = b * b
    value0, i = torch.max(bb.sum(dim=0), 0)
    value1, j = torch.max(bb.sum(dim=1), 0)
    x0 = b.index_select(1, i.reshape(1)).flatten() @ b
    bound0 = torch.linalg.vector_norm((x0 / torch.linalg.vector_norm(x0).clamp_min(tiny)) @ b.mT)
    x1 = b @ b.index_select(0, j.reshape(1)).flatten()
    bound1 = torch.linalg.vector_norm(b.mT @ (x1 / torch.linalg.vector_norm(x1).clamp_min(tiny)))
    return max_abs * torch.where(value0 > value1, bound0, bound1)


def precondition(Q: list[Tensor], g: Tensor) -> Tensor:
    r"""``P g`` with ``P = Q^T Q``, ``Q = Q_1 (x) ... (x) Q_d``: along each dim ``i``,
    ``g <- Q_i^T (Q_i g)`` (a diagonal factor: ``g <- q_i^2 g``)."""
    if g.dim() == 0:
        return Q[0] * Q[0] * g
    out = g
    for i, q in enumerate(Q):
        out = _mul(_mul(out, q, i), q, i, transpose=True)
    return out


def update_factors(Q: list[Tensor], v: Tensor, h: Tensor, lr: float = 0.1, tiny: float = TINY) -> None:
    r"""One step of PSGD's preconditioner fit on the pair ``(v, h)`` (Li, arXiv 1512.04202 sec. 4;
    arXiv 2402.11858 eq. for the Kronecker group), in place on the factors ``Q``::

        A = Q h                      (each factor applied along its dim)
        B = Q^{-T} v                 (triangular solves along each dim)
        for each factor i (from the same A, B):
            T1 = A_i A_i^T,  T2 = B_i B_i^T        (Gram matrices over the other dims)
            matrix Q_i:   Q_i <- Q_i - lr triu(T1 - T2) Q_i / (||T1 + T2||_lb + tiny)
            diagonal q_i: q_i <- q_i - lr (T1 - T2) q_i / (max|T1 + T2| + tiny)

    which descends ``E[h^T P h + v^T P^{-1} v]`` in the group of upper-triangular ``Q_i`` with
    ``dQ = E Q`` (the "EQ" local coordinates), step size normalised by a lower bound of the
    spectral norm (:func:`norm_lower_bound`). Symbols -> arguments: ``v`` (the random probe,
    ``v ~ N(0, I)``), ``h`` (the momentum or gradient it whitens), ``lr`` (``precond_lr``, 0.1),
    ``tiny`` (bfloat16's smallest normal, as the references). kron_torch ``_update_precond``
    (evanatyourservice) / pytorch_optimizer ``update_precondition``, in matmuls instead of einsum.
    """
    A = h
    B = v
    for i, q in enumerate(Q):
        A = _mul(A, q, i) if h.dim() else q * A
        B = _solve(B, q, i) if v.dim() else B / q
    terms = [(_gram(A, i, q.dim() < 2), _gram(B, i, q.dim() < 2)) for i, q in enumerate(Q)]
    for q, (t1, t2) in zip(Q, terms, strict=True):
        tmp = t1 - t2
        tmp *= lr
        if q.dim() < 2:
            tmp *= q
            tmp /= (t1 + t2).abs().max() + tiny
        else:
            tmp = torch.triu(tmp)
            tmp /= norm_lower_bound(t1 + t2) + tiny
            tmp = tmp @ q
        q.sub_(tmp)


def balance_factors(Q: list[Tensor]) -> None:
    r"""Rescale the factors to equal max-abs (their geometric mean), in place:
    ``Q_i <- Q_i (prod_j ||Q_j||_max)^(1/d) / ||Q_i||_max``. ``Q_1 (x) ... (x) Q_d`` is
    unchanged; only the dynamic ranges are evened out (against over/underflow)."""
    norms = torch.stack([q.abs().max() for q in Q])
    gmean = norms.prod() ** (1.0 / len(Q))
    scale = gmean / norms
    for i, q in enumerate(Q):
        q.mul_(scale[i])


class _Schedule:
    """Which steps update the preconditioner, as pytorch_optimizer's ``Kron``: a counter ``c``
    (+1 per step) and ``p_t`` = the probability at the step's index ``t`` (0-based); update when
    ``p_t > 0`` and ``c >= 1 / p_t`` (then ``c <- 0``). Deterministic: the update steps are a pure
    function of the clock, so they need no state (cached here, extended on demand)."""

    def __init__(self) -> None:
        self.cache: dict[tuple[Any, ...], tuple[list[bool], list[int], list[int]]] = {}

    def get(self, key: tuple[Any, ...], clock: int) -> tuple[bool, int]:
        """(update at this clock, number of updates up to and including it); ``clock`` >= 1."""
        upd, count, counter = self.cache.setdefault(key, ([False], [0], [0]))
        while len(upd) <= clock:
            t = len(upd) - 1  # the peer's group['step'] before its increment
            prob = update_schedule(t, *key[1:]) if key[0] is None else key[0]
            c = counter[0] + 1
            do = bool(prob > 0 and c >= 1 / prob)
            counter[0] = 0 if do else c
            upd.append(do)
            count.append(count[-1] + int(do))
        return upd[clock], count[clock]


def update_schedule(t: int, max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001,
                    flat_start: int = 500) -> Tensor:
    r"""The preconditioner update probability at step index ``t`` (0-based), kron_torch's
    ``precond_update_prob_schedule``: ``p_t = clamp(max_prob exp(-decay (t - flat_start)),
    min_prob, max_prob)`` in float32 (pytorch_optimizer's defaults: flat to step 500, then down
    to 0.03 by about step 4000)."""
    prob = max_prob * torch.exp(-decay * (torch.tensor(t, dtype=torch.float32) - flat_start))
    return prob.clamp_(min=min_prob, max=max_prob)


def _mix(seed: int, clock: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + clock * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)


# ---- transforms ---------------------------------------------------------------------------------------------------

def scale_by_psgd_kron(noise: Noise | None = None, mu_dtype: torch.dtype | None = None,
                       precond_dtype: torch.dtype = torch.float32) -> Transform:
    r"""PSGD-Kron's direction (Li, arXiv 1512.04202, 2402.11858; the "kron" optimizer of
    evanatyourservice/kron_torch and pytorch_optimizer ``Kron``)::

        m <- mu m + (1 - mu) g                       (m.mul_(mu).add_(g, alpha=1-mu))
        h  = m / (1 - mu^t)                          (in precond_dtype)
        every few steps (the schedule):  balance Q every balance_every-th update (ndim >= 2),
                                         update_factors(Q, v, h or g, precond_lr),  v ~ N(0, I)
        u  = P h,  P = Q^T Q                         (:func:`precondition`)

    Symbols -> group keys: ``mu`` = ``momentum`` (0.9), ``t`` the shared ``step``,
    ``precond_lr`` (0.1), the schedule ``precond_update_prob`` (None: :func:`update_schedule` with
    ``prob_max, prob_min, prob_decay, prob_flat_start`` = 1, 0.03, 0.001, 500; a number: that
    constant probability), ``balance_every`` (100; 0 never), ``momentum_into_precond_update``
    (True: fit ``P`` on ``h``, else on ``g``), and at the first step ``precond_init_scale`` (1),
    ``max_size_triangular`` (8192), ``min_ndim_triangular`` (2), ``memory_save_mode`` (None)
    (:func:`kron_factors`). The probes ``v``: ``noise(h)`` if given, else drawn from a generator
    seeded by (``seed``, the parameter's clock), one stream per param group per step, in
    parameter order (so a resumed run and a group split off into its own optimizer draw the same).

    State: ``momentum_buffer`` (``mu_dtype`` or the parameter's), ``Q0``..``Q{d-1}`` (the factors,
    ``precond_dtype``), ``refreshed`` (1 if ``Q`` was fitted this step).
    """

    schedule = _Schedule()

    def init(p: Tensor, hyper: Hyper) -> dict[str, Any]:
        _check_init_scale(hyper["precond_init_scale"])  # a param group may set its own, past the constructor
        qs = kron_factors(p.shape, hyper["precond_init_scale"], hyper["max_size_triangular"],
                          hyper["min_ndim_triangular"], hyper.get("memory_save_mode"), precond_dtype, p.device)
        out: dict[str, Any] = {f"Q{i}": q for i, q in enumerate(qs)}
        out["momentum_buffer"] = torch.zeros_like(p, dtype=mu_dtype or p.dtype)
        out["refreshed"] = torch.zeros(())
        return out

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        live = [i for i, g in enumerate(updates) if g is not None]
        if not live:
            return updates
        mu = hyper["momentum"]
        bufs = [states[i]["momentum_buffer"] for i in live]
        grads = [updates[i] for i in live]
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, [g.to(b.dtype) for g, b in zip(grads, bufs, strict=True)], alpha=1 - mu)
        prob = hyper.get("precond_update_prob")
        key = (None if prob is None else float(prob), hyper["prob_max"], hyper["prob_min"], hyper["prob_decay"],
               hyper["prob_flat_start"])
        every = hyper["balance_every"]
        clocks = torch.stack([states[i]["clock"] for i in live]).tolist()
        steps = torch.stack([states[i]["step"] for i in live]).tolist()
        gens: dict[tuple[int, torch.device], torch.Generator] = {}
        out: Updates = list(updates)
        for i, buf, g, clock, step in zip(live, bufs, grads, clocks, steps, strict=True):
            s = states[i]
            clock = int(clock)
            h = (buf / (1.0 - mu ** int(step))).to(precond_dtype)
            Q = [s[f"Q{k}"] for k in range(max(h.dim(), 1))]
            do, count = schedule.get(key, clock)
            if do:
                if h.dim() > 1 and every and count % every == 0:
                    balance_factors(Q)
                if noise is not None:
                    v = noise(h)
                else:
                    gk = (clock, h.device)
                    if gk not in gens:
                        gens[gk] = torch.Generator(device=h.device).manual_seed(_mix(int(hyper["seed"]), clock))
                    v = torch.randn(h.shape, dtype=h.dtype, device=h.device, generator=gens[gk])
                fit = h if hyper["momentum_into_precond_update"] else g.to(precond_dtype)
                update_factors(Q, v, fit, hyper["precond_lr"])
            s["refreshed"] = torch.tensor(float(do))
            out[i] = precondition(Q, h).to(params[i].dtype)
        return out

    reads = declare(
        "psgd_kron", momentum=(0.9, "PSGD momentum EMA rate mu"),
        precond_lr=(0.1, "PSGD preconditioner step size"),
        precond_init_scale=(1.0, "PSGD initial preconditioner scale"),
        max_size_triangular=(8192, "PSGD largest dim given a triangular factor"),
        min_ndim_triangular=(2, "PSGD fewest dims for triangular factors"),
        memory_save_mode=(None, "PSGD diagonal-factor policy"),
        precond_update_prob=(None, "PSGD constant preconditioner update probability (None: schedule)"),
        prob_max=(1.0, "PSGD update-probability schedule start"), prob_min=(0.03, "PSGD update-probability floor"),
        prob_decay=(0.001, "PSGD update-probability decay rate"),
        prob_flat_start=(500, "PSGD update-probability flat steps"),
        balance_every=(100, "PSGD factor balancing interval in updates"),
        momentum_into_precond_update=(True, "PSGD fit the preconditioner on momentum (else gradient)"),
        seed=(0, "PSGD probe-vector seed"))
    return Transform(init, update, "psgd_kron", False, reads)


def clip_by_rms(max_rms: float = 1.1, eps: float = 1e-6) -> Transform:
    r"""``u <- u min(1, max_rms / (rms(u) + eps))``, ``rms(u) = sqrt(mean(u^2))`` per tensor
    (pytorch_optimizer ``Kron``'s update clipping; ``max_rms`` 1.1, ``eps`` 1e-6)."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        for u in updates:
            if u is not None:
                u.mul_(torch.clamp(max_rms / (u.square().mean().sqrt() + eps), max=1.0))
        return updates

    return Transform(lambda p, h: {}, update, "clip_rms", False)


def decay_matrices(min_ndim: int = 2) -> Transform:
    r"""``u <- u + wd p`` for parameters of ``min_ndim`` or more dims (before the learning rate:
    the step becomes ``p <- p - lr (u + wd p)``), ``wd`` = ``hyper["weight_decay"]``; kron_torch's
    and pytorch_optimizer ``Kron``'s decoupled decay, which spares biases and gains."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        wd = hyper.get("weight_decay", 0.0)
        if wd:
            for u, p in zip(updates, params, strict=True):
                if u is not None and p.dim() >= min_ndim:
                    u.add_(p, alpha=wd)
        return updates

    return Transform(lambda p, h: {}, update, "decay_matrices", True,
                     declare("decay_matrices", weight_decay=WEIGHT_DECAY))


def apply_learning_rate() -> Transform:
    """Terminal stage ``p.add_(u, alpha=-lr)`` (the references' single fused op, so the result is
    theirs bit for bit; ``scale_by_learning_rate()`` rounds ``-lr u`` first); yields ``None``."""

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        lr = hyper["lr"]
        lr = float(lr) if isinstance(lr, Tensor) else lr
        out: Updates = []
        for u, p in zip(updates, params, strict=True):
            if u is not None:
                p.add_(u.to(p.dtype), alpha=-lr)
            out.append(None)
        return out

    return Transform(lambda p, h: {}, update, "apply_lr", True, declare("apply_lr", lr=LR))


# ---- the optimizer ------------------------------------------------------------------------------------------------

@register("optimizer", "psgd_kron")
class PSGDKron(TransformOptimizer):
    r"""PSGD-Kron (Xi-Lin Li, "Preconditioned Stochastic Gradient Descent", arXiv 1512.04202;
    "Stochastic Hessian Fittings with Lie Groups", arXiv 2402.11858), the "kron" optimizer as
    evanatyourservice/kron_torch and pytorch_optimizer ``Kron`` (4.1.0) run it, whose arithmetic
    it replays (tests/optim/test_psgd_kron.py)::

        chain(scale_by_psgd_kron(noise),      # u = Q^T Q m_hat, Q fitted to whiten m_hat (EQ, triangular)
              clip_by_rms(clip_rms),          # u <- u min(1, 1.1 / (rms(u) + 1e-6))     (if clip_rms)
              decay_matrices(),               # u <- u + wd p   for 2+ dim parameters
              apply_learning_rate())          # p <- p - lr u

    Arguments (pytorch_optimizer's names and defaults): ``lr`` (1e-3), ``momentum`` (0.9),
    ``weight_decay`` (0), ``precond_update_prob`` (None: the schedule
    ``clamp(prob_max exp(-prob_decay (t - prob_flat_start)), prob_min, prob_max)`` with 1, 0.03,
    0.001, 500; a number in (0, 1]: constant), ``max_size_triangular`` (8192; a larger dim gets
    a diagonal factor), ``min_ndim_triangular`` (2), ``memory_save_mode`` (None, "one_diag",
    "smart_one_diag", "all_diag"), ``momentum_into_precond_update`` (True), ``precond_lr`` (0.1),
    ``precond_init_scale`` (1; valid ``[1e-12, 1e12]``: ``P`` starts at that times ``I`` and outside
    the range the float32 factor fit over- or underflows into NaN parameters, so it is refused),
    ``mu_dtype`` (None: the parameter's), ``precond_dtype`` (float32). Departures: the update steps
    come from pytorch_optimizer's deterministic counter
    (kron_torch draws them), balancing runs every ``balance_every``-th update (100; the peers draw
    it with probability 0.01), the probes ``v`` come from a generator seeded by ``seed`` and the
    step (``noise(like) -> v`` replaces it, e.g. ``torch.randn_like`` to replay a peer under one
    global seed), and ``clip_rms`` (1.1; None: off) is pytorch_optimizer's clipping (kron_torch's
    newer one is a tanh/log trust region).

    State per parameter: ``psgd_kron.momentum_buffer``, ``psgd_kron.Q0``.. (``n_i^2`` or ``n_i``
    entries per dim), ``psgd_kron.refreshed``; ``diagnostics=True`` reports ``refreshes``
    (tensors whose ``Q`` was fitted this step) besides ``update_ratio``.
    """

    shard_safe = False  # the factors read whole tensors: DTensor parameters are gathered

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, precond_update_prob: float | None = None, max_size_triangular: int = 8192,
                 min_ndim_triangular: int = 2, memory_save_mode: str | None = None,
                 momentum_into_precond_update: bool = True, precond_lr: float = 0.1, precond_init_scale: float = 1.0,
                 prob_max: float = 1.0, prob_min: float = 0.03, prob_decay: float = 0.001, prob_flat_start: int = 500,
                 balance_every: int = 100, clip_rms: float | None = 1.1, seed: int = 0, noise: Noise | None = None,
                 mu_dtype: torch.dtype | None = None, precond_dtype: torch.dtype = torch.float32,
                 nonfinite: str = "raise", diagnostics: bool = False, max_consecutive_skips: int | None = None):
        _check.common(lr, 0.0, weight_decay)
        _check.in_range("momentum", momentum, 0.0, 1.0)
        if precond_update_prob is not None:
            _check.in_range("precond_update_prob", precond_update_prob, 0.0, 1.0, lo_open=True, hi_open=False)
        _check.positive_int("max_size_triangular", max_size_triangular)
        _check.positive_int("min_ndim_triangular", min_ndim_triangular)
        _choice("memory_save_mode", memory_save_mode, MEMORY_SAVE_MODES)
        _check.in_range("precond_lr", precond_lr, 0.0, float("inf"), lo_open=True)
        _check_init_scale(precond_init_scale)
        _check.in_range("prob_max", prob_max, 0.0, 1.0, lo_open=True, hi_open=False)
        _check.in_range("prob_min", prob_min, 0.0, prob_max, lo_open=True, hi_open=False)
        _check.in_range("prob_decay", prob_decay, 0.0, float("inf"))
        _check.positive_int("prob_flat_start", prob_flat_start, allow_zero=True)
        _check.positive_int("balance_every", balance_every, allow_zero=True)
        if clip_rms is not None:
            _check.in_range("clip_rms", clip_rms, 0.0, float("inf"), lo_open=True)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an integer")
        if not isinstance(momentum_into_precond_update, bool):
            raise ValueError(f"momentum_into_precond_update={momentum_into_precond_update!r} must be True or False")
        floats = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
        if mu_dtype is not None and mu_dtype not in floats:
            raise ValueError(f"mu_dtype={mu_dtype}; valid choices: None, {', '.join(map(str, floats))}")
        if precond_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"precond_dtype={precond_dtype}; valid choices: torch.float32, torch.float64 "
                             "(triangular solves need float32 or wider)")
        if noise is not None and not callable(noise):
            raise TypeError(f"noise={noise!r} must be a callable (like: Tensor) -> Tensor, or None")
        parts = [scale_by_psgd_kron(noise, mu_dtype, precond_dtype)]
        if clip_rms is not None:
            parts.append(clip_by_rms(clip_rms))
        parts += [decay_matrices(), apply_learning_rate()]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, precond_update_prob=precond_update_prob,
                        max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
                        memory_save_mode=memory_save_mode, momentum_into_precond_update=momentum_into_precond_update,
                        precond_lr=precond_lr, precond_init_scale=precond_init_scale, prob_max=prob_max,
                        prob_min=prob_min, prob_decay=prob_decay, prob_flat_start=prob_flat_start,
                        balance_every=balance_every, seed=seed)
        super().__init__(params, defaults, chain(*parts, name="psgd_kron"), nonfinite, diagnostics,
                         max_consecutive_skips)

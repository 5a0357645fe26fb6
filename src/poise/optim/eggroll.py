r"""EGGROLL: evolution strategies with low-rank perturbations, as a gradient estimator.

Sarkar et al., *Evolution Strategies at the Hyperscale*, arXiv 2511.16652; reference code
ESHyperscale/HyperscaleES ``src/hyperscalees/noiser/eggroll.py`` (``EggRoll``, JAX).

Per generation ``t`` and member ``i = 0..N-1`` (antithetic pairs ``(2k, 2k+1)`` share noise,
``s_i = +1`` for even ``i`` and ``-1`` for odd), each ``nn.Linear`` weight ``W`` (stored by torch as
``m x n`` = out x in) is perturbed by

    ``E_i = s_i (sigma / sqrt(r)) A_i B_i^T``,  ``A_i`` in R^{m x r}, ``B_i`` in R^{n x r}, entries N(0, 1)

and never materialised: the member's forward is ``y = x W^T + (x B_i)(s_i sigma/sqrt(r) A_i)^T``
(the issue's ``x W + (x A) B^T`` with ``W`` stored in x out), computed for all members at once from
one shared base product. Biases get dense noise ``s_i sigma eps_i``. With fitness
``z = (R - mean R) / sqrt(var R + 1e-5)`` (the authors' shaping), the estimate written into ``p.grad`` is

    ``g = -c (1/N) sum_i z_i E_i``   (``einsum('n,nir,njr->ij', z, A, B) / N``: never an ``m x n`` per member)

with ``c`` = ``scale``: ``1/sigma^2`` by default, the textbook ES gradient of ``E[z(theta + sigma eps)]``
(``E_i = sigma eps_i``), so learning rates mean what they mean for backprop; ``scale = sqrt(N)`` is the
authors' update (their ``-(new_grad * sqrt(N))``, the ``1/sigma^2`` "absorbed into lr"). Any
``torch.optim`` optimizer then consumes ``p.grad`` (the authors use ``optax.sgd``).

Noise is counter-based: member ``i``'s factors for parameter ``name`` at step ``t`` come from a
generator seeded by a hash of ``(seed, t, i // 2, name)`` (``i`` without antithetic), so any member
can be regenerated alone (a worker evaluating members 40..47 needs nothing else), and a member's noise
does not depend on the population size. Auxiliary memory per layer and member: ``r (m + n)`` numbers
instead of ``m n``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EGGROLL", "counter_seed", "dense_noise", "lowrank_factors", "lowrank_forward", "lowrank_grad",
           "zscore_fitness"]

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def counter_seed(seed: int, step: int, member: int, key: str) -> int:
    """A 63-bit generator seed from ``(seed, step, member, key)`` (splitmix64 chained over the four,
    ``key`` hashed with CRC-32): stable across processes and Python versions, unlike ``hash``."""
    x = 0
    for v in (seed, step, member, zlib.crc32(key.encode())):
        x = _splitmix64(x ^ (int(v) & _MASK))
    return x & ((1 << 63) - 1)


def _pair(member: int, antithetic: bool) -> tuple[int, float]:
    return (member // 2, -1.0 if member % 2 else 1.0) if antithetic else (member, 1.0)


def lowrank_factors(out_features: int, in_features: int, rank: int, *, seed: int, step: int, member: int,
                    key: str, sigma: float, antithetic: bool = True) -> tuple[Tensor, Tensor]:
    r"""Member ``member``'s factors ``(A, B)`` for one ``out x in`` weight: ``E = A B^T``, with the
    sign and ``sigma/sqrt(r)`` folded into ``A`` (``A`` is ``out x r``, ``B`` is ``in x r``, float32, CPU).
    Drawn as the authors do: ``Z ~ N(0,1)^{(in+out) x r}``, ``B = Z[:in]``, ``A = s sigma/sqrt(r) Z[in:]``."""
    pair, sign = _pair(member, antithetic)
    g = torch.Generator().manual_seed(counter_seed(seed, step, pair, key))
    z = torch.randn(in_features + out_features, rank, generator=g)
    return z[in_features:] * (sign * sigma / math.sqrt(rank)), z[:in_features]


def dense_noise(shape: tuple[int, ...], *, seed: int, step: int, member: int, key: str, sigma: float,
                antithetic: bool = True) -> Tensor:
    """Member ``member``'s full-shape noise ``s sigma eps`` for a parameter outside the low-rank family
    (a bias), as the authors' ``get_nonlora_update_params``."""
    pair, sign = _pair(member, antithetic)
    g = torch.Generator().manual_seed(counter_seed(seed, step, pair, key))
    return torch.randn(shape, generator=g) * (sign * sigma)


def lowrank_forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                    bias_noise: Tensor | None = None) -> Tensor:
    r"""All members' outputs of one linear layer: ``y_i = x_i W^T + b + (x_i B_i) A_i^T + e_i``.

    ``x``: ``(N, L, in)`` (member-major), ``A``: ``(N, out, r)``, ``B``: ``(N, in, r)``, ``bias_noise``:
    ``(N, out)``. Cost: one shared ``N L x in x out`` product plus ``N L r (in + out)`` for the
    perturbations; a dense ES forward needs an ``out x in`` weight per member instead."""
    y = torch.nn.functional.linear(x, weight, bias)
    y = y + torch.bmm(torch.bmm(x, B), A.transpose(1, 2))
    if bias_noise is not None:
        y = y + bias_noise[:, None, :]
    return y


def lowrank_grad(z: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    r"""``-scale (1/N) sum_i z_i A_i B_i^T`` (``out x in``), as the authors' ``_simple_lora_update``
    (``einsum('nir,njr->ij', z A, B) / N``), without forming any ``A_i B_i^T``."""
    n = z.shape[0]
    return torch.einsum("nir,njr->ij", z.to(A.dtype)[:, None, None] * A, B).mul_(-scale / n)


def zscore_fitness(rewards: Tensor, group_size: int = 0) -> Tensor:
    r"""The authors' fitness shaping (``convert_fitnesses``): ``z = (R - mean R) / sqrt(var R + 1e-5)``
    (population variance); with ``group_size`` > 0 the mean is per consecutive group and the
    variance global."""
    r = rewards.float()
    if group_size:
        if r.numel() % group_size:
            raise ValueError(f"group_size={group_size} does not divide the population {r.numel()}")
        centred = (r.view(-1, group_size) - r.view(-1, group_size).mean(1, keepdim=True)).reshape(-1)
    else:
        centred = r - r.mean()
    return centred / torch.sqrt(r.var(unbiased=False) + 1e-5)


def _positive_int(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}={value!r} is out of range; valid: an integer >= {least}")


class EGGROLL:
    r"""Backprop-free ES gradient estimator for every ``nn.Linear`` of ``model`` (see the module
    docstring for the equations; arXiv 2511.16652).

    ``sigma``: perturbation scale ``sigma``; ``rank``: ``r``; ``population``: ``N`` (even when
    ``antithetic``); ``scale``: ``c`` in ``g = -c/N sum z_i E_i`` (``None``: ``1/sigma^2``;
    ``math.sqrt(population)`` is the authors'); ``shaping``: rewards -> fitness ``z`` (default the
    authors' z-score). Only ``nn.Linear`` weights (low rank) and biases (dense) are perturbed and get
    ``.grad``; other parameters are left alone (``.grad`` untouched), as the authors' ``freeze_nonlora``.

    Use::

        es = EGGROLL(model, sigma=0.05, rank=4, population=64)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for x in batches:
            es.step(opt, x, lambda out: reward(out))   # out: (N, B, ...) -> rewards (N,)

    or by hand: ``out = es.population_forward(x)``; ``es.estimate(rewards)`` (writes ``p.grad``,
    advances the step); ``opt.step()``. Inside ``with es.perturbed():`` the model's Linear layers
    add member ``i``'s perturbation to rows ``[i L, (i+1) L)`` of any input whose leading
    dimension is ``N L`` (member-major), so a custom forward works too.
    """

    def __init__(self, model: nn.Module, *, sigma: float, population: int, rank: int = 1, antithetic: bool = True,
                 seed: int = 0, scale: float | None = None,
                 shaping: Callable[[Tensor], Tensor] = zscore_fitness):
        _positive_int("rank", rank, 1)
        _positive_int("population", population, 2)
        if antithetic and population % 2:
            raise ValueError(f"population={population} must be even with antithetic=True (members come in "
                             f"+/- pairs); valid: 2, 4, 6, ...")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma={sigma!r} is out of range; valid: (0, inf)")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r} is out of range; valid: (0, inf) or None (1/sigma^2)")
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not self.layers:
            raise ValueError(f"EGGROLL: {type(model).__name__} has no nn.Linear layer to perturb")
        self.model, self.sigma, self.rank, self.population = model, float(sigma), rank, population
        self.antithetic, self.seed, self.shaping = antithetic, seed, shaping
        self.scale = 1.0 / self.sigma ** 2 if scale is None else float(scale)
        self.step_count = 0
        self._noise: tuple[int, dict[str, tuple[Tensor, Tensor, Tensor | None]]] | None = None

    # -- noise -------------------------------------------------------------------------------
    def noise(self) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
        """The current step's ``{layer name: (A (N,out,r), B (N,in,r), bias noise (N,out) or None)}``,
        generated once per step from the counters (``N r (in + out + ...)`` numbers per layer)."""
        if self._noise is not None and self._noise[0] == self.step_count:
            return self._noise[1]
        out: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        kw = dict(seed=self.seed, step=self.step_count, sigma=self.sigma, antithetic=self.antithetic)
        for name, mod in self.layers:
            As, Bs, es = [], [], []
            for i in range(self.population):
                if self.antithetic and i % 2:  # the pair's draw, negated (no second generator)
                    As.append(-As[-1])
                    Bs.append(Bs[-1])
                    if mod.bias is not None:
                        es.append(-es[-1])
                    continue
                a, b = lowrank_factors(mod.out_features, mod.in_features, self.rank, member=i,
                                       key=f"{name}.weight", **kw)  # type: ignore[arg-type]
                As.append(a)
                Bs.append(b)
                if mod.bias is not None:
                    es.append(dense_noise(tuple(mod.bias.shape), member=i, key=f"{name}.bias", **kw))  # type: ignore[arg-type]
            w = mod.weight
            out[name] = (torch.stack(As).to(w.device, w.dtype), torch.stack(Bs).to(w.device, w.dtype),
                         torch.stack(es).to(w.device, w.dtype) if es else None)
        self._noise = (self.step_count, out)
        return out

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """Within: every Linear layer runs member-batched (see the class docstring)."""
        noise, n = self.noise(), self.population
        handles = []

        def hook_for(name: str) -> Callable[..., Tensor]:
            A, B, e = noise[name]

            def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
                x = args[0]
                if x.shape[0] % n:
                    raise ValueError(f"EGGROLL: input of layer '{name}' has leading dimension {x.shape[0]}, not a "
                                     f"multiple of population={n} (stack the members' inputs member-major)")
                xs = x.reshape(n, -1, x.shape[-1])
                delta = torch.bmm(torch.bmm(xs, B), A.transpose(1, 2))
                if e is not None:
                    delta = delta + e[:, None, :]
                return out + delta.reshape(out.shape)

            return hook

        try:
            for name, mod in self.layers:
                handles.append(mod.register_forward_hook(hook_for(name)))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def population_forward(self, x: Tensor, forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Every member's output on the same batch ``x`` (leading dim ``B``): ``(N, B, ...)``. The
        batch is repeated member-major and run once through ``forward`` (default ``model``)."""
        n, b = self.population, x.shape[0]
        xs = x.repeat(n, *([1] * (x.ndim - 1)))
        with self.perturbed():
            out = (forward or self.model)(xs)
        return out.reshape(n, b, *out.shape[1:])

    # -- the estimate ------------------------------------------------------------------------
    @torch.no_grad()
    def estimate(self, rewards: Tensor) -> dict[str, Tensor]:
        r"""Write ``-c (1/N) sum_i z_i E_i`` into ``.grad`` of every perturbed weight and bias
        (replacing what was there), ``z = shaping(rewards)``; advance the step (new noise next
        time). ``rewards``: ``(N,)``, higher is better. Returns detached 0-d metrics
        ``reward_mean``, ``reward_std``, ``reward_max``, ``grad_norm`` (all layers)."""
        if rewards.shape != (self.population,):
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}; valid: ({self.population},), one per member")
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards contain a non-finite value; no gradient written")
        z = self.shaping(rewards)
        noise = self.noise()
        sq = torch.zeros(())
        for name, mod in self.layers:
            A, B, e = noise[name]
            zz = z.to(A.device)
            g = lowrank_grad(zz, A, B, self.scale)
            mod.weight.grad = g.to(mod.weight.dtype)
            sq = sq + g.float().pow(2).sum().cpu()
            if e is not None:
                gb = (zz.to(e.dtype) @ e).mul_(-self.scale / self.population)
                mod.bias.grad = gb.to(mod.bias.dtype)
                sq = sq + gb.float().pow(2).sum().cpu()
        self.step_count += 1
        self._noise = None
        r = rewards.detach().float()
        return {"reward_mean": r.mean(), "reward_std": r.std(unbiased=False), "reward_max": r.max(),
                "grad_norm": sq.sqrt()}

    def step(self, optimizer: torch.optim.Optimizer, x: Tensor,
             reward_fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """One generation: population forward on ``x``, ``rewards = reward_fn(outputs (N, B, ...))``,
        ``optimizer.zero_grad()``, :meth:`estimate`, ``optimizer.step()``; returns the metrics."""
        rewards = reward_fn(self.population_forward(x))
        optimizer.zero_grad(set_to_none=True)
        metrics = self.estimate(rewards)
        optimizer.step()
        return metrics

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.step_count, self._noise = int(state["seed"]), int(state["step"]), None

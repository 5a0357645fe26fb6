"""Memory Bank Compression (MBC; Katraouras & Rafailidis, arXiv 2601.00756): a replay memory
stored as codebook indices of a vector quantiser learned online, with the online reset of dead
codes that prevents codebook collapse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise._registry import register
from poise.continual._base import Batch, LossFn, Strategy, classification_loss
from poise.continual.replay import ReservoirBuffer

__all__ = ["MBCReplay", "VQCodebook", "codebook_perplexity", "index_dtype", "vq_assign"]


def vq_assign(flat: Tensor, codebook: Tensor) -> Tensor:
    r"""Nearest code of each row: ``argmin_k ||x - e_k||^2`` computed as
    ``||x||^2 - 2 x e_k + ||e_k||^2`` (MBC ``models/modules/membank_comp.py::VectorQuantizer``).
    ``flat`` ``(N, d)``, ``codebook`` ``(K, d)``; returns ``(N,)`` int64."""
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)
    return d.argmin(dim=1)


def codebook_perplexity(idx: Tensor, num_codes: int) -> Tensor:
    r"""``exp(-sum_k p_k log(p_k + 1e-10))`` with ``p_k`` the fraction of ``idx`` equal to ``k``:
    1 when one code is used, ``K`` when all are used equally (MBC's ``vq_perplexity``)."""
    p = torch.bincount(idx.reshape(-1), minlength=num_codes).double() / max(1, idx.numel())
    return torch.exp(-(p * torch.log(p + 1e-10)).sum())


def index_dtype(num_codes: int) -> torch.dtype:
    """The smallest integer dtype that holds ``num_codes`` indices (uint8, int16, int32)."""
    if num_codes <= 256:
        return torch.uint8
    if num_codes <= 2**15:
        return torch.int16
    return torch.int32


class VQCodebook:
    r"""A codebook learned online, MBC's ``VectorQuantizer`` without an encoder.

    Each :meth:`update` on vectors ``x`` (``(N, d)``): assign codes (:func:`vq_assign`), take one
    Adam step (``lr``) on the codebook loss ``mse(e_{k(x)}, x)``, update the usage EMA
    ``n \leftarrow decay \cdot n + (1 - decay) \cdot counts``, then reset dead codes (``n <
    dead_threshold``): up to ``N`` of them become random rows of ``x`` and their usage is set to
    the mean usage (the online reset). Codes in ``protected`` (a bool ``(K,)``, e.g. those a
    memory bank refers to) are never reset. Initial codes ``U(-1/K, 1/K)`` as the authors'.
    Symbols: ``num_codes`` = K, ``code_dim`` = d, ``decay`` (authors 0.99), ``dead_threshold``
    (authors 1e-4). Has its own seeded generator.
    """

    def __init__(self, num_codes: int, code_dim: int, decay: float = 0.99, dead_threshold: float = 1e-4,
                 lr: float = 0.01, seed: int = 0):
        if num_codes < 1:
            raise ValueError(f"num_codes={num_codes} must be >= 1 (a codebook of size 0 cannot encode anything)")
        if code_dim < 1:
            raise ValueError(f"code_dim={code_dim} must be >= 1")
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        self.num_codes, self.code_dim, self.decay, self.dead_threshold = num_codes, code_dim, decay, dead_threshold
        self.gen = torch.Generator().manual_seed(seed)
        init = torch.rand(num_codes, code_dim, generator=self.gen) * (2 / num_codes) - 1 / num_codes
        self.codes = nn.Parameter(init)
        self.usage = torch.zeros(num_codes)
        self.opt = torch.optim.Adam([self.codes], lr=lr)

    def encode(self, flat: Tensor) -> Tensor:
        return vq_assign(flat, self.codes.detach())

    def decode(self, idx: Tensor) -> Tensor:
        return self.codes.detach()[idx.long()]

    def update(self, flat: Tensor, protected: Tensor | None = None) -> dict[str, Tensor]:
        if flat.dim() != 2 or flat.shape[1] != self.code_dim or flat.shape[0] == 0:
            raise ValueError(f"VQCodebook.update: need (N >= 1, {self.code_dim}) vectors, got {tuple(flat.shape)}")
        flat = flat.detach().to(self.codes.dtype)
        idx = self.encode(flat)
        loss = F.mse_loss(self.codes[idx], flat)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        counts = torch.bincount(idx, minlength=self.num_codes).to(self.usage.dtype)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        dead = self.usage < self.dead_threshold
        if protected is not None:
            dead &= ~protected
        dead_idx = torch.nonzero(dead).flatten()
        n = min(len(dead_idx), flat.shape[0])
        if n:
            rows = torch.randperm(flat.shape[0], generator=self.gen)[:n]
            with torch.no_grad():
                self.codes[dead_idx[:n]] = flat[rows]
            self.usage[dead_idx[:n]] = self.usage.mean()
        return {"vq_loss": loss.detach(), "perplexity": codebook_perplexity(idx, self.num_codes).float(),
                "dead_reset": torch.tensor(float(n))}

    def nbytes(self) -> int:
        return self.codes.nelement() * self.codes.element_size()

    def state_dict(self) -> dict[str, Any]:
        return {"codes": self.codes.detach(), "usage": self.usage, "gen": self.gen.get_state(),
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["codes"].shape) != (self.num_codes, self.code_dim):
            raise ValueError(f"codebook state has shape {tuple(state['codes'].shape)}, this codebook "
                             f"{(self.num_codes, self.code_dim)}")
        with torch.no_grad():
            self.codes.copy_(state["codes"])
        self.usage = state["usage"].clone()
        self.gen.set_state(state["gen"].clone())
        self.opt.load_state_dict(state["opt"])


@register("strategy", "mbc")
class MBCReplay(Strategy):
    r"""Experience replay from a memory bank compressed by an online codebook (MBC,
    Katraouras & Rafailidis, arXiv 2601.00756; code Thomkat/MBC
    ``models/modules/membank_comp.py``).

    After each step the current batch's inputs, flattened and cut into ``ceil(D / code_dim)``
    vectors of ``code_dim`` (the last one zero-padded when ``code_dim`` does not divide ``D``),
    first train the codebook (:class:`VQCodebook.update`, with dead-code reset;
    codes the bank refers to are protected), then are offered to a reservoir of
    ``mem_size`` samples as their code indices (``uint8`` for ``num_codes <= 256``). The
    replay term ``weight * L(decode(M))`` on ``batch_size`` stored samples decodes them with
    the current codebook: ``L = L_new(B) + weight \cdot L(\hat M)``.

    Logs per step: ``vq_loss``, ``perplexity`` (of the batch's codes), ``dead_reset`` (codes
    re-initialised this step), ``usage`` (fraction of the codebook the bank refers to),
    ``mem_size`` (samples), ``mem_bytes`` (indices + codebook), ``raw_bytes`` (the same
    samples uncompressed, in the input dtype) and ``compression`` (``raw_bytes / mem_bytes``);
    labels are left out of both byte counts. An empty memory adds no loss term (a no-op).
    """

    name = "mbc"

    def __init__(self, mem_size: int = 200, batch_size: int = 32, weight: float = 1.0, num_codes: int = 256,
                 code_dim: int = 4, decay: float = 0.99, dead_threshold: float = 1e-4, codebook_lr: float = 0.01,
                 seed: int = 0, loss_fn: LossFn = classification_loss):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.codebook = VQCodebook(num_codes, code_dim, decay, dead_threshold, codebook_lr, seed)
        self.buffer = ReservoirBuffer(mem_size, seed)
        self.batch_size, self.weight, self.loss_fn = batch_size, weight, loss_fn
        self.x_shape: list[int] | None = None
        self.x_dtype: torch.dtype | None = None

    def _chunks(self, x: Tensor) -> Tensor:
        """Inputs flattened, zero-padded to a multiple of ``code_dim`` and cut into ``(n * m, code_dim)``."""
        d = self.codebook.code_dim
        flat = x.reshape(len(x), -1)
        pad = -flat.shape[1] % d
        if pad:
            flat = torch.cat([flat, flat.new_zeros(len(flat), pad)], dim=1)
        return flat.reshape(-1, d)

    def decode(self, codes: Tensor) -> Tensor:
        """Stored index rows ``(n, m)`` back to inputs of the original shape (padding dropped)."""
        x = self.codebook.decode(codes).reshape(len(codes), -1)
        shape = self.x_shape or [x.shape[1]]
        x = x[:, : int(np.prod(shape))].reshape(len(codes), *shape)
        return x.to(self.x_dtype or x.dtype)

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if len(self.buffer) == 0:
            return {}
        m = self.buffer.sample(self.batch_size)
        return {"replay": self.weight * self.loss_fn(model, Batch(self.decode(m.x), m.y, m.mask))}

    def _bank_codes(self) -> Tensor:
        used = torch.zeros(self.codebook.num_codes, dtype=torch.bool)
        if len(self.buffer):
            used[self.buffer._x[: len(self.buffer)].long().flatten()] = True  # type: ignore[index]
        return used

    def after_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        if len(batch) == 0:
            return {}
        chunks = self._chunks(batch.x)
        out = self.codebook.update(chunks, protected=self._bank_codes())
        if self.x_shape is None:
            self.x_shape, self.x_dtype = list(batch.x.shape[1:]), batch.x.dtype
        idx = self.codebook.encode(chunks.to(self.codebook.codes.dtype))
        codes = idx.to(index_dtype(self.codebook.num_codes)).reshape(len(batch), -1)
        self.buffer.add(Batch(codes, batch.y, batch.mask))
        n = len(self.buffer)
        mem = n * codes.shape[1] * codes.element_size() + self.codebook.nbytes()
        raw = n * batch.x[0].nelement() * batch.x.element_size()
        out.update({"usage": self._bank_codes().float().mean(), "mem_size": torch.tensor(float(n)),
                    "mem_bytes": torch.tensor(float(mem)), "raw_bytes": torch.tensor(float(raw)),
                    "compression": torch.tensor(raw / mem)})
        return out

    def memory_report(self) -> dict[str, float]:
        """Bytes of the compressed bank (indices + codebook) against the same samples stored raw,
        the fraction of codes the bank uses and the perplexity of the bank's codes."""
        n = len(self.buffer)
        if n == 0:
            return {"mem_size": 0.0, "mem_bytes": float(self.codebook.nbytes()), "raw_bytes": 0.0, "usage": 0.0,
                    "bank_perplexity": 0.0}
        codes = self.buffer._x[:n]  # type: ignore[index]
        mem = codes.nelement() * codes.element_size() + self.codebook.nbytes()
        raw = n * int(torch.tensor(self.x_shape).prod()) * torch.empty((), dtype=self.x_dtype).element_size()
        return {"mem_size": float(n), "mem_bytes": float(mem), "raw_bytes": float(raw),
                "usage": float(self._bank_codes().float().mean()),
                "bank_perplexity": float(codebook_perplexity(codes.long(), self.codebook.num_codes))}

    def state_dict(self) -> dict[str, Any]:
        """The codebook (codes, usage EMA, generator, Adam state), the reservoir of index rows, and
        the inputs' shape and dtype (None before the first step)."""
        return {"codebook": self.codebook.state_dict(), "buffer": self.buffer.state_dict(),
                "x_shape": None if self.x_shape is None else list(self.x_shape),
                "x_dtype": None if self.x_dtype is None else str(self.x_dtype).removeprefix("torch.")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.codebook.load_state_dict(state["codebook"])
        self.buffer.load_state_dict(state["buffer"])
        self.x_shape = None if state["x_shape"] is None else list(state["x_shape"])
        self.x_dtype = None if state["x_dtype"] is None else getattr(torch, state["x_dtype"])

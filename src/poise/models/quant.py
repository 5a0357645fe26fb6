"""Fake quantisation for low-precision training studies: weights and activations of linear
layers rounded to ``b``-bit integers in the forward pass, with a straight-through estimator.

This is the simulated INT4/INT8 training of Stable-SPAM (Huang et al., *Stable-SPAM: How to Train
in 4-Bit More Stably than 16-Bit Adam*, arXiv 2502.17055, §5 "INT4 training"), following the
authors' code (TianjinYellow/StableSPAM @ 6a66da1, ``utils/act_weight_quantization.py``
``QLinear`` + ``A8Linear`` and ``utils/dummy_quant.py``; ``INT4_scripts/350-stablespam-int4.sh``):

* the tensor is flattened and cut into groups of ``g`` consecutive elements (``g = 256`` in the
  authors' run; ``group_size <= 0``: one group, i.e. per tensor);
* **weights, asymmetric min-max** (``_quantize_tensor``): with ``Q = 2^b - 1``,
  ``s = max(max(w) - min(w), 1e-5) / Q``, ``z = clamp(-round(min(w)/s), 0, Q)``,
  ``q = clamp(round(w/s) + z, 0, Q)``, ``ŵ = (q - z)·s`` (as there, the clamped zero point clips a
  group whose entries all share one sign; weight groups of 256 straddle 0 in practice);
* **activations, symmetric abs-max with outliers kept** (``fake_topk_quantize``): the ``k``
  largest-magnitude entries of each group (``k = 2``) stay in full precision, the rest use
  ``Q = 2^(b-1) - 1``, ``s = max(max|x|, 1e-6)``, ``q = clamp(round(x·Q/s), -Q-1, Q)``,
  ``x̂ = q·s/Q``;
* **straight-through estimator**: the forward pass uses ``ŵ`` and ``x̂``; the backward pass treats
  quantisation as the identity: ``∂L/∂x = ∂L/∂y · ŵ``, ``∂L/∂w = ∂L/∂yᵀ · x̂`` (exactly what the
  authors' custom autograd function computes).

The authors apply it to every linear layer of attention and MLP (``q/k/v/o/up/down/gate_proj``),
never to embeddings or the output head, in bf16 with round-to-nearest (their ``--act_stochastic``
flag is parsed but unused: ``QLinear`` overwrites the activation settings with the weight's: the
same bits, the same group size 256, no stochastic rounding). poise trains in float32 around the
rounding; weights are stored in full precision (the master copy) and rounded in every forward.

Use::

    model = GPT(GPTConfig(...))
    names = fake_quantize_linears(model, quant_spec("int4"), exclude=("head",))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QUANT_PRESETS", "FakeQuantLinear", "QuantSpec", "fake_quantize", "fake_quantize_linears",
           "quant_spec", "quantize_dequantize"]


def _groups(x: torch.Tensor, group_size: int, pad_value: str) -> tuple[torch.Tensor, int]:
    """``x`` flattened into rows of ``group_size`` (one row when ``group_size <= 0`` or it exceeds
    the size); a last partial group is padded (zeros or its own last element, neither changes its
    abs-max or min/max) and the pad length returned."""
    flat = x.reshape(-1)
    n = flat.numel()
    if group_size <= 0 or group_size >= n:
        return flat.reshape(1, n), 0
    pad = (-n) % group_size
    if pad:
        fill = torch.zeros(pad, dtype=flat.dtype, device=flat.device) if pad_value == "zero" \
            else flat[-1:].expand(pad)
        flat = torch.cat([flat, fill])
    return flat.reshape(-1, group_size), pad


def quantize_dequantize(x: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                        topk: int = 0) -> torch.Tensor:
    """``x`` rounded to ``bits``-bit integers per group and mapped back to floats (no gradient
    trick; see :func:`fake_quantize`). ``symmetric``: abs-max scaling to ``[-2^(b-1), 2^(b-1)-1]``
    with the ``topk`` largest-magnitude entries of each group kept exactly; else min-max scaling
    to ``[0, 2^b - 1]`` with a zero point (``topk`` must be 0). Formulas in the module doc.

    Example (4 bits, symmetric, one group): ``[1, -0.5, 0.3, 0]`` → ``Q = 7``, ``s = 1``,
    ``round([7, -3.5, 2.1, 0]) = [7, -4, 2, 0]`` → ``[1, -4/7, 2/7, 0]``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} must be an integer in [2, 16]")
    if topk < 0 or (topk and not symmetric):
        raise ValueError(f"topk={topk} must be >= 0, and 0 for asymmetric quantisation")
    if x.numel() == 0:
        return x.clone()
    dtype = x.dtype
    g, pad = _groups(x.detach().float(), group_size, "zero" if symmetric else "edge")
    if topk >= g.shape[1]:
        raise ValueError(f"topk={topk} must be smaller than the group size {g.shape[1]}")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        body = g.clone()
        if topk:
            idx = g.abs().topk(topk, dim=1).indices
            body.scatter_(1, idx, 0.0)
        scale = body.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
        out = (body * (qmax / scale)).round().clamp(-qmax - 1, qmax) * (scale / qmax)
        if topk:
            out.scatter_(1, idx, g.gather(1, idx))
    else:
        qmax = 2**bits - 1
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-5) / qmax
        zero = (-(lo / scale).round()).clamp(0, qmax)
        out = ((g / scale).round() + zero).clamp(0, qmax).sub(zero).mul(scale)
    out = out.reshape(-1)
    if pad:
        out = out[:-pad]
    return out.reshape(x.shape).to(dtype)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = True,
                  topk: int = 0) -> torch.Tensor:
    """:func:`quantize_dequantize` in the forward pass, the identity in the backward pass
    (straight-through estimator): ``x + (q(x) - x).detach()``."""
    return x + (quantize_dequantize(x, bits, group_size, symmetric, topk) - x).detach()


@dataclass(frozen=True)
class QuantSpec:
    """How :class:`FakeQuantLinear` rounds. Defaults are the authors' INT4 run (module doc)."""

    weight_bits: int = 4
    act_bits: int = 4
    weight_group_size: int = 256
    act_group_size: int = 256
    weight_symmetric: bool = False
    act_symmetric: bool = True
    act_topk: int = 2

    def __post_init__(self) -> None:
        for key in ("weight_bits", "act_bits"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ValueError(f"{key}={v!r} must be an integer in [2, 16]")
        if self.act_topk < 0 or (self.act_topk and not self.act_symmetric):
            raise ValueError(f"act_topk={self.act_topk} must be >= 0, and 0 when act_symmetric is False")
        if 0 < self.act_group_size <= self.act_topk:
            raise ValueError(f"act_topk={self.act_topk} must be smaller than act_group_size={self.act_group_size}")


QUANT_PRESETS: dict[str, QuantSpec | None] = {
    "none": None,
    "int8": QuantSpec(weight_bits=8, act_bits=8),
    "int4": QuantSpec(weight_bits=4, act_bits=4),
}


def quant_spec(name: str, group_size: int | None = None) -> QuantSpec | None:
    """The preset ``name`` (``none``: ``None``, full precision; ``int8``, ``int4``: the authors'
    scheme at that width), with both group sizes set to ``group_size`` when given."""
    if name not in QUANT_PRESETS:
        raise ValueError(f"unknown quantisation {name!r}; valid choices: {', '.join(QUANT_PRESETS)}")
    spec = QUANT_PRESETS[name]
    if spec is not None and group_size is not None:
        spec = QuantSpec(spec.weight_bits, spec.act_bits, group_size, group_size, spec.weight_symmetric,
                         spec.act_symmetric, spec.act_topk)
    return spec


class FakeQuantLinear(nn.Linear):
    """``y = x̂ ŵᵀ + b`` with ``x̂``, ``ŵ`` fake-quantised by ``spec`` (straight-through
    gradients); the bias stays in full precision, as in the authors' ``QLinear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, spec: QuantSpec | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.spec = spec or QuantSpec()

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> FakeQuantLinear:
        """A fake-quant layer that shares ``linear``'s parameter objects (an optimizer built
        before the swap keeps working; the random generator is not touched)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        w = fake_quantize(self.weight, s.weight_bits, s.weight_group_size, s.weight_symmetric)
        xq = fake_quantize(x, s.act_bits, s.act_group_size, s.act_symmetric, s.act_topk)
        return F.linear(xq, w, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{super().extra_repr()}, w{s.weight_bits}/a{s.act_bits}, groups {s.weight_group_size}/"
                f"{s.act_group_size}, act_topk={s.act_topk}")


def fake_quantize_linears(model: nn.Module, spec: QuantSpec, exclude: Sequence[str] = ()) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`FakeQuantLinear` sharing its
    parameters, except those whose qualified name contains one of ``exclude`` (the authors
    quantise attention and MLP layers, not the output head). Returns the replaced names."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}; see quant_spec(name)")
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(e in full for e in exclude):
                setattr(module, child_name, FakeQuantLinear.from_linear(child, spec))
                swapped.append(full)
    return swapped

"""Helpers for the strategies' ``state_dict`` / ``load_state_dict``: every state is a plain
dict of tensors and Python scalars/lists, loadable with ``torch.load(weights_only=True)``;
random generators are stored as tensors."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poise.continual._base import Batch

__all__ = ["batch_from_state", "batch_state", "clone_tree", "load_np_rng", "np_rng_state"]


def _int_tensor(v: int) -> Tensor:
    return torch.tensor(list(int(v).to_bytes(16, "little")), dtype=torch.uint8)


def _tensor_int(t: Tensor) -> int:
    return int.from_bytes(bytes(t.tolist()), "little")


def np_rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A numpy ``PCG64`` generator's state with its two 128-bit integers as 16-byte uint8 tensors."""
    s = rng.bit_generator.state
    if s["bit_generator"] != "PCG64":
        raise ValueError(f"cannot store a {s['bit_generator']!r} generator; valid choices: 'PCG64' "
                         "(numpy.random.default_rng)")
    return {"bit_generator": "PCG64", "state": _int_tensor(s["state"]["state"]),
            "inc": _int_tensor(s["state"]["inc"]), "has_uint32": int(s["has_uint32"]),
            "uinteger": int(s["uinteger"])}


def load_np_rng(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    """Set ``rng`` to what :func:`np_rng_state` returned."""
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"generator state of kind {state.get('bit_generator')!r}; valid choices: 'PCG64'")
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": _tensor_int(state["state"]), "inc": _tensor_int(state["inc"])},
        "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"]),
    }


def clone_tree(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor detached and cloned (so loading a
    state never aliases the caller's tensors). A module ``state_dict`` stays an ``OrderedDict``
    with its ``_metadata`` (the module versions ``load_state_dict`` reads)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((k, clone_tree(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


def batch_state(b: Batch) -> dict[str, Tensor | None]:
    return {"x": b.x, "y": b.y, "mask": b.mask}


def batch_from_state(d: Mapping[str, Any]) -> Batch:
    return Batch(d["x"].clone(), d["y"].clone(), None if d["mask"] is None else d["mask"].clone())

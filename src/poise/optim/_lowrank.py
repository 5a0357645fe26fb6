"""What the low-rank optimizers (GaLore, Q-GaLore) share: declared group keys, projected groups
built from a model, and the refusal to run as plain AdamW."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from poise.optim import _check
from poise.optim._adapter import TransformOptimizer
from poise.transforms._lowrank import PROJ_TYPES

__all__ = ["LowRankOptimizer", "low_rank_groups"]


def _tensor(p: Any) -> Tensor:
    """A group's entry: a tensor, or a ``(name, tensor)`` pair (torch's named parameters)."""
    return p[1] if isinstance(p, tuple) else p


def _projectable(p: Any) -> bool:
    return _tensor(p).dim() >= 2 and _tensor(p).numel() > 0  # a zero-size matrix has nothing to project


class LowRankOptimizer(TransformOptimizer):
    """Base of the optimizers whose projected parameters are those of groups with ``rank``.

    ``group_keys``: the group keys the class reads, with their defaults (``rank=None``: the
    group is not projected). A subclass's constructor takes each of them as a keyword argument
    whose default is the same value, and passes them to :meth:`_init_low_rank` before
    ``TransformOptimizer.__init__``. They are then defaults, in the torch.optim sense, for
    every projected group:

    * a group that sets ``rank`` (not None) gets the other keys it lacks, then is checked
      (``rank`` and ``update_proj_gap`` positive integers, ``proj_type`` a valid choice);
    * with ``rank=<r>`` given to the constructor, a group without a ``rank`` key is split: its
      tensors of 2 or more dims form a projected group with rank ``r`` (and the group's other
      settings, e.g. Hugging Face's weight decay), the rest stay a plain group. This is what
      makes ``transformers.Trainer(optimizer_cls_and_kwargs=(GaLoreAdamW, {"rank": 8}))``
      project. A group with ``"rank": None`` is never projected;
    * :meth:`add_param_group` does the same for a group added later.

    A construction that ends with no projected tensor raises ``ValueError`` (it would run as
    plain AdamW), unless ``allow_unprojected=True``, which warns instead.
    """

    group_keys: ClassVar[dict[str, Any]] = {"rank": None, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}

    def _init_low_rank(self, given: dict[str, Any]) -> None:
        unknown = [k for k in given if k not in self.group_keys]
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown group key {unknown[0]!r}; "
                            f"valid: {', '.join(self.group_keys)}")
        self.low_rank_defaults = {**self.group_keys, **given}
        if self.low_rank_defaults["rank"] is not None:
            _check.positive_int("rank", self.low_rank_defaults["rank"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, with the group keys defaulted and checked (a group
        without ``rank`` is split into a projected and a plain group when the constructor was
        given ``rank``; see the class docstring)."""
        for piece in self._split(param_group):
            self._check_group(piece, len(self.param_groups))
            super().add_param_group(piece)

    def _split(self, group: dict[str, Any]) -> list[dict[str, Any]]:
        if not isinstance(group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(group).__name__}")
        rank = self.low_rank_defaults["rank"]
        if "rank" in group or rank is None:
            return [group]
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        mats = [i for i, p in enumerate(params) if _projectable(p)]
        if not mats:
            return [{**group, "params": params}]
        rest = [i for i in range(len(params)) if i not in set(mats)]
        names = group.get("param_names")
        out = []
        for idx, extra in ((mats, {"rank": rank}), (rest, {})):
            if not idx:
                continue
            piece = {**group, "params": [params[i] for i in idx], **extra}
            if names is not None:
                piece["param_names"] = [names[i] for i in idx]
            out.append(piece)
        return out

    def _check_group(self, g: dict[str, Any], i: int) -> None:
        if g.get("rank") is None:
            return
        for k, v in self.low_rank_defaults.items():
            g.setdefault(k, v)
        self._validate_group(g, f"param_groups[{i}]")

    def _validate_group(self, g: dict[str, Any], where: str) -> None:
        _check.positive_int(f"{where}.rank", g["rank"])
        _check.positive_int(f"{where}.update_proj_gap", g["update_proj_gap"])
        if g["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{where}.proj_type={g['proj_type']!r}; valid choices: {', '.join(PROJ_TYPES)}")

    def _refuse_unprojected(self, allow_unprojected: bool) -> None:
        if any(s["projected_tensors"] for s in self.projected_summary()):
            return
        name = type(self).__name__
        msg = (f"{name}: no parameter is projected (no param group sets 'rank' on a tensor of 2 or more dims), so "
               f"it would run as plain AdamW. Pass rank=<r> to {name}(...) to project every matrix, build the groups "
               f"with poise.optim.low_rank_groups(model, rank=<r>), or give a group {{'params': [...], 'rank': r}}; "
               f"allow_unprojected=True runs it unprojected with a warning")
        if not allow_unprojected:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)

    def projected_summary(self) -> list[dict[str, Any]]:
        """Which parameters are projected, per param group (JSON-ready, for a study's config):
        ``group`` (index), ``rank`` (None: plain AdamW), ``tensors`` and ``numel`` of the group,
        ``projected_tensors``, ``projected_numel`` and ``projected_shapes`` (tensors of 2 or more
        dims in a group with a rank), the group's other group keys when it is projected, and
        ``projected_names`` when the group carries ``param_names``."""
        out = []
        for i, g in enumerate(self.param_groups):
            rank = g.get("rank")
            proj = [j for j, p in enumerate(g["params"]) if rank is not None and _projectable(p)]
            d: dict[str, Any] = {
                "group": i, "rank": rank, "tensors": len(g["params"]),
                "numel": int(sum(p.numel() for p in g["params"])), "projected_tensors": len(proj),
                "projected_numel": int(sum(g["params"][j].numel() for j in proj)),
                "projected_shapes": [list(g["params"][j].shape) for j in proj]}
            if rank is not None:
                d.update({k: g[k] for k in self.group_keys if k != "rank" and k in g})
            if "param_names" in g:
                d["projected_names"] = [g["param_names"][j] for j in proj]
            out.append(d)
        return out


# every group key a poise low-rank optimizer declares (QGaLoreAdamW's are a superset of GaLoreAdamW's)
def _known_group_keys() -> list[str]:
    from poise.optim.qgalore import QGaLoreAdamW

    return list(QGaLoreAdamW.group_keys)


def _matches(target: str | Sequence[str], name: str) -> bool:
    """Hugging Face's ``optim_target_modules`` rule: a string is a regex matched against the whole
    module name; a list matches a name equal to an entry, containing one, or fully matching one
    as a regex."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(t in name for t in target) or any(re.fullmatch(t, name) for t in target)


def low_rank_groups(model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]], rank: int, *,
                    target: str | Sequence[str] | None = None, min_dim: int = 0, names: bool = True,
                    **group_keys: Any) -> list[dict[str, Any]]:
    """Param groups for :class:`~poise.optim.GaLoreAdamW` / :class:`~poise.optim.QGaLoreAdamW`:
    a projected group (``rank`` and ``group_keys``) and a plain group with everything else.

    Which tensors are projected, and why: GaLore (arXiv 2403.03507) projects the gradients of
    the *weight matrices of linear layers*, where the memory is and where gradients are close to
    low rank; it leaves biases and norm gains (1-D: nothing to project) and embeddings (a row
    per token, updated sparsely; the authors' and Hugging Face's recipes leave them out) to
    plain AdamW. So, from a module:

    * ``target=None``: every trainable 2-D parameter except those of ``nn.Embedding`` /
      ``nn.EmbeddingBag`` modules (a weight tied to an embedding, such as a tied LM head, is an
      embedding);
    * ``target``: the 2-D parameters of the modules whose names match, with Hugging Face's
      ``optim_target_modules`` rule (a string is a regex for the whole module name; a list
      matches a name equal to, containing, or fully matching an entry), embeddings included
      if they match; no matching module raises ``ValueError``;
    * ``min_dim``: leave out matrices whose smaller side is below it (e.g. ``rank + 1``: a
      projection to rank ``r`` does not shrink a matrix with a side ``<= r``).

    From ``(name, tensor)`` pairs (``model.named_parameters()``) there are no modules: every
    2-D tensor is a candidate and ``target`` matches the parameter names. ``group_keys`` are the
    low-rank keys (``update_proj_gap``, ``scale``, ``proj_type``, Q-GaLore's ``proj_bits``, ...);
    an unknown one raises. ``names=True`` puts ``param_names`` in both groups (torch then
    requires every group added later to have names too). Raises ``ValueError`` when nothing
    would be projected.

    >>> opt = GaLoreAdamW(low_rank_groups(model, rank=128, update_proj_gap=200, scale=0.25), lr=1e-3)
    """
    _check.positive_int("rank", rank)
    known = _known_group_keys()
    for k in group_keys:
        if k not in known or k == "rank":
            valid = ", ".join(x for x in known if x != "rank")
            raise ValueError(f"low_rank_groups: unknown group key {k!r}; valid: {valid}")
    entries: list[tuple[str, Tensor, str]] = []  # (parameter name, tensor, name that target matches)
    embedded: set[int] = set()
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        owner: dict[int, str] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for _, p in mod.named_parameters(recurse=False):
                owner.setdefault(id(p), mname)
                if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
                    embedded.add(id(p))
        entries = [(n, p, owner.get(id(p), n)) for n, p in model.named_parameters()]
    else:
        for item in model_or_named_params:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
                raise TypeError("low_rank_groups takes an nn.Module or (name, tensor) pairs "
                                f"(model.named_parameters()), got an item {type(item).__name__}")
            entries.append((item[0], item[1], item[0]))
    entries = [e for e in entries if e[1].requires_grad]
    if target is not None and not any(_matches(target, m) for _, _, m in entries):
        some = sorted({m for _, _, m in entries})[:8]
        raise ValueError(f"low_rank_groups: target={target!r} matches no module; module names include: "
                         f"{', '.join(some)}")

    def projected(p: Tensor, m: str) -> bool:
        if p.dim() != 2 or min(p.shape) < min_dim:
            return False
        return _matches(target, m) if target is not None else id(p) not in embedded

    proj = [(n, p) for n, p, m in entries if projected(p, m)]
    rest = [(n, p) for n, p, m in entries if not projected(p, m)]
    if not proj:
        raise ValueError("low_rank_groups: no 2-D parameter to project (target="
                         f"{target!r}, min_dim={min_dim}); the optimizer would run as plain AdamW")
    groups: list[dict[str, Any]] = []
    for part, extra in ((proj, {"rank": rank, **group_keys}), (rest, {})):
        if not part:
            continue
        g: dict[str, Any] = {"params": [p for _, p in part], **extra}
        if names:
            g["param_names"] = [n for n, _ in part]
        groups.append(g)
    return groups

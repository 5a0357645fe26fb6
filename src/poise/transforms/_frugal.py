"""FRUGAL: a state-full optimizer on a subspace, a state-free one on the rest."""

from __future__ import annotations

import torch
from torch import Tensor

from poise.transforms._base import SHARED, Hyper, State, Transform, Updates, declare, merge_reads, scoped

__all__ = ["MODES", "RULES", "split_frugal"]

MODES = ("block", "rows")
RULES = ("sign_sgd", "sgd", "no")


def split_frugal(inner: Transform) -> Transform:
    r"""FRUGAL's gradient splitting (Zmushko et al., "FRUGAL: Memory-Efficient Optimization by
    Reducing State Overhead for Scalable Training", arXiv 2411.07837; code
    philip-zmushko/FRUGAL ``frugal/proj_optimizer_templates.py``).

    Every ``update_gap`` steps (of the group's first parameter, as the authors decide) a
    subspace is drawn; ``inner`` (a state-full transform such as Adam) updates the gradient's
    component in it, and the rest gets a state-free rule, each with its own scale:

    ``u = proj_params_lr_scale * P^T inner(P g) + inactive_lr_scale * rule(g - P^T P g)``

    with ``rule`` = ``sign`` (``"sign_sgd"``), identity (``"sgd"``) or zero (``"no"``) from
    ``hyper["inactive_update_rule"]``. ``hyper["mode"]``:

    * ``"block"``: ``round(density * #tensors)`` whole tensors of the group are active
      (random order); inactive tensors' ``inner`` state is freed;
    * ``"rows"``: in each matrix ``int(density * rows)`` random rows are active (1-D tensors
      are fully active); ``inner``'s state has that many rows.

    With ``reset_statistics`` the ``inner`` state is dropped and the step restarts at each
    new subspace. The draw uses a generator seeded by ``hyper["seed"]`` and the draw index,
    so every process of a distributed run draws the same subspace; it covers the tensors that have
    a gradient at that step, and a tensor whose first gradient comes between two draws takes the
    state-free rule until the next one. State per tensor: ``active`` (1.0/0.0) and, in row mode,
    ``rows`` (the active row indices).
    """

    def draw(states: list[State], params: list[Tensor], hyper: Hyper, k: int) -> None:
        mode, rho = hyper["mode"], hyper["density"]
        g = torch.Generator().manual_seed(int(hyper.get("seed", 0)) * 1_000_003 + k)
        if mode == "block":
            n_active = round(rho * len(params))
            order = torch.randperm(len(params), generator=g).tolist()
            chosen = set(order[:n_active])
            for j, s in enumerate(states):
                s["active"] = torch.tensor(float(j in chosen))
        else:
            for p, s in zip(params, states, strict=True):
                s["active"] = torch.tensor(1.0)
                if p.dim() >= 2:
                    rows = p.shape[0]
                    s["rows"] = torch.randperm(rows, generator=g)[: max(1, int(rho * rows))].sort().values

    def clear(s: State) -> None:
        for key in [key for key in s if key not in SHARED]:
            del s[key]

    def update(updates: Updates, states: list[State], params: list[Tensor], hyper: Hyper) -> Updates:
        mode, rule = hyper["mode"], hyper["inactive_update_rule"]
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid choices: {', '.join(MODES)}")
        if rule not in RULES:
            raise ValueError(f"inactive_update_rule={rule!r}; valid choices: {', '.join(RULES)}")
        live = [i for i, u in enumerate(updates) if u is not None]
        if not live:
            return updates
        first = states[live[0]]
        c = int(first["clock"]) - 1
        inner_states = scoped(states, "inner.")
        if "active" not in first or c % hyper["update_gap"] == 0:
            draw([states[i] for i in live], [params[i] for i in live], hyper, c // hyper["update_gap"])
            for i in live:
                if hyper.get("reset_statistics", True) or not float(states[i]["active"]):
                    clear(inner_states[i])
                    if hyper.get("reset_statistics", True):
                        states[i]["step"].fill_(1)
        for i in live:  # first gradient between two draws: the state-free rule until the next draw
            if "active" not in states[i]:
                states[i]["active"] = torch.tensor(0.0)
        a_scale, i_scale = hyper["proj_params_lr_scale"], hyper["inactive_lr_scale"]

        def inactive(r: Tensor) -> Tensor:
            if rule == "sign_sgd":
                return r.sign().mul_(i_scale)
            if rule == "sgd":
                return r * i_scale
            return torch.zeros_like(r)

        sub: Updates = [None] * len(updates)
        for i in live:
            u, s = updates[i], states[i]
            if not float(s["active"]):
                continue
            sub[i] = u[s["rows"]] if "rows" in s else u
        res = inner.update(sub, inner_states, params, hyper)
        out: Updates = list(updates)
        for i in live:
            u, s = updates[i], states[i]
            if not float(s["active"]):
                out[i] = inactive(u)
            elif "rows" in s:
                full = inactive(u)
                full[s["rows"]] = res[i] * a_scale
                out[i] = full
            else:
                out[i] = res[i] * a_scale
        return out

    own = declare(
        "frugal", mode=("block", "FRUGAL subspace kind"), density=(0.25, "FRUGAL share of the state-full subspace"),
        update_gap=(200, "FRUGAL subspace redraw interval"),
        inactive_update_rule=("sign_sgd", "FRUGAL state-free rule"),
        proj_params_lr_scale=(1.0, "FRUGAL scale of the state-full part"),
        inactive_lr_scale=(1.0, "FRUGAL scale of the state-free part"),
        reset_statistics=(True, "FRUGAL: drop the inner state at each redraw"),
        seed=(0, "seed of the subspace draws"))
    return Transform(lambda p, h: {}, update, "frugal", reads=merge_reads(inner.reads, own))

"""The torch.optim adapter: any transform chain as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from poise.transforms._base import Transform, compiling, fill_hyper, init_state, missing_hyper, tick

__all__ = ["COMPLEX_DTYPES", "FLOAT_DTYPES", "NONFINITE_POLICIES", "ConsecutiveSkipsError", "NonFiniteGradientError",
           "TransformOptimizer"]

NONFINITE_POLICIES = ("raise", "skip", "ignore", "raise_async")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
# gradients up to this many entries are checked for NaN/Inf by one multi-tensor call on CPU; larger
# ones by a parallel sum each (see TransformOptimizer._screen_finite)
_SERIAL_CHECK_MAX = 1 << 17  # the crossover measured on 2 cores (benchmarks/suite.py)
_FLOAT_SET = frozenset(FLOAT_DTYPES)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _real(t: Tensor) -> Tensor:
    """A complex tensor as pairs of reals (``torch.view_as_real``, sharing storage), as torch.optim steps them."""
    return torch.view_as_real(t) if t.is_complex() else t


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _view(t: Tensor, shard_safe: bool) -> Tensor:
    """A DTensor's local shard (shard-safe optimizers) or its gathered whole tensor."""
    if not _is_dtensor(t):
        return t
    return t.to_local() if shard_safe else t.full_tensor()


def _local_shard(full: Tensor, like: Tensor) -> Tensor:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements).to_local()


class NonFiniteGradientError(FloatingPointError):
    """A NaN or Inf gradient reached the optimizer under ``nonfinite="raise"``."""


class ConsecutiveSkipsError(NonFiniteGradientError):
    """The update guard gave up: ``max_consecutive_skips`` non-finite steps in a row under
    ``nonfinite="skip"``. A study stops on it (``poise run`` exits 3) instead of recording the run
    as diverged: the user asked for the guard."""


class TransformOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that applies a :class:`~poise.transforms.Transform`.

    Param groups, ``state_dict``/``load_state_dict``, closures, LR schedulers (``lr`` read
    from the group at every step; a float or a 0-d tensor) work as in torch.optim. Per
    parameter the state holds the shared ``step``/``clock`` counters and the transforms'
    tensors under their names (``"adam.exp_avg"``), nothing else, so checkpoints load with
    ``torch.load(weights_only=True)``. ``load_state_dict`` keeps every state tensor's saved
    dtype (torch.optim casts floating state to the parameter's dtype, which would downcast
    float32 state kept for bfloat16 parameters).

    ``nonfinite`` decides what a NaN/Inf gradient does: ``"raise"`` (default) raises
    :class:`NonFiniteGradientError` naming the parameter before any state changes; ``"skip"``
    skips the whole step (no state or parameter changes) and counts it in
    ``self.skipped_steps``, and after ``max_consecutive_skips`` skips in a row raises
    :class:`NonFiniteGradientError` naming the parameters and the step (None: never);
    ``"ignore"`` checks nothing (fastest; a NaN then spreads into the
    state). The check reads every gradient once (small ones in one multi-tensor call, torch's
    AMP finiteness check at a scale of exactly 1, which writes each entry back unchanged) and
    syncs the host once per step.
    ``"raise_async"`` checks without a host sync: each step records a device-side flag per
    gradient (its ``aminmax`` is finite: exact, one read of the gradient; on CUDA copied to pinned
    host memory behind an event) and the *next* ``step()`` (or :meth:`check_nonfinite`,
    or ``state_dict()``) reads it and raises :class:`NonFiniteGradientError` naming the
    parameters and the step, before changing anything. The step that saw the NaN has then been
    applied: parameters and state may hold NaN, so restore a checkpoint (see
    docs/algorithms/nonfinite.md).

    Under ``torch.compile`` (a compiled ``opt.step`` or training step) the stages run their
    branch-free tensor paths (:func:`poise.transforms.compiling`) and ``"raise"`` becomes a
    device-side assertion (``torch._assert_async``, no host sync, no graph break): a NaN/Inf
    gradient raises ``RuntimeError("non-finite gradient ...")`` when the graph runs, before any
    update on CPU (on CUDA, as any device-side assertion, it leaves the CUDA context unusable). ``"skip"``
    needs the host sync and costs one graph break per step there; ``"ignore"`` costs nothing.

    Hyperparameters: every group (at construction, in :meth:`add_param_group` and after
    :meth:`load_state_dict`) is completed with ``defaults`` and then with the defaults the
    transform declares (``transform.reads``); a key the transform requires that neither the
    group nor ``defaults`` sets raises ``ValueError("stage 'clip_global_norm' reads hyper
    'max_norm': add it to defaults or the param group")`` at construction, not at the first
    ``step()``.

    Parameter dtypes: a subclass lists those it steps in ``param_dtypes`` (default
    :data:`FLOAT_DTYPES`: float16, bfloat16, float32, float64). A parameter of any other dtype
    (complex, integer, bool, float8) is refused with ``TypeError`` at construction and in
    :meth:`add_param_group`, naming the parameter (``param_groups[0].params[1]``, and its name
    when the group has ``param_names``) and its dtype. A class that lists :data:`COMPLEX_DTYPES`
    steps a complex parameter as pairs of reals (``torch.view_as_real`` of the parameter, its
    gradient and so its state), as torch.optim does; only an elementwise chain gives the same
    update as torch that way, so only such classes may list them (:class:`~poise.optim.AdamW`
    does, tested equal to ``torch.optim.AdamW``). Zero-size parameters are accepted and left
    alone: a step gives them no state and no update.

    ``diagnostics=True`` fills ``self.last_diagnostics`` after each step with 0-d tensors
    (no ``.item()``, no host sync): ``update_ratio`` (``||p_new - p_old|| / ||p_old||`` over
    all parameters; costs a copy of the parameters per step), ``clipped_frac`` (mean over
    tensors of the fraction of entries a clipping stage changed), ``spike_tensors`` (tensors
    with at least one clipped entry), ``resets`` and ``refreshes`` (tensors whose moments
    were reset / whose projection or preconditioner bases were recomputed this step).
    """

    shard_safe = False  # subclasses whose every stage is elementwise say True (see poise.distributed)
    param_dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES  # others are refused (see the class docstring)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], transform: Transform,
                 nonfinite: str = "raise", diagnostics: bool = False, max_consecutive_skips: int | None = None):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}; valid choices: {', '.join(NONFINITE_POLICIES)}")
        defaults = dict(defaults)
        lr = defaults.get("lr")
        if lr is not None and not isinstance(lr, Tensor) and lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        self.transform = transform  # before the groups are added: add_param_group reads its declared keys
        super().__init__(params, defaults)
        self.nonfinite = nonfinite
        self._pending: tuple[Tensor, Any, list[Tensor], int] | None = None  # raise_async: last step's flags
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.steps_called = 0
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips} must be >= 1 or None")
        self.max_consecutive_skips = max_consecutive_skips
        self.diagnostics = diagnostics
        self.last_diagnostics: dict[str, Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        """torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``;
        a poise optimizer also needs its transform and policies (``copy.deepcopy`` of it failed). The
        counter bank and the check's buffers are caches, rebuilt at the next step."""
        out = dict(super().__getstate__())
        out.update({k: v for k, v in self.__dict__.items() if k not in out and k not in ("_banks", "_amp_check")})
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then the transform's declared defaults are filled in;
        a required key missing from the group and the defaults raises ``ValueError``, a
        parameter whose dtype is not in ``param_dtypes`` raises ``TypeError`` (and the group is
        not added)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        self._check_dtypes(param_group)
        missing = missing_hyper(self.transform, param_group, self.defaults)
        if missing:
            raise ValueError("; ".join(missing))
        super().add_param_group(param_group)
        fill_hyper(self.transform, self.param_groups[-1])

    def _check_dtypes(self, param_group: dict[str, Any]) -> None:
        """Refuse a parameter whose dtype this optimizer does not step, naming it and its dtype."""
        params = param_group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif params is None or isinstance(params, (set, str)):
            return  # torch's add_param_group raises its own error for these
        else:
            params = list(params)
        param_group["params"] = params  # an iterator is read once; torch does the same
        names = param_group.get("param_names")
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if not isinstance(p, Tensor) or p.dtype in self.param_dtypes:
                continue
            if name is None and isinstance(names, (list, tuple)) and i < len(names):
                name = names[i]
            where = f"param_groups[{len(self.param_groups)}].params[{i}]" + (f" ({name!r})" if name else "")
            kind = ("complex" if p.is_complex() else "bool" if p.dtype == torch.bool
                    else "floating-point" if p.is_floating_point() else "integer")
            hint = {"complex": "; keep a real parameter and build the complex tensor from it in forward "
                               "(torch.view_as_complex), or use an optimizer that lists complex dtypes "
                               "(poise.optim.AdamW steps them as torch.optim.AdamW does)",
                    "integer": "; integer tensors have no gradient to follow: freeze them or leave them out "
                               "(requires_grad=False buffers)",
                    "bool": "; bool tensors have no gradient to follow: freeze them or leave them out"}.get(kind, "")
            label = _dtype_name(p.dtype) + ("" if kind == _dtype_name(p.dtype) else f" ({kind})")
            raise TypeError(f"{type(self).__name__}: {where} has dtype {label}, which it "
                            f"does not support; supported: {', '.join(map(_dtype_name, self.param_dtypes))}{hint}")

    @staticmethod
    def _stepped(group: dict[str, Any]) -> list[Tensor]:
        """The group's parameters a step updates: those with a gradient and at least one entry."""
        return [p for p in group["params"] if p.grad is not None and p.numel() > 0]

    def _names(self) -> dict[int, str]:
        out = {}
        for gi, g in enumerate(self.param_groups):
            names = g.get("param_names")
            for pi, p in enumerate(g["params"]):
                out[id(p)] = names[pi] if names else f"param_groups[{gi}].params[{pi}]"
        return out

    def _assert_finite(self) -> None:
        """The ``"raise"`` check without a host sync (the torch.compile path)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(_is_dtensor(g) for g in grads):
            self._finite()  # every rank must agree: the eager check (raises on a non-finite gradient)
        elif grads:
            ok = torch.stack([torch.isfinite(g).all() for g in grads]).all()  # exact: no false alarm on overflow
            torch._assert_async(ok, "non-finite gradient (nonfinite='raise' under torch.compile); use "
                                    "nonfinite='skip' to skip such steps, or fix the loss")

    def _finite(self) -> bool:
        grads = [_view(p.grad, True) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        if any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):  # every rank must agree
            import torch.distributed as dist

            flag = torch.stack([torch.logical_not(torch.isfinite(g)).any() for g in grads]).float()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if not bool(flag.any()):
                return True
            return self._nonfinite_found(flag.bool())
        if self._screen_finite(grads):
            return True
        bad = torch.stack([torch.logical_not(torch.isfinite(g)).any() for g in grads])
        if not bool(bad.any()):
            return True
        return self._nonfinite_found(bad)

    def _screen_finite(self, grads: list[Tensor]) -> bool:
        """True when no gradient holds a NaN or Inf (False may be a false alarm, cleared by the
        exact per-tensor check that follows it). Small contiguous CPU gradients (all contiguous
        ones on an accelerator) are checked by one multi-tensor call, torch's AMP check
        (``_amp_foreach_non_finite_check_and_unscale_`` with a scale of exactly 1, which writes
        every entry back unchanged: ``x * 1 == x`` bit for bit): one dispatch instead of one per
        tensor. Larger CPU gradients are summed, one read each on every core (the AMP kernel is
        serial on CPU): a NaN or Inf anywhere makes the sum non-finite, and a sum that overflows
        on finite values is a false alarm."""
        batched: dict[torch.device, list[Tensor]] = {}
        summed: list[Tensor] = []
        for g in grads:
            n = g.numel()
            if g.dtype in _FLOAT_SET and 0 < n and (n <= _SERIAL_CHECK_MAX or not g.is_cpu) and g.is_contiguous():
                batched.setdefault(g.device, []).append(g)
            else:
                summed.append(g)
        bufs = self.__dict__.setdefault("_amp_check", {})
        for dev, gs in batched.items():
            if dev not in bufs:
                bufs[dev] = (torch.zeros(1, device=dev), torch.ones(1, device=dev))
            found, one = bufs[dev]
            found.zero_()
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(gs, found, one)
            except RuntimeError:  # a gradient it cannot write (an inference tensor, a shared view): sum it
                summed.extend(gs)
                continue
            if bool(found):
                return False
        return not summed or bool(torch.isfinite(torch.stack([g.sum() for g in summed])).all())

    def _record_nonfinite(self) -> None:
        """``"raise_async"``: this step's per-gradient flags on the device, no host sync; CUDA
        flags are copied to pinned host memory behind an event, read by the next step."""
        flat = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not flat:
            return
        if any(_is_dtensor(p.grad) for p in flat) or len({p.grad.device for p in flat}) > 1:
            self._finite()  # every rank (device) must agree: the synchronous check
            return
        # min and max of g are finite exactly when every entry is (NaN propagates; unlike a sum they cannot
        # overflow); aminmax is one read of g (torch._foreach_norm(ord=inf) and isfinite().all() are ~50x
        # slower on CPU)
        extremes = [torch.stack(torch.aminmax(p.grad)) for p in flat]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, e in enumerate(extremes):
            by_dtype.setdefault(e.dtype, []).append(i)
        if len(by_dtype) == 1:
            bad = torch.logical_not(torch.isfinite(torch.stack(extremes)).all(dim=1))
        else:
            bad = torch.empty(len(extremes), dtype=torch.bool, device=extremes[0].device)
            for idx in by_dtype.values():
                bad[idx] = torch.logical_not(torch.isfinite(torch.stack([extremes[i] for i in idx])).all(dim=1))
        event = None
        if bad.device.type == "cuda":
            host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            bad = host
        self._pending = (bad, event, flat, self.steps_called)

    def check_nonfinite(self) -> None:
        """Act now on the flags ``nonfinite="raise_async"`` recorded at the last step: raise
        :class:`NonFiniteGradientError` naming the parameters with a NaN/Inf gradient and that
        step. Waits only for that step's check (a CUDA event), not for the work queued since.
        Call it at the end of training; ``step()`` and ``state_dict()`` call it themselves."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None:
            return
        bad, event, flat, at = pending
        if event is not None:
            event.synchronize()
        flags = bad.cpu().numpy()  # CPU or pinned memory: a host read, not a device sync
        if not flags.any():
            return
        names = self._names()
        which = [names.get(id(p), "?") for p, b in zip(flat, flags, strict=True) if b]
        raise NonFiniteGradientError(
            f"non-finite gradient in {', '.join(which)} at step {at} (nonfinite='raise_async' checks one step "
            f"late): the update of step {at} was applied, so parameters and state may hold NaN/Inf; restore a "
            f"checkpoint. Nothing was changed since. Use nonfinite='raise' to stop before the update")

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``; under ``nonfinite="raise_async"`` the last step's check is acted
        on first, so a state poisoned by a NaN gradient is never saved silently."""
        if self.nonfinite == "raise_async":
            self.check_nonfinite()
        return super().state_dict()

    def _nonfinite_found(self, bad: Tensor) -> bool:
        names = self._names()
        flat = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        which = [names[id(p)] for p, b in zip(flat, bad.tolist(), strict=True) if b]
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
                raise ConsecutiveSkipsError(
                    f"{self.consecutive_skips} steps in a row skipped for non-finite gradients, the last at step "
                    f"{self.steps_called} in {', '.join(which)}; stopping (max_consecutive_skips="
                    f"{self.max_consecutive_skips})")
            return False
        raise NonFiniteGradientError(
            f"non-finite gradient in {', '.join(which)}; nothing was updated. Use "
            f"nonfinite='skip' to skip such steps, or fix the loss (see poise docs)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps_called += 1
        # one pass: each group's parameters a step updates (a gradient and at least one entry:
        # zero-size parameters get no state and no update) and their gradients
        plan = []
        every_plain = True
        for gi, group in enumerate(self.param_groups):
            params, grads, plain = [], [], True
            for p in group["params"]:
                g = p.grad
                if g is None or p.numel() == 0:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(g)
                if plain and (p.is_complex() or _is_dtensor(p)):
                    plain = False
            plan.append((gi, group, params, grads, plain))
            every_plain = every_plain and plain
        if self.nonfinite in ("raise", "raise_async") and compiling():
            self._assert_finite()
        elif self.nonfinite == "raise_async":
            self.check_nonfinite()  # the previous step's flags: raises before anything changes
            self._record_nonfinite()
        elif self.nonfinite != "ignore":
            # the screen over the gradients just gathered; on an alarm (or complex / DTensor
            # gradients) the full check, which clears a false alarm and names the parameters
            screened = every_plain and self._screen_finite([g for *_, grads, _ in plan for g in grads])
            if not screened and not self._finite():
                return loss
        self.consecutive_skips = 0
        before = ([p.detach().clone() for *_, params, _, _ in plan for p in params]
                  if self.diagnostics else None)
        state = self.state
        for gi, group, params, grads, plain in plan:
            if not params:
                continue
            states = []
            for p in params:
                st = state[p]
                if "step" not in st:
                    st.update(init_state(self.transform, _real(_view(p, self.shard_safe)), group))
                states.append(st)
            self._tick(gi, states)
            dt = None if plain else [_is_dtensor(p) for p in params]
            if dt is None or not any(dt):
                if dt is not None:  # complex (where param_dtypes allow it): pairs of reals
                    params, grads = [_real(p) for p in params], [_real(g) for g in grads]
                updates = self.transform.update(grads, states, params, group)
                for p, u in zip(params, updates, strict=True):
                    if u is not None:
                        p.add_(u.to(p.dtype))
                continue
            # FSDP2 / DTensor parameters: local shards when every stage is elementwise, else whole tensors
            views = [_real(_view(p, self.shard_safe)) for p in params]
            grads = [_real(_view(p.grad, self.shard_safe)) for p in params]
            snap = [v.clone() for v in views]
            updates = self.transform.update(grads, states, views, group)
            for p, v, s0, u, d in zip(params, views, snap, updates, dt, strict=True):
                if not d or self.shard_safe:
                    if u is not None:
                        v.add_(u.to(v.dtype))
                    continue
                total = v - s0 if u is None else v - s0 + u.to(v.dtype)  # a stage may have written in place
                p.to_local().add_(_local_shard(total, p))
        if before is not None:
            self.last_diagnostics = self._diagnose(before)
        return loss

    def _tick(self, gi: int, states: list[dict[str, Any]]) -> None:
        """Advance the ``step`` and ``clock`` counters of group ``gi``'s stepped parameters by one.

        The counters are 0-d tensors, one pair per parameter (as in torch.optim); adding one to
        each is a dispatch per tensor, which costs more than the whole fused AdamW kernel on a
        model of many small tensors. So the first step of a group stores them as 0-d views of
        one buffer (the same values, still one ``step`` and one ``clock`` tensor per parameter)
        and later steps add one to the buffer. Anything that replaces a counter tensor (loading
        a state dict, a transform that resets by assignment) or steps another set of parameters
        is seen by identity and re-banks; counters that are not plain float32 CPU scalars, a group
        that lists a parameter twice (torch warns, and counts its step twice), and compiled steps
        take the per-tensor path."""
        if not states:
            return
        counters = [s["step"] for s in states] + [s["clock"] for s in states]
        banks = self.__dict__.setdefault("_banks", {})
        bank = banks.get(gi)
        if bank is not None and len(bank[1]) == len(counters) and all(
                a is b for a, b in zip(bank[1], counters, strict=True)):
            bank[0].add_(1.0)
            return
        if compiling() or len({id(s) for s in states}) < len(states) or not all(
                type(c) is Tensor and c.dim() == 0 and c.dtype == torch.float32 and c.device.type == "cpu"
                for c in counters):  # a parameter listed twice counts two steps, as torch.optim's
            banks.pop(gi, None)
            tick(states)
            return
        buf = torch.stack(counters)
        views = list(buf.unbind(0))
        n = len(states)
        for i, s in enumerate(states):
            s["step"], s["clock"] = views[i], views[n + i]
        banks[gi] = (buf, views)
        buf.add_(1.0)

    def _diagnose(self, before: list[Tensor]) -> dict[str, Tensor]:
        params = [p for g in self.param_groups for p in self._stepped(g)]
        if not params:
            return {}
        delta = torch.stack(torch._foreach_norm(torch._foreach_sub([p.detach() for p in params], before)))
        base = torch.stack(torch._foreach_norm(before))
        out = {"update_ratio": delta.norm() / base.norm().clamp_min(1e-30)}
        states = [self.state[p] for p in params]
        steps = [st["step"] for st in states]

        def collect(suffix: str) -> list[Tensor]:
            return [v for st in states for k, v in st.items() if k.endswith(suffix) and isinstance(v, Tensor)]

        clipped = collect("clipped_frac")
        if clipped:
            c = torch.stack(clipped)
            out["clipped_frac"] = c.mean()
            out["spike_tensors"] = (c > 0).sum().float()
        # a reset sets the step back to 1 while the clock runs on
        clocks = torch.stack([st["clock"] for st in states])
        out["resets"] = ((torch.stack(steps) == 1) & (clocks > 1)).sum().float()
        refreshed = collect("refreshed")
        if refreshed:
            out["refreshes"] = torch.stack(refreshed).sum()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping each state tensor's saved dtype; groups saved
        before a key was declared get the current defaults for it."""
        saved = {pid: {k: v.dtype for k, v in st.items() if isinstance(v, Tensor)}
                 for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for g in self.param_groups:
            for k, v in self.defaults.items():
                g.setdefault(k, v)
            fill_hyper(self.transform, g)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params, strict=True):
            for k, dt in saved.get(pid, {}).items():
                v = self.state[p].get(k)
                if isinstance(v, Tensor) and v.dtype != dt:
                    self.state[p][k] = v.to(dt)
                elif k in ("step", "clock") and isinstance(v, Tensor):
                    # torch keeps the given step tensors: loading another live optimizer's state
                    # would share its counters (and its counter buffer), so each step of one
                    # would advance the other's
                    self.state[p][k] = v.clone()
        self.__dict__.pop("_banks", None)

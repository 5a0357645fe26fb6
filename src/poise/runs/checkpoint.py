"""Checkpoints of a training run: tensors in safetensors, everything else in JSON, written
atomically. Loading never executes code (safetensors, ``torch.load(weights_only=True)``,
JSON).

Layout: ``<dir>/step-000010/{model.safetensors, optimizer.pt, rng.pt, state.json}`` and
``<dir>/latest.json`` naming the newest complete step directory. A step directory is
written under a temporary name and renamed when complete; ``latest.json`` is replaced
atomically after it; older step directories are then removed. A crash at any point leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poise.runs.store import atomic_write_json

__all__ = ["CheckpointError", "clean_partial", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint or its manifest that cannot be read; the message names the file."""


def save_checkpoint(directory: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: dict[str, Any]) -> Path:
    from poise.runs.store import check_inside

    directory = check_inside(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    clean_partial(directory)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".step-{step:06d}."))
    try:
        return _write(directory, final, tmp, step, model, optimizer, generator, state)
    except BaseException as e:  # a full disk, a kill signal turned exception: never leave a half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise write_error(e, final) from e
        raise


def write_error(e: BaseException, path: Path) -> OSError:
    """The ``OSError`` a failed checkpoint write raises: it names the file (the one that failed when the
    error says, else ``path``) and says when the disk is full, also for torch's own full-disk error
    (a ``RuntimeError`` "enforce fail ... unexpected pos")."""
    import errno as _errno
    import os

    if isinstance(e, OSError):
        no = e.errno or _errno.EIO
        where = e.filename or str(path)
        what = e.strerror or str(e)
    else:
        no = _errno.ENOSPC
        where = str(path)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"{os.strerror(_errno.ENOSPC)} (or the disk failed); torch said: {first[:160]}"
    return OSError(no, f"checkpoint write failed: {what}", where)


def clean_partial(directory: str | Path) -> None:
    """Remove half-written ``.step-*`` folders and manifest temporaries (left by a kill or a full disk)."""
    for old in Path(directory).glob(".step-*"):
        shutil.rmtree(old, ignore_errors=True)
    for old in Path(directory).glob(".latest.json.*.tmp"):
        old.unlink(missing_ok=True)


def _write(directory: Path, final: Path, tmp: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, state: dict[str, Any]) -> Path:
    from safetensors.torch import save_model

    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_json(directory / "latest.json", {"step": step, "path": final.name})
    for old in directory.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_reason(e: BaseException) -> str:
    """One line on why a checkpoint file could not be read: never torch's advice to unpickle it."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return "not a checkpoint written by poise: it holds objects other than tensors, which are never unpickled"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


_STEP_DIR = re.compile(r"step-\d{6,}")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete step directory named by ``<directory>/latest.json``, or None when
    there is none yet. A manifest that is not ``{"step": int, "path": "step-NNNNNN"}`` (or
    names a directory outside ``directory``) raises ``ValueError``."""
    clean_partial(directory)  # a leftover from a killed write never blocks --resume
    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        data = json.loads(pointer.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint manifest {pointer} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or \
            not _STEP_DIR.fullmatch(data["path"]) or type(data.get("step")) is not int:
        raise CheckpointError(f"checkpoint manifest {pointer} is malformed: expected "
                         f'{{"step": <int>, "path": "step-NNNNNN"}}, got {str(data)[:80]}')
    path = Path(directory) / data["path"]
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore model, optimizer and RNG states in place; return the JSON state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or type(state.get("step")) is not int:
            raise CheckpointError("state.json has no integer 'step'")
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({load_reason(e)}); delete {path} to restart "
                              "this run from its previous checkpoint or its start") from None
    return state

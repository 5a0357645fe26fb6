"""The run directory: resolved config, append-only metric streams, atomic JSON files."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

__all__ = ["JsonlWriter", "atomic_write_json", "atomic_write_text", "check_inside", "new_run_dir", "read_jsonl",
           "study_outcome", "truncate_jsonl", "untimed", "writing_into"]

# The run directory a study writes into (set by the engine for the study's duration): every file the
# store and the checkpoints write is checked to lie inside it, so no name or path can write elsewhere.
_ROOT: ContextVar[Path | None] = ContextVar("poise_run_root", default=None)


@contextmanager
def writing_into(root: str | Path) -> Iterator[None]:
    """Within this block, :func:`check_inside` refuses any path outside ``root``."""
    token = _ROOT.set(Path(root).resolve())
    try:
        yield
    finally:
        _ROOT.reset(token)


def check_inside(path: str | Path) -> Path:
    """``path``, after checking it lies inside the current run directory (when a study is running);
    a path outside it (through ``..``, an absolute name or a symlink) raises ``PermissionError``."""
    path = Path(path)
    root = _ROOT.get()
    if root is not None:
        real = path.resolve()
        if real != root and root not in real.parents:
            raise PermissionError(f"refusing to write {path}: it is outside the run directory {root}")
    return path


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/<YYYYmmdd-HHMMSS>-<name>/``, made fresh (a suffix if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out_dir) / f"{stamp}-{name}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    path.mkdir(parents=True)
    return path


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0666 less the umask)."""
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


_MODE = _file_mode()


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never half of one (NaN and infinities as null)."""
    atomic_write_text(path, json.dumps(_clean(obj), indent=2))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same folder, fsync, rename); a failure
    (a full disk) removes the temporary file and raises ``OSError`` naming ``path``."""
    path = check_inside(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _MODE)  # mkstemp makes 0600; the run directory's files are as readable as its other files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JsonlWriter:
    """Append one JSON object per line and flush after each, so a crash loses at most the
    line being written."""

    def __init__(self, path: str | Path):
        self.path = check_inside(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self._failed = False

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(_clean(record)) + "\n")
            self._f.flush()
        except OSError as e:  # a full disk or a vanished folder: name the file
            self._failed = True
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:  # the buffered failed line: already reported by write(), else name the file
            if not self._failed:
                raise OSError(e.errno, e.strerror, str(self.path)) from e

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics file; a torn last line (a crash mid-write) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_jsonl(path: str | Path, max_step: int,
                   drop_at_max: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Keep only the complete lines with ``step <= max_step`` (resuming from a checkpoint
    taken at ``max_step``: later lines would be written again), less the lines at ``max_step``
    for which ``drop_at_max`` is true (written after the checkpoint). Atomic."""
    path = check_inside(path)
    if not path.exists():
        return
    keep = [json.dumps(r) for r in read_jsonl(path)
            if r.get("step", 0) < max_step
            or (r.get("step", 0) == max_step and not (drop_at_max is not None and drop_at_max(r)))]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


_TIMING = re.compile(r"second|wall|^time")


def untimed(obj: Any) -> Any:
    """``obj`` (nested dicts and lists) without its timing fields, every key matching ``second``, ``wall``
    or a leading ``time``: they differ between any two runs of one config."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not _TIMING.search(k)}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def study_outcome(run: str | Path) -> dict[str, Any]:
    """What a study wrote into ``run``, timing aside (:func:`untimed`): ``complete`` (the summary's flag),
    every result, every metric line, and the summary's variants and claims. Two runs of one config
    (interrupted and resumed, in parallel or in turn) must give equal outcomes."""
    run = Path(run)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "complete": summary.get("complete"),
        "results": {p.name: untimed(json.loads(p.read_text())) for p in sorted((run / "results").glob("*.json"))},
        "metrics": {p.name: [untimed(json.loads(line)) for line in p.read_text().splitlines()]
                    for p in sorted((run / "metrics").glob("*.jsonl"))},
        "summary": untimed({k: summary.get(k) for k in ("variants", "claims")}),
    }

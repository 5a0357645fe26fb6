"""Fault soak: every study kind, run by ``poise run`` in a subprocess, hit by faults for N minutes.

    python benchmarks/fault_soak.py --minutes 10

Faults, each tried on each kind in turn (continual, optimizers, rl, edit, priming; tiny sizes):

* ``kill``        SIGKILL at a random moment of the run, then ``poise run --resume``
* ``kill-write``  SIGKILL the moment a checkpoint or atomic-write temporary (``.step-*``, ``.*.tmp``) appears
* ``enospc``      the run directory on a tmpfs smaller than the study needs (when ``mount -t tmpfs`` works,
                  i.e. as root); else ENOSPC injected at a random write (metric line, JSON file, checkpoint)
                  through a hook in the subprocess (``FAULT_SOAK_ENOSPC``); then more space, then ``--resume``
* ``corrupt``     a checkpoint (continual, rl) or a result file (the other kinds) truncated, garbled or
                  emptied after a kill; ``--resume`` must refuse it in one line; after the named file is
                  deleted, ``--resume`` completes the study
* ``concurrent``  a second ``poise run`` (``--resume`` and a new study) on a run directory in use
* ``hostile``     variant and study names ``../x``, ``a/b``, ``.hidden``

After each: nothing written beside the run directory (a snapshot of its parent), an error is one
``poise:`` line on stderr with no traceback and the exit code ``poise --help`` documents, no
temporary left in the run directory once the study completes, and the completed study equals an
uninterrupted reference run (results, every metric line and the summary, timing fields aside).
Prints a table fault x kind -> ok / FAIL counts and the failures; exits 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from poise.runs.store import study_outcome

KINDS: dict[str, list[str]] = {  # a few seconds each, long enough for a kill to land mid-run
    "continual": ["tiny", "seeds=[0]", "train.steps_per_task=30", "train.checkpoint_every=3", "eval.dense_steps=3",
                  "eval.every=3"],
    "optimizers": ["optimizers", "--quick", "lm.steps=40", "lm.batch_size=8", "claims=[]",
                   "variants=[{name='adamw',optimizer='adamw'},{name='slow',optimizer='adamw',params={lr=1e-3}}]"],
    "rl": ["rl-sampling", "--quick", "train.steps=8", "train.sft_steps=5", "train.n_embd=16", "train.eval_problems=5",
           "train.prompts=2", "train.group_size=2", "train.max_new_tokens=4", "train.checkpoint_every=2",
           "train.eval_every=2"],
    "edit": ["edit-stream", "--quick", "lm.n_facts=60", "lm.steps=40", "lm.batch_size=16", "stream.n_edits=20",
             "stream.per_request=5", "stream.n_locality=10", "stream.n_preserve=20", "stream.eval_every=1",
             "stream.unlearn_every=0", "claims=[]",
             "variants=[{name='unedited',editor='none'},{name='rome',editor='rome'}]"],
    "priming": ["priming", "--quick", "lm.n_facts=30", "lm.steps=60", "priming.n_probes=3", "priming.learn_steps=2",
                "priming.replay=2"],
}
FIRST_VARIANT = {"continual": "finetune", "optimizers": "adamw", "rl": "uniform", "edit": "unedited",
                 "priming": "plain"}
RESUMABLE = ("continual", "rl")
FAULTS = ("kill", "kill-write", "enospc", "corrupt", "concurrent", "hostile")
FLAGS = ["--no-progress", "--no-report"]
_PROGRESS = re.compile(r"^(poise run \S.* \(\w+\): \d+ variants|\[\d+/\d+\] |poise: --resume uses the run directory)")

# The subprocess entry: `poise` with an optional injected full disk (FAULT_SOAK_ENOSPC=point:n, point one of
# metrics / json / checkpoint: the n-th metric line, atomic-JSON fsync or torch.save fails as a full disk does).
WRAPPER = r"""
import errno, os, sys
spec = os.environ.get("FAULT_SOAK_ENOSPC")
if spec:
    point, n = spec.split(":"); n = int(n); calls = [0]
    def hit():
        calls[0] += 1
        return calls[0] == n
    if point == "metrics":
        from poise.runs.store import JsonlWriter
        real_write = JsonlWriter.write
        def write(self, record):
            if hit():
                self._f.close(); self._f = open("/dev/full", "a")  # the kernel's ENOSPC from here on
            return real_write(self, record)
        JsonlWriter.write = write
    elif point == "json":
        real_fsync = os.fsync
        def fsync(fd):
            if hit():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)
        os.fsync = fsync
    else:
        import torch
        real_save = torch.save
        def save(obj, f, *a, **k):
            if hit():
                real_save(obj, f, *a, **k)
                with open(f, "r+b") as h:
                    h.truncate(os.path.getsize(f) // 2)
                real_save(obj, "/dev/full", *a, **k)  # torch's own full-disk error
            return real_save(obj, f, *a, **k)
        torch.save = save
from poise.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", WRAPPER, *args]


_outcome = study_outcome  # results, every metric line and the summary of a study, timing aside


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    for part in ("complete", "results", "metrics", "summary"):
        if a.get(part) != b.get(part):
            if isinstance(a.get(part), dict) and isinstance(b.get(part), dict):
                keys = sorted(set(a[part]) ^ set(b[part])) or [k for k in a[part] if a[part][k] != b[part].get(k)]
                return f"{part} differ ({', '.join(map(str, keys[:4]))})"
            return f"{part} differ"
    return ""


def _snapshot(folder: Path, skip: Path) -> dict[str, int]:
    out = {}
    for p in folder.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        out[str(p.relative_to(folder))] = p.stat().st_size if p.is_file() else -1
    return out


def _temporaries(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock") if run.is_dir() else []


def _error_line(err: str) -> tuple[str | None, str]:
    """(the one error line, '') or (None, what is wrong with stderr)."""
    if "Traceback" in err:
        return None, "traceback: " + err.strip().splitlines()[-1][:160]
    lines = [ln for ln in err.splitlines() if ln.strip() and not _PROGRESS.match(ln)]
    if len(lines) != 1 or not lines[0].startswith("poise: "):
        return None, f"{len(lines)} error lines: " + " | ".join(ln[:100] for ln in lines[:3])
    return lines[0], ""


class Trial:
    """One fault on one kind in its own folder: ``parent/run`` is the run directory."""

    def __init__(self, root: Path, kind: str, fault: str, k: int, rng: random.Random):
        self.kind, self.fault, self.rng = kind, fault, rng
        self.parent = root / f"{k:04d}-{fault}-{kind}"
        self.parent.mkdir(parents=True)
        self.run = self.parent / "run"
        self.notes: list[str] = []

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(_cmd("run", *KINDS[self.kind], "threads=1", "--run-dir", str(self.run), *FLAGS,
                                     *extra), cwd=self.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **(env or {})})

    def resume(self, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str]:
        out = subprocess.run(_cmd("run", "--resume", str(self.run), *FLAGS), cwd=self.parent, capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, **(env or {})})
        return out.returncode, out.stderr


def _kill_when(proc: subprocess.Popen, ready: Any, deadline: float, poll: float = 0.002) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it ended first."""
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
        except (FileNotFoundError, OSError):
            pass
        time.sleep(poll)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return False


def _finish(t: Trial, ref: dict[str, Any], before: dict[str, int]) -> str:
    """Resume until done (at most 3 tries); '' when the study equals the reference, else what failed."""
    for _ in range(3):
        if (t.run / "summary.json").is_file() and json.loads((t.run / "summary.json").read_text()).get("complete"):
            break
        if (t.run / "config.json").is_file():
            code, err = t.resume()
        else:  # the study never got its config written: start it again into the same folder
            out = subprocess.run(_cmd("run", *KINDS[t.kind], "threads=1", "--run-dir", str(t.run), *FLAGS),
                                 cwd=t.parent, capture_output=True, text=True, timeout=600)
            code, err = out.returncode, out.stderr
        if code != 0:
            return f"resume exit {code}: {(_error_line(err)[0] or err.strip()[-200:])[:200]}"
    else:
        return "not complete after 3 resumes"
    if _snapshot(t.parent, t.run) != before:
        return "a file written beside the run directory"
    left = _temporaries(t.run)
    if left:
        return f"temporaries left after the study completed: {left[:3]}"
    return _diff(_outcome(t.run), ref)


# -- the faults: each returns '' (ok) or what failed ------------------------------------------------
def fault_kill(t: Trial, ref: dict[str, Any], span: float) -> str:
    before = _snapshot(t.parent, t.run)
    proc = t.start()
    at = t.rng.uniform(0.0, span)
    t0 = time.time()
    killed = _kill_when(proc, lambda: (t.run / "run.json").exists() and time.time() - t0 >= at, time.time() + 600)
    t.notes.append(f"killed at {time.time() - t0:.1f} s" if killed else "finished before the kill")
    return _finish(t, ref, before)


def fault_kill_write(t: Trial, ref: dict[str, Any], span: float) -> str:
    before = _snapshot(t.parent, t.run)
    proc = t.start()
    skip = t.rng.randint(0, 3)  # let a few writes pass, so the kill lands at different ones
    seen: set[str] = set()
    now: list[str] = []

    def writing() -> bool:
        names = {p.name for p in t.run.rglob(".*") if p.name != ".lock" and (p.name.startswith(".step-")
                                                                            or p.name.endswith(".tmp"))}
        seen.update(names)
        now[:] = sorted(names)
        return bool(names) and len(seen) > skip

    killed = _kill_when(proc, writing, time.time() + 600, poll=0.0005)
    t.notes.append(f"killed during a write ({', '.join(now) or '?'})" if killed else "no write caught")
    return _finish(t, ref, before)


def fault_enospc(t: Trial, ref: dict[str, Any], span: float, ref_bytes: int, tmpfs: bool) -> str:
    if tmpfs:
        size = max(8192, int(ref_bytes * t.rng.uniform(0.15, 0.95)) // 4096 * 4096)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(t.parent)], check=True)
        t.notes.append(f"tmpfs {size // 1024} KiB of {ref_bytes // 1024} KiB")
        env = None
    else:
        point = t.rng.choice(["metrics", "json", "checkpoint"] if t.kind in RESUMABLE else ["metrics", "json"])
        n = t.rng.randint(1, 12)
        env = {"FAULT_SOAK_ENOSPC": f"{point}:{n}"}
        t.notes.append(f"injected ENOSPC at {point} #{n}")
    try:
        before = _snapshot(t.parent, t.run)
        proc = t.start(env=env)
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            t.notes.append("the study fitted")
        else:
            line, why = _error_line(err)
            if proc.returncode != 1 or line is None:
                return f"exit {proc.returncode}; {why}"
            m = re.search(r"cannot write \((.+?)\): ", line)
            if "No space left" not in line and "cannot write" not in line:
                return f"not a disk message: {line[:160]}"
            if not m:
                return f"the file is not named: {line[:160]}"
            named = Path(m.group(1))
            if named.name.startswith("."):
                return f"names a temporary: {named.name}"
            if t.run.resolve() not in named.resolve().parents:
                return f"names a file outside the run directory: {named}"
            if "No space left" not in line:
                return f"does not say the disk is full: {line[:200]}"
            left = _temporaries(t.run)
            if left:
                return f"temporaries left by the failed write: {left[:3]}"
        if tmpfs:
            subprocess.run(["mount", "-o", f"remount,size={max(8, 6 * ref_bytes // 1024)}k", str(t.parent)], check=True)
        return _finish(t, ref, before)
    finally:
        if tmpfs:
            subprocess.run(["umount", "-l", str(t.parent)], check=False)


def _checkpoint_files(t: Trial) -> list[Path]:
    if t.kind == "continual":
        return sorted((t.run / "checkpoints").glob("*.pt"))
    return sorted(p for p in (t.run / "checkpoints").rglob("*") if p.is_file() and not p.name.startswith("."))


def fault_corrupt(t: Trial, ref: dict[str, Any], span: float) -> str:
    before = _snapshot(t.parent, t.run)
    proc = t.start()
    if t.kind in RESUMABLE:
        has = (lambda: bool(_checkpoint_files(t))) if t.kind == "continual" else \
            (lambda: any((t.run / "checkpoints").glob("*/latest.json")))
    else:
        has = lambda: any((t.run / "results").glob("*.json"))  # noqa: E731
    if not _kill_when(proc, has, time.time() + 600):
        t.notes.append("nothing to corrupt: the study finished")
        return _finish(t, ref, before)
    victims = _checkpoint_files(t) if t.kind in RESUMABLE else sorted((t.run / "results").glob("*.json"))
    victim = t.rng.choice(victims)
    how = t.rng.choice(["truncate", "garbage", "empty"])
    data = victim.read_bytes()
    victim.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(max(64, len(data))),
                        "empty": b""}[how])
    t.notes.append(f"{how} {victim.relative_to(t.run)}")
    code, err = t.resume()
    if code == 0:
        d = _diff(_outcome(t.run), ref)
        return f"a corrupt {victim.name} accepted: {d}" if d else ""
    line, why = _error_line(err)
    if code != 1 or line is None:
        return f"exit {code}; {why}"
    if str(victim) not in line and str(victim.parent) not in line:
        return f"the file is not named: {line[:200]}"
    if "weights_only" in err:
        return "passes on torch's advice about weights_only"
    if victim.parent.name.startswith("step-"):
        shutil.rmtree(victim.parent)  # an RL checkpoint: its step folder
    else:
        victim.unlink()
    return _finish(t, ref, before)


def fault_concurrent(t: Trial, ref: dict[str, Any], span: float) -> str:
    before = _snapshot(t.parent, t.run)
    proc = t.start()
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (t.run / "metrics").is_dir():
        time.sleep(0.01)
    if proc.poll() is not None:
        t.notes.append("the first process ended first")
        return _finish(t, ref, before)
    fails = []
    second = [_cmd("run", "--resume", str(t.run), *FLAGS),
              _cmd("run", *KINDS[t.kind], "threads=1", "--run-dir", str(t.run), *FLAGS)]
    for cmd in second:
        out = subprocess.run(cmd, cwd=t.parent, capture_output=True, text=True, timeout=600)
        line, why = _error_line(out.stderr)
        if out.returncode == 0 and proc.poll() is not None:
            continue  # the first had finished: a resume of a complete study is fine
        if out.returncode != 1 or line is None:
            fails.append(f"second process: exit {out.returncode}; {why}")
        elif "in use by another poise process" not in line and "already holds a study" not in line:
            fails.append(f"second process: {line[:160]}")
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        fails.append(f"the first process: exit {proc.returncode}: {err.strip()[-160:]}")
    return "; ".join(fails) or _finish(t, ref, before)


def fault_hostile(t: Trial, ref: dict[str, Any], span: float) -> str:
    name = t.rng.choice(["../x", "a/b", ".hidden", "../../escaped", "..", "x/../../y"])
    key = t.rng.choice([f"variants.{FIRST_VARIANT[t.kind]}.name", "name"])
    where = t.rng.choice([[], ["--run-dir", str(t.run)]])
    t.notes.append(f"{key}={name!r}{' --run-dir' if where else ''}")
    grand = _snapshot(t.parent.parent, t.parent)
    out = subprocess.run(_cmd("run", *KINDS[t.kind], f"{key}={json.dumps(name)}", *FLAGS, *where), cwd=t.parent,
                         capture_output=True, text=True, timeout=600)
    line, why = _error_line(out.stderr)
    if out.returncode != 2 or line is None:
        return f"exit {out.returncode}; {why}"
    if "is not a usable name" not in line:
        return f"not the name rule: {line[:160]}"
    if any(t.parent.iterdir()) or _snapshot(t.parent.parent, t.parent) != grand:
        return "something was written"
    return ""


def _tmpfs_works(root: Path) -> bool:
    probe = root / "tmpfs-probe"
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=False)
        return ok
    except FileNotFoundError:
        return False
    finally:
        probe.rmdir()


def _bytes_on_tmpfs(run: Path) -> int:
    """What the study needs on a tmpfs at its peak (pages; every file as it stands at the end, checkpoints
    counted twice: a new one is written before the old is removed)."""
    total = 0
    for p in run.rglob("*"):
        total += 4096 if p.is_dir() else -(-p.stat().st_size // 4096) * 4096
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0,
                    help="how long to inject faults, after the reference runs (default 10)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault schedule (default: random, printed)")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--faults", nargs="*", default=list(FAULTS), choices=list(FAULTS))
    ap.add_argument("--keep", action="store_true", help="keep the trial folders (printed)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="fault-soak-"))
    tmpfs = _tmpfs_works(root)
    print(f"fault soak: seed {seed}, {args.minutes:g} min, ENOSPC by {'a small tmpfs' if tmpfs else 'injection'}, "
          f"in {root}", flush=True)
    refs: dict[str, tuple[dict[str, Any], float, int]] = {}
    for kind in args.kinds:  # the uninterrupted reference of each kind
        run = root / f"ref-{kind}" / "run"
        run.parent.mkdir()
        t0 = time.time()
        out = subprocess.run(_cmd("run", *KINDS[kind], "threads=1", "--run-dir", str(run), *FLAGS),
                             capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            print(f"reference run of {kind} failed:\n{out.stderr[-2000:]}")
            return 1
        refs[kind] = (_outcome(run), time.time() - t0, 2 * _bytes_on_tmpfs(run))
        print(f"  reference {kind}: {refs[kind][1]:.1f} s", flush=True)
    end = time.time() + 60 * args.minutes  # the soak proper, after the references
    counts: dict[tuple[str, str], list[int]] = {}
    failures: list[str] = []
    pairs = [(f, k) for f in args.faults for k in args.kinds]
    rng.shuffle(pairs)
    k = 0
    while time.time() < end:
        fault, kind = pairs[k % len(pairs)]
        if k and k % len(pairs) == 0:
            rng.shuffle(pairs)
        k += 1
        t = Trial(root, kind, fault, k, rng)
        ref, span, need = refs[kind]
        t1 = time.time()
        try:
            if fault == "enospc":
                why = fault_enospc(t, ref, span, need, tmpfs)
            else:
                why = {"kill": fault_kill, "kill-write": fault_kill_write, "corrupt": fault_corrupt,
                       "concurrent": fault_concurrent, "hostile": fault_hostile}[fault](t, ref, span)
        except Exception as e:  # noqa: BLE001 - the soak itself must go on and report
            why = f"soak error {type(e).__name__}: {e}"
        c = counts.setdefault((fault, kind), [0, 0])
        c[0 if not why else 1] += 1
        status = "ok" if not why else f"FAIL: {why}"
        print(f"[{k:3d}] {fault:<10} {kind:<10} {time.time() - t1:5.1f} s  {status}  ({'; '.join(t.notes)})",
              flush=True)
        if why:
            failures.append(f"{fault} x {kind} ({'; '.join(t.notes)}; trial {t.parent}): {why}")
        if not args.keep and not why:
            shutil.rmtree(t.parent, ignore_errors=True)
    print(f"\nfault x kind: ok / FAIL (seed {seed}, {k} trials)\n")
    print(f"{'fault':<12}" + "".join(f"{kd:>18}" for kd in args.kinds))
    for f in args.faults:
        cells = []
        for kd in args.kinds:
            ok, bad = counts.get((f, kd), [0, 0])
            cells.append("-" if ok + bad == 0 else f"{ok} ok" + (f" / {bad} FAIL" if bad else ""))
        print(f"{f:<12}" + "".join(f"{c:>18}" for c in cells))
    if failures:
        print(f"\n{len(failures)} failures:")
        for line in failures:
            print(f"  {line}")
    if not args.keep and not failures:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\ntrial folders: {root}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

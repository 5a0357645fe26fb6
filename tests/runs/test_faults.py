"""Faults and hostile input through ``poise run``, for every study kind (issue 19, items 4 and 6).

A full disk (ENOSPC injected at the Nth write of a metric line, of an atomic JSON file, of a
checkpoint), a corrupted checkpoint, a second process on the same run directory and hostile names.
After each: exit code 1 (2 for a bad name) with one ``poise:`` line on stderr naming the file and no
traceback, nothing written outside the run directory, no temporary left inside it, and after the
fault is gone ``poise run --resume RUN_DIR`` ends with the results of an uninterrupted run (timing
fields aside). Sizes are the smallest each kind accepts, so every run takes about a second.
The longer randomised version (real SIGKILLs, a real full tmpfs) is ``benchmarks/fault_soak.py``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from poise.cli import main
from poise.runs.config import load_recipe
from poise.runs.store import JsonlWriter, study_outcome

COMMON = ["threads=1", "--no-progress", "--no-report"]
FLAGS = ["--no-progress", "--no-report"]  # for --resume (which takes no overrides)
KINDS: dict[str, list[str]] = {  # recipe and overrides: the tiniest study of each kind, 2-3 runs
    "continual": ["tiny", "seeds=[0]", "train.steps_per_task=6", "train.checkpoint_every=2", "eval.dense_steps=2",
                  "eval.every=2"],
    "optimizers": ["optimizers", "--quick", "lm.steps=6", "lm.batch_size=8",
                   "variants=[{name='adamw',optimizer='adamw'},{name='slow',optimizer='adamw',params={lr=1e-3}}]",
                   "claims=[]"],
    "rl": ["rl-sampling", "--quick", "train.steps=4", "train.sft_steps=5", "train.n_embd=16", "train.eval_problems=5",
           "train.prompts=2", "train.group_size=2", "train.max_new_tokens=4", "train.checkpoint_every=1",
           "train.eval_every=2"],
    "edit": ["edit-stream", "--quick", "lm.n_facts=40", "lm.steps=20", "lm.batch_size=16", "stream.n_edits=10",
             "stream.n_locality=10", "stream.n_preserve=20", "stream.eval_every=1", "stream.unlearn_every=0",
             "variants=[{name='unedited',editor='none'},{name='rome',editor='rome'}]", "claims=[]",
             "stream.per_request=5"],
    "priming": ["priming", "--quick", "lm.n_facts=30", "lm.steps=20", "priming.n_probes=2", "priming.learn_steps=2",
                "priming.replay=2"],
}
RESUMABLE = ("continual", "rl")  # the kinds that write checkpoints
_PROGRESS = re.compile(r"^(poise run \S.* \(\w+\): \d+ variants|\[\d+/\d+\] )")  # the header and per-run lines


def _outcome(run: Path) -> dict[str, Any]:
    """What a finished study produced, timing aside: every result, every metric line, the summary."""
    out = study_outcome(run)
    assert out.pop("complete")
    return out


def _files(folder: Path, skip: Path | None = None) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if skip is None or (p != skip and skip not in p.parents)}


def _temporaries(run: Path) -> list[str]:
    """Hidden files and folders in the run directory other than its lock: half-written leftovers."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock")


def _one_line(err: str) -> str:
    """The error line of a failed command: exactly one ``poise:`` line (beside the header and the
    per-run progress lines) and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not _PROGRESS.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("poise: "), err
    return lines[0]


def _named(line: str) -> str:
    """The path a ``cannot write (PATH)`` message names."""
    m = re.search(r"cannot write \((.+?)\): ", line)
    assert m, line
    return m.group(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted study of each kind (run once per kind, on first use)."""
    cache: dict[str, dict[str, Any]] = {}

    def get(kind: str) -> dict[str, Any]:
        if kind not in cache:
            run = tmp_path_factory.mktemp(f"ref-{kind}") / "run"
            assert main(["run", *KINDS[kind], "--run-dir", str(run), *COMMON]) == 0
            cache[kind] = _outcome(run)
        return cache[kind]

    return get


# -- the faults ----------------------------------------------------------------------------------
def _nth(monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, n: int, fault: Any) -> dict[str, int]:
    """Make the ``n``-th call of ``owner.attr`` call ``fault(real, *args)`` instead; returns the counter."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapped(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            return fault(real, *a, **k)
        return real(*a, **k)

    monkeypatch.setattr(owner, attr, wrapped)
    return calls


def _enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
    """A metrics file whose next write fails with ENOSPC (nothing of the line reaches the file)."""

    def __init__(self, f: Any):
        self.f = f

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _line_on_full_disk(real: Any, self: JsonlWriter, record: dict[str, Any]) -> None:
    self._f = _FullFile(self._f)
    real(self, record)


def _torch_save_on_full_disk(real: Any, obj: Any, f: Any, *a: Any, **k: Any) -> None:
    """What ``torch.save`` does when the disk fills mid-file: half a file stays, and torch's own
    error (``RuntimeError``, from a real write to /dev/full) is raised."""
    real(obj, f, *a, **k)
    size = os.path.getsize(f)
    with open(f, "r+b") as h:
        h.truncate(size // 2)
    real(obj, "/dev/full", *a, **k)  # raises the error torch gives for a full disk
    raise AssertionError("torch.save to /dev/full did not fail")


# kind -> (fault point, call number): metric lines (JsonlWriter.write), atomic JSON files (their
# fsync: run.json, config.json, then each result and summary) and checkpoints (torch.save)
# (fsync: 1 config.json, 2 run.json, 3 the first result, 4 the summary after it; an RL run first writes
# a latest.json per checkpoint, 4 of them)
POINTS = [(k, "metrics", 3) for k in KINDS] + [(k, "json", n + 4 * (k == "rl")) for k in KINDS for n in (3, 4)] + [
    ("continual", "checkpoint", 2), ("rl", "checkpoint", 2)]


@pytest.mark.parametrize("kind, point, n", POINTS)
def test_a_full_disk_is_one_line_naming_the_file_and_resume_completes_the_study(
        kind, point, n, tmp_path, monkeypatch, capsys, reference):
    want = reference(kind)
    run = tmp_path / "run"
    (tmp_path / "neighbour.txt").write_text("not the study's")
    outside = _files(tmp_path, skip=run)
    if point == "metrics":
        calls = _nth(monkeypatch, JsonlWriter, "write", n, _line_on_full_disk)
    elif point == "json":
        calls = _nth(monkeypatch, os, "fsync", n, _enospc)
    else:
        calls = _nth(monkeypatch, torch, "save", n, _torch_save_on_full_disk)
    capsys.readouterr()
    code = main(["run", *KINDS[kind], "--run-dir", str(run), *COMMON])
    assert calls["n"] >= n, "the fault never fired"
    assert code == 1
    line = _one_line(capsys.readouterr().err)
    assert "--resume" in line
    named = Path(_named(line))
    assert run.resolve() in named.resolve().parents, line  # a file of this study
    assert _files(tmp_path, skip=run) == outside  # nothing written beside the run directory
    assert _temporaries(run) == []  # nothing half-written left behind
    monkeypatch.undo()

    assert main(["run", "--resume", str(run), *FLAGS]) == 0
    assert _outcome(run) == want  # as if nothing had happened: no line twice, no result from another attempt
    assert _temporaries(run) == [] and _files(tmp_path, skip=run) == outside
    # last, so that a case marked xfail for its message still runs the rest
    assert "No space left on device" in line, f"the message does not say the disk is full: {line}"
    assert not named.name.startswith("."), f"the message names a temporary file: {line}"


def test_a_full_disk_at_the_config_leaves_a_folder_the_advice_can_continue(tmp_path, monkeypatch, capsys, reference):
    want = reference("continual")
    run = tmp_path / "run"
    _nth(monkeypatch, os, "fsync", 1, _enospc)  # 1 config.json, 2 run.json
    assert main(["run", *KINDS["continual"], "--run-dir", str(run), *COMMON]) == 1
    assert "config.json" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    resumed = main(["run", "--resume", str(run), *FLAGS])  # what the message says to do
    again = resumed if resumed == 0 else main(["run", *KINDS["continual"], "--run-dir", str(run), *COMMON])
    assert again == 0, capsys.readouterr().err
    assert _outcome(run) == want


@pytest.mark.parametrize("kind", ["continual", "optimizers"])
def test_a_real_full_disk_under_the_metrics_file_is_named(kind, tmp_path, monkeypatch, capsys):
    def to_dev_full(real: Any, self: JsonlWriter, record: dict[str, Any]) -> None:
        self._f.close()
        self._f = open("/dev/full", "a")  # noqa: SIM115 - the writer closes it; every write now hits ENOSPC
        real(self, record)

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    _nth(monkeypatch, JsonlWriter, "write", 3, to_dev_full)
    run = tmp_path / "run"
    assert main(["run", *KINDS[kind], "--run-dir", str(run), *COMMON]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line
    assert Path(_named(line)).parent == run / "metrics", line


# -- corrupted checkpoints ----------------------------------------------------------------------
def _interrupt_after_checkpoint(monkeypatch: pytest.MonkeyPatch, kind: str, n: int) -> None:
    """Stop the study (as Ctrl-C would) right after its ``n``-th checkpoint is written."""
    from poise.runs.kinds import continual, rl

    def save_then_stop(real: Any, *a: Any, **k: Any) -> Any:
        real(*a, **k)
        raise KeyboardInterrupt

    if kind == "continual":
        _nth(monkeypatch, continual, "_save_checkpoint", n, save_then_stop)
    else:
        _nth(monkeypatch, rl, "save_checkpoint", n, save_then_stop)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    import random

    p.write_bytes(random.Random(0).randbytes(max(64, p.stat().st_size)))


def _foreign_pickle(p: Path) -> None:
    """A pickle of a class the weights-only loader does not allow (another tool's file in its place)."""
    import collections
    import pickle

    p.write_bytes(pickle.dumps(collections.Counter(a=1)))


CORRUPTIONS = [("continual", "*.pt", _truncate), ("continual", "*.pt", _garbage),
               ("continual", "*.pt", _foreign_pickle),
               ("rl", "*/step-*/model.safetensors", _truncate), ("rl", "*/step-*/optimizer.pt", _foreign_pickle),
               ("rl", "*/step-*/state.json", _truncate), ("rl", "*/latest.json", _garbage)]


@pytest.mark.parametrize("kind, pattern, corrupt", CORRUPTIONS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_a_corrupted_checkpoint_is_refused_in_one_line_naming_it(kind, pattern, corrupt, tmp_path, monkeypatch,
                                                                  capsys, reference):
    want = reference(kind)
    run = tmp_path / "run"
    _interrupt_after_checkpoint(monkeypatch, kind, 2)
    assert main(["run", *KINDS[kind], "--run-dir", str(run), *COMMON]) == 130
    monkeypatch.undo()
    [victim] = sorted((run / "checkpoints").glob(pattern))
    corrupt(victim)
    capsys.readouterr()
    outside = _files(tmp_path, skip=run)
    assert main(["run", "--resume", str(run), *FLAGS]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only=False" not in err, err  # never advice to unpickle
    # the file, or for an RL step folder the folder holding it
    assert str(victim) in err or str(victim.parent) in err, err
    assert victim.exists() and _files(tmp_path, skip=run) == outside  # refused: nothing deleted, nothing written
    # the checkpoint removed (a step folder of an RL run with it), the run starts again and ends as if unhurt
    if kind == "continual":
        victim.unlink()
    else:
        import shutil

        shutil.rmtree(victim.parent)  # the step folder, or for latest.json the run's checkpoint folder
    assert main(["run", "--resume", str(run), *FLAGS]) == 0
    assert _outcome(run) == want
    _one_line(err)


def test_an_unreadable_rl_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _interrupt_after_checkpoint(monkeypatch, "rl", 2)
    assert main(["run", *KINDS["rl"], "--run-dir", str(run), *COMMON]) == 130
    monkeypatch.undo()
    [victim] = sorted((run / "checkpoints").glob("*/step-*/model.safetensors"))
    _truncate(victim)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), *FLAGS]) == 1
    assert "delete" in _one_line(capsys.readouterr().err)


def test_a_killed_continual_checkpoint_write_leaves_nothing_after_resume(tmp_path, monkeypatch, reference):
    want = reference("continual")
    run = tmp_path / "run"
    _interrupt_after_checkpoint(monkeypatch, "continual", 1)
    assert main(["run", *KINDS["continual"], "--run-dir", str(run), *COMMON]) == 130
    monkeypatch.undo()
    [ckpt] = (run / "checkpoints").glob("*.pt")
    (ckpt.parent / f".{ckpt.name}.tmp").write_bytes(b"half a checkpoint: SIGKILL during torch.save")
    assert main(["run", "--resume", str(run), *FLAGS]) == 0
    assert _outcome(run) == want
    assert _temporaries(run) == []


@pytest.mark.parametrize("kind", RESUMABLE)
def test_a_full_disk_while_resuming_leaves_no_temporary(kind, tmp_path, monkeypatch, capsys, reference):
    want = reference(kind)
    run = tmp_path / "run"
    _interrupt_after_checkpoint(monkeypatch, kind, 2)
    assert main(["run", *KINDS[kind], "--run-dir", str(run), *COMMON]) == 130
    monkeypatch.undo()

    real_replace = os.replace

    def enospc_onto_metrics(src: Any, dst: Any, *a: Any, **k: Any) -> None:  # the truncated copy cannot land
        if str(dst).endswith(".jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", enospc_onto_metrics)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), *FLAGS]) == 1
    line = _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    leftovers = _temporaries(run)
    assert main(["run", "--resume", str(run), *FLAGS]) == 0  # whatever was left never blocks the resume
    assert _outcome(run) == want
    assert leftovers == [] and not Path(_named(line)).name.startswith("."), (leftovers, line)


@pytest.mark.parametrize("victim, content", [("results/finetune-s0.json", b"{\"variant\": \"fine"),
                                             ("config.json", b"{\"name\": "), ("config.json", b"[1, 2]")])
def test_an_unreadable_run_file_is_refused_in_one_line_naming_it(victim, content, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", *KINDS["continual"], "--run-dir", str(run), *COMMON]) == 0
    (run / "results" / "replay-s0.json").unlink()  # an unfinished run, so --resume has work to do
    (run / victim).write_bytes(content)
    capsys.readouterr()
    assert main(["run", "--resume", str(run), *FLAGS]) == 1
    assert str(run / victim) in _one_line(capsys.readouterr().err)


# -- a second process ----------------------------------------------------------------------------
def test_a_second_process_on_a_live_run_dir_is_refused_and_the_first_is_not_disturbed(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["run", "tiny", "seeds=[0]", "train.steps_per_task=150", "variants=[{strategy='finetune'}]", *COMMON]
    entry = "import sys; from poise.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", entry, *args, "--run-dir", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (run / "metrics").is_dir():
            time.sleep(0.02)
        assert proc.poll() is None, "the first process ended before the second could start"
        capsys.readouterr()
        assert main(["run", "--resume", str(run), *FLAGS]) == 1
        line = _one_line(capsys.readouterr().err)
        assert f"in use by another poise process (pid {proc.pid})" in line, line
        assert main(args + ["--run-dir", str(run)]) == 1  # a new study into it: refused too
        assert "already holds a study" in _one_line(capsys.readouterr().err)
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics" / "finetune-s0.jsonl").read_text().splitlines()
             if not json.loads(line).get("boundary")]
    assert steps == list(range(1, 301))  # every line once: the refused process wrote nothing
    assert sorted(p.name for p in (run / "results").iterdir()) == ["finetune-s0.json"]


# -- hostile names -------------------------------------------------------------------------------
HOSTILE = ["../x", "a/b", ".hidden"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_is_refused_before_anything_is_written(kind, name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default out_dir (runs/) is relative to it
    recipe = KINDS[kind]
    first = load_recipe(recipe[0], [a for a in recipe[1:] if a != "--quick"]).variants[0].name
    overrides = [f"variants.{first}.name={json.dumps(name)}", f"name={json.dumps(name)}"]
    if "/" in name or "\\" in name:  # a swept value becomes part of a variant's name
        overrides.append(f"variants.{first}.name=ok,{json.dumps(name)}")
    for override in overrides:
        for where in ([], ["--run-dir", str(tmp_path / "run")]):
            capsys.readouterr()
            assert main(["run", *recipe, override, *COMMON, *where]) == 2, override
            line = _one_line(capsys.readouterr().err)
            assert "is not a usable name" in line, line
            assert list(tmp_path.iterdir()) == [], override

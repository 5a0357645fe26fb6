"""Every snippet in README.md runs as written.

* ```python blocks run as they are, each in a fresh namespace (one that says it "continues the snippet
  above" runs in the previous one's), in a temporary folder.
* ```bash blocks: each ``poise`` command runs; a ``poise run`` that would start a study of minutes runs
  with ``--dry-run`` appended (the recipe, its overrides and the command line are checked, nothing
  trains), ``--help``, ``list`` and ``env`` run in full, and a command that needs a run directory gets
  one made by a tiny study. ``python``/``torchrun`` lines must name files that exist and compile; the set-up
  lines are what ``.ci/run`` runs.
* A transcript block (``$ poise ...`` then its output) must print that output today.
"""

from __future__ import annotations

import importlib.util
import py_compile
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]
TRANSCRIPTS = [code for lang, code in BLOCKS if lang == "" and code.startswith("$ poise")]


def test_the_readme_has_snippets_of_each_kind():
    assert len(PYTHON) >= 8 and len(BASH) >= 5 and TRANSCRIPTS


@pytest.mark.parametrize("i", range(len(PYTHON)))
def test_python_snippet_runs_as_written(i, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    code = PYTHON[i]
    namespace: dict = {"__name__": "__readme__"}
    if "continues the snippet above" in code.splitlines()[0]:
        exec(compile(PYTHON[i - 1], f"README.md python block {i - 1}", "exec"), namespace)
    exec(compile(code, f"README.md python block {i}", "exec"), namespace)


def _commands() -> list[str]:
    out = []
    for block in BASH:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from poise.cli import main

    run = tmp_path_factory.mktemp("readme") / "run"
    assert main(["run", "tiny", "seeds=[0]", "train.steps_per_task=3", "--run-dir", str(run), "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("line", _commands())
def test_shell_command_works(line, tiny_run, tmp_path, monkeypatch, capsys):
    from poise.cli import main

    monkeypatch.chdir(ROOT)
    for part in re.split(r"\s*&&\s*", line):
        argv = shlex.split(part)
        if argv[0] in ("python3.11",) or argv[0].endswith("/pip") or argv[0] == "pip":
            continue  # the set-up: .ci/run runs exactly these lines on a clean clone
        if argv[0].endswith("poise"):
            args = [a.replace("runs/<dir>", str(tiny_run)) for a in argv[1:]]
            args = [str(tiny_run) if re.fullmatch(r"runs/\d{8}-\d{6}-[\w-]+", a) else a for a in args]
            if args and args[0] == "run" and not {"--help", "--dry-run"} & set(args):
                if "--resume" in args:  # the tiny run is finished: resuming it runs nothing and re-writes its report
                    args = ["run", "--resume", str(tiny_run), "--no-progress"]
                else:
                    args = [*args, "--dry-run"]
            if args and args[0] == "export":
                pytest.skip("export needs a tracker's package")
            if "train.engine=flower" in args and importlib.util.find_spec("flwr") is None:
                pytest.skip("the Flower engine needs the federated extra (flwr), which dev does not install")
            try:
                code = main(args)
            except SystemExit as e:  # --help
                code = e.code
            assert code == 0, f"`{part}` exited {code}: {capsys.readouterr().err}"
            continue
        if argv[:3] == [".venv/bin/python", "-m", "pytest"]:
            continue  # the test command itself (this suite)
        if argv[0] in ("python", "torchrun"):
            files = [a for a in argv if a.endswith(".py")]
            assert files or "-m" in argv, part
            for f in files:
                assert (ROOT / f).is_file(), f"`{part}`: {f} does not exist"
                py_compile.compile(str(ROOT / f), doraise=True, cfile=str(tmp_path / "x.pyc"))
            continue
        raise AssertionError(f"README command not covered by this test: {part}")


@pytest.mark.parametrize("block", TRANSCRIPTS)
def test_transcript_prints_what_it_shows(block, capsys):
    from poise.cli import main

    first, *shown = block.strip().splitlines()
    code = main(shlex.split(first[2:])[1:])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == shown, f"the README shows:\n{chr(10).join(shown)}\nit prints:\n{err}"

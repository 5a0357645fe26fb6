"""benchmarks/gpu.py and benchmarks/gpu_setup.sh, on the CPU: the tiny run end to end, the time
budget (whole sections and single optimizers skipped with a recorded reason instead of running
over), the ratio arithmetic, the report, and the offline installer's logic."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
SETUP = ROOT / "benchmarks" / "gpu_setup.sh"


def run_script(out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a machine with a GPU
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny", "--threads", "1", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def load_gpu_module():
    """benchmarks/gpu.py as a fresh module (tests may patch its globals)."""
    spec = importlib.util.spec_from_file_location("poise_bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu")
    t0 = time.monotonic()
    proc = run_script(out)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    res["_wall"] = wall
    return res, (out / "gpu.md").read_text(), proc


def test_tiny_run_times_every_poise_optimizer_against_torch_fused_adamw(tiny_run):
    res, _, _ = tiny_run
    for dt in ("bfloat16", "float32"):
        sec = res["sections"][f"optimizers_{dt}"]
        assert sec["status"] == "done", sec
        rows = {(r["family"], r["impl"]): r for r in sec["rows"]}
        base = rows[("adamw", "torch_fused")]
        assert base["ms"] > 0 and base["x_torch_adamw"] == 1.0
        for fam in ("adamw", "soap", "stable_spam", "galore_adamw", "muon"):
            r = rows[(fam, "poise")]
            assert r["error"] is None, r
            assert r["ms"] > 0 and r["repeats"] == sec["rounds"] >= 3
            assert r["ms_p25"] <= r["ms"] <= r["ms_p75"]
            assert r["x_torch_adamw"] == pytest.approx(r["ms"] / base["ms"], rel=1e-2)
            assert r["state_bytes_per_param"] > 0
        # AdamW's two moments: 8 bytes per parameter in float32 state (4 in bfloat16 if kept so)
        assert rows[("adamw", "torch_fused")]["state_bytes_per_param"] == pytest.approx(
            8.0 if dt == "float32" else 4.0, abs=0.2)
        # a peer row for each family whose peer library is installed, or a recorded absence
        missing = {m["peer"] for m in sec["peers_missing"]}
        if "pytorch_optimizer" not in missing:
            po = rows[("soap", "pytorch_optimizer")]
            assert po["error"] is not None or po["ms"] > 0
            poise = rows[("soap", "poise")]
            if po.get("ms"):
                assert poise["fastest_peer"] is not None
        for r in sec["rows"]:  # every row either timed or carries its error
            assert (r.get("ms") is not None) != (r["error"] is not None), r


def test_tiny_run_records_the_nonfinite_policies_and_the_rl_step(tiny_run):
    res, _, _ = tiny_run
    nf = res["sections"]["nonfinite"]
    assert nf["status"] == "done", nf
    assert [r["policy"] for r in nf["rows"]] == ["raise", "raise_async", "skip", "ignore"]
    ignore = nf["rows"][-1]
    assert ignore["step_minus_ignore_ms"] == 0 and ignore["train_minus_ignore_ms"] == 0
    for r in nf["rows"]:
        assert r["step_ms"] > 0 and r["train_step_ms"] > r["step_ms"] * 0.5
        assert r["step_minus_ignore_ms"] == pytest.approx(r["step_ms"] - ignore["step_ms"], abs=2e-3)
    rl = res["sections"]["rl"]
    assert rl["status"] == "done", rl
    rows = {r["impl"]: r for r in rl["rows"]}
    assert rows["poise"]["error"] is None, rows["poise"]
    assert rows["poise"]["s_per_step"] > 0 and rows["poise"]["steps_timed"] == 2
    assert 1 <= rows["poise"]["mean_completion_tokens"] <= 6  # --tiny: up to 6 new tokens
    if importlib.util.find_spec("trl") is None:
        assert any("trl" in s["reason"] for s in rl["skipped"])
    else:
        assert rows["trl"]["error"] is None, rows["trl"]
        assert rows["trl"]["s_per_step"] > 0
        assert rl["trl_over_poise"] == pytest.approx(rows["trl"]["s_per_step"] / rows["poise"]["s_per_step"],
                                                     rel=1e-2)


def test_tiny_run_writes_the_environment_and_a_pasteable_report(tiny_run):
    res, md, proc = tiny_run
    env = res["env"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["tiny"] is True
    assert env["torch"] and env["date"].endswith("UTC") and "gpu.py" in env["command"] and "--tiny" in env["command"]
    assert 0 < env["elapsed_s"] < res["_wall"]
    assert res["_wall"] < 180, f"the tiny run took {res['_wall']:.0f} s"
    assert f"### GPU benchmark, {env['date']}" in md
    assert "Hardware: CPU only" in md and env["command"] in md
    for title in ("Optimizer step, GPT-2 tiny", "bfloat16 parameters", "float32 parameters",
                  "Cost of `nonfinite` checking", "RL step, Qwen2 tiny"):
        assert title in md
    assert md.count("| family | implementation | ms / step |") == 2
    assert "| adamw | **poise** |" in md
    assert "device cpu" in proc.stdout  # the printed summary
    assert not [p for p in Path(res["args"]["out"]).iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_one_second_budget_skips_every_section_with_its_reason(tmp_path):
    t0 = time.monotonic()
    proc = run_script(tmp_path, "--budget-s", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert set(res["sections"]) == {"optimizers_bfloat16", "optimizers_float32", "nonfinite", "rl"}
    for key, sec in res["sections"].items():
        assert sec["status"] == "skipped", (key, sec)
        assert sec["reason"].startswith("budget:"), sec
        assert not sec.get("rows")
    assert res["env"]["elapsed_s"] < 5
    assert time.monotonic() - t0 < 60
    assert "Skipped: budget:" in (tmp_path / "gpu.md").read_text()


class ClockAfter:
    """A budget whose section deadlines pass after ``n`` questions (deterministic)."""

    def __init__(self, n: int):
        self.n = n

    def _tick(self) -> bool:
        self.n -= 1
        return self.n < 0

    def left(self, section: str) -> float:
        return 100.0

    def over(self, section: str) -> bool:
        return self._tick()

    def spent(self) -> bool:
        return False

    def elapsed(self) -> float:
        return 0.0


def test_an_optimizer_section_past_its_deadline_skips_the_rest_and_keeps_what_it_timed(tmp_path):
    gpu = load_gpu_module()
    args = gpu.parse(["--out", str(tmp_path), "--tiny", "--repeats", "5", "--warmup", "1"])
    args.hb_compile = False
    import torch

    res = {"_t0": time.monotonic(), "env": {}, "sections": {}, "args": vars(args)}
    gpu.save = lambda res, out: None  # nothing to write here
    gpu.optimizer_section("optimizers_float32", torch.float32, torch.device("cpu"), args, ClockAfter(2), res,
                          tmp_path)
    sec = res["sections"]["optimizers_float32"]
    assert [(r["family"], r["impl"]) for r in sec["rows"]] == [("adamw", "torch_fused"), ("adamw", "poise")]
    assert all(r["ms"] > 0 for r in sec["rows"])
    assert sec["skipped"] and all(s["reason"].startswith("budget:") for s in sec["skipped"])
    assert ("soap", "poise") in {(s["family"], s["impl"]) for s in sec["skipped"]}
    # past the deadline the rounds stop at the minimum of 3, not the 5 asked for
    assert sec["rounds"] == 3 and sec["stopped_early"] == "budget: 3 of 5 rounds"


def test_ratios_divide_by_torch_fused_adamw_and_by_the_fastest_peer_of_the_family():
    gpu = load_gpu_module()
    rows = [{"family": "adamw", "impl": "torch_fused", "peer": True, "ms": 2.0},
            {"family": "adamw", "impl": "poise", "peer": False, "ms": 3.0},
            {"family": "soap", "impl": "poise", "peer": False, "ms": 10.0},
            {"family": "soap", "impl": "a", "peer": True, "ms": 8.0},
            {"family": "soap", "impl": "b", "peer": True, "ms": 4.0},
            {"family": "soap", "impl": "broken", "peer": True, "ms": None},
            {"family": "muon", "impl": "poise", "peer": False, "ms": 6.0}]
    gpu.add_ratios(rows)
    by = {(r["family"], r["impl"]): r for r in rows}
    assert by[("adamw", "poise")]["x_torch_adamw"] == 1.5  # 3 / 2
    assert by[("soap", "poise")]["x_torch_adamw"] == 5.0  # 10 / 2
    assert by[("soap", "poise")]["x_fastest_peer"] == 2.5 and by[("soap", "poise")]["fastest_peer"] == "b"  # 10 / 4
    assert by[("soap", "a")]["x_fastest_peer"] == 2.0  # 8 / 4
    assert by[("adamw", "poise")]["x_fastest_peer"] == 1.5  # torch fused is AdamW's only peer
    assert by[("muon", "poise")]["x_fastest_peer"] is None  # no peer timed
    assert "x_fastest_peer" not in by[("soap", "broken")]


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    gpu = load_gpu_module()
    p = tmp_path / "gpu.json"
    p.write_text("old")
    gpu.write_atomic(p, '{"a": 1}')
    assert json.loads(p.read_text()) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["gpu.json"]


def test_bad_arguments_are_refused_naming_the_valid_choices(tmp_path, capsys):
    gpu = load_gpu_module()
    with pytest.raises(SystemExit):
        gpu.parse(["--out", str(tmp_path), "--sections", "optimizers,gpu"])
    assert "--sections gpu: valid choices are optimizers, nonfinite, rl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.parse(["--out", str(tmp_path), "--dtypes", "float16"])
    assert "valid choices are bfloat16, float32" in capsys.readouterr().err


# -- gpu_setup.sh ----------------------------------------------------------------------------------
def setup(*args: str, stub: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run gpu_setup.sh; with ``stub`` (a folder), a stand-in ``torch`` module is put first on the
    path so that the installer's logic is tested without paying for torch's import."""
    base = {**os.environ, "PYTHON": sys.executable}
    if stub is not None:
        (stub / "torch").mkdir(parents=True, exist_ok=True)
        (stub / "torch" / "__init__.py").write_text(
            "import types\n__version__ = '0.0-stub'\nversion = types.SimpleNamespace(cuda='12.8')\n"
            "cuda = types.SimpleNamespace(is_available=lambda: True)\n")
        base["PYTHONPATH"] = str(stub)
    return subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True, timeout=120,
                          env={**base, **env}, cwd=ROOT)


def fake_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding module ``name`` (``VALUE = 42``)."""
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return whl


bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@bash
def test_setup_with_everything_present_says_ready(tmp_path):
    p = setup(GPU_SETUP_MODULES="json math", GPU_SETUP_REQUIRED="json", GPU_SETUP_TARGET=str(tmp_path))
    assert p.returncode == 0, p.stderr
    import torch

    assert f"torch {torch.__version__} (CUDA {torch.version.cuda}): cuda available: {torch.cuda.is_available()}" \
        in p.stdout
    assert "all modules present: json math" in p.stdout
    assert f"PYTHONPATH={tmp_path}:src" in p.stdout and "benchmarks/gpu.py --out" in p.stdout


@bash
def test_setup_dry_run_prints_the_offline_pip_command_and_installs_nothing(tmp_path):
    wheels = tmp_path / "wheels"
    fake_wheel(wheels, "poisefakepeer")
    target = tmp_path / "site"
    p = setup(str(wheels), "--dry-run", stub=tmp_path / "stub", GPU_SETUP_MODULES="json poisefakepeer poisenowheel",
              GPU_SETUP_REQUIRED="json", GPU_SETUP_TARGET=str(target))
    assert p.returncode == 0, p.stderr
    assert "missing: poisefakepeer poisenowheel" in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("dry run, would run:"))
    assert f"-m pip install -q --no-index --find-links {wheels} --no-deps" in line
    assert line.endswith(f"--target {target} poisefakepeer")
    assert f"no wheel for poisenowheel in {wheels}" in p.stdout
    assert "still missing: poisenowheel" in p.stdout
    assert not target.exists()


@bash
def test_setup_installs_a_missing_module_from_the_wheel_folder(tmp_path):
    wheels = tmp_path / "wheels"
    fake_wheel(wheels, "poisefakepeer")
    target = tmp_path / "site"
    p = setup(str(wheels), stub=tmp_path / "stub", GPU_SETUP_MODULES="json poisefakepeer",
              GPU_SETUP_REQUIRED="poisefakepeer",
              GPU_SETUP_TARGET=str(target))
    assert p.returncode == 0, p.stdout + p.stderr
    assert (target / "poisefakepeer" / "__init__.py").read_text() == "VALUE = 42\n"
    assert "torch 0.0-stub (CUDA 12.8): cuda available: True" in p.stdout
    assert "still missing" not in p.stdout and "ready. Run:" in p.stdout


@bash
def test_setup_fails_when_a_required_module_has_no_wheel(tmp_path):
    p = setup(stub=tmp_path / "stub", GPU_SETUP_MODULES="json poisenowheel", GPU_SETUP_REQUIRED="poisenowheel",
              GPU_SETUP_TARGET=str(tmp_path / "site"))
    assert p.returncode == 1
    assert "required module poisenowheel is missing" in p.stderr
    assert "no wheel folder given" in p.stderr


@bash
def test_setup_refuses_bad_arguments_and_a_python_without_torch(tmp_path):
    p = setup("--bogus")
    assert p.returncode == 64 and "valid: WHEELDIR, --dry-run, --target DIR" in p.stderr
    p = setup(str(tmp_path / "absent"))
    assert p.returncode == 64 and "does not exist" in p.stderr
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    p = setup(PYTHON=str(fake))
    assert p.returncode == 2 and "cannot import torch" in p.stderr

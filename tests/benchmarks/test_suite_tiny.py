"""benchmarks/suite.py: the floors' arithmetic on hand-computable tensors, argument refusals, and one
``--tiny`` run end to end (JSON keys, poise ran in every family, finite ratios, the table and the plot)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "suite.py"


def _load():
    spec = importlib.util.spec_from_file_location("poise_bench_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


suite = _load()


def _named(*shapes):
    return [(f"t{i}", nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)]


def _ctx(low_rank=()):
    return suite.Context("mlp", 8, set(low_rank))


# ---- the floors' arithmetic ----------------------------------------------------------------------------------------

def test_adamw_moves_seven_float32_tensors_and_multiplies_nothing():
    w = suite.step_work("adamw", _named((3, 4), (3,)), _ctx())
    assert w.bytes == 7 * 4 * 15  # read p, g, m, v; write p, m, v; 15 entries
    assert w.matmuls == [] and w.decomps == []
    assert w.theory_state_bytes == 8 * 15


def test_stable_spam_reads_the_gradient_once_more():
    assert suite.step_work("stable_spam", _named((5,)), _ctx()).bytes == 8 * 4 * 5


def test_muon_counts_five_newton_schulz_iterations_on_the_short_side():
    w = suite.step_work("muon", _named((6, 4), (4,)), _ctx())
    # matrix: X is 4 x 6 after the transpose; each iteration X X^T (4,6,4), A A (4,4,4), B X (4,4,6)
    assert [(m, k, n, c) for m, k, n, c, _ in w.matmuls] == [(4, 6, 4, 1.0), (4, 4, 4, 1.0), (4, 4, 6, 1.0)] * 5
    assert w.bytes == 5 * 4 * 24 + 7 * 4 * 4  # matrix: g, buf r/w, p r/w; the bias is AdamW's
    flops = sum(c * 2 * m * k * n for m, k, n, c, _ in w.matmuls)
    assert flops == 5 * 2 * (4 * 6 * 4 + 4 * 4 * 4 + 4 * 4 * 6)


def test_soap_counts_rotations_grams_and_the_amortised_refresh():
    w = suite.step_work("soap", _named((2, 3)), _ctx())
    f = suite.HYPER["soap"]["precondition_frequency"]
    got = sorted((m, k, n, round(c, 6)) for m, k, n, c, _ in w.matmuls)
    want = sorted([(3, 2, 2, 2.0), (2, 3, 2, 1.0), (2, 2, 2, 1 / f), (3, 2, 2, 2 / f),   # dim 0 (d = 2)
                   (2, 3, 3, 2.0), (3, 2, 3, 1.0), (3, 3, 3, 1 / f), (2, 3, 3, 2 / f)])  # dim 1 (d = 3)
    assert got == [(m, k, n, round(c, 6)) for m, k, n, c in want]
    assert w.bytes == 4 * (7 * 6 + 3 * (4 + 9))
    assert sorted(w.decomps) == [("qr", (2, 2), 1 / f), ("qr", (3, 3), 1 / f)]


def test_galore_projects_only_the_named_matrices():
    named = _named((16, 4), (4,))
    w = suite.step_work("galore_adamw", named, _ctx({"t0"}))
    r = suite.galore_rank(8, named[0][1])  # width 8 -> 2, under both sides
    assert r == 2
    # 16 x 4, rows >= cols: right projection, R = G P^T (16 x 2), back N P
    assert [(m, k, n) for m, k, n, _, _ in w.matmuls] == [(16, 4, 2), (16, 2, 4)]
    assert w.bytes == 4 * (3 * 64 + 2 * 4 + 4 * 16 * 2) + 7 * 4 * 4
    assert w.decomps == [("svd", (16, 4), 1 / suite.HYPER["galore_adamw"]["update_proj_gap"])]


def test_floor_is_the_larger_of_bandwidth_and_matmul_time():
    floors = suite.Floors(1 << 16, budget_s=0.001)
    work = suite.Work(bytes=1e6, matmuls=[(64, 64, 64, 2.0, ("float32",))], decomps=[], theory_state_bytes=0.0)
    fl = floors.floor(work, 100)
    bw_ms = 1e6 / (floors.bandwidth["used_GBps"] * 1e9) * 1e3
    assert fl["bandwidth_ms"] == pytest.approx(bw_ms)
    assert fl["matmul_ms"] == pytest.approx(2 * floors.mm_cache[(64, 64, 64, "float32")] * 1e3)
    assert fl["floor_ms"] == pytest.approx(max(fl["bandwidth_ms"], fl["matmul_ms"]))
    assert fl["matmul_flops"] == 2 * 2 * 64**3


def test_state_bytes_counts_each_storage_once_and_skips_parameters():
    p = nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(10)
    opt.step()
    assert suite.state_bytes(opt, [p]) == 2 * 10 * 4 + 4  # exp_avg, exp_avg_sq, the step scalar
    opt.state[p]["alias"] = opt.state[p]["exp_avg"]
    opt.state[p]["param"] = p
    assert suite.state_bytes(opt, [p]) == 2 * 10 * 4 + 4


@pytest.mark.parametrize("argv, needle", [
    (["--families", "adamw,nope"], "valid choices"),
    (["--shapes", "cube"], "valid choices"),
    (["--sizes", "XL"], "parameter count"),
    (["--repeats", "0"], ">= 1"),
])
def test_bad_arguments_are_refused_with_the_valid_choices(argv, needle, capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(argv)
    assert needle in capsys.readouterr().err


# ---- one tiny run, end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    proc = subprocess.run([sys.executable, str(SUITE), "--tiny", "--threads", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "suite.json").read_text())


@pytest.mark.slow
def test_tiny_json_has_the_run_description(tiny):
    _, res = tiny
    assert set(res) == {"meta", "summary", "rows", "floors"}
    meta = res["meta"]
    for key in ("date", "command", "cpu", "threads", "versions", "repeats", "warmup", "bandwidth", "hyper",
                "alignment", "implementations", "models", "gemm_ms", "floor_rule", "wall_s"):
        assert key in meta, key
    assert meta["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert meta["threads"] == 1 and meta["repeats"] == 2 and meta["tiny"] is True
    assert "--tiny" in meta["command"]
    assert meta["bandwidth"]["used_GBps"] > 0


@pytest.mark.slow
def test_tiny_poise_ran_in_every_family_shape_and_size(tiny):
    _, res = tiny
    fams = set(res["meta"]["families"])
    assert {"adamw", "soap", "stable_spam", "galore_adamw", "muon", "spam"} <= fams
    assert ("psgd_kron" in fams) == (suite.poise_psgd_kron() is not None)
    cells = {(s["family"], s["shape"], s["size"]) for s in res["summary"]}
    assert cells == {(f, sh, sz) for f in fams for sh in ("mlp", "transformer", "conv") for sz in ("S", "M", "L")}
    for s in res["summary"]:
        where = (s["family"], s["shape"], s["size"])
        assert s["poise_error"] is None, (where, s["poise_error"])
        for key in ("poise_ms", "floor_ms", "poise_over_floor"):
            assert s[key] is not None and math.isfinite(s[key]) and s[key] > 0, (where, key, s[key])
        if s["fastest_peer"] is not None:
            assert math.isfinite(s["poise_over_peer"]) and s["poise_over_peer"] > 0, where
            # poise without its finiteness check, timed beside it, is never taken for a peer
            assert not s["fastest_peer"].startswith("poise"), where
            assert math.isfinite(s["unchecked_over_peer"]) and s["unchecked_over_peer"] > 0, where
    # torch's AdamW is always there: every AdamW cell has a peer and a ratio
    assert all(s["fastest_peer"] in ("torch_fused", "torch_foreach") for s in res["summary"] if s["family"] == "adamw")
    # poise's rows time exactly `repeats` steps; the sizes span about 10x in parameters per shape
    for r in res["rows"]:
        if r["impl"] == "poise":
            assert r["n"] == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    for shape in ("mlp", "transformer", "conv"):
        n = {m["size"]: m["n_params"] for m in res["meta"]["models"] if m["shape"] == shape}
        assert 5 <= n["L"] / n["S"] <= 20, (shape, n)


@pytest.mark.slow
def test_tiny_state_bytes_match_the_algorithm_for_elementwise_families(tiny):
    _, res = tiny
    for s in res["summary"]:
        if s["family"] in ("adamw", "spam", "stable_spam", "muon"):
            assert s["state_bpp"] == pytest.approx(s["theory_state_bpp"], rel=0.1), s


@pytest.mark.slow
def test_tiny_writes_the_table_and_the_plot(tiny):
    out, res = tiny
    md = (out / "suite.md").read_text()
    assert "| family | shape | size | params | poise ms [IQR] | fastest peer" in md
    for s in res["summary"]:
        assert f"| {s['family']} | {s['shape']} | {s['size']} |" in md
    png = (out / "suite.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

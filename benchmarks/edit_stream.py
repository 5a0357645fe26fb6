"""Sequential editing at scale: RLSEdit's per-edit cost does not grow with the number of edits.

    python benchmarks/edit_stream.py [--edits 10000] [--dim 1024] [--keys-per-edit 1]

Applies ``--edits`` edits one after another to a ``dim x dim`` layer with
:class:`poise.edit.RLSEditor` (float64) and reports the mean time per edit over the first and
the last thousand. Beside it, in the same process, the alternative that gives the same
weights: re-solving the regularised least squares from scratch after an edit (accumulate
``K K^T`` and ``V K^T``, one Cholesky solve of the ``dim x dim`` system), timed at several
points of the stream; and the weights of both compared at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from poise.edit import RLSEditor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--keys-per-edit", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    d, u, D = a.dim, a.keys_per_edit, torch.float64
    W0 = torch.randn(d, d, generator=g, dtype=D) / d**0.5
    K0 = torch.randn(d, 256, generator=g, dtype=D)
    lam, mu = 1.0, 0.1
    ed = RLSEditor(W0, K0, lam, mu)
    A = lam**2 * torch.eye(d, dtype=D) + mu**2 * K0 @ K0.T
    B = lam**2 * W0 + mu**2 * W0 @ K0 @ K0.T
    times: list[float] = []
    scratch: list[tuple[int, float]] = []
    checkpoints = {1, a.edits // 2, a.edits}
    for i in range(1, a.edits + 1):
        K = torch.randn(d, u, generator=g, dtype=D) / d**0.5
        V = torch.randn(d, u, generator=g, dtype=D)
        t0 = time.perf_counter()
        ed.edit(K, V)
        times.append(time.perf_counter() - t0)
        A += K @ K.T
        B += V @ K.T
        if i in checkpoints:
            t0 = time.perf_counter()
            L = torch.linalg.cholesky(A)
            W_scratch = torch.cholesky_solve(B.T, L).T
            scratch.append((i, time.perf_counter() - t0))
    err = float((ed.W - W_scratch).abs().max() / W_scratch.abs().max())
    first = statistics.mean(times[:1000]) * 1e3
    last = statistics.mean(times[-1000:]) * 1e3
    print(f"RLSEdit, {a.edits} sequential edits of {u} key(s) on a {d}x{d} layer (float64, {a.threads} threads)")
    print(f"  mean ms per edit: first 1000 {first:.3f}, last 1000 {last:.3f} (ratio last/first {last / first:.2f})")
    for i, s in scratch:
        print(f"  re-solving from scratch after edit {i}: {s * 1e3:.1f} ms = {s * 1e3 / last:.0f}x an RLSEdit step")
    print(f"  final weights, recursion vs from scratch: max relative difference {err:.1e}")


if __name__ == "__main__":
    main()

"""SpMV benchmark: our numpy ``csr_matvec`` vs ``scipy.sparse`` vs the article's dict-of-keys loop.

    python benchmarks/sparse_spmv.py          # writes benchmarks/results/sparse_spmv.json

Times are the best of several repeats, measured in one run so that ratios compare like with like.
Effective bandwidth counts the bytes an SpMV must move at least once: data, indices and indptr of A,
plus x and y (x is re-read through the cache, counted once).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, copy_bandwidth, write_result  # noqa: E402

from llmspace.sparse import CSR, csr_matvec  # noqa: E402


def uniform(n: int, density: float, rng) -> sp.csr_matrix:
    return sp.random(n, n, density=density, format="csr", dtype=np.float64, random_state=rng)


def power_law(n: int, mean_row: int, rng) -> sp.csr_matrix:
    """Row lengths from a Zipf-like law (a few very long rows, many short ones), columns uniform."""
    lengths = np.minimum(rng.zipf(1.8, n), n)
    lengths = np.maximum(1, (lengths * (mean_row * n / lengths.sum())).astype(int))
    lengths = np.minimum(lengths, n)
    rows = np.repeat(np.arange(n), lengths)
    cols = rng.integers(0, n, rows.shape[0])
    m = sp.csr_matrix((rng.standard_normal(rows.shape[0]), (rows, cols)), shape=(n, n))
    m.sum_duplicates()
    return m


def dok_matvec(A: dict, v, n_rows: int) -> list:
    """The article's approach on a dict of keys: a Python loop over every stored entry."""
    y = [0.0] * n_rows
    for (i, j), value in A.items():
        y[i] += value * v[j]
    return y


def spmv_bytes(m: sp.csr_matrix) -> int:
    return m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + m.shape[1] * 8 + m.shape[0] * 8


def measure(name: str, m: sp.csr_matrix, rng, with_dok: bool) -> dict:
    ours = CSR.from_scipy(m)
    x = rng.standard_normal(m.shape[1])
    assert np.allclose(csr_matvec(ours, x), m @ x)
    t_scipy = best_time(lambda: m @ x)
    t_ours = best_time(lambda: csr_matvec(ours, x))
    row = {"matrix": name, "shape": list(m.shape), "nnz": int(m.nnz),
           "scipy_ms": t_scipy * 1e3, "ours_ms": t_ours * 1e3, "ours_over_scipy": t_ours / t_scipy,
           "bytes_moved": spmv_bytes(m),
           "scipy_GBps": spmv_bytes(m) / t_scipy / 1e9, "ours_GBps": spmv_bytes(m) / t_ours / 1e9}
    if with_dok:
        coo = m.tocoo()
        dok = {(int(i), int(j)): float(v) for i, j, v in zip(coo.row, coo.col, coo.data)}
        xs = x.tolist()
        t_dok = best_time(lambda: dok_matvec(dok, xs, m.shape[0]), repeat=3, min_seconds=0.5)
        row.update(dok_ms=t_dok * 1e3, dok_over_ours=t_dok / t_ours)
    return row


def main() -> None:
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth()
    rows = [
        measure("uniform 2k x 2k, 1%", uniform(2_000, 0.01, rng), rng, with_dok=True),
        measure("uniform 20k x 20k, 1%", uniform(20_000, 0.01, rng), rng, with_dok=False),
        measure("power-law rows 20k x 20k, mean 200/row", power_law(20_000, 200, rng), rng, with_dok=False),
    ]
    path = write_result("sparse_spmv", {"copy_bandwidth_GBps": bandwidth, "results": rows,
                                        "settings": {"dtype": "float64", "timing": "best of 7"}})
    print(f"copy bandwidth (1 thread): {bandwidth:.1f} GB/s")
    for r in rows:
        extra = f"  dict loop {r['dok_ms']:.1f} ms ({r['dok_over_ours']:.0f}x ours)" if "dok_ms" in r else ""
        print(f"{r['matrix']:<40} nnz={r['nnz']:>9,}  scipy {r['scipy_ms']:7.2f} ms  ours {r['ours_ms']:7.2f} ms"
              f"  ratio {r['ours_over_scipy']:.2f}  ({r['scipy_GBps']:.1f} vs {r['ours_GBps']:.1f} GB/s){extra}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

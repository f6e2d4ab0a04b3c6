"""Checks for chapter 1 (ex01_sparse). References: numpy dense arithmetic for the warm-ups,
``scipy.sparse`` for every CSR/CSC result."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from autograder.checks import Checker, direction, show
from llmspace.sparse import COO, CSC, CSR

_ITEMS_HINT = ("dict.items() yields (key, value) pairs whose key is the tuple (i, j): "
               "unpack them as `for (i, j), value in A.items()`.")


# ---- warm-ups ------------------------------------------------------------------------------------

def _dok_reference(A: dict, B: dict) -> dict:
    keys = list(A) + list(B)
    shape = (max((i for i, _ in keys), default=0) + 1, max((j for _, j in keys), default=0) + 1)
    dense = np.zeros(shape, dtype=np.result_type(*[type(v) for v in [*A.values(), *B.values(), 0]]))
    for M in (A, B):
        for (i, j), v in M.items():
            dense[i, j] += v
    return {(int(i), int(j)): dense[i, j].item() for i, j in zip(*np.nonzero(dense))}


def _random_dok(rng, n, shape, ints):
    keys = {(int(rng.integers(shape[0])), int(rng.integers(shape[1]))) for _ in range(n)}
    return {k: (int(rng.integers(-5, 6)) if ints else float(rng.standard_normal())) for k in keys}


def check_sparse_matrix_add(impl, *, hidden: bool = False) -> None:
    """Dict-of-keys addition: sums on shared keys, zeros dropped, inputs untouched."""
    c = Checker("sparse_matrix_add", impl, hidden)
    if not hidden:
        cases = [
            ("overlapping keys", {(0, 0): 1, (1, 2): 3}, {(0, 0): 2, (2, 1): 4}),
            ("entries that cancel are dropped", {(0, 1): 1.5}, {(0, 1): -1.5, (1, 1): 2.0}),
        ]
    else:
        rng = np.random.default_rng(1)
        A = _random_dok(rng, 60, (12, 9), ints=True)
        B = {k: -v for k, v in list(A.items())[:20]}  # 20 exact cancellations
        B.update(_random_dok(rng, 40, (12, 9), ints=True))
        cases = [
            ("both empty", {}, {}),
            ("one empty", {}, {(3, 4): 2.5}),
            ("B empty: still a new dict", {(1, 1): 2, (0, 3): -1.5}, {}),
            ("keys only in B", {(0, 0): 1}, {(5, 5): 1, (7, 0): -2}),
            ("zero values in the inputs are not entries", {(0, 0): 0, (1, 1): 1}, {(2, 2): 0.0}),
            ("random integers with cancellations", A, B),
            ("random floats", _random_dok(rng, 80, (30, 30), False), _random_dok(rng, 80, (30, 30), False)),
        ]
    for name, A, B in cases:
        A0, B0 = A, B
        got = c.call(name, A, B, hint=_ITEMS_HINT, new=True)
        c.expect_type(name, got, dict, (A0, B0))
        expected = _dok_reference(A0, B0)
        if set(got) != set(expected):
            extra = sorted(set(got) - set(expected))
            missing = sorted(set(expected) - set(got))
            detail = []
            if extra:
                zero = all(got[k] == 0 for k in extra)
                detail.append("unexpected keys" + ("" if hidden else f" {extra}")
                              + (" whose value is 0 — drop entries that sum to zero" if zero else ""))
            if missing:
                detail.append("missing keys" + ("" if hidden else f" {missing}"))
            c.fail(name, "; ".join(detail), (A0, B0))
        for k, v in expected.items():
            if not np.isclose(got[k], v, rtol=1e-12, atol=1e-12):
                c.expect_number(name, got[k], v, (A0, B0), what=f"the value at {k}" if not hidden else "a value",
                                rtol=1e-12, atol=1e-12)


def check_matrix_vector_multiply(impl, *, hidden: bool = False) -> None:
    """List-of-rows matrix times a vector: returns a list, rejects mismatched lengths."""
    c = Checker("matrix_vector_multiply", impl, hidden)
    if not hidden:
        cases = [("2x3 integers", [[1, 2, 3], [4, 5, 6]], [1, 0, -1]),
                 ("identity", [[1.0, 0.0], [0.0, 1.0]], [2.5, -3.0])]
    else:
        rng = np.random.default_rng(2)
        cases = [("1x1", [[3]], [4]),
                 ("single column", [[1], [2], [3]], [2]),
                 ("zero rows", [], [1, 2]),
                 ("random 7x11 floats", rng.standard_normal((7, 11)).tolist(),
                  rng.standard_normal(11).tolist()),
                 ("random 20x5 integers", rng.integers(-9, 10, (20, 5)).tolist(),
                  rng.integers(-9, 10, 5).tolist())]
    for name, A, v in cases:
        got = c.call(name, A, v)
        if isinstance(got, dict):
            c.fail(name, "must return a list, got dict — y is a vector indexed 0..n_rows-1, "
                         "so build it with a list (`result.append(row_sum)`)", (A, v))
        c.expect_type(name, got, list, (A, v))
        expected = (np.asarray(A, dtype=float).reshape(len(A), len(v)) @ np.asarray(v, float)).tolist()
        if len(got) != len(expected):
            c.fail(name, f"returned {len(got)} values, expected one per row ({len(expected)})", (A, v))
        if not np.allclose(got, expected, rtol=1e-12, atol=1e-12):
            way = direction(got, expected)
            c.fail(name, "wrong values" + ("" if hidden else f": got {show(got)}, expected {show(expected)}")
                   + (f"; the result {way}" if way else ""), (A, v))
    if hidden:
        c.expect_raises("row longer than v", ValueError, [[1, 2, 3]], [1, 2],
                        what="a row's length must equal len(v)")
        c.expect_raises("row shorter than v", ValueError, [[1, 2], [3]], [1, 2],
                        what="a row's length must equal len(v)")


# ---- formats -------------------------------------------------------------------------------------

def _random_sparse(rng, shape, density, dtype=np.float64, duplicates=False):
    """Random scipy COO; with duplicates, repeated (row, col) pairs in shuffled order."""
    nnz = int(round(density * shape[0] * shape[1]))
    row = rng.integers(0, max(shape[0], 1), nnz) if shape[0] else np.zeros(0, int)
    col = rng.integers(0, max(shape[1], 1), nnz) if shape[1] else np.zeros(0, int)
    if not duplicates:
        keys = np.unique(row * max(shape[1], 1) + col)
        rng.shuffle(keys)
        row, col = keys // max(shape[1], 1), keys % max(shape[1], 1)
    if np.dtype(dtype).kind in "iu":
        data = rng.integers(-9, 10, row.shape[0]).astype(dtype)
    else:
        data = rng.standard_normal(row.shape[0]).astype(dtype)
    return sp.coo_matrix((data, (row, col)), shape=shape)


def _canonical(m):
    m = m.copy()
    m.sum_duplicates()
    m.sort_indices()
    return m


def _expect_compressed(c: Checker, case, got, expected, cls, args=None, *, index_dtype=None):
    """got (our CSR/CSC) must equal the canonical scipy matrix ``expected`` array for array; with
    ``index_dtype``, both index arrays must have that dtype."""
    c.expect_type(case, got, cls, args)
    if tuple(got.shape) != tuple(expected.shape):
        c.fail(case, f"shape is {got.shape}, expected {expected.shape}", args)
    if got.data.dtype != expected.data.dtype:
        c.fail(case, f"data has dtype {got.data.dtype}, expected {expected.data.dtype}", args)
    c.expect_array(case, np.asarray(got.indptr), expected.indptr, args, what="indptr",
                   exact=True, check_dtype=False)
    c.expect_array(case, np.asarray(got.indices), expected.indices, args,
                   what="indices (canonical order: increasing within each row/column)",
                   exact=True, check_dtype=False)
    # duplicates may be summed in another order than scipy's: allow a few ulps of the value dtype
    tol = 1e-5 if expected.data.dtype.kind == "f" and expected.data.dtype.itemsize < 8 else 1e-12
    c.expect_array(case, got.data, expected.data, args, what="data", rtol=tol, atol=tol)
    if index_dtype is not None:
        for what in ("indptr", "indices"):
            if getattr(got, what).dtype != index_dtype:
                c.fail(case, f"{what} has dtype {getattr(got, what).dtype}, expected {np.dtype(index_dtype)} "
                             f"(int32 unless nnz or n_cols needs int64: half the index bytes)", args)


def _coo_cases(hidden):
    rng = np.random.default_rng(3 if hidden else 4)
    if not hidden:
        unsorted = COO(np.array([2, 0, 2, 0]), np.array([1, 3, 0, 3]), np.array([5.0, 1.0, 7.0, 2.0]), (3, 4))
        return [("unsorted with a duplicate", unsorted),
                ("random 6x5", COO.from_scipy(_random_sparse(rng, (6, 5), 0.3)))]
    m = _random_sparse(rng, (40, 30), 0.2, duplicates=True)
    cases = [
        ("empty matrix", COO(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0), (4, 3))),
        ("0 x 0", COO(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), (0, 0))),
        ("1 x n", COO.from_scipy(_random_sparse(rng, (1, 50), 0.3))),
        ("n x 1", COO.from_scipy(_random_sparse(rng, (50, 1), 0.3))),
        ("trailing empty rows", COO(np.array([0, 1]), np.array([0, 0]), np.array([1.0, 2.0]), (6, 2))),
        ("every entry on one cell", COO(np.zeros(5, int), np.zeros(5, int), np.arange(1.0, 6.0), (2, 2))),
        ("duplicates that cancel stay as explicit zero",
         COO(np.array([1, 1, 0]), np.array([1, 1, 0]), np.array([2.0, -2.0, 1.0]), (2, 2))),
        ("random 40x30 with duplicates, shuffled", COO(m.row, m.col, m.data, m.shape)),
        ("int16 values", COO.from_scipy(_random_sparse(rng, (9, 9), 0.4, dtype=np.int16, duplicates=True))),
        ("float32 values", COO.from_scipy(_random_sparse(rng, (9, 17), 0.2, dtype=np.float32))),
        ("n_cols beyond int32 needs int64 indices",
         COO(np.array([1, 0, 1]), np.array([2**31 + 5, 7, 3]), np.array([1.0, 2.0, 3.0]), (2, 2**31 + 9))),
    ]
    return cases


def check_coo_to_csr(impl, *, hidden: bool = False) -> None:
    """COO → canonical CSR with duplicates summed (reference: scipy ``coo_matrix.tocsr``)."""
    c = Checker("coo_to_csr", impl, hidden)
    for name, A in _coo_cases(hidden):
        got = c.call(name, A)
        expected = _canonical(sp.coo_matrix((A.data, (A.row, A.col)), shape=A.shape).tocsr())
        nnz = expected.nnz
        index = np.int32 if max(A.shape[1], nnz) <= np.iinfo(np.int32).max else np.int64
        _expect_compressed(c, name, got, expected, CSR, (A,), index_dtype=index)


def _csr_cases(hidden):
    rng = np.random.default_rng(5 if hidden else 6)
    if not hidden:
        return [("3x4 example", CSR.from_dense(np.array([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 4, 0, 5]]))),
                ("random 8x6", CSR.from_scipy(_random_sparse(rng, (8, 6), 0.3)))]
    return [
        ("all zeros", CSR.from_dense(np.zeros((5, 4)))),
        ("empty first and last columns", CSR.from_dense(np.array([[0, 1, 0], [0, 2, 0], [0, 0, 0.0]]))),
        ("1 x n", CSR.from_scipy(_random_sparse(rng, (1, 40), 0.4))),
        ("n x 1", CSR.from_scipy(_random_sparse(rng, (40, 1), 0.4))),
        ("random 60x45", CSR.from_scipy(_random_sparse(rng, (60, 45), 0.1))),
        ("int32 values", CSR.from_scipy(_random_sparse(rng, (12, 12), 0.3, dtype=np.int32))),
        ("unsorted column indices within rows", CSR(np.array([0, 3, 5]), np.array([4, 0, 2, 3, 1]),
                                                      np.arange(1.0, 6.0), (2, 5))),
    ]


def _expect_csc_keeping_duplicates(c: Checker, case, got, A: CSR, args):
    """CSC of A with every stored entry kept: indptr exact, rows non-decreasing within each column, and
    per column the same (row, value) pairs as scipy's ``tocsc`` (duplicates in any order)."""
    expected = A.to_scipy().tocsc()          # keeps duplicates and explicit zeros
    c.expect_type(case, got, CSC, args)
    if tuple(got.shape) != tuple(expected.shape):
        c.fail(case, f"shape is {got.shape}, expected {expected.shape} (CSC keeps (n_rows, n_cols))", args)
    if got.data.dtype != expected.data.dtype:
        c.fail(case, f"data has dtype {got.data.dtype}, expected {expected.data.dtype}", args)
    if got.nnz != expected.nnz:
        c.fail(case, f"{got.nnz} stored entries, expected {expected.nnz}: keep every stored entry of A "
                     f"(explicit zeros and duplicates included)", args)
    c.expect_array(case, np.asarray(got.indptr), expected.indptr, args, what="indptr", exact=True,
                   check_dtype=False)
    cols = np.repeat(np.arange(A.shape[1]), np.diff(expected.indptr))
    rows = np.asarray(got.indices)
    if np.any((np.diff(rows) < 0) & (cols[1:] == cols[:-1])):
        c.fail(case, "row indices must increase within each column (a stable sort by column keeps "
                     "the rows in order)", args)
    ours = np.lexsort((got.data, rows, cols))
    theirs = np.lexsort((expected.data, expected.indices, cols))
    c.expect_array(case, rows[ours], expected.indices[theirs].astype(rows.dtype), args, what="indices",
                   exact=True, check_dtype=False)
    c.expect_array(case, got.data[ours], expected.data[theirs], args, what="data", exact=True)


def check_csr_to_csc(impl, *, hidden: bool = False) -> None:
    """CSR → CSC with every entry kept (reference: scipy ``csr_matrix.tocsc``)."""
    c = Checker("csr_to_csc", impl, hidden)
    cases = _csr_cases(hidden)
    if hidden:
        cases += [
            ("duplicates are kept as separate entries",
             CSR(np.array([0, 3, 4, 6]), np.array([1, 1, 0, 1, 2, 2]), np.arange(1.0, 7.0), (3, 3))),
            ("explicit zeros are kept", CSR(np.array([0, 2, 3]), np.array([0, 2, 1]), np.array([0.0, 1.0, 0.0]),
                                            (2, 3))),
            ("trailing empty columns", CSR.from_dense(np.array([[1.0, 0, 0, 0], [2, 3, 0, 0]]))),
        ]
    for name, A in cases:
        got = c.call(name, A)
        _expect_csc_keeping_duplicates(c, name, got, A, (A,))


def check_sparse_add(impl, *, hidden: bool = False) -> None:
    """CSR + CSR with zeros dropped (reference: scipy ``A + B`` then ``eliminate_zeros``)."""
    c = Checker("sparse_add", impl, hidden, builds_on=("coo_to_csr",))
    rng = np.random.default_rng(7 if hidden else 8)
    if not hidden:
        A = CSR.from_dense(np.array([[1.0, 0, 2], [0, 3, 0]]))
        B = CSR.from_dense(np.array([[0.0, 5, -2], [0, 1, 0]]))
        cases = [("2x3 with a cancellation", A, B),
                 ("random 10x10", CSR.from_scipy(_random_sparse(rng, (10, 10), 0.3)),
                  CSR.from_scipy(_random_sparse(rng, (10, 10), 0.3)))]
    else:
        R = CSR.from_scipy(_random_sparse(rng, (30, 20), 0.2))
        neg = CSR(R.indptr, R.indices, -R.data, R.shape)
        cases = [
            ("A + (-A) is empty", R, neg),
            ("both empty", CSR.from_dense(np.zeros((3, 3))), CSR.from_dense(np.zeros((3, 3)))),
            ("disjoint patterns", CSR.from_dense(np.eye(4)), CSR.from_dense(np.fliplr(np.eye(4)) * 2)),
            ("explicit zeros in the inputs", CSR(np.array([0, 2, 2]), np.array([0, 1]), np.array([0.0, 1.0]), (2, 2)),
             CSR(np.array([0, 0, 1]), np.array([0]), np.array([0.0]), (2, 2))),
            ("random 50x40", CSR.from_scipy(_random_sparse(rng, (50, 40), 0.1)),
             CSR.from_scipy(_random_sparse(rng, (50, 40), 0.1))),
            ("int32 + float32 → float64", CSR.from_scipy(_random_sparse(rng, (8, 8), 0.4, np.int32)),
             CSR.from_scipy(_random_sparse(rng, (8, 8), 0.4, np.float32))),
            ("1 x n", CSR.from_scipy(_random_sparse(rng, (1, 30), 0.5)),
             CSR.from_scipy(_random_sparse(rng, (1, 30), 0.5))),
            ("float32 stays float32", CSR.from_scipy(_random_sparse(rng, (9, 7), 0.3, np.float32)),
             CSR.from_scipy(_random_sparse(rng, (9, 7), 0.3, np.float32))),
            ("int64 stays int64", CSR.from_scipy(_random_sparse(rng, (9, 7), 0.3, np.int64)),
             CSR.from_scipy(_random_sparse(rng, (9, 7), 0.3, np.int64))),
        ]
    for name, A, B in cases:
        got = c.call(name, A, B)
        dtype = np.result_type(A.data, B.data)
        expected = (A.to_scipy().astype(dtype) + B.to_scipy().astype(dtype)).tocsr()
        expected.eliminate_zeros()
        _expect_compressed(c, name, got, _canonical(expected), CSR, (A, B))
    if hidden:
        c.expect_raises("shape mismatch", ValueError, CSR.from_dense(np.eye(2)), CSR.from_dense(np.eye(3)),
                        what="A and B must have the same shape")
        c.expect_raises("B smaller than A", ValueError, CSR.from_dense(np.eye(3)), CSR.from_dense(np.eye(2)),
                        what="A and B must have the same shape")


def _with_empty_rows(A: CSR, every: int) -> CSR:
    """A copy of ``A`` whose every ``every``-th row is empty."""
    m = A.to_scipy().tolil()
    m[::every] = 0
    m = m.tocsr()
    m.eliminate_zeros()
    return CSR(m.indptr, m.indices, m.data, m.shape)


def check_csr_matvec(impl, *, hidden: bool = False) -> None:
    """y = A @ x (reference: scipy ``csr_matrix @ x``); empty rows give 0; dtype follows numpy."""
    c = Checker("csr_matvec", impl, hidden)
    rng = np.random.default_rng(9 if hidden else 10)
    if not hidden:
        cases = [("3x4 example", CSR.from_dense(np.array([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 4, 0, 5]])),
                  np.array([1.0, 2.0, 3.0, 4.0])),
                 ("random 20x15", CSR.from_scipy(_random_sparse(rng, (20, 15), 0.2)), rng.standard_normal(15))]
    else:
        cases = [
            ("all zeros", CSR.from_dense(np.zeros((4, 3))), np.ones(3)),
            ("empty first and last rows", CSR.from_dense(np.array([[0.0, 0], [1, 2], [0, 0]])), np.array([3.0, 4])),
            ("1 x n", CSR.from_scipy(_random_sparse(rng, (1, 64), 0.3)), rng.standard_normal(64)),
            ("n x 1", CSR.from_scipy(_random_sparse(rng, (64, 1), 0.3)), np.array([2.0])),
            ("random 300x200, 2% dense", CSR.from_scipy(_random_sparse(rng, (300, 200), 0.02)),
             rng.standard_normal(200)),
            ("more than 65536 stored entries, empty rows", _with_empty_rows(
                CSR.from_scipy(_random_sparse(rng, (700, 300), 0.5)), every=7), rng.standard_normal(300)),
            ("integers stay integers", CSR.from_scipy(_random_sparse(rng, (10, 10), 0.3, np.int64)),
             rng.integers(-5, 6, 10)),
            ("float32 stays float32", CSR.from_scipy(_random_sparse(rng, (10, 10), 0.3, np.float32)),
             rng.standard_normal(10).astype(np.float32)),
            ("integer matrix times float vector is float64",
             CSR.from_scipy(_random_sparse(rng, (6, 5), 0.5, np.int32)), np.array([0.5, -1.25, 2.0, 0.1, 3.0])),
            ("float32 matrix times float64 vector is float64",
             CSR.from_scipy(_random_sparse(rng, (6, 5), 0.5, np.float32)), rng.standard_normal(5)),
            ("unsorted indices and duplicates", CSR(np.array([0, 3, 3, 5]), np.array([2, 0, 2, 1, 1]),
                                                   np.arange(1.0, 6.0), (3, 3)), np.array([1.0, 10, 100])),
        ]
    for name, A, x in cases:
        got = c.call(name, A, x)
        expected = np.asarray(A.to_scipy() @ x).astype(np.result_type(A.data, x))
        rtol = 1e-5 if expected.dtype == np.float32 else 1e-10
        c.expect_array(name, got, expected, (A, x), what="y", rtol=rtol, atol=rtol)
    if hidden:
        A = CSR.from_dense(np.eye(3))
        c.expect_raises("x too short", ValueError, A, np.ones(2), what="len(x) must equal n_cols")
        c.expect_raises("x is 2-D", ValueError, A, np.ones((3, 1)), what="x must be 1-D")
        c.expect_raises("x of strings", TypeError, A, np.array(["1", "2", "3"]), what="x must be numeric")

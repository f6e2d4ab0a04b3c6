"""llmspace.sparse against scipy.sparse (the reference), on random, adversarial and property-based inputs."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspace import sparse as S


def random_coo(rng, shape, nnz, dtype=np.float64):
    row = rng.integers(0, shape[0], nnz) if shape[0] else np.zeros(0, np.int64)
    col = rng.integers(0, shape[1], nnz) if shape[1] else np.zeros(0, np.int64)
    n = row.shape[0]
    data = rng.integers(-4, 5, n).astype(dtype) if np.dtype(dtype).kind in "iu" else rng.standard_normal(n).astype(dtype)
    return S.COO(row, col, data, shape)


def canonical(m):
    m = m.tocsr() if m.format != "csc" else m
    m = m.copy()
    m.sum_duplicates()
    m.sort_indices()
    return m


def assert_same(ours, ref):
    assert tuple(ours.shape) == ref.shape
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    assert ours.data.dtype == ref.data.dtype
    # summation order of duplicates may differ from scipy's: a few ulps of the value dtype
    rtol = 1e-12 if ref.data.dtype.itemsize >= 8 or ref.data.dtype.kind in "iu" else 1e-5
    np.testing.assert_allclose(ours.data, ref.data, rtol=rtol, atol=rtol)


coo_inputs = st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 60), st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(coo_inputs, st.sampled_from([np.float64, np.float32, np.int64, np.int16]))
def test_coo_to_csr_matches_scipy(params, dtype):
    n_rows, n_cols, nnz, seed = params
    if n_rows == 0 or n_cols == 0:
        nnz = 0
    A = random_coo(np.random.default_rng(seed), (n_rows, n_cols), nnz, dtype)
    ref = canonical(sp.coo_matrix((A.data, (A.row, A.col)), shape=A.shape).tocsr())
    assert_same(S.coo_to_csr(A), ref)


@settings(max_examples=150, deadline=None)
@given(coo_inputs)
def test_csr_to_csc_and_matvec_match_scipy(params):
    n_rows, n_cols, nnz, seed = params
    if n_rows == 0 or n_cols == 0:
        nnz = 0
    rng = np.random.default_rng(seed)
    A = S.coo_to_csr(random_coo(rng, (n_rows, n_cols), nnz))
    ref = A.to_scipy()
    csc = S.csr_to_csc(A)
    ref_csc = ref.tocsc()
    ref_csc.sort_indices()
    assert_same(csc, ref_csc)
    x = rng.standard_normal(n_cols)
    np.testing.assert_allclose(S.csr_matvec(A, x), ref @ x, rtol=1e-12, atol=1e-12)
    X = rng.standard_normal((n_cols, 3))
    np.testing.assert_allclose(S.csr_matmat(A, X), ref @ X, rtol=1e-12, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(coo_inputs, st.booleans())
def test_sparse_add_matches_scipy_and_drops_zeros(params, cancel):
    n_rows, n_cols, nnz, seed = params
    if n_rows == 0 or n_cols == 0:
        nnz = 0
    rng = np.random.default_rng(seed)
    A = S.coo_to_csr(random_coo(rng, (n_rows, n_cols), nnz, np.int64))
    B = S.CSR(A.indptr, A.indices, -A.data, A.shape) if cancel else \
        S.coo_to_csr(random_coo(rng, (n_rows, n_cols), nnz, np.int64))
    ref = (A.to_scipy() + B.to_scipy()).tocsr()
    ref.eliminate_zeros()
    ref.sort_indices()
    got = S.sparse_add(A, B)
    assert_same(got, ref)
    assert np.all(got.data != 0)
    if cancel:
        assert got.nnz == 0


def test_matvec_large_blocks_and_empty_rows():
    """Crosses csr_matvec's block boundary with empty rows at block edges (reference: scipy)."""
    rng = np.random.default_rng(1)
    m = sp.random(3000, 500, density=0.1, format="csr", random_state=rng)
    m = sp.vstack([sp.csr_matrix((7, 500)), m, sp.csr_matrix((5, 500))]).tocsr()
    keep = np.ones(m.shape[0])
    keep[100:140] = 0  # a run of empty rows in the middle
    m = (sp.diags(keep) @ m).tocsr()
    m.eliminate_zeros()
    A, x = S.CSR.from_scipy(m), rng.standard_normal(500)
    assert A.nnz > 2 * (1 << 16)
    np.testing.assert_allclose(S.csr_matvec(A, x), m @ x, rtol=1e-12, atol=1e-12)


def test_one_long_row_exceeding_a_block():
    m = sp.random(3, 200_000, density=0.5, format="csr", random_state=np.random.default_rng(2))
    x = np.arange(200_000, dtype=np.float64)
    np.testing.assert_allclose(S.csr_matvec(S.CSR.from_scipy(m), x), m @ x, rtol=1e-12)


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc"])
def test_roundtrip_dense_and_scipy(fmt):
    rng = np.random.default_rng(3)
    dense = rng.standard_normal((9, 7)) * (rng.random((9, 7)) < 0.3)
    cls = {"coo": S.COO, "csr": S.CSR, "csc": S.CSC}[fmt]
    ours = cls.from_dense(dense)
    np.testing.assert_array_equal(ours.to_dense(), dense)
    np.testing.assert_array_equal(ours.to_scipy().toarray(), dense)
    back = cls.from_scipy(getattr(sp, f"{fmt}_matrix")(dense))
    np.testing.assert_array_equal(back.to_dense(), dense)
    assert ours.nnz == np.count_nonzero(dense)


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc"])
def test_nbytes_matches_formula_and_scipy(fmt):
    m = sp.random(300, 200, density=0.05, format=fmt, dtype=np.float32, random_state=np.random.default_rng(4))
    ours = {"coo": S.COO, "csr": S.CSR, "csc": S.CSC}[fmt].from_scipy(m)
    scipy_bytes = m.data.nbytes + (m.row.nbytes + m.col.nbytes if fmt == "coo" else m.indices.nbytes + m.indptr.nbytes)
    assert ours.nbytes == scipy_bytes == S.format_bytes(fmt, 300, 200, m.nnz, 4, ours.data.itemsize and 4)


def test_break_even_density_values():
    assert S.break_even_density("csr", 2, 4) == pytest.approx(1 / 3)
    assert S.break_even_density("csr", 4, 4) == pytest.approx(1 / 2)
    assert S.break_even_density("coo", 2, 4) == pytest.approx(1 / 5)
    # at the break-even density the formula really crosses dense (large n: pointer array negligible)
    n = 4096
    below = S.format_bytes("csr", n, n, int(0.33 * n * n), 2, 4)
    above = S.format_bytes("csr", n, n, int(0.34 * n * n), 2, 4)
    assert below < S.dense_bytes(n, n, 2) < above
    with pytest.raises(ValueError, match="fmt"):
        S.break_even_density("bsr", 2, 4)


def test_float16_values_are_supported():
    """scipy.sparse has no float16; our formats store fp16 values (what LLM weights ship in)."""
    dense = np.array([[0, 1.5], [2.25, 0]], dtype=np.float16)
    A = S.CSR.from_dense(dense)
    assert A.data.dtype == np.float16 and A.nbytes == 3 * 4 + 2 * 4 + 2 * 2
    np.testing.assert_array_equal(S.csr_matvec(A, np.ones(2, np.float16)), np.array([1.5, 2.25], np.float16))


# ---- bad input: clear errors naming the problem ------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(indptr=[0, 1], indices=[0], data=[1.0], shape=(2, 2)), ValueError, "indptr must have 3 entries"),
    (dict(indptr=[1, 1, 1], indices=[], data=[], shape=(2, 2)), ValueError, r"indptr\[0\] must be 0"),
    (dict(indptr=[0, 2, 1], indices=[0, 1], data=[1.0, 2.0], shape=(2, 2)), ValueError, "non-decreasing"),
    (dict(indptr=[0, 1, 2], indices=[0, 5], data=[1.0, 2.0], shape=(2, 2)), ValueError, "indices out of range"),
    (dict(indptr=[0, 1, 2], indices=[0, -1], data=[1.0, 2.0], shape=(2, 2)), ValueError, "indices out of range"),
    (dict(indptr=[0, 1, 2], indices=[0.0, 1.0], data=[1.0, 2.0], shape=(2, 2)), TypeError, "integer dtype"),
    (dict(indptr=[0, 1, 2], indices=[0, 1], data=["a", "b"], shape=(2, 2)), TypeError, "numeric dtype"),
    (dict(indptr=[0, 1, 2], indices=[0, 1], data=[1.0], shape=(2, 2)), ValueError, "same length"),
    (dict(indptr=[0, 1, 3], indices=[0, 1], data=[1.0, 2.0], shape=(2, 2)), ValueError, r"indptr\[-1\] must equal nnz"),
    (dict(indptr=[0, 1, 2], indices=[0, 1], data=[1.0, 2.0], shape=(2, -2)), ValueError, "non-negative"),
    (dict(indptr=[0, 1, 2], indices=[0, 1], data=[1.0, 2.0], shape=(2,)), ValueError, "pair of ints"),
])
def test_csr_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        S.CSR(**kwargs)


def test_coo_validation():
    with pytest.raises(ValueError, match="row out of range"):
        S.COO([0, 3], [0, 0], [1.0, 1.0], (3, 3))
    with pytest.raises(ValueError, match="same length"):
        S.COO([0, 1], [0], [1.0, 1.0], (3, 3))
    with pytest.raises(ValueError, match="2-D"):
        S.CSR.from_dense(np.ones(3))


def test_operation_errors():
    A = S.CSR.from_dense(np.eye(3))
    with pytest.raises(ValueError, match=r"x must have shape \(3,\)"):
        S.csr_matvec(A, np.ones(4))
    with pytest.raises(TypeError, match="x must be numeric"):
        S.csr_matvec(A, np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match="A must be a CSR"):
        S.csr_matvec(A.to_scipy(), np.ones(3))
    with pytest.raises(ValueError, match="shape mismatch"):
        S.sparse_add(A, S.CSR.from_dense(np.eye(2)))
    with pytest.raises(ValueError, match=r"X must have shape \(3, k\)"):
        S.csr_matmat(A, np.ones((2, 2)))
    with pytest.raises(TypeError, match="A must be a COO"):
        S.coo_to_csr(A)


def test_warmups():
    assert S.sparse_matrix_add({(0, 0): 1, (1, 1): 2}, {(0, 0): -1, (2, 2): 3}) == {(1, 1): 2, (2, 2): 3}
    assert S.matrix_vector_multiply([[1, 2], [3, 4]], [1, 1]) == [3, 7]
    assert S.matrix_vector_multiply([], [1]) == []
    with pytest.raises(ValueError, match="row 0 has 2 entries but v has 3"):
        S.matrix_vector_multiply([[1, 2]], [1, 2, 3])


# ---- index arrays of any integer dtype (issue 11): cast like scipy, validate without wrap-around ------

INDEX_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@settings(max_examples=120, deadline=None)
@given(coo_inputs, st.sampled_from(INDEX_DTYPES))
def test_any_integer_index_dtype_matches_scipy(params, index_dtype):
    """Index arrays of every integer dtype (reference: scipy.sparse, which casts them to int32/int64)."""
    n_rows, n_cols, nnz, seed = params
    if n_rows == 0 or n_cols == 0:
        nnz = 0
    rng = np.random.default_rng(seed)
    ref = sp.random(n_rows, n_cols, density=min(1.0, nnz / max(1, n_rows * n_cols)), format="coo",
                    random_state=rng)
    row, col = ref.row.astype(index_dtype), ref.col.astype(index_dtype)
    ours_coo = S.COO(row, col, ref.data, ref.shape)
    ref_coo = sp.coo_matrix((ref.data, (row, col)), shape=ref.shape)
    assert ours_coo.row.dtype == ref_coo.row.dtype and ours_coo.col.dtype == ref_coo.col.dtype
    np.testing.assert_array_equal(ours_coo.to_dense(), ref_coo.toarray())
    assert_same(S.coo_to_csr(ours_coo), canonical(ref_coo.tocsr()))

    csr = ref.tocsr()
    indptr, indices = csr.indptr.astype(index_dtype), csr.indices.astype(index_dtype)
    ours = S.CSR(indptr, indices, csr.data, csr.shape)
    ref_csr = sp.csr_matrix((csr.data, indices, indptr), shape=csr.shape)
    assert ours.indptr.dtype == ref_csr.indptr.dtype and ours.indices.dtype == ref_csr.indices.dtype
    assert ours.nbytes == ref_csr.data.nbytes + ref_csr.indices.nbytes + ref_csr.indptr.nbytes
    np.testing.assert_array_equal(ours.to_dense(), ref_csr.toarray())
    x = rng.standard_normal(n_cols)
    np.testing.assert_allclose(S.csr_matvec(ours, x), ref_csr @ x, rtol=1e-12, atol=1e-12)
    ref_csc = ref_csr.tocsc()
    ref_csc.sort_indices()
    assert_same(S.csr_to_csc(ours), ref_csc)
    total = (ref_csr + ref_csr).tocsr()
    total.eliminate_zeros()
    assert_same(S.sparse_add(ours, ours), canonical(total))
    ours_csc = S.CSC(indptr, indices, csr.data, csr.shape[::-1])
    np.testing.assert_array_equal(ours_csc.to_dense(),
                                  sp.csc_matrix((csr.data, indices, indptr), shape=csr.shape[::-1]).toarray())


def _valid_as_python_ints(indptr, indices, n_minor):
    """The CSR invariants checked on Python ints, which cannot wrap around (the test's oracle)."""
    ip, ix = [int(v) for v in indptr], [int(v) for v in indices]
    return (ip[0] == 0 and all(a <= b for a, b in zip(ip, ip[1:])) and ip[-1] == len(ix)
            and all(0 <= i < n_minor for i in ix))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(INDEX_DTYPES), st.integers(1, 6), st.integers(1, 6), st.data())
def test_index_validation_cannot_wrap(index_dtype, n_rows, n_cols, data):
    """Arbitrary index values anywhere in each dtype's range: accepted exactly when the CSR invariants
    hold on (unwrapped) Python ints, and then equal to scipy.sparse's matrix (reference) — a decreasing
    uint32 indptr or an int8 indptr whose np.diff wraps around is rejected, not turned into garbage."""
    info = np.iinfo(index_dtype)
    small = st.integers(max(info.min, -3), min(info.max, 8))
    anywhere = st.integers(int(info.min), int(info.max))
    value = st.one_of(small, small, anywhere)
    indptr = [0] + data.draw(st.lists(value, min_size=n_rows, max_size=n_rows))
    nnz = data.draw(st.one_of(st.just(max(0, min(indptr[-1], 40))), st.integers(0, 12)))
    indices = data.draw(st.lists(st.one_of(st.integers(0, n_cols - 1), value), min_size=nnz, max_size=nnz))
    indptr, indices = np.array(indptr, dtype=index_dtype), np.array(indices, dtype=index_dtype)
    values = np.arange(1.0, nnz + 1)
    if _valid_as_python_ints(indptr, indices, n_cols):
        ours = S.CSR(indptr, indices, values, (n_rows, n_cols))
        ref = sp.csr_matrix((values, indices, indptr), shape=(n_rows, n_cols))
        ref.check_format(full_check=True)
        np.testing.assert_array_equal(ours.to_dense(), ref.toarray())
        np.testing.assert_array_equal(S.csr_matvec(ours, np.ones(n_cols)), ref @ np.ones(n_cols))
    else:
        with pytest.raises(ValueError):
            S.CSR(indptr, indices, values, (n_rows, n_cols))


@pytest.mark.parametrize("indptr, dtype", [([0, 2, 1, 2], np.uint32), ([0, 2, 1, 2], np.uint64),
                                           ([0, 100, -56, 2], np.int8)])
def test_wrapping_indptr_is_rejected_like_scipy(indptr, dtype):
    """np.diff of this indptr in its own dtype is >= 0 everywhere (it wraps); scipy (reference) casts to
    int32 first and rejects it, and so do we — instead of allocating tens of GiB in to_dense."""
    indptr = np.array(indptr, dtype=dtype)
    assert (np.diff(indptr) >= 0).all() or dtype == np.int8 and (np.diff(indptr) > 0).all()
    indices, values = np.zeros(2, dtype=dtype), np.ones(2)
    with pytest.raises(ValueError, match="non-decreasing"):
        sp.csr_matrix((values, indices, indptr), shape=(3, 3)).check_format(full_check=True)
    with pytest.raises(ValueError, match="non-decreasing"):
        S.CSR(indptr, indices, values, (3, 3))
    with pytest.raises(ValueError, match="non-decreasing"):
        S.CSC(indptr, indices, values, (3, 3))


def test_uint64_beyond_int64_is_rejected():
    """scipy wraps 2**63 + 5 to a negative index; we name the array and the value."""
    with pytest.raises(ValueError, match="indices out of range: 9223372036854775813"):
        S.CSR(np.array([0, 1], np.uint64), np.array([2**63 + 5], np.uint64), np.ones(1), (1, 3))
    with pytest.raises(ValueError, match="row out of range"):
        S.COO(np.array([2**64 - 1], np.uint64), np.array([0], np.uint64), np.ones(1), (2, 2))
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        S.CSR([0, 1], np.array([True]), np.ones(1), (1, 2))


@settings(max_examples=100, deadline=None)
@given(coo_inputs)
def test_bool_data_and_x_match_scipy(params):
    """bool values and bool vectors (reference: scipy.sparse — duplicates and sums of bools are logical
    ors; a bool matrix times a float vector sums as numbers)."""
    n_rows, n_cols, nnz, seed = params
    if n_rows == 0 or n_cols == 0:
        nnz = 0
    rng = np.random.default_rng(seed)
    A = random_coo(rng, (n_rows, n_cols), nnz)
    A = S.COO(A.row, A.col, rng.random(A.nnz) < 0.7, A.shape)         # bool, with duplicates
    ref = sp.coo_matrix((A.data, (A.row, A.col)), shape=A.shape)
    np.testing.assert_array_equal(A.to_dense(), ref.toarray())
    csr = S.coo_to_csr(A)
    assert_same(csr, canonical(ref.tocsr()))
    ref_csr = csr.to_scipy()
    for x in (rng.random(n_cols) < 0.5, rng.standard_normal(n_cols), rng.integers(-3, 4, n_cols)):
        got, expected = S.csr_matvec(csr, x), ref_csr @ x
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    X = rng.random((n_cols, 2)) < 0.5
    np.testing.assert_array_equal(S.csr_matmat(csr, X), ref_csr @ X)
    ref_csc = ref_csr.tocsc()
    ref_csc.sort_indices()
    assert_same(S.csr_to_csc(csr), ref_csc)
    total = (ref_csr + ref_csr).tocsr()
    total.eliminate_zeros()
    total.sort_indices()
    assert_same(S.sparse_add(csr, csr), total)
    np.testing.assert_array_equal(S.CSR.from_dense(ref.toarray()).to_dense(), ref.toarray())


def test_csr_to_csc_keeps_duplicates_like_scipy():
    """The docstring's claim (reference: scipy csr_matrix.tocsc, a counting sort that keeps duplicates):
    duplicates stay separate and adjacent, rows non-decreasing within each column."""
    A = S.CSR(np.array([0, 3, 5]), np.array([2, 0, 2, 2, 0]), np.arange(1.0, 6.0), (2, 3))
    ref = A.to_scipy().tocsc()
    got = S.csr_to_csc(A)
    assert got.nnz == ref.nnz == 5
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)
    np.testing.assert_array_equal(got.to_dense(), ref.toarray())

"""Chapter 1 — sparse storage: COO, CSR and CSC from scratch on numpy arrays.

A sparse matrix is only worth storing sparsely when the bytes of the index arrays it adds are smaller
than the bytes of the zeros it drops. Each format below therefore reports ``nbytes`` exactly (values +
indices + row/column pointers), and every operation is written so that its cost is proportional to the
number of stored entries (``nnz``), never to ``n_rows * n_cols``.

Conventions (the same as ``scipy.sparse``, the reference every test compares to):

* index arrays are ``int32`` when every index fits, else ``int64``; the constructors accept any integer
  dtype (``uint32``, ``int8``, ...) and cast it to that rule's dtype first, as scipy does, so that no
  validation or operation ever computes in a dtype that wraps around;
* values may be bool (sums of bools are logical ors, products logical ands, as in scipy), integer,
  float or complex;
* a *canonical* CSR/CSC has, within each row (column), strictly increasing column (row) indices — the
  constructors here always produce canonical output, the consumers accept non-canonical input;
* explicit zeros are kept by conversions (like scipy) and dropped by :func:`sparse_add`.

The first two functions are the source article's interview warm-ups on plain Python containers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "COO", "CSR", "CSC",
    "sparse_matrix_add", "matrix_vector_multiply",
    "coo_to_csr", "csr_to_csc", "sparse_add", "csr_matvec", "csr_matmat",
    "dense_bytes", "format_bytes", "break_even_density", "index_dtype", "require_type",
]

_INT32_MAX = np.iinfo(np.int32).max
_INT64_MAX = np.iinfo(np.int64).max
_VALUE_KINDS = "biufc"  # bool (as in scipy: sums are logical or), integer, unsigned, float, complex
_SPMV_BLOCK = 1 << 16  # stored entries per block of rows in csr_matvec (512 KiB of float64 products)


# --------------------------------------------------------------------------------------------------
# Interview warm-ups (the article's coding questions 1 and 2, answered correctly)
# --------------------------------------------------------------------------------------------------

def sparse_matrix_add(A: dict, B: dict) -> dict:
    """Add two sparse matrices stored as dictionaries of keys.

    Args:
        A: ``{(i, j): value}`` — the non-zero entries of the first matrix (row ``i``, column ``j``).
        B: the second matrix, same convention. Missing keys are zeros.

    Returns:
        A new ``{(i, j): value}`` with ``A[i, j] + B[i, j]`` for every key of either input. Entries
        whose sum is zero are dropped (they are zeros, and a sparse format stores no zeros).
        ``A`` and ``B`` are not modified.
    """
    ### BEGIN SOLUTION
    result = dict(A)
    for key, value in B.items():  # items() yields ((i, j), value) pairs, not triples
        result[key] = result.get(key, 0) + value
    return {key: value for key, value in result.items() if value != 0}
    ### END SOLUTION


def matrix_vector_multiply(A: list, v: list) -> list:
    """Multiply a dense matrix given as a list of rows by a vector.

    Args:
        A: ``n_rows`` lists of ``n_cols`` numbers each.
        v: ``n_cols`` numbers.

    Returns:
        A list of ``n_rows`` numbers, ``y[i] = sum_j A[i][j] * v[j]`` (an empty list for ``n_rows = 0``).

    Raises:
        ValueError: if a row's length differs from ``len(v)``.

    ``A`` and ``v`` are not modified.
    """
    ### BEGIN SOLUTION
    result = []
    for i, row in enumerate(A):
        if len(row) != len(v):
            raise ValueError(f"row {i} has {len(row)} entries but v has {len(v)}")
        result.append(sum(a * b for a, b in zip(row, v)))
    return result
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------

def index_dtype(max_value: int) -> np.dtype:
    """int32 when every index (and nnz) fits, else int64 — scipy's rule, halves index bytes."""
    return np.dtype(np.int32) if max_value <= _INT32_MAX else np.dtype(np.int64)


def _as_index_array(name: str, values) -> np.ndarray:
    """1-D array of any integer dtype (signed or unsigned, any width); not yet cast, see _index_arrays."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0 and arr.dtype.kind == "f":  # np.asarray([]) is float64: an empty list is fine
        arr = arr.astype(np.int32)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    return arr


def _index_arrays(named: dict, max_dim: int) -> list[np.ndarray]:
    """Cast index arrays of any integer dtype to one safe index dtype, as scipy does.

    ``named`` maps argument names to arrays. The dtype is int32 if ``max_dim`` and every value fit in
    int32, else int64 (scipy's ``get_index_dtype(..., check_contents=True)``): uint32/uint64 indices
    (which numpy will not mix with signed ints without a casting error) and int8/int16 ones (whose
    differences wrap) become int32/int64 *before* any arithmetic, so no later check can wrap around.
    The extremes are read as Python ints, which cannot wrap either.

    Raises:
        TypeError: a non-integer array. ValueError: a value beyond int64 (a uint64 above 2**63 - 1 —
        no valid index or pointer is that large; scipy would silently wrap it to a negative number).
    """
    arrays = [_as_index_array(name, values) for name, values in named.items()]
    widest = max_dim
    for name, arr in zip(named, arrays):
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if hi > _INT64_MAX:
                raise ValueError(f"{name} out of range: {hi} does not fit in int64 ({arr.dtype} input)")
            widest = max(widest, hi, -lo)
    dtype = index_dtype(widest)
    return [arr.astype(dtype, copy=False) for arr in arrays]


def _as_data_array(name: str, values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in _VALUE_KINDS:
        raise TypeError(f"{name} must have a bool or numeric dtype, got {arr.dtype}")
    return arr


def _as_shape(shape) -> tuple[int, int]:
    try:
        n_rows, n_cols = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair of ints, got {shape!r}") from None
    if n_rows < 0 or n_cols < 0:
        raise ValueError(f"shape must be non-negative, got {(n_rows, n_cols)}")
    return n_rows, n_cols


def _check_range(name: str, idx: np.ndarray, bound: int) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= bound):
        raise ValueError(f"{name} out of range: values must lie in [0, {bound}), "
                         f"got min {idx.min()} and max {idx.max()}")


def _check_compressed(kind: str, indptr, indices, data, shape):
    """Validate a CSR (kind='row') or CSC (kind='col') triple; returns the coerced arrays."""
    n_rows, n_cols = _as_shape(shape)
    n_major, n_minor = (n_rows, n_cols) if kind == "row" else (n_cols, n_rows)
    indptr, indices = _index_arrays({"indptr": indptr, "indices": indices}, max(n_rows, n_cols))
    data = _as_data_array("data", data)
    if indptr.shape[0] != n_major + 1:
        raise ValueError(f"indptr must have {n_major + 1} entries (one per {kind} plus one), "
                         f"got {indptr.shape[0]}")
    if indptr[0] != 0:
        raise ValueError(f"indptr[0] must be 0, got {indptr[0]}")
    # a comparison, not np.diff(indptr) < 0: a difference can wrap around, a comparison cannot
    if np.any(indptr[1:] < indptr[:-1]):
        i = int(np.flatnonzero(indptr[1:] < indptr[:-1])[0])
        raise ValueError(f"indptr must be non-decreasing, got indptr[{i}] = {indptr[i]} > "
                         f"indptr[{i + 1}] = {indptr[i + 1]}")
    if indices.shape[0] != data.shape[0]:
        raise ValueError(f"indices and data must have the same length, "
                         f"got {indices.shape[0]} and {data.shape[0]}")
    if indptr[-1] != indices.shape[0]:
        raise ValueError(f"indptr[-1] must equal nnz = {indices.shape[0]}, got {indptr[-1]}")
    _check_range("indices", indices, n_minor)
    return indptr, indices, data, (n_rows, n_cols)


def _as_dense_2d(dense) -> np.ndarray:
    arr = np.asarray(dense)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in _VALUE_KINDS:
        raise TypeError(f"expected a bool or numeric dtype, got {arr.dtype}")
    return arr


# --------------------------------------------------------------------------------------------------
# The three formats
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class COO:
    """Coordinate format: one ``(row, col, value)`` triple per stored entry, in any order.

    Attributes:
        row: ``(nnz,)`` int32/int64 row index of each entry.
        col: ``(nnz,)`` int32/int64 column index of each entry.
        data: ``(nnz,)`` values (bool, integer, float or complex dtype).
        shape: ``(n_rows, n_cols)``.

    Duplicates are allowed (they mean "sum these"), as in scipy.
    """

    row: np.ndarray
    col: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self):
        shape = _as_shape(self.shape)
        row, col = _index_arrays({"row": self.row, "col": self.col}, max(shape))
        data = _as_data_array("data", self.data)
        if not (row.shape == col.shape == data.shape):
            raise ValueError(f"row, col and data must have the same length, "
                             f"got {row.shape[0]}, {col.shape[0]}, {data.shape[0]}")
        _check_range("row", row, shape[0])
        _check_range("col", col, shape[1])
        for name, value in (("row", row), ("col", col), ("data", data), ("shape", shape)):
            object.__setattr__(self, name, value)

    @property
    def nnz(self) -> int:
        """Number of stored entries (explicit zeros and duplicates included)."""
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays: ``nnz * (2 * index bytes + value bytes)``."""
        return self.row.nbytes + self.col.nbytes + self.data.nbytes

    @classmethod
    def from_dense(cls, dense) -> "COO":
        """Store the non-zeros of a 2-D array, in row-major order."""
        arr = _as_dense_2d(dense)
        row, col = np.nonzero(arr)
        idx = index_dtype(max(arr.shape, default=0))
        return cls(row.astype(idx), col.astype(idx), arr[row, col], arr.shape)

    def to_dense(self) -> np.ndarray:
        """``(n_rows, n_cols)`` array; duplicates are summed."""
        out = np.zeros(self.shape, dtype=self.data.dtype)
        np.add.at(out, (self.row, self.col), self.data)
        return out

    @classmethod
    def from_scipy(cls, matrix) -> "COO":
        m = matrix.tocoo()
        return cls(m.row, m.col, m.data, m.shape)

    def to_scipy(self):
        import scipy.sparse as sp
        return sp.coo_matrix((self.data, (self.row, self.col)), shape=self.shape)


class _Compressed:
    """What CSR and CSC share: validated (indptr, indices, data, shape) and their byte count."""

    _major = "row"  # the axis indptr compresses

    def __post_init__(self):
        arrays = _check_compressed(self._major, self.indptr, self.indices, self.data, self.shape)
        for name, value in zip(("indptr", "indices", "data", "shape"), arrays):
            object.__setattr__(self, name, value)

    @property
    def nnz(self) -> int:
        """Number of stored entries (explicit zeros included)."""
        return int(self.data.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays: ``(n_major + 1) * pointer bytes + nnz * (index + value bytes)``."""
        return self.indptr.nbytes + self.indices.nbytes + self.data.nbytes


@dataclass(frozen=True, eq=False)
class CSR(_Compressed):
    """Compressed sparse row: the column indices and values of row ``i`` are
    ``indices[indptr[i]:indptr[i+1]]`` and ``data[indptr[i]:indptr[i+1]]``.

    Attributes:
        indptr: ``(n_rows + 1,)`` int32/int64, non-decreasing, ``indptr[0] == 0``, ``indptr[-1] == nnz``.
        indices: ``(nnz,)`` int32/int64 column indices in ``[0, n_cols)``.
        data: ``(nnz,)`` values.
        shape: ``(n_rows, n_cols)``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense) -> "CSR":
        arr = _as_dense_2d(dense)
        row, col = np.nonzero(arr)  # row-major order: already canonical
        idx = index_dtype(max(arr.shape[1], row.shape[0]))
        indptr = np.zeros(arr.shape[0] + 1, dtype=idx)
        np.cumsum(np.bincount(row, minlength=arr.shape[0]), out=indptr[1:])
        return cls(indptr, col.astype(idx), arr[row, col], arr.shape)

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=self.data.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.data)
        return out

    @classmethod
    def from_scipy(cls, matrix) -> "CSR":
        m = matrix.tocsr()
        return cls(m.indptr, m.indices, m.data, m.shape)

    def to_scipy(self):
        import scipy.sparse as sp
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)


@dataclass(frozen=True, eq=False)
class CSC(_Compressed):
    """Compressed sparse column: row indices and values of column ``j`` are
    ``indices[indptr[j]:indptr[j+1]]`` and ``data[indptr[j]:indptr[j+1]]``.

    Attributes:
        indptr: ``(n_cols + 1,)`` int32/int64.
        indices: ``(nnz,)`` int32/int64 row indices in ``[0, n_rows)``.
        data: ``(nnz,)`` values.
        shape: ``(n_rows, n_cols)``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    _major = "col"

    @classmethod
    def from_dense(cls, dense) -> "CSC":
        t = CSR.from_dense(_as_dense_2d(dense).T)  # CSC of A has the arrays of CSR of A^T
        return cls(t.indptr, t.indices, t.data, (t.shape[1], t.shape[0]))

    def to_dense(self) -> np.ndarray:
        return CSR(self.indptr, self.indices, self.data, (self.shape[1], self.shape[0])).to_dense().T

    @classmethod
    def from_scipy(cls, matrix) -> "CSC":
        m = matrix.tocsc()
        return cls(m.indptr, m.indices, m.data, m.shape)

    def to_scipy(self):
        import scipy.sparse as sp
        return sp.csc_matrix((self.data, self.indices, self.indptr), shape=self.shape)


# --------------------------------------------------------------------------------------------------
# Operations (the exercises of ex01_sparse)
# --------------------------------------------------------------------------------------------------

def require_type(name: str, value, cls) -> None:
    """Raise TypeError naming the argument unless ``value`` is an instance of ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def coo_to_csr(A: COO) -> CSR:
    """Convert COO to canonical CSR.

    Args:
        A: entries in any order; duplicate ``(row, col)`` pairs are allowed.

    Returns:
        A canonical CSR (column indices strictly increasing within each row) in which duplicates are
        summed into one entry. Entries that are (or sum to) zero are kept as explicit zeros, as
        ``scipy.sparse.coo_matrix.tocsr`` does. Index arrays are int32 unless nnz or n_cols needs int64;
        ``data`` keeps ``A.data.dtype``.

    ``A`` is not modified.
    """
    require_type("A", A, COO)
    ### BEGIN SOLUTION
    n_rows, n_cols = A.shape
    order = np.lexsort((A.col, A.row))  # sort by row, then by column
    row, col, data = A.row[order], A.col[order], A.data[order]
    if data.shape[0]:
        # A new entry starts wherever (row, col) differs from its predecessor; sum each run.
        starts = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (col[1:] != col[:-1])])
        data = np.add.reduceat(data, starts, dtype=data.dtype)
        row, col = row[starts], col[starts]
    idx = index_dtype(max(n_cols, data.shape[0]))
    indptr = np.zeros(n_rows + 1, dtype=idx)
    np.cumsum(np.bincount(row, minlength=n_rows), out=indptr[1:])
    return CSR(indptr, col.astype(idx), data, (n_rows, n_cols))
    ### END SOLUTION


def csr_to_csc(A: CSR) -> CSC:
    """Convert CSR to CSC, keeping every stored entry.

    Args:
        A: a CSR matrix, canonical or not (column indices may be unsorted within a row, and a
            ``(row, col)`` pair may be stored more than once).

    Returns:
        The same matrix in CSC with the same ``data`` dtype and the same ``nnz``: every stored entry of
        ``A`` (explicit zeros and duplicates included) appears once, nothing is summed or dropped. Row
        indices increase within each column — strictly when ``A`` has no duplicate pairs; duplicates of
        one pair sit next to each other, in any order among themselves.

    ``A`` is not modified.
    """
    require_type("A", A, CSR)
    ### BEGIN SOLUTION
    n_rows, n_cols = A.shape
    rows = np.repeat(np.arange(n_rows), np.diff(A.indptr))  # row of each stored entry
    # Sort by column, then row: O(nnz log nnz) in C. (scipy's csr_tocsc is a counting sort, O(nnz + n_cols):
    # walking the rows in order and scattering each entry to its column's next free slot.)
    order = np.lexsort((rows, A.indices))
    idx = index_dtype(max(n_rows, A.nnz))
    indptr = np.zeros(n_cols + 1, dtype=idx)
    np.cumsum(np.bincount(A.indices, minlength=n_cols), out=indptr[1:])
    return CSC(indptr, rows[order].astype(idx), A.data[order], (n_rows, n_cols))
    ### END SOLUTION


def sparse_add(A: CSR, B: CSR) -> CSR:
    """Add two CSR matrices of the same shape.

    Args:
        A, B: CSR matrices with equal ``shape``; any numeric dtypes.

    Returns:
        Canonical CSR of ``A + B`` with dtype ``np.result_type(A.data, B.data)``. Entries that sum to
        zero (and explicit zeros of the inputs) are dropped, so ``nnz`` counts true non-zeros.

    Raises:
        ValueError: if the shapes differ.

    ``A`` and ``B`` are not modified.
    """
    require_type("A", A, CSR)
    require_type("B", B, CSR)
    ### BEGIN SOLUTION
    if A.shape != B.shape:
        raise ValueError(f"shape mismatch: A is {A.shape}, B is {B.shape}")
    dtype = np.result_type(A.data, B.data)
    rows = [np.repeat(np.arange(M.shape[0]), np.diff(M.indptr)) for M in (A, B)]
    both = COO(np.concatenate(rows), np.concatenate([A.indices, B.indices]),
               np.concatenate([A.data.astype(dtype), B.data.astype(dtype)]), A.shape)
    summed = coo_to_csr(both)  # sums entries present in both
    keep = summed.data != 0
    kept_rows = np.repeat(np.arange(A.shape[0]), np.diff(summed.indptr))[keep]
    indptr = np.zeros_like(summed.indptr)
    np.cumsum(np.bincount(kept_rows, minlength=A.shape[0]), out=indptr[1:])
    return CSR(indptr, summed.indices[keep], summed.data[keep], A.shape)
    ### END SOLUTION


def csr_matvec(A: CSR, x: np.ndarray) -> np.ndarray:
    """Sparse matrix × dense vector.

    Args:
        A: ``(n_rows, n_cols)`` CSR.
        x: ``(n_cols,)`` numeric or bool array.

    Returns:
        ``y = A @ x`` of shape ``(n_rows,)`` and dtype ``np.result_type(A.data, x)``; rows without
        stored entries give 0. Cost: one pass over ``indices`` and ``data``.

    Raises:
        ValueError: if ``x`` is not 1-D of length ``n_cols``.
        TypeError: if ``x`` is not numeric.

    ``A`` and ``x`` are not modified.
    """
    require_type("A", A, CSR)
    x = np.asarray(x)
    if x.dtype.kind not in _VALUE_KINDS:
        raise TypeError(f"x must be numeric or bool, got dtype {x.dtype}")
    if x.shape != (A.shape[1],):
        raise ValueError(f"x must have shape ({A.shape[1]},) to match A {A.shape}, got {x.shape}")
    ### BEGIN SOLUTION
    dtype = np.result_type(A.data, x)
    indptr, indices, data = A.indptr, A.indices, A.data
    y = np.zeros(A.shape[0], dtype=dtype)
    # Blocks of whole rows holding ~64k entries: each block's products stay in cache instead of making
    # one nnz-long temporary that is written to memory and read back.
    cuts = np.searchsorted(indptr, np.arange(0, A.nnz, _SPMV_BLOCK), side="right") - 1
    cuts = np.unique(np.r_[cuts, A.shape[0]])
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        start, stop = indptr[r0], indptr[r1]
        # take(mode="clip") skips the bounds check (CSR validated the indices) and int32->intp copy.
        products = x.take(indices[start:stop], mode="clip").astype(dtype, copy=False)
        products *= data[start:stop]
        # reduceat sums products[s[i]:s[i+1]] but returns products[s[i]] for an empty row and rejects
        # s[i] == len(products): stop at the block's last non-empty row, zero empty rows afterwards.
        last = r0 + int(np.searchsorted(indptr[r0:r1], stop))
        y[r0:last] = np.add.reduceat(products, indptr[r0:last] - start, dtype=dtype)
    y[indptr[:-1] == indptr[1:]] = 0
    return y
    ### END SOLUTION


def csr_matmat(A: CSR, X: np.ndarray) -> np.ndarray:
    """Sparse matrix × dense matrix.

    Args:
        A: ``(n_rows, n_cols)`` CSR.
        X: ``(n_cols, k)`` numeric or bool array.

    Returns:
        ``Y = A @ X`` of shape ``(n_rows, k)`` and dtype ``np.result_type(A.data, X)``.

    Raises:
        ValueError: if ``X`` is not 2-D with ``n_cols`` rows.
    """
    require_type("A", A, CSR)
    X = np.asarray(X)
    if X.dtype.kind not in _VALUE_KINDS:
        raise TypeError(f"X must be numeric or bool, got dtype {X.dtype}")
    if X.ndim != 2 or X.shape[0] != A.shape[1]:
        raise ValueError(f"X must have shape ({A.shape[1]}, k) to match A {A.shape}, got {X.shape}")
    dtype = np.result_type(A.data, X)
    Y = np.zeros((A.shape[0], X.shape[1]), dtype=dtype)
    if A.nnz == 0:
        return Y
    products = A.data[:, None].astype(dtype) * X[A.indices]  # (nnz, k): row j of X per entry
    nonempty = A.indptr[:-1] != A.indptr[1:]
    Y[nonempty] = np.add.reduceat(products, A.indptr[:-1][nonempty], axis=0)
    return Y


# --------------------------------------------------------------------------------------------------
# Byte accounting (used by the chapter's plots and by the pruning chapter)
# --------------------------------------------------------------------------------------------------

def dense_bytes(n_rows: int, n_cols: int, value_bytes: int) -> int:
    """Bytes of a dense ``(n_rows, n_cols)`` array with ``value_bytes`` per element."""
    return n_rows * n_cols * value_bytes


def format_bytes(fmt: str, n_rows: int, n_cols: int, nnz: int, value_bytes: int, index_bytes: int) -> int:
    """Exact bytes of a sparse format's arrays (what ``nbytes`` reports), without building it.

    Args:
        fmt: ``"coo"``, ``"csr"`` or ``"csc"``.
        value_bytes: bytes per stored value (2 for fp16/bf16, 4 for fp32).
        index_bytes: bytes per index and pointer (4 for int32, 8 for int64).
    """
    if fmt == "coo":
        return nnz * (2 * index_bytes + value_bytes)
    if fmt == "csr":
        return (n_rows + 1) * index_bytes + nnz * (index_bytes + value_bytes)
    if fmt == "csc":
        return (n_cols + 1) * index_bytes + nnz * (index_bytes + value_bytes)
    raise ValueError(f"fmt must be 'coo', 'csr' or 'csc', got {fmt!r}")


def break_even_density(fmt: str, value_bytes: int, index_bytes: int) -> float:
    """Density (nnz / (n_rows * n_cols)) below which ``fmt`` takes fewer bytes than dense,
    in the limit of a large matrix (pointer arrays negligible).

    CSR/CSC pay ``index + value`` bytes per stored entry against ``value`` bytes per dense element,
    so they win below ``value / (index + value)``: 1/3 for fp16 with int32 indices, 1/2 for fp32.
    """
    per_entry = {"coo": 2 * index_bytes + value_bytes, "csr": index_bytes + value_bytes,
                 "csc": index_bytes + value_bytes}
    if fmt not in per_entry:
        raise ValueError(f"fmt must be 'coo', 'csr' or 'csc', got {fmt!r}")
    return value_bytes / per_entry[fmt]

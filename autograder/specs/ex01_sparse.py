"""ex01_sparse — chapter 1, sparse storage."""
from autograder.specs import Assignment, Markdown, Task

# scipy.sparse and torch's sparse layouts do these conversions and products: flagged for review when used
SPARSE_LIBRARIES = (
    'scipy.sparse',
    'torch.sparse',
    'torch.sparse_coo_tensor',
    'torch.sparse_csr_tensor',
    'torch.sparse_csc_tensor',
    'torch.Tensor.to_sparse',
    'torch.Tensor.to_sparse_csr',
    'torch.Tensor.to_sparse_csc',
)

ASSIGNMENT = Assignment(
    name="ex01_sparse",
    module="llmspace.sparse",
    title="Exercise 1 — Sparse storage",
    cells=[
        Markdown("""\
# Exercise 1 — Sparse storage

Companion to chapter 1 of the llmspace book. You will implement the two interview warm-ups from the
source article (correctly — the article's own answers are wrong), then the core of a sparse-matrix
library: COO → CSR conversion, CSR → CSC, sparse addition and sparse matrix × vector.

**How this works.** Each task is a function whose signature and docstring are the specification. Replace
`raise NotImplementedError()` with your code. The cell after each function runs its checks: the visible
cases print their inputs when they fail; the grader also runs hidden cases (edge cases: empty rows,
duplicates, dtypes, bad input). Check your work before submitting with

    python -m autograder check ex01_sparse.ipynb

The `COO`, `CSR` and `CSC` dataclasses are given (imported below). Construct results with them; they
validate their arrays (shape, dtype, `indptr` monotonicity, index range) and raise a clear error if
something is off. Use numpy: every function here can be written without a Python loop over entries.
"""),
        Markdown("""\
## Warm-up 1: add two dictionary-of-keys matrices

A dictionary of keys stores `{(i, j): value}` for the non-zero entries only. Watch out: iterating
`A.items()` yields `((i, j), value)` pairs, and an entry whose sum is zero is no longer an entry.
"""),
        Task("sparse_matrix_add", points=1, forbids=SPARSE_LIBRARIES),
        Markdown("""\
## Warm-up 2: dense matrix × vector

The result is a vector: return a list with one number per row.
"""),
        Task("matrix_vector_multiply", points=1, forbids=SPARSE_LIBRARIES),
        Markdown("""\
## Task 1: COO → CSR

COO stores one `(row, col, value)` triple per entry, in any order, duplicates allowed. CSR groups the
entries by row: `indptr[i]:indptr[i+1]` is the slice of `indices`/`data` that belongs to row `i`.
Sort the entries by (row, column), sum duplicates, then build `indptr` from the number of entries per
row (`np.bincount` and `np.cumsum` do it without a loop).
"""),
        Task("coo_to_csr", points=3, forbids=SPARSE_LIBRARIES),
        Markdown("""\
## Task 2: CSR → CSC

CSC is CSR of the transpose. You need the row of every stored entry (`np.repeat` over the row lengths),
then a *stable* sort by column so that rows stay increasing inside each column.
"""),
        Task("csr_to_csc", points=2, forbids=SPARSE_LIBRARIES),
        Markdown("""\
## Task 3: sparse + sparse

Add two CSR matrices of the same shape. Entries present in both are summed; entries that become zero
are dropped. You may reuse your `coo_to_csr`.
"""),
        Task("sparse_add", points=3, forbids=SPARSE_LIBRARIES),
        Markdown("""\
## Task 4: sparse matrix × vector (SpMV)

`y[i] = sum(data[k] * x[indices[k]] for k in range(indptr[i], indptr[i+1]))`. Vectorize it: gather
`x[indices]`, multiply by `data`, then sum each row's segment. Rows without entries must give 0, and the
result's dtype follows numpy's promotion rules (`np.result_type(A.data, x)`).
"""),
        Task("csr_matvec", points=3, forbids=SPARSE_LIBRARIES),
    ],
)

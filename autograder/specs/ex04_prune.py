"""ex04_prune — chapter 4, pruning."""
from autograder.specs import Assignment, Markdown, Task

# torch's 2:4 semi-structured sparse tensors: flagged for review when used
SEMI_STRUCTURED = (
    'torch.sparse.to_sparse_semi_structured',
    'torch.sparse.SparseSemiStructuredTensor',
)

ASSIGNMENT = Assignment(
    name="ex04_prune",
    module="llmspace.prune",
    title="Exercise 4 — Pruning",
    cells=[
        Markdown("""\
# Exercise 4 — Pruning

Companion to chapter 4 of the llmspace book. You will write the two masks that matter most in practice —
a *global* magnitude mask and an N:M (2:4) mask — and then the compressed 2:4 storage format that makes
half-sparse weights actually smaller: the kept values plus 2 bits of position each.

**How this works.** Each task is a function whose signature and docstring are the specification. Replace
`raise NotImplementedError()` with your code. The cell after each function runs its checks: the visible
cases print their inputs when they fail; the grader also runs hidden cases (ties in counts, odd shapes,
dtypes, bad input). Check your work before submitting with

    python -m autograder check ex04_prune.ipynb

Masks are `torch.bool` tensors of the weight's shape, `True` = keep. The helpers `check_tensor`,
`n_to_prune` (how many to prune: `round(sparsity * n)`, as `torch.nn.utils.prune` counts), `check_nm`,
`is_nm_sparse` and the `Sparse24` dataclass are given (imported below). Use torch operations
(`torch.topk`, `scatter_`, `gather`, shifts) — no Python loop over weights is needed.
"""),
        Markdown("""\
## Task 1: global magnitude mask

Layer-wise pruning removes the same fraction from every tensor. Global pruning ranks *all* weights of all
tensors together by `|w|` and removes the smallest `round(sparsity * total)` — layers full of small
weights lose more. Concatenate the flattened magnitudes, find the smallest `k` with `torch.topk(...,
largest=False)`, then cut the flat mask back into one mask per tensor. Do not modify the weights.
"""),
        Task("global_magnitude_mask", points=3,
             forbids=('torch.nn.utils.prune',)),
        Markdown("""\
## Task 2: N:M mask

In every group of `m` consecutive entries along the last dimension keep the `n` with the largest `|w|`.
Reshape to `(-1, m)` — but only after checking that `m` divides the last dimension, or groups silently
straddle two rows. `torch.topk(..., dim=1)` and `scatter_` do the rest.
"""),
        Task("nm_mask", points=2, forbids=SEMI_STRUCTURED),
        Markdown("""\
## Task 3: compress a 2:4 matrix

Each group of 4 keeps 2 values (in column order) and their positions 0..3, 2 bits each, packed 4 per
byte with the first position in the lowest bits. A group with fewer than 2 non-zeros stores its first
zero positions as filler. Bytes: `rows * cols / 2` values plus `rows * ceil(cols / 8)` metadata bytes —
1.125 bytes per fp16 weight instead of 2.
"""),
        Task("compress_2to4", points=3, forbids=SEMI_STRUCTURED),
        Markdown("""\
## Task 4: decompress

Unpack the 2-bit positions (`(meta >> shift) & 3`), turn kept value `j`'s position into a column
(`position + 4 * (j // 2)`), and scatter the values into a zero matrix of the values' dtype.
"""),
        Task("decompress_2to4", points=2, forbids=SEMI_STRUCTURED),
    ],
)

"""ex03_quant — chapter 3, quantization."""
from autograder.specs import Assignment, Markdown, Task

# torch's own quantization functions: flagged for review when used
QUANTIZATION_LIBRARIES = (
    'torch.quantize_per_tensor',
    'torch.quantize_per_channel',
    'torch.fake_quantize_per_tensor_affine',
    'torch.fake_quantize_per_channel_affine',
    'torch.ao.quantization',
    'torch.quantization',
    'torchao',
)

ASSIGNMENT = Assignment(
    name="ex03_quant",
    module="llmspace.quant",
    title="Exercise 3 — Quantization",
    cells=[
        Markdown("""\
# Exercise 3 — Quantization

Companion to chapter 3 of the llmspace book. You will fix the source article's coding question 3 (its
answer truncates and never clamps), quantize tensors with broadcast scales, quantize a weight matrix in
groups and pack it two codes per byte, and finish with LLM.int8's outlier decomposition.

**How this works.** Each task is a function whose signature and docstring are the specification. Replace
`raise NotImplementedError()` with your code. The cell after each function runs its checks: the visible
cases print their inputs when they fail; the grader also runs hidden cases (ties, other integer ranges,
odd sizes, bad input). Check your work before submitting with

    python -m autograder check ex03_quant.ipynb

Conventions used everywhere: `q = clamp(round(x / scale) + zero_point, qmin, qmax)` and
`x ≈ (q - zero_point) * scale`; rounding is round-half-to-even (`round`, `torch.round`, `np.rint`);
work in float32 (`x.float() / scale`) so that your integers match the reference bit for bit.
"""),
        Markdown("""\
## Task 1: the article's coding question 3

"Write a function to quantize a floating-point number to an 8-bit integer given a scale and zero
point." The article answers `int((value / scale) + zero_point)`. Two bugs: `int()` truncates toward
zero (3.7 → 3, -2.6 → -2), and nothing keeps the result inside `[qmin, qmax]`.
"""),
        Task("quantize", points=1, forbids=QUANTIZATION_LIBRARIES),
        Markdown("""\
## Task 2: tensors

The same on a tensor. `scale` and `zero_point` are tensors that broadcast against `x`: a 0-d tensor is
per-tensor quantization, shape `(C, 1)` one scale per row. Return the smallest integer dtype that holds
`[qmin, qmax]` — `int8`, else `uint8`, else `int32` — and clamp *before* casting (a cast wraps around).
"""),
        Task("quantize_affine", points=2, forbids=QUANTIZATION_LIBRARIES),
        Markdown("""\
## Task 3: per-group int4

One scale per row lets one large weight coarsen the whole row. Per-group quantization gives every
`group_size` consecutive weights of a row their own scale and zero point. `choose_qparams(w, bits,
symmetric=..., group_size=...)` (given) computes them; reshape `w` to `(..., K // group_size,
group_size)` so that they broadcast, quantize, and reshape back.
"""),
        Task("quantize_per_group", points=2, forbids=QUANTIZATION_LIBRARIES),
        Markdown("""\
## Task 4: two codes per byte

A 4-bit code needs half a byte. Pack codes `0..15` (signed int4 values are shifted by 8 first) so that
byte `j` holds element `2j` in its low nibble and element `2j + 1` in its high nibble; pad an odd-length
last dimension with a zero nibble. Reject codes outside `[0, 15]`.
"""),
        Task("pack_int4", points=2),
        Markdown("""\
## Task 5: LLM.int8 — keep the outliers in fp16

Large language models have a few activation *features* (columns of `x`) with magnitudes of 20–60 while
the rest sit near 1. Vector-wise int8 (one scale per row of `x`, one per row of the weight) then wastes
the grid on the outlier. LLM.int8 multiplies the outlier columns in fp16 and everything else in int8.
`choose_qparams(t, 8, symmetric=True, axis=0)` (given) returns one `amax / 127` scale per row.
"""),
        Task("llm_int8_matmul", points=3,
             forbids=('bitsandbytes',)),
    ],
)

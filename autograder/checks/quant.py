"""Checks for ex03_quant. Every expected value is recomputed here with numpy, independently of
``llmspace.quant`` (float32 arithmetic where the task's definition is float32, so that results agree
bit for bit; round-half-to-even is ``np.rint``)."""
from __future__ import annotations

import math

import numpy as np
import torch

from autograder.checks import Checker, direction


def _expect_tensor(c: Checker, case, got, expected: np.ndarray, dtype: torch.dtype, args=None, *,
                   what="result", rtol=0.0, atol=0.0):
    """``got`` must be a torch.Tensor of ``dtype`` and ``expected``'s shape and values."""
    if not isinstance(got, torch.Tensor):
        c.fail(case, f"{what} must be a torch.Tensor, got {type(got).__name__}", args)
    if got.dtype != dtype:
        c.fail(case, f"{what} has dtype {got.dtype}, expected {dtype}", args)
    exact = rtol == 0 and atol == 0
    c.expect_array(case, got.detach().cpu().numpy(), expected, args, what=what, exact=exact,
                   rtol=rtol, atol=atol, check_dtype=False)


# ---- task 1: the article's coding question 3 -----------------------------------------------------

def _quantize_reference(value, scale, zero_point, qmin, qmax) -> int:
    return int(np.clip(np.rint(np.float64(value) / np.float64(scale)) + zero_point, qmin, qmax))


def check_quantize(impl, *, hidden: bool = False) -> None:
    """Scalar affine quantization: round to nearest (half to even), add the zero point, clamp."""
    c = Checker("quantize", impl, hidden)
    if not hidden:
        # (value, scale, zero_point) with the default int8 range, then explicit ranges
        cases = [
            ("0.37 / 0.1 = 3.7 rounds to 4", (0.37, 0.1, 0)),
            ("negative value", (-1.26, 0.1, 3)),
            ("300 does not fit in int8", (3.0, 0.01, 0)),
            ("-300 does not fit in int8", (-3.0, 0.01, 0)),
            ("uint8 range [0, 255]", (-0.5, 0.02, 128, 0, 255)),
        ]
    else:
        cases = [
            ("exact multiple", (1.5, 0.5, 0)),
            ("tie 0.5 rounds to even 0", (0.25, 0.5, 0)),
            ("tie 1.5 rounds to even 2", (0.75, 0.5, 0)),
            ("tie -2.5 rounds to even -2", (-1.25, 0.5, 0)),
            ("tie 0.5 with zero point 3: round first, then add", (0.25, 0.5, 3)),
            ("tie 2.5 with zero point -1: round first, then add", (1.25, 0.5, -1)),
            ("tie -0.5 with zero point 7 in the uint8 range", (-0.25, 0.5, 7, 0, 255)),
            ("negative just below a step", (-0.29, 0.1, 0)),
            ("zero point shifts the result", (0.0, 0.37, -17)),
            ("clamp at qmax after adding the zero point", (1.2, 0.01, 10)),
            ("clamp at qmin after adding the zero point", (-1.2, 0.01, -10)),
            ("4-bit signed range", (0.9, 0.1, 0, -8, 7)),
            ("4-bit unsigned with zero point", (-0.33, 0.05, 8, 0, 15)),
            ("large value, 16-bit range", (1234.567, 0.01, 0, -32768, 32767)),
            ("one-value range qmin == qmax", (0.3, 0.1, 0, 5, 5)),
            ("tiny scale", (1e-3, 1e-6, 0)),
            ("value / scale overflows to +inf: saturates at qmax", (1e300, 1e-300, 0)),
            ("value / scale overflows to -inf: saturates at qmin", (-1e300, 1e-300, 3, 0, 255)),
        ]
    for name, args in cases:
        value, scale, zero_point = args[:3]
        qmin, qmax = args[3:] if len(args) == 5 else (-128, 127)
        got = c.call(name, *args)
        if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
            c.fail(name, f"must return an int, got {type(got).__name__} {c.got(got)}".rstrip(), args)
        expected = _quantize_reference(value, scale, zero_point, qmin, qmax)
        if got == expected:
            continue
        raw = value / scale + zero_point
        problems = []
        if not qmin <= got <= qmax:
            problems.append(("the result" if hidden else f"{got}") + f" lies outside [{qmin}, {qmax}] — clamp "
                            f"the result to the integer range (an int8 cannot hold it)")
        elif int(raw) == got and expected != int(raw) and not hidden:
            problems.append("that is int() truncation toward zero, not rounding: use round() so that "
                            "3.7 becomes 4 and -2.6 becomes -3")
        elif round(raw) == got and zero_point % 2 and not hidden:
            problems.append(f"that rounds value / scale + zero_point as a whole; round value / scale "
                            f"first, then add the zero point (they differ at ties: round({value / scale}) "
                            f"is {round(value / scale)})")
        if not hidden or not problems:
            way = direction(got, expected)
            problems.append(("" if hidden else f"got {got}, expected {expected}")
                            + ("; " if way and not hidden else "") + (f"the result {way}" if way else ""))
        if hidden and "tie" in name:
            problems.append("ties round half to even (Python's round()), and the zero point is added after "
                            "rounding")
        c.fail(name, "; ".join(p for p in problems if p), args)
    if hidden:
        for name, args, what in [("scale 0", (1.0, 0.0, 0), "scale must be > 0"),
                                 ("negative scale", (1.0, -0.1, 0), "scale must be > 0"),
                                 ("infinite scale", (1.0, float("inf"), 0), "scale must be finite"),
                                 ("NaN scale", (1.0, float("nan"), 0), "scale must be finite"),
                                 ("NaN value", (float("nan"), 0.1, 0), "value must be finite"),
                                 ("infinite value", (float("-inf"), 0.1, 0), "value must be finite"),
                                 ("qmin > qmax", (0.5, 0.1, 0, 10, -10), "qmin must be <= qmax")]:
            c.expect_raises(name, ValueError, *args, what=what)


# ---- task 2: tensors -----------------------------------------------------------------------------

def _int_dtype(qmin, qmax):
    if -128 <= qmin and qmax <= 127:
        return torch.int8, np.int8
    if 0 <= qmin and qmax <= 255:
        return torch.uint8, np.uint8
    return torch.int32, np.int32


def _affine_reference(x, scale, zero_point, qmin, qmax):
    xs, ss = x.float().numpy(), scale.float().numpy()
    q = np.rint(xs / ss) + zero_point.numpy().astype(np.float32)   # float32 / float32, as specified
    return np.clip(q, qmin, qmax).astype(_int_dtype(qmin, qmax)[1])


def check_quantize_affine(impl, *, hidden: bool = False) -> None:
    """Tensor quantization with broadcast scales/zero points, rounding, clamping and the output dtype."""
    c = Checker("quantize_affine", impl, hidden)
    g = torch.Generator().manual_seed(31 if hidden else 30)
    z = lambda *shape: torch.zeros(shape, dtype=torch.int32)   # noqa: E731
    if not hidden:
        x = torch.tensor([-2.0, -0.26, 0.0, 0.37, 1.0, 5.0])
        rows = torch.randn(3, 8, generator=g)
        cases = [
            ("per tensor, int8, values beyond the range", x, torch.tensor(0.02), z(), -128, 127),
            ("per row: scale (3, 1)", rows, torch.tensor([[0.01], [0.02], [0.05]]), z(3, 1), -128, 127),
            ("uint8 with a zero point", x, torch.tensor(0.01), torch.tensor(128, dtype=torch.int32), 0, 255),
        ]
    else:
        big = torch.randn(16, 64, generator=g) * 3
        cases = [
            ("ties round half to even", torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25]),
             torch.tensor(0.5), z(), -128, 127),
            ("ties with an odd zero point: round x / scale first, then add",
             torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25]), torch.tensor(0.5),
             torch.tensor(3, dtype=torch.int32), -128, 127),
            ("ties per row, zero points -1 and 5", torch.tensor([[0.25, 0.75, -1.25], [1.25, -0.25, 2.25]]),
             torch.tensor([[0.5], [0.5]]), torch.tensor([[-1], [5]], dtype=torch.int32), -8, 7),
            ("per column: scale (1, 64)", big, torch.rand(1, 64, generator=g) * 0.1 + 0.01, z(1, 64), -128, 127),
            ("per row with zero points", big, torch.rand(16, 1, generator=g) * 0.05 + 0.01,
             torch.randint(-20, 20, (16, 1), generator=g, dtype=torch.int32), -128, 127),
            ("4-bit signed range stays int8", big, torch.tensor(0.3), z(), -8, 7),
            ("4-bit unsigned range is uint8", big, torch.tensor(0.5), torch.tensor(8, dtype=torch.int32), 0, 15),
            ("16-bit range needs int32", big * 100, torch.tensor(0.01), z(), -32768, 32767),
            ("float64 input", big.double(), torch.tensor(0.02, dtype=torch.float64), z(), -128, 127),
            ("3-D input, scale (4, 1, 1)", torch.randn(4, 3, 5, generator=g),
             torch.tensor([0.01, 0.1, 0.2, 0.05]).view(4, 1, 1), z(4, 1, 1), -128, 127),
            ("int64 zero point", big, torch.tensor(0.02), torch.tensor(-3), -128, 127),
        ]
    for name, x, scale, zero_point, qmin, qmax in cases:
        args = (x, scale, zero_point, qmin, qmax)
        got = c.call(name, *args)
        expected = _affine_reference(x, scale, zero_point, qmin, qmax)
        _expect_tensor(c, name, got, expected, _int_dtype(qmin, qmax)[0], args, what="q")
    if hidden:
        x = torch.randn(4, generator=g)
        c.expect_raises("zero scale", ValueError, x, torch.tensor(0.0), z(), -128, 127, what="scale must be > 0")
        c.expect_raises("one row's scale is negative", ValueError, torch.randn(2, 3, generator=g),
                        torch.tensor([[0.1], [-0.1]]), z(2, 1), -128, 127, what="scale must be > 0 everywhere")
        c.expect_raises("integer x", TypeError, torch.arange(4), torch.tensor(0.1), z(), -128, 127,
                        what="x must be a float tensor")
        c.expect_raises("NaN in x", ValueError, torch.tensor([1.0, float("nan")]), torch.tensor(0.1), z(),
                        -128, 127, what="x must be finite")


# ---- task 3: per-group int4 ----------------------------------------------------------------------

def _per_group_reference(w, bits, group_size, symmetric):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = w.float().numpy().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    eps = np.float32(np.finfo(np.float32).eps)
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / np.float32(qmax), eps).astype(np.float32)
        zero = np.zeros(scale.shape, np.int32)
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = np.maximum((hi - lo) / np.float32(qmax - qmin), eps).astype(np.float32)
        zero = np.clip(qmin - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], qmin, qmax).astype(np.int8)
    return q.reshape(w.shape), scale, zero


def check_quantize_per_group(impl, *, hidden: bool = False) -> None:
    """Per-group min/max parameters along the last dimension, int8 codes, float32 scale, int32 zero point."""
    c = Checker("quantize_per_group", impl, hidden)
    g = torch.Generator().manual_seed(41 if hidden else 40)
    if not hidden:
        cases = [("2 x 8, groups of 4, affine", torch.tensor([[0.1, -0.5, 0.3, 0.9, 2.0, 1.5, 1.0, 0.5],
                                                             [-1.0, -2.0, 0.0, 0.5, -0.1, 0.1, 0.2, -0.3]]),
                  4, 4, False),
                 ("16 x 64, groups of 32", torch.randn(16, 64, generator=g), 4, 32, False)]
    else:
        outlier = torch.randn(8, 256, generator=g)
        outlier[:, 7] = 25.0
        cases = [
            ("symmetric", torch.randn(8, 128, generator=g), 4, 64, True),
            ("one group per row", torch.randn(5, 48, generator=g), 4, 48, False),
            ("an outlier affects only its group", outlier, 4, 128, False),
            ("3 bits", torch.randn(6, 96, generator=g), 3, 32, False),
            ("8 bits", torch.randn(4, 64, generator=g), 8, 16, False),
            ("all-positive group (range widened to 0)", torch.rand(4, 32, generator=g) + 1, 4, 16, False),
            ("all-zero group", torch.zeros(2, 16), 4, 8, False),
            ("3-D weight", torch.randn(2, 3, 32, generator=g), 4, 16, False),
            ("float16 weight", torch.randn(4, 64, generator=g).half(), 4, 32, False),
        ]
    for name, w, bits, group_size, symmetric in cases:
        args = (w, bits, group_size, symmetric)
        got = c.call(name, w, bits, group_size, symmetric)
        if not (isinstance(got, tuple) and len(got) == 3):
            c.fail(name, f"must return a tuple (qdata, scale, zero_point), got {type(got).__name__}", args)
        q, scale, zero = _per_group_reference(w, bits, group_size, symmetric)
        _expect_tensor(c, name, got[1], scale, torch.float32, args, what="scale", rtol=1e-6, atol=0)
        _expect_tensor(c, name, got[2], zero, torch.int32, args, what="zero_point")
        _expect_tensor(c, name, got[0], q, torch.int8, args, what="qdata")
    if hidden:
        w = torch.randn(4, 100, generator=g)
        c.expect_raises("group size does not divide K", ValueError, w, 4, 64, what="group_size must divide K")
        c.expect_raises("5 bits", ValueError, w, 5, 50, what="unsupported bits")
        c.expect_raises("integer weight", TypeError, torch.ones(4, 8, dtype=torch.int32), 4, 4,
                        what="w must be a float tensor")
        c.expect_raises("inf in weight", ValueError, torch.tensor([[1.0, float("inf")]]), 4, 2,
                        what="w must be finite")


# ---- task 4: packing -----------------------------------------------------------------------------

def _pack_reference(q: np.ndarray) -> np.ndarray:
    """Little-endian bit order: element 2j's four bits, then element 2j+1's, into byte j."""
    n = q.shape[-1]
    if n % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), q.dtype)], axis=-1)
    bits = np.unpackbits(q.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :4]
    return np.packbits(bits.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")


def check_pack_int4(impl, *, hidden: bool = False) -> None:
    """Two 4-bit codes per byte, low nibble first (reference: ``np.packbits`` with little bit order)."""
    c = Checker("pack_int4", impl, hidden)
    g = torch.Generator().manual_seed(51 if hidden else 50)
    if not hidden:
        cases = [("[1, 2, 3, 4]", torch.tensor([1, 2, 3, 4], dtype=torch.uint8)),
                 ("[15, 0]", torch.tensor([15, 0], dtype=torch.uint8)),
                 ("4 x 16 random codes", torch.randint(0, 16, (4, 16), generator=g, dtype=torch.uint8))]
    else:
        cases = [("odd length 5", torch.randint(0, 16, (5,), generator=g, dtype=torch.uint8)),
                 ("one element", torch.tensor([9], dtype=torch.uint8)),
                 ("odd rows 3 x 7", torch.randint(0, 16, (3, 7), generator=g, dtype=torch.uint8)),
                 ("codes >= 8 fill the high bit", torch.full((6,), 15, dtype=torch.uint8)),
                 ("int64 input", torch.randint(0, 16, (2, 10), generator=g)),
                 ("3-D", torch.randint(0, 16, (2, 3, 9), generator=g, dtype=torch.uint8)),
                 ("empty last dimension", torch.zeros(3, 0, dtype=torch.uint8))]
    for name, q in cases:
        got = c.call(name, q)
        _expect_tensor(c, name, got, _pack_reference(q.numpy()), torch.uint8, (q,), what="packed")
    if hidden:
        c.expect_raises("code 16", ValueError, torch.tensor([3, 16]), what="codes must lie in [0, 15]")
        c.expect_raises("negative code", ValueError, torch.tensor([-1, 3]), what="codes must lie in [0, 15]")
        c.expect_raises("float input", TypeError, torch.tensor([1.0, 2.0]), what="q must be an integer tensor")


# ---- task 5: LLM.int8 ----------------------------------------------------------------------------

def _llm_int8_reference(x: torch.Tensor, w: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The recipe in numpy, and the per-element tolerance the docstring allows: the outlier product may
    be computed with fp16 arithmetic, whose error bound is (k + 1)·u·Σ|x·w| (k outlier columns, fp16 unit
    roundoff u = 2⁻¹¹, recursive summation, Higham §3.1); the int8 part is exact integers rescaled in
    float32 (a few float32 ulps)."""
    xs, ws = x.float().numpy(), w.float().numpy()
    out = (np.abs(xs) > threshold).any(axis=0)
    xh = xs[:, out].astype(np.float16).astype(np.float64)
    wh = ws[:, out].astype(np.float16).astype(np.float64)
    y = xh @ wh.T
    tol = (int(out.sum()) + 1) * 2.0 ** -11 * (np.abs(xh) @ np.abs(wh).T)
    xr, wr = xs[:, ~out], ws[:, ~out]
    if xr.size and wr.size:
        eps = np.float32(np.finfo(np.float32).eps)
        sx = np.maximum(np.abs(xr).max(axis=1) / np.float32(127), eps).astype(np.float32)
        sw = np.maximum(np.abs(wr).max(axis=1) / np.float32(127), eps).astype(np.float32)
        qx = np.clip(np.rint(xr / sx[:, None]), -127, 127).astype(np.int64)
        qw = np.clip(np.rint(wr / sw[:, None]), -127, 127).astype(np.int64)
        part = (qx @ qw.T).astype(np.float64) * sx[:, None].astype(np.float64) * sw[None, :]
        y = y + part
        tol = tol + 4 * float(np.finfo(np.float32).eps) * np.abs(part)
    return y.astype(np.float32), tol + 4 * float(np.finfo(np.float32).eps) * np.abs(y)


def check_llm_int8_matmul(impl, *, hidden: bool = False) -> None:
    """Outlier columns in fp16, the rest vector-wise int8 (reference: the LLM.int8 paper's recipe in
    numpy; the tolerance is the fp16 arithmetic the task statement allows for the outlier part)."""
    c = Checker("llm_int8_matmul", impl, hidden)
    g = torch.Generator().manual_seed(61 if hidden else 60)

    def acts(n, k, outlier_cols=(), magnitude=40.0):
        x = torch.randn(n, k, generator=g)
        for col in outlier_cols:
            x[n // 2, col] = magnitude
        return x

    if not hidden:
        cases = [("no outliers", acts(4, 32), torch.randn(8, 32, generator=g) * 0.1, 6.0),
                 ("two outlier columns", acts(6, 64, (3, 17)), torch.randn(16, 64, generator=g) * 0.1, 6.0)]
    else:
        cases = [
            ("a negative outlier", acts(5, 48, (0,), -50.0), torch.randn(7, 48, generator=g), 6.0),
            ("threshold is strict (|x| = threshold is not an outlier)",
             acts(4, 16, (5,), 6.0), torch.randn(3, 16, generator=g), 6.0),
            ("lower threshold", acts(8, 40), torch.randn(9, 40, generator=g), 2.5),
            ("every column is an outlier", acts(3, 8) * 100, torch.randn(4, 8, generator=g), 6.0),
            ("one row", acts(1, 64, (10,)), torch.randn(12, 64, generator=g), 6.0),
            ("weight rows of very different scale", acts(6, 32, (31,)),
             torch.randn(5, 32, generator=g) * torch.tensor([[0.01], [1.0], [10.0], [0.1], [3.0]]), 6.0),
            ("larger layer", acts(16, 256, (1, 100, 200)), torch.randn(64, 256, generator=g) * 0.05, 6.0),
            ("float64 inputs give float32", acts(4, 24, (2,)).double(), torch.randn(5, 24, generator=g).double(),
             6.0),
            ("default threshold 6.0", acts(4, 32, (7,), 6.5), torch.randn(6, 32, generator=g), None),
            ("one output feature (M = 1)", acts(5, 32, (4,)), torch.randn(1, 32, generator=g), 6.0),
            ("one ordinary column left", acts(3, 4, (0, 1, 2)), torch.randn(2, 4, generator=g), 6.0),
        ]
    for name, x, w, threshold in cases:
        args = (x, w) if threshold is None else (x, w, threshold)
        got = c.call(name, *args)
        expected, tol = _llm_int8_reference(x, w, 6.0 if threshold is None else threshold)
        if not isinstance(got, torch.Tensor):
            c.fail(name, f"y must be a torch.Tensor, got {type(got).__name__}", args)
        if got.dtype != torch.float32:
            c.fail(name, f"y has dtype {got.dtype}, expected torch.float32", args)
        if tuple(got.shape) != expected.shape:
            c.fail(name, f"y has shape {tuple(got.shape)}, expected {expected.shape}", args)
        err = np.abs(got.detach().double().numpy() - expected.astype(np.float64))
        bad = err > tol
        if bad.any():
            exact = (x.double() @ w.double().T).numpy()
            err_got = float(np.abs(got.detach().double().numpy() - exact).max())
            err_ref = float(np.abs(expected.astype(np.float64) - exact).max())
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            detail = "" if hidden else (f" (first at {at}: got {float(got[at]):.6g}, expected "
                                        f"{float(expected[at]):.6g} ± {float(tol[at]):.2g}; max error vs the "
                                        f"exact x @ w.T is {err_got:.3g}, the LLM.int8 recipe gives "
                                        f"{err_ref:.3g})")
            hint = ""
            if err_got > 4 * err_ref:
                hint = " — check which columns are outliers (|x| > threshold, strictly) and the per-row scales"
            c.fail(name, f"y differs from the LLM.int8 recipe by more than fp16/float32 rounding allows in "
                         f"{int(bad.sum())} of {bad.size} entries{detail}{hint}", args)
    if hidden:
        c.expect_raises("K mismatch", ValueError, torch.randn(2, 4), torch.randn(3, 5), 6.0,
                        what="x and weight must share K")

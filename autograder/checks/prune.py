"""Checks for ex04_prune. References: torch.nn.utils.prune (global magnitude masks), torch's CUTLASS 2:4
converter in torch.sparse (kept values of the compressed format) and plain Python loops over groups."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

from autograder.checks import Checker
from llmspace.prune import Sparse24


def _expect_tensor(c: Checker, case, got, expected: torch.Tensor, args=None, *, what="result",
                   rtol=0.0, atol=0.0):
    """Type, shape, dtype and values of a tensor result (exact unless tolerances are given)."""
    if not isinstance(got, torch.Tensor):
        c.fail(case, f"{what} must be a torch.Tensor, got {type(got).__name__}", args)
    if got.shape != expected.shape:
        c.fail(case, f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}", args)
    if got.dtype != expected.dtype:
        c.fail(case, f"{what} has dtype {got.dtype}, expected {expected.dtype}", args)
    if not torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True):
        bad = (~torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol)).nonzero()
        where = "" if c.hidden or not len(bad) else (
            f" (first difference at index {tuple(bad[0].tolist())}: got {got[tuple(bad[0])].item()!r}, "
            f"expected {expected[tuple(bad[0])].item()!r})")
        c.fail(case, f"{what} has wrong values{where}", args)


def _randn(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---- global magnitude mask -----------------------------------------------------------------------

def _torch_global_masks(weights, sparsity):
    modules = []
    for w in weights:  # torch.nn.utils.prune works on module parameters: wrap each tensor
        m = nn.Module()
        m.weight = nn.Parameter(w.detach().clone())
        modules.append(m)
    torch_prune.global_unstructured([(m, "weight") for m in modules],
                                    pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return [m.weight_mask.bool() for m in modules]


def _expect_bool_masks(c: Checker, case, got, weights, args):
    """A list of bool masks, one per weight, each of its weight's shape."""
    if not isinstance(got, list):
        c.fail(case, f"must return a list of masks, got {type(got).__name__}", args)
    if len(got) != len(weights):
        c.fail(case, f"returned {len(got)} masks for {len(weights)} tensors", args)
    for i, (m, w) in enumerate(zip(got, weights)):
        if not isinstance(m, torch.Tensor):
            c.fail(case, f"mask {i} must be a torch.Tensor, got {type(m).__name__}", args)
        if m.dtype != torch.bool:
            c.fail(case, f"mask {i} has dtype {m.dtype}; masks are bool (True = keep)", args)
        if m.shape != w.shape:
            c.fail(case, f"mask {i} has shape {tuple(m.shape)}, expected {tuple(w.shape)} (its weight's)", args)


def _expect_magnitude_order(c: Checker, case, keep, scores, k, args, *, what="", where=None):
    """``k`` entries pruned, and no pruned magnitude above a kept one. Which of several tied entries is
    pruned is not judged: any answer with the right count and order is correct."""
    n = scores.numel()
    pruned = int((~keep).sum())
    if pruned != k:
        kth = scores.sort().values[k - 1] if k else None
        tie = kth is not None and int((scores == kth).sum()) > 1
        c.fail(case, f"{what}pruned {pruned} of {n} weights, expected {k}"
                     + (" = round(sparsity * total)" if not what else "")
                     + (": several weights tie with the threshold magnitude — prune exactly as many of them "
                        "as the count needs (which ones is up to you)" if tie else ""), args)
    if 0 < pruned < n:
        largest_pruned, smallest_kept = scores[~keep].max(), scores[keep].min()
        if largest_pruned > smallest_kept:
            detail = "" if c.hidden else (f" ({where(scores, keep)})" if where else
                                          f" (|w| = {largest_pruned.item():.6g} pruned, "
                                          f"|w| = {smallest_kept.item():.6g} kept)")
            c.fail(case, f"{what}pruned a weight whose magnitude is larger than one it kept: prune the "
                         f"smallest |w|{detail}", args)


def check_global_magnitude_mask(impl, *, hidden: bool = False) -> None:
    """Global |w| threshold across tensors: exactly round(sparsity * total) pruned, none larger than a
    kept one (reference: torch.nn.utils.prune.global_unstructured; on ties any choice is accepted)."""
    c = Checker("global_magnitude_mask", impl, hidden)
    if not hidden:
        small = torch.tensor([[0.1, -0.5], [0.3, -0.05]])
        large = torch.tensor([2.0, -0.2, 1.5, -3.0, 0.4, 0.7])
        cases = [("two tensors, 50%", [small, large], 0.5),
                 ("random 8x6 and 6x4, 70%", [_randn(1, 8, 6), _randn(2, 6, 4) * 0.3], 0.7)]
    else:
        g = torch.Generator().manual_seed(31)
        close = 1.0 + torch.randperm(300, generator=g).float() * 1e-5   # distinct, closer than fp16 can tell
        cases = [
            ("sparsity 0 keeps everything", [_randn(3, 5, 5)], 0.0),
            ("a single tensor", [_randn(4, 16, 9)], 0.37),
            ("round, not floor: 7 weights at 50%", [_randn(5, 7)], 0.5),
            ("round, not floor: 3 weights at 0.3", [_randn(6, 1, 3)], 0.3),
            ("a 1-D bias and a 3-D tensor", [_randn(7, 10), _randn(8, 2, 3, 4) * 0.5], 0.6),
            ("one layer of tiny weights", [_randn(9, 20, 20) * 1e-3, _randn(10, 20, 20)], 0.5),
            ("negative weights of large magnitude", [-_randn(11, 30).abs() * 5, _randn(12, 30)], 0.4),
            ("99% of four tensors", [_randn(13 + i, 12, 12) for i in range(4)], 0.99),
            ("float64 weights", [_randn(20, 9, 9, dtype=torch.float64)], 0.25),
            ("magnitudes tie at the threshold",
             [torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([1.0, -2.0, 1.0, -1.0])], 0.5),
            ("quantized weights: many ties", [torch.randint(-3, 4, (6, 8), generator=g).float(),
                                              torch.randint(-3, 4, (10,), generator=g).float()], 0.45),
            ("distinct magnitudes closer than float16 resolution", [close[:120].view(12, 10), -close[120:]], 0.5),
        ]
    for name, weights, sparsity in cases:
        args = (weights, sparsity)
        got = c.call(name, *args)          # on copies: a changed weight fails "modified its input"
        _expect_bool_masks(c, name, got, weights, args)
        scores = torch.cat([w.abs().double().flatten() for w in weights])
        k = round(sparsity * scores.numel())
        reference = torch.cat([m.flatten() for m in _torch_global_masks(weights, sparsity)])
        assert int((~reference).sum()) == k   # the count rule is torch.nn.utils.prune's
        _expect_magnitude_order(c, name, torch.cat([m.flatten() for m in got]), scores, k, args)
    if hidden:
        w = [_randn(30, 4, 4)]
        c.expect_raises("sparsity 1.0", ValueError, w, 1.0, what="sparsity must lie in [0, 1)")
        c.expect_raises("negative sparsity", ValueError, w, -0.2, what="sparsity must lie in [0, 1)")
        c.expect_raises("empty list", ValueError, [], 0.5, what="weights must not be empty")


# ---- N:M mask ------------------------------------------------------------------------------------

def _loop_nm_mask(w, n, m):
    """Independent reference: for each group of m along the last dim, the n largest |w| by sorted()."""
    flat = w.reshape(-1, m).abs().tolist()
    keep = [[False] * m for _ in flat]
    for g, vals in enumerate(flat):
        for i in sorted(range(m), key=lambda i: -vals[i])[:n]:
            keep[g][i] = True
    return torch.tensor(keep, dtype=torch.bool).reshape(w.shape)


def check_nm_mask(impl, *, hidden: bool = False) -> None:
    """n largest |w| of every m consecutive entries along the last dim: exactly n kept per group, none
    smaller than a dropped one of its group (reference: a loop over groups; on ties any choice)."""
    c = Checker("nm_mask", impl, hidden)
    g = torch.Generator().manual_seed(39)
    if not hidden:
        w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 0.0, -1.0, 0.5]])
        cases = [("one row, 2:4", w, 2, 4), ("random 6x16, 2:4", _randn(40, 6, 16), 2, 4)]
    else:
        cases = [
            ("negative weights count by magnitude", -_randn(41, 4, 8).abs(), 2, 4),
            ("1:4", _randn(42, 5, 12), 1, 4),
            ("4:8", _randn(43, 3, 32), 4, 8),
            ("2:8 on a 3-D tensor", _randn(44, 2, 3, 16), 2, 8),
            ("groups run along columns, not rows", _randn(45, 8, 4), 2, 4),
            ("4:4 keeps everything", _randn(46, 3, 8), 4, 4),
            ("float16 weights", _randn(47, 16, 64, dtype=torch.float16), 2, 4),
            ("ties inside groups", torch.randint(-2, 3, (8, 16), generator=g).float(), 2, 4),
            ("all-equal groups", torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]]), 2, 4),
            ("ties, 3:8", torch.randint(-1, 2, (4, 24), generator=g).float(), 3, 8),
            ("n and m left at their defaults (2:4)", _randn(38, 4, 8), None, None),
        ]
    for name, w, n, m in cases:
        args = (w, n, m) if n is not None else (w,)
        got = c.call(name, *args)          # on copies: a changed weight fails "modified its input"
        n, m = (2, 4) if n is None else (n, m)
        if not isinstance(got, torch.Tensor):
            c.fail(name, f"mask must be a torch.Tensor, got {type(got).__name__}", args)
        if got.dtype != torch.bool:
            c.fail(name, f"mask has dtype {got.dtype}; masks are bool (True = keep)", args)
        if got.shape != w.shape:
            c.fail(name, f"mask has shape {tuple(got.shape)}, expected {tuple(w.shape)} (the weight's)", args)
        keep = got.reshape(-1, m)
        scores = w.abs().double().reshape(-1, m)
        counts = keep.sum(1)
        if (counts != n).any():
            bad = int((counts != n).nonzero()[0])
            at = "" if hidden else f" (group {bad}: columns {bad * m % w.shape[-1]}..{bad * m % w.shape[-1] + m - 1} of row {bad * m // w.shape[-1]})"
            tie = bool((scores[bad] == scores[bad].sort(descending=True).values[n - 1]).sum() > 1)
            c.fail(name, f"a group of {m} keeps {int(counts[bad])} entries, expected exactly n = {n}{at}"
                         + (": entries tie at the n-th largest |w| — keep exactly n of them (which ones is up "
                            "to you)" if tie else ""), args)
        dropped_max = scores.masked_fill(keep, -1.0).max(1).values
        kept_min = scores.masked_fill(~keep, float("inf")).min(1).values
        if (dropped_max > kept_min).any():
            bad = int((dropped_max > kept_min).nonzero()[0])
            at = "" if hidden else f" (group {bad}: |w| = {dropped_max[bad].item():.6g} dropped, " \
                                   f"{kept_min[bad].item():.6g} kept)"
            c.fail(name, f"a group drops a weight larger in magnitude than one it keeps{at}", args)
        assert bool((_loop_nm_mask(w.double(), n, m).reshape(-1, m).sum(1) == n).all())
    if hidden:
        c.expect_raises("m does not divide the columns", ValueError, _randn(48, 4, 6), 2, 4,
                        what="m must divide the last dimension")
        c.expect_raises("n > m", ValueError, _randn(49, 4, 8), 5, 4, what="1 <= n <= m")


# ---- compressed 2:4 -------------------------------------------------------------------------------

def _two_four(seed, rows, cols, dtype=torch.float16, sparser=False):
    w = _randn(seed, rows, cols)
    g = w.abs().reshape(-1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(2, dim=1).indices, True)
    w = (w * keep.view_as(w)).to(dtype)
    if sparser:  # some groups with one or no non-zero
        w[0] = 0
        w[1, 1::4] = 0
        w[1, 3::4] = 0
        w[-1, ::2] = 0
    return w


def _loop_compress(w):
    """Independent reference for Sparse24's arrays: Python loops over groups and bit packing."""
    rows, cols = w.shape
    values, meta = [], []
    for r in range(rows):
        positions, row_values = [], []
        for g in range(cols // 4):
            group = w[r, 4 * g:4 * g + 4].tolist()
            nonzero = [i for i in range(4) if group[i] != 0]
            filler = [i for i in range(4) if group[i] == 0]
            pos = sorted((nonzero + filler)[:2])
            positions += pos
            row_values += [group[i] for i in pos]
        positions += [0] * (-len(positions) % 4)
        meta.append([sum(p << (2 * k) for k, p in enumerate(positions[b:b + 4]))
                     for b in range(0, len(positions), 4)])
        values.append(row_values)
    return (torch.tensor(values, dtype=w.dtype).reshape(rows, cols // 2),
            torch.tensor(meta, dtype=torch.uint8).reshape(rows, -1))


def _compress_cases(hidden):
    if not hidden:
        w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 4.0]], dtype=torch.float16)
        return [("one row", w), ("random 4x16 fp16", _two_four(50, 4, 16))]
    return [
        ("groups with fewer than 2 non-zeros", _two_four(51, 6, 32, sparser=True)),
        ("all zeros", torch.zeros(3, 8, dtype=torch.float16)),
        ("cols not a multiple of 8 (meta padded to whole bytes)", _two_four(52, 5, 12)),
        ("bfloat16", _two_four(53, 8, 24, torch.bfloat16)),
        ("float32", _two_four(54, 7, 16, torch.float32)),
        ("64x128 fp16", _two_four(55, 64, 128)),
        ("2 rows of 1024 columns (column indices past 255)", _two_four(56, 2, 1024)),
    ]


def check_compress_2to4(impl, *, hidden: bool = False) -> None:
    """Kept values + 2-bit positions (references: torch's CUTLASS converter for the values of full groups,
    a Python loop for the exact metadata bytes)."""
    c = Checker("compress_2to4", impl, hidden)
    for name, w in _compress_cases(hidden):
        got = c.call(name, w)
        c.expect_type(name, got, Sparse24, (w,))
        values, meta = _loop_compress(w)
        if tuple(got.shape) != tuple(w.shape):
            c.fail(name, f"shape is {got.shape}, expected {tuple(w.shape)}", (w,))
        _expect_tensor(c, name, got.values, values, (w,), what="values")
        if w.dtype in (torch.float16, torch.bfloat16) and w.shape[1] % 16 == 0 and w.shape[0] % 32 == 0:
            ref_values, _ = sparse_semi_structured_from_dense_cutlass(w)
            _expect_tensor(c, name, got.values, ref_values, (w,), what="values (vs torch's 2:4 converter)")
        _expect_tensor(c, name, got.meta, meta, (w,),
                       what="meta (2-bit positions, 4 per byte, low bits first)")
        if got.nbytes != w.numel() // 2 * w.element_size() + meta.numel():
            c.fail(name, f"nbytes is {got.nbytes}, expected half the values plus 2 bits per kept value "
                         f"({w.numel() // 2 * w.element_size() + meta.numel()})", (w,))
    if hidden:
        c.expect_raises("three non-zeros in a group", ValueError,
                        torch.tensor([[1.0, 2.0, 3.0, 0.0]]), what="weight must be 2:4 sparse")
        c.expect_raises("cols not a multiple of 4", ValueError, torch.zeros(2, 6),
                        what="cols must be a multiple of 4")


def check_decompress_2to4(impl, *, hidden: bool = False) -> None:
    """Sparse24 → dense: the original 2:4 matrix back, exactly, in the values' dtype."""
    c = Checker("decompress_2to4", impl, hidden)
    for name, w in _compress_cases(hidden):
        values, meta = _loop_compress(w)
        packed = Sparse24(values, meta, tuple(w.shape))
        got = c.call(name, packed)
        _expect_tensor(c, name, got, w, (packed,), what="dense matrix")
    if hidden:
        c.expect_raises("not a Sparse24", TypeError, torch.zeros(4, 8), what="packed must be a Sparse24")

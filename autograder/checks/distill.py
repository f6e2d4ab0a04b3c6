"""Checks for ex05_distill. References: torch.nn.functional.kl_div (log_target=True, batchmean),
cross_entropy (ignore_index) and mse_loss, evaluated in float64.

The grader calls student functions in a sandbox and gets their results back as values, so these checks
judge values only; that the losses backpropagate into the student and not into the teacher is tested
on the library (tests/test_distill.py) and stated in the task text."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autograder.checks import Checker


def _logits(seed, *shape, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _kd_reference(s, t, T):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over positions, in float64 with torch's kl_div."""
    V = s.shape[-1]
    return T * T * F.kl_div(F.log_softmax(s.double().reshape(-1, V) / T, -1),
                            F.log_softmax(t.double().reshape(-1, V) / T, -1),
                            log_target=True, reduction="batchmean")


# Tolerances follow from the precision the task states: "computed in float32 or wider". float32
# rounds each operation to 2**-24 ≈ 6e-8 relative. A direct float32 computation lands within ~1e-7 of
# the float64 reference on every case here, but an equally valid float32 formulation that subtracts two
# nearly equal terms (cross-entropy minus the teacher's entropy, which the docstring describes) loses
# entropy/KL × 6e-8 ≈ 2e-5 on the large-T case. RTOL = 1e-4 accepts every float32 or float64
# computation; bfloat16 arithmetic (2**-8 ≈ 4e-3 per operation; 3.7e-3 measured on its case) fails.
# ATOL covers results that are exactly 0 in exact arithmetic (identical inputs).
RTOL, ATOL = 1e-4, 1e-6


def _expect_scalar(c: Checker, case, got, expected, args, *, rtol=RTOL, atol=ATOL, what="loss",
                   nonfinite_hint="use log_softmax, never log(softmax(...)), which gives log(0) = -inf for "
                                  "confident logits"):
    if not isinstance(got, torch.Tensor):
        c.fail(case, f"{what} must be a torch.Tensor (0-D), got {type(got).__name__}", args)
    if got.ndim != 0:
        c.fail(case, f"{what} must be a 0-D tensor (one number), got shape {tuple(got.shape)}", args)
    if not got.is_floating_point():
        c.fail(case, f"{what} must be a floating tensor, got {got.dtype}", args)
    value = got.item()
    if not math.isfinite(value):
        c.fail(case, f"{what} is {value}: {nonfinite_hint}", args)
    if not math.isclose(value, float(expected), rel_tol=rtol, abs_tol=atol):
        off = value / float(expected) if float(expected) else None
        how = ("" if off is None or off <= 0 else
               f" (too large by {off:.3g}×)" if off > 1 else f" (too small by {1 / off:.3g}×)")
        c.fail(case, (f"{what} is wrong" if c.hidden else f"{what} is {value!r}, expected {float(expected)!r}")
               + (how if abs(value - float(expected)) > 1e-2 * abs(float(expected)) else
                  f" (off by {abs(value / float(expected) - 1) if float(expected) else abs(value):.2g} relative: "
                  f"compute in float32 or wider)"), args)


# ---- kd_loss -------------------------------------------------------------------------------------

def check_kd_loss(impl, *, hidden: bool = False) -> None:
    """T² · KL(teacher ‖ student) at temperature T, mean over positions (reference: F.kl_div)."""
    c = Checker("kd_loss", impl, hidden)
    if not hidden:
        cases = [
            ("3 positions, vocab 4, T=2", _logits(1, 3, 4), _logits(2, 3, 4), 2.0),
            ("batch 2 x seq 5 x vocab 10, T=4", _logits(3, 2, 5, 10), _logits(4, 2, 5, 10), 4.0),
            ("confident logits (±300), T=1", _logits(5, 4, 6, scale=300.0), _logits(6, 4, 6, scale=300.0), 1.0),
        ]
    else:
        same = _logits(7, 6, 9)
        cases = [
            ("identical logits give 0", same, same.clone(), 3.0),
            ("T=1 is plain KL", _logits(8, 7, 12), _logits(9, 7, 12), 1.0),
            ("T below 1", _logits(10, 5, 8), _logits(11, 5, 8), 0.5),
            ("large T", _logits(12, 4, 30), _logits(13, 4, 30), 20.0),
            ("one position (1-D logits)", _logits(14, 16), _logits(15, 16), 2.0),
            ("4-D logits", _logits(16, 2, 3, 4, 7), _logits(17, 2, 3, 4, 7), 3.0),
            ("teacher confident, student not", _logits(18, 8, 10, scale=200.0), _logits(19, 8, 10, scale=0.1), 1.0),
            ("student confident, teacher not", _logits(20, 8, 10, scale=0.1), _logits(21, 8, 10, scale=200.0), 1.0),
            ("float64 logits", _logits(22, 3, 5, dtype=torch.float64), _logits(23, 3, 5, dtype=torch.float64), 2.5),
            ("wide vocabulary", _logits(24, 4, 1000), _logits(25, 4, 1000), 2.0),
            ("bfloat16 logits (compute in float32 or wider)", _logits(26, 6, 100, scale=5.0, dtype=torch.bfloat16),
             _logits(27, 6, 100, scale=5.0, dtype=torch.bfloat16), 3.0),
            ("float16 logits, 3-D", _logits(28, 3, 5, 64, dtype=torch.float16),
             _logits(29, 3, 5, 64, dtype=torch.float16), 1.5),
        ]
    for name, s, t, T in cases:
        got = c.call(name, s, t, T)
        _expect_scalar(c, name, got, _kd_reference(s, t, T), (s, t, T))
    if hidden:
        s = _logits(32, 2, 5)
        c.expect_raises("shapes differ", ValueError, s, _logits(33, 2, 6), 1.0, what="same shape")
        c.expect_raises("temperature 0", ValueError, s, s, 0.0, what="temperature must be positive")


# ---- distillation_loss ---------------------------------------------------------------------------

def _labels(seed, shape, vocab, ignore_fraction=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    if ignore_fraction:
        labels[torch.rand(shape, generator=g) < ignore_fraction] = ignore_index
    return labels


def _mix_reference(s, t, labels, T, alpha, ignore_index=-100):
    V = s.shape[-1]
    keep = labels.reshape(-1) != ignore_index
    if not keep.any():
        return 0.0
    s2, t2 = s.double().reshape(-1, V)[keep], t.double().reshape(-1, V)[keep]
    ce = F.cross_entropy(s.double().reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index)
    return alpha * _kd_reference(s2, t2, T) + (1 - alpha) * ce


def check_distillation_loss(impl, *, hidden: bool = False) -> None:
    """alpha · KD + (1 - alpha) · CE over non-ignored positions (reference: F.kl_div + F.cross_entropy)."""
    c = Checker("distillation_loss", impl, hidden, builds_on=("kd_loss",))
    if not hidden:
        cases = [
            ("batch 2 x seq 4, vocab 6, T=2, alpha=0.5", _logits(40, 2, 4, 6), _logits(41, 2, 4, 6),
             _labels(42, (2, 4), 6), 2.0, 0.5, -100),
            ("alpha=0.9, T=4, some positions ignored", _logits(43, 3, 5, 8), _logits(44, 3, 5, 8),
             _labels(45, (3, 5), 8, 0.4), 4.0, 0.9, -100),
        ]
    else:
        cases = [
            ("alpha=0 is plain cross-entropy", _logits(46, 6, 7), _logits(47, 6, 7), _labels(48, (6,), 7), 3.0, 0.0, -100),
            ("alpha=1 is plain KD", _logits(49, 6, 7), _logits(50, 6, 7), _labels(51, (6,), 7), 3.0, 1.0, -100),
            ("CE at T=1 even when T=5", _logits(52, 4, 3, 9), _logits(53, 4, 3, 9), _labels(54, (4, 3), 9), 5.0, 0.3, -100),
            ("ignored positions count in neither term", _logits(55, 2, 8, 5), _logits(56, 2, 8, 5) * 5,
             _labels(57, (2, 8), 5, 0.5), 2.0, 0.7, -100),
            ("a custom ignore_index", _logits(58, 3, 4, 6), _logits(59, 3, 4, 6),
             _labels(60, (3, 4), 6, 0.3, ignore_index=0), 2.0, 0.5, 0),
            ("confident logits (±300)", _logits(61, 5, 6, scale=300.0), _logits(62, 5, 6, scale=300.0),
             _labels(63, (5,), 6), 1.0, 0.5, -100),
            ("one position kept", _logits(64, 2, 3, 5), _logits(65, 2, 3, 5),
             torch.tensor([[-100, -100, 2], [-100, -100, -100]]), 2.0, 0.4, -100),
            ("every position ignored gives 0", _logits(66, 2, 3, 5), _logits(69, 2, 3, 5),
             torch.full((2, 3), -100), 2.0, 0.4, -100),
            ("ignore_index left at its default (-100)", _logits(34, 3, 4, 6), _logits(35, 3, 4, 6),
             _labels(36, (3, 4), 6, 0.3), 2.0, 0.6, None),
        ]
    for name, s, t, labels, T, alpha, ignore in cases:
        args = (s, t, labels, T, alpha, ignore) if ignore is not None else (s, t, labels, T, alpha)
        ignore = -100 if ignore is None else ignore
        got = c.call(name, *args)
        _expect_scalar(c, name, got, _mix_reference(s, t, labels, T, alpha, ignore), args,
                       nonfinite_hint="when no position is kept the loss is 0 (a mean over zero positions is "
                                      "NaN: test for it)" if (labels == ignore).all() else
                                      "use log_softmax, never log(softmax(...))")
    if hidden:
        s, labels = _logits(67, 2, 5), _labels(68, (2,), 5)
        c.expect_raises("alpha > 1", ValueError, s, s, labels, 1.0, 1.5, -100, what="alpha must be in [0, 1]")


# ---- feature_distillation_loss --------------------------------------------------------------------

def _projection(seed, d_in, d_out):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=False).double()


def check_feature_distillation_loss(impl, *, hidden: bool = False) -> None:
    """MSE between projection(student) and teacher over kept tokens (reference: F.mse_loss)."""
    c = Checker("feature_distillation_loss", impl, hidden)
    g = torch.Generator().manual_seed(70 if hidden else 71)

    def hid(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if not hidden:
        cases = [("2 x 3 tokens, width 4 -> 8, no mask", hid(2, 3, 4), hid(2, 3, 8), _projection(1, 4, 8), None),
                 ("with a padding mask", hid(2, 5, 4), hid(2, 5, 6), _projection(2, 4, 6),
                  torch.tensor([[True] * 5, [True, True, False, False, False]]))]
    else:
        cases = [
            ("teacher narrower than student", hid(3, 4, 16), hid(3, 4, 8), _projection(3, 16, 8), None),
            ("mean over features, not sum", hid(1, 6, 4), hid(1, 6, 32), _projection(4, 4, 32), None),
            ("mask with one token", hid(2, 4, 6), hid(2, 4, 6), _projection(5, 6, 6),
             torch.tensor([[False, False, True, False], [False] * 4])),
            ("all-true mask equals no mask", hid(2, 3, 5), hid(2, 3, 7), _projection(6, 5, 7),
             torch.ones(2, 3, dtype=torch.bool)),
            ("identity projection, equal states give 0", (h := hid(2, 3, 4)), h.clone(), nn.Identity(), None),
            ("mask keeps no token gives 0", hid(2, 3, 4), hid(2, 3, 5), _projection(7, 4, 5),
             torch.zeros(2, 3, dtype=torch.bool)),
            ("float32 states", hid(3, 5, 8).float(), hid(3, 5, 4).float(), _projection(8, 8, 4).float(),
             torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [False] * 5])),
            ("mask left at its default (None)", hid(2, 2, 3), hid(2, 2, 5), _projection(10, 3, 5), "default"),
        ]
    for name, hs, ht, proj, mask in cases:
        args = (hs, ht, proj, mask) if not isinstance(mask, str) else (hs, ht, proj)
        mask = None if isinstance(mask, str) else mask
        got = c.call(name, *args)
        with torch.no_grad():
            p, t = proj(hs).double(), ht.double()
            expected = (F.mse_loss(p, t) if mask is None else
                        F.mse_loss(p[mask], t[mask]) if mask.any() else torch.zeros((), dtype=torch.float64))
        _expect_scalar(c, name, got, expected, args,
                       nonfinite_hint="when the mask keeps no token the loss is 0 (a mean over nothing is NaN)")

    if hidden:
        c.expect_raises("batch/seq mismatch", ValueError, hid(2, 3, 4), hid(2, 4, 4), nn.Identity(), None,
                        what="(batch, seq) must agree")
        c.expect_raises("projection to the wrong width", ValueError, hid(2, 3, 4), hid(2, 3, 6),
                        _projection(9, 4, 1), None,
                        what="projection(student_hidden) must have teacher_hidden's shape; a width-1 "
                             "output would broadcast silently")

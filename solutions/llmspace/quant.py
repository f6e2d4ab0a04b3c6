"""Chapter 3 — quantization: store weights in fewer bits, pay in rounding error.

A weight stored as an ``int8`` costs 1 byte instead of 2 (fp16) or 4 (fp32); as ``int4`` half a byte.
Decoding a token reads every weight once, so fewer bytes means a smaller model *and* a faster
memory-bound matmul. The price is rounding error, and the whole craft is in choosing where the grid
goes:

* **affine (asymmetric)** ``x ≈ (q - zero_point) * scale`` fits the grid to ``[min, max]``;
  **symmetric** ``x ≈ q * scale`` (``zero_point = 0``) fits it to ``[-amax, amax]`` and saves the
  zero-point arithmetic;
* **granularity**: one ``scale`` per tensor, per output channel, or per group of ``group_size``
  consecutive input weights — smaller groups follow the data better and cost more scale bytes;
* **code book**: uniform integers, or NF4's 16 quantiles of a normal distribution;
* **outliers**: LLM.int8 keeps the few activation columns with huge values in fp16;
* **error feedback**: GPTQ quantizes one column at a time and pushes the error onto the columns not
  yet quantized, weighted by the inverse Hessian ``(X Xᵀ)⁻¹`` of the calibration inputs.

Vocabulary follows torchao: ``qdata`` (the integers), ``scale``, ``zero_point``, ``group_size``.
Integer ranges are ``[qmin, qmax]`` (``int8``: ``[-128, 127]``); rounding is round-half-to-even, as in
``torch.round``, ``numpy.rint`` and Python's ``round``.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "quantize", "qrange", "choose_qparams", "quantize_affine", "dequantize_affine",
    "quantize_per_group", "dequantize_per_group", "pack_int4", "unpack_int4",
    "NF4_CODE", "quantize_nf4", "dequantize_nf4",
    "llm_int8_matmul", "gptq_quantize", "QuantLinear", "quantize_model", "model_bytes",
    "sqnr_db", "check_float_tensor", "check_bits", "SUPPORTED_BITS",
]

SUPPORTED_BITS = (2, 3, 4, 8)


# --------------------------------------------------------------------------------------------------
# The article's coding question 3, answered correctly
# --------------------------------------------------------------------------------------------------

def quantize(value: float, scale: float, zero_point: int, qmin: int = -128, qmax: int = 127) -> int:
    """Quantize one real number to an integer of the range ``[qmin, qmax]``.

    ``q = clamp(round(value / scale) + zero_point, qmin, qmax)`` with round-half-to-even (Python's
    ``round``). Rounding, not truncation: ``int(value / scale + zero_point)`` truncates the *code*
    toward 0 — toward the real value ``-zero_point * scale``, not toward ``zero_point``; on a grid of
    non-negative codes (uint8) that is a floor, which moves every value down — and doubles the
    worst-case error to a whole ``scale``. Clamping, because a value outside the calibrated range must
    saturate at ``qmin``/``qmax`` — an int8 cannot hold 300 — even when ``value / scale`` overflows to
    ±inf (a huge value or a subnormal scale), as ``torch.quantize_per_tensor`` does.

    Raises:
        ValueError: if ``scale`` is not a finite number > 0, or ``value`` is NaN/inf, or ``qmin > qmax``.
    """
    ### BEGIN SOLUTION
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value!r}")
    if qmin > qmax:
        raise ValueError(f"qmin must be <= qmax, got qmin={qmin}, qmax={qmax}")
    ratio = value / scale
    if math.isinf(ratio):  # overflowed: saturate (round(inf) would raise OverflowError)
        return qmax if ratio > 0 else qmin
    q = round(ratio) + zero_point
    return int(min(max(q, qmin), qmax))
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# Validation helpers (given to students)
# --------------------------------------------------------------------------------------------------

def check_float_tensor(name: str, x, *, finite: bool = True) -> None:
    """TypeError unless ``x`` is a floating-point torch.Tensor; ValueError if it holds NaN/inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf ({int((~torch.isfinite(x)).sum())} entries)")


def check_bits(bits) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer range of a ``bits``-bit integer: signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``."""
    check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    if 0 <= qmin and qmax <= 255:
        return torch.uint8
    return torch.int32


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(..., K)`` → ``(..., K // group_size, group_size)``, checking that group_size divides K."""
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if x.dim() == 0 or x.shape[-1] % group_size:
        raise ValueError(f"group_size must divide the last dimension: got group_size={group_size} "
                         f"for shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


# --------------------------------------------------------------------------------------------------
# Affine quantization
# --------------------------------------------------------------------------------------------------

def choose_qparams(x: torch.Tensor, bits: int = 8, *, symmetric: bool = False, axis: int | None = None,
                   group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from the min/max of ``x``, for a signed ``bits``-bit range ``[qmin, qmax]``.

    Granularity: per tensor (``axis=None, group_size=None``: 0-d results), per channel along ``axis``
    (results of shape ``(x.shape[axis],)``), or per group of ``group_size`` consecutive elements of the
    last dimension (results of shape ``(*x.shape[:-1], K // group_size)``).

    * affine: the range is widened to contain 0 (so 0.0 is exact — padding and ReLU zeros stay zero),
      ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)`` clamped to
      the range. This is ``torch.ao.quantization.MinMaxObserver``'s definition, bit for bit.
    * symmetric: ``scale = amax / qmax``, ``zero_point = 0``; the grid is ``[-qmax, qmax]`` (the value
      ``qmin`` is unused), so the extreme value is exact and nothing clips. (torch.ao divides by
      ``(qmax - qmin) / 2 = 127.5`` instead, a finer grid that clips amax by up to half a step.)

    ``scale`` is float32, at least ``torch.finfo(float32).eps`` (an all-zero slice gets scale = eps);
    ``zero_point`` is int32.
    """
    check_float_tensor("x", x)
    check_bits(bits)
    qmin, qmax = qrange(bits)
    x = x.float()
    if group_size is not None:
        if axis is not None:
            raise ValueError("pass either axis (per channel) or group_size (per group), not both")
        g = _groups(x, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    elif axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis must lie in [{-x.dim()}, {x.dim()}), got {axis}")
        moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = moved.amin(dim=1), moved.amax(dim=1)
    else:
        lo, hi = x.min(), x.max()
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        amax = torch.maximum(-lo, hi).clamp(min=0)
        scale = (amax / qmax).clamp(min=eps)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / float(qmax - qmin)).clamp(min=eps)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                    ) -> torch.Tensor:
    """Quantize a tensor: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Args:
        x: float tensor, any shape.
        scale: float tensor broadcastable to ``x`` (0-d per tensor, ``(C, 1)`` per row, ...); > 0.
        zero_point: integer tensor broadcastable to ``x``.
        qmin, qmax: the integer range, e.g. ``-128, 127``.

    Returns:
        Integer tensor of ``x.shape``: ``int8`` if the range fits in int8, else ``uint8`` if it fits in
        uint8, else ``int32``. Round-half-to-even (``torch.round``), computed in float32.

    Equal to ``torch.quantize_per_tensor`` / ``quantize_per_channel`` (``int_repr()``) bit for bit when
    ``zero_point`` is 0; with a non-zero zero point torch rounds ``x / scale + zero_point`` as a whole,
    which differs from rounding first (torchao's order, used here) only at exact ties with an odd zero point.

    The arguments are not modified.
    """
    check_float_tensor("x", x)
    check_float_tensor("scale", scale)
    if zero_point.is_floating_point() or zero_point.is_complex():
        raise TypeError(f"zero_point must have an integer dtype, got {zero_point.dtype}")
    if qmin > qmax:
        raise ValueError(f"qmin must be <= qmax, got qmin={qmin}, qmax={qmax}")
    ### BEGIN SOLUTION
    if (scale.float() <= 0).any():   # also a float64 scale below float32's range: 0/0 would be NaN
        raise ValueError("scale must be > 0 everywhere (in float32, the dtype of the computation)")
    q = torch.round(x.float() / scale.float()) + zero_point
    return q.clamp(qmin, qmax).to(_int_dtype(qmin, qmax))
    ### END SOLUTION


def dequantize_affine(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(qdata - zero_point) * scale`` in ``dtype`` (arguments broadcast as in :func:`quantize_affine`)."""
    if qdata.is_floating_point():
        raise TypeError(f"qdata must have an integer dtype, got {qdata.dtype}")
    return ((qdata.to(torch.int32) - zero_point.to(torch.int32)).float() * scale.float()).to(dtype)


def quantize_per_group(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` with one (scale, zero_point) per group of ``group_size`` consecutive elements of
    its last dimension (for a weight ``(out_features, in_features)``: groups along the input).

    Returns:
        ``(qdata, scale, zero_point)``: ``qdata`` int8 of ``w.shape`` in the signed ``bits``-bit range;
        ``scale`` float32 and ``zero_point`` int32, both ``(*w.shape[:-1], K // group_size)``, as given
        by :func:`choose_qparams` (affine by default).

    Raises:
        ValueError: unsupported ``bits``, ``group_size`` not dividing the last dimension, NaN/inf in ``w``.
        TypeError: ``w`` not a float tensor.

    ``w`` is not modified.
    """
    check_float_tensor("w", w)
    check_bits(bits)
    ### BEGIN SOLUTION
    scale, zero_point = choose_qparams(w, bits, symmetric=symmetric, group_size=group_size)
    qmin, qmax = qrange(bits)
    q = torch.round(_groups(w.float(), group_size) / scale[..., None]) + zero_point[..., None]
    return q.clamp(qmin, qmax).to(torch.int8).reshape(w.shape), scale, zero_point
    ### END SOLUTION


def dequantize_per_group(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_per_group`: ``(..., K)`` integers → ``(..., K)`` floats in ``dtype``."""
    group_size = qdata.shape[-1] // scale.shape[-1]
    g = _groups(qdata, group_size)
    return dequantize_affine(g, scale[..., None], zero_point[..., None], dtype).reshape(qdata.shape)


# --------------------------------------------------------------------------------------------------
# int4 packing
# --------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension.

    Args:
        q: integer tensor ``(..., n)`` of codes in ``[0, 15]`` (shift signed values by 8 first).

    Returns:
        uint8 tensor ``(..., ceil(n / 2))``: byte ``j`` holds element ``2j`` in its low nibble and
        element ``2j + 1`` in its high nibble. An odd ``n`` pads the last high nibble with 0.

    Raises:
        TypeError: ``q`` not an integer tensor. ValueError: a code outside ``[0, 15]``, or a 0-d tensor.

    ``q`` is not modified.
    """
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer torch.Tensor, got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.dim() == 0:
        raise ValueError("q must have at least one dimension")
    ### BEGIN SOLUTION
    if q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError(f"q must hold codes in [0, 15], got min {int(q.min())} and max {int(q.max())}")
    q = q.to(torch.uint8)
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)
    ### END SOLUTION


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., ceil(n / 2))`` → uint8 codes ``(..., n)``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 torch.Tensor, got "
                        f"{packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__}")
    if packed.dim() == 0 or packed.shape[-1] != (n + 1) // 2:
        raise ValueError(f"packed must have ceil(n / 2) = {(n + 1) // 2} bytes in its last dimension "
                         f"for n = {n}, got shape {tuple(packed.shape)}")
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :n]


# --------------------------------------------------------------------------------------------------
# NF4 (QLoRA, Dettmers et al. 2023)
# --------------------------------------------------------------------------------------------------

# The 16 values of NF4 as published with QLoRA (bitsandbytes' table): 8 quantiles of N(0, 1) for the
# positive half, 7 for the negative half, plus an exact zero, normalized to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: per block of ``block_size`` consecutive elements (last dimension), divide by the block's
    absmax and store the index of the nearest of the 16 :data:`NF4_CODE` values.

    Returns:
        ``(codes, absmax)``: uint8 codes in ``[0, 15]`` of ``w.shape`` and float32 absmax
        ``(*w.shape[:-1], K // block_size)``. (QLoRA additionally quantizes absmax itself — "double
        quantization" — which this does not.)
    """
    check_float_tensor("w", w)
    g = _groups(w.float(), block_size)
    absmax = g.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    normalized = g / absmax[..., None]
    # nearest code: boundaries are the midpoints between consecutive code values
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    codes = torch.bucketize(normalized, mids).to(torch.uint8)
    return codes.reshape(w.shape), absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    g = _groups(codes, codes.shape[-1] // absmax.shape[-1])
    return (NF4_CODE[g.long()] * absmax[..., None]).reshape(codes.shape).to(dtype)


# --------------------------------------------------------------------------------------------------
# LLM.int8 (Dettmers et al. 2022): outlier columns in fp16, the rest in int8
# --------------------------------------------------------------------------------------------------

def llm_int8_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """``x @ weight.T`` the LLM.int8 way.

    Args:
        x: ``(N, K)`` activations.
        weight: ``(M, K)`` (``nn.Linear`` layout).
        threshold: a feature (column of ``x``) is an outlier if any ``|x[:, k]| > threshold``.

    Returns:
        ``(N, M)`` float32 (whatever the input dtype): the outlier columns multiplied in fp16, plus the
        other columns in int8.

        * fp16 part: ``x[:, outliers]`` and ``weight[:, outliers]`` rounded to fp16 and multiplied —
          with fp16 arithmetic (an fp16 matmul, as on a GPU) or with the fp16 values in float32; both
          are accepted, i.e. the result may differ from the exact product of the fp16 values by fp16
          rounding, at most ``(k + 1) · 2⁻¹¹ · Σ|x·w|`` over the ``k`` outlier columns.
        * int8 part: ``x`` quantized per row (vector-wise, symmetric: scale = absmax / 127 in float32,
          at least float32 eps, codes ``round(x / scale)`` clamped to ±127), ``weight`` likewise per
          output row; the codes multiplied in exact integer arithmetic and rescaled by the outer product
          of the two scale vectors (float32 rounding only).

        Without the split, one outlier of magnitude 60 in a row makes that row's step 60/127 ≈ 0.47: a
        value of size 1 rounds to ±2 steps, and the row's standard-normal values share about a dozen of
        the 255 levels (chapter 3 counts them).

    ``x`` and ``weight`` are not modified.
    """
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (N, K) and weight (M, K) with the same K, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    ### BEGIN SOLUTION
    x, weight = x.float(), weight.float()
    outliers = (x.abs() > threshold).any(dim=0)
    y = x[:, outliers].half().float() @ weight[:, outliers].half().float().T
    xr, wr = x[:, ~outliers], weight[:, ~outliers]
    if xr.shape[1] == 0 or xr.shape[0] == 0 or wr.shape[0] == 0:   # nothing left for the int8 part
        return y
    sx, _ = choose_qparams(xr, 8, symmetric=True, axis=0)
    sw, _ = choose_qparams(wr, 8, symmetric=True, axis=0)
    qx = torch.round(xr / sx[:, None]).clamp(-127, 127)   # symmetric: no zero point
    qw = torch.round(wr / sw[:, None]).clamp(-127, 127)
    acc = qx.to(torch.int64) @ qw.to(torch.int64).T     # exact integer sums, like an int32 accumulator
    return y + acc.float() * sx[:, None] * sw[None, :]
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# GPTQ (Frantar et al. 2022) for one linear layer
# --------------------------------------------------------------------------------------------------

def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128, *,
                  symmetric: bool = False, damp: float = 0.01, block_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` ``(M, K)`` to minimize ``||X Wᵀ - X Qᵀ||²`` given ``hessian = Xᵀ X`` ``(K, K)``.

    The algorithm of the GPTQ paper (Algorithm 1, with lazy block updates): dampen ``H += damp *
    mean(diag H) * I`` (and give dead inputs, ``H[k, k] = 0``, a unit diagonal and zero weights), take
    ``U = cholesky(H⁻¹)ᵀ`` (upper), then for each column ``k`` in order: quantize it with its group's
    parameters (chosen by min/max of the *updated* weights when the group starts), and subtract
    ``(w_k - q_k) / U[k, k] * U[k, k+1:]`` from the columns not yet quantized. With ``H ∝ I`` no error
    is propagated and the result equals round-to-nearest exactly.

    Returns:
        ``(qdata, scale, zero_point)`` in the layout of :func:`quantize_per_group`.
    """
    check_float_tensor("weight", weight)
    check_float_tensor("hessian", hessian)
    check_bits(bits)
    M, K = weight.shape
    if hessian.shape != (K, K):
        raise ValueError(f"hessian must be (K, K) = ({K}, {K}), got {tuple(hessian.shape)}")
    _groups(weight, group_size)
    qmin, qmax = qrange(bits)
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(M, K, dtype=torch.int8)
    scales = torch.zeros(M, K // group_size)
    zeros = torch.zeros(M, K // group_size, dtype=torch.int32)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            k = b0 + j
            if k % group_size == 0:   # group parameters from the current (error-corrected) weights
                group = torch.cat([Wb[:, j:], W[:, b1:]], dim=1)[:, :group_size].float()
                s, z = choose_qparams(group, bits, symmetric=symmetric, axis=0)
                scales[:, k // group_size], zeros[:, k // group_size] = s, z
            s, z = scales[:, k // group_size], zeros[:, k // group_size]
            q = quantize_affine(Wb[:, j].float(), s, z, qmin, qmax)
            Q[:, k] = q
            err = (Wb[:, j] - dequantize_affine(q, s, z).double()) / Ub[j, j]
            Wb[:, j:] -= err[:, None] * Ub[j, j:][None, :]
            Err[:, j] = err
        W[:, b1:] -= Err @ U[b0:b1, b1:]   # the lazy update of every later block at once
    return Q, scales, zeros


# --------------------------------------------------------------------------------------------------
# Quantized linear layers and whole models
# --------------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``: integer weights with per-group scales (and zero points),
    dequantized to the activation dtype at every forward.

    Stored buffers (all counted by :func:`model_bytes`):

    * ``qdata``: bits <= 4 → uint8 ``(out, ceil(in / 2))``, two unsigned codes ``q - qmin`` per byte
      (3- and 2-bit codes also take a 4-bit nibble here: a dense 3-bit packer would save a quarter);
      bits = 8 → int8 ``(out, in)``.
    * ``scale``: ``(out, in // group_size)`` in ``scale_dtype`` (fp16 by default).
    * ``zero_point``: ``(out, in // group_size)`` int8 — only when asymmetric (symmetric stores none).
    * ``bias``: as in the original layer (fp32 by default).
    """

    def __init__(self, qdata, scale, zero_point, bits, group_size, bias=None, *, symmetric,
                 scale_dtype=torch.float16):
        super().__init__()
        check_bits(bits)
        self.out_features, self.in_features = qdata.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        qmin, _ = qrange(bits)
        if bits <= 4:
            self.register_buffer("qdata", pack_int4((qdata.to(torch.int16) - qmin).to(torch.uint8)))
        else:
            self.register_buffer("qdata", qdata.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(scale_dtype).contiguous())
        self.register_buffer("zero_point", None if symmetric else zero_point.to(torch.int8).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, *,
                    symmetric: bool = True, method: str = "rtn", hessian: torch.Tensor | None = None,
                    scale_dtype=torch.float16) -> "QuantLinear":
        """Quantize ``linear.weight``; ``group_size=None`` means per output channel (one group per row).
        ``method="gptq"`` needs ``hessian = Xᵀ X`` of the layer's calibration inputs ``(in, in)``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        g = w.shape[1] if group_size is None else group_size
        if method == "rtn":
            q, s, z = quantize_per_group(w, bits, g, symmetric=symmetric)
        elif method == "gptq":
            if hessian is None:
                raise ValueError("method='gptq' needs the layer's hessian (calibration inputs X: Xᵀ X)")
            q, s, z = gptq_quantize(w, hessian, bits, g, symmetric=symmetric)
        else:
            raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
        return cls(q, s, z, bits, g, linear.bias, symmetric=symmetric, scale_dtype=scale_dtype)

    def int_weight(self) -> torch.Tensor:
        """The signed integer weights ``(out, in)`` as int8."""
        if self.bits <= 4:
            qmin, _ = qrange(self.bits)
            return (unpack_int4(self.qdata, self.in_features).to(torch.int16) + qmin).to(torch.int8)
        return self.qdata

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        zero_point = (torch.zeros_like(self.scale, dtype=torch.int32) if self.zero_point is None
                      else self.zero_point)
        return dequantize_per_group(self.int_weight(), self.scale.float(), zero_point, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def weight_bytes(self) -> int:
        """Bytes of qdata + scale + zero_point (bias excluded)."""
        return sum(t.nbytes for t in (self.qdata, self.scale, self.zero_point) if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def _linear_names(model: nn.Module, skip: Callable[[str], bool] | None) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (skip and skip(name))]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 4, group_size: int | None = 128, method: str = "rtn", *,
                   symmetric: bool = True, calibrate: Callable[[nn.Module], None] | None = None,
                   skip: Callable[[str], bool] | None = None, scale_dtype=torch.float16) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`QuantLinear`; returns ``model``.

    Args:
        bits: 2, 3, 4 or 8. group_size: inputs per scale (``None``: per output channel); it must divide
            every quantized layer's ``in_features``.
        method: ``"rtn"`` (round to nearest) or ``"gptq"``; GPTQ needs ``calibrate(model)``, a function
            that runs the model on calibration data. Each layer's Hessian ``Σ xᵀx`` is accumulated from
            the inputs it sees in the *full-precision* model during that one pass (a one-shot
            simplification of the paper, which re-runs calibration through the already-quantized
            prefix layer by layer).
        skip: ``skip(name) -> True`` leaves that linear layer in full precision.
    """
    check_bits(bits)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    names = _linear_names(model, skip)
    for name in names:
        k = model.get_submodule(name).in_features
        if group_size is not None and (group_size <= 0 or k % group_size):
            raise ValueError(f"group_size={group_size} does not divide in_features={k} of layer {name!r}")
    hessians = {}
    if method == "gptq":
        if calibrate is None:
            raise ValueError("method='gptq' needs calibrate(model), which runs calibration data through it")
        handles = []
        for name in names:
            k = model.get_submodule(name).in_features
            hessians[name] = torch.zeros(k, k, dtype=torch.float64)

            def hook(module, inputs, output, name=name):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                hessians[name] += x.T @ x
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            calibrate(model)
        finally:
            for h in handles:
                h.remove()
    for name in names:
        linear = model.get_submodule(name)
        _set_module(model, name, QuantLinear.from_linear(
            linear, bits, group_size, symmetric=symmetric, method=method,
            hessian=hessians.get(name), scale_dtype=scale_dtype))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and every buffer of ``model``, each distinct tensor counted once.

    Counted: ``numel * element_size`` of weights, biases, embeddings, norms and the quantized buffers
    (``qdata``, ``scale``, ``zero_point``). Not counted: Python objects, activations, optimizer state,
    file-format headers.
    """
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(Σ ref² / Σ (ref - approx)²)``;
    each extra bit of a uniform quantizer adds ≈ 6.02 dB. ``inf`` when they are equal."""
    ref, approx = reference.double(), approximation.double()
    if ref.shape != approx.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} and {tuple(approx.shape)}")
    noise = (ref - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)

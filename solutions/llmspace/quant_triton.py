"""W4A16: int4 weights (two per byte, fp16 scale per group) times fp16/bf16/fp32 activations, in Triton.

Why a fused kernel: decoding one token multiplies a handful of activation rows by every weight of the
model, so the time is the time to *read the weights*. Stored as int4 with one fp16 scale per 128
weights, a weight costs 4.125 bits instead of fp16's 16 — 3.9× fewer bytes. That saving only turns into
speed if the weights are dequantized in registers, inside the matmul; dequantizing to an fp16 matrix in
memory first and then calling an fp16 matmul reads and writes *more* bytes than fp16 alone.

Layout (that of :class:`llmspace.quant.QuantLinear` with ``bits=4``):

* ``qdata``: uint8 ``(N, ceil(K / 2))``; byte ``j`` of row ``n`` holds the unsigned codes of weights
  ``2j`` (low nibble) and ``2j + 1`` (high nibble); code ``u`` means integer ``u - 8``.
* ``scale``: ``(N, K // group_size)`` fp16 (any float dtype works).
* ``zero_point``: ``None`` (symmetric) or int8 ``(N, K // group_size)``.
* weight ``W[n, k] = (u - 8 - zero_point[n, k // g]) * scale[n, k // g]``; output ``y = x @ Wᵀ``.

:func:`w4a16_matmul_torch` is the pure-torch twin every kernel result is tested against; on the CPU the
kernel runs under ``TRITON_INTERPRET=1`` (tests), on a CUDA GPU natively.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llmspace.quant import unpack_int4

__all__ = ["w4a16_matmul", "w4a16_matmul_torch", "w4a16_linear", "triton_available"]


def triton_available(device: torch.device | str) -> bool:
    """True where the kernel can run: a CUDA device, or any device under ``TRITON_INTERPRET=1``."""
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_BYTES, K_PER_SPLIT,
                  stride_xm, stride_qn, stride_sn, stride_ym,
                  GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                  ONE_GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (n, m, s) owns the (BLOCK_M, BLOCK_N) tile of y at (m, n) and the s-th slice of K.
    # Each byte holds the codes of k = 2j (low nibble) and k = 2j + 1 (high nibble): load it once and
    # multiply the low nibbles by x's even columns and the high nibbles by its odd columns.
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    HALF: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_s * K_PER_SPLIT                      # a multiple of BLOCK_K
    for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), BLOCK_K):
        rj = k0 // 2 + tl.arange(0, HALF)              # byte index within the row
        k_even, k_odd = 2 * rj, 2 * rj + 1
        e_ok, o_ok = k_even < K, k_odd < K
        # the mask depends on the byte index alone, so the row's bytes load as wide vectors
        byte = tl.load(q_ptr + rn[:, None] * stride_qn + rj[None, :], mask=n_ok[:, None] & (rj < K_BYTES)[None, :],
                       other=0)                                        # (BLOCK_N, HALF) uint8
        lo = (byte & 0xF).to(tl.float32) - 8.0
        hi = (byte >> 4).to(tl.float32) - 8.0
        if ONE_GROUP:
            # BLOCK_K divides GROUP_SIZE: the whole tile shares one scale per row, one load per row
            g = k0 // GROUP_SIZE
            s_row = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            s_even, s_odd = s_row, s_row
            if HAS_ZERO:
                z_row = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0).to(tl.float32)[:, None]
                lo -= z_row
                hi -= z_row
        else:
            g_even, g_odd = k_even // GROUP_SIZE, k_odd // GROUP_SIZE
            s_even = tl.load(s_ptr + rn[:, None] * stride_sn + g_even[None, :],
                             mask=n_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
            s_odd = tl.load(s_ptr + rn[:, None] * stride_sn + g_odd[None, :],
                            mask=n_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
            if HAS_ZERO:
                lo -= tl.load(z_ptr + rn[:, None] * stride_sn + g_even[None, :],
                              mask=n_ok[:, None] & e_ok[None, :], other=0).to(tl.float32)
                hi -= tl.load(z_ptr + rn[:, None] * stride_sn + g_odd[None, :],
                              mask=n_ok[:, None] & o_ok[None, :], other=0).to(tl.float32)
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + k_even[None, :], mask=m_ok[:, None] & e_ok[None, :],
                         other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + k_odd[None, :], mask=m_ok[:, None] & o_ok[None, :],
                        other=0.0)
        w_even = (lo * s_even).to(x_even.dtype)   # rounded to the activation dtype, like the twin
        w_odd = (hi * s_odd).to(x_odd.dtype)
        if IEEE:
            acc += tl.dot(x_even, tl.trans(w_even), input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(w_odd), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(w_even))
            acc += tl.dot(x_odd, tl.trans(w_odd))
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:                                               # y is an fp32 buffer of partial sums
        tl.atomic_add(y_ptrs, acc, mask=y_ok)


def _check(x, qdata, scale, zero_point, group_size, in_features):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} in its last dimension, got {tuple(x.shape)}")
    if qdata.dtype != torch.uint8 or qdata.dim() != 2 or qdata.shape[1] != (in_features + 1) // 2:
        raise ValueError(f"qdata must be uint8 (N, ceil(K / 2)) = (N, {(in_features + 1) // 2}), got "
                         f"{qdata.dtype} {tuple(qdata.shape)}")
    if in_features % group_size or scale.shape != (qdata.shape[0], in_features // group_size):
        raise ValueError(f"scale must be (N, K // group_size) = ({qdata.shape[0]}, {in_features // group_size})"
                         f" with group_size dividing K = {in_features}, got group_size={group_size}, "
                         f"scale {tuple(scale.shape)}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, got "
                         f"{tuple(zero_point.shape)}")


def w4a16_matmul_torch(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                       zero_point: torch.Tensor | None, group_size: int, in_features: int) -> torch.Tensor:
    """Pure-torch twin: unpack, dequantize in fp32, round the weight to ``x.dtype``, then ``x @ Wᵀ``
    accumulated in fp32. ``x``: ``(..., K)`` → ``(..., N)`` in ``x.dtype``."""
    _check(x, qdata, scale, zero_point, group_size, in_features)
    q = unpack_int4(qdata, in_features).float() - 8
    groups = q.view(q.shape[0], -1, group_size)
    if zero_point is not None:
        groups = groups - zero_point.float()[..., None]
    w = (groups * scale.float()[..., None]).view(q.shape).to(x.dtype)
    return (x.float() @ w.float().T).to(x.dtype)


def _auto_split_k(device: torch.device, tiles: int, k_blocks: int) -> int:
    """Slices of K so that about four programs per SM are in flight: a decode-shaped product has too
    few output tiles (N / BLOCK_N) to fill a GPU, and its time is the time to stream the weights."""
    if device.type != "cuda":
        return 1                                        # the interpreter runs programs one at a time
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k_blocks, -(-4 * sms // max(tiles, 1))))


def w4a16_matmul(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 group_size: int, in_features: int, *, block_n: int = 64, block_k: int | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """The Triton kernel: ``x`` ``(..., K)`` (fp16, bf16 or fp32) → ``(..., N)`` in ``x.dtype``.

    Every program computes a ``(BLOCK_M, block_n)`` tile of ``y`` over one slice of ``K`` (``BLOCK_M =
    16``, the smallest ``tl.dot`` tile: decode batches of 1–16 rows take one tile), loading each packed
    byte once, dequantizing both nibbles in registers and accumulating in fp32. ``split_k`` slices ``K``
    across programs (partial sums meet by fp32 atomic adds; ``None`` picks enough slices to fill the GPU,
    1 under the interpreter). Any ``K`` (odd included) and any ``group_size`` dividing ``K``;
    ``block_k`` must be a power of two ≥ 32; ``None`` takes the largest one ≤ 256 that divides
    ``group_size`` (then a tile needs one scale per row, loaded once), else 256.
    """
    _check(x, qdata, scale, zero_point, group_size, in_features)
    if not triton_available(x.device):
        raise RuntimeError(f"the Triton kernel needs a CUDA device or TRITON_INTERPRET=1 (x is on {x.device}); "
                           f"use w4a16_matmul_torch on the CPU")
    if block_k is None:
        block_k = next((b for b in (256, 128, 64, 32) if group_size % b == 0), 256)
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 32 (two tl.dot tiles of block_k / 2), got {block_k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    M, N = x2.shape[0], qdata.shape[0]
    qdata, scale = qdata.contiguous(), scale.contiguous()
    z = zero_point.contiguous() if zero_point is not None else scale   # unused pointer when HAS_ZERO=False
    block_m = 16
    k_blocks = triton.cdiv(in_features, block_k)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = _auto_split_k(x.device, tiles, k_blocks) if split_k is None else int(split_k)
    if not 1 <= split:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    split = min(split, k_blocks)
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(in_features, k_per_split)       # no empty slices
    y = (torch.empty(M, N, dtype=x.dtype, device=x.device) if split == 1
         else torch.zeros(M, N, dtype=torch.float32, device=x.device))
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split)
    _w4a16_kernel[grid](x2, qdata, scale, z, y, M, N, in_features, qdata.shape[1], k_per_split,
                        x2.stride(0), qdata.stride(0), scale.stride(0), y.stride(0),
                        GROUP_SIZE=group_size, HAS_ZERO=zero_point is not None,
                        IEEE=x.dtype == torch.float32, SPLIT_K=split, ONE_GROUP=group_size % block_k == 0,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.to(x.dtype).reshape(*lead, N)


def w4a16_linear(x: torch.Tensor, layer, *, use_triton: bool | None = None) -> torch.Tensor:
    """``layer(x)`` for a 4-bit :class:`llmspace.quant.QuantLinear`, through the kernel where it can run
    (``use_triton=None``: CUDA or the interpreter) and the twin elsewhere; adds the bias."""
    if layer.bits != 4:
        raise ValueError(f"the W4A16 kernel needs a 4-bit layer, got bits={layer.bits}")
    use_triton = triton_available(x.device) if use_triton is None else use_triton
    fn = w4a16_matmul if use_triton else w4a16_matmul_torch
    y = fn(x, layer.qdata, layer.scale, layer.zero_point, layer.group_size, layer.in_features)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)

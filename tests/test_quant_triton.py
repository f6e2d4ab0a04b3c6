"""The W4A16 Triton kernel against its pure-torch twin, and the twin against QuantLinear / F.linear
(reference: torch.nn.functional.linear on the dequantized weight). On the CPU the kernel runs under
TRITON_INTERPRET=1, set by the root conftest before the kernel is defined."""
import os

import pytest
import torch
import torch.nn as nn

from llmspace import quant as Q
from llmspace.quant_triton import w4a16_linear, w4a16_matmul, w4a16_matmul_torch

# (batch shape of x, out_features N, in_features K, group_size, symmetric)
SHAPES = [
    ((1,), 64, 128, 128, True),      # one decode token, one group per row
    ((3,), 70, 130, 26, False),      # N not a multiple of the tile, groups of 26
    ((2,), 33, 99, 33, True),        # odd K: the last byte of each row holds one code
    ((17,), 40, 96, 32, False),      # M > 16: two row tiles
    ((5,), 1, 64, 16, True),         # a single output
    ((2, 3), 96, 256, 64, False),    # batched leading dimensions
    ((4,), 128, 200, 8, True),       # K not a multiple of BLOCK_K = 64, tiny groups
    ((2,), 48, 256, 64, False),      # groups of 64: one scale per row per tile (the fast path)
    ((3,), 40, 384, 128, True),      # groups of 128, K = 3 tiles
]


def _layer(n, k, group_size, symmetric, seed=0):
    torch.manual_seed(seed)
    return Q.QuantLinear.from_linear(nn.Linear(k, n), 4, group_size, symmetric=symmetric)


@pytest.mark.parametrize("lead, n, k, group_size, symmetric", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_twin(lead, n, k, group_size, symmetric, dtype):
    """Both accumulate in fp32 from the same dtype-rounded weights: fp32 outputs agree to float32
    round-off, fp16 outputs to one fp16 ulp (2^-10 relative) from the final rounding."""
    layer = _layer(n, k, group_size, symmetric)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (layer.qdata, layer.scale, layer.zero_point, group_size, k)
    got, expected = w4a16_matmul(x, *args), w4a16_matmul_torch(x, *args)
    assert got.shape == (*lead, n) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("lead, n, k, group_size, symmetric", SHAPES[:3])
def test_twin_matches_quant_linear_and_f_linear(lead, n, k, group_size, symmetric):
    """Reference: F.linear(x, dequantized weight, bias) — what QuantLinear.forward computes."""
    layer = _layer(n, k, group_size, symmetric)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(2))
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(w4a16_linear(x, layer, use_triton=False), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w4a16_linear(x, layer, use_triton=True), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("block_n, block_k, split_k", [(16, 32, 1), (32, 128, 1), (16, 32, 3), (64, 64, 2), (16, None, 2)])
def test_kernel_tile_sizes(block_n, block_k, split_k):
    """Tile sizes and K slices (fp32 atomic partial sums) give the same product as the twin."""
    layer = _layer(48, 160, 32, False)
    x = torch.randn(6, 160, generator=torch.Generator().manual_seed(3))
    args = (layer.qdata, layer.scale, layer.zero_point, 32, 160)
    torch.testing.assert_close(w4a16_matmul(x, *args, block_n=block_n, block_k=block_k, split_k=split_k),
                               w4a16_matmul_torch(x, *args), rtol=1e-5, atol=1e-5)


def test_bad_input():
    layer = _layer(8, 64, 32, True)
    args = (layer.qdata, layer.scale, layer.zero_point, 32, 64)
    with pytest.raises(ValueError, match="in_features = 64"):
        w4a16_matmul(torch.randn(2, 63), *args)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        w4a16_matmul(torch.ones(2, 64, dtype=torch.int32), *args)
    with pytest.raises(ValueError, match="group_size dividing K"):
        w4a16_matmul(torch.randn(2, 64), layer.qdata, layer.scale, None, 24, 64)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        w4a16_matmul(torch.randn(2, 64), *args, block_k=48)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        w4a16_matmul(torch.randn(2, 64), *args, split_k=0)
    with pytest.raises(ValueError, match="4-bit"):
        w4a16_linear(torch.randn(2, 64), Q.QuantLinear.from_linear(nn.Linear(64, 8), 8, 32))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    layer = _layer(8, 64, 32, True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA device or TRITON_INTERPRET=1"):
        w4a16_matmul(torch.randn(2, 64), layer.qdata, layer.scale, None, 32, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernel's native target)")
def test_kernel_on_gpu_matches_twin():
    layer = _layer(4096, 4096, 128, True).cuda()
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    args = (layer.qdata, layer.scale, layer.zero_point, 128, 4096)
    torch.testing.assert_close(w4a16_matmul(x, *args), w4a16_matmul_torch(x, *args), rtol=2e-3, atol=1e-3)


def test_interpreter_is_on_for_cpu_tests():
    assert os.environ.get("TRITON_INTERPRET") == "1"

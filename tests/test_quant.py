"""llmspace.quant against references nobody here wrote: torch's quantized tensors and observers
(torch.quantize_per_tensor / quantize_per_channel, torch.ao MinMaxObservers), numpy's packbits, the NF4
construction of the QLoRA paper via scipy's normal quantiles, and the quantization-noise formula."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import norm

from autograder.checks import CheckFailed
from autograder.checks.quant import check_quantize
from autograder.fixtures import article
from llmspace import quant as Q


@pytest.fixture(autouse=True)
def _quiet_deprecations():
    # torch.quantize_per_* are deprecated (still correct); they are only used as references here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_quantize_scalar_matches_torch_quantize_per_tensor():
    """Reference: torch.quantize_per_tensor(..., torch.qint8).int_repr() — round half to even, clamp.
    Random values (no constructed ties: see the per-tensor test for what differs at ties)."""
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 2
    for scale, zero_point in [(0.01, 0), (0.037, 5), (0.5, -20)]:
        expected = torch.quantize_per_tensor(values, scale, zero_point, torch.qint8).int_repr().tolist()
        got = [Q.quantize(v, scale, zero_point) for v in values.tolist()]
        assert got == expected


@pytest.mark.parametrize("qmin, qmax, torch_dtype", [(-128, 127, torch.qint8), (0, 255, torch.quint8)])
@pytest.mark.parametrize("scale", [5e-324, 1e-310, 1e-300, 1e-38, 1e-40, 1e-45])
@pytest.mark.parametrize("value", [1.0, -1.0, 3e38, -3e38, 1e-30, -2.5e-30])
@pytest.mark.parametrize("zero_point", [0, 3, -5])
def test_quantize_scalar_saturates_when_the_ratio_overflows(value, scale, zero_point, qmin, qmax, torch_dtype):
    """A subnormal scale or a huge value makes value / scale overflow to ±inf (round(inf) raises
    OverflowError); the scalar must saturate like torch.quantize_per_tensor (reference) and like the
    tensor version."""
    zero_point = min(max(zero_point, qmin), qmax)
    expected = torch.quantize_per_tensor(torch.tensor([value]), scale, zero_point, torch_dtype).int_repr().item()
    assert Q.quantize(value, scale, zero_point, qmin, qmax) == expected
    scale_tensor = torch.tensor(scale, dtype=torch.float64)
    if scale_tensor.float() > 0:    # the tensor version computes in float32, where 1e-300 is 0: it refuses
        assert Q.quantize_affine(torch.tensor([value]), scale_tensor, torch.tensor(zero_point), qmin, qmax).item() \
            == expected


@pytest.mark.parametrize("value, scale, expected", [(1e308, 1e-10, 127), (-1e308, 1e-300, -128), (1.7e308, 0.5, 127)])
def test_quantize_scalar_saturates_beyond_float32(value, scale, expected):
    """Ratios that overflow float64 itself (torch's float32 tensors cannot hold these values: the
    reference is the clamp's definition, qmax for +inf and qmin for -inf)."""
    assert Q.quantize(value, scale, 0) == expected


def test_quantize_affine_rejects_a_scale_that_underflows_float32():
    """quantize_affine computes in float32: a float64 scale of 1e-310 becomes 0 there and 0 / 0 is NaN,
    which casts to an arbitrary integer. (torch.quantize_per_tensor returns qmax even for x = 0 there,
    because it multiplies by 1/scale = inf.) A clear error instead."""
    with pytest.raises(ValueError, match="scale must be > 0 everywhere"):
        Q.quantize_affine(torch.zeros(3, dtype=torch.float64), torch.tensor(1e-310, dtype=torch.float64),
                          torch.tensor(3), -128, 127)


def test_article_quantize_fails_its_check_naming_truncation():
    """The article's int((value / scale) + zero_point) must lose the points, and say why."""
    with pytest.raises(CheckFailed, match=r"truncation[\s\S]*round"):
        check_quantize(article.quantize)
    assert article.quantize(0.37, 0.1, 0) == 3 and Q.quantize(0.37, 0.1, 0) == 4   # 3.7: truncated vs rounded
    assert article.quantize(3.0, 0.01, 0) == 300 and Q.quantize(3.0, 0.01, 0) == 127  # no clamp vs clamp


@pytest.mark.parametrize("args", [(1.0, 0.0, 0), (1.0, -0.5, 0), (float("nan"), 0.1, 0), (1.0, 0.1, 0, 5, 4)])
def test_quantize_scalar_bad_input(args):
    with pytest.raises(ValueError):
        Q.quantize(*args)


def test_choose_qparams_affine_matches_torch_observers():
    """Reference: torch.ao.quantization MinMaxObserver / PerChannelMinMaxObserver (qint8, affine)."""
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
    g = torch.Generator().manual_seed(0)
    for x in [torch.randn(1000, generator=g) * 3 + 1, torch.rand(1000, generator=g) + 0.5,
              -torch.rand(64, generator=g)]:
        obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
        obs(x)
        s_ref, z_ref = obs.calculate_qparams()
        s, z = Q.choose_qparams(x, 8)
        assert torch.equal(s.reshape(1), s_ref) and torch.equal(z.reshape(1), z_ref)
    w = torch.randn(16, 64, generator=g) * torch.logspace(-2, 1, 16)[:, None]
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_affine)
    obs(w)
    s_ref, z_ref = obs.calculate_qparams()
    s, z = Q.choose_qparams(w, 8, axis=0)
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


def test_quantize_affine_per_tensor_matches_torch_bit_for_bit():
    """Reference: torch.quantize_per_tensor(x, scale, 0, torch.qint8).int_repr() and .dequantize()."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 3
    scale, zero_point = Q.choose_qparams(x, 8, symmetric=True)
    ref = torch.quantize_per_tensor(x, scale.item(), 0, torch.qint8)
    got = Q.quantize_affine(x, scale, zero_point, -128, 127)
    assert got.dtype == torch.int8 and torch.equal(got, ref.int_repr())
    assert torch.equal(Q.dequantize_affine(got, scale, zero_point), ref.dequantize())


def test_quantize_affine_with_zero_point_differs_from_torch_only_at_ties():
    """Reference: torch.quantize_per_tensor with zero point 7. torch rounds ``x / scale + zp`` (in one
    fused multiply-add), we round ``x / scale`` then add ``zp`` (torchao's definition): with an odd zero
    point, half-to-even picks different neighbours at exact ties, and nowhere else."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 3
    scale, _ = Q.choose_qparams(x, 8, symmetric=True)
    ref = torch.quantize_per_tensor(x, scale.item(), 7, torch.qint8).int_repr()
    got = Q.quantize_affine(x, scale, torch.tensor(7), -128, 127)
    differ = got != ref
    y = (x.double() / scale.double())[differ]
    assert differ.sum() < 5 and ((y - y.floor() - 0.5).abs() < 1e-5).all()
    assert ((got.int() - ref.int()).abs() <= 1).all()


def test_quantize_affine_per_channel_matches_torch_bit_for_bit():
    """Reference: torch.quantize_per_channel(w, scales, zero_points, axis=0, torch.qint8).int_repr()."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 512, generator=g) * torch.logspace(-2, 0, 64)[:, None]
    scale, zero_point = Q.choose_qparams(w, 8, axis=0)
    ref = torch.quantize_per_channel(w, scale.double(), zero_point.long(), 0, torch.qint8)
    got = Q.quantize_affine(w, scale[:, None], zero_point[:, None], -128, 127)
    assert torch.equal(got, ref.int_repr())
    assert torch.equal(Q.dequantize_affine(got, scale[:, None], zero_point[:, None]), ref.dequantize())


def test_round_trip_error_is_at_most_half_a_step_and_sqnr_matches_theory():
    """Reference: a uniform quantizer of step Δ adds noise of variance Δ²/12 (Bennett 1948); error <= Δ/2."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    scale, zero_point = Q.choose_qparams(x, 8, symmetric=True, axis=0)
    xq = Q.dequantize_affine(Q.quantize_affine(x, scale[:, None], zero_point[:, None], -128, 127),
                             scale[:, None], zero_point[:, None])
    assert ((x - xq).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    theory = 10 * math.log10(x.pow(2).sum().item() / (x.shape[1] * scale.double().pow(2).sum().item() / 12))
    assert abs(Q.sqnr_db(x, xq) - theory) < 0.2
    assert Q.sqnr_db(x, x) == math.inf


def test_per_group_beats_per_channel_on_an_outlier():
    """A single large weight coarsens only its own group (reference: SQNR of the two, measured)."""
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4))
    w[:, 5] = 30.0
    per_channel = Q.dequantize_per_group(*Q.quantize_per_group(w, 4, 512))
    per_group = Q.dequantize_per_group(*Q.quantize_per_group(w, 4, 64))
    assert Q.sqnr_db(w, per_group) > Q.sqnr_db(w, per_channel) + 6


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 16)])
def test_pack_int4_matches_numpy_packbits_and_round_trips(shape):
    """Reference: np.packbits(..., bitorder='little') of each code's four low bits."""
    q = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    a = q.numpy()
    if shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*shape[:-1], 1), np.uint8)], axis=-1)
    bits = np.unpackbits(a[..., None], axis=-1, bitorder="little")[..., :4].reshape(*a.shape[:-1], -1)
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), np.packbits(bits, axis=-1, bitorder="little"))
    assert torch.equal(Q.unpack_int4(packed, shape[-1]), q)


def test_pack_int4_bad_input():
    with pytest.raises(ValueError, match="0, 15"):
        Q.pack_int4(torch.tensor([16]))
    with pytest.raises(TypeError, match="integer"):
        Q.pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="ceil"):
        Q.unpack_int4(torch.zeros(3, dtype=torch.uint8), 7)


def test_nf4_code_is_the_qlora_construction():
    """Reference: QLoRA's create_normal_map — quantiles of N(0,1) at linspace(0.9677083, 0.5, 9)[:-1] for
    the positive half, linspace(0.9677083, 0.5, 8)[:-1] for the negative half, plus 0, scaled to [-1, 1]."""
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([pos, neg, [0.0]]))
    values /= values.max()
    assert np.allclose(Q.NF4_CODE.numpy(), values, atol=1e-6)


def test_nf4_picks_the_nearest_code():
    """Reference: brute-force argmin of |w / absmax - code| over the 16 codes."""
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(6))
    codes, absmax = Q.quantize_nf4(w, 64)
    normalized = w.reshape(8, 4, 64) / w.reshape(8, 4, 64).abs().amax(-1, keepdim=True)
    brute = (normalized[..., None] - Q.NF4_CODE).abs().argmin(-1).reshape(8, 256)
    assert torch.equal(codes.long(), brute)
    assert torch.allclose(Q.dequantize_nf4(codes, absmax), Q.NF4_CODE[brute] * absmax.repeat_interleave(64, 1))


def test_llm_int8_keeps_outliers_exactish():
    """Reference: the exact float64 product; with the outlier split the error stays small, without it
    the row holding the outlier loses its ordinary features (Dettmers et al. 2022, section 3)."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(16, 256, generator=g), torch.randn(64, 256, generator=g) * 0.05
    x[:, 10] = 60.0
    exact = x.double() @ w.double().T
    split = Q.llm_int8_matmul(x, w, threshold=6.0)
    no_split = Q.llm_int8_matmul(x, w, threshold=1e9)
    err = lambda y: (y.double() - exact).abs().max().item()  # noqa: E731
    assert err(split) < 5e-3 * exact.abs().max().item() and err(no_split) > 3 * err(split)


def _layer_error(X, w, q, s, z):
    return (X @ w.T - X @ Q.dequantize_per_group(q, s, z).T).pow(2).sum().item()


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """Reference: GPTQ paper, eq. (2)-(3): with H ∝ I the error feedback term is zero, so GPTQ = RTN."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(8))
    for bits, symmetric in [(4, False), (3, True)]:
        rtn = Q.quantize_per_group(w, bits, 64, symmetric)
        gptq = Q.gptq_quantize(w, torch.eye(256) * 3.0, bits, 64, symmetric=symmetric)
        for a, b in zip(rtn, gptq):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    """Reference: the layer-output error ||X Wᵀ - X Qᵀ||² that GPTQ minimizes (RTN ignores X)."""
    g = torch.Generator().manual_seed(9)
    X = torch.randn(4096, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    w = torch.randn(64, 256, generator=g)
    rtn = _layer_error(X, w, *Q.quantize_per_group(w, bits, 128))
    gptq = _layer_error(X, w, *Q.gptq_quantize(w, X.T @ X, bits, 128))
    assert gptq < 0.7 * rtn


def test_gptq_dead_inputs_get_zero_weight():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(10))
    X = torch.randn(500, 64, generator=torch.Generator().manual_seed(11))
    X[:, 3] = 0.0
    q, s, z = Q.gptq_quantize(w, X.T @ X, 4, 32)
    assert torch.equal(Q.dequantize_per_group(q, s, z)[:, 3], torch.zeros(8))


def test_quant_linear_bytes_and_forward():
    """int4, g128, symmetric, fp16 scales: 4 + 16/128 = 4.125 bits per weight; the forward is F.linear
    with the dequantized weight (reference: torch.nn.functional.linear)."""
    lin = nn.Linear(512, 256)
    ql = Q.QuantLinear.from_linear(lin, 4, 128, symmetric=True)
    assert ql.weight_bytes() * 8 / (512 * 256) == 4.125
    assert Q.model_bytes(ql) == 256 * 512 // 2 + 256 * 4 * 2 + 256 * 4   # qdata + fp16 scales + fp32 bias
    affine = Q.QuantLinear.from_linear(lin, 4, 128, symmetric=False)
    assert affine.weight_bytes() * 8 / (512 * 256) == 4 + 16 / 128 + 8 / 128   # + one int8 zero point per group
    int8 = Q.QuantLinear.from_linear(lin, 8, None, symmetric=True)
    assert int8.weight_bytes() == 256 * 512 + 256 * 2
    x = torch.randn(3, 512)
    assert torch.allclose(ql(x), torch.nn.functional.linear(x, ql.dequantized_weight(), lin.bias))
    assert Q.sqnr_db(lin(x), int8(x)) > 35 > Q.sqnr_db(lin(x), ql(x)) > 15


def test_quant_linear_round_trips_the_integers():
    lin = nn.Linear(100, 30)   # odd sizes: 100 inputs, groups of 20 (packing pads nothing: 100 is even)
    for bits in (2, 3, 4, 8):
        q, s, z = Q.quantize_per_group(lin.weight.detach(), bits, 20)
        ql = Q.QuantLinear.from_linear(lin, bits, 20, symmetric=False)
        assert torch.equal(ql.int_weight(), q)
        assert torch.allclose(ql.dequantized_weight(), Q.dequantize_per_group(q, s.half().float(), z))


def test_quantize_model_swaps_every_linear_and_counts_bytes():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64, bias=False))
    fp32 = Q.model_bytes(model)
    assert fp32 == 4 * (64 * 128 + 128 + 128 * 64)
    calib = torch.randn(256, 64)
    Q.quantize_model(model, 4, 32, method="gptq", calibrate=lambda m: m(calib))
    assert all(isinstance(m, Q.QuantLinear) for m in (model[0], model[2]))
    assert Q.model_bytes(model) == (64 * 128 // 2 + 128 * 2 * 2 + 128 * 4) + (128 * 64 // 2 + 64 * 4 * 2)


@pytest.mark.parametrize("call, error", [
    (lambda: Q.quantize_per_group(torch.randn(4, 100), 5, 50), ValueError),
    (lambda: Q.quantize_per_group(torch.randn(4, 100), 4, 64), ValueError),
    (lambda: Q.quantize_per_group(torch.ones(4, 8, dtype=torch.int32), 4, 4), TypeError),
    (lambda: Q.quantize_per_group(torch.tensor([[1.0, float("nan")]]), 4, 2), ValueError),
    (lambda: Q.choose_qparams(np.ones(4)), TypeError),
    (lambda: Q.choose_qparams(torch.randn(4, 4), 8, axis=0, group_size=2), ValueError),
    (lambda: Q.quantize_affine(torch.randn(4), torch.tensor(0.0), torch.tensor(0), -128, 127), ValueError),
    (lambda: Q.quantize_affine(torch.randn(4), torch.tensor(0.1), torch.tensor(0.0), -128, 127), TypeError),
    (lambda: Q.quantize_model(nn.Sequential(nn.Linear(100, 4)), 4, 64), ValueError),
    (lambda: Q.quantize_model(nn.Sequential(nn.Linear(64, 4)), 4, 64, method="gptq"), ValueError),
    (lambda: Q.quantize_model(nn.Sequential(nn.Linear(64, 4)), 4, 64, method="awq"), ValueError),
    (lambda: Q.gptq_quantize(torch.randn(4, 64), torch.eye(32), 4, 32), ValueError),
    (lambda: Q.llm_int8_matmul(torch.randn(2, 4), torch.randn(3, 5)), ValueError),
])
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_bad_input_messages_name_the_argument():
    with pytest.raises(ValueError, match=r"group_size must divide.*group_size=64.*\(4, 100\)"):
        Q.quantize_per_group(torch.randn(4, 100), 4, 64)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        Q.quantize_per_group(torch.randn(4, 100), 5, 50)
    with pytest.raises(TypeError, match=r"w must have a floating-point dtype, got torch.int32"):
        Q.quantize_per_group(torch.ones(4, 8, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match=r"w contains NaN or inf \(1 entries\)"):
        Q.quantize_per_group(torch.tensor([[1.0, float("inf")]]), 4, 2)


def test_hidden_check_messages_do_not_show_inputs():
    """nbgrader shows hidden-case messages in feedback: they name the case, never the tensors."""
    from autograder.checks.quant import check_llm_int8_matmul, check_quantize_affine
    from autograder.fixtures import quant_wrong as W
    for check, wrong in [(check_quantize_affine, W.quantize_affine__half_away_from_zero),
                         (check_llm_int8_matmul, W.llm_int8_matmul__weight_per_input_column)]:
        with pytest.raises(CheckFailed) as info:
            check(wrong, hidden=True)
        message = str(info.value)
        assert "hidden case" in message and "tensor(" not in message and "array(" not in message

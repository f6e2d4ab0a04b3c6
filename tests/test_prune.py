"""llmspace.prune against torch.nn.utils.prune, torch's CUTLASS 2:4 conversion and scipy-free byte algebra."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from llmspace import prune as P
from llmspace import sparse as S


def linear(seed, d_in, d_out, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def copy_of(layer):
    new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    new.load_state_dict(layer.state_dict())
    return new


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 0.999), st.integers(0, 10_000))
def test_magnitude_mask_equals_torch_l1_unstructured(d_in, d_out, sparsity, seed):
    """Reference: torch.nn.utils.prune.l1_unstructured — identical mask (continuous weights: no ties)."""
    layer = linear(seed, d_in, d_out)
    ours = P.magnitude_mask(layer.weight, sparsity)
    torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
    assert ours.dtype == torch.bool
    assert torch.equal(ours, layer.weight_mask.bool())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=4),
       st.floats(0, 0.999), st.integers(0, 10_000))
def test_global_magnitude_mask_equals_torch_global_unstructured(shapes, sparsity, seed):
    """Reference: torch.nn.utils.prune.global_unstructured with L1Unstructured — identical masks."""
    layers = [linear(seed + i, d_in, d_out) for i, (d_in, d_out) in enumerate(shapes)]
    ours = P.global_magnitude_mask([l.weight for l in layers], sparsity)
    torch_prune.global_unstructured([(l, "weight") for l in layers],
                                    pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    for mask, layer in zip(ours, layers):
        assert torch.equal(mask, layer.weight_mask.bool())
    total = sum(l.weight.numel() for l in layers)
    assert sum(int((~m).sum()) for m in ours) == round(sparsity * total)


def test_global_pruning_is_uneven_across_layers():
    """Global thresholds prune a layer of small weights far more than one of large weights."""
    torch.manual_seed(0)
    small, large = torch.randn(64, 64) * 0.01, torch.randn(64, 64)
    m_small, m_large = P.global_magnitude_mask([small, large], 0.5)
    assert (~m_small).float().mean() > 0.95 and (~m_large).float().mean() < 0.05


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_structured_mask_equals_torch_ln_structured(dim, p, sparsity):
    """Reference: torch.nn.utils.prune.ln_structured(n=p, dim=dim) — identical mask."""
    layer = linear(3, 24, 20)
    ours = P.structured_mask(layer.weight, sparsity, dim=dim, p=p)
    torch_prune.ln_structured(layer, "weight", amount=sparsity, n=p, dim=dim)
    assert torch.equal(ours, layer.weight_mask.bool())


def test_shrink_mlp_equals_masked_mlp_and_is_smaller():
    """Reference: the same MLP with pruned neurons masked by torch.nn.utils.prune (weight and bias)."""
    fc_in, fc_out = linear(0, 32, 128), linear(1, 128, 32)
    keep = P.structured_mask(fc_in.weight, 0.75, dim=0)[:, 0]
    small_in, small_out = P.shrink_mlp(fc_in, fc_out, keep)
    assert small_in.weight.shape == (32, 32) and small_out.weight.shape == (32, 32)
    ref_in = copy_of(fc_in)
    torch_prune.custom_from_mask(ref_in, "weight", keep[:, None].expand(128, 32).float())
    torch_prune.custom_from_mask(ref_in, "bias", keep.float())
    x = torch.randn(5, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(small_out(F.gelu(small_in(x))), fc_out(F.gelu(ref_in(x))))


def mha(x, q, k, v, o, n_heads):
    """Multi-head causal attention with torch's scaled_dot_product_attention as the kernel."""
    B, T, _ = x.shape
    split = lambda t: t.view(B, T, n_heads, -1).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(split(q(x)), split(k(x)), split(v(x)), is_causal=True)
    return o(y.transpose(1, 2).reshape(B, T, -1))


def test_remove_heads_equals_zeroed_heads():
    """Reference: F.scaled_dot_product_attention with the removed heads' o_proj columns zeroed."""
    d, n_heads = 48, 6
    q, k, v, o = (linear(i, d, d) for i in range(4))
    keep = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(P.head_norms(o, n_heads) > 0, torch.ones(n_heads, dtype=torch.bool))
    small = P.remove_heads(q, k, v, o, n_heads, keep)
    assert small[0].weight.shape == (32, 48) and small[3].weight.shape == (48, 32)
    ref_o = copy_of(o)
    torch_prune.custom_from_mask(ref_o, "weight", keep.repeat_interleave(8)[None, :].expand(d, d).float())
    x = torch.randn(2, 9, d)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, *small, n_heads=4), mha(x, q, k, v, ref_o, n_heads))


def test_head_norms_match_manual_block_norms():
    """Reference: torch.linalg.norm of each head's column block of o_proj, computed by slicing."""
    o = linear(5, 32, 16)
    expected = torch.stack([torch.linalg.norm(o.weight[:, h * 8:(h + 1) * 8]) for h in range(4)])
    torch.testing.assert_close(P.head_norms(o, 4), expected.detach())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.sampled_from([(1, 4), (2, 4), (2, 8), (4, 8), (3, 3)]),
       st.integers(0, 10_000))
def test_nm_mask_keeps_largest_n_of_every_m(rows, groups, nm, seed):
    """Reference: a Python loop over groups using sorted() — the n largest |w| of each group of m."""
    n, m = nm
    torch.manual_seed(seed)
    w = torch.randn(rows, groups * m)
    mask = P.nm_mask(w, n, m)
    for r in range(rows):
        for g in range(groups):
            vals = w[r, g * m:(g + 1) * m].abs().tolist()
            top = sorted(range(m), key=lambda i: -vals[i])[:n]
            assert [bool(mask[r, g * m + i]) for i in range(m)] == [i in top for i in range(m)]
    assert P.is_nm_sparse(w * mask, n, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compressed_2to4_matches_torch_cutlass_format(dtype):
    """Reference: torch.sparse's CUTLASS 2:4 conversion (pure torch, runs on CPU): same kept values, same
    metadata bytes, and its decompression of our pruned matrix equals ours."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w = (w * P.nm_mask(w)).to(dtype)
    packed = P.compress_2to4(w)
    assert packed.values.dtype == dtype
    assert torch.equal(P.decompress_2to4(packed), w)
    if dtype == torch.float32:
        return  # CUTLASS's converter only handles 16- and 8-bit types
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(packed.values, ref_values)
    assert packed.meta.numel() == ref_meta.numel() * ref_meta.element_size()  # 2 bits per kept value
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(ref_values, ref_meta), P.decompress_2to4(packed))


def test_compressed_2to4_with_sparser_groups_and_byte_accounting():
    """Groups with 0 or 1 non-zeros round-trip; nbytes is exactly half the values + 1 bit per weight.
    Reference: torch.Tensor.nbytes of the arrays and the arithmetic rows*cols*(v/2 + 1/8)."""
    torch.manual_seed(1)
    w = torch.randn(16, 40, dtype=torch.float16)
    w = w * P.nm_mask(w.float())
    w[0] = 0
    w[1, :20] = 0
    w[2, ::4] = 0
    w[2, 1::4] = 0
    w[3, 2::4] = 0
    packed = P.compress_2to4(w)
    assert torch.equal(P.decompress_2to4(packed), w)
    assert packed.nbytes == packed.values.nbytes + packed.meta.nbytes
    assert packed.nbytes == P.compressed_2to4_bytes(16, 40, 2) == 16 * 20 * 2 + 16 * math.ceil(20 / 4)
    assert P.compressed_2to4_bytes(4096, 4096, 2) / (4096 * 4096) == 1.125


def test_wanda_scores_and_mask():
    """Reference: ‖X_j‖₂ computed by torch.linalg.vector_norm on the concatenated calibration inputs;
    the mask keeps the top (1-s)·in scores of each row (checked against per-row sorted order)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(4, 5, 16) * torch.linspace(0.1, 5, 16) for _ in range(3)]
    norms = P.input_norms(model, {"0": model[0], "2": model[2]}, batches)
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    torch.testing.assert_close(norms["0"], torch.linalg.vector_norm(x, dim=0))
    h = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(norms["2"], torch.linalg.vector_norm(h, dim=0), rtol=1e-5, atol=1e-5)
    w = model[0].weight
    scores = P.wanda_scores(w, norms["0"])
    mask = P.wanda_mask(w, norms["0"], 0.5)
    assert torch.equal(mask.sum(1), torch.full((32,), 8))
    for r in range(32):
        kept = set(scores[r].argsort(descending=True)[:8].tolist())
        assert set(mask[r].nonzero().flatten().tolist()) == kept
    # activation-aware differs from magnitude: the input feature scale changes which weights survive
    assert not torch.equal(mask, P.magnitude_mask(w, 0.5))


def test_masks_survive_fine_tuning_with_adamw():
    """Pruned weights stay exactly zero through AdamW steps started before pruning (momentum state)."""
    layer = linear(0, 16, 16)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(32, 16)
    for _ in range(3):  # optimizer state built up while dense
        opt.zero_grad(); layer(x).pow(2).mean().backward(); opt.step()  # noqa: E702
    handle = P.apply_masks([(layer.weight, P.magnitude_mask(layer.weight, 0.6))])
    mask = handle.pairs[0][1]
    for _ in range(5):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        assert torch.all(layer.weight.grad[~mask] == 0)
        opt.step()
        handle.reapply()
    assert torch.all(layer.weight[~mask] == 0) and torch.all(layer.weight[mask] != 0)


def test_sparsity_schedule_is_cubic_and_monotone():
    """Reference: Zhu & Gupta (2017) eq. 1, evaluated by hand at the end points and midpoint."""
    assert P.sparsity_schedule(0, 10, 0.8) == 0.0
    assert P.sparsity_schedule(10, 10, 0.8) == pytest.approx(0.8)
    assert P.sparsity_schedule(5, 10, 0.8) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    values = [P.sparsity_schedule(t, 10, 0.8) for t in range(11)]
    assert values == sorted(values)


def test_iterative_prune_follows_the_schedule_and_never_revives_weights():
    """Reference: sparsity_schedule's values (Zhu & Gupta eq. 1) for the measured sparsity after each
    round; a pruned weight stays exactly zero through later rounds of SGD fine-tuning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    layers = {"0": model[0], "2": model[2]}
    x, y = torch.randn(256, 32), torch.randn(256, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen, pruned_before = [], torch.zeros(64, 32, dtype=torch.bool)

    def finetune(handle, round_):
        nonlocal pruned_before
        zero = model[0].weight.detach() == 0
        assert torch.all(zero[pruned_before])       # earlier rounds' zeros are still pruned
        pruned_before = zero
        seen.append((round_, float(zero.float().mean())))
        for _ in range(20):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            handle.reapply()

    handle = P.iterative_prune(layers, 0.8, 4, finetune)
    assert [r for r, _ in seen] == [1, 2, 3, 4]
    for r, measured in seen:
        assert measured == pytest.approx(round(P.sparsity_schedule(r, 4, 0.8) * 2048) / 2048)
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.8, abs=1 / 2048)
    handle.remove()


def test_sparsity_report_bytes():
    """Reference: chapter 1's CSR (llmspace.sparse.CSR.from_dense(...).nbytes with fp16 values) and the
    2:4 format's real nbytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(P.nm_mask(layer.weight))
    report = P.sparsity_report(model, value_bytes=2)
    for row, layer in zip(report, (model[0], model[2])):
        w = layer.weight.detach()
        csr = S.CSR.from_dense(w.numpy().astype("float16"))
        assert row["csr"] == csr.nbytes
        assert row["2:4"] == P.compress_2to4(w.half()).nbytes
        assert row["dense"] == w.numel() * 2 and row["sparsity"] == 0.5
    total = report[-1]
    assert total["name"] == "TOTAL" and total["dense"] == 2 * 64 * 32 * 2
    # at 50%, 2 bits per kept value = 1 bit per weight, the same as a bitmask; CSR loses to dense
    assert total["2:4"] == total["bitmask"] < total["dense"] < total["csr"]


@pytest.mark.parametrize("fn, args, error, words", [
    (P.magnitude_mask, (torch.randn(4, 4), 1.0), ValueError, "sparsity must lie in"),
    (P.magnitude_mask, (torch.randn(4, 4), -0.1), ValueError, "sparsity"),
    (P.magnitude_mask, (torch.randn(4, 4), "half"), TypeError, "sparsity"),
    (P.magnitude_mask, ([[1.0]], 0.5), TypeError, "weight must be a torch.Tensor"),
    (P.global_magnitude_mask, ([], 0.5), ValueError, "must not be empty"),
    (P.global_magnitude_mask, (torch.randn(3), 0.5), TypeError, "list"),
    (P.nm_mask, (torch.randn(4, 6), 2, 4), ValueError, "must divide the last dimension"),
    (P.nm_mask, (torch.randn(4, 8), 5, 4), ValueError, "1 <= n <= m"),
    (P.compress_2to4, (torch.randn(4, 8),), ValueError, "not 2:4 sparse"),
    (P.compress_2to4, (torch.randn(4, 6),), ValueError, "multiple of 4"),
    (P.decompress_2to4, (torch.randn(4, 8),), TypeError, "Sparse24"),
    (P.head_norms, (nn.Linear(30, 8), 4), ValueError, "must divide the attention width"),
    (P.wanda_scores, (torch.randn(4, 8), torch.ones(7)), ValueError, "8 entries"),
    (P.sparsity_schedule, (11, 10, 0.5), ValueError, "step"),
])
def test_bad_input_is_rejected_clearly(fn, args, error, words):
    with pytest.raises(error, match=words):
        fn(*args)


def test_remove_heads_rejects_heads_that_do_not_divide():
    q = nn.Linear(30, 30)
    with pytest.raises(ValueError, match="n_heads=4 must divide"):
        P.remove_heads(q, q, q, q, 4, torch.ones(4, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need an NVIDIA GPU (sm80+)")
def test_gpu_semi_structured_matmul_matches_dense():
    """Reference: dense torch matmul on the pruned weight vs torch.sparse.to_sparse_semi_structured."""
    torch.manual_seed(0)
    w = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    w = w * P.nm_mask(w)
    x = torch.randn(256, 64, device="cuda", dtype=torch.float16)
    sparse = torch.sparse.to_sparse_semi_structured(w)
    torch.testing.assert_close(sparse @ x, w @ x, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(P.decompress_2to4(P.compress_2to4(w.cpu())), w.cpu())

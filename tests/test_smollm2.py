"""SmolLM2-135M offline, the KV-cache byte count and the evaluation harness.

References: the key/value tensors transformers' ``DynamicCache`` actually holds (for SmolLM2's config and
for MHA/MQA variants), the published Llama-2-70B figure (320 KiB per token in fp16: 80 layers x 8 KV heads
x 128 x 2 x 2 B), ``LlamaForCausalLM``'s own loss for the per-window NLL, and ``scipy.stats.bootstrap``
(paired, percentile) for the confidence interval. The one test that loads the real weights is marked slow
(~50 s on 2 cores; the suite loads the model once).
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmspace import evaluate as E
from llmspace.kv_cache import kv_cache_bytes, kv_dims
from llmspace.memory import LLAMA2_70B, LLAMA2_7B
from llmspace.models import load_smollm2, smollm2_gguf_path

SMOLLM2_DIMS = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)


def cache_bytes(past) -> int:
    """Bytes of every key and value tensor a transformers cache holds (the measured side)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in past.layers)


def tiny_llama(**overrides):
    config = LlamaConfig(**{**dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2), **overrides})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads", [8, 2, 1])           # MHA, GQA, MQA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equal_transformers_cache(kv_heads, dtype):
    model = tiny_llama(num_key_value_heads=kv_heads).to(dtype)
    ids = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    assert kv_cache_bytes(model.config, 3, 11, dtype.itemsize) == cache_bytes(past)


def test_kv_cache_bytes_smollm2_shapes_to_the_byte():
    """SmolLM2's attention dimensions with random weights and a small vocabulary and MLP (the cache
    depends only on layers, KV heads and head size; the slow test checks the real model too)."""
    model = tiny_llama(**{**SMOLLM2_DIMS, "vocab_size": 256, "intermediate_size": 32})
    ids = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    assert cache_bytes(past) == 3_409_920 == kv_cache_bytes(model.config, 2, 37, 4)
    assert kv_cache_bytes(model.config, 1, 1, 2) == 23_040          # 22.5 KiB per token in fp16


def test_kv_cache_bytes_published_llama2():
    """Llama-2-70B: 320 KiB per token in fp16 (GQA, 8 KV heads); Llama-2-7B (MHA): 512 KiB."""
    assert kv_cache_bytes(LLAMA2_70B, 1, 1, 2) == 320 * 1024
    hf70 = LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
    assert kv_cache_bytes(hf70, 1, 1, 2) == 320 * 1024
    assert kv_cache_bytes(LLAMA2_7B, 1, 1, 2) == 512 * 1024
    assert kv_cache_bytes(LLAMA2_70B, 8, 4096, 2) == 8 * 4096 * 320 * 1024   # 10 GiB at batch 8 x 4k
    assert kv_cache_bytes(LLAMA2_70B, 1, 3, 0.5) == 3 * 80 * 1024          # int4: a quarter of fp16


def test_kv_cache_bytes_bad_input():
    with pytest.raises(TypeError, match="transformers config"):
        kv_cache_bytes(object(), 1, 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            kv_cache_bytes(LLAMA2_7B, bad, 1)
        with pytest.raises(ValueError, match="seq_len"):
            kv_cache_bytes(LLAMA2_7B, 1, bad)
    with pytest.raises(ValueError, match="dtype_bytes"):
        kv_cache_bytes(LLAMA2_7B, 1, 1, 0)
    assert kv_dims(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                               num_key_value_heads=None)) == (2, 4, 16)


def test_window_nll_equals_transformers_loss():
    """Reference: LlamaForCausalLM(input_ids, labels=input_ids).loss (mean over the shifted tokens)."""
    model = tiny_llama()
    windows = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(1))
    nll = E.window_nll(model, windows, batch_size=2)
    assert nll.dtype == torch.float64 and nll.shape == (5,)
    with torch.no_grad():
        for i in range(5):
            loss = model(windows[i:i + 1], labels=windows[i:i + 1]).loss
            assert nll[i].item() == pytest.approx(loss.item(), rel=1e-5)
    assert E.perplexity(nll) == pytest.approx(math.exp(nll.mean().item()))


def test_token_windows_evenly_spaced_and_checked():
    ids = torch.arange(100)
    w = E.token_windows(ids, 10, 4)
    assert w.tolist()[0][0] == 0 and w[-1, -1].item() == 99 and w[:, 0].tolist() == [0, 30, 60, 90]
    with pytest.raises(ValueError, match="cannot hold"):
        E.token_windows(ids, 30, 4)
    with pytest.raises(TypeError, match="1-D int32/int64"):
        E.token_windows(ids.float(), 10, 2)


def test_paired_bootstrap_against_scipy():
    """The interval for log(ppl_b / ppl_a) = mean(b - a) matches scipy's paired percentile bootstrap."""
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(2.0, 0.3, 64))
    b = a + torch.tensor(rng.normal(0.02, 0.01, 64))
    got = E.paired_bootstrap(a, b, n_resamples=4000, seed=1)
    ref = scipy.stats.bootstrap((b.numpy() - a.numpy(),), np.mean, n_resamples=4000, method="percentile",
                                random_state=2).confidence_interval
    assert math.log(got["ratio_low"]) == pytest.approx(ref.low, abs=5e-4)
    assert math.log(got["ratio_high"]) == pytest.approx(ref.high, abs=5e-4)
    assert got["significant"] and got["ratio_low"] < got["ratio"] < got["ratio_high"]
    same = E.paired_bootstrap(a, a.clone())
    assert same["ratio"] == 1 and same["ratio_low"] == same["ratio_high"] == 1 and not same["significant"]
    noise = E.paired_bootstrap(a, a + torch.tensor(rng.normal(0, 0.05, 64)))
    assert noise["ratio_low"] < 1 < noise["ratio_high"] or not noise["significant"]
    with pytest.raises(ValueError, match="equal length"):
        E.paired_bootstrap(a, b[:10])


def test_paired_bootstrap_resamples_whole_groups():
    """groups=: the cluster bootstrap. One window per group is the window bootstrap draw for draw; the
    reference is the cluster bootstrap written out as a loop; groups of correlated windows widen it."""
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.normal(2.0, 0.3, 120))
    b = a + torch.tensor(rng.normal(0.01, 0.02, 120))
    window = E.paired_bootstrap(a, b, seed=5)
    singletons = E.paired_bootstrap(a, b, seed=5, groups=np.arange(120) * 7)    # labels need not be 0..n-1
    for k in ("ratio", "ratio_low", "ratio_high"):      # the same draws; sums in another order
        assert singletons[k] == pytest.approx(window[k], rel=1e-12)
    assert singletons["n_groups"] == window["n_groups"] == 120
    # 8 files of 15 windows; each file shifts the difference: within-file correlation
    groups = np.repeat(np.arange(8), 15)
    shift = np.repeat(rng.normal(0, 0.02, 8), 15)
    b2 = a + torch.tensor(0.01 + shift + rng.normal(0, 0.002, 120))
    got = E.paired_bootstrap(a, b2, seed=5, n_resamples=1000, groups=groups)
    draws = np.random.default_rng(5).integers(0, 8, size=(1000, 8))
    d = (b2 - a).numpy()
    ref = [np.concatenate([d[groups == g] for g in row]).mean() for row in draws]
    lo, hi = np.quantile(ref, [0.025, 0.975])
    assert math.log(got["ratio_low"]) == pytest.approx(lo, abs=1e-12)
    assert math.log(got["ratio_high"]) == pytest.approx(hi, abs=1e-12)
    narrow = E.paired_bootstrap(a, b2, seed=5, n_resamples=1000)
    width = lambda r: math.log(r["ratio_high"]) - math.log(r["ratio_low"])  # noqa: E731
    assert width(got) > 2 * width(narrow) and got["n_groups"] == 8
    with pytest.raises(ValueError, match="integer array of shape"):
        E.paired_bootstrap(a, b, groups=np.zeros(10, dtype=int))
    with pytest.raises(ValueError, match="integer array of shape"):
        E.paired_bootstrap(a, b, groups=np.zeros(120))
    with pytest.raises(ValueError, match="at least 2"):
        E.paired_bootstrap(a, b, groups=np.zeros(120, dtype=int))


def test_eval_text_is_the_stdlib_reference():
    from pydoc_data.topics import topics
    text = E.eval_text()
    assert len(text) > 400_000 and text == E.eval_text()
    assert text.startswith(topics[sorted(topics)[0]]) and "PSF" in E.EVAL_TEXT_SOURCE


@pytest.mark.slow
def test_load_smollm2_offline_real_cache_and_text():
    """The real weights: parameter count, GQA shape, the cache it keeps, coherent greedy text, and a
    plausible perplexity on two evaluation windows."""
    assert smollm2_gguf_path().stat().st_size > 90e6
    torch.set_num_threads(2)
    model, tok = load_smollm2()
    assert load_smollm2()[0] is model                                    # cached per process
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids.repeat(2, 1), use_cache=True)
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert cache_bytes(out.past_key_values) == kv_cache_bytes(cfg, 2, ids.shape[1], 4)
    assert "Paris" in tok.decode(generated[0, ids.shape[1]:])
    windows = E.token_windows(E.eval_token_ids(tok), 128, 2)
    ppl = E.perplexity(E.window_nll(model, windows))
    assert 1.5 < ppl < 60, ppl


# ---- paged KV cache -------------------------------------------------------------------------------

from llmspace.kv_cache import (KVCacheFull, PagedKVCache, paged_attention, paged_kv_gather,  # noqa: E402
                               simulate_kv_serving)


def test_paged_cache_holds_transformers_keys_and_values():
    """Fill the paged cache from the cache transformers keeps, chunk by chunk and interleaved across
    sequences; each sequence reads back exactly its own keys and values, in order."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (3, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
    keys = torch.stack([layer.keys for layer in past.layers])       # (L, B, kv, T, d)
    values = torch.stack([layer.values for layer in past.layers])
    lengths = [23, 9, 17]
    cache = PagedKVCache(3, 2, 8, block_size=4, n_blocks=16)
    for start in range(0, 23, 5):                                   # interleave appends of 5 tokens
        for b, n in enumerate(lengths):
            if start < n:
                stop = min(start + 5, n)
                cache.append(b, keys[:, b, :, start:stop].transpose(1, 2), values[:, b, :, start:stop].transpose(1, 2))
    assert cache.free_blocks == 16 - (6 + 3 + 5)
    for b, n in enumerate(lengths):
        for layer in range(3):
            k, v = cache.gather(b, layer)
            assert torch.equal(k, keys[layer, b, :, :n].transpose(0, 1))
            assert torch.equal(v, values[layer, b, :, :n].transpose(0, 1))
    assert cache.bytes_of_tokens() == kv_cache_bytes(model.config, 1, sum(lengths), 4)
    assert cache.bytes_in_use() == 14 * 4 * kv_cache_bytes(model.config, 1, 1, 4)
    cache.free(1)
    assert cache.free_blocks == 5 and 1 not in cache.block_tables
    with pytest.raises(KVCacheFull):
        cache.append(7, torch.zeros(3, 40, 2, 8), torch.zeros(3, 40, 2, 8))
    assert 7 not in cache.block_tables and cache.free_blocks == 5    # nothing taken on failure
    with pytest.raises(ValueError, match="n_kv_heads, head_dim"):
        cache.append(0, torch.zeros(3, 1, 3, 8), torch.zeros(3, 1, 3, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [0, 1, 7, 8, 13, 16])
def test_paged_kv_gather_reads_back_what_was_scattered(seq_len, dtype):
    """Reference: the contiguous keys/values themselves, written token by token into a pool of junk
    through a permuted block table with spare blocks (a plain Python loop, independent of the gather)."""
    g = torch.Generator().manual_seed(seq_len)
    block_size, n_blocks = 4, 9
    k_pool = torch.randn(n_blocks, block_size, 2, 3, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks, block_size, 2, 3, generator=g).to(dtype)
    table = torch.tensor([7, 2, 5, 0], dtype=torch.int32)              # room for 16 tokens
    keys = torch.randn(seq_len, 2, 3, generator=g).to(dtype)
    values = torch.randn(seq_len, 2, 3, generator=g).to(dtype)
    for t in range(seq_len):
        k_pool[int(table[t // block_size]), t % block_size] = keys[t]
        v_pool[int(table[t // block_size]), t % block_size] = values[t]
    before = k_pool.clone(), v_pool.clone()
    k, v = paged_kv_gather(k_pool, v_pool, table, seq_len)
    assert k.dtype == v.dtype == dtype and k.shape == v.shape == (seq_len, 2, 3)
    assert torch.equal(k, keys) and torch.equal(v, values)
    assert torch.equal(k_pool, before[0]) and torch.equal(v_pool, before[1])


def test_paged_kv_gather_bad_input():
    pool = torch.zeros(4, 2, 1, 3)
    table = torch.tensor([3, 0])
    for bad_table in (torch.tensor([4, 0]), torch.tensor([-1, 0]), torch.tensor([0, 1, 9])):
        with pytest.raises(ValueError, match=r"\[0, 4\)"):
            paged_kv_gather(pool, pool, bad_table, 1)
    for bad_len in (-1, 5):
        with pytest.raises(ValueError, match="seq_len"):
            paged_kv_gather(pool, pool, table, bad_len)
    with pytest.raises(TypeError, match="int32 or int64"):
        paged_kv_gather(pool, pool, table.float(), 1)
    with pytest.raises(TypeError, match="int32 or int64"):
        paged_kv_gather(pool, pool, [3, 0], 1)
    with pytest.raises(ValueError, match="1-D"):
        paged_kv_gather(pool, pool, table[None], 1)
    with pytest.raises(ValueError, match="same|one dtype"):
        paged_kv_gather(pool, pool.double(), table, 1)
    with pytest.raises(ValueError, match="n_blocks, block_size"):
        paged_kv_gather(pool[0], pool[0], table, 1)
    with pytest.raises(TypeError, match="tensors"):
        paged_kv_gather(pool.numpy(), pool, table, 1)
    empty = paged_kv_gather(pool, pool, torch.zeros(0, dtype=torch.int64), 0)
    assert [t.shape for t in empty] == [(0, 1, 3), (0, 1, 3)]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_paged_attention_equals_sdpa(kv_heads):
    """Reference: F.scaled_dot_product_attention over the contiguous keys/values (heads expanded)."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 13, kv_heads, 16, generator=g), torch.randn(1, 13, kv_heads, 16, generator=g)
    q = torch.randn(4, 16, generator=g)
    cache = PagedKVCache(1, kv_heads, 16, block_size=5, n_blocks=4)
    cache.append("s", k, v)
    rep = 4 // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, None, :], k[0].transpose(0, 1).repeat_interleave(rep, 0), v[0].transpose(0, 1).repeat_interleave(rep, 0))
    torch.testing.assert_close(paged_attention(q, cache, "s", 0), ref[:, 0], rtol=1e-5, atol=1e-6)


def test_simulate_kv_serving_by_hand():
    """Two requests, block 4, max_len 16, 1 byte per token: the per-step bytes worked out by hand."""
    out = simulate_kv_serving([(0, 3, 2), (1, 6, 1)], block_size=4, max_len=16, token_bytes=1)
    assert out["used"] == [3, 4 + 6, 5 + 7]
    assert out["paged"] == [4, 4 + 8, 8 + 8]
    assert out["contiguous"] == [16, 32, 32]
    assert out["contiguous_exact"] == [5, 12, 12] and out["contiguous_exact_utilisation"] == 1.0
    assert out["paged_utilisation"] == 12 / 16 and out["contiguous_utilisation"] == 12 / 32
    with pytest.raises(ValueError, match="exceeds max_len"):
        simulate_kv_serving([(0, 10, 10)], block_size=4, max_len=16, token_bytes=1)


# ---- KV-cache quantization ------------------------------------------------------------------------

from llmspace.kv_cache import KVQuantizedLM, fake_quantize_kv, quantized_kv_bytes_per_token  # noqa: E402


def test_fake_quantize_kv_axes_against_torch_ao():
    """Reference: torch.fake_quantize_per_channel_affine with the same min-max parameters (per token:
    channels of one token share a scale; per channel: tokens of one channel share it)."""
    x = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(5))
    x[..., 1] *= 20                                          # an outlier channel
    for axis, reduce_dim in (("token", -1), ("channel", -2)):
        lo, hi = x.amin(reduce_dim, keepdim=True).clamp(max=0), x.amax(reduce_dim, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255
        zp = torch.round(-lo / scale) - 128
        flat = x.movedim(reduce_dim, -1).reshape(-1, x.shape[reduce_dim]).T.contiguous()   # (n, groups)
        ref = torch.fake_quantize_per_channel_affine(flat, scale.movedim(reduce_dim, -1).reshape(-1),
                                                     zp.movedim(reduce_dim, -1).reshape(-1).int(), 1, -128, 127)
        ref = ref.T.reshape(x.movedim(reduce_dim, -1).shape).movedim(-1, reduce_dim)
        torch.testing.assert_close(fake_quantize_kv(x, 8, axis), ref, rtol=0, atol=1e-6)
    err_token = (fake_quantize_kv(x, 4, "token") - x).abs().mean()
    err_channel = (fake_quantize_kv(x, 4, "channel") - x).abs().mean()
    assert err_channel < err_token                           # an outlier channel favours per-channel
    with pytest.raises(ValueError, match="axis"):
        fake_quantize_kv(x, 4, "row")
    with pytest.raises(ValueError, match="divide"):
        fake_quantize_kv(x, 4, "channel", group_size=3)


def test_kv_quantized_lm_full_precision_is_identity_and_int8_is_close():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(ids).logits
        same = KVQuantizedLM(model, None, None)(ids)
        int8 = KVQuantizedLM(model, (8, "channel"), (8, "token"))(ids)
        int2 = KVQuantizedLM(model, (2, "token"), (2, "token"))(ids)
    torch.testing.assert_close(same, dense, rtol=0, atol=0)
    assert (int8 - dense).abs().max() < 0.05 * dense.abs().max()
    assert (int2 - dense).abs().max() > (int8 - dense).abs().max()


def test_quantized_kv_bytes_per_token():
    cfg = LlamaConfig(**SMOLLM2_DIMS)
    fp16 = kv_cache_bytes(cfg, 1, 1, 2)
    # int4 per token: 64 channels x 0.5 B + fp16 scale + fp16 zero point per head, keys and values
    assert quantized_kv_bytes_per_token(cfg, 4) == 30 * 3 * 2 * (32 + 4)
    assert fp16 / quantized_kv_bytes_per_token(cfg, 4) == pytest.approx(128 / 36)
    assert quantized_kv_bytes_per_token(cfg, 8, key_axis="channel", group_tokens=128) == \
        30 * 3 * ((64 + 4 * 64 / 128) + (64 + 4))


def test_request_trace_is_deterministic_and_fits():
    from llmspace.kv_cache import request_trace
    a, b = request_trace(300, seed=3), request_trace(300, seed=3)
    assert a == b and a != request_trace(300, seed=4)
    assert all(p >= 1 and o >= 1 and p + o <= 2048 for _, p, o in a)
    assert [r[0] for r in a] == sorted(r[0] for r in a)

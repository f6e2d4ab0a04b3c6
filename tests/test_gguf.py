"""llmspace.gguf against the reference implementation, the `gguf` library (gguf-py, llama.cpp's own).

The shipped SmolLM2 file is checked field by field, byte by byte and value by value; synthetic files
written by ``gguf.GGUFWriter`` cover the types and value kinds the shipped file lacks, and broken
copies of them cover the error paths.
"""
from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from llmspace.gguf import (GGML_TYPES, GGUFFile, dequantize_blocks, gguf_to_safetensors,  # noqa: E402
                           llama_hf_name, unpermute_rope)
from llmspace.models import smollm2_gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def shipped():
    path = smollm2_gguf_path()
    with GGUFFile(path) as g:
        yield g, gguf.GGUFReader(path)   # the reference parses everything eagerly: build it once


def _ref_dequant(rt) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(rt.data, rt.tensor_type), copy=True)).float()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------------------------- shipped file
def test_metadata_and_tensor_infos_equal_gguf_reader(shipped):
    g, r = shipped
    assert g.version == r.fields["GGUF.version"].contents() == 3
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(g.metadata) == list(fields)
    for key, f in fields.items():
        assert g.metadata[key] == f.contents(), key
        assert g.metadata_types[key] == tuple(t.name for t in f.types), key
    assert g.alignment == r.alignment == 32
    assert g.data_offset == r.data_offset
    assert list(g.tensors) == [t.name for t in r.tensors]
    for rt in r.tensors:
        info = g.tensors[rt.name]
        assert info.ggml_shape == tuple(int(d) for d in rt.shape)
        assert info.shape == tuple(reversed(info.ggml_shape))
        assert info.ggml_type.id == int(rt.tensor_type) and info.ggml_type.name == rt.tensor_type.name
        assert (info.offset, info.nbytes, info.numel) == (rt.data_offset, rt.n_bytes, rt.n_elements)
    counts = {}
    for info in g.tensors.values():
        counts[info.ggml_type.name] = counts.get(info.ggml_type.name, 0) + 1
    assert counts == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


def test_every_tensor_raw_bytes_equal_gguf_reader_and_view_the_map(shipped):
    g, r = shipped
    whole = np.frombuffer(g._mm, dtype=np.uint8)
    for rt in r.tensors:
        a = g.tensor_data(rt.name)
        assert a.dtype == rt.data.dtype and a.shape == rt.data.shape, rt.name
        assert a.tobytes() == rt.data.tobytes(), rt.name
        # a view into the map at the tensor's offset, not a copy
        assert not a.flags.owndata and not a.flags.writeable
        assert a.ctypes.data - whole.ctypes.data == g.tensors[rt.name].offset


def test_dequantize_equals_gguf_quants_bit_for_bit(shipped):
    g, r = shipped
    for rt in r.tensors:
        mine = g.dequantize(rt.name)
        ref = _ref_dequant(rt).reshape(g.tensors[rt.name].shape)
        assert mine.dtype == torch.float32 and mine.shape == ref.shape, rt.name
        assert torch.equal(_bits(mine), _bits(ref)), rt.name


def test_q4_1_block_decoded_by_hand(shipped):
    """Block 0 of blk.0.attn_q.weight: fp16 d, fp16 m, 16 bytes of nibbles; w_j = d * q_j + m."""
    g, _ = shipped
    info = g.tensors["blk.0.attn_q.weight"]
    assert (info.ggml_type.block_size, info.ggml_type.type_size) == (32, 20)
    assert info.nbytes == 576 * 576 // 32 * 20
    block = bytes(g._mm[info.offset:info.offset + 20])
    d, m = struct.unpack("<ee", block[:4])
    q = [block[4 + j] & 0x0F for j in range(16)] + [block[4 + j] >> 4 for j in range(16)]
    expected = [float(np.float32(d) * np.float32(qj) + np.float32(m)) for qj in q]
    assert g.dequantize("blk.0.attn_q.weight")[0, :32].tolist() == expected
    assert min(q) == 0 and max(q) == 15      # Q4_1 quantizes min..max of the block onto 0..15


def test_type_table_equals_gguf_constants():
    for t in GGML_TYPES.values():
        assert Q[t.name].value == t.id
        assert gguf.GGML_QUANT_SIZES[Q[t.name]] == (t.block_size, t.type_size), t.name
    assert GGML_TYPES[3].bits_per_weight == 5.0 and GGML_TYPES[2].bits_per_weight == 4.5


# ---------------------------------------------------------------------------------- synthetic files
def _write(path, tensors, kv=(), alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for add, key, value in kv:
        getattr(w, add)(key, value)
    for name, arr, qtype in tensors:
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _synthetic(path, alignment=None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32) * 3
    tensors = [("w.f32", x, None), ("w.f16", x.astype(np.float16), None)]
    for qt in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
        tensors.append((f"w.{qt.name.lower()}", gguf.quants.quantize(x, qt), qt))
    kv = [("add_uint8", "t.u8", 200), ("add_int8", "t.i8", -5), ("add_uint16", "t.u16", 60000),
          ("add_int16", "t.i16", -3000), ("add_uint32", "t.u32", 4_000_000_000),
          ("add_int32", "t.i32", -7), ("add_float32", "t.f32", 0.1), ("add_bool", "t.b", True),
          ("add_string", "t.s", "héllo"), ("add_uint64", "t.u64", 2**63 + 5),
          ("add_int64", "t.i64", -(2**40)), ("add_float64", "t.f64", 0.1),
          ("add_array", "t.a_int", [1, -2, 3]), ("add_array", "t.a_str", ["a", "", "ü"]),
          ("add_array", "t.a_nested", [[1, 2], [3]])]
    return _write(path, tensors, kv, alignment), x


@pytest.mark.parametrize("alignment", [None, 64])
def test_synthetic_file_all_value_kinds_and_types(tmp_path, alignment):
    path, x = _synthetic(tmp_path / "s.gguf", alignment)
    r = gguf.GGUFReader(path)
    with GGUFFile(path) as g:
        assert g.alignment == (alignment or 32) and g.data_offset % g.alignment == 0
        assert g.metadata["t.u64"] == 2**63 + 5 and g.metadata["t.s"] == "héllo" and g.metadata["t.b"] is True
        assert g.metadata["t.a_nested"] == [[1, 2], [3]]
        assert g.metadata_types["t.a_nested"][:2] == ("ARRAY", "ARRAY")
        for key, f in r.fields.items():
            if not key.startswith("GGUF.") and key != "t.a_nested":   # gguf-py flattens nested arrays
                assert g.metadata[key] == f.contents(), key
        assert torch.equal(g.dequantize("w.f32"), torch.from_numpy(x))
        for rt in r.tensors:
            info = g.tensors[rt.name]
            assert info.offset % g.alignment == 0
            assert g.tensor_data(rt.name).tobytes() == rt.data.tobytes()
            assert torch.equal(_bits(g.dequantize(rt.name)), _bits(_ref_dequant(rt).reshape(4, 64))), rt.name


def test_dequantize_blocks_rejects_partial_blocks_and_unsupported_types():
    with pytest.raises(ValueError, match="whole number of Q4_1 blocks"):
        dequantize_blocks(bytes(19), "Q4_1")
    with pytest.raises(NotImplementedError, match="Q6_K"):
        dequantize_blocks(bytes(210), "Q6_K")
    with pytest.raises(ValueError, match="unknown ggml type"):
        dequantize_blocks(bytes(4), "Q9_9")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _expect_error(tmp_path, data: bytes, match: str):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    before = _open_fds()
    with pytest.raises(ValueError, match=match):
        GGUFFile(path)
    assert _open_fds() == before           # the file and its map are released


def test_malformed_files_raise_value_error(tmp_path):
    path, _ = _synthetic(tmp_path / "s.gguf")
    good = path.read_bytes()
    ti = good.index(b"w.q4_1")             # tensor info: name, n_dims u32, dims u64 x2, type u32, offset u64
    after_name = ti + len(b"w.q4_1")
    type_at, offset_at = after_name + 4 + 16, after_name + 4 + 16 + 4

    def patch(data, at, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)

    _expect_error(tmp_path, b"", "too short")
    _expect_error(tmp_path, b"GGML" + good[4:], "bad magic")
    _expect_error(tmp_path, patch(good, 4, "<I", 1), "version 1 is not supported")
    _expect_error(tmp_path, patch(good, 4, ">I", 3), "big-endian")
    _expect_error(tmp_path, patch(good, 8, "<Q", 2**60), "tensor_count")
    _expect_error(tmp_path, patch(good, 16, "<Q", 2**62), "metadata_kv_count")
    _expect_error(tmp_path, good[:ti], "truncated")
    _expect_error(tmp_path, good[:-100], "needs bytes")                # last tensor runs off the end
    _expect_error(tmp_path, patch(good, type_at, "<I", 99), "unknown or unsupported ggml type 99")
    _expect_error(tmp_path, patch(good, offset_at, "<Q", 2**40), "needs bytes")
    orig_offset = struct.unpack_from("<Q", good, offset_at)[0]
    _expect_error(tmp_path, patch(good, offset_at, "<Q", orig_offset + 4), "not a multiple of the alignment")
    _expect_error(tmp_path, patch(good, offset_at, "<Q", 0), "overlap")
    _expect_error(tmp_path, patch(good, after_name, "<I", 7), "7 dims")
    _expect_error(tmp_path, patch(good, after_name + 4, "<Q", 48), "not a multiple of Q4_1's block size 32")
    kb = good.index(b"t.b") + 3            # bool key: type u32, then the byte
    _expect_error(tmp_path, patch(good, kb + 4, "<B", 2), "bool byte must be 0 or 1")
    _expect_error(tmp_path, patch(good, kb, "<I", 13), "unknown value type 13")
    ka = good.index(b"t.a_int") + len(b"t.a_int") + 4 + 4      # array: type u32, elem type u32, n u64
    _expect_error(tmp_path, patch(good, ka, "<Q", 2**61), "cannot fit")
    ks = good.index(b"t.s") + 3 + 4
    _expect_error(tmp_path, patch(good, ks, "<Q", 2**50), "truncated")
    _expect_error(tmp_path, patch(good, ks + 8, "<B", 0xFF), "not UTF-8")


def test_alignment_must_be_a_multiple_of_8(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_uint32("general.alignment", 12)
    w.add_tensor("x", np.zeros(8, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    with pytest.raises(ValueError, match="multiple of 8"):
        GGUFFile(tmp_path / "a.gguf")


def test_fuzzed_files_parse_or_raise_value_error(tmp_path):
    """Random byte flips and truncations of the header region: a clean parse or a ValueError, never
    another exception, and no leaked file descriptor."""
    path, _ = _synthetic(tmp_path / "s.gguf")
    good = path.read_bytes()
    with GGUFFile(path) as g:
        header_end = g.data_offset
    rng = random.Random(0)
    bad = tmp_path / "fuzz.gguf"
    before, raised = _open_fds(), 0
    for i in range(300):
        data = bytearray(good)
        if i % 3 == 0:
            data = data[:rng.randrange(len(data))]
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(min(header_end, len(data)))] = rng.randrange(256)
        bad.write_bytes(bytes(data))
        try:
            with GGUFFile(bad) as g:
                for name in g.tensors:
                    g.tensor_data(name)
        except ValueError:
            raised += 1
    assert raised > 100                    # the fuzzing does reach the error paths
    assert _open_fds() == before


def test_tensor_views_outlive_close(tmp_path):
    path, x = _synthetic(tmp_path / "s.gguf")
    g = GGUFFile(path)
    a = g.tensor_data("w.f32")
    g.close()
    g.close()                                             # idempotent
    assert np.array_equal(a, x)                           # the view keeps the pages mapped
    with pytest.raises(ValueError, match="closed"):
        g.tensor_data("w.f32")


# ---------------------------------------------------------------------------------- conversion
def test_gguf_to_safetensors_matches_transformers_layout(shipped, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    g, r = shipped
    index_path = gguf_to_safetensors(g.path, tmp_path, max_shard_bytes=200_000_000, dtype=torch.bfloat16)
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2                               # 134.5M params * 2 bytes = 269 MB
    state = {}
    for shard in shards:
        assert (tmp_path / shard).stat().st_size <= 200_000_000 + 100_000
        state.update(load_file(tmp_path / shard))
    assert set(state) == set(index["weight_map"]) == {llama_hf_name(n) for n in g.tensors}

    # names and shapes: exactly a tied LlamaForCausalLM built from the written config.json
    config = LlamaConfig(**json.loads((tmp_path / "config.json").read_text()))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert {k: v.shape for k, v in state.items()} == expected
    assert config.tie_word_embeddings and config.num_key_value_heads == 3

    # values: the reference dequantization, with Q/K un-permuted the way transformers does it
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    ref_tensors = {t.name: t for t in r.tensors}
    for name in ("blk.7.attn_q.weight", "blk.7.attn_k.weight", "blk.7.attn_v.weight",
                 "blk.7.ffn_norm.weight", "token_embd.weight"):
        rt = ref_tensors[name]
        ref = gguf.quants.dequantize(rt.data, rt.tensor_type)
        ref = proc.process(ref, name).weights
        ref = torch.from_numpy(np.array(ref, copy=True)).to(torch.bfloat16)
        assert torch.equal(state[llama_hf_name(name)], ref), name
    assert not torch.equal(state["model.layers.7.self_attn.q_proj.weight"],
                           g.dequantize("blk.7.attn_q.weight").to(torch.bfloat16))   # the permutation is real


def test_unpermute_rope_inverts_llama_cpp_permutation():
    w = torch.arange(2 * 3 * 8 * 5).reshape(3 * 8, 10)
    # llama.cpp's converter: reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)
    permuted = w.reshape(3, 2, 4, 10).transpose(1, 2).reshape(24, 10)
    assert torch.equal(unpermute_rope(permuted, 3), w)
    with pytest.raises(ValueError, match="divisible"):
        unpermute_rope(w, 5)
    with pytest.raises(ValueError, match="no transformers name"):
        llama_hf_name("blk.0.attn_qkv.weight")

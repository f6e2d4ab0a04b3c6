"""Checks for chapter 6 (ex06_storage). References: the ``safetensors`` library (it writes every test file
and reads the expected tensors), ``huggingface_hub.split_torch_state_dict_into_shards`` for sharding,
``functools.lru_cache`` (and a brute-force list LRU for mixed sizes) for the cache."""
from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import safetensors.torch as st
import torch

from autograder.checks import Checker
from llmspace.storage import MAX_HEADER_BYTES

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool, torch.float64, torch.int16]


def _sample(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


def _craft(header, data=b"", length=None):
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def _reference_header(blob):
    """What the header says, read with json alone; dtype/shape cross-checked by safetensors.load (which
    also proves that the file is valid)."""
    blob = bytes(blob)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", None) or {}
    loaded = st.load(blob)
    for name, info in header.items():
        assert list(loaded[name].shape) == info["shape"]
    return header, metadata, 8 + n


def _valid_files(hidden: bool):
    if not hidden:
        return [
            ("two fp32 tensors", st.save({"w": _sample(torch.float32, (2, 3), 0),
                                          "b": _sample(torch.float32, (3,), 1)})),
            ("with __metadata__", st.save({"x": _sample(torch.int8, (4,), 2)}, metadata={"format": "pt"})),
        ]
    mixed = {f"t{i}": _sample(d, (i % 3 + 1, 2), i) for i, d in enumerate(_DTYPES)}
    data = _sample(torch.float32, (4,), 7).numpy().tobytes()
    return [
        # safetensors writes headers in offset order; a valid file need not be (the reader sorts)
        ("header not in offset order", _craft({"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                                               "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, data)),
        ("an empty tensor at the same begin as a later-listed one",
         _craft({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, data[:8])),
        ("given as a bytearray", bytearray(st.save({"k": _sample(torch.int16, (3, 2), 8)}))),
        ("every dtype", st.save(mixed)),
        ("scalar and empty tensors", st.save({"s": torch.tensor(2.5), "e": torch.zeros(0, 7),
                                              "v": torch.arange(5)})),
        ("no tensors", st.save({})),
        ("bf16 with metadata", st.save({"layer.0.weight": _sample(torch.bfloat16, (8, 4), 3)},
                                       metadata={"step": "1000"})),
    ]


_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_VISIBLE_BAD = [
    ("truncated file (3 bytes)", b"\x10\x00\x00", "a file shorter than the 8-byte length"),
    ("unknown dtype", _craft({"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "dtype 'F17' is not a safetensors dtype"),
    ("overlapping tensors", _craft({"a": _F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                   bytes(12)), "two tensors' byte ranges overlap"),
]
_HIDDEN_BAD = [
    ("header length larger than the file", _craft({"a": _F32}, bytes(8), length=10_000),
     "the header length points past the end of the file"),
    ("shape does not match the byte count", _craft({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                   bytes(8)), "prod(shape) * element size must equal end - begin"),
    ("offsets past the end of the data", _craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                                                bytes(8)), "a tensor's end offset must lie within the data section"),
    ("gap between tensors", _craft({"a": _F32, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
                                   bytes(16)), "the tensors must cover the data section without gaps"),
    ("bytes after the last tensor", _craft({"a": _F32}, bytes(20)),
     "the tensors must cover the data section exactly"),
    ("header is a JSON list", _craft([1, 2]), "the header must be a JSON object"),
    ("begin > end", _craft({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, bytes(4)),
     "data_offsets must satisfy begin <= end"),
    ("negative shape [-2, -2] with a matching byte count",
     _craft({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16)),
     "shape entries must be non-negative integers"),
    ("an overlap and a gap whose sizes add up",
     _craft({"a": _F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
             "c": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}}, bytes(20)),
     "sort the ranges and walk through them: overlaps and gaps are errors even when the sizes add up"),
    ("overlap only visible after sorting",
     _craft({"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "a": _F32,
             "c": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(16)),
     "two tensors' byte ranges overlap"),
    ("header length past the end although the JSON still parses", _craft({}, length=40),
     "the header length must not exceed the bytes that follow the length field"),
    ("hostile header length (2**62 bytes)", (1 << 62).to_bytes(8, "little") + b"{}",
     "a header length above MAX_HEADER_BYTES or past the end of the file must be rejected before "
     "allocating anything"),
    ("__metadata__ value that is not a string", _craft({"__metadata__": {"step": 1000}}),
     "__metadata__ must map strings to strings"),
    ("shape that is not a list", _craft({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, bytes(8)),
     "shape must be a list of non-negative integers"),
    ("header length with its most significant byte set",
     _craft({}, length=len(b"{}") | 1 << 56), "the length is all 8 bytes, little-endian"),
    ("a tensor entry that is not an object", _craft({"a": 5}), "each tensor entry must be an object"),
    ("a tensor entry without a shape", _craft({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8)),
     "each tensor entry needs dtype, shape and data_offsets"),
    ("data_offsets that are not integers",
     _craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}, bytes(8)),
     "data_offsets must be two integers"),
    ("negative shape [-1, -1]", _craft({"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}, bytes(4)),
     "shape entries must be non-negative integers"),
    ("header is not valid JSON", b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", "the header must be JSON"),
    ("header is not UTF-8", b"\x04\x00\x00\x00\x00\x00\x00\x00\"\xff\xfe\"", "the header must be UTF-8"),
    # the element count passes 2**64 on the way although the final product is 0 (the reference refuses)
    ("element count overflowing 64 bits midway ([2**32, 2**32, 0])",
     _craft({"a": {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}),
     "multiply the shape in order and refuse an element count that reaches 2**64 on the way"),
    ("sub-byte dtype that ends mid-byte (3 x F4 = 12 bits)",
     _craft({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, bytes(1)),
     "prod(shape) * bits must be a whole number of bytes"),
]


def check_parse_safetensors_header(impl, *, hidden: bool = False) -> None:
    """Header parsing: tensors (in header order), metadata and data_start as the file says; malformed
    files rejected with ValueError (any subclass, e.g. json.JSONDecodeError or your own)."""
    c = Checker("parse_safetensors_header", impl, hidden)
    for name, blob in _valid_files(hidden):
        got = c.call(name, blob, hint="this file is valid: the safetensors library reads it")
        c.expect_type(name, got, tuple)
        if len(got) != 3:
            c.fail(name, f"must return (tensors, metadata, data_start), got {len(got)} values")
        tensors, metadata, data_start = got
        ref_tensors, ref_metadata, ref_start = _reference_header(blob)
        if isinstance(tensors, dict) and "__metadata__" in tensors:
            c.fail(name, "'__metadata__' is not a tensor: return it separately as metadata")
        if not isinstance(tensors, dict) or set(tensors) != set(ref_tensors):
            c.fail(name, "tensors must be a dict with the names the header lists"
                         + ("" if hidden else f" {sorted(ref_tensors)}, got "
                            + (f"{sorted(tensors)}" if isinstance(tensors, dict) else type(tensors).__name__)))
        if list(tensors) != list(ref_tensors):
            c.fail(name, "tensors must keep the header's order"
                         + ("" if hidden else f" {list(ref_tensors)}, got {list(tensors)}"))
        for key, info in ref_tensors.items():
            mine = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(tensors[key]).items()}
            for field in ("dtype", "shape", "data_offsets"):
                if mine.get(field) != info[field]:
                    c.fail(name, f"a tensor's {field} differs from the header's" if hidden else
                                 f"tensor {key!r}: {field} is {mine.get(field)!r}, the file says {info[field]!r}")
        if metadata != ref_metadata:
            c.fail(name, "metadata differs from the header's __metadata__ ({} when absent)" if hidden else
                         f"metadata is {metadata!r}, expected {ref_metadata!r} ({{}} when absent)")
        if data_start != ref_start:
            c.fail(name, "data_start is wrong: it is 8 + the header length" if hidden else
                         f"data_start is {data_start!r}, expected {ref_start} (8 + header length)")
    for name, blob, what in (_HIDDEN_BAD if hidden else _VISIBLE_BAD):
        try:   # the reference reader must reject it too, or the case itself is wrong
            st.load(blob)
        except Exception:  # noqa: BLE001 - safetensors raises its own error type
            pass
        else:
            raise AssertionError(f"safetensors accepts the malformed case {name!r}")
        c.expect_raises(name, ValueError, blob, what=what)
    if hidden:   # built here, not at import: 100 MB
        n = MAX_HEADER_BYTES + 1
        big = n.to_bytes(8, "little") + b"{}" + b" " * (n - 2)   # valid JSON, one byte over the limit
        try:
            st.load(big)
        except Exception:  # noqa: BLE001 - the reference reader refuses it ("header too large")
            pass
        else:
            raise AssertionError("safetensors accepts a header above MAX_HEADER_BYTES")
        c.expect_raises("header longer than MAX_HEADER_BYTES (valid JSON whitespace)", ValueError, big,
                        what="a header length above MAX_HEADER_BYTES must be rejected")
        del big
    c.expect_raises("not bytes", TypeError, "a string", what="buf must be bytes-like")


def check_read_tensor(impl, *, hidden: bool = False) -> None:
    """One tensor by its offsets: dtype, shape and values as safetensors.load; a writable copy that
    neither warns nor shares memory with buf."""
    c = Checker("read_tensor", impl, hidden, builds_on=("parse_safetensors_header",))
    cases = []
    for file_name, blob in _valid_files(hidden):
        for key in sorted(st.load(bytes(blob))):   # a fixed order: the same failure names the same case
            cases.append((f"{file_name}: {key}", blob, key))
    for name, blob, key in cases:
        expected = st.load(bytes(blob))[key]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = c.call(name, blob, key)
        if caught:
            c.fail(name, f"emitted a warning ({caught[0].message}); torch.frombuffer on read-only "
                         f"bytes warns — copy the bytes into a bytearray first")
        c.expect_type(name, got, torch.Tensor)
        if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
            c.fail(name, f"got dtype {got.dtype} and shape {tuple(got.shape)}, expected "
                         f"{expected.dtype} and {tuple(expected.shape)}")
        if not torch.equal(got, expected):
            c.fail(name, "wrong values: read data_start + begin .. data_start + end of the file and "
                         "reinterpret those bytes as the header's dtype (little-endian)")
        if got.numel():
            before = bytes(blob)
            got.reshape(-1).view(torch.uint8)[0] ^= 1  # the result must own its memory
            if bytes(blob) != before:
                c.fail(name, "the tensor shares memory with buf: writing to it changed the file bytes")
    c.expect_raises("missing name", KeyError, _valid_files(False)[0][1], "no_such_tensor",
                    what="a name that is not in the file")
    if hidden:
        c.expect_raises("malformed file", ValueError, _HIDDEN_BAD[3][1], "a",
                        what="a malformed file must be rejected (parse the header first)")
        c.expect_raises("negative shape", ValueError, _HIDDEN_BAD[7][1], "a",
                        what="a malformed file must be rejected (parse the header first)")


def _hub_split(state_dict, limit):
    from huggingface_hub import split_torch_state_dict_into_shards
    return split_torch_state_dict_into_shards(state_dict, max_shard_size=limit)


def _state_dicts(hidden: bool):
    """(case, state dict, limit, prefix or None for the default)."""
    if not hidden:
        sd = {f"layers.{i}.weight": _sample(torch.float32, (10, 10), i) for i in range(4)}   # 400 bytes each
        return [("4 x 400 bytes, limit 1000", sd, 1000, None), ("limit 10**9: one shard", sd, 10**9, None)]
    mixed = {"embed": _sample(torch.bfloat16, (100, 8), 0), "a": _sample(torch.int8, (50,), 1),
             "b": _sample(torch.float32, (30,), 2), "huge": _sample(torch.float32, (1000,), 3),
             "c": _sample(torch.int64, (20,), 4), "d": _sample(torch.float32, (5,), 5)}
    exact = {f"w{i}": _sample(torch.float32, (25,), 10 + i) for i in range(5)}   # 100 bytes each
    two_big = {"x": _sample(torch.float32, (10,), 20), "big1": _sample(torch.float32, (100,), 21),
               "y": _sample(torch.float32, (10,), 22), "big2": _sample(torch.float64, (60,), 23),
               "z": _sample(torch.float32, (10,), 24)}
    over = {"a": _sample(torch.float32, (25,), 30), "b": _sample(torch.int8, (101,), 31),     # 100, 101 bytes
            "c": _sample(torch.float32, (25,), 32), "d": _sample(torch.int8, (101,), 33)}
    at_limit = {"s1": _sample(torch.float32, (5,), 34), "exact": _sample(torch.float32, (25,), 35),
                "s2": _sample(torch.float32, (5,), 36)}
    embedding = _sample(torch.float32, (10, 10), 37)   # 400 bytes, stored once under two names
    tied = {"embed": embedding, "a": _sample(torch.float32, (30,), 38), "b": _sample(torch.float32, (50,), 39),
            "lm_head": embedding, "c": _sample(torch.float32, (20,), 40)}
    return [("shard exactly full", exact, 200, None),
            ("one byte over the limit", over, 200, None),
            ("a tensor exactly the size of the limit", at_limit, 100, None),
            ("oversized tensor in the middle", mixed, 1700, None),
            ("bytes, not elements (bf16/int8/int64)", mixed, 2000, None),
            ("limit smaller than every tensor", exact, 10, None),
            ("two oversized tensors between small ones", two_big, 100, None),
            ("a custom prefix", mixed, 1700, "decoder"),
            ("empty state dict", {}, 100, None),
            ("tied weights: lm_head is the embedding's tensor", tied, 500, None)]


def check_shard_state_dict(impl, *, hidden: bool = False) -> None:
    """Greedy sharding under a byte limit, with a transformers-style index (huggingface_hub reference):
    the same shards in the same order, file names numbered from 1 with the given prefix."""
    c = Checker("shard_state_dict", impl, hidden)
    for name, sd, limit, prefix in _state_dicts(hidden):
        shown = {k: tuple(v.shape) for k, v in sd.items()}
        args = (shown, limit) if prefix is None else (shown, limit, prefix)
        got = c.call(name, sd, limit) if prefix is None else c.call(name, sd, limit, prefix)
        if not isinstance(got, tuple) or len(got) != 2:
            c.fail(name, "must return (shards, index)", args)
        shards, index = got
        ref = _hub_split(sd, limit)
        total = ref.metadata["total_size"] if sd else 0   # tied weights counted once
        if not isinstance(index, dict) or set(index) != {"metadata", "weight_map"}:
            c.fail(name, "index must be a dict with keys 'metadata' and 'weight_map'", args)
        if index["metadata"] != {"total_size": total}:
            c.fail(name, ("index['metadata'] must be {'total_size': <bytes>}" if hidden else
                          f"index['metadata'] is {index['metadata']!r}, expected {{'total_size': {total}}}")
                   + " (the sum of numel * element_size over all tensors, a tied tensor counted once)", args)
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            c.fail(name, "shards must be a list of dicts", args)
        groups = [sorted(s) for s in shards]
        # the hub's file names are numbered in shard order (a single shard is "model.safetensors")
        expected = [sorted(ref.filename_to_tensors[f]) for f in sorted(ref.filename_to_tensors)] if sd else []
        if sorted(groups) != sorted(expected):
            c.fail(name, f"wrong grouping: got {len(shards)} shards, expected {len(expected)}"
                         + ("" if hidden else f" {groups}, expected {expected}"), args)
        if groups != expected:
            c.fail(name, "right shards in the wrong order: list them in the order the walk through the "
                         "state dict closes them (an oversized tensor's own shard goes where it is met)"
                         + ("" if hidden else f"; got {groups}, expected {expected}"), args)
        for sh in shards:
            for k, v in sh.items():
                ref_t = sd.get(k)
                if not (isinstance(v, torch.Tensor) and ref_t is not None and v.dtype == ref_t.dtype
                        and v.shape == ref_t.shape and torch.equal(v, ref_t)):
                    c.fail(name, f"shard entry {k!r} must be the state dict's tensor", args)
        n = len(shards)
        stem = "model" if prefix is None else prefix
        names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        if not isinstance(index["weight_map"], dict) or set(index["weight_map"]) != set(sd):
            c.fail(name, "weight_map must name every tensor exactly once", args)
        if list(index["weight_map"]) != list(sd):
            c.fail(name, "weight_map must list the tensors in the state dict's order", args)
        for i, sh in enumerate(shards):
            for k in sh:
                if index["weight_map"][k] != names[i]:
                    c.fail(name, ("weight_map points a tensor to the wrong file" if hidden else
                                  f"weight_map[{k!r}] is {index['weight_map'][k]!r}")
                           + f", expected {names[i]!r} (shard {i + 1} of {n}, numbered from 1, 5 digits, "
                             f"prefix {stem!r})", args)
    if hidden:
        c.expect_raises("limit 0", ValueError, {"a": torch.zeros(1)}, 0, what="max_shard_bytes must be positive")
        c.expect_raises("limit 1.5", TypeError, {"a": torch.zeros(1)}, 1.5, what="max_shard_bytes must be an int")


def _brute_lru(accesses, sizes, capacity):
    """A list kept in recency order (most recent last); obviously correct, O(n * cache)."""
    cache, hits, misses, loaded, evictions = [], 0, 0, 0, 0
    for layer in accesses:
        if layer in cache:
            hits += 1
            cache.remove(layer)
            cache.append(layer)
            continue
        misses += 1
        loaded += sizes[layer]
        if sizes[layer] > capacity:
            continue
        while sum(sizes[x] for x in cache) + sizes[layer] > capacity:
            cache.pop(0)
            evictions += 1
        cache.append(layer)
    return {"hits": hits, "misses": misses, "bytes_loaded": loaded, "evictions": evictions}


def check_simulate_lru(impl, *, hidden: bool = False) -> None:
    """LRU replay: hits/misses as functools.lru_cache for equal sizes; bytes and evictions for mixed sizes."""
    c = Checker("simulate_lru", impl, hidden)
    rng = np.random.default_rng(6)
    if not hidden:
        cases = [("cyclic scan, room for 2 of 3", [0, 1, 2] * 3, [100] * 3, 200),
                 ("repeat access is a hit", [0, 0, 1, 0], [100] * 2, 200),
                 ("a hit refreshes recency", [0, 1, 0, 2, 0], [100] * 3, 200)]
    else:
        cases = [("cyclic scan, room for all", list(range(5)) * 3, [10] * 5, 50),
                 ("random, equal sizes", rng.integers(0, 8, 120).tolist(), [7] * 8, 28),
                 ("back and forth", (list(range(6)) + list(range(5, -1, -1))) * 2, [3] * 6, 9),
                 ("mixed sizes", rng.integers(0, 6, 80).tolist(), [5, 1, 9, 3, 4, 2], 12),
                 ("layer larger than the cache", [0, 1, 2, 0, 1, 2], {0: 4, 1: 30, 2: 4}, 10),
                 ("capacity 0", [0, 1, 0], [1, 1], 0),
                 ("no accesses", [], [1], 5),
                 ("sizes as a dict with sparse ids", [10, 3, 7, 10, 3, 7, 3], {10: 5, 3: 2, 7: 4}, 7),
                 ("layers that fill the cache exactly", [0, 1, 0, 1, 2, 0], [6, 4, 10], 10)]
    for name, accesses, sizes, capacity in cases:
        args = (accesses, sizes, capacity)
        got = c.call(name, *args)
        c.expect_type(name, got, dict, args)
        expected = _brute_lru(accesses, sizes, capacity)
        equal = list(sizes.values()) if isinstance(sizes, dict) else sizes
        if len(set(equal)) == 1 and equal[0] <= capacity:   # cross-check with the standard library
            cached = functools.lru_cache(maxsize=capacity // equal[0])(lambda i: i)
            for i in accesses:
                cached(i)
            info = cached.cache_info()
            assert (info.hits, info.misses) == (expected["hits"], expected["misses"])
        for key in ("hits", "misses", "bytes_loaded", "evictions"):
            if got.get(key) != expected[key]:
                value = got.get(key)
                c.fail(name, (f"{key} is wrong" + (f" (too {'large' if value > expected[key] else 'small'})"
                                                   if isinstance(value, int) else "")) if hidden else
                             f"{key} is {value!r}, expected {expected[key]}", args)
    if hidden:
        c.expect_raises("negative capacity", ValueError, [0], [1], -1, what="capacity_bytes must be >= 0")

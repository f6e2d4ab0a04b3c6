"""The safetensors format: dtypes, the header parser (exercise task 1), reading one tensor (task 2), writing, mmap loads.

Part of :mod:`llmspace.storage` (chapter 6); see the package docstring for the whole picture.
"""
from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import torch


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

"""GGUF, llama.cpp's single-file model format, read from its specification.

A GGUF file (spec: ``docs/gguf.md`` in github.com/ggml-org/ggml) is four regions, all little-endian:

1. **Header**, 24 bytes: magic ``b"GGUF"`` (4 bytes), ``uint32`` version (2 or 3 here; version 1
   used ``uint32`` counts and string lengths and is not read), ``uint64`` tensor count, ``uint64``
   metadata key/value count.
2. **Metadata**: ``kv_count`` entries ``(string key, uint32 value type, value)``. A string is a
   ``uint64`` byte length then UTF-8 bytes (no terminator); an array is ``(uint32 element type,
   uint64 count, elements)`` and may nest. Value types: 0 uint8, 1 int8, 2 uint16, 3 int16,
   4 uint32, 5 int32, 6 float32, 7 bool (one byte, 0 or 1), 8 string, 9 array, 10 uint64,
   11 int64, 12 float64.
3. **Tensor infos**: ``tensor_count`` entries ``(string name, uint32 n_dims, uint64 dims[n_dims],
   uint32 ggml type, uint64 offset)``. ``dims`` are in ggml order — ``ne[0]`` is the fastest-varying
   (contiguous) axis — so torch's shape is the reverse. ``offset`` is relative to the start of the
   tensor data and must be a multiple of the alignment.
4. **Tensor data**, starting at the end of the tensor infos rounded up to the alignment
   (``general.alignment``, a ``uint32`` multiple of 8; 32 when absent), zero-padded.

Quantized ggml types store a row as consecutive *blocks*: ``block_size`` weights packed into
``type_size`` bytes (:data:`GGML_TYPES`), so a row's length must be a multiple of ``block_size``.
The shipped SmolLM2-135M-Instruct file holds Q4_1 (210 matrices), F32 (61 norm vectors) and Q8_0
(the tied token embedding); :meth:`GGUFFile.dequantize` decodes F32, F16, BF16, Q8_0, Q4_0, Q4_1.

:class:`GGUFFile` maps the file (``mmap``) and parses only the header, metadata and tensor infos;
:meth:`GGUFFile.tensor_data` is a numpy *view* into the map, so opening the file costs
milliseconds and touching a tensor pages in only its bytes. :func:`gguf_to_safetensors` writes the
dequantized tensors as a sharded safetensors checkpoint with transformers' Llama names.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "GGMLType", "GGML_TYPES", "GGUFTensorInfo", "GGUFFile", "dequantize_blocks",
    "GGUF_MAGIC", "DEFAULT_ALIGNMENT", "llama_hf_name", "unpermute_rope", "llama_config",
    "gguf_to_state_dict", "gguf_to_safetensors",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4                       # GGML_MAX_DIMS
HEADER_BYTES = 24                  # magic 4 + version 4 + tensor_count 8 + kv_count 8


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: ``block_size`` weights are stored in ``type_size`` bytes."""
    name: str
    id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


# id → type, from ggml's block structs (ggml-common.h): fp16 scales are 2 bytes, QK_K = 256.
GGML_TYPES: dict[int, GGMLType] = {t.id: t for t in [
    GGMLType("F32", 0, 1, 4),
    GGMLType("F16", 1, 1, 2),
    GGMLType("Q4_0", 2, 32, 2 + 16),            # d (fp16), 32 4-bit q
    GGMLType("Q4_1", 3, 32, 2 + 2 + 16),        # d, m (fp16), 32 4-bit q
    GGMLType("Q5_0", 6, 32, 2 + 4 + 16),        # d, 32 high bits, 32 low nibbles
    GGMLType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
    GGMLType("Q8_0", 8, 32, 2 + 32),            # d (fp16), 32 int8
    GGMLType("Q8_1", 9, 32, 4 + 4 + 32),        # d, s (fp32), 32 int8
    GGMLType("Q2_K", 10, 256, 16 + 64 + 2 + 2),
    GGMLType("Q3_K", 11, 256, 32 + 64 + 12 + 2),
    GGMLType("Q4_K", 12, 256, 2 + 2 + 12 + 128),
    GGMLType("Q5_K", 13, 256, 2 + 2 + 12 + 32 + 128),
    GGMLType("Q6_K", 14, 256, 128 + 64 + 16 + 2),
    GGMLType("Q8_K", 15, 256, 4 + 256 + 2 * 16),
    GGMLType("I8", 24, 1, 1),
    GGMLType("I16", 25, 1, 2),
    GGMLType("I32", 26, 1, 4),
    GGMLType("I64", 27, 1, 8),
    GGMLType("F64", 28, 1, 8),
    GGMLType("BF16", 30, 1, 2),
]}
_TYPE_BY_NAME = {t.name: t for t in GGML_TYPES.values()}
# numpy dtype of a tensor_data() view for element (block_size 1) types; others are raw uint8 rows
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                   "I16": np.int16, "I32": np.int32, "I64": np.int64, "BF16": np.uint16}

# metadata value types: id → (name, struct format or None)
_VALUE_TYPES = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
                4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<B"),
                8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
                12: ("FLOAT64", "<d")}
_MIN_VALUE_BYTES = {8: 8, 9: 12}   # an empty string / empty array still has its length fields


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor-info entry.

    Attributes:
        name: the tensor's GGUF name (``blk.0.attn_q.weight``).
        ggml_shape: dims as stored, ``ne[0]`` (contiguous) first.
        shape: torch order, ``tuple(reversed(ggml_shape))``.
        ggml_type: :class:`GGMLType`.
        offset: byte offset of the data from the start of the file (the spec's offset is relative to
            the tensor-data region; this one is absolute).
        nbytes: bytes of data, ``numel / block_size * type_size``.
    """
    name: str
    ggml_shape: tuple[int, ...]
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.ggml_shape)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every overrun is a ValueError."""

    def __init__(self, buf, size: int, path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"{self.path}: truncated GGUF file: {what} needs {n} bytes at offset "
                             f"{self.pos}, but the file has {self.size} bytes")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos:self.pos + n]          # a copy: no buffer export on the map
        self.pos += n
        return out

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: {what} at offset {self.pos - n} is not UTF-8: {exc}") from None

    def remaining(self) -> int:
        return self.size - self.pos


def _align(offset: int, alignment: int) -> int:
    return offset + (alignment - offset % alignment) % alignment


class GGUFFile:
    """A GGUF file, memory-mapped read-only; use as a context manager.

    Attributes:
        path: ``pathlib.Path``.
        version: 2 or 3.
        metadata: key → value in file order; ints, floats, bools, strs, and lists for arrays (nested
            arrays are nested lists).
        metadata_types: key → value type names, e.g. ``("UINT32",)`` or ``("ARRAY", "STRING")``.
        tensors: name → :class:`GGUFTensorInfo`, in file order.
        alignment: bytes (``general.alignment``, default 32).
        data_offset: absolute byte offset of the tensor-data region.
        file_size: bytes.

    Raises:
        ValueError: bad magic, unsupported version (1, or a big-endian file), truncation, unknown
            value or ggml type, invalid UTF-8, a bool other than 0/1, duplicate key or tensor name,
            counts that cannot fit in the file, an alignment that is not a positive multiple of 8,
            a row length that is not a multiple of the block size, a misaligned offset, tensor data
            beyond the end of the file, or overlapping tensors. The file is closed before raising.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._mm = None
        with open(self.path, "rb") as f:
            self.file_size = os.fstat(f.fileno()).st_size
            if self.file_size < HEADER_BYTES:
                raise ValueError(f"{self.path}: {self.file_size} bytes is too short for a GGUF "
                                 f"header ({HEADER_BYTES} bytes)")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------------- parsing
    def _parse(self) -> None:
        c = _Cursor(self._mm, self.file_size, self.path)
        magic = c.take(4, "magic")
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path}: bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
        version = c.unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = (" (it reads as a byte-swapped version: a big-endian file, which this reader does "
                    "not support)" if swapped in SUPPORTED_VERSIONS else "")
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are){hint}")
        self.version = version
        n_tensors = c.unpack("<Q", "tensor_count")
        n_kv = c.unpack("<Q", "metadata_kv_count")
        # each kv needs at least key length 8 + type 4 + 1 byte; each tensor info at least 8+4+4+8
        if n_kv * 13 > c.remaining():
            raise ValueError(f"{self.path}: metadata_kv_count {n_kv} cannot fit in {c.remaining()} bytes")
        if n_tensors * 24 > c.remaining():
            raise ValueError(f"{self.path}: tensor_count {n_tensors} cannot fit in {c.remaining()} bytes")

        self.metadata, self.metadata_types = {}, {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}")
            if key in self.metadata:
                raise ValueError(f"{self.path}: duplicate metadata key {key!r}")
            vtype = c.unpack("<I", f"value type of {key!r}")
            value, types = self._value(c, vtype, key)
            self.metadata[key], self.metadata_types[key] = value, types

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata and self.metadata_types["general.alignment"] != ("UINT32",):
            raise ValueError(f"{self.path}: general.alignment must be UINT32, got "
                             f"{self.metadata_types['general.alignment']}")
        if alignment <= 0 or alignment % 8:
            raise ValueError(f"{self.path}: general.alignment must be a positive multiple of 8, got {alignment}")
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name = c.string(f"name of tensor {i}")
            n_dims = c.unpack("<I", f"n_dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"{self.path}: tensor {name!r} has {n_dims} dims; ggml allows 1..{MAX_DIMS}")
            dims = tuple(c.unpack("<Q", f"dim {d} of {name!r}") for d in range(n_dims))
            type_id = c.unpack("<I", f"type of {name!r}")
            if type_id not in GGML_TYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unknown or unsupported ggml type "
                                 f"{type_id} (known: {sorted(GGML_TYPES)})")
            rel = c.unpack("<Q", f"offset of {name!r}")
            infos.append((name, dims, GGML_TYPES[type_id], rel))
        self.data_offset = _align(c.pos, alignment)

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, gtype, rel in infos:
            if name in self.tensors:
                raise ValueError(f"{self.path}: duplicate tensor name {name!r}")
            if dims[0] % gtype.block_size:
                raise ValueError(f"{self.path}: tensor {name!r}: row length ne[0]={dims[0]} is not a "
                                 f"multiple of {gtype.name}'s block size {gtype.block_size}")
            if rel % alignment:
                raise ValueError(f"{self.path}: tensor {name!r}: offset {rel} is not a multiple of the "
                                 f"alignment {alignment}")
            numel = math.prod(dims)
            nbytes = numel // gtype.block_size * gtype.type_size
            start = self.data_offset + rel
            if start + nbytes > self.file_size:
                raise ValueError(f"{self.path}: tensor {name!r} ({gtype.name}, ggml shape {dims}) needs "
                                 f"bytes [{start}, {start + nbytes}) but the file has {self.file_size}")
            self.tensors[name] = GGUFTensorInfo(name, dims, tuple(reversed(dims)), gtype, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"{self.path}: tensors {a!r} and {b!r} overlap")

    def _value(self, c: _Cursor, vtype: int, key: str):
        if vtype not in _VALUE_TYPES:
            raise ValueError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
        tname, fmt = _VALUE_TYPES[vtype]
        if vtype == 8:
            return c.string(f"string value of {key!r}"), (tname,)
        if vtype == 9:
            etype = c.unpack("<I", f"array element type of {key!r}")
            if etype not in _VALUE_TYPES:
                raise ValueError(f"{self.path}: metadata {key!r} is an array of unknown type {etype}")
            n = c.unpack("<Q", f"array length of {key!r}")
            efmt = _VALUE_TYPES[etype][1]
            esize = struct.calcsize(efmt) if efmt else _MIN_VALUE_BYTES[etype]
            if n * esize > c.remaining():
                raise ValueError(f"{self.path}: metadata {key!r}: array of {n} elements cannot fit in "
                                 f"the {c.remaining()} bytes left")
            if efmt and etype != 7:    # numeric: one bulk read
                arr = np.frombuffer(c.take(n * esize, f"array {key!r}"), dtype=np.dtype(efmt))
                return arr.tolist(), (tname, _VALUE_TYPES[etype][0])
            values, sub = [], (_VALUE_TYPES[etype][0],)
            for _ in range(n):
                v, sub = self._value(c, etype, key)
                values.append(v)
            return values, (tname,) + sub
        value = c.unpack(fmt, f"value of {key!r}")
        if vtype == 7:
            if value not in (0, 1):
                raise ValueError(f"{self.path}: metadata {key!r}: bool byte must be 0 or 1, got {value}")
            value = bool(value)
        return value, (tname,)

    # ---------------------------------------------------------------------------------- access
    def _info(self, name: str) -> GGUFTensorInfo:
        if self._mm is None:
            raise ValueError(f"{self.path}: the file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only numpy view into the map (no copy).

        Element types (block size 1) come as their dtype in torch order (BF16 as ``uint16`` bit
        patterns: numpy has no bfloat16); block-quantized types as ``uint8`` of shape
        ``(*shape[:-1], row_bytes)``, the layout ``gguf.GGUFReader`` uses. The view keeps the map
        alive after :meth:`close`; the pages are unmapped when the last view is gone.
        """
        t = self._info(name)
        dtype = _ELEMENT_DTYPES.get(t.ggml_type.name)
        if dtype is not None:
            return np.frombuffer(self._mm, dtype=dtype, count=t.numel, offset=t.offset).reshape(t.shape)
        row_bytes = t.ggml_shape[0] // t.ggml_type.block_size * t.ggml_type.type_size
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return raw.reshape(*t.shape[:-1], row_bytes)

    def dequantize(self, name: str) -> torch.Tensor:
        """The tensor decoded to a new ``torch.float32`` tensor of shape ``info.shape``.

        Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (see :func:`dequantize_blocks`).

        Raises:
            KeyError: no such tensor. NotImplementedError: another ggml type.
        """
        t = self._info(name)
        flat = dequantize_blocks(self.tensor_data(name).reshape(-1).view(np.uint8), t.ggml_type.name)
        return flat.reshape(t.shape)

    def close(self) -> None:
        """Release the map (deferred while :meth:`tensor_data` views are alive). Idempotent."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:       # numpy views export the buffer: they keep it alive
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)}, "
                f"metadata={len(self.metadata)})")


def dequantize_blocks(raw, type_name: str) -> torch.Tensor:
    """Decode a run of ggml data to a flat ``torch.float32`` tensor.

    Args:
        raw: 1-D ``np.uint8`` array (or bytes) holding whole blocks.
        type_name: ``"F32"``, ``"F16"``, ``"BF16"``, ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"``.

    Block layouts (ggml ``block_q*`` structs; all blocks hold 32 weights, ``d``/``m`` are fp16):

    * **Q8_0**, 34 bytes (8.5 bits/weight): ``d``, then 32 ``int8`` ``q``; ``w = q·d``.
    * **Q4_0**, 18 bytes (4.5 bits/weight): ``d``, then 16 bytes ``qs``; weight ``j < 16`` is the low
      nibble of ``qs[j]``, weight ``j + 16`` its high nibble; ``w = d·(q − 8)``.
    * **Q4_1**, 20 bytes (5.0 bits/weight): ``d``, ``m``, then 16 bytes ``qs`` (nibbles as Q4_0);
      ``w = d·q + m`` with ``q`` in 0..15.

    fp16 and bf16 are widened exactly; the products are computed in fp32 as gguf-py does, so the
    results match ``gguf.quants.dequantize`` bit for bit.

    Raises:
        NotImplementedError: another type. ValueError: ``raw`` is not a whole number of blocks.
    """
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if type_name not in _TYPE_BY_NAME:
        raise ValueError(f"unknown ggml type {type_name!r}")
    gtype = _TYPE_BY_NAME[type_name]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"raw must be a 1-D uint8 array, got {raw.dtype} of shape {raw.shape}")
    if raw.size % gtype.type_size:
        raise ValueError(f"{raw.size} bytes is not a whole number of {type_name} blocks "
                         f"({gtype.type_size} bytes each)")
    if type_name == "F32":
        return torch.from_numpy(raw.view(np.float32).copy())
    if type_name == "F16":
        return torch.from_numpy(raw.view(np.float16).astype(np.float32))
    if type_name == "BF16":                 # bf16 is the top half of an fp32: shift the bits up
        return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32))
    if type_name not in ("Q8_0", "Q4_0", "Q4_1"):
        raise NotImplementedError(f"dequantizing ggml type {type_name} is not implemented "
                                  f"(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")
    blocks = raw.reshape(-1, gtype.type_size)                          # (n_blocks, type_size)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)      # (n_blocks, 1)
    if type_name == "Q8_0":
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)      # (n_blocks, 32)
        return torch.from_numpy((q * d).reshape(-1))
    qs = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]      # (n_blocks, 16)
    q = np.empty((len(blocks), 32), dtype=np.uint8)                    # (n_blocks, 32)
    q[:, :16] = qs & 0x0F                                              # weights 0..15: low nibbles
    q[:, 16:] = qs >> 4                                                # weights 16..31: high nibbles
    if type_name == "Q4_0":
        return torch.from_numpy((d * (q.astype(np.float32) - np.float32(8))).reshape(-1))
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)     # (n_blocks, 1)
    return torch.from_numpy((d * q.astype(np.float32) + m).reshape(-1))


# --------------------------------------------------------------------------------------------------
# Llama: GGUF names and layout → transformers
# --------------------------------------------------------------------------------------------------

_LLAMA_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                    "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def llama_hf_name(name: str) -> str:
    """transformers' name for a llama.cpp tensor name (``blk.3.attn_q.weight`` →
    ``model.layers.3.self_attn.q_proj.weight``). Raises ValueError for a name it does not know."""
    if name in _LLAMA_TOP_NAMES:
        return _LLAMA_TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _LLAMA_BLOCK_NAMES:
        raise ValueError(f"no transformers name for GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_LLAMA_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row permutation of a Q or K projection weight.

    transformers' Llama rotates pairs ``(i, i + head_dim/2)`` of each head ("rotate_half"); ggml
    rotates adjacent pairs ``(2i, 2i + 1)``. llama.cpp's converter therefore reorders each head's
    output rows, ``reshape(n_heads, 2, head_dim/2, -1).swapaxes(1, 2)``; this is its inverse.

    Args:
        w: ``(n_heads * head_dim, in_features)``. n_heads: query heads for Q, key/value heads for K.
    """
    out = w.shape[0]
    if out % (2 * n_heads):
        raise ValueError(f"rows {out} are not divisible by 2 * n_heads = {2 * n_heads}")
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_config(metadata: dict, tensors: dict) -> dict:
    """A transformers ``LlamaConfig`` dict (``config.json``) from a llama GGUF's metadata."""
    if metadata.get("general.architecture") != "llama":
        raise ValueError(f"not a llama GGUF: general.architecture = {metadata.get('general.architecture')!r}")
    p = "llama."
    n_heads = metadata[p + "attention.head_count"]
    hidden = metadata[p + "embedding_length"]
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": metadata[p + "feed_forward_length"],
        "num_hidden_layers": metadata[p + "block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": metadata.get(p + "attention.head_count_kv", n_heads),
        "head_dim": metadata.get(p + "rope.dimension_count", hidden // n_heads),
        "rms_norm_eps": metadata[p + "attention.layer_norm_rms_epsilon"],
        "rope_theta": metadata.get(p + "rope.freq_base", 10000.0),
        "max_position_embeddings": metadata[p + "context_length"],
        "vocab_size": metadata.get(p + "vocab_size", tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in metadata:
            cfg[hf] = metadata[f"tokenizer.ggml.{key}"]
    return cfg


def gguf_to_state_dict(path, dtype: torch.dtype = torch.float32, hf_names: bool = True) -> dict:
    """Every tensor of a GGUF file, dequantized and cast to ``dtype``.

    With ``hf_names`` (llama only) names and Q/K layout are transformers' (:func:`llama_hf_name`,
    :func:`unpermute_rope`), so the result loads into ``LlamaForCausalLM`` with ``strict=True``;
    otherwise the GGUF names and the file's row order are kept.
    """
    with GGUFFile(path) as g:
        if hf_names and g.metadata.get("general.architecture") != "llama":
            raise ValueError(f"{path}: hf_names=True needs a llama GGUF, got "
                             f"{g.metadata.get('general.architecture')!r}")
        out = {}
        for name in g.tensors:
            w = g.dequantize(name)
            if hf_names:
                if ".attn_q." in name:
                    w = unpermute_rope(w, g.metadata["llama.attention.head_count"])
                elif ".attn_k." in name:
                    w = unpermute_rope(w, g.metadata.get("llama.attention.head_count_kv",
                                                         g.metadata["llama.attention.head_count"]))
                name = llama_hf_name(name)
            out[name] = w.to(dtype)
    return out


def gguf_to_safetensors(path, out_dir, max_shard_bytes: int, dtype: torch.dtype = torch.float32,
                        hf_names: bool = True) -> Path:
    """Convert a GGUF file to a sharded safetensors checkpoint; returns the index path.

    Writes ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` tensor bytes
    each and ``model.safetensors.index.json`` through :func:`llmspace.storage.save_sharded`, plus
    (with ``hf_names``) a transformers ``config.json``. Quantized tensors are dequantized: the
    checkpoint holds the same values the 4-bit file encodes, at ``dtype``'s size.
    """
    from llmspace.storage import save_sharded
    out_dir = Path(out_dir)
    state = gguf_to_state_dict(path, dtype=dtype, hf_names=hf_names)
    index = save_sharded(state, out_dir, max_shard_bytes)
    if hf_names:
        with GGUFFile(path) as g:
            cfg = llama_config(g.metadata, g.tensors)
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return index

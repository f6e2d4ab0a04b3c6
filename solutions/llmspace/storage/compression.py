"""Lossless compression of weights: byte planes, zstd/zlib, and what it saves on trained floats.

Part of :mod:`llmspace.storage` (chapter 6); see the package docstring for the whole picture.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from llmspace.storage.format import DTYPE_NAMES, _raw_bytes, tensor_bytes


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

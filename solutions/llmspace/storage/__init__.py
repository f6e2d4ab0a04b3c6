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

The package has one module per concern: :mod:`~llmspace.storage.format` (the safetensors format:
parse, read, write, mmap), :mod:`~llmspace.storage.checkpoint` (crash-safe single files),
:mod:`~llmspace.storage.sharding` (shards, the index and its commit protocol),
:mod:`~llmspace.storage.loading` (streaming into a model) and :mod:`~llmspace.storage.compression`.
Every public name is importable from ``llmspace.storage`` itself.

Everything here is tested against the ``safetensors`` library (byte-identical files both ways, every
dtype it reads, and a differential fuzz of the header parser) and ``huggingface_hub``'s
``save_torch_state_dict`` and shard splitter (tied weights included). The LRU replay of the exercise lives
in :mod:`llmspace.tiered` (``simulate_lru``; importing it from here still works).
"""
from llmspace.storage.format import (
    CHECKSUM_KEY, DTYPE_BITS, DTYPE_NAMES, DTYPES, MAX_HEADER_BYTES, MAX_JSON_DEPTH, SAVE_ID_KEY,
    SHARD_HASHES_KEY, CorruptCheckpointError, SafetensorsFile, _raw_bytes, load_file,
    parse_safetensors_header, read_tensor, save_file, serialize, tensor_bytes)
from llmspace.storage.checkpoint import load_checkpoint, save_checkpoint, verify_checksum
from llmspace.storage.sharding import load_sharded, save_sharded, shard_state_dict
from llmspace.storage.loading import load_into_model, peak_rss_bytes
from llmspace.storage.compression import byte_planes, compress_tensor, decompress_tensor, measure_compression

__all__ = [
    "DTYPES", "DTYPE_NAMES", "DTYPE_BITS", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "CHECKSUM_KEY",
    "SAVE_ID_KEY", "SHARD_HASHES_KEY",
    "parse_safetensors_header", "read_tensor", "serialize", "save_file", "load_file",
    "SafetensorsFile", "shard_state_dict", "save_sharded", "load_sharded", "load_into_model",
    "save_checkpoint", "load_checkpoint", "verify_checksum", "CorruptCheckpointError",
    "byte_planes", "compress_tensor", "decompress_tensor", "measure_compression",
    "peak_rss_bytes", "tensor_bytes",
]


def __getattr__(name):
    # simulate_lru moved to llmspace.tiered (the cache lives with the tiers); old imports keep working.
    if name == "simulate_lru":
        from llmspace.tiered import simulate_lru
        return simulate_lru
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

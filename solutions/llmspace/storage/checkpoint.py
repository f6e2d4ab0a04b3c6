"""Crash-safe single-file checkpoints: atomic replace, fsync, a whole-file SHA-256 in the header.

Part of :mod:`llmspace.storage` (chapter 6); see the package docstring for the whole picture.
"""
from __future__ import annotations

import glob
import hashlib
import os
import threading
import uuid
from pathlib import Path

import torch

from llmspace.storage.format import (
    CHECKSUM_KEY, CorruptCheckpointError, _check_tensors, _open_mapped, _raw_bytes, _refuse_shared,
    load_file, serialize)


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
        from llmspace.storage.sharding import load_sharded   # sharding builds on this module: import late
        return load_sharded(path, verify=verify)
    if verify:
        verify_checksum(path)
    return load_file(path)

"""Sharded checkpoints: the shard split (exercise task 3), the index, and the commit protocol of a sharded save.

Part of :mod:`llmspace.storage` (chapter 6); see the package docstring for the whole picture.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import uuid
from pathlib import Path

import torch

from llmspace.storage.format import (
    CorruptCheckpointError, SAVE_ID_KEY, SHARD_HASHES_KEY, _open_mapped, _shared_names, load_file,
    save_file)
from llmspace.storage.checkpoint import (
    _atomic_write, _fsync_directory, _pid_alive, _remove_orphans, save_checkpoint, verify_checksum)


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
    Tied weights — names whose tensors share one storage, e.g. an LM head tied to the token embedding
    (the same tensor object under two names) — are stored once: the later name joins the shard of the
    first one and adds nothing to that shard's bytes or to ``total_size`` (``huggingface_hub``'s rule).
    Tensors on the ``meta`` device have no storage and are never tied.

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

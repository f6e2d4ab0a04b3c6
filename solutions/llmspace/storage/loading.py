"""Streaming a checkpoint into a model (peak memory = model + one tensor) and measuring peak RSS.

Part of :mod:`llmspace.storage` (chapter 6); see the package docstring for the whole picture.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmspace.storage.format import _open_mapped, _readinto, _sequential, _torch_dtype, _torch_shape
from llmspace.storage.sharding import _checkpoint_plan


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

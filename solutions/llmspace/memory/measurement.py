"""Measuring memory: bytes of tensors and storages, bytes autograd saves (saved-tensor hooks), and the
allocator's peak (torch.profiler memory events on CPU, ``torch.cuda.max_memory_allocated`` on GPU).
Part of :mod:`llmspace.memory`, which re-exports every name."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from llmspace.models.transformer import Transformer, TransformerConfig

__all__ = ["tensor_bytes", "storage_bytes", "SavedTensorLog", "saved_activation_bytes", "MemoryBreakdown",
           "measure_training_memory", "measure_peak_bytes", "measure_training_peaks"]


# --------------------------------------------------------------------------------------------------
# Measuring: bytes of tensors, bytes autograd saves
# --------------------------------------------------------------------------------------------------

def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor *views* (``numel * element_size``); works on ``meta`` tensors."""
    return t.numel() * t.element_size()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and repeated tensors counted once)."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[(s.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


class SavedTensorLog:
    """Context manager recording every tensor autograd saves for backward, by storage.

    ``bytes`` is the size of the distinct storages saved, excluding storages listed in ``exclude``
    (pass the model's parameters: they are model state, not activations). A storage that autograd
    saves from several ops (q, k and v are views of one qkv output) is counted once.
    """

    def __init__(self, exclude=()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self.records: list[tuple[tuple, torch.dtype, int]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.excluded and s.data_ptr() not in self.storages:
            self.storages[s.data_ptr()] = s.nbytes()
            self.records.append((tuple(t.shape), t.dtype, s.nbytes()))
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def saved_activation_bytes(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes autograd saves for backward during ``model.loss(tokens, targets)`` (storage-deduplicated,
    parameters excluded). Runs one forward pass; the graph is freed before returning."""
    with SavedTensorLog(exclude=list(model.parameters()) + list(model.buffers())) as log:
        loss = model.loss(tokens, targets)
    del loss
    return log.bytes


@dataclass
class MemoryBreakdown:
    """Training memory per rank, in bytes. ``total`` sums the fields; ``notes`` states the conventions."""
    params: int = 0
    grads: int = 0
    master: int = 0
    optimizer: int = 0
    activations: int = 0
    notes: str = ""
    peak_allocated: int | None = None   # measured on a GPU only: torch.cuda.max_memory_allocated
    first_step_peak: int | None = None  # estimated: bytes live at the peak of the first step
    peak: int | None = None             # estimated: bytes live at the peak of every later step
    first_step_peak_phase: str = ""     # where the first step's peak falls
    peak_phase: str = ""                # where a later step's peak falls

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.master + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    def as_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "master": self.master,
                "optimizer": self.optimizer, "activations": self.activations, "total": self.total,
                "first_step_peak": self.first_step_peak, "peak": self.peak}


def measure_training_memory(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                            optimizer: torch.optim.Optimizer) -> MemoryBreakdown:
    """Run one training step and read every term off the tensors themselves.

    params/grads: storages of ``model.parameters()`` and their ``.grad``; optimizer: every tensor in
    ``optimizer.state`` (Adam's ``exp_avg``, ``exp_avg_sq`` and its 0-d ``step``); activations: bytes
    saved for backward (:class:`SavedTensorLog`); on a GPU also ``peak_allocated``, the allocator's peak
    during the step (it includes the temporaries that the other terms leave out). Leaves the model one
    step further trained.
    """
    params = list(model.parameters())
    on_gpu = params[0].is_cuda
    optimizer.zero_grad(set_to_none=True)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with SavedTensorLog(exclude=params + list(model.buffers())) as log:
        loss = model.loss(tokens, targets)
    loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return MemoryBreakdown(params=storage_bytes(params), grads=storage_bytes(p.grad for p in params),
                           optimizer=storage_bytes(state), activations=log.bytes,
                           notes="measured: tensor storages; activations via saved_tensors_hooks",
                           peak_allocated=torch.cuda.max_memory_allocated() if on_gpu else None)


def measure_peak_bytes(fn, device: str = "cpu") -> dict:
    """Run ``fn()`` and measure, with the allocator's own events, the most bytes it had live.

    CPU: ``torch.profiler.profile(profile_memory=True)`` reports every allocation and free of PyTorch's
    CPU allocator (pointer, signed size in bytes, time); replaying them in time order gives the bytes
    live after each event. Only memory allocated *inside* ``fn`` is counted: frees of older memory are
    not reported with a size (PyTorch warns "Memory block of unknown size was allocated before the
    profiling started") and are ignored, so build the model and the batch inside ``fn``.
    Regions: every ``torch.profiler.record_function(label)`` that ``fn`` opens gets its own peak.

    CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at the call
    (``reset_peak_memory_stats`` first); block sizes are the allocator's (rounded to 512 bytes).
    Regions are not available there (use one call per region).

    Returns:
        ``{"peak": int, "end": int, "regions": {label: {"peak": int, "at": op name}}}`` in bytes:
        the highest and the final number of bytes live above the level at the call.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - base, "end": torch.cuda.memory_allocated() - base,
                "regions": {}}
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    from torch._C._profiler import RecordScope, _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes, labels, op):
        for node in nodes:
            fields = node.extra_fields
            if isinstance(fields, _ExtraFields_Allocation):
                if fields.device.type == "cpu":
                    events.append((node.start_time_ns, fields.ptr, fields.alloc_size, labels, op))
                continue
            user = getattr(fields, "scope", None) == RecordScope.USER_SCOPE   # record_function(label)
            walk(node.children, labels + (node.name,) if user else labels, node.name)

    walk(prof.profiler.kineto_results.experimental_event_tree(), (), "")
    events.sort(key=lambda e: e[0])
    live, level, peak, regions = {}, 0, 0, {}
    for _, ptr, size, labels, op in events:
        if size > 0:
            live[ptr] = live.get(ptr, 0) + size
            level += size
        elif ptr in live:
            level -= live.pop(ptr)
        else:
            continue                        # allocated before fn: not ours
        peak = max(peak, level)
        for label in labels:
            if level >= regions.get(label, {"peak": -1})["peak"]:
                regions[label] = {"peak": level, "at": op}
    return {"peak": peak, "end": level, "regions": regions}


def measure_training_peaks(config: TransformerConfig, batch_size: int, seq_len: int, n_steps: int = 2,
                           device: str = "cpu", seed: int = 0) -> list:
    """Allocator-measured peak of each of ``n_steps`` Adam steps of a fresh :class:`Transformer`.

    Builds the model, ``torch.optim.Adam`` (its default implementation for the device) and a random
    int64 batch on ``device``, then runs ``n_steps`` steps of ``zero_grad(set_to_none=True)``,
    ``model.loss``, ``backward``, ``step``. Everything is allocated inside the measurement, so the
    numbers are absolute: bytes live on ``device`` counting parameters, batch, gradients, optimizer
    state, activations and every temporary. On CUDA a warm-up step of a throw-away copy runs first so
    that the one-time cuBLAS workspaces are not counted, and each phase is measured by its own
    ``max_memory_allocated`` window.

    Returns a list of ``{"step", "peak", "phase", "phases": {"forward", "backward", "optimizer"}}``,
    bytes; ``phase`` names the phase holding the peak.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    phases = ("forward", "backward", "optimizer")

    def build():
        torch.manual_seed(seed)
        model = Transformer(config).to(device)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g).to(device)
        targets = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g).to(device)
        return model, torch.optim.Adam(model.parameters()), tokens, targets

    def run_phase(state, phase):
        model, opt, tokens, targets = state["objects"]
        if phase == "forward":
            opt.zero_grad(set_to_none=True)
            state["loss"] = model.loss(tokens, targets)
        elif phase == "backward":
            state["loss"].backward()
            state["loss"] = None
        else:
            opt.step()

    rows = []
    if device == "cuda":
        warm = {"objects": build()}
        for phase in phases:
            run_phase(warm, phase)
        del warm
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        state = {"objects": build()}
        for step in range(1, n_steps + 1):
            peaks = {}
            for phase in phases:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                run_phase(state, phase)
                torch.cuda.synchronize()
                peaks[phase] = torch.cuda.max_memory_allocated() - base
            where = max(peaks, key=peaks.get)
            rows.append({"step": step, "peak": peaks[where], "phase": where, "phases": peaks})
        return rows
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    from torch.profiler import record_function

    def program():
        state = {"objects": build()}
        for step in range(1, n_steps + 1):
            for phase in phases:
                with record_function(f"step{step}.{phase}"):
                    run_phase(state, phase)

    regions = measure_peak_bytes(program)["regions"]
    for step in range(1, n_steps + 1):
        peaks = {phase: regions[f"step{step}.{phase}"]["peak"] for phase in phases}
        where = max(peaks, key=peaks.get)
        rows.append({"step": step, "peak": peaks[where], "phase": where, "phases": peaks})
    return rows

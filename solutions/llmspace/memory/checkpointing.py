"""Activation checkpointing from scratch (a ``torch.autograd.Function``), segment bounds, and its
measurement (saved bytes and the allocator's peak). Part of :mod:`llmspace.memory`, which re-exports it."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmspace.memory.measurement import SavedTensorLog, measure_peak_bytes
from llmspace.models.transformer import Transformer

__all__ = ["checkpoint_segments", "checkpointed_activation_bytes", "segment_bounds"]


# --------------------------------------------------------------------------------------------------
# Activation checkpointing, from scratch
# --------------------------------------------------------------------------------------------------

class _Checkpoint(torch.autograd.Function):
    """Run ``fn`` without saving anything; in backward, recompute it with grad enabled and back-prop.

    ``log`` (a list or None) receives the bytes the recomputation saved — the extra memory the
    backward pass needs for this segment. No RNG state is saved: a segment must compute the same thing
    twice (no dropout), which ``torch.utils.checkpoint`` guarantees by restoring the RNG state."""

    @staticmethod
    def forward(ctx, fn, log, x, *params):
        ctx.fn, ctx.log, ctx.n_params = fn, log, len(params)
        ctx.save_for_backward(x)                      # the only tensor kept: the segment's input
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(x.requires_grad)
        params = _segment_params(ctx.fn)
        with torch.enable_grad(), SavedTensorLog(exclude=params) as saved:
            out = ctx.fn(x)
        if ctx.log is not None:
            ctx.log.append(saved.bytes)
        # only what requires grad is differentiated: a frozen parameter (LoRA-style fine-tuning)
        # gets None, as with torch.utils.checkpoint
        trainable = [p for p in params if p.requires_grad]
        inputs = ([x] if x.requires_grad else []) + trainable
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True)) if inputs else []
        grad_x = grads.pop(0) if x.requires_grad else None
        by_param = iter(grads)
        return (None, None, grad_x, *(next(by_param) if p.requires_grad else None for p in params))


def _segment_params(fn) -> list:
    return list(fn.parameters()) if isinstance(fn, nn.Module) else []


def segment_bounds(n_layers: int, n_segments: int) -> list:
    """``[(start, stop), ...]``: ``n_layers`` consecutive layers cut into exactly ``n_segments``
    segments whose sizes differ by at most one (the first ``n_layers % n_segments`` get the extra
    layer, as ``numpy.array_split``). ``n_segments`` outside ``[1, n_layers]`` raises ValueError."""
    if not isinstance(n_segments, int) or isinstance(n_segments, bool) or not 1 <= n_segments <= n_layers:
        raise ValueError(f"n_segments must be an int in [1, {n_layers}] (one layer per segment at most), "
                         f"got {n_segments!r}")
    size, extra = divmod(n_layers, n_segments)
    bounds, start = [], 0
    for i in range(n_segments):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _per_segment(n_layers: int, n_segments: int) -> int:
    return max(stop - start for start, stop in segment_bounds(n_layers, n_segments))


def checkpoint_segments(blocks, x: torch.Tensor, n_segments: int, log: list | None = None) -> torch.Tensor:
    """Apply ``blocks`` (a sequence of modules) to ``x`` in ``n_segments`` checkpointed segments.

    The blocks are cut into exactly ``n_segments`` segments of consecutive blocks (sizes differ by at
    most one: :func:`segment_bounds`); each keeps only its input, and its activations are recomputed
    during backward (one extra forward per segment: ~1/3 more compute for a forward+backward step).
    Frozen parameters (``requires_grad=False``) inside a segment are allowed and get no gradient.
    ``log`` receives the bytes each recomputation saved. ``n_segments`` larger than the number of
    blocks raises ValueError (it is never silently changed).
    """
    blocks = list(blocks)
    for start, stop in segment_bounds(len(blocks), n_segments):
        segment = nn.Sequential(*blocks[start:stop])
        x = _Checkpoint.apply(segment, log, x, *segment.parameters())
    return x


def checkpointed_activation_bytes(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor,
                                  n_segments: int, use_torch: bool = False) -> dict:
    """Measure a checkpointed :class:`Transformer` forward + backward (``n_segments=None``: no
    checkpointing).

    Returns bytes and results:

    * ``forward`` — bytes saved for backward during the forward pass (saved-tensor hooks);
    * ``recompute`` — the largest segment recomputation's saved bytes (our checkpointing only);
    * ``saved_peak = forward + recompute`` — the saved bytes at the worst moment of the backward: the
      quantity :func:`activation_bytes` with ``checkpoint_segments`` predicts, and only that: it leaves out
      the gradients and the backward's temporaries;
    * ``allocator_peak`` — the most bytes the allocator had live during the forward + backward, above
      what was allocated before it (parameters and batch): saved tensors, gradients and every
      temporary (:func:`measure_peak_bytes`; CPU only, None on other devices);
    * ``loss`` and ``grads`` (list of clones) to check that the gradients are unchanged.

    ``use_torch=True`` uses ``torch.utils.checkpoint.checkpoint`` (non-reentrant) for the segments
    instead of :func:`checkpoint_segments`; its recomputation happens inside torch's own hooks, so
    ``recompute`` and ``saved_peak`` are None."""
    params = list(model.parameters())
    blocks = list(model.blocks)
    recomputed: list[int] = []
    out = {}
    for p in params:
        p.grad = None

    def step():
        with SavedTensorLog(exclude=params + list(model.buffers())) as log:
            x = model.embed_tokens(tokens)
            if n_segments is None:
                for block in blocks:
                    x = block(x)
            elif use_torch:
                for start, stop in segment_bounds(len(blocks), n_segments):
                    segment = nn.Sequential(*blocks[start:stop])
                    x = torch.utils.checkpoint.checkpoint(segment, x, use_reentrant=False)
            else:
                x = checkpoint_segments(blocks, x, n_segments, recomputed)
            logits = model.head(model.norm(x))
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            del logits
        out["forward"] = log.bytes
        loss.backward()
        out["loss"] = loss.detach()

    if tokens.device.type == "cpu":
        allocator_peak = measure_peak_bytes(step)["peak"]
    else:
        step()
        allocator_peak = None
    # torch's checkpoint recomputes inside its own saved-tensor hooks, invisible to ours: no peak for it
    recompute = 0 if n_segments is None else None if use_torch else max(recomputed, default=0)
    return {"forward": out["forward"], "recompute": recompute,
            "saved_peak": None if recompute is None else out["forward"] + recompute,
            "allocator_peak": allocator_peak, "loss": out["loss"],
            "grads": [None if p.grad is None else p.grad.clone() for p in params]}

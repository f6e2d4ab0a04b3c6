"""Chapter 2 — memory strategies: where the bytes of a training step go, and how to make them fewer.

Training memory has two parts that scale with different things:

* **model states** — parameters, gradients, optimizer state (and fp32 master weights under mixed
  precision) — scale with the number of parameters ``P``: ``P * bytes_per_param``. Sharding them over
  ``N`` data-parallel ranks (ZeRO stages 1/2/3, FSDP) divides them by ``N``.
* **activations** — the tensors autograd saves in the forward pass to compute the backward pass —
  scale with ``batch * seq_len * layers * width``. Gradient accumulation keeps them at the
  micro-batch's size; activation checkpointing trades them for a second forward pass.

Everything here is *measured* first and *estimated* second, and the estimator is tested against the
measurement: parameter/gradient/optimizer bytes come from the tensors themselves, activation bytes from
``torch.autograd.graph.saved_tensors_hooks`` (every tensor autograd saves, de-duplicated by storage, minus
the parameters' own storages, which are model state). The estimator also runs on a ``meta``-device model
(no storage) to size a 7B or 70B configuration on a laptop.

Conventions (the "16 vs 18 vs 20 bytes per parameter" disagreement) are a :class:`PrecisionPolicy`:
public sources differ only in which copies they count — see :data:`PRECISION_POLICIES`.

Layout — one module per concern, every public name re-exported here:

* :mod:`llmspace.models.transformer` — :class:`Transformer`, its configurations, the Llama-2 shapes (it lives
  with the other models the book measures; re-exported here);
* :mod:`llmspace.memory.measurement` — tensor and storage bytes, saved-tensor hooks, the allocator's
  peak (:func:`measure_peak_bytes`, :func:`measure_training_peaks`);
* this file — the estimator (conventions, model states, activations) and the exercise functions
  (accumulation, the allocator's free list, simulated ZeRO-1);
* :mod:`llmspace.memory.peak` — the training-step peak estimator (:func:`estimate_step_peaks`);
* :mod:`llmspace.memory.checkpointing` — activation checkpointing from scratch and its measurement;
* :mod:`llmspace.memory.precision` — fp16 dynamic loss scaling.

The transformer here (:class:`Transformer`) is a small pre-norm decoder that can take the shape of GPT-2
(LayerNorm, GELU MLP, learned positions, biases) or of Llama (RMSNorm, SwiGLU, grouped-query attention,
no biases; rotary embeddings omitted — they have no parameters).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# one module per concern; every public name is re-exported here (``from llmspace.memory import X``)
from llmspace.models.transformer import (LLAMA2_7B, LLAMA2_70B, SMALL_CONFIGS, Transformer,  # noqa: F401
                                         TransformerConfig)
from llmspace.memory.measurement import (MemoryBreakdown, SavedTensorLog, measure_peak_bytes,  # noqa: F401
                                         measure_training_memory, measure_training_peaks,
                                         saved_activation_bytes, storage_bytes, tensor_bytes)
from llmspace.memory.checkpointing import (_per_segment, checkpoint_segments,  # noqa: F401
                                           checkpointed_activation_bytes, segment_bounds)
from llmspace.memory.precision import DynamicLossScaler  # noqa: F401
# serving memory (the KV cache) lives in llmspace.kv_cache; the byte count is part of this chapter's API
from llmspace.kv_cache import kv_cache_bytes  # noqa: E402,F401

__all__ = [
    "TransformerConfig", "Transformer", "SMALL_CONFIGS", "LLAMA2_7B", "LLAMA2_70B", "kv_cache_bytes",
    "PrecisionPolicy", "PRECISION_POLICIES", "OPTIMIZER_STATE_BYTES", "MemoryBreakdown",
    "count_parameters", "model_state_bytes", "block_activation_bytes", "activation_bytes",
    "estimate_training_memory", "estimate_step_peaks", "measure_training_memory", "measure_peak_bytes",
    "measure_training_peaks", "saved_activation_bytes",
    "SavedTensorLog", "accumulate_gradients", "LiveGraphCounter", "checkpoint_segments", "checkpointed_activation_bytes",
    "segment_bounds",
    "zero1_adam_step", "replay_on_segment", "round_size", "MIN_BLOCK", "DynamicLossScaler", "tensor_bytes", "storage_bytes",
]


# --------------------------------------------------------------------------------------------------
# Estimating: conventions, model states, activations
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrecisionPolicy:
    """Bytes per parameter of each copy a training step keeps. Sources disagree on the total only
    because they count different copies; each field says which copy it is."""
    weights: float        # the weights the forward pass reads (fp32: 4, bf16/fp16: 2)
    grads: float          # gradient buffers (incl. an fp32 "main grad" copy where one is kept)
    master: float         # fp32 master weights the optimizer updates (0 when weights are fp32)
    optimizer: float      # optimizer state (Adam: exp_avg + exp_avg_sq in fp32 = 8)
    source: str = ""

    @property
    def bytes_per_param(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


PRECISION_POLICIES = {
    # Plain fp32 training with Adam (what `torch.optim.Adam` on an fp32 model measures): 4+4+8.
    "fp32": PrecisionPolicy(4, 4, 0, 8, "fp32 weights and grads, fp32 Adam moments"),
    # ZeRO paper (Rajbhandari et al. 2020, §3.1): fp16 weights+grads, fp32 master+moments: 2+2+12.
    "mixed-zero": PrecisionPolicy(2, 2, 4, 8, "ZeRO paper: 2 + 2 + K=12"),
    # Megatron-LM distributed-optimizer table ("float16" there means a 16-bit type, fp16 or bf16; the
    # rows differ by the gradient dtype): 16-bit weights, fp32 grads, fp32 master + moments: 18 —
    # the usual bf16 setup (gradients accumulated and all-reduced in fp32).
    "bf16-fp32-grads": PrecisionPolicy(2, 4, 4, 8, "Megatron-LM: 16-bit param, fp32 grads"),
    # Megatron-LM: 16-bit weights and 16-bit grads plus an fp32 main-grad copy: 2 + (2+4) + 4 + 8 = 20.
    "fp16-fp32-main-grads": PrecisionPolicy(2, 6, 4, 8, "Megatron-LM: 16-bit param, 16-bit grads + fp32 main grad"),
    # Hugging Face "model memory anatomy": fp32 model + a half copy for autocast (6), fp32 grads, Adam 8.
    "autocast-hf": PrecisionPolicy(6, 4, 0, 8, "HF docs: 4+2 weights, 4 grads, 8 Adam"),
}


#: Optimizer state in bytes per parameter (fp32 states; bitsandbytes' 8-bit Adam keeps two int8 states).
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "sgd": 0, "sgd-momentum": 4, "adam-8bit": 2}


def _policy(policy) -> PrecisionPolicy:
    if isinstance(policy, PrecisionPolicy):
        return policy
    if policy in PRECISION_POLICIES:
        return PRECISION_POLICIES[policy]
    raise ValueError(f"policy must be a PrecisionPolicy or one of {sorted(PRECISION_POLICIES)}, got {policy!r}")


def count_parameters(model_or_config) -> int:
    """Number of distinct parameters (tied weights once). Accepts a module (any device, ``meta``
    included: nothing is allocated) or a :class:`TransformerConfig` (built on ``meta``)."""
    if isinstance(model_or_config, TransformerConfig):
        with torch.device("meta"):
            model_or_config = Transformer(model_or_config)
    if not isinstance(model_or_config, nn.Module):
        raise TypeError(f"model_or_config must be an nn.Module or TransformerConfig, "
                        f"got {type(model_or_config).__name__}")
    return sum(p.numel() for p in model_or_config.parameters())  # parameters() de-duplicates ties


def model_state_bytes(n_params: int, policy: PrecisionPolicy, zero_stage: int = 0,
                      world_size: int = 1) -> dict:
    """Bytes of model states held by *one* data-parallel rank.

    Args:
        n_params: number of parameters of the model (int, > 0).
        policy: a :class:`PrecisionPolicy`; each field is bytes per parameter of one copy.
        zero_stage: 0 = plain data parallel (every rank holds everything); 1 = optimizer state and
            fp32 master weights sharded; 2 = also gradients; 3 = also the weights.
        world_size: number of data-parallel ranks ``N`` sharing the states.

    Returns:
        ``{"weights", "grads", "master", "optimizer"}`` → bytes (int) per rank: parameters held ×
        bytes per parameter, rounded up to a whole byte (``math.ceil``: a 4-bit copy of 1001 parameters
        takes 501 bytes). A sharded copy holds ``ceil(n_params / N)`` parameters per rank (the last
        shard is padded, as ZeRO/FSDP do).
    """
    if not isinstance(n_params, int) or n_params <= 0:
        raise ValueError(f"n_params must be a positive int, got {n_params!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ### BEGIN SOLUTION
    shard = -(-n_params // world_size)  # ceil: every rank pads to the same shard size
    per_rank = {"weights": n_params if zero_stage < 3 else shard,
                "grads": n_params if zero_stage < 2 else shard,
                "master": n_params if zero_stage < 1 else shard,
                "optimizer": n_params if zero_stage < 1 else shard}
    return {k: int(math.ceil(per_rank[k] * getattr(policy, k))) for k in per_rank}
    ### END SOLUTION


def block_activation_bytes(config: TransformerConfig, batch_size: int, seq_len: int,
                           dtype_bytes: int = 4) -> int:
    """Bytes one transformer block saves for backward (pre-norm block of :class:`Transformer`).

    Counts what PyTorch's autograd actually keeps (``B = batch_size``, ``T = seq_len``, ``d = d_model``,
    ``f = d_ff``, ``h = n_heads``; big tensors in ``dtype_bytes``, norm/softmax statistics in fp32):

    * each norm: its input ``x`` (B·T·d) and its output (B·T·d, saved by the next linear) plus fp32
      statistics — LayerNorm mean and rstd (2·B·T), RMSNorm rstd (B·T) and the normalised ``x`` (B·T·d,
      saved for the weight's gradient);
    * attention, ``sdpa``: the qkv projection output (B·T·(d + 2·kv_heads·head_dim): q, k and v are views
      of it), the attention output (B·T·d, input of the output projection) and one fp32 log-sum-exp per
      row (B·h·T); ``math``: contiguous copies of q, kᵀ, v (3·B·T·d), the causal mask (T² bools), the
      softmax probabilities (B·h·T²) and the attention output (B·T·d);
    * MLP, ``gelu``: the up-projection output and the GELU output (2·B·T·f); ``swiglu``: gate, up, SiLU
      output and the product (4·B·T·f).

    The residual additions save nothing. Returns bytes (int).
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("dtype_bytes", dtype_bytes)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    ### BEGIN SOLUTION
    B, T, d, f, h = batch_size, seq_len, config.d_model, config.d_ff, config.n_heads
    tokens = B * T
    if config.norm == "layernorm":
        norm = 2 * tokens * d * dtype_bytes + 2 * tokens * 4          # x, output; mean, rstd
    else:
        norm = 3 * tokens * d * dtype_bytes + tokens * 4              # x, normalised x, output; rstd
    if config.attention == "sdpa":
        qkv = tokens * (d + 2 * config.kv_heads * config.head_dim) * dtype_bytes
        attention = qkv + tokens * d * dtype_bytes + B * h * T * 4     # + output, log-sum-exp
    else:
        attention = (4 * tokens * d + B * h * T * T) * dtype_bytes + T * T  # q,kᵀ,v,out; probs; mask
    mlp = (4 if config.mlp == "swiglu" else 2) * tokens * f * dtype_bytes
    return 2 * norm + attention + mlp
    ### END SOLUTION


def activation_bytes(config: TransformerConfig, batch_size: int, seq_len: int, dtype_bytes: int = 4,
                     checkpoint_segments: int | None = None) -> int:
    """Bytes saved for backward by a whole :meth:`Transformer.loss` call (peak, per rank).

    Blocks (:func:`block_activation_bytes`) plus: int64 token ids (B·T) and position ids (T), the final
    norm, the fp32-or-``dtype`` log-softmax output of the cross-entropy (B·T·vocab), the int64 targets
    and a 4-byte total weight. With ``checkpoint_segments=k`` the blocks keep only each segment's input
    (k·B·T·d) during the forward pass, and the backward pass recomputes one segment at a time, so the
    peak is that plus the largest segment's activations: ``ceil(L/k)`` blocks.
    """
    c, B, T = config, batch_size, seq_len
    block = block_activation_bytes(c, B, T, dtype_bytes)
    tokens = B * T
    final_norm = (2 * tokens * c.d_model * dtype_bytes + 2 * tokens * 4 if c.norm == "layernorm"
                  else 3 * tokens * c.d_model * dtype_bytes + tokens * 4)
    extra = (8 * tokens + (8 * T if c.learned_positions else 0)      # embedding indices
             + final_norm + tokens * c.vocab_size * dtype_bytes       # log_softmax output
             + 8 * tokens + 4)                                         # targets, total_weight
    if checkpoint_segments is None:
        return extra + c.n_layers * block
    if not isinstance(checkpoint_segments, int) or not 1 <= checkpoint_segments <= c.n_layers:
        raise ValueError(f"checkpoint_segments must be an int in [1, n_layers={c.n_layers}], "
                         f"got {checkpoint_segments!r}")
    per_segment = _per_segment(c.n_layers, checkpoint_segments)      # the largest segment
    return extra + checkpoint_segments * tokens * c.d_model * dtype_bytes + per_segment * block


def estimate_training_memory(model_or_config, batch_size: int, seq_len: int, *, policy="fp32",
                             optimizer: str | None = None, activation_dtype_bytes: int = 4,
                             zero_stage: int = 0, world_size: int = 1,
                             checkpoint_segments: int | None = None, device: str = "cpu") -> MemoryBreakdown:
    """Estimate one rank's training memory without running anything.

    ``model_or_config``: a :class:`Transformer` (any device, ``meta`` included) or a
    :class:`TransformerConfig`. ``batch_size`` is the per-rank micro-batch. ``policy`` names the bytes per
    parameter convention (:data:`PRECISION_POLICIES`); ``optimizer`` (a key of
    :data:`OPTIMIZER_STATE_BYTES`) replaces the policy's optimizer bytes. Returns a :class:`MemoryBreakdown` in bytes.

    The terms (``params`` ... ``activations``) and their sum ``total`` are *sizes*, not a peak: they never
    all coexist. ``first_step_peak`` and ``peak`` (steady state, every step after the first) are the
    bytes the allocator holds at the highest point of one ``zero_grad(set_to_none=True)``, forward,
    ``backward()``, ``optimizer.step()`` step, computed by :func:`estimate_step_peaks` (where it falls:
    ``first_step_peak_phase``, ``peak_phase``). They are predicted for plain data parallelism
    (``zero_stage=0``, ``world_size=1``) without checkpointing, and are None otherwise. ``device``
    ("cpu" or "cuda") selects what differs between the two: the CUDA allocator rounds every block to
    512 bytes and ``torch.optim.Adam`` defaults to its ``foreach`` implementation there.

    Not counted: temporary buffers inside kernels beyond those listed in :func:`estimate_step_peaks`,
    the allocator's cache and fragmentation (see :mod:`llmspace.allocator`), communication buffers,
    cuBLAS workspaces and the CUDA context (~0.3-1 GiB on a GPU).
    """
    if isinstance(model_or_config, Transformer):
        config = model_or_config.config
    elif isinstance(model_or_config, TransformerConfig):
        config = model_or_config
    else:
        raise TypeError(f"model_or_config must be a Transformer or TransformerConfig, "
                        f"got {type(model_or_config).__name__}")
    policy = _policy(policy)
    if optimizer is not None:
        if optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
        policy = replace(policy, optimizer=OPTIMIZER_STATE_BYTES[optimizer],
                         source=f"{policy.source}; optimizer {optimizer}")
    states = model_state_bytes(count_parameters(model_or_config), policy, zero_stage, world_size)
    acts = activation_bytes(config, batch_size, seq_len, activation_dtype_bytes, checkpoint_segments)
    peaks = None
    if zero_stage == 0 and world_size == 1 and checkpoint_segments is None:
        peaks = estimate_step_peaks(config, batch_size, seq_len, policy=policy,
                                    activation_dtype_bytes=activation_dtype_bytes, device=device)
    return MemoryBreakdown(params=states["weights"], grads=states["grads"], master=states["master"],
                           optimizer=states["optimizer"], activations=acts,
                           notes=f"policy {policy.bytes_per_param:g} B/param ({policy.source}); "
                                 f"ZeRO-{zero_stage} over {world_size} ranks; activations per rank",
                           first_step_peak=peaks["first_step"]["peak"] if peaks else None,
                           peak=peaks["steady"]["peak"] if peaks else None,
                           first_step_peak_phase=peaks["first_step"]["phase"] if peaks else "",
                           peak_phase=peaks["steady"]["phase"] if peaks else "")


# --------------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------------

def accumulate_gradients(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                         n_micro_batches: int, *, ignore_index: int | None = None) -> tuple:
    """Gradients of the *full-batch mean loss*, computed one micro-batch at a time.

    Args:
        model: any module; its ``.grad`` fields are overwritten (cleared first).
        loss_fn: ``loss_fn(model(x), y)`` → mean loss over the examples of ``x`` (a 0-d tensor).
        inputs, targets: the full batch, examples along dim 0 (``len(inputs) == len(targets)``).
        n_micro_batches: number of equal micro-batches; must divide the batch size.
        ignore_index: None (default): ``loss_fn`` is a mean over examples, and each micro-batch's loss
            is divided by ``n_micro_batches``. An int: ``loss_fn`` is a mean over the *tokens* whose
            target is not ``ignore_index`` (``F.cross_entropy(..., ignore_index=...)`` on padded
            sequences), so micro-batches with more padding average over fewer tokens; each one is
            weighted by its share of the counted tokens of the whole batch (``n_i / N``) instead —
            dividing by ``n_micro_batches`` would weight the tokens of short micro-batches more (the
            gradient-accumulation bug of the Hugging Face ``Trainer``, fixed in transformers 4.46 by
            huggingface/transformers#34191, which normalises by ``num_items_in_batch``). A
            micro-batch without counted tokens contributes nothing.

    Returns:
        ``(loss, grads)``: the full-batch mean loss (a detached 0-d tensor) and the list of
        ``p.grad`` for ``p in model.parameters()``, equal to the gradients of
        ``loss_fn(model(inputs), targets)``. Only one micro-batch's activations may be alive at a time:
        call ``backward()`` on each micro-batch before the next forward.

    Only the parameters' ``.grad`` change: ``inputs`` and ``targets`` are not modified.
    """
    if not isinstance(n_micro_batches, int) or n_micro_batches < 1:
        raise ValueError(f"n_micro_batches must be a positive int, got {n_micro_batches!r}")
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets must have the same length, got {len(inputs)} and {len(targets)}")
    if len(inputs) % n_micro_batches:
        raise ValueError(f"n_micro_batches ({n_micro_batches}) must divide the batch size ({len(inputs)})")
    if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
        raise TypeError(f"ignore_index must be None or an int, got {type(ignore_index).__name__}")
    ### BEGIN SOLUTION
    for p in model.parameters():
        p.grad = None
    total = torch.zeros(())
    chunks = list(zip(inputs.chunk(n_micro_batches), targets.chunk(n_micro_batches)))
    if ignore_index is None:
        # each micro-batch loss is a mean over B/n examples: divide by n so the sum is the full mean
        weights = [1 / n_micro_batches] * len(chunks)
    else:
        # each micro-batch loss is a mean over its own counted tokens: weight it by its share
        counts = [int((y != ignore_index).sum()) for _, y in chunks]
        if sum(counts) == 0:
            raise ValueError(f"every target equals ignore_index ({ignore_index}): the mean loss is undefined")
        weights = [n / sum(counts) for n in counts]
    for (x, y), weight in zip(chunks, weights):
        if weight == 0:
            continue                     # no counted token: its mean is 0/0, its share nothing
        loss = loss_fn(model(x), y) * weight
        loss.backward()                  # frees this micro-batch's graph before the next forward
        total += loss.detach()
    return total, [p.grad for p in model.parameters()]
    ### END SOLUTION


class LiveGraphCounter(nn.Module):
    """Wraps a model and counts forward graphs whose backward has not reached the output yet.

    ``max_alive`` (a buffer, so it travels with ``state_dict``) is the largest number of micro-batch
    graphs — and hence activation sets — that were alive together: 1 for correct accumulation.
    ``batch_sizes[:n_forwards]`` (buffers too) are the batch sizes (``len(x)``) of the forward calls, in
    order, the first :attr:`MAX_FORWARDS` of them. Copies and pickles keep the parameters' ``.grad``
    (a plain ``nn.Module`` drops them), so a grader can hand a model with stale gradients to code that
    runs elsewhere."""

    MAX_FORWARDS = 256

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("alive", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_alive", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("batch_sizes", torch.zeros(self.MAX_FORWARDS, dtype=torch.long))

    def forward(self, x):
        if int(self.n_forwards) < self.MAX_FORWARDS:
            self.batch_sizes[int(self.n_forwards)] = len(x)
        self.n_forwards += 1
        out = self.model(x)
        if out.requires_grad:
            self.alive += 1
            self.max_alive.copy_(torch.maximum(self.max_alive, self.alive))
            out.register_hook(self._backward_reached)
        return out

    def forward_batch_sizes(self) -> list[int]:
        return self.batch_sizes[:min(int(self.n_forwards), self.MAX_FORWARDS)].tolist()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_grads"] = [None if p.grad is None else p.grad.detach().clone() for p in self.parameters()]
        return state

    def __setstate__(self, state):
        state = dict(state)
        grads = state.pop("_grads", None)
        super().__setstate__(state)
        if grads is not None:
            for p, g in zip(self.parameters(), grads):
                p.grad = g

    def _backward_reached(self, grad):
        self.alive -= 1


# --------------------------------------------------------------------------------------------------
# The free list of a caching allocator (the whole allocator is llmspace.allocator)
# --------------------------------------------------------------------------------------------------

MIN_BLOCK = 512                 # allocator granularity: every request is a multiple of this (bytes)


def round_size(nbytes: int) -> int:
    """Round a request up to a multiple of 512 bytes (at least 512)."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def replay_on_segment(segment_size: int, ops: list) -> tuple[dict, list]:
    """Best-fit allocation with splitting and coalescing inside one segment ``[0, segment_size)``.

    Args:
        segment_size: bytes of the segment (a positive multiple of 512).
        ops: a list of ``("malloc", name, nbytes)`` and ``("free", name)`` tuples, applied in order.

    Rules:
        * ``nbytes`` is rounded up to a multiple of 512 (at least 512);
        * best fit: take the *smallest* free block whose size is ≥ the rounded request (the lowest
          address among equal sizes); the allocation occupies the block's low end and the rest stays
          free (splitting);
        * ``free`` puts the block back and merges it with a free block that ends where it starts and
          with one that starts where it ends (coalescing);
        * a request that fits no free block raises ``MemoryError``; freeing a name that is not
          allocated raises ``ValueError``, and so does an op that is neither ``"malloc"`` nor ``"free"``.

    Returns:
        ``(addresses, free_blocks)``: ``{name: address}`` of every malloc performed (a name may be
        reused after its free: the latest address wins), and the final free blocks as a list of
        ``(address, size)`` tuples sorted by address.

    ``ops`` is not modified.
    """
    if not isinstance(segment_size, int) or segment_size <= 0 or segment_size % MIN_BLOCK:
        raise ValueError(f"segment_size must be a positive multiple of {MIN_BLOCK}, got {segment_size!r}")
    ### BEGIN SOLUTION
    free = [(0, segment_size)]          # sorted by address
    live = {}                           # name -> (address, size)
    addresses = {}
    for op in ops:
        if op[0] == "malloc":
            _, name, nbytes = op
            size = round_size(nbytes)
            fits = [(block_size, addr) for addr, block_size in free if block_size >= size]
            if not fits:
                raise MemoryError(f"no free block of {size} bytes for {name!r}")
            block_size, addr = min(fits)
            free.remove((addr, block_size))
            if block_size > size:                                   # split: the tail stays free
                bisect.insort(free, (addr + size, block_size - size))
            live[name] = (addr, size)
            addresses[name] = addr
        elif op[0] == "free":
            if op[1] not in live:
                raise ValueError(f"free of {op[1]!r}, which is not allocated")
            addr, size = live.pop(op[1])
            i = bisect.bisect(free, (addr, size))
            if i < len(free) and free[i][0] == addr + size:          # merge with the next block
                size += free.pop(i)[1]
            if i > 0 and free[i - 1][0] + free[i - 1][1] == addr:     # merge with the previous block
                addr, prev = free.pop(i - 1)
                size += prev
            bisect.insort(free, (addr, size))
        else:
            raise ValueError(f"op must start with 'malloc' or 'free', got {op[0]!r}")
    return addresses, free
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# ZeRO-1, simulated in one process (the distributed version is llmspace.parallel)
# --------------------------------------------------------------------------------------------------

def zero1_adam_step(flat_param: torch.Tensor, rank_grads: list, shard_states: list, step: int,
                    lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """One ZeRO-1 Adam step, with the ranks simulated as list entries.

    Args:
        flat_param: 1-D float tensor, all parameters flattened (``numel = n``); every rank holds it.
        rank_grads: ``N`` 1-D tensors of length ``n``: rank ``r``'s local gradient (its micro-batch).
        shard_states: ``N`` dicts, ``{"exp_avg": t, "exp_avg_sq": t}``, each of length
            ``shard = ceil(n / N)``: rank ``r`` owns elements ``[r*shard, (r+1)*shard)`` of the padded
            flat vector, and only its optimizer state. Updated in place.
        step: the Adam step number after this update (1 for the first step), for bias correction.

    Returns:
        The new ``flat_param`` (length ``n``), as all ranks hold it after the all-gather. Equal to
        ``torch.optim.Adam`` applied to the *mean* of the rank gradients (data-parallel semantics).

    The three collectives of a real ZeRO-1 step: reduce-scatter (each rank receives the *average*
    gradient of its shard), a local Adam update of the shard, all-gather of the updated shards.

    ``flat_param`` may be updated in place or left alone (the result is what counts); ``rank_grads``
    are not modified.
    """
    n_ranks = len(rank_grads)
    if n_ranks == 0 or len(shard_states) != n_ranks:
        raise ValueError(f"need one shard state per rank, got {len(rank_grads)} grads and "
                         f"{len(shard_states)} states")
    if flat_param.dim() != 1 or any(g.shape != flat_param.shape for g in rank_grads):
        raise ValueError(f"flat_param and every rank gradient must be 1-D of the same length, "
                         f"got {tuple(flat_param.shape)} and {[tuple(g.shape) for g in rank_grads]}")
    ### BEGIN SOLUTION
    n = flat_param.numel()
    shard = -(-n // n_ranks)
    pad = shard * n_ranks - n
    padded_param = F.pad(flat_param, (0, pad))
    # reduce-scatter(avg): rank r receives mean over ranks of the gradient slice it owns
    mean_grad = F.pad(torch.stack(rank_grads).mean(0), (0, pad))
    beta1, beta2 = betas
    new_shards = []
    for r, state in enumerate(shard_states):
        p = padded_param[r * shard:(r + 1) * shard]
        g = mean_grad[r * shard:(r + 1) * shard]
        state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1 ** step)
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** step)
        new_shards.append(p - lr * m_hat / (v_hat.sqrt() + eps))
    return torch.cat(new_shards)[:n]     # all-gather, then drop the padding
    ### END SOLUTION


# the peak estimator reads the estimator above (_policy, activation_bytes): imported last
from llmspace.memory.peak import estimate_step_peaks  # noqa: E402,F401

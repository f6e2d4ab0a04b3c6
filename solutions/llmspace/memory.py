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

The transformer here (:class:`Transformer`) is a small pre-norm decoder that can take the shape of GPT-2
(LayerNorm, GELU MLP, learned positions, biases) or of Llama (RMSNorm, SwiGLU, grouped-query attention,
no biases; rotary embeddings omitted — they have no parameters).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TransformerConfig", "Transformer", "SMALL_CONFIGS", "LLAMA2_7B", "LLAMA2_70B",
    "PrecisionPolicy", "PRECISION_POLICIES", "OPTIMIZER_STATE_BYTES", "MemoryBreakdown",
    "count_parameters", "model_state_bytes", "block_activation_bytes", "activation_bytes",
    "estimate_training_memory", "estimate_step_peaks", "measure_training_memory", "measure_peak_bytes",
    "measure_training_peaks", "saved_activation_bytes",
    "SavedTensorLog", "accumulate_gradients", "LiveGraphCounter", "checkpoint_segments", "checkpointed_activation_bytes",
    "segment_bounds",
    "zero1_adam_step", "replay_on_segment", "round_size", "MIN_BLOCK", "DynamicLossScaler", "tensor_bytes", "storage_bytes",
]


# --------------------------------------------------------------------------------------------------
# A small transformer whose saved tensors we can count
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a pre-norm decoder-only transformer.

    ``attention="sdpa"`` uses ``F.scaled_dot_product_attention`` (on CPU a FlashAttention-style kernel
    that saves q, k, v, the output and one log-sum-exp per row: no ``seq_len**2`` term);
    ``attention="math"`` writes softmax(QKᵀ)V out and saves the ``batch*heads*seq_len**2`` probabilities.
    """
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int = 1024
    n_kv_heads: int | None = None          # None: multi-head attention (= n_heads)
    norm: str = "layernorm"                # "layernorm" | "rmsnorm"
    mlp: str = "gelu"                      # "gelu" | "swiglu"
    bias: bool = True
    learned_positions: bool = True
    tie_embeddings: bool = False
    attention: str = "sdpa"                # "sdpa" | "math"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                              ("attention", ("sdpa", "math"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention == "math" and self.kv_heads != self.n_heads:
            raise ValueError("attention='math' supports only n_kv_heads == n_heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


#: Three small shapes the estimator is tested on (GPT-2-like, Llama-like with GQA, explicit attention).
SMALL_CONFIGS = {
    "gpt-tiny": TransformerConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=512),
    "llama-tiny": TransformerConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=8, d_ff=352,
                                    n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False,
                                    learned_positions=False),
    "gpt-math-attn": TransformerConfig(vocab_size=256, d_model=96, n_layers=3, n_heads=4, d_ff=384,
                                       attention="math", tie_embeddings=True),
}
#: Llama-2 shapes (Touvron et al. 2023, Table 1 / the released config.json); 6,738,415,616 and
#: 68,976,648,192 parameters.
LLAMA2_7B = TransformerConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                              max_seq_len=4096, norm="rmsnorm", mlp="swiglu", bias=False,
                              learned_positions=False)
LLAMA2_70B = replace(LLAMA2_7B, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672)


def _norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, bias=config.bias)
    return nn.RMSNorm(config.d_model)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        kv = config.kv_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, config.d_model + 2 * kv, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_model)
        c, (B, T, _) = self.config, x.shape
        kv = c.kv_heads * c.head_dim
        q, k, v = self.qkv(x).split([c.d_model, kv, kv], dim=-1)
        q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)       # (B, h, T, hd)
        k = k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if c.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.kv_heads != c.n_heads)
        else:
            scores = (q @ k.transpose(-2, -1)) * c.head_dim ** -0.5
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, c.d_model))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if self.gated else None
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm1, self.attn = _norm(config), Attention(config)
        self.norm2, self.mlp = _norm(config), MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Decoder-only language model. ``forward(tokens)`` → logits ``(B, T, vocab)``;
    ``loss(tokens, targets)`` → mean next-token cross-entropy (a 0-d tensor)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_seq_len, config.d_model) if config.learned_positions else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = _norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


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
        ``{"weights", "grads", "master", "optimizer"}`` → bytes (int) per rank. A sharded copy holds
        ``ceil(n_params / N)`` parameters per rank (the last shard is padded, as ZeRO/FSDP do).
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
# The peak of a training step: estimated from the timeline of what is alive when
# --------------------------------------------------------------------------------------------------

def _block_saved_parts(config: TransformerConfig, B: int, T: int, dt: int) -> dict:
    """What one block saves, split by the part of the block that frees it in backward (bytes).
    The parts sum to :func:`block_activation_bytes` (tested)."""
    tokens, d, f, h = B * T, config.d_model, config.d_ff, config.n_heads
    norm = (2 * tokens * d * dt + 2 * tokens * 4 if config.norm == "layernorm"
            else 3 * tokens * d * dt + tokens * 4)
    out = tokens * d * dt                                    # attention output, saved by the projection
    if config.attention == "sdpa":
        core = tokens * (d + 2 * config.kv_heads * config.head_dim) * dt + B * h * T * 4
    else:
        core = 3 * tokens * d * dt + B * h * T * T * dt + T * T
    mlp = (4 if config.mlp == "swiglu" else 2) * tokens * f * dt
    return {"norm1": norm, "attention": core, "attention_out": out, "norm2": norm, "mlp": mlp}


def _aligned(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment if nbytes else 0


def estimate_step_peaks(config: TransformerConfig, batch_size: int, seq_len: int, *, policy="fp32",
                        activation_dtype_bytes: int = 4, device: str = "cpu") -> dict:
    """Peak bytes of one training step of :class:`Transformer` with Adam, first step and steady state.

    The step is ``zero_grad(set_to_none=True)``, ``loss = model.loss(tokens, targets)``,
    ``loss.backward()``, ``optimizer.step()``. What the allocator holds, in bytes, at the moments
    where the peak can fall (``R`` = resident at the start of the step: parameters, the int64 batch,
    and from step 2 on the Adam state, which ``torch.optim.Adam`` allocates lazily in its first
    ``step()``; ``A`` = the activations saved for backward, :func:`activation_bytes`; ``Λ`` = the
    logits ``B·T·V``):

    * **backward start** — ``R + A + 2Λ``: the cross-entropy's backward allocates the gradient of the
      log-probabilities (``nll_loss_backward``, B·T·V) and the gradient of the logits
      (``log_softmax_backward``, B·T·V) while the saved log-probabilities (part of ``A``) are alive.
      The end of the forward pass, ``R + A + Λ`` (logits and log-probabilities together), is lower.
    * **MLP and attention backward of the last block** — the first block the backward reaches, where
      nearly all activations are still alive: the loss and the final norm have freed their saved
      tensors and written their gradients; the MLP's backward holds the gradient of the
      down-projection's input (B·T·d_ff; SwiGLU two more); explicit attention holds ``∂P`` and the
      softmax's input gradient, two ``B·h·T²`` tensors, besides the saved probabilities. (Later
      blocks hold less: fewer activations remain.)
    * **optimizer step** — parameters + gradients + Adam state + the update's temporaries: the
      for-loop Adam (``torch.optim.Adam`` on CPU) computes ``denom = exp_avg_sq.sqrt() / c + eps``
      per parameter, so the square root and the quotient of one parameter coexist with the previous
      parameter's ``denom``; ``foreach`` (the CUDA default) computes all square roots at once (one
      more copy of every parameter); ``fused`` none.

    Args:
        config: the model's shape.
        batch_size, seq_len: the micro-batch (``B``, ``T``).
        policy: a :class:`PrecisionPolicy` or the name of one; the peak model is validated for
            ``"fp32"`` (weights, gradients, Adam in fp32) — other policies scale the same terms.
        activation_dtype_bytes: bytes per element of activations and logits.
        device: "cpu" (exact sizes, for-loop Adam, 0-d ``step`` tensors on the device) or "cuda"
            (every block rounded up to 512 bytes, foreach Adam, ``step`` on the host).

    Returns:
        ``{"first_step": {...}, "steady": {...}}``, each with ``peak`` (bytes), ``phase``
        ("backward" or "optimizer"), and ``candidates`` (bytes at each moment listed above).
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("activation_dtype_bytes", activation_dtype_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    policy = _policy(policy)
    align = 512 if device == "cuda" else 1
    B, T, dt, c = batch_size, seq_len, activation_dtype_bytes, config
    with torch.device("meta"):
        model = Transformer(config)
    numels = [p.numel() for p in model.parameters()]
    per = {k: getattr(policy, k) for k in ("weights", "grads", "master", "optimizer")}

    def sized(numel, bpp):
        return _aligned(int(math.ceil(numel * bpp)), align)
    weights = sum(sized(n, per["weights"] + per["master"]) for n in numels)
    grads = sum(sized(n, per["grads"]) for n in numels)
    state = sum(2 * sized(n, per["optimizer"] / 2) for n in numels) if per["optimizer"] else 0
    if per["optimizer"] and device == "cpu":
        state += 4 * len(numels)                          # Adam's 0-d fp32 `step`, one per parameter
    batch = 2 * _aligned(8 * B * T, align)                # int64 tokens and targets
    acts = activation_bytes(c, B, T, dt)
    logits = _aligned(B * T * c.vocab_size * dt, align)

    # optimizer temporaries (fp32 per element of the update)
    temp_sizes = [_aligned(4 * n, align) for n in numels]
    impl = "foreach" if device == "cuda" else "for-loop"
    if not per["optimizer"]:
        adam_temps = 0
    elif impl == "foreach":
        adam_temps = sum(temp_sizes)
    else:
        adam_temps = max((temp_sizes[i - 1] if i else 0) + 2 * temp_sizes[i] for i in range(len(temp_sizes)))

    # the last block's attention backward
    parts = _block_saved_parts(c, B, T, dt)
    final_norm = parts["norm2"]
    d = c.d_model
    block_params = model.blocks[-1]
    grads_before_attention = (sized(model.head.weight.numel(), per["grads"])
                              + sum(sized(p.numel(), per["grads"]) for p in model.norm.parameters())
                              + sum(sized(p.numel(), per["grads"]) for p in block_params.mlp.parameters())
                              + sum(sized(p.numel(), per["grads"]) for p in block_params.norm2.parameters())
                              + sum(sized(p.numel(), per["grads"]) for p in block_params.attn.proj.parameters()))
    freed_before_attention = (B * T * c.vocab_size * dt + final_norm + parts["norm2"] + parts["mlp"]
                              + parts["attention_out"])
    residual_grad = B * T * d * dt
    grads_before_mlp = (sized(model.head.weight.numel(), per["grads"])
                        + sum(sized(p.numel(), per["grads"]) for p in model.norm.parameters())
                        + sum(sized(p.numel(), per["grads"]) for p in block_params.mlp.down.parameters()))
    # ∂(down's input); SwiGLU's product backward then writes ∂gate and ∂up while it is alive
    mlp_transient = (2 if c.mlp == "swiglu" else 1) * B * T * c.d_ff * dt
    if c.attention == "math":
        attention_transient = 2 * B * c.n_heads * T * T * dt + B * T * d * dt   # ∂P, ∂S; ∂V
    else:
        attention_transient = 2 * B * T * (d + 2 * c.kv_heads * c.head_dim) * dt  # ∂q,∂k,∂v and their cat
    out = {}
    for step, resident_state in (("first_step", 0), ("steady", state)):
        resident = weights + batch + resident_state
        candidates = {
            "backward start": resident + acts + 2 * logits,
            "MLP backward": resident + acts - B * T * c.vocab_size * dt - final_norm + grads_before_mlp
                            + residual_grad + mlp_transient,
            "attention backward": resident + acts - freed_before_attention + grads_before_attention
                                  + residual_grad + attention_transient,
            "optimizer step": weights + batch + grads + state + adam_temps,
        }
        where = max(candidates, key=candidates.get)
        out[step] = {"peak": candidates[where], "candidates": candidates,
                     "phase": "optimizer" if where == "optimizer step" else "backward"}
    return out


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
    graphs — and hence activation sets — that were alive together: 1 for correct accumulation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("alive", torch.zeros((), dtype=torch.long))
        self.register_buffer("max_alive", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        out = self.model(x)
        if out.requires_grad:
            self.alive += 1
            self.max_alive.copy_(torch.maximum(self.max_alive, self.alive))
            out.register_hook(self._backward_reached)
        return out

    def _backward_reached(self, grad):
        self.alive -= 1


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
          allocated raises ``ValueError``.

    Returns:
        ``(addresses, free_blocks)``: ``{name: address}`` of every malloc performed (a name may be
        reused after its free: the latest address wins), and the final free blocks as a list of
        ``(address, size)`` tuples sorted by address.
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


# --------------------------------------------------------------------------------------------------
# Mixed precision: fp16 loss scaling
# --------------------------------------------------------------------------------------------------

@dataclass
class DynamicLossScaler:
    """fp16 loss scaling (the algorithm of ``torch.amp.GradScaler``): multiply the loss by ``scale``
    before backward so small gradients do not flush to zero in fp16 (smallest subnormal 6e-8); unscale
    before the step; on inf/NaN skip the step and halve the scale; after ``growth_interval`` clean steps
    double it. bf16 has fp32's exponent range and needs none of this."""
    scale: float = 2.0 ** 16
    growth_interval: int = 2000
    clean_steps: int = 0
    skipped: int = field(default=0)

    def unscale_and_check(self, grads) -> bool:
        """Divide ``grads`` in place by the scale; True when all are finite (the step may proceed)."""
        finite = True
        for g in grads:
            if g is None:
                continue
            g.div_(self.scale)
            finite &= bool(torch.isfinite(g).all())
        if not finite:
            self.scale /= 2
            self.clean_steps, self.skipped = 0, self.skipped + 1
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale, self.clean_steps = self.scale * 2, 0
        return finite

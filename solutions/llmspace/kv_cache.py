"""The KV cache: the memory that dominates serving.

Generating token t attends over the keys and values of tokens 0..t-1; recomputing them every step
would cost a full forward pass over the prefix, so every serving stack keeps them. Per token and per
layer the cache holds one key and one value vector per *key-value* head:

    bytes = 2 (K and V) x n_layers x n_kv_heads x head_dim x seq_len x batch x bytes per element

Grouped-query attention (GQA, Ainslie et al. 2023) shares each key-value head among several query
heads and divides this by ``n_heads / n_kv_heads``; multi-query attention (MQA, Shazeer 2019) is the
extreme of one key-value head. Llama-2-70B (80 layers, 8 KV heads of 128) holds
2 x 80 x 8 x 128 x 2 B = 320 KiB per token in fp16; SmolLM2-135M (30 layers, 3 KV heads of 64)
holds 22.5 KiB.
"""
from __future__ import annotations

__all__ = ["kv_cache_bytes", "kv_dims", "paged_kv_gather", "PagedKVCache", "KVCacheFull", "paged_attention", "simulate_kv_serving",
           "fake_quantize_kv", "quantized_kv_bytes_per_token", "KVQuantizedLM", "request_trace"]


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def kv_dims(config) -> tuple[int, int, int]:
    """``(n_layers, n_kv_heads, head_dim)`` of a transformers Llama-style config or a
    :class:`llmspace.memory.TransformerConfig`.

    transformers: ``num_hidden_layers``, ``num_key_value_heads`` (absent or ``None``: multi-head,
    = ``num_attention_heads``), ``head_dim`` (absent or ``None``: ``hidden_size // num_attention_heads``).
    llmspace: ``n_layers``, ``kv_heads``/``n_kv_heads``, ``d_model // n_heads``.
    """
    if hasattr(config, "num_hidden_layers"):
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    elif hasattr(config, "n_layers") and hasattr(config, "d_model"):
        layers, heads = config.n_layers, config.n_heads
        kv = getattr(config, "n_kv_heads", None) or heads
        head_dim = config.d_model // heads
    else:
        raise TypeError(f"config must be a transformers config (num_hidden_layers, num_attention_heads, ...) "
                        f"or an llmspace TransformerConfig, got {type(config).__name__}")
    return _positive_int("n_layers", layers), _positive_int("n_kv_heads", kv), _positive_int("head_dim", head_dim)


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype_bytes: float = 2) -> int:
    """Bytes of the keys and values a decoder keeps for ``batch_size`` sequences of ``seq_len`` tokens.

    Args:
        config: a transformers Llama-style config (GQA/MQA through ``num_key_value_heads``) or an
            :class:`llmspace.memory.TransformerConfig` (``n_kv_heads``).
        batch_size, seq_len: positive ints (tokens cached per sequence, prompt and generated).
        dtype_bytes: bytes per cached element: 4 fp32, 2 fp16/bf16, 1 int8/fp8, 0.5 int4 (quantized
            caches also store scales: count those separately).

    Returns ``2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * dtype_bytes`` as an int
    (rounded up for fractional ``dtype_bytes``). Raises ``ValueError`` for a non-positive size and
    ``TypeError`` for an unknown config.
    """
    layers, kv, head_dim = kv_dims(config)
    _positive_int("batch_size", batch_size)
    _positive_int("seq_len", seq_len)
    if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, (int, float)) or not dtype_bytes > 0:
        raise ValueError(f"dtype_bytes must be a positive number, got {dtype_bytes!r}")
    elements = 2 * layers * kv * head_dim * seq_len * batch_size
    return int(-(-elements * dtype_bytes // 1))


# --------------------------------------------------------------------------------------------------
# Paged KV cache (vLLM's PagedAttention memory layout, Kwon et al. 2023)
# --------------------------------------------------------------------------------------------------

import torch  # noqa: E402  (kept below the byte formula, which needs no torch)


def paged_kv_gather(k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's keys and values out of a paged KV cache, in token order.

    A paged KV cache (vLLM's PagedAttention, Kwon et al. 2023) keeps the keys and values of all
    sequences in one pool of fixed-size *physical* blocks of ``block_size`` tokens. A sequence owns a
    **block table**: its *logical* block ``i`` (tokens ``i * block_size`` to ``(i + 1) * block_size - 1``)
    lives in physical block ``block_table[i]``, wherever that block sits in the pool. So token ``t`` is
    in block ``block_table[t // block_size]`` at slot ``t % block_size``. Only the sequence's last
    block may be partly filled; its remaining slots, and every block not in the table, hold other
    data (other sequences, stale values) and must not be read into the result.

    Args:
        k_pool, v_pool: the key and value pools of one layer, tensors of shape
            ``(n_blocks, block_size, n_kv_heads, head_dim)``, the same shape and the same (any) dtype.
        block_table: 1-D ``torch.int64`` or ``torch.int32`` tensor of physical block numbers, each in
            ``[0, n_blocks)``. Entries need not be sorted or consecutive. The table may hold more blocks
            than ``seq_len`` needs (spare blocks at its end are not read), but every entry must be valid.
        seq_len: int, the number of cached tokens of the sequence,
            ``0 <= seq_len <= len(block_table) * block_size``.

    Returns:
        ``(keys, values)``: two tensors of shape ``(seq_len, n_kv_heads, head_dim)`` with the pools'
        dtype (values copied exactly, no conversion); row ``t`` is token ``t``. ``seq_len = 0`` gives
        two empty ``(0, n_kv_heads, head_dim)`` tensors. The pools and the block table are not modified.

    Raises:
        TypeError: if ``k_pool`` or ``v_pool`` is not a tensor, or ``block_table`` is not an int32 or
            int64 tensor.
        ValueError: if ``k_pool`` is not 4-D, ``v_pool`` differs from it in shape or dtype,
            ``block_table`` is not 1-D, an entry of ``block_table`` is outside ``[0, n_blocks)``
            (negative entries included: they must not wrap around), or ``seq_len`` is negative or
            more than ``len(block_table) * block_size``.
    """
    if not isinstance(k_pool, torch.Tensor) or not isinstance(v_pool, torch.Tensor):
        raise TypeError(f"k_pool and v_pool must be tensors, got {type(k_pool).__name__} and "
                        f"{type(v_pool).__name__}")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"k_pool and v_pool must both be (n_blocks, block_size, n_kv_heads, head_dim) of one "
                         f"dtype, got {tuple(k_pool.shape)} {k_pool.dtype} and {tuple(v_pool.shape)} {v_pool.dtype}")
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table must be an int32 or int64 tensor, got "
                        f"{getattr(block_table, 'dtype', type(block_table).__name__)}")
    if block_table.dim() != 1:
        raise ValueError(f"block_table must be 1-D, got shape {tuple(block_table.shape)}")
    n_blocks, block_size = k_pool.shape[0], k_pool.shape[1]
    ### BEGIN SOLUTION
    if seq_len < 0 or seq_len > len(block_table) * block_size:
        raise ValueError(f"seq_len must be in [0, {len(block_table) * block_size}] ({len(block_table)} blocks "
                         f"of {block_size} tokens), got {seq_len}")
    if len(block_table) and (block_table.min() < 0 or block_table.max() >= n_blocks):
        raise ValueError(f"block_table entries must be block numbers in [0, {n_blocks}), got "
                         f"{block_table.min().item()}..{block_table.max().item()}")
    tokens = torch.arange(seq_len)
    blocks = block_table[tokens // block_size]          # physical block of each token
    slots = tokens % block_size                          # its slot inside that block
    return k_pool[blocks, slots], v_pool[blocks, slots]
    ### END SOLUTION


class KVCacheFull(RuntimeError):
    """No free block is left: a server would preempt or queue a sequence here."""


class PagedKVCache:
    """Keys and values in fixed-size blocks, found through a per-sequence block table.

    A contiguous cache must reserve, per sequence, room for the longest length it may reach, because it
    cannot grow in place; most of that room is never used. A paged cache keeps one pool of physical
    blocks of ``block_size`` tokens; a sequence owns a list of block numbers (its block table) and takes
    a new block only when its last one is full, so at most ``block_size - 1`` slots per sequence are
    wasted, and a finished sequence returns its blocks to the pool at once. This is the same idea as the
    caching allocator of this chapter (fixed-size pieces from a pool instead of one exact-size
    allocation per request), applied to the one tensor of a server that grows token by token.

    Storage: ``keys``/``values`` of shape ``(n_layers, n_blocks, block_size, n_kv_heads, head_dim)``.
    Token ``t`` of a sequence lives in block ``table[t // block_size]``, slot ``t % block_size``
    (:func:`paged_kv_gather` reads a sequence back through its table).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, block_size: int, n_blocks: int,
                 dtype: torch.dtype = torch.float32):
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                            ("block_size", block_size), ("n_blocks", n_blocks)):
            _positive_int(name, value)
        shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.block_size, self.n_blocks = block_size, n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))      # a stack: the lowest block number first
        self.block_tables: dict = {}
        self.lengths: dict = {}

    # ---- bookkeeping -----------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across layers, keys and values."""
        per = self.keys[:, 0].numel() * self.keys.element_size()
        return 2 * per

    def bytes_in_use(self) -> int:
        """Bytes of the blocks owned by sequences (what a paged server has allocated)."""
        return sum(len(t) for t in self.block_tables.values()) * self.bytes_per_block

    def bytes_of_tokens(self) -> int:
        """Bytes the cached tokens need (``kv_cache_bytes`` of the live sequences)."""
        return sum(self.lengths.values()) * self.bytes_per_block // self.block_size

    def blocks_needed(self, length: int) -> int:
        return -(-length // self.block_size)

    # ---- sequences ---------------------------------------------------------------------------------
    def append(self, seq_id, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cache ``T`` new tokens of ``seq_id`` (created on first use).

        ``keys``/``values``: ``(n_layers, T, n_kv_heads, head_dim)``. Takes blocks from the pool as the
        sequence crosses block boundaries; raises :class:`KVCacheFull` (caching nothing) when the pool
        cannot hold them, ``ValueError`` on a shape mismatch.
        """
        expected = (self.keys.shape[0], self.keys.shape[3], self.keys.shape[4])
        if keys.dim() != 4 or values.shape != keys.shape or (keys.shape[0], keys.shape[2], keys.shape[3]) != expected:
            raise ValueError(f"keys and values must both be (n_layers, T, n_kv_heads, head_dim) with "
                             f"(n_layers, n_kv_heads, head_dim) = {expected}, got {tuple(keys.shape)} and "
                             f"{tuple(values.shape)}")
        table = self.block_tables.get(seq_id, [])
        length = self.lengths.get(seq_id, 0)
        new_length = length + keys.shape[1]
        extra = self.blocks_needed(new_length) - len(table)
        if extra > len(self._free):
            raise KVCacheFull(f"sequence {seq_id!r} needs {extra} more blocks, {len(self._free)} free")
        table = table + [self._free.pop() for _ in range(extra)]
        positions = torch.arange(length, new_length)
        blocks = torch.tensor(table)[positions // self.block_size]
        slots = positions % self.block_size
        self.keys[:, blocks, slots] = keys.to(self.keys.dtype)
        self.values[:, blocks, slots] = values.to(self.values.dtype)
        self.block_tables[seq_id], self.lengths[seq_id] = table, new_length

    def gather(self, seq_id, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``seq_id`` at ``layer`` in token order → two ``(T, n_kv_heads, head_dim)``."""
        if seq_id not in self.block_tables:
            raise KeyError(f"unknown sequence {seq_id!r}")
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.int64)
        return paged_kv_gather(self.keys[layer], self.values[layer], table, self.lengths[seq_id])

    def free(self, seq_id) -> None:
        """Return the blocks of a finished sequence to the pool."""
        self._free.extend(reversed(self.block_tables.pop(seq_id)))
        del self.lengths[seq_id]


def paged_attention(q: torch.Tensor, cache: PagedKVCache, seq_id, layer: int) -> torch.Tensor:
    """Causal-free decode attention of the newest query over a sequence's cached keys and values.

    ``q``: ``(n_heads, head_dim)`` for one new token; returns ``(n_heads, head_dim)``. Query head ``h``
    reads key-value head ``h // (n_heads // n_kv_heads)`` (grouped-query attention). A real kernel
    reads the blocks in place; here they are gathered first, which computes the same numbers.
    """
    k, v = cache.gather(seq_id, layer)                   # (T, kv, d)
    n_heads, kv = q.shape[0], k.shape[1]
    if n_heads % kv:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({kv})")
    k = k.repeat_interleave(n_heads // kv, dim=1).transpose(0, 1)   # (H, T, d)
    v = v.repeat_interleave(n_heads // kv, dim=1).transpose(0, 1)
    scores = (k.float() @ q.float()[:, :, None]).squeeze(-1) / q.shape[-1] ** 0.5   # (H, T)
    return (scores.softmax(-1)[:, None, :] @ v.float()).squeeze(1).to(q.dtype)


def simulate_kv_serving(requests, *, block_size: int, max_len: int, token_bytes: int) -> dict:
    """Replay a trace of requests under contiguous preallocation and under paging; bytes over time.

    Args:
        requests: iterable of ``(arrival_step, prompt_len, output_len)``; a request holds
            ``prompt_len`` tokens when admitted and one more each step until ``prompt_len + output_len``,
            then leaves. Every request is admitted on arrival (no memory limit: this measures demand).
        block_size: tokens per block of the paged cache.
        max_len: tokens a contiguous cache reserves per sequence (the server's maximum length; a
            sequence must fit: ``prompt_len + output_len <= max_len``).
        token_bytes: cache bytes per token (``kv_cache_bytes(config, 1, 1, dtype_bytes)``).

    Returns per-step lists ``used`` (bytes the cached tokens need), ``paged`` (bytes of allocated
    blocks), ``contiguous`` (bytes reserved at ``max_len``) and ``contiguous_exact`` (bytes reserved
    for each request's final length, as if the server knew it: the best a contiguous cache can do),
    their peaks (``peak_<name>``), and the utilisation ``peak used / peak reserved`` of each policy
    (``<name>_utilisation``).
    """
    reqs = sorted(requests)
    for arrival, prompt, output in reqs:
        if prompt < 1 or output < 0 or arrival < 0:
            raise ValueError(f"bad request {(arrival, prompt, output)}")
        if prompt + output > max_len:
            raise ValueError(f"request of {prompt + output} tokens exceeds max_len={max_len}")
    end = max((a + o + 1 for a, _, o in reqs), default=0)
    series = {"used": [], "paged": [], "contiguous": [], "contiguous_exact": []}
    for step in range(end):
        live = [(prompt + step - arrival, prompt + output) for arrival, prompt, output in reqs
                if arrival <= step < arrival + output + 1]
        series["used"].append(sum(n for n, _ in live) * token_bytes)
        series["paged"].append(sum(-(-n // block_size) for n, _ in live) * block_size * token_bytes)
        series["contiguous"].append(len(live) * max_len * token_bytes)
        series["contiguous_exact"].append(sum(final for _, final in live) * token_bytes)
    out = dict(series)
    for name, values in series.items():
        out[f"peak_{name}"] = max(values, default=0)
    for name in ("paged", "contiguous", "contiguous_exact"):
        out[f"{name}_utilisation"] = out["peak_used"] / out[f"peak_{name}"] if out[f"peak_{name}"] else 1.0
    return out


# --------------------------------------------------------------------------------------------------
# KV-cache quantization (simulated: quantize, then dequantize before attention reads the cache)
# --------------------------------------------------------------------------------------------------

def fake_quantize_kv(x: torch.Tensor, bits: int, axis: str, group_size: int | None = None) -> torch.Tensor:
    """Affine min–max round trip of cached keys or values ``(B, n_kv_heads, T, head_dim)``.

    ``axis="token"``: one (scale, zero point) per token and head, over its ``head_dim`` channels
    (values are usually quantized so). ``axis="channel"``: one per channel and head over groups of
    ``group_size`` consecutive tokens (default: all ``T``), which is how KIVI (Liu et al. 2024) quantizes
    *keys*: a few key channels carry much larger magnitudes than the rest (RoPE rotates pairs of
    channels at fixed frequencies), and per-token scales would be set by those channels. Uses
    :func:`llmspace.quant.quantize_per_group` and returns ``x``'s dtype and shape.
    """
    from llmspace.quant import dequantize_per_group, quantize_per_group
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, n_kv_heads, seq_len, head_dim), got {tuple(x.shape)}")
    if axis == "token":
        q, scale, zp = quantize_per_group(x.float(), bits, x.shape[-1])
        return dequantize_per_group(q, scale, zp).to(x.dtype)
    if axis == "channel":
        xt = x.float().transpose(-1, -2)                    # (B, H, d, T): groups along tokens
        group = group_size or xt.shape[-1]
        if xt.shape[-1] % group:
            raise ValueError(f"group_size {group} must divide seq_len {xt.shape[-1]}")
        q, scale, zp = quantize_per_group(xt, bits, group)
        return dequantize_per_group(q, scale, zp).transpose(-1, -2).to(x.dtype)
    raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")


def quantized_kv_bytes_per_token(config, bits: int, *, key_axis: str = "token", value_axis: str = "token",
                                 group_tokens: int = 128, param_bytes: int = 2) -> float:
    """Cache bytes per token for ``bits``-bit keys and values with fp16 (``param_bytes``) scale and zero
    point per group: per-token groups span ``head_dim`` channels, per-channel groups ``group_tokens``
    tokens (their parameters amortised over those tokens)."""
    layers, kv, head_dim = kv_dims(config)

    def per_head(axis):
        params = 2 * param_bytes * (1 if axis == "token" else head_dim / group_tokens)
        return head_dim * bits / 8 + params
    return layers * kv * (per_head(key_axis) + per_head(value_axis))


class KVQuantizedLM(torch.nn.Module):
    """A transformers causal LM whose KV cache is quantized: every key and value the attention reads has
    been through :func:`fake_quantize_kv`. ``forward(input_ids)`` returns logits ``(B, T, V)``.

    A real quantized cache stores the integers; the numbers attention computes with are the same.
    ``key``/``value``: ``(bits, axis)`` or ``None`` for full precision.
    """

    def __init__(self, model, key: tuple | None, value: tuple | None, group_size: int | None = None):
        super().__init__()
        self.model, self.key, self.value, self.group_size = model, key, value, group_size

    def _cache(self):
        from transformers import DynamicCache
        outer = self

        class _FakeQuantCache(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                if outer.key is not None:
                    key_states = fake_quantize_kv(key_states, *outer.key, group_size=outer.group_size)
                if outer.value is not None:
                    value_states = fake_quantize_kv(value_states, *outer.value, group_size=outer.group_size)
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return _FakeQuantCache()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, cache=self._cache(), use_cache=True).logits



def request_trace(n_requests: int, *, seed: int, max_len: int = 2048, mean_gap: float = 4.0,
                  prompt_median: int = 256, output_median: int = 128) -> list[tuple[int, int, int]]:
    """A synthetic serving trace: ``(arrival_step, prompt_len, output_len)`` per request.

    Arrivals are a Poisson process (exponential gaps of mean ``mean_gap`` decode steps); prompt and
    output lengths are log-normal (sigma 1, the heavy right tail of chat traffic) around the given
    medians, clipped so that every request fits in ``max_len``. Deterministic for a ``seed`` (numpy
    PCG64). A stand-in for a production trace: the *shape* (many short requests, a few long ones) is
    what decides how much contiguous preallocation wastes.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    arrivals = np.floor(np.cumsum(rng.exponential(mean_gap, n_requests))).astype(int)
    prompts = np.clip(np.round(rng.lognormal(np.log(prompt_median), 1.0, n_requests)), 1, max_len // 2).astype(int)
    outputs = np.clip(np.round(rng.lognormal(np.log(output_median), 1.0, n_requests)), 1, None).astype(int)
    outputs = np.minimum(outputs, max_len - prompts)
    return [(int(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]

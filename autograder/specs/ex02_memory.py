"""ex02_memory — chapter 2, memory strategies."""
from autograder.specs import Assignment, Markdown, Task

ASSIGNMENT = Assignment(
    name="ex02_memory",
    module="llmspace.memory",
    title="Exercise 2 — Memory strategies",
    cells=[
        Markdown("""\
# Exercise 2 — Memory strategies

Companion to chapter 2 of the llmspace book. You will write the pieces of a training-memory budget and
two of the techniques that shrink it: the per-rank bytes of model states under ZeRO, the bytes one
transformer block saves for backward, gradient accumulation, the free list of a caching allocator, a
ZeRO-1 optimizer step, and — at serving time — reading a sequence out of a paged KV cache.

**How this works.** Each task is a function whose signature and docstring are the specification. Replace
`raise NotImplementedError()` with your code. The cell after each function runs its checks against
independent references — PyTorch's autograd (what it really saves), `torch.optim.Adam`, the ZeRO paper's
numbers — on visible cases, and the grader adds hidden ones. Check your work with

    python -m autograder check ex02_memory.ipynb

`TransformerConfig`, `Transformer`, `PrecisionPolicy` and `PRECISION_POLICIES` come from `llmspace.memory`
(imported below); read their docstrings with `help(...)`.
"""),
        Markdown("""\
## Task 1: bytes of model states per rank

A `PrecisionPolicy` gives the bytes per parameter of each copy a step keeps: `weights`, `grads`,
`master` (fp32 master weights under mixed precision) and `optimizer` (Adam: two fp32 moments = 8).
ZeRO stage 1 shards the optimizer state *and* the master weights over `world_size` ranks, stage 2 also
the gradients, stage 3 also the weights. A sharded copy holds `ceil(n_params / world_size)` elements on
every rank (the last shard is padded). Check yourself on the ZeRO paper's example: 7.5B parameters,
64 GPUs, mixed precision (2 + 2 + 12 bytes) → 120 GB, 31.4 GB, 16.6 GB and 1.88 GB per GPU.
"""),
        Task("model_state_bytes", points=2),
        Markdown("""\
## Task 2: activation bytes of one transformer block

Count what autograd *keeps* for the backward pass of one `Block` of `Transformer` — not every tensor the
forward creates. The docstring lists what each op saves; the check measures the real thing with
`torch.autograd.graph.saved_tensors_hooks`. Hints: q, k and v are views of a single qkv output (one
storage); `F.scaled_dot_product_attention` on CPU saves one fp32 log-sum-exp per (batch, head, row)
instead of the `T × T` attention matrix; the residual additions save nothing.
"""),
        Task("block_activation_bytes", points=3),
        Markdown("""\
## Task 3: gradient accumulation

Accumulation does **not** reduce memory by increasing the batch size (the source article has it
backwards): it reaches a large *effective* batch while only one micro-batch's activations are alive at a
time. Each micro-batch loss is a mean over `B / n` examples, so divide it by `n` before `backward()`,
and call `backward()` on every micro-batch before the next forward pass.
"""),
        Task("accumulate_gradients", points=2),
        Markdown("""\
## Task 4: a free list with splitting and coalescing

Inside one segment of a caching allocator, requests are rounded up to 512 bytes and served best-fit
from a free list. A block bigger than the request is split; a freed block merges with free neighbours,
or the segment ends up in pieces too small for the next large request (fragmentation).
"""),
        Task("replay_on_segment", points=3),
        Markdown("""\
## Task 5: a ZeRO-1 Adam step

Simulate `N` data-parallel ranks in one process: each rank has its own gradient (from its own
micro-batch) and owns a `1/N` shard of Adam's state. Reduce-scatter the *average* gradient, update each
shard with Adam (with bias correction), then all-gather the shards into the full parameter vector.
"""),
        Task("zero1_adam_step", points=3,
             forbids=('torch.optim.Adam', 'torch.optim.AdamW', 'torch.optim.adam', 'torch.optim._functional',
                      'torch.distributed.optim.ZeroRedundancyOptimizer')),
        Markdown("""\
## Task 6: reading a sequence out of a paged KV cache

A serving engine keeps the KV cache of all its sequences in one pool of fixed-size blocks (vLLM's
PagedAttention). A sequence does not own a contiguous range of the pool: it owns a *block table*, the
list of physical blocks that hold its logical blocks 0, 1, 2, ... in order, wherever they are. Token `t`
lives in block `block_table[t // block_size]` at slot `t % block_size`, and only the last block may be
partly filled. Gather one sequence's keys and values back into token order — what an attention kernel
does through the table before (or while) it computes scores. Fragmentation is what this layout buys
away: a sequence wastes at most the unused slots of its last block. Blocks not in the table, and the
unused slots of the last block, hold other sequences' data: do not return them, and do not modify the
pools. `PagedKVCache.gather` in `llmspace.kv_cache` calls this function.
"""),
        Task("paged_kv_gather", points=2, module="llmspace.kv_cache"),
    ],
)

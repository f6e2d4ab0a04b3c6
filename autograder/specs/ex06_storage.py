"""ex06_storage — chapter 6, storage I/O."""
from autograder.specs import Assignment, Markdown, Task

ASSIGNMENT = Assignment(
    name="ex06_storage",
    module="llmspace.storage",
    title="Exercise 6 — Storage I/O",
    cells=[
        Markdown("""\
# Exercise 6 — Storage I/O

Companion to chapter 6 of the llmspace book. You will read the safetensors format from its bytes —
defensively, because a checkpoint is input from the internet — split a state dict into shards with
the index file transformers reads, and replay a layer-access trace through an LRU cache.

**How this works.** Each task is a function whose signature and docstring are the specification. Replace
`raise NotImplementedError()` with your code. The cell after each function runs its checks: the visible
cases print their inputs when they fail; the grader also runs hidden cases (malformed files, edge
cases, bad input). Check your work before submitting with

    python -m autograder check ex06_storage.ipynb

Given (imported below): `DTYPE_BITS` (every safetensors dtype name → bits per element, FP8 and the
sub-byte FP4/FP6 included), `MAX_HEADER_BYTES`, and two helpers — `_parse_header_json`, which decodes
the header by the reference parser's JSON rules (no `NaN`, no lone surrogates, no 128-deep nesting, no
duplicate keys: Python's `json.loads` accepts all four), and `_torch_dtype`, the torch dtype of a name.
The reference every check compares with is the `safetensors` library itself.
"""),
        Markdown("""\
## Task 1: parse a safetensors header

A safetensors file is `N` (8 bytes, unsigned, **little-endian**), then `N` bytes of UTF-8 JSON, then the
data. Parse it, and **trust nothing**: a file from the internet may lie about every number. Check the
header length against the file size *before* slicing (a 4 GB length must cost nothing), then every
tensor's dtype, shape, byte count and bounds, and finally that the byte ranges tile the data section
exactly — sort them by `(begin, end)` and walk through them. Sizes are 64-bit in the reference: a shape
like `[2**64, 0]` has zero elements but is still invalid, and the element count must not pass 2**64 on
the way. Raise `ValueError` (or a subclass) with a message that names the problem. `int.from_bytes` and
`_parse_header_json` are all you need.
"""),
        Task("parse_safetensors_header", points=4, module="llmspace.storage.format",
             forbids=('safetensors',)),
        Markdown("""\
## Task 2: read one tensor by its offsets

With the header parsed, a tensor is a slice of the file: `buf[data_start + begin : data_start + end]`.
`torch.frombuffer` reinterprets bytes as a dtype — but on read-only `bytes` it warns and would share
the caller's memory, so copy the slice into a `bytearray` first; and it rejects an empty buffer, so
handle zero-element tensors. Use your `parse_safetensors_header`.
"""),
        Task("read_tensor", points=2, module="llmspace.storage.format",
             forbids=('safetensors',)),
        Markdown("""\
## Task 3: shard a state dict under a size limit

Large checkpoints are split into files of at most a few GB (5 GB is the Hugging Face default) plus a
`model.safetensors.index.json` whose `weight_map` says which file holds each tensor. Walk the state dict
in order, measuring tensors in **bytes** (`numel() * element_size()`); close the current shard when
the next tensor would push it past the limit; a tensor larger than the limit gets a shard of its own.
"""),
        Task("shard_state_dict", points=3, module="llmspace.storage.sharding",
             forbids=('huggingface_hub', 'transformers.modeling_utils')),
        Markdown("""\
## Task 4: an LRU layer cache

Offloaded inference keeps a few layers in fast memory and fetches the rest. Replay a trace of layer
accesses through a least-recently-used cache bounded in **bytes** and count hits, misses, bytes loaded
and evictions. `collections.OrderedDict` (`move_to_end`, `popitem(last=False)`) is the classic tool.
Then look at the numbers for a cyclic scan (`[0, 1, 2] * 3` with room for two layers): that is what
every forward pass does, and it is why offloading relies on prefetching rather than on the cache.
"""),
        Task("simulate_lru", points=2, module="llmspace.tiered"),
    ],
)

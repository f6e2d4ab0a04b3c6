"""Chapter 2 — a caching allocator, replayed on allocation traces recorded from real training steps.

A training step allocates and frees thousands of tensors, many of the same few sizes, every step. Asking
the system (``cudaMalloc``/``cudaFree``, or ``mmap``) each time is slow — on a GPU ``cudaFree``
synchronises the device — so PyTorch keeps freed memory in a cache and hands it out again. The cost is
memory that is *reserved* (held from the system) but not *allocated* (in a live tensor): fragmentation.

:class:`CachingAllocator` follows the design of PyTorch's CUDA caching allocator
(``c10/cuda/CUDACachingAllocator.cpp``):

* requests are rounded up to multiples of 512 bytes;
* two pools: *small* requests (≤ 1 MiB) are carved from 2 MiB segments; *large* ones from 20 MiB
  segments (requests < 10 MiB) or from a segment of their own rounded up to 2 MiB;
* best fit: the smallest cached free block that fits (lowest address on ties);
* a block larger than needed is split when the remainder is ≥ 512 bytes (small pool) or > 1 MiB
  (large pool); otherwise the whole block is handed out (internal fragmentation);
* ``free`` returns the block to its pool and *coalesces* it with free neighbours of the same segment;
* ``empty_cache`` returns segments that are entirely free to the system;
* when ``capacity`` would be exceeded, cached free segments are released and the request retried
  before an out-of-memory error.

Traces come from :func:`record_allocation_trace`: the ``torch.profiler`` memory events of a real step,
i.e. every allocation and free that PyTorch's CPU allocator served, with its address and size.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass


__all__ = ["CachingAllocator", "NoCacheAllocator", "replay", "replay_on_segment", "round_size",
           "record_allocation_trace", "trace_from_events", "KB", "MB"]

from llmspace.memory import MIN_BLOCK, replay_on_segment, round_size  # noqa: F401 (re-exported)

KB, MB = 1024, 1024 * 1024
SMALL_SIZE = 1 * MB             # requests up to this go to the small pool
SMALL_SEGMENT = 2 * MB          # segment size of the small pool
LARGE_SEGMENT = 20 * MB         # segment size for large requests below MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 * MB
ROUND_LARGE = 2 * MB            # large requests >= MIN_LARGE_ALLOC get their own segment of this multiple


@dataclass
class _Block:
    segment: int
    addr: int
    size: int
    allocated: bool = False
    requested: int = 0


class CachingAllocator:
    """A simulated caching allocator (see the module docstring). Addresses are integers.

    ``malloc(nbytes) -> addr``, ``free(addr)``, ``empty_cache()``; :meth:`stats` reports bytes
    allocated and reserved (current and peak), system allocations and frees, and fragmentation."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.segments: dict[int, list[_Block]] = {}     # segment id -> blocks sorted by address
        self.pools = {"small": [], "large": []}           # sorted lists of (size, addr, segment) free
        self.blocks: dict[int, _Block] = {}               # addr -> block (allocated and free)
        self.segment_pool: dict[int, str] = {}
        self.next_address = 0
        self.allocated = self.reserved = self.requested = 0
        self.peak_allocated = self.peak_reserved = 0
        self.system_allocs = self.system_frees = self.mallocs = 0

    # ---- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _pool(size: int) -> str:
        return "small" if size <= SMALL_SIZE else "large"

    @staticmethod
    def _segment_size(size: int) -> int:
        if size <= SMALL_SIZE:
            return SMALL_SEGMENT
        if size < MIN_LARGE_ALLOC:
            return LARGE_SEGMENT
        return -(-size // ROUND_LARGE) * ROUND_LARGE

    def _new_segment(self, size: int) -> _Block:
        seg_size = self._segment_size(size)
        if self.capacity is not None and self.reserved + seg_size > self.capacity:
            self.empty_cache()                                  # release cached segments, retry
            if self.reserved + seg_size > self.capacity:
                raise MemoryError(f"out of memory: {seg_size} bytes requested, {self.reserved} reserved, "
                                  f"capacity {self.capacity}")
        seg = self.next_address
        self.next_address += seg_size + ROUND_LARGE             # a gap: segments never touch
        block = _Block(seg, seg, seg_size)
        self.segments[seg] = [block]
        self.segment_pool[seg] = self._pool(size)
        self.blocks[seg] = block
        self.reserved += seg_size
        self.system_allocs += 1
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _insert_free(self, block: _Block) -> None:
        bisect.insort(self.pools[self.segment_pool[block.segment]], (block.size, block.addr, block.segment))

    def _remove_free(self, block: _Block) -> None:
        pool = self.pools[self.segment_pool[block.segment]]
        pool.pop(bisect.bisect_left(pool, (block.size, block.addr, block.segment)))

    # ---- API -----------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int | None:
        """Allocate ``nbytes`` (rounded to 512); returns the block's address. ``nbytes == 0`` reserves
        and allocates nothing and returns None, the null pointer (PyTorch's CUDA allocator returns
        ``nullptr`` for an empty tensor); ``free(None)`` is a no-op."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if nbytes == 0:
            return None
        size = round_size(nbytes)
        pool = self.pools[self._pool(size)]
        i = bisect.bisect_left(pool, (size, -1, -1))            # best fit: smallest size >= request
        if i < len(pool):
            _, addr, _ = pool[i]
            block = self.blocks[addr]
            self._remove_free(block)
        else:
            block = self._new_segment(size)
        remaining = block.size - size
        small = self.segment_pool[block.segment] == "small"
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = _Block(block.segment, block.addr + size, remaining)
            blocks = self.segments[block.segment]
            blocks.insert(blocks.index(block) + 1, rest)
            self.blocks[rest.addr] = rest
            self._insert_free(rest)
            block.size = size
        block.allocated, block.requested = True, nbytes
        self.allocated += block.size
        self.requested += nbytes
        self.mallocs += 1
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block.addr

    def free(self, addr: int) -> None:
        """Return the block at ``addr`` to the cache, merged with free neighbours in its segment.
        ``free(None)`` (the null pointer of a 0-byte malloc) does nothing."""
        if addr is None:
            return
        block = self.blocks.get(addr)
        if block is None or not block.allocated:
            raise ValueError(f"free of address {addr}, which is not allocated")
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        blocks = self.segments[block.segment]
        i = blocks.index(block)
        for j in (i + 1, i - 1):                                # next first, so index i stays valid
            if 0 <= j < len(blocks) and not blocks[j].allocated:
                other = blocks[j]
                self._remove_free(other)
                del self.blocks[other.addr]
                blocks.remove(other)
                if other.addr < block.addr:
                    del self.blocks[block.addr]
                    block.addr = other.addr
                    self.blocks[block.addr] = block
                block.size += other.size
        self._insert_free(block)

    def empty_cache(self) -> None:
        """Release every segment that is a single free block (``torch.cuda.empty_cache``)."""
        for seg, blocks in list(self.segments.items()):
            if len(blocks) == 1 and not blocks[0].allocated:
                self._remove_free(blocks[0])
                del self.blocks[blocks[0].addr], self.segments[seg], self.segment_pool[seg]
                self.reserved -= blocks[0].size
                self.system_frees += 1

    def stats(self) -> dict:
        """Bytes and counts: ``allocated`` (in live blocks, rounded), ``requested`` (asked for),
        ``reserved`` (held from the system), their peaks, ``system_allocs``/``system_frees``,
        ``mallocs``, and ``fragmentation = 1 - allocated / reserved`` (0 when nothing is reserved)."""
        return {"allocated": self.allocated, "requested": self.requested, "reserved": self.reserved,
                "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "system_allocs": self.system_allocs, "system_frees": self.system_frees,
                "mallocs": self.mallocs,
                "fragmentation": 1 - self.allocated / self.reserved if self.reserved else 0.0}


class NoCacheAllocator:
    """The baseline: every malloc is a system allocation of exactly the request, every free a system free."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.next_address = self.allocated = self.peak_allocated = 0
        self.system_allocs = self.system_frees = self.mallocs = 0

    def malloc(self, nbytes: int) -> int | None:
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        if nbytes == 0:
            return None                        # no system call for an empty allocation
        addr = self.next_address
        self.next_address += max(nbytes, 1)
        self.live[addr] = nbytes
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.system_allocs += 1
        self.mallocs += 1
        return addr

    def free(self, addr: int) -> None:
        if addr is None:
            return
        if addr not in self.live:
            raise ValueError(f"free of address {addr}, which is not allocated")
        self.allocated -= self.live.pop(addr)
        self.system_frees += 1

    def empty_cache(self) -> None:
        pass

    def stats(self) -> dict:
        return {"allocated": self.allocated, "requested": self.allocated, "reserved": self.allocated,
                "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_allocated,
                "system_allocs": self.system_allocs, "system_frees": self.system_frees,
                "mallocs": self.mallocs, "fragmentation": 0.0}


def replay(trace: list, allocator) -> dict:
    """Replay ``trace`` — ``("malloc", id, nbytes)`` / ``("free", id)`` tuples — on ``allocator`` and
    return its :meth:`stats` plus ``timeline``: (allocated, reserved) after every event."""
    addresses, timeline = {}, []
    for op in trace:
        if op[0] == "malloc":
            addresses[op[1]] = allocator.malloc(op[2])
        else:
            allocator.free(addresses.pop(op[1]))
        s = allocator.stats()
        timeline.append((s["allocated"], s["reserved"]))
    return {**allocator.stats(), "timeline": timeline}


def trace_from_events(events) -> list:
    """Turn (time, address, signed bytes) allocator events into a replayable trace.

    A positive size is an allocation at ``address``; a negative one frees whatever lives there.
    Frees of addresses allocated before recording began are dropped (their malloc was not seen)."""
    trace, live, next_id = [], {}, 0
    for _, addr, nbytes in sorted(events, key=lambda e: e[0]):  # stable: ties keep order
        if nbytes > 0:
            live[addr] = next_id
            trace.append(("malloc", next_id, int(nbytes)))
            next_id += 1
        elif nbytes < 0 and addr in live:
            trace.append(("free", live.pop(addr)))
    return trace


def record_allocation_trace(step_fn, n_steps: int = 1) -> list:
    """Record every CPU allocation and free that ``step_fn()`` makes, ``n_steps`` times.

    What is recorded: ``torch.profiler`` with ``profile_memory=True`` logs each call into PyTorch's
    CPU allocator (``c10::reportMemoryUsage``): the address, the signed size in bytes and a timestamp.
    That covers every tensor storage — parameters' gradients, optimizer states, activations, temporaries
    inside ops — but not memory that libraries allocate behind PyTorch's back (oneDNN scratch space).
    Returns a trace for :func:`replay` (sizes in bytes, as the program requested them).
    """
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(n_steps):
            step_fn()
    events = []

    def walk(nodes):
        for node in nodes:
            fields = node.extra_fields
            if isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return trace_from_events(events)

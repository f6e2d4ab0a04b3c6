"""Caching allocator vs no cache, replayed on the allocation trace of real training steps.

    python benchmarks/memory_allocator.py     # writes benchmarks/results/memory_allocator.json

The trace: `torch.profiler` (profile_memory=True) records every allocation and free PyTorch's CPU
allocator serves during 3 Adam steps of `SMALL_CONFIGS["gpt-tiny"]` at batch 8 × 128 tokens (address,
signed bytes, time) — `llmspace.allocator.record_allocation_trace`. The trace is replayed on
`CachingAllocator` (PyTorch CUDA caching-allocator rules) and on `NoCacheAllocator` (one system call per
malloc and per free). Recorded: counts, peaks, fragmentation at the peak, and a down-sampled timeline.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace.allocator import CachingAllocator, NoCacheAllocator, record_allocation_trace, replay, round_size  # noqa: E402
from llmspace.memory import SMALL_CONFIGS, Transformer  # noqa: E402

CONFIG, BATCH, SEQ, STEPS = "gpt-tiny", 8, 128, 3


def main():
    torch.manual_seed(0)
    config = SMALL_CONFIGS[CONFIG]
    model = Transformer(config)
    opt = torch.optim.Adam(model.parameters())
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    targets = torch.randint(0, config.vocab_size, (BATCH, SEQ))

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(tokens, targets).backward()
        opt.step()
    trace = record_allocation_trace(step, STEPS)
    results = {}
    for name, allocator in (("caching", CachingAllocator()), ("no_cache", NoCacheAllocator())):
        start = time.perf_counter()
        r = replay(trace, allocator)
        seconds = time.perf_counter() - start
        timeline = r.pop("timeline")
        peak_at = max(range(len(timeline)), key=lambda i: timeline[i][1])
        stride = max(1, len(timeline) // 600)
        results[name] = {**r, "replay_seconds": seconds,
                         "fragmentation_at_peak_reserved": 1 - timeline[peak_at][0] / timeline[peak_at][1],
                         "timeline_stride": stride, "timeline": timeline[::stride]}
    sizes = Counter(op[2] for op in trace if op[0] == "malloc")
    requested = sum(op[2] for op in trace if op[0] == "malloc")
    rounded = sum(round_size(op[2]) for op in trace if op[0] == "malloc")
    path = write_result("memory_allocator", {
        "settings": {"config": CONFIG, "batch": BATCH, "seq_len": SEQ, "steps": STEPS, "optimizer": "Adam",
                     "recorder": "torch.profiler profile_memory=True (CPU allocator events)"},
        "trace": {"mallocs": sum(sizes.values()), "frees": sum(1 for op in trace if op[0] == "free"),
                  "distinct_sizes": len(sizes), "requested_bytes": requested,
                  "rounding_overhead": rounded / requested - 1,
                  "top_sizes": sizes.most_common(10)},
        "allocators": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

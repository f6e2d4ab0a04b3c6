"""Offloaded inference on a GPU: weights in pinned host memory, next block copied on a side stream.

    python benchmarks/storage_offload_gpu.py   # writes benchmarks/results/storage_offload_gpu.json (CUDA only)

Measures, for a stack of Linear blocks whose weights live on the host, the time per forward pass of
  * resident: all weights already on the GPU (the lower bound),
  * offloaded, pageable + synchronous: copy each block's weights, then compute (no overlap),
  * offloaded, pinned + side stream: ``llmspace.tiered.offloaded_forward`` (copy of block i+1 overlaps
    compute of block i),
for a small and a large batch, so that the ``layer_bytes / PCIe bandwidth`` vs ``compute per layer``
crossover is visible. Without CUDA it explains why and exits without writing a result: there is no
CPU analogue of a host→device DMA overlapping kernels.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_seconds, write_result  # noqa: E402

from llmspace.tiered import offloaded_forward, pin_module  # noqa: E402

N_BLOCKS, WIDTH = 16, 4096          # 16 x 4096 x 4096 fp16 = 512 MiB of weights, 32 MiB per block
BATCHES = [1, 4096]


def best_cuda_seconds(fn, repeat: int = 5) -> float:
    return cuda_seconds(fn, repeat=repeat, warmup=1, stat="min")


def main() -> None:
    if not torch.cuda.is_available():
        print("No CUDA device: this benchmark measures host->device copies overlapping GPU kernels, which "
              "has no CPU equivalent. The CPU path of offloaded_forward is tested in tests/test_storage.py; "
              "nothing written.")
        return
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(WIDTH, WIDTH, bias=False).half() for _ in range(N_BLOCKS)]
    pageable = [torch.nn.Linear(WIDTH, WIDTH, bias=False).half() for _ in range(N_BLOCKS)]
    for b, p in zip(blocks, pageable):
        p.load_state_dict(b.state_dict())
    resident = [torch.nn.Linear(WIDTH, WIDTH, bias=False, device="cuda").half() for _ in range(N_BLOCKS)]
    for b, r in zip(blocks, resident):
        r.load_state_dict(b.state_dict())
    for b in blocks:
        pin_module(b)
    block_bytes = WIDTH * WIDTH * 2

    def synchronous(x):
        for p in pageable:
            w = p.weight.to("cuda")          # pageable: staged, blocking
            x = torch.nn.functional.linear(x, w)
        return x

    def run_resident(x):
        for r in resident:
            x = r(x)
        return x

    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, WIDTH, device="cuda", dtype=torch.float16)
        expected = run_resident(x)
        torch.testing.assert_close(offloaded_forward(blocks, x, "cuda"), expected, rtol=2e-2, atol=2e-2)
        t_res = best_cuda_seconds(lambda: run_resident(x))
        t_sync = best_cuda_seconds(lambda: synchronous(x))
        t_over = best_cuda_seconds(lambda: offloaded_forward(blocks, x, "cuda"))
        row = {"batch": batch, "resident_s": t_res, "sync_pageable_s": t_sync, "pinned_overlap_s": t_over,
               "h2d_GBps_implied": N_BLOCKS * block_bytes / t_over / 1e9,
               "overlap_speedup": t_sync / t_over}
        rows.append(row)
        print(row, flush=True)
    write_result("storage_offload_gpu", {
        "settings": {"blocks": N_BLOCKS, "width": WIDTH, "dtype": "float16", "block_bytes": block_bytes,
                     "device": torch.cuda.get_device_name(), "timing": "min of 5, CUDA events"},
        "results": rows})


if __name__ == "__main__":
    main()

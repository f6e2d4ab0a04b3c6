"""W4A16 Triton kernel vs torch fp16 matmul on a GPU: time, effective bandwidth, memory-bound floor.

For decode-shaped products y = x Wᵀ (x: M = 1..16 rows, W: N x K), the work is dominated by reading W.
For each shape this reports the kernel's time, the bytes it must move (int4 codes + fp16 scales + x + y),
the effective bandwidth bytes / time, the time of torch's fp16 ``x @ W.T`` on the same shape, and the
floor = bytes / measured device copy bandwidth. Kernel times come from CUDA graphs over weight copies
larger than the L2 cache (no launch overhead, no L2 hits); eager single-call times are reported beside them. Writes benchmarks/results/quant_w4a16.json.

On a machine without a CUDA GPU it prints why it cannot measure anything and exits 0 without writing:
the Triton interpreter (TRITON_INTERPRET=1) runs the kernel on the CPU for *correctness* only; its
timings would measure numpy, not the kernel.

    python benchmarks/quant_w4a16.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_seconds, write_result  # noqa: E402

SHAPES = [(1, 4096, 4096), (1, 11008, 4096), (1, 4096, 11008), (4, 4096, 4096), (16, 4096, 4096),
          (16, 14336, 4096)]
GROUP_SIZE = 128
# tile sweep: (block_n, block_k); split_k is chosen by the kernel to fill the GPU
SWEEP = [(32, 64), (32, 128), (64, 64), (64, 128), (128, 128), (64, 256)]


def cuda_time(fn, repeat: int = 50) -> float:
    """Median seconds per eager call from CUDA events, after warm-up (includes the launch overhead)."""
    return cuda_seconds(fn, repeat=repeat, warmup=5, stat="median")


L2_FLUSH_BYTES = 256 * 2**20   # > 4x the H100/H200 L2 (50-60 MB): every call reads its weights from HBM


def graph_time(make_call, weight_bytes: int, calls: int = 24, replays: int = 10) -> float:
    """Seconds per call of the kernel alone: ``calls`` calls captured in one CUDA graph (no Python or
    launch overhead), each on its own copy of the weights so that the copies together exceed the L2
    cache and every call streams its weights from HBM. ``make_call(i)`` returns the i-th call."""
    copies = max(2, -(-L2_FLUSH_BYTES // max(weight_bytes, 1)))
    fns = [make_call(i % copies) for i in range(calls)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:3]:
            fn()                                   # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return cuda_seconds(graph.replay, repeat=replays, warmup=2, stat="median") / calls


def main() -> int:
    if not torch.cuda.is_available():
        print("quant_w4a16: no CUDA GPU here, nothing measured. The kernel's speed only means something on "
              "a GPU (the CPU runs it under TRITON_INTERPRET=1, in numpy, for correctness tests). "
              "Run this script on a machine with a CUDA GPU to write benchmarks/results/quant_w4a16.json.")
        return 0
    from llmspace.quant import quantize_per_group, pack_int4
    from llmspace.quant_triton import w4a16_matmul, w4a16_matmul_torch
    dev = "cuda"
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_s = cuda_time(lambda: buf.clone(), repeat=20)
    bandwidth = 2 * buf.numel() / copy_s   # read + write, bytes/s
    del buf
    rows = []
    for m, n, k in SHAPES:
        w = torch.randn(n, k, device=dev) * 0.02
        q, scale, _ = quantize_per_group(w.cpu(), 4, GROUP_SIZE, symmetric=True)
        qdata = pack_int4((q.to(torch.int16) + 8).to(torch.uint8)).to(dev)
        scale = scale.half().to(dev)
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        w16 = w.half()
        y = w4a16_matmul(x, qdata, scale, None, GROUP_SIZE, k)
        err = (y.float() - w4a16_matmul_torch(x, qdata, scale, None, GROUP_SIZE, k).float()).abs().max().item()
        bytes_w4 = qdata.nbytes + scale.nbytes + x.nbytes + m * n * 2
        bytes_fp16 = w16.nbytes + x.nbytes + m * n * 2
        copies = max(2, -(-L2_FLUSH_BYTES // bytes_w4))
        q_copies = [(qdata.clone(), scale.clone()) for _ in range(copies)]
        w16_copies = [w16.clone() for _ in range(max(2, -(-L2_FLUSH_BYTES // bytes_fp16)))]

        def w4_call(i, **kw):
            qd, sc = q_copies[i % len(q_copies)]
            return lambda: w4a16_matmul(x, qd, sc, None, GROUP_SIZE, k, **kw)

        t_w4 = graph_time(w4_call, bytes_w4)
        t_fp16 = graph_time(lambda i: (lambda: x @ w16_copies[i % len(w16_copies)].T), bytes_fp16)
        sweep = {f"{bn}x{bk}": graph_time(lambda i: w4_call(i, block_n=bn, block_k=bk), bytes_w4)
                 for bn, bk in SWEEP}
        t_nosplit = graph_time(lambda i: w4_call(i, split_k=1), bytes_w4)
        eager_w4 = cuda_time(lambda: w4a16_matmul(x, qdata, scale, None, GROUP_SIZE, k))
        eager_fp16 = cuda_time(lambda: x @ w16.T)
        del q_copies, w16_copies
        rows.append({"M": m, "N": n, "K": k, "w4a16_s": t_w4, "fp16_s": t_fp16, "speedup": t_fp16 / t_w4,
                     "w4a16_bytes": bytes_w4, "fp16_bytes": bytes_fp16,
                     "w4a16_effective_GBps": bytes_w4 / t_w4 / 1e9, "fp16_effective_GBps": bytes_fp16 / t_fp16 / 1e9,
                     "w4a16_floor_s": bytes_w4 / bandwidth, "fp16_floor_s": bytes_fp16 / bandwidth,
                     "max_abs_diff_vs_twin": err, "w4a16_split_k_1_s": t_nosplit, "sweep_s": sweep,
                     "eager_w4a16_s": eager_w4, "eager_fp16_s": eager_fp16})
        print({key: (round(v * 1e6, 1) if key.endswith("_s") else v) for key, v in rows[-1].items()
               if key != "sweep_s"}, {key: round(v * 1e6, 1) for key, v in sweep.items()}, flush=True)
    write_result("quant_w4a16", {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bandwidth / 1e9,
                                 "settings": {"group_size": GROUP_SIZE, "scales": "fp16", "activations": "fp16",
                                              "timing": "kernel time: 24 calls in one CUDA graph, each on its own weight copy (copies > 256 MiB, "
                                                        "so weights stream from HBM, not L2), median of 10 replays / 24; "
                                                        "eager_*: median of 50 single calls with CUDA events (launch "
                                                        "overhead included)",
                                              "defaults": "block_n=64, block_k=128 (= group size), split_k auto"},
                                 "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

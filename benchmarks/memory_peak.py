"""The peak of a training step: the estimator against the allocator, step 1 and step 2.

    python benchmarks/memory_peak.py            # CPU: writes benchmarks/results/memory_peak.json
    python benchmarks/memory_peak_gpu.py        # CUDA: writes benchmarks/results/memory_peak_gpu.json

For each case (the three `SMALL_CONFIGS` at batch 2 × 32 and 4 × 64, a 1024-token sequence, a 512-token
sequence with explicit attention, a 32,000-token vocabulary) `measure_training_peaks` builds the model,
`torch.optim.Adam` and the batch inside the measurement and runs two steps; the peak of each step is the
allocator's (CPU: `torch.profiler` memory events replayed in time order; CUDA: `max_memory_allocated`
per phase, after a warm-up step that creates the cuBLAS workspaces). `estimate_training_memory(...,
device=...)` predicts `first_step_peak` and `peak` from the configuration alone; `total` (the sum of the
terms) is recorded to show how far it is from any peak. One thread on CPU; fp32 throughout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace.memory import SMALL_CONFIGS, TransformerConfig, estimate_training_memory, measure_training_peaks  # noqa: E402

CASES = [(f"{name} {B}x{T}", SMALL_CONFIGS[name], B, T) for name in SMALL_CONFIGS for B, T in [(2, 32), (4, 64)]] + [
    ("gpt-tiny 1x1024", SMALL_CONFIGS["gpt-tiny"], 1, 1024),
    ("math-attn 2x512", TransformerConfig(vocab_size=256, d_model=96, n_layers=3, n_heads=4, d_ff=384,
                                          attention="math", tie_embeddings=True, max_seq_len=512), 2, 512),
    ("vocab-32k 4x64", TransformerConfig(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, d_ff=256), 4, 64),
]


def table(device: str) -> list:
    rows = []
    for name, config, B, T in CASES:
        measured = measure_training_peaks(config, B, T, n_steps=2, device=device)
        est = estimate_training_memory(config, B, T, policy="fp32", device=device)
        for row, want, phase in ((measured[0], est.first_step_peak, est.first_step_peak_phase),
                                 (measured[1], est.peak, est.peak_phase)):
            rows.append({"case": name, "config": config.__dict__, "batch": B, "seq_len": T, "step": row["step"],
                         "estimate": want, "estimate_phase": phase, "measured": row["peak"],
                         "measured_phase": row["phase"], "measured_phases": row["phases"],
                         "ratio": want / row["peak"], "sum_of_terms": est.total})
            print(f"{name:18} step {row['step']}  estimate {want:13,d} ({phase:9})  measured {row['peak']:13,d} "
                  f"({row['phase']:9})  ratio {want / row['peak']:.4f}  sum of terms / measured "
                  f"{est.total / row['peak']:.2f}", flush=True)
    return rows


def main(device: str = "cpu"):
    if device == "cpu":
        torch.set_num_threads(1)
    rows = table(device)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest |estimate / measured - 1| = {worst:.2%}")
    name = "memory_peak" if device == "cpu" else "memory_peak_gpu"
    settings = {"device": device, "dtype": "float32", "optimizer": "torch.optim.Adam (default implementation)",
                "measurement": "torch.profiler memory events" if device == "cpu"
                else "torch.cuda.max_memory_allocated per phase"}
    if device == "cuda":
        settings["gpu"] = torch.cuda.get_device_name()
    print(f"wrote {write_result(name, {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()

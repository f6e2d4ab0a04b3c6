"""The estimator's first_step_peak / peak against torch.cuda.max_memory_allocated on a GPU.

    python benchmarks/memory_peak_gpu.py   # writes benchmarks/results/memory_peak_gpu.json; exits 0 without CUDA

Same cases and table as `benchmarks/memory_peak.py`, with `device="cuda"`: the estimator rounds every
block to 512 bytes and assumes Adam's `foreach` implementation (the CUDA default); the measurement is
`max_memory_allocated` per phase minus the bytes allocated before the model was built.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_peak  # noqa: E402

if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to measure (this benchmark compares with torch.cuda.max_memory_allocated).")
        sys.exit(0)
    memory_peak.main("cuda")

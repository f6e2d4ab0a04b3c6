"""Activation checkpointing: peak saved bytes and step time vs the number of segments.

    python benchmarks/memory_checkpoint.py    # writes benchmarks/results/memory_checkpoint.json

A 16-layer `llmspace.memory.Transformer` (d_model 128, batch 4 × 128 tokens, fp32) on the CPU. For each
number of segments k, `checkpointed_activation_bytes` measures the bytes saved in the forward pass and
by the largest recomputation (their sum, `saved_peak`, is what `activation_bytes(checkpoint_segments=k)`
predicts) and, independently, the allocator's peak of the forward + backward (`allocator_peak`:
torch.profiler memory events; saved tensors, gradients and temporaries above the resident parameters
and batch) — the number a memory budget needs; the forward+backward step time is the best of 9
runs of CPU time (`time.process_time`, one thread), measured in the same process against the plain
step (k = 0 means no checkpointing). CPU time rather than wall time: on a shared 2-core machine wall
time mostly measures the neighbours, while the CPU time of a single-threaded step measures its work.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from llmspace.memory import (Transformer, TransformerConfig, activation_bytes,  # noqa: E402
                             checkpoint_segments, checkpointed_activation_bytes, saved_activation_bytes)

CONFIG = TransformerConfig(vocab_size=512, d_model=128, n_layers=16, n_heads=4, d_ff=512)
BATCH, SEQ = 4, 128


def cpu_time(fn, repeat: int = 9) -> float:
    """Best CPU seconds of one call (after a warm-up call)."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return min(samples)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    targets = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))

    def plain():
        model.zero_grad(set_to_none=True)
        model.loss(tokens, targets).backward()
    r = checkpointed_activation_bytes(model, tokens, targets, None)
    rows = [{"segments": 0, "forward": r["forward"], "recompute": 0, "saved_peak": r["saved_peak"],
             "allocator_peak": r["allocator_peak"], "estimate": activation_bytes(CONFIG, BATCH, SEQ),
             "seconds": cpu_time(plain)}]
    assert r["forward"] == saved_activation_bytes(model, tokens, targets)
    for k in (1, 2, 3, 4, 6, 8, 16):
        r = checkpointed_activation_bytes(model, tokens, targets, k)

        def step():
            model.zero_grad(set_to_none=True)
            x = checkpoint_segments(model.blocks, model.embed_tokens(tokens), k)
            F.cross_entropy(model.head(model.norm(x)).flatten(0, 1), targets.flatten()).backward()
        seconds = cpu_time(step)
        rows.append({"segments": k, "forward": r["forward"], "recompute": r["recompute"],
                     "saved_peak": r["saved_peak"], "allocator_peak": r["allocator_peak"],
                     "estimate": activation_bytes(CONFIG, BATCH, SEQ, checkpoint_segments=k), "seconds": seconds})
        print(rows[-1], flush=True)
    plain_peak = rows[0]["allocator_peak"]
    for row in rows[1:]:
        print(f"k={row['segments']:2d}: allocator peak {row['allocator_peak'] / 2**20:6.2f} MiB, saving "
              f"{plain_peak / row['allocator_peak']:.2f}x (saved bytes alone: "
              f"{rows[0]['saved_peak'] / row['saved_peak']:.2f}x)")
    path = write_result("memory_checkpoint", {
        "settings": {"config": CONFIG.__dict__, "batch": BATCH, "seq_len": SEQ, "dtype": "float32",
                     "threads": torch.get_num_threads(), "timer": "process_time, best of 9"}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

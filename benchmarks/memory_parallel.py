"""Per-rank memory and step time of DDP, ZeRO-1/2/3 (llmspace.parallel) and FSDP2 on 2 CPU processes.

    python benchmarks/memory_parallel.py      # writes benchmarks/results/memory_parallel.json

One `torch.multiprocessing.spawn` of 2 gloo processes (file-store rendezvous) trains the same model with
each strategy for a few Adam steps on the same global batch. Per-rank bytes are read from the tensors
each rank holds after the last step (parameters, gradients, optimizer state; DTensors: the local shard)
and compared with `llmspace.memory.model_state_bytes` for the matching ZeRO stage. Also records the
tensor-parallel MLP check and the GPipe run (4 micro-batches, 2 stages: losses, busy vs wall time), and
the bytes each ZeRO rank passed to each collective, turned into bytes sent per step under ring
algorithms (`ring_bytes_sent`) and compared with DDP's one all-reduce of every gradient.
Times on a 2-core machine are dominated by gloo latency; they are recorded, not interpreted.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace.memory import PRECISION_POLICIES, TransformerConfig, count_parameters, model_state_bytes  # noqa: E402
from llmspace.parallel import gpipe_bubble_fraction, ring_bytes_sent, spawn, strategy_worker  # noqa: E402

CONFIG = TransformerConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=64,
                           bias=False)
BATCH, SEQ, STEPS, WORLD = 8, 64, 3, 2
STRATEGIES = ("ddp", "zero1", "zero1-allreduce", "zero2", "zero3", "fsdp2", "tp", "pp")
STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": 3}


def main():
    with tempfile.TemporaryDirectory() as out:
        spawn(strategy_worker, WORLD, out, out, CONFIG, BATCH, SEQ, STEPS, STRATEGIES)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    n = count_parameters(CONFIG)
    rows = []
    for name, stage in STAGE.items():
        est = model_state_bytes(n, PRECISION_POLICIES["fp32"], stage, WORLD)
        for r in range(WORLD):
            m = ranks[r][name]["memory"]
            rows.append({"strategy": name, "rank": r, "measured": m, "seconds": ranks[r][name]["seconds"],
                         "estimated": {"params": est["weights"], "grads": est["grads"],
                                       "optimizer": est["optimizer"]},
                         "losses": ranks[r][name]["losses"]})
    ddp_traffic = ring_bytes_sent({"all_reduce": 4 * n}, WORLD)        # per step
    traffic = {"ddp": {"bytes_per_step": ddp_traffic, "vs_ddp": 1.0}}
    for name in ("zero1", "zero1-allreduce", "zero2", "zero3"):
        per_step = ring_bytes_sent(ranks[0][name]["comm"], WORLD) / STEPS
        traffic[name] = {"bytes_per_step": per_step, "vs_ddp": per_step / ddp_traffic,
                         "collectives": ranks[0][name]["comm"]}
        print(f"{name:16} sends {per_step / 2**20:.3f} MiB per step per rank = {per_step / ddp_traffic:.3f}x DDP")
    tp = [{k: v for k, v in ranks[r]["tp"].items()} for r in range(WORLD)]
    pp = [{k: v for k, v in ranks[r]["pp"].items() if k != "params"} for r in range(WORLD)]
    path = write_result("memory_parallel", {
        "settings": {"config": CONFIG.__dict__, "global_batch": BATCH, "seq_len": SEQ, "steps": STEPS,
                     "world_size": WORLD, "backend": "gloo", "n_params": n, "lr": 1e-2},
        "strategies": rows, "tensor_parallel": tp, "pipeline": pp, "traffic": traffic,
        "pipeline_bubble_formula": gpipe_bubble_fraction(WORLD, pp[0]["n_micro_batches"])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Checks for chapter 2 (ex02_memory). References: the ZeRO paper's formulas and worked example
(Rajbhandari et al. 2020), PyTorch autograd's saved tensors (``saved_tensors_hooks``), full-batch
``torch.autograd`` gradients, a byte-map allocator simulation written differently from the reference
(free runs of a bitmap: merging is implicit), and ``torch.optim.Adam``."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder.checks import Checker
from llmspace.memory import (PRECISION_POLICIES, LiveGraphCounter, PrecisionPolicy, SavedTensorLog, Transformer,
                             TransformerConfig)


# ---- model states --------------------------------------------------------------------------------

def _zero_paper(n, policy, stage, world):
    """ZeRO paper §5: P_os shards optimizer state (and fp32 master), P_g gradients, P_p parameters;
    a sharded copy holds ceil(Ψ/N) elements per rank."""
    shard = -(-n // world)
    return {"weights": int(np.ceil((shard if stage >= 3 else n) * policy.weights)),
            "grads": int(np.ceil((shard if stage >= 2 else n) * policy.grads)),
            "master": int(np.ceil((shard if stage >= 1 else n) * policy.master)),
            "optimizer": int(np.ceil((shard if stage >= 1 else n) * policy.optimizer))}


def check_model_state_bytes(impl, *, hidden: bool = False) -> None:
    """Per-rank bytes of weights, gradients, master weights and optimizer state for ZeRO stages 0-3."""
    c = Checker("model_state_bytes", impl, hidden)
    mixed, fp32 = PRECISION_POLICIES["mixed-zero"], PRECISION_POLICIES["fp32"]
    if not hidden:
        # the ZeRO paper's Figure 1: Ψ = 7.5B, N = 64, K = 12 → 120, 31.4, 16.6, 1.88 GB
        for stage, gb in enumerate([120, 31.4, 16.6, 1.875]):
            args = (7_500_000_000, mixed, stage, 64)
            got = c.call(f"ZeRO paper, stage {stage}", *args)
            c.expect_type(f"ZeRO paper, stage {stage}", got, dict, args)
            if set(got) != {"weights", "grads", "master", "optimizer"}:
                c.fail(f"ZeRO paper, stage {stage}", f"keys must be weights, grads, master, optimizer; "
                                                     f"got {sorted(got)}", args)
            total = sum(got.values()) / 1e9
            if abs(total - gb) > 0.05:                         # the paper rounds to 0.1 GB
                c.fail(f"ZeRO paper, stage {stage}", f"total {total:.3f} GB per GPU, expected {gb} GB "
                                                     f"(got {got})", args)
        cases = [("fp32 Adam, plain data parallel", 1000, fp32, 0, 4)]
    else:
        cases = [("one rank", 12345, mixed, 3, 1),
                 ("padding: 10 params on 4 ranks", 10, fp32, 3, 4),
                 ("stage 1, odd count", 1_000_003, PRECISION_POLICIES["bf16-fp32-grads"], 1, 8),
                 ("stage 2, fp16 with fp32 main grads", 7_000_000_001, PRECISION_POLICIES["fp16-fp32-main-grads"], 2, 16),
                 ("custom policy", 999, PrecisionPolicy(2, 2, 4, 4), 3, 3),
                 ("Llama-2-70B, ZeRO-3 on 512", 68_976_648_192, mixed, 3, 512)]
    for name, n, policy, stage, world in cases:
        args = (n, policy, stage, world)
        got = c.call(name, *args)
        c.expect_type(name, got, dict, args)
        expected = _zero_paper(n, policy, stage, world)
        for key, value in expected.items():
            if key not in got:
                c.fail(name, f"missing key {key!r}", args)
            if got[key] != value:
                c.fail(name, f"{key}: got {got[key]!r}" + ("" if hidden else f", expected {value}")
                       + (" — each copy is sharded only from its stage on, and a shard holds "
                          "ceil(n/N) elements" if hidden else ""), args)
    if hidden:
        c.expect_raises("stage 4", ValueError, 10, fp32, 4, 2, what="zero_stage must be 0..3")


# ---- activations ---------------------------------------------------------------------------------

def _measured_block_bytes(config, B, T):
    """Bytes autograd saves for one block: a 2-layer model minus a 1-layer model, same inputs."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=g)
    out = []
    for n_layers in (1, 2):
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(**{**config.__dict__, "n_layers": n_layers}))
        with SavedTensorLog(exclude=list(model.parameters())) as log:
            model.loss(tokens, tokens)
        out.append(log.bytes)
    return out[1] - out[0]


def check_block_activation_bytes(impl, *, hidden: bool = False) -> None:
    """Bytes one block saves for backward, compared with what PyTorch's autograd actually saves."""
    c = Checker("block_activation_bytes", impl, hidden)
    base = dict(vocab_size=64, max_seq_len=64)
    if not hidden:
        cases = [("GPT-style: LayerNorm, GELU, sdpa", TransformerConfig(d_model=32, n_layers=2, n_heads=4,
                                                                          d_ff=128, **base), 2, 16)]
    else:
        cases = [("Llama-style: RMSNorm, SwiGLU, GQA",
                  TransformerConfig(d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96, norm="rmsnorm",
                                    mlp="swiglu", bias=False, learned_positions=False, **base), 3, 20),
                 ("explicit softmax attention",
                  TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, attention="math", **base), 2, 24),
                 ("one head, batch 1", TransformerConfig(d_model=16, n_layers=2, n_heads=1, d_ff=40, **base), 1, 7),
                 ("RMSNorm with GELU", TransformerConfig(d_model=24, n_layers=2, n_heads=3, d_ff=72,
                                                         norm="rmsnorm", **base), 4, 9)]
    for name, config, B, T in cases:
        args = (config, B, T)
        got = c.call(name, *args)
        if not isinstance(got, (int, np.integer)) or isinstance(got, bool):
            c.fail(name, f"must return an int number of bytes, got {type(got).__name__}", args)
        expected = _measured_block_bytes(config, B, T)
        if got != expected:
            hint = ""
            if not hidden:
                hint = f"; autograd saves {expected} bytes (off by {got - expected:+d})"
            if got * 2 == expected or got == 2 * expected:
                hint += " — factor 2: check the element size (fp32 = 4 bytes)"
            c.fail(name, f"got {got} bytes{hint}", args)


# ---- gradient accumulation -----------------------------------------------------------------------

def check_accumulate_gradients(impl, *, hidden: bool = False) -> None:
    """Accumulated gradients equal the full-batch gradient; one micro-batch graph alive at a time."""
    c = Checker("accumulate_gradients", impl, hidden)
    g = torch.Generator().manual_seed(3 if hidden else 2)
    torch.manual_seed(3 if hidden else 2)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)
    if not hidden:
        cases = [("MLP, MSE loss, 12 examples in 4 micro-batches", mlp, F.mse_loss, x, y, 4)]
    else:
        classes = torch.randint(0, 4, (12,), generator=g)
        torch.manual_seed(5)
        clf = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
        cases = [("one micro-batch", mlp, F.mse_loss, x, y, 1),
                 ("one example per micro-batch", mlp, F.mse_loss, x, y, 12),
                 ("classifier, cross-entropy, 3 micro-batches", clf, F.cross_entropy, x, classes, 3),
                 ("classifier, 6 micro-batches", clf, F.cross_entropy, x, classes, 6)]
    for name, model, loss_fn, inputs, targets, n in cases:
        args = (model, loss_fn, inputs, targets, n)
        model.zero_grad(set_to_none=True)
        full = loss_fn(model(inputs), targets)
        full.backward()
        reference = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        wrapped = LiveGraphCounter(model)
        got = c.call(name, wrapped, loss_fn, inputs, targets, n)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            c.fail(name, f"must return a pair (loss, grads), got {type(got).__name__}", args)
        loss, grads = got
        if not torch.is_tensor(loss) or loss.dim() != 0:
            c.fail(name, f"the loss must be a 0-d tensor, got {type(loss).__name__}", args)
        if not torch.allclose(loss.detach(), full.detach(), rtol=1e-5, atol=1e-7):
            c.fail(name, f"returned loss {float(loss):.6g}, expected the full-batch mean {float(full):.6g}", args)
        if not isinstance(grads, (list, tuple)) or len(grads) != len(reference):
            c.fail(name, f"grads must be a list with one gradient per parameter ({len(reference)})", args)
        for grad, ref in zip(grads, reference):
            if not torch.is_tensor(grad) or grad.shape != ref.shape:
                c.fail(name, "each gradient must be a tensor shaped like its parameter", args)
            if not torch.allclose(grad, ref, rtol=1e-4, atol=1e-6):
                hint = ""
                if n > 1 and torch.allclose(grad, ref * n, rtol=1e-4, atol=1e-6):
                    hint = f" — they are {n}× too large: divide each micro-batch loss by n_micro_batches"
                c.fail(name, "gradients differ from the full-batch gradient" + hint, args)
        if int(wrapped.max_alive) > 1:
            c.fail(name, f"{int(wrapped.max_alive)} micro-batch graphs were alive at once: call backward on "
                         f"each micro-batch before the next forward, or activations do not shrink", args)
    if hidden:
        c.expect_raises("n_micro_batches does not divide the batch", ValueError, mlp, F.mse_loss, x, y, 5,
                        what="12 examples cannot be split into 5 equal micro-batches")


# ---- allocator -----------------------------------------------------------------------------------

def _bitmap_replay(segment_size, ops):
    """Reference: a bool map of 512-byte units; best fit over maximal free runs (merging implicit)."""
    free = np.ones(segment_size // 512, dtype=bool)
    live, addresses = {}, {}

    def runs():
        edges = np.diff(np.concatenate([[0], free.astype(np.int8), [0]]))
        return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))
    for op in ops:
        if op[0] == "malloc":
            units = max(1, -(-op[2] // 512))
            fits = [(stop - start, start) for start, stop in runs() if stop - start >= units]
            if not fits:
                raise MemoryError
            start = min(fits)[1]
            free[start:start + units] = False
            live[op[1]] = (start, units)
            addresses[op[1]] = int(start) * 512
        else:
            start, units = live.pop(op[1])
            free[start:start + units] = True
    return addresses, [(int(a) * 512, int(b - a) * 512) for a, b in runs()]


def _random_ops(rng, n, max_bytes, segment_size):
    """Random malloc/free traffic that fits the segment (checked against the reference)."""
    while True:
        ops, live = [], []
        for i in range(n):
            if live and rng.random() < 0.45:
                ops.append(("free", live.pop(int(rng.integers(len(live))))))
            else:
                ops.append(("malloc", f"t{i}", int(rng.integers(1, max_bytes))))
                live.append(f"t{i}")
        try:
            _bitmap_replay(segment_size, ops)
            return ops
        except MemoryError:
            n -= 10


def check_replay_on_segment(impl, *, hidden: bool = False) -> None:
    """Best fit + splitting + coalescing on one segment, against a bitmap simulation."""
    c = Checker("replay_on_segment", impl, hidden)
    if not hidden:
        cases = [
            ("split then reuse", 4096, [("malloc", "a", 100), ("malloc", "b", 1000), ("free", "a"),
                                       ("malloc", "c", 300)]),
            ("free neighbours merge", 4096, [("malloc", "a", 512), ("malloc", "b", 512), ("malloc", "c", 512),
                                            ("free", "a"), ("free", "c"), ("free", "b")]),
        ]
    else:
        rng = np.random.default_rng(7)
        cases = [
            ("best fit picks the smallest hole", 8192,
             [("malloc", "a", 2048), ("malloc", "x", 512), ("malloc", "b", 512), ("malloc", "y", 512),
              ("free", "a"), ("free", "b"), ("malloc", "c", 400)]),
            ("coalesced hole serves a large request", 3072,
             [("malloc", "a", 1024), ("malloc", "b", 1024), ("malloc", "c", 1024), ("free", "b"),
              ("free", "a"), ("malloc", "d", 2048)]),
            ("exact multiples are not rounded up", 2048, [("malloc", "a", 512), ("malloc", "b", 1536)]),
            ("zero bytes still take 512", 2048, [("malloc", "a", 0), ("malloc", "b", 1)]),
            ("random traffic", 1 << 16, _random_ops(rng, 150, 3000, 1 << 16)),
            ("random small traffic", 1 << 14, _random_ops(rng, 300, 600, 1 << 14)),
        ]
    for name, size, ops in cases:
        args = (size, ops)
        got = c.call(name, size, list(ops))
        if not isinstance(got, tuple) or len(got) != 2:
            c.fail(name, f"must return a tuple (addresses, free_blocks), got {type(got).__name__}", args)
        addresses, free_blocks = got
        exp_addresses, exp_free = _bitmap_replay(size, ops)
        if dict(addresses) != exp_addresses:
            bad = next(k for k in exp_addresses if addresses.get(k) != exp_addresses[k])
            c.fail(name, f"wrong address for {bad!r}" + ("" if hidden else
                   f": got {addresses.get(bad)}, expected {exp_addresses[bad]} (best fit: the smallest "
                   f"free block that fits, lowest address on ties; sizes rounded up to 512)"), args)
        free_list = [tuple(b) for b in free_blocks]
        if free_list != exp_free:
            adjacent = any(a + s == b for (a, s), (b, _) in zip(free_list, free_list[1:]))
            c.fail(name, "wrong final free list" + (" — adjacent free blocks were not merged" if adjacent else "")
                   + ("" if hidden else f": got {free_list}, expected {exp_free}"), args)
    if hidden:
        c.expect_raises("request larger than the segment", MemoryError, 1024, [("malloc", "a", 1025)],
                        what="nothing fits")
        c.expect_raises("fragmented: no single hole fits", MemoryError, 2048,
                        [("malloc", "a", 512), ("malloc", "b", 512), ("malloc", "c", 512), ("malloc", "d", 512),
                         ("free", "a"), ("free", "c"), ("malloc", "e", 1024)], what="free space is split in two")
        c.expect_raises("double free", ValueError, 2048, [("malloc", "a", 512), ("free", "a"), ("free", "a")],
                        what="'a' is no longer allocated")


# ---- ZeRO-1 --------------------------------------------------------------------------------------

def check_zero1_adam_step(impl, *, hidden: bool = False) -> None:
    """Simulated ZeRO-1 Adam over several steps vs ``torch.optim.Adam`` on the mean gradient."""
    c = Checker("zero1_adam_step", impl, hidden)
    cases = [("12 parameters, 2 ranks, 3 steps", 12, 2, 3, 0.1)] if not hidden else [
        ("one rank", 9, 1, 2, 0.05), ("padding: 10 parameters on 4 ranks", 10, 4, 3, 0.1),
        ("more ranks than parameters", 3, 4, 2, 0.1), ("1000 parameters, 8 ranks, 5 steps", 1000, 8, 5, 1e-3)]
    for name, n, world, steps, lr in cases:
        g = torch.Generator().manual_seed(n * 31 + world)
        start = torch.randn(n, generator=g, dtype=torch.float64)
        ref = nn.Parameter(start.clone())
        adam = torch.optim.Adam([ref], lr=lr)
        shard = -(-n // world)
        states = [{"exp_avg": torch.zeros(shard, dtype=torch.float64),
                   "exp_avg_sq": torch.zeros(shard, dtype=torch.float64)} for _ in range(world)]
        flat = start.clone()
        for step in range(1, steps + 1):
            grads = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(world)]
            ref.grad = torch.stack(grads).mean(0)
            adam.step()
            args = (flat, grads, states, step, lr)
            got = c.call(name, flat.clone(), [gr.clone() for gr in grads], states, step, lr)
            if not torch.is_tensor(got) or got.shape != (n,):
                c.fail(name, f"must return a 1-D tensor of {n} parameters, got "
                             f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}", args)
            if not torch.allclose(got, ref.detach(), rtol=1e-9, atol=1e-12):
                diff = (got - ref.detach()).abs()
                wrong = sorted({int(i) // shard for i in torch.nonzero(diff > 1e-9).flatten()})
                hint = f" at step {step}; shards of ranks {wrong} are wrong"
                if torch.allclose(got[shard:], flat[shard:]) and world > 1 and n > shard:
                    hint += " (unchanged: every rank's shard must be updated and all-gathered)"
                c.fail(name, "parameters differ from torch.optim.Adam on the averaged gradient" + hint, args)
            flat = got
            full_m = torch.cat([s["exp_avg"] for s in states])[:n]
            if not torch.allclose(full_m, adam.state[ref]["exp_avg"], rtol=1e-9, atol=1e-12):
                c.fail(name, f"exp_avg shards differ from Adam's first moment at step {step} (update the "
                             f"state dicts in place)", args)

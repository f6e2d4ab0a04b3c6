"""Checks for chapter 2 (ex02_memory). References: the ZeRO paper's formulas and worked example
(Rajbhandari et al. 2020), PyTorch autograd's saved tensors (``saved_tensors_hooks``), full-batch
``torch.autograd`` gradients, a byte-map allocator simulation written differently from the reference
(free runs of a bitmap: merging is implicit), and ``torch.optim.Adam``."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from autograder.checks import Checker, direction
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
                 ("fractional bytes round up: 4-bit weights, 8-bit Adam", 1001, PrecisionPolicy(0.5, 2, 4, 2), 0, 1),
                 ("fractional bytes on 3 ranks, ZeRO-3", 1001, PrecisionPolicy(0.5, 2, 4, 2.25), 3, 3),
                 ("defaults: stage 0, one rank", 4321, fp32, None, None),
                 ("Llama-2-70B, ZeRO-3 on 512", 68_976_648_192, mixed, 3, 512)]
    for name, n, policy, stage, world in cases:
        args = (n, policy) if stage is None else (n, policy, stage, world)
        got = c.call(name, *args)
        c.expect_type(name, got, dict, args)
        expected = _zero_paper(n, policy, stage or 0, world or 1)
        for key, value in expected.items():
            if key not in got:
                c.fail(name, f"missing key {key!r}", args)
            if got[key] != value or isinstance(got[key], bool) or not isinstance(got[key], (int, np.integer)):
                if got[key] == value:
                    c.fail(name, f"{key} must be an int number of bytes, got {type(got[key]).__name__}", args)
                c.expect_number(name, got[key], value, args, what=key,
                                hint="each copy is sharded only from its stage on, a shard holds ceil(n/N) "
                                     "elements, and fractional bytes round up" if hidden else "")
    if hidden:
        c.expect_raises("stage 4", ValueError, 10, fp32, 4, 2, what="zero_stage must be 0..3")


# ---- activations ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _measured_block_bytes(config, B, T, dtype_bytes=4):
    """Bytes autograd saves for one block: a 2-layer model minus a 1-layer model, same inputs (fp32).

    For another ``dtype_bytes`` every saved float tensor is re-priced by the task's rule — big tensors
    take ``dtype_bytes`` per element, norm/attention statistics stay fp32: a statistic is a float32
    tensor of shape ``(..., 1)`` (LayerNorm mean/rstd, RMSNorm rstd) or ``(B, n_heads, T)`` (sdpa's
    log-sum-exp); bool masks keep 1 byte."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=g)
    out = []
    for n_layers in (1, 2):
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(**{**config.__dict__, "n_layers": n_layers}))
        with SavedTensorLog(exclude=list(model.parameters())) as log:
            model.loss(tokens, tokens)
        total = 0
        for shape, dtype, nbytes in log.records:
            statistic = dtype == torch.float32 and (shape[-1:] == (1,) or shape == (B, config.n_heads, T))
            if dtype.is_floating_point and not statistic:
                total += nbytes // dtype.itemsize * dtype_bytes
            else:
                total += nbytes
        out.append(total)
    return out[1] - out[0]


def check_block_activation_bytes(impl, *, hidden: bool = False) -> None:
    """Bytes one block saves for backward, compared with what PyTorch's autograd actually saves (fp32),
    re-priced for a non-default ``dtype_bytes`` by the task's rule."""
    c = Checker("block_activation_bytes", impl, hidden)
    base = dict(vocab_size=64, max_seq_len=64)
    if not hidden:
        cases = [("GPT-style: LayerNorm, GELU, sdpa", TransformerConfig(d_model=32, n_layers=2, n_heads=4,
                                                                          d_ff=128, **base), 2, 16, None)]
    else:
        llama = TransformerConfig(d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=96, norm="rmsnorm",
                                  mlp="swiglu", bias=False, learned_positions=False, **base)
        math_attention = TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, attention="math", **base)
        cases = [("Llama-style: RMSNorm, SwiGLU, GQA", llama, 3, 20, None),
                 ("explicit softmax attention", math_attention, 2, 24, None),
                 ("one head, batch 1", TransformerConfig(d_model=16, n_layers=2, n_heads=1, d_ff=40, **base), 1, 7,
                  None),
                 ("RMSNorm with GELU", TransformerConfig(d_model=24, n_layers=2, n_heads=3, d_ff=72,
                                                         norm="rmsnorm", **base), 4, 9, None),
                 ("bf16 activations (dtype_bytes=2), Llama-style", llama, 3, 20, 2),
                 ("fp8 activations (dtype_bytes=1), explicit softmax", math_attention, 2, 24, 1),
                 ("dtype_bytes=4 passed explicitly", math_attention, 1, 5, 4)]
    for name, config, B, T, dtype_bytes in cases:
        args = (config, B, T) if dtype_bytes is None else (config, B, T, dtype_bytes)
        got = c.call(name, *args)
        if not isinstance(got, (int, np.integer)) or isinstance(got, bool):
            c.fail(name, f"must return an int number of bytes, got {type(got).__name__}", args)
        expected = _measured_block_bytes(config, B, T, 4 if dtype_bytes is None else dtype_bytes)
        if got != expected:
            hint = ""
            if dtype_bytes not in (None, 4) and got == _measured_block_bytes(config, B, T, 4):
                hint = f" — that is the fp32 count: big tensors take dtype_bytes={dtype_bytes} bytes each"
            elif dtype_bytes not in (None, 4) and got == _measured_block_bytes(config, B, T, 4) * dtype_bytes // 4:
                hint = " — the norm and softmax statistics (and the bool mask) do not shrink with dtype_bytes"
            c.expect_number(name, got, expected, args, what="the byte count", hint=hint.removeprefix(" — "))


# ---- gradient accumulation -----------------------------------------------------------------------

def check_accumulate_gradients(impl, *, hidden: bool = False) -> None:
    """Accumulated gradients equal the full-batch gradient; every forward sees one micro-batch; one
    micro-batch graph alive at a time; stale ``.grad`` values are cleared, not added to; with
    ``ignore_index`` micro-batches are weighted by their counted tokens.

    The ``ignore_index`` cases pass a keyword argument, which the sandbox's call protocol does not carry
    yet: they run wherever the function is called in-process (the notebook's own test cell, the tests,
    the mutation score) and are skipped for a :class:`~autograder.grading.RemoteFunction`."""
    c = Checker("accumulate_gradients", impl, hidden)
    g = torch.Generator().manual_seed(3 if hidden else 2)
    torch.manual_seed(3 if hidden else 2)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 3, generator=g)
    if not hidden:
        cases = [("MLP, MSE loss, 12 examples in 4 micro-batches", mlp, F.mse_loss, x, y, 4, False, None)]
    else:
        classes = torch.randint(0, 4, (12,), generator=g)
        padded = classes.clone()
        padded[[1, 2, 3, 7]] = -100           # micro-batches of 3 hold 1, 3, 2 and 3 counted tokens
        empty_chunk = classes.clone()
        empty_chunk[3:6] = -100               # the second of four micro-batches is all padding
        torch.manual_seed(5)
        clf = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
        ce = functools.partial(F.cross_entropy, ignore_index=-100)
        cases = [("one micro-batch", mlp, F.mse_loss, x, y, 1, False, None),
                 ("one example per micro-batch", mlp, F.mse_loss, x, y, 12, False, None),
                 ("stale .grad from an earlier step must be cleared", mlp, F.mse_loss, x, y, 3, True, None),
                 ("classifier, cross-entropy, 3 micro-batches", clf, F.cross_entropy, x, classes, 3, False, None),
                 ("classifier, 6 micro-batches, stale .grad", clf, F.cross_entropy, x, classes, 6, True, None)]
        cases += [("ignore_index: micro-batches weighted by counted tokens", clf, ce, x, padded, 4, False, -100),
                  ("ignore_index: a micro-batch of padding only", clf, ce, x, empty_chunk, 4, True, -100),
                  ("ignore_index given, nothing ignored", clf, ce, x, classes, 6, False, -100)]
    for name, model, loss_fn, inputs, targets, n, stale, ignore in cases:
        model.zero_grad(set_to_none=True)
        full = loss_fn(model(inputs), targets)
        full.backward()
        reference = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        wrapped = LiveGraphCounter(model)
        if stale:  # what the previous optimizer step left behind
            gs = torch.Generator().manual_seed(len(name))
            for p in wrapped.parameters():
                p.grad = torch.randn(p.shape, generator=gs)
        args = (wrapped, loss_fn, inputs, targets, n)
        keywords = None if ignore is None else {"ignore_index": ignore}
        got = c.call(name, *args, mutates=(0,), keywords=keywords)
        after = c.last_args[0]
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            c.fail(name, f"must return a pair (loss, grads), got {type(got).__name__}", args)
        loss, grads = got
        sizes = after.forward_batch_sizes() if isinstance(after, LiveGraphCounter) else []
        micro = len(inputs) // n
        # a micro-batch with no counted token may be skipped (its mean loss is 0/0, its weight 0)
        fewest = n if ignore is None else sum(bool((t != ignore).any()) for t in targets.chunk(n))
        if isinstance(after, LiveGraphCounter) and not (all(s == micro for s in sizes)
                                                        and fewest <= len(sizes) <= n):
            if any(s != micro for s in sizes):
                first = next(s for s in sizes if s != micro)
                problem = (f"the model was called on a batch of {first} examples; every forward must see "
                           f"one micro-batch of {micro} ({len(inputs)} examples / {n})")
                if first == len(inputs) and n > 1:
                    problem += " — a full-batch forward (even just to report the loss) keeps the whole " \
                               "batch's activations, which accumulation exists to avoid"
            else:
                problem = (f"the model was called {len(sizes)} times; expected one forward per micro-batch "
                           f"({n}) — the loss is the mean of the micro-batch losses you already computed")
            c.fail(name, problem, args)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            c.fail(name, f"the loss must be a 0-d tensor, got {type(loss).__name__}", args)
        if not torch.allclose(loss.detach(), full.detach(), rtol=1e-5, atol=1e-7):
            c.fail(name, f"the loss {direction(float(loss.detach()), float(full.detach())) or 'is wrong'}"
                   + ("" if hidden else f": returned {float(loss.detach()):.6g}, expected the full-batch mean "
                                        f"{float(full.detach()):.6g}"), args)
        if loss.requires_grad:
            c.fail(name, "the returned loss must be detached (it still requires grad: `loss.detach()`)", args)
        if not isinstance(grads, (list, tuple)) or len(grads) != len(reference):
            c.fail(name, f"grads must be a list with one gradient per parameter ({len(reference)})", args)
        for grad, ref in zip(grads, reference):
            if not torch.is_tensor(grad) or grad.shape != ref.shape:
                c.fail(name, "each gradient must be a tensor shaped like its parameter", args)
            if not torch.allclose(grad, ref, rtol=1e-4, atol=1e-6):
                hint = ""
                if n > 1 and torch.allclose(grad, ref * n, rtol=1e-4, atol=1e-6):
                    hint = f" — they are {n}× too large: divide each micro-batch loss by n_micro_batches"
                elif stale:
                    hint = " — clear the .grad left by an earlier step before accumulating (p.grad = None)"
                c.fail(name, "gradients differ from the full-batch gradient" + hint, args)
        if isinstance(after, LiveGraphCounter) and int(after.max_alive) > 1:
            c.fail(name, f"{int(after.max_alive)} micro-batch graphs were alive at once: call backward on "
                         f"each micro-batch before the next forward, or activations do not shrink", args)
    if hidden:
        c.expect_raises("n_micro_batches does not divide the batch", ValueError, mlp, F.mse_loss, x, y, 5,
                        what="12 examples cannot be split into 5 equal micro-batches")
        c.expect_raises("ignore_index: every target ignored", ValueError, LiveGraphCounter(clf), ce, x,
                        torch.full((12,), -100), 3, what="the mean over zero counted tokens is undefined",
                        keywords={"ignore_index": -100})


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
        if not isinstance(addresses, dict):
            c.fail(name, f"addresses must be a dict {{name: address}}, got {type(addresses).__name__}", args)
        if addresses != exp_addresses:
            bad = next((k for k in exp_addresses if addresses.get(k) != exp_addresses[k]), None)
            if bad is None:
                c.fail(name, "addresses holds names that were never allocated"
                       + ("" if hidden else f": {sorted(set(addresses) - set(exp_addresses))}"), args)
            c.fail(name, ("wrong address for an allocation" if hidden else
                          f"wrong address for {bad!r}: got {addresses.get(bad)}, expected {exp_addresses[bad]}")
                   + " (best fit: the smallest free block that fits, lowest address on ties; sizes rounded "
                     "up to 512)", args)
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
        c.expect_raises("unknown op", ValueError, 2048, [("malloc", "a", 512), ("realloc", "a", 1024)],
                        what="an op must be 'malloc' or 'free'")


# ---- ZeRO-1 --------------------------------------------------------------------------------------

def check_zero1_adam_step(impl, *, hidden: bool = False) -> None:
    """Simulated ZeRO-1 Adam over several steps vs ``torch.optim.Adam`` on the mean gradient; the shard
    states must be updated in place; ``betas`` and ``eps`` are honoured."""
    c = Checker("zero1_adam_step", impl, hidden)
    cases = [("12 parameters, 2 ranks, 3 steps", 12, 2, 3, 0.1, None)] if not hidden else [
        ("one rank", 9, 1, 2, 0.05, None), ("padding: 10 parameters on 4 ranks", 10, 4, 3, 0.1, None),
        ("more ranks than parameters", 3, 4, 2, 0.1, None),
        ("1000 parameters, 8 ranks, 5 steps", 1000, 8, 5, 1e-3, None),
        ("betas (0.5, 0.9) and eps 0.1", 20, 3, 3, 0.1, ((0.5, 0.9), 0.1))]
    for name, n, world, steps, lr, custom in cases:
        g = torch.Generator().manual_seed(n * 31 + world)
        start = torch.randn(n, generator=g, dtype=torch.float64)
        ref = nn.Parameter(start.clone())
        betas, eps = custom if custom else ((0.9, 0.999), 1e-8)
        adam = torch.optim.Adam([ref], lr=lr, betas=betas, eps=eps)
        shard = -(-n // world)
        states = [{"exp_avg": torch.zeros(shard, dtype=torch.float64),
                   "exp_avg_sq": torch.zeros(shard, dtype=torch.float64)} for _ in range(world)]
        flat = start.clone()
        for step in range(1, steps + 1):
            grads = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(world)]
            ref.grad = torch.stack(grads).mean(0)
            adam.step()
            args = (flat, grads, states, step, lr) + ((betas, eps) if custom else ())
            # flat_param may be updated in place too (a real ZeRO step does); the states must be
            got = c.call(name, *args, mutates=(0, 2))
            states = c.last_args[2]
            if not torch.is_tensor(got) or got.shape != (n,):
                c.fail(name, f"must return a 1-D tensor of {n} parameters, got "
                             f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}", args)
            if not torch.allclose(got, ref.detach(), rtol=1e-9, atol=1e-12):
                diff = (got - ref.detach()).abs()
                wrong = sorted({int(i) // shard for i in torch.nonzero(diff > 1e-9).flatten()})
                hint = f" at step {step}; shards of ranks {wrong} are wrong"
                if torch.allclose(got[shard:], flat[shard:]) and world > 1 and n > shard:
                    hint += " (unchanged: every rank's shard must be updated and all-gathered)"
                if custom:
                    hint += f" (betas={betas}, eps={eps}: use the arguments, not Adam's defaults)"
                c.fail(name, "parameters differ from torch.optim.Adam on the averaged gradient" + hint, args)
            flat = got.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                try:
                    full = torch.cat([s[key] for s in states])[:n]
                except (TypeError, KeyError, RuntimeError):
                    c.fail(name, f"shard_states must stay a list of dicts holding {key!r} tensors", args)
                if full.shape != (n,) or not torch.allclose(full, adam.state[ref][key], rtol=1e-9, atol=1e-12):
                    c.fail(name, f"{key} shards differ from Adam's {'first' if key == 'exp_avg' else 'second'} "
                                 f"moment at step {step} (update the state dicts in place)", args)


# ---- paged KV cache --------------------------------------------------------------------------------

_GATHER_PARAMS = ("k_pool", "v_pool", "block_table", "seq_len")


def _paged_pools(seed, n_blocks, block_size, heads, head_dim, table, seq_len, dtype=torch.float32,
                 table_dtype=torch.int64, short=False):
    """Pools full of other data (random: other sequences, stale slots) with one sequence of ``seq_len``
    tokens written into them token by token through ``table``. The expected gather is that sequence
    itself, so the reference is the data the check wrote, not another gather. ``short``: values with one
    decimal (readable in visible feedback)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        x = torch.randn(shape, generator=g)
        return ((x * 10).round() / 10 if short else x).to(dtype)
    shape = (n_blocks, block_size, heads, head_dim)
    k_pool, v_pool = draw(*shape), draw(*shape)
    keys, values = draw(seq_len, heads, head_dim), draw(seq_len, heads, head_dim)
    for t in range(seq_len):
        k_pool[table[t // block_size], t % block_size] = keys[t]
        v_pool[table[t // block_size], t % block_size] = values[t]
    return k_pool, v_pool, torch.tensor(table, dtype=table_dtype), keys, values


def _tokens(n):
    return f"{n} token" + ("" if n == 1 else "s")


def _misreading(got, k_pool, table, seq_len):
    """Which common misreading of the block table ``got`` (keys) matches, as a hint; "" if none."""
    block_size = k_pool.shape[1]
    t = torch.arange(seq_len)
    readings = {
        "logical block i was read from physical block i: look its physical block up in block_table":
            lambda: k_pool[t // block_size, t % block_size],
        "the blocks were read as if consecutive in the pool from block_table[0]; a sequence's blocks can "
        "be anywhere, in any order: read block_table[i] for logical block i":
            lambda: k_pool.reshape(-1, *k_pool.shape[2:])[int(table[0]) * block_size + t],
        "block number and slot are swapped: token t is in block block_table[t // block_size] at slot "
        "t % block_size": lambda: k_pool[table[t % block_size], t // block_size],
    }
    for hint, read in readings.items():
        try:
            if torch.equal(read(), got):
                return hint
        except (IndexError, RuntimeError):
            continue
    return ""


def check_paged_kv_gather(impl, *, hidden: bool = False) -> None:
    """Gather one sequence out of block pools through its block table, against the sequence the check
    wrote into pools of random other data (vLLM's layout, Kwon et al. 2023): permuted tables, a partly
    filled or exactly full last block, spare blocks, seq_len 0, half-precision pools, int32 tables, and
    every documented error."""
    c = Checker("paged_kv_gather", impl, hidden, params=_GATHER_PARAMS)
    # (case, seed, n_blocks, block_size, n_kv_heads, head_dim, table, seq_len, pool dtype, table dtype)
    if not hidden:
        cases = [("permuted table, partly filled last block", 1, 5, 3, 2, 2, [1, 4, 0], 7, None, None),
                 ("last block exactly full", 2, 5, 3, 2, 2, [2, 0], 6, None, None)]
    else:
        f16, bf16, f64, i32 = torch.float16, torch.bfloat16, torch.float64, torch.int32
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(9)).tolist()
        cases = [("seq_len 0, empty block table", 3, 4, 4, 2, 3, [], 0, None, None),
                 ("seq_len 0, a table with blocks", 4, 4, 4, 2, 3, [2, 1], 0, None, None),
                 ("one token", 5, 6, 4, 2, 3, [4], 1, None, None),
                 ("last block exactly full, no spare block", 6, 9, 4, 3, 2, [8, 1, 5, 3], 16, None, None),
                 ("spare blocks at the end of the table", 7, 9, 4, 2, 3, [6, 0, 3, 8, 2], 9, None, None),
                 ("block_size 1", 8, 10, 1, 2, 2, [9, 3, 0, 7, 1, 4, 8], 7, None, None),
                 ("sequence inside one block", 10, 4, 16, 2, 3, [3], 5, None, None),
                 ("block 0 and the last block", 11, 6, 4, 2, 3, [5, 0, 2], 9, None, None),
                 ("blocks in descending order", 12, 8, 3, 2, 3, [7, 6, 5, 4], 11, None, None),
                 ("one KV head (MQA), head_dim 1", 13, 5, 4, 1, 1, [1, 4, 2], 10, None, None),
                 ("float16 pools", 14, 8, 4, 2, 3, [6, 1, 3], 10, f16, None),
                 ("bfloat16 pools", 15, 8, 4, 2, 3, [2, 7, 0], 11, bf16, None),
                 ("float64 pools", 16, 8, 4, 2, 3, [4, 5, 1], 9, f64, None),
                 ("int32 block table", 17, 8, 4, 2, 3, [7, 3, 1, 6], 14, None, i32),
                 ("SmolLM2 shapes: 3 KV heads of 64, 44 of 64 blocks of 16, 700 tokens", 18, 64, 16, 3, 64,
                  perm[:44], 700, None, None)]
    for name, seed, n_blocks, block_size, heads, head_dim, table, seq_len, dtype, table_dtype in cases:
        k_pool, v_pool, block_table, keys, values = _paged_pools(
            seed, n_blocks, block_size, heads, head_dim, table, seq_len, dtype or torch.float32,
            table_dtype or torch.int64, short=not hidden)
        args = (k_pool, v_pool, block_table, seq_len)
        got = c.call(name, *args, new=True, hint="token t is in physical block block_table[t // block_size] at "
                                                 "slot t % block_size; seq_len tokens use the first "
                                                 "ceil(seq_len / block_size) entries of the table")
        if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(isinstance(x, torch.Tensor) for x in got):
            c.fail(name, f"must return a tuple (keys, values) of two tensors, got {type(got).__name__}"
                   + (f" of {len(got)} items" if isinstance(got, (tuple, list)) else ""), args)
        expected_shape = (seq_len, heads, head_dim)
        for what, result, reference in (("keys", got[0], keys), ("values", got[1], values)):
            shape = tuple(result.shape)
            if shape != expected_shape:
                full_blocks = seq_len // block_size * block_size
                if shape == (heads, seq_len, head_dim):
                    why = "the token axis must come first: (seq_len, n_kv_heads, head_dim)"
                elif result.dim() == 3 and shape[1:] == expected_shape[1:] and shape[0] < seq_len \
                        and shape[0] == full_blocks:
                    why = (f"{_tokens(seq_len - shape[0])} of the partly filled last block missing: "
                           f"{seq_len} tokens need ceil(seq_len / block_size) blocks")
                elif result.dim() == 3 and shape[1:] == expected_shape[1:] and shape[0] > seq_len:
                    why = (f"{_tokens(shape[0] - seq_len)} too many: the unused slots of the last block and any "
                           f"spare blocks hold other data; return the first seq_len tokens only")
                elif result.dim() == 3 and shape[1:] == expected_shape[1:]:
                    why = (f"{_tokens(seq_len - shape[0])} too few: seq_len tokens span the first "
                           f"ceil(seq_len / block_size) blocks of the table, wherever they are in the pool")
                else:
                    why = "expected (seq_len, n_kv_heads, head_dim)"
                c.fail(name, f"{what} have shape {shape}, expected {expected_shape}: {why}", args)
            if result.dtype != reference.dtype:
                c.fail(name, f"{what} have dtype {result.dtype}, expected {reference.dtype} (the pools' dtype: "
                             f"copy the cached values, do not convert them)", args)
        k, v = got
        if torch.equal(k, keys) and torch.equal(v, values):
            continue
        if seq_len and torch.equal(k, values) and torch.equal(v, keys):
            c.fail(name, "keys and values are swapped: read keys from k_pool and values from v_pool", args)
        if seq_len and torch.equal(k, keys) and torch.equal(v, keys):
            c.fail(name, "values are wrong: they equal the keys (read the values from v_pool)", args)
        for what, result, reference, pool in (("keys", k, keys, k_pool), ("values", v, values, v_pool)):
            if torch.equal(result, reference):
                continue
            wrong = (result != reference).reshape(seq_len, -1).any(1).nonzero().flatten()
            t = int(wrong[0])
            hint = _misreading(result, pool, block_table, seq_len)
            c.fail(name, f"{what} are wrong: {len(wrong)} of {seq_len} tokens differ, the first is token "
                         f"{t} (logical block {t // block_size}, slot {t % block_size}; it lives in physical "
                         f"block block_table[{t // block_size}])" + (f" — {hint}" if hint else ""), args)
    if not hidden:
        k_pool, v_pool, block_table, _, _ = _paged_pools(19, 5, 3, 2, 2, [2, 0], 6, short=True)
        c.expect_raises("seq_len beyond the table's capacity", ValueError, k_pool, v_pool, block_table, 7,
                        what="2 blocks of 3 tokens hold at most 6")
        return
    k_pool, v_pool, table, _, _ = _paged_pools(20, 6, 4, 2, 3, [1, 4, 2], 10)
    bad = [("seq_len one past the capacity", ValueError, (k_pool, v_pool, table, 13),
            "3 blocks of 4 tokens hold at most 12"),
           ("seq_len beyond the capacity of an empty table", ValueError,
            (k_pool, v_pool, torch.zeros(0, dtype=torch.int64), 1), "an empty table holds no token"),
           ("negative seq_len", ValueError, (k_pool, v_pool, table, -1), "seq_len must be >= 0"),
           ("entry equal to n_blocks", ValueError, (k_pool, v_pool, torch.tensor([1, 6, 2]), 10),
            "block numbers are in [0, n_blocks)"),
           ("negative entry (would wrap around to the last block)", ValueError,
            (k_pool, v_pool, torch.tensor([1, -1, 2]), 10), "block numbers are in [0, n_blocks)"),
           ("bad entry in a spare block", ValueError, (k_pool, v_pool, torch.tensor([1, 4, 2, 17]), 10),
            "every entry must be a block number in [0, n_blocks), read or not"),
           ("v_pool of another dtype", ValueError, (k_pool, v_pool.double(), table, 10),
            "k_pool and v_pool must have the same dtype"),
           ("v_pool of another shape", ValueError, (k_pool, v_pool[:, :, :1], table, 10),
            "k_pool and v_pool must have the same shape"),
           ("3-D pools", ValueError, (k_pool[0], v_pool[0], table, 2), "pools are 4-D"),
           ("2-D block table", ValueError, (k_pool, v_pool, table[None], 10), "block_table must be 1-D"),
           ("float block table", TypeError, (k_pool, v_pool, table.float(), 10),
            "block_table must be an int32 or int64 tensor"),
           ("block table as a list", TypeError, (k_pool, v_pool, [1, 4, 2], 10),
            "block_table must be an int32 or int64 tensor"),
           ("pools as numpy arrays", TypeError, (k_pool.numpy(), v_pool.numpy(), table, 10),
            "k_pool and v_pool must be tensors")]
    for name, error, args, what in bad:
        c.expect_raises(name, error, *args, what=what)

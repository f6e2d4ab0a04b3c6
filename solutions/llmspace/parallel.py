"""Chapter 2 — parallelism on ``torch.distributed``: data parallel, ZeRO-1/2/3, FSDP2, tensor and
pipeline parallel, written so that the same code runs on CPU (gloo) and GPU (NCCL), under
``torch.multiprocessing.spawn`` or ``torchrun``.

What each strategy keeps per rank, for ``P`` parameters on ``N`` ranks (fp32 Adam: 4 + 4 + 8 bytes):

* **DDP** — everything replicated (16·P); gradients all-reduced (averaged) after backward.
* **ZeRO-1** — optimizer state sharded (4 + 4 + 8/N); after backward each full gradient is
  reduce-scattered (each rank receives the average of its shard only), each rank updates its shard of
  the parameters, then an all-gather rebuilds the full parameters. Reduce-scatter + all-gather is
  exactly the traffic of DDP's all-reduce (a ring all-reduce *is* a reduce-scatter followed by an
  all-gather): 2(N-1)/N of the gradient bytes per rank. All-reducing the gradients first and then
  all-gathering the parameters — the naive form, ``stage1_all_reduce=True`` — costs 3(N-1)/N: 1.5×.
* **ZeRO-2** — gradients sharded too (4 + 4/N + 8/N): each parameter's gradient is reduce-scattered
  the moment autograd has accumulated it, and the full-size gradient freed.
* **ZeRO-3 / FSDP** — parameters sharded as well ((4 + 4 + 8)/N): each module all-gathers its
  parameters just before its forward and again before its backward, and frees them after.
* **Tensor parallel** (Megatron-LM) — one layer's weight matrices split across ranks: a column-parallel
  linear followed by a row-parallel linear needs a single all-reduce in the forward pass and one in
  backward; activations inside the pair are sharded too.
* **Pipeline parallel** (GPipe) — layers split across ranks; ``m`` micro-batches flow through ``p``
  stages and each stage idles for a fraction ``(p - 1) / (m + p - 1)`` of the step (the bubble).

Sharding here is per parameter: each parameter is flattened, padded to a multiple of ``N`` and cut into
``N`` equal pieces. That is DeepSpeed ZeRO-3's layout (``partition_parameters.py`` pads each parameter's
element count to a multiple of the world size), but neither FSDP1's nor FSDP2's: FSDP1 flattens *all*
parameters of a unit into one padded buffer and cuts that (DeepSpeed's ZeRO-1/2 flatten each parameter
group likewise); FSDP2 keeps each parameter a ``DTensor``
chunked on dim 0 (``torch.chunk``: ``ceil(rows / N)`` rows per rank, the last ranks getting fewer or
none), so its per-rank bytes differ from ours when ``N`` does not divide the rows. Collectives: ``all_reduce``, ``reduce_scatter_single`` and
``all_gather_single`` (gloo supports all three on CPU in torch 2.13; ``reduce_scatter_tensor`` and
``all_gather_into_tensor`` are their deprecated names).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from llmspace.memory import SavedTensorLog, Transformer, TransformerConfig, storage_bytes

__all__ = [
    "spawn", "init_process", "shard_range", "ZeroAdam", "ColumnParallelLinear", "RowParallelLinear",
    "TensorParallelMLP", "gpipe_step", "gpipe_bubble_fraction", "rank_memory", "strategy_worker",
    "ring_bytes_sent",
]


# --------------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------------

def init_process(rank: int, world_size: int, store_path: str | None = None) -> None:
    """Join the default process group: gloo on CPU, NCCL when CUDA is available. With ``store_path``
    the rendezvous is a file (no ports: safe inside tests); without, the ``torchrun`` environment
    (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``) is used, multi-node included."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    init = f"file://{store_path}" if store_path else "env://"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size)


def _entry(rank, fn, world_size, store_path, args):
    torch.set_num_threads(1)          # N processes on a few cores: one thread each
    init_process(rank, world_size, store_path)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, store_dir: str, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a file store in
    ``store_dir`` (which must exist and be empty of a previous ``store``). ``fn`` must be importable."""
    store_path = os.path.join(store_dir, "store")
    mp.spawn(_entry, args=(fn, world_size, store_path, args), nprocs=world_size, join=True)


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Element range ``[start, stop)`` of rank's shard of a flat tensor padded to ``N * ceil(numel/N)``."""
    shard = -(-numel // world_size)
    return rank * shard, (rank + 1) * shard


def _pad_flat(t: torch.Tensor, world_size: int) -> torch.Tensor:
    flat = t.reshape(-1)
    shard = -(-flat.numel() // world_size)
    return F.pad(flat, (0, shard * world_size - flat.numel()))


# --------------------------------------------------------------------------------------------------
# ZeRO-1/2/3 from scratch
# --------------------------------------------------------------------------------------------------

class ZeroAdam:
    """Adam (``torch.optim.Adam`` semantics, no weight decay) with ZeRO sharding of its states.

    Construct it on every rank after the model's parameters are identical across ranks. Stage 1 shards
    the optimizer state; stage 2 also the gradients (reduce-scattered by a post-accumulate-grad hook
    as soon as each one is ready); stage 3 also the parameters, whose storage is freed between uses
    (``untyped_storage().resize_(0)``, FSDP1's trick) and all-gathered by forward / backward pre-hooks
    on the module that owns them. The fp32 parameter shard is the master copy.
    """

    def __init__(self, model: nn.Module, stage: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 stage1_all_reduce: bool = False):
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        self.model, self.stage, self.lr, self.betas, self.eps = model, stage, lr, betas, eps
        self.stage1_all_reduce = stage1_all_reduce
        #: bytes this rank passed to each collective (the full tensor's size): see :func:`ring_bytes_sent`
        self.comm = {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shards, self.exp_avg, self.exp_avg_sq, self.grad_shards = [], [], [], []
        for p in self.params:
            start, stop = shard_range(p.numel(), self.rank, self.world)
            shard = _pad_flat(p.detach(), self.world)[start:stop].clone()
            self.shards.append(shard)
            self.exp_avg.append(torch.zeros_like(shard))
            self.exp_avg_sq.append(torch.zeros_like(shard))
            self.grad_shards.append(None)
        self.steps = [0] * len(self.params)        # per parameter, as torch.optim.Adam's state["step"]
        self.handles = []
        if stage >= 2:
            for i, p in enumerate(self.params):
                self.handles.append(p.register_post_accumulate_grad_hook(self._make_grad_hook(i)))
        if stage == 3:
            self._full_nbytes = [p.untyped_storage().nbytes() for p in self.params]
            self._owner = {}
            for module in model.modules():
                own = [i for i, p in enumerate(self.params)
                       if any(p is q for q in module.parameters(recurse=False))]
                if own:
                    self._owner[module] = own
                    self.handles.append(module.register_forward_pre_hook(self._gather_hook(own)))
                    self.handles.append(module.register_forward_hook(self._free_hook(own)))
                    if not isinstance(module, nn.Embedding):   # its backward never reads the weight
                        self.handles.append(module.register_full_backward_pre_hook(self._gather_hook(own)))
            for i in range(len(self.params)):
                self._free(i)

    # ---- stage 2/3: gradient reduce-scatter ------------------------------------------------------
    def _make_grad_hook(self, i):
        def hook(p):
            out = self._reduce_scatter_grad(i, p.grad)
            self.grad_shards[i] = out if self.grad_shards[i] is None else self.grad_shards[i] + out
            p.grad = None                                     # the full-size gradient is gone
            if self.stage == 3:
                self._free(i)                                 # backward of its module is done
        return hook

    # ---- stage 3: parameter gather / free --------------------------------------------------------
    def _gather(self, i):
        p = self.params[i]
        if p.untyped_storage().nbytes() == self._full_nbytes[i]:
            return
        full = torch.empty(self.shards[i].numel() * self.world, dtype=p.dtype, device=p.device)
        dist.all_gather_single(full, self.shards[i])
        self.comm["all_gather"] += full.numel() * full.element_size()
        p.untyped_storage().resize_(self._full_nbytes[i])
        p.data.copy_(full[:p.numel()].view_as(p))             # .data: do not bump autograd's version

    def _free(self, i):
        self.params[i].untyped_storage().resize_(0)

    def _gather_hook(self, own):
        def hook(module, *args):
            for i in own:
                self._gather(i)
        return hook

    def _free_hook(self, own):
        def hook(module, args, output):
            # The backward needs these weights again, but the tensors autograd saved share this
            # storage: the backward pre-hook refills it before the module's backward runs.
            for i in own:
                self._free(i)
        return hook

    def gather_full_parameters(self) -> list:
        """Full copies of every parameter (a collective: every rank must call it)."""
        out = []
        for i, p in enumerate(self.params):
            full = torch.empty(self.shards[i].numel() * self.world, dtype=self.shards[i].dtype)
            dist.all_gather_single(full, self.shards[i])
            out.append(full[:p.numel()].view(p.shape).clone())
        return out

    def _reduce_scatter_grad(self, i, grad):
        """This rank's shard of the average over ranks of parameter i's gradient."""
        out = torch.empty_like(self.shards[i])
        padded = _pad_flat(grad, self.world)
        dist.reduce_scatter_single(out, padded)
        self.comm["reduce_scatter"] += padded.numel() * padded.element_size()
        return out.div_(self.world)

    # ---- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on this rank's shards. A parameter without a gradient on every rank (an unused
        layer) is skipped, as ``torch.optim.Adam`` skips it: no state update, its step count unchanged.
        A parameter used on some ranks but not on others is not supported (as DDP without
        ``find_unused_parameters``): its collectives would not match."""
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if self.stage == 1:
                if p.grad is None:
                    continue
                if self.stage1_all_reduce:                   # naive form: 1.5x DDP's traffic
                    g = p.grad.detach().clone()
                    dist.all_reduce(g)
                    self.comm["all_reduce"] += g.numel() * g.element_size()
                    start, stop = shard_range(p.numel(), self.rank, self.world)
                    grad = _pad_flat(g / self.world, self.world)[start:stop]
                else:                                        # reduce-scatter: DDP's traffic
                    grad = self._reduce_scatter_grad(i, p.grad.detach())
            else:
                grad = self.grad_shards[i]
                if grad is None:
                    continue
            self.steps[i] += 1
            step = self.steps[i]
            m, v, shard = self.exp_avg[i], self.exp_avg_sq[i], self.shards[i]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v / (1 - beta2 ** step)).sqrt_().add_(self.eps)
            shard.addcdiv_(m, denom, value=-self.lr / (1 - beta1 ** step))
            if self.stage < 3:                               # rebuild the full parameter everywhere
                full = torch.empty(shard.numel() * self.world, dtype=shard.dtype, device=shard.device)
                dist.all_gather_single(full, shard)
                self.comm["all_gather"] += full.numel() * full.element_size()
                p.copy_(full[:p.numel()].view_as(p))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.grad_shards = [None] * len(self.params)

    def memory(self) -> dict:
        """Bytes this rank holds now: ``params`` (live parameter storages, plus the shards under
        stage 3 where they are the only persistent copy), ``grads``, ``optimizer``."""
        params = storage_bytes(self.params) + (storage_bytes(self.shards) if self.stage == 3 else 0)
        grads = storage_bytes([p.grad for p in self.params if p.grad is not None]) + \
            storage_bytes([g for g in self.grad_shards if g is not None])
        return {"params": params, "grads": grads, "optimizer": storage_bytes(self.exp_avg + self.exp_avg_sq)}


def ring_bytes_sent(comm: dict, world_size: int) -> float:
    """Bytes one rank sends for the collectives in ``comm`` (``{"all_reduce": S, "reduce_scatter": S,
    "all_gather": S}``, S = bytes of the full tensor) under the ring algorithms: all-reduce
    ``2(N-1)/N·S`` (a reduce-scatter then an all-gather), reduce-scatter and all-gather ``(N-1)/N·S``
    each (Patarasuk & Yuan 2009; the NCCL performance notes' "bus bandwidth" factors)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    f = (world_size - 1) / world_size
    return f * (2 * comm.get("all_reduce", 0) + comm.get("reduce_scatter", 0) + comm.get("all_gather", 0))


# --------------------------------------------------------------------------------------------------
# Tensor parallel (Megatron-LM): column- then row-parallel linear, one all-reduce each way
# --------------------------------------------------------------------------------------------------

class _CopyToParallel(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient in backward (the input is used by every rank)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class _ReduceFromParallel(torch.autograd.Function):
    """All-reduce (sum of partial products) forward; identity backward."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class ColumnParallelLinear(nn.Module):
    """``y[..., shard] = x @ W[shard, :]ᵀ + b[shard]``: this rank's slice of the output features.
    Built from a full ``nn.Linear`` (same on every rank) by keeping rows ``[r*out/N, (r+1)*out/N)``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        rank, world = dist.get_rank(), dist.get_world_size()
        if linear.out_features % world:
            raise ValueError(f"out_features ({linear.out_features}) must be divisible by world size ({world})")
        rows = linear.out_features // world
        self.weight = nn.Parameter(linear.weight.detach()[rank * rows:(rank + 1) * rows].clone())
        self.bias = (nn.Parameter(linear.bias.detach()[rank * rows:(rank + 1) * rows].clone())
                     if linear.bias is not None else None)

    def forward(self, x):
        return F.linear(_CopyToParallel.apply(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x[..., shard] @ W[:, shard]ᵀ) + b``: the input arrives sharded by feature (the
    output of a :class:`ColumnParallelLinear`), each rank multiplies its columns, one all-reduce sums."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        rank, world = dist.get_rank(), dist.get_world_size()
        if linear.in_features % world:
            raise ValueError(f"in_features ({linear.in_features}) must be divisible by world size ({world})")
        cols = linear.in_features // world
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x_shard):
        y = _ReduceFromParallel.apply(F.linear(x_shard, self.weight))
        return y + self.bias if self.bias is not None else y


class TensorParallelMLP(nn.Module):
    """A GELU MLP (``llmspace.memory.MLP``) split over the ranks: up = column-parallel, down =
    row-parallel. The ``d_ff`` activations on each rank are ``1/N`` of the full ones."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        if getattr(mlp, "gated", False):
            raise ValueError("TensorParallelMLP supports the GELU MLP only")
        self.up, self.down = ColumnParallelLinear(mlp.up), RowParallelLinear(mlp.down)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


# --------------------------------------------------------------------------------------------------
# Pipeline parallel: GPipe
# --------------------------------------------------------------------------------------------------

def gpipe_bubble_fraction(n_stages: int, n_micro_batches: int) -> float:
    """Idle fraction of a GPipe step: ``(p - 1) / (m + p - 1)`` (Huang et al. 2019), with equal
    stage times. Every stage works ``m`` slots out of ``m + p - 1`` in the forward and again in backward."""
    if n_stages < 1 or n_micro_batches < 1:
        raise ValueError(f"n_stages and n_micro_batches must be >= 1, got {n_stages}, {n_micro_batches}")
    return (n_stages - 1) / (n_micro_batches + n_stages - 1)


def gpipe_step(stage: nn.Module, rank: int, world_size: int, inputs, targets, n_micro_batches: int,
               loss_fn, act_shape) -> dict:
    """One GPipe step for this rank's ``stage``: all micro-batch forwards, then all backwards.

    ``inputs`` (rank 0) and ``targets`` (last rank) are the full batch; ``act_shape`` is the shape of
    one micro-batch's activation passed between stages (point-to-point ``send``/``recv``). The last stage
    computes ``loss_fn(out, y) / m`` per micro-batch, so accumulated gradients equal the full-batch
    mean's. Returns ``loss`` (last rank; sum of the micro-batch terms), ``busy_s`` and ``wall_s``
    (compute time vs step time on this rank) and ``saved_bytes`` (activations this stage held at the
    end of the forward phase — all ``m`` micro-batches', GPipe's memory cost).

    Raises ValueError, before any communication, when ``n_micro_batches`` does not divide the batch
    this rank holds (``inputs`` on the first stage, ``targets`` on the last) or ``act_shape[0] × m``
    differs from it. (A middle stage holds neither and trusts ``act_shape``.)
    """
    # validate on every rank before the first send/recv: a rank that fails later would leave its
    # peers blocked in a collective (or abort the process group)
    if not isinstance(n_micro_batches, int) or isinstance(n_micro_batches, bool) or n_micro_batches < 1:
        raise ValueError(f"n_micro_batches must be a positive int, got {n_micro_batches!r}")
    first, last = rank == 0, rank == world_size - 1
    for name, batch in (("inputs", inputs if first else None), ("targets", targets if last else None)):
        if batch is None:
            continue
        if len(batch) % n_micro_batches:
            raise ValueError(f"the batch size of {name} ({len(batch)}) must be divisible by n_micro_batches "
                             f"({n_micro_batches}): every micro-batch must have the shape act_shape")
        if act_shape[0] * n_micro_batches != len(batch):
            raise ValueError(f"act_shape[0] ({act_shape[0]}) × n_micro_batches ({n_micro_batches}) must equal "
                             f"the batch size of {name} ({len(batch)})")
    outs, ins, busy, total = [], [], 0.0, torch.zeros(())
    start = time.perf_counter()
    x_chunks = inputs.chunk(n_micro_batches) if first else [None] * n_micro_batches
    y_chunks = targets.chunk(n_micro_batches) if last else [None] * n_micro_batches
    with SavedTensorLog(exclude=list(stage.parameters())) as log:
        for x, y in zip(x_chunks, y_chunks):
            if not first:
                x = torch.empty(act_shape)
                dist.recv(x, src=rank - 1)
                x.requires_grad_(True)
            t = time.perf_counter()
            out = stage(x)
            if last:
                out = loss_fn(out, y) / n_micro_batches
                total += out.detach()
            busy += time.perf_counter() - t
            if not last:
                dist.send(out.detach().contiguous(), dst=rank + 1)
            ins.append(x)
            outs.append(out)
    for x, out in zip(reversed(ins), reversed(outs)):
        if last:
            grad = None
        else:
            grad = torch.empty(act_shape)
            dist.recv(grad, src=rank + 1)
        t = time.perf_counter()
        out.backward(grad)
        busy += time.perf_counter() - t
        if not first:
            dist.send(x.grad.contiguous(), dst=rank - 1)
    return {"loss": total, "busy_s": busy, "wall_s": time.perf_counter() - start, "saved_bytes": log.bytes}


# --------------------------------------------------------------------------------------------------
# Memory per rank, and the worker the tests and the benchmark run
# --------------------------------------------------------------------------------------------------

def rank_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state this rank holds (DTensors: the local shard)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    params = list(model.parameters())
    state = [local(v) for s in optimizer.state.values() for k, v in s.items()
             if torch.is_tensor(v) and k != "step"]
    return {"params": storage_bytes(local(p) for p in params),
            "grads": storage_bytes(local(p.grad) for p in params if p.grad is not None),
            "optimizer": storage_bytes(state)}


def _data(config: TransformerConfig, global_batch: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (global_batch, seq_len), generator=g)
    targets = torch.randint(0, config.vocab_size, (global_batch, seq_len), generator=g)
    return tokens, targets


def _model(config: TransformerConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config)


def strategy_worker(rank: int, world_size: int, out_dir: str, config: TransformerConfig,
                    global_batch: int, seq_len: int, steps: int, strategies: tuple) -> None:
    """Train ``config`` for ``steps`` Adam steps with each of ``strategies`` (``"ddp"``, ``"zero1"``,
    ``"zero2"``, ``"zero3"``, ``"fsdp2"``, ``"tp"``, ``"pp"``) and save, per rank, to
    ``out_dir/rank{r}.pt``: losses, final full parameters (rank 0 only, for comparison), per-rank
    memory after the last step, and timings. Every rank sees ``global_batch / world_size`` sequences."""
    tokens, targets = _data(config, global_batch, seq_len)
    local = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
    results = {}
    lr = 1e-2

    def record(name, losses, params, memory, seconds):
        results[name] = {"losses": losses, "memory": memory, "seconds": seconds,
                         "params": [p.detach().clone() for p in params] if rank == 0 else None}

    for name in strategies:
        start = time.perf_counter()
        model = _model(config)
        losses = []
        if name == "ddp":
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.Adam(ddp.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(ddp(tokens[local]).flatten(0, 1), targets[local].flatten())
                loss.backward()
                opt.step()
                losses.append(_mean_over_ranks(loss))
            record(name, losses, model.parameters(), rank_memory(model, opt), time.perf_counter() - start)
        elif name.startswith("zero"):
            # "zero1", "zero2", "zero3"; "zero1-allreduce": ZeRO-1 in its naive all-reduce form;
            # "zeroN-unused": the model carries a layer that never runs (no gradient), which Adam skips
            stage = int(name[4])
            if name.endswith("-unused"):
                model.unused = nn.Linear(config.d_model, config.d_model, bias=False)
            opt = ZeroAdam(model, stage=stage, lr=lr, stage1_all_reduce=name.endswith("-allreduce"))
            for _ in range(steps):
                opt.zero_grad()
                loss = model.loss(tokens[local], targets[local])
                loss.backward()
                opt.step()
                losses.append(_mean_over_ranks(loss))
            memory = opt.memory()
            full = opt.gather_full_parameters()
            record(name, losses, full, memory, time.perf_counter() - start)
            results[name]["comm"] = dict(opt.comm)
        elif name == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = model.loss(tokens[local], targets[local])
                loss.backward()
                opt.step()
                losses.append(_mean_over_ranks(loss))
            memory = rank_memory(model, opt)
            full = [p.full_tensor() for p in model.parameters()]
            record(name, losses, full, memory, time.perf_counter() - start)
        elif name == "tp":
            results[name] = _tensor_parallel_check(config, rank, world_size, seq_len)
        elif name == "pp":
            results[name] = _pipeline_check(config, rank, world_size, tokens, targets, steps, lr)
        else:
            raise ValueError(f"unknown strategy {name!r}")
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _mean_over_ranks(loss: torch.Tensor) -> float:
    t = loss.detach().clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _tensor_parallel_check(config, rank, world_size, seq_len) -> dict:
    """Tensor-parallel MLP vs the full MLP: outputs, input gradient and weight-gradient shards."""
    model = _model(config)
    mlp = model.blocks[0].mlp
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, seq_len, config.d_model, generator=g, requires_grad=True)
    x_tp = x.detach().clone().requires_grad_(True)
    y = mlp(x)
    y.square().sum().backward()
    y = y.detach()
    tp = TensorParallelMLP(mlp)
    with SavedTensorLog(exclude=list(tp.parameters())) as log:
        y_tp = tp(x_tp)
    y_tp.square().sum().backward()
    rows = config.d_ff // world_size
    with SavedTensorLog(exclude=list(mlp.parameters())) as full_log:
        mlp(x).sum()
    y_tp = y_tp.detach()
    return {"out_err": float((y_tp - y).abs().max()), "grad_x_err": float((x_tp.grad - x.grad).abs().max()),
            "grad_up_err": float((tp.up.weight.grad - mlp.up.weight.grad[rank * rows:(rank + 1) * rows]).abs().max()),
            "grad_down_err": float((tp.down.weight.grad - mlp.down.weight.grad[:, rank * rows:(rank + 1) * rows]).abs().max()),
            "saved_bytes": log.bytes, "saved_bytes_full": full_log.bytes,
            "param_bytes": storage_bytes(tp.parameters()), "param_bytes_full": storage_bytes(mlp.parameters())}


class _Stage(nn.Module):
    def __init__(self, model: Transformer, rank: int, world_size: int):
        super().__init__()
        n = len(model.blocks)
        per = math.ceil(n / world_size)
        self.first, self.last = rank == 0, rank == world_size - 1
        self.model = model
        self.blocks = nn.ModuleList(model.blocks[rank * per:(rank + 1) * per])

    def forward(self, x):
        if self.first:
            x = self.model.embed_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.model.head(self.model.norm(x)) if self.last else x

    def stage_parameters(self):
        own = list(self.blocks.parameters())
        if self.first:
            own += list(self.model.embed.parameters()) + (list(self.model.pos.parameters())
                                                          if self.model.pos is not None else [])
        if self.last:
            own += list(self.model.norm.parameters()) + list(self.model.head.parameters())
        return own


def _pipeline_check(config, rank, world_size, tokens, targets, steps, lr, n_micro_batches: int = 4) -> dict:
    """GPipe over ``world_size`` stages on the full batch (every rank holds one stage)."""
    model = _model(config)
    stage = _Stage(model, rank, world_size)
    opt = torch.optim.Adam(stage.stage_parameters(), lr=lr)
    B, T = tokens.shape
    act_shape = (B // n_micro_batches, T, config.d_model)

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    losses, busy, wall, saved = [], 0.0, 0.0, 0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = gpipe_step(stage, rank, world_size, tokens, targets, n_micro_batches, loss_fn, act_shape)
        opt.step()
        loss = out["loss"].clone()
        dist.broadcast(loss, src=world_size - 1)
        losses.append(float(loss))
        busy, wall, saved = busy + out["busy_s"], wall + out["wall_s"], out["saved_bytes"]
    return {"losses": losses, "busy_s": busy, "wall_s": wall, "saved_bytes": saved,
            "n_micro_batches": n_micro_batches,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()
                       if any(p is q for q in stage.stage_parameters())}}


def main(argv=None) -> None:
    """Under ``torchrun`` (one node or many): ``torchrun --nproc-per-node 2 -m llmspace.parallel OUT_DIR``
    trains a small model with every strategy and writes ``OUT_DIR/rank{r}.pt`` (as the tests do)."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--strategies", default="ddp,zero1,zero2,zero3,fsdp2,tp,pp")
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_process(rank, world_size)                      # env:// rendezvous set up by torchrun
    try:
        config = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                   max_seq_len=16, bias=False)
        strategy_worker(rank, world_size, args.out_dir, config, 4 * world_size, 16, 3,
                        tuple(args.strategies.split(",")))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

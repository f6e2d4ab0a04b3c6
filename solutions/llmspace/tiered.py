"""Chapter 6 (continued) — tiered weight storage for offloaded inference: device → host → disk.

When a model does not fit in accelerator memory, its layers live in a hierarchy: a few on the device,
more in host RAM, all of them on disk. A forward pass touches layers 0, 1, …, L−1 in order, token
after token, so the access pattern is a *cyclic scan* — the one pattern where LRU is at its worst: with
room for k < L layers, each layer has been evicted by the time the scan comes back to it, and the hit
rate is exactly 0. What makes offloading work is not the cache policy but **prefetching**: start moving
layer i+1 while layer i computes, so that the transfer hides behind compute whenever
``layer_bytes / bandwidth <= compute time``.

* :func:`simulate_lru` — replay an access trace through a byte-bounded LRU cache (the exercise).
* :class:`TieredLayerCache` — byte-bounded LRU tiers over a safetensors checkpoint, with a background
  prefetch of the next layer (a worker thread; on CUDA its copy runs on a side stream), counting hits
  per tier and bytes moved per link, and recording each call's measured wait;
  :meth:`TieredLayerCache.simulated_seconds` turns the per-call trace into time for given link
  bandwidths (e.g. NVMe 3 GB/s, PCIe 4 ×16 25 GB/s), layer by layer: a prefetch hides only behind the
  compute it overlaps.
* :func:`offloaded_forward` — run a stack of blocks whose weights stay in (pinned) host memory,
  copying block i+1 to the GPU with ``non_blocking=True`` on a side CUDA stream while block i
  computes. On the CPU a worker thread makes the copy of block i+1 while block i computes.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from llmspace.storage.format import SafetensorsFile, tensor_bytes
from llmspace.storage.sharding import _checkpoint_plan

__all__ = ["simulate_lru", "TieredLayerCache", "offloaded_forward", "pin_module", "upload_weights"]


# Caching (exercise task 4 of ex06_storage)

def simulate_lru(accesses, layer_bytes, capacity_bytes: int) -> dict:
    """Replay layer accesses through an LRU cache that holds at most ``capacity_bytes``.

    Args:
        accesses: sequence of layer ids (ints), in access order.
        layer_bytes: ``layer_bytes[i]`` is the size in bytes of layer ``i`` (a list or a dict).
        capacity_bytes: non-negative int.

    Behaviour per access: a resident layer is a *hit* and becomes the most recently used. Otherwise it
    is a *miss*: its bytes are loaded (``bytes_loaded += layer_bytes[i]``); if it fits in the cache at
    all, least recently used layers are evicted (``evictions`` counts them) until it fits, and it is
    inserted as the most recently used. A layer larger than the whole cache is loaded, used and not
    kept (nothing is evicted for it).

    Returns:
        ``{"hits": int, "misses": int, "bytes_loaded": int, "evictions": int}``.

    Raises:
        ValueError: if ``capacity_bytes`` is negative.
    """
    if capacity_bytes < 0:
        raise ValueError(f"capacity_bytes must be non-negative, got {capacity_bytes}")
    ### BEGIN SOLUTION
    cache = OrderedDict()              # layer id -> bytes, least recently used first
    used = hits = misses = loaded = evictions = 0
    for layer in accesses:
        if layer in cache:
            hits += 1
            cache.move_to_end(layer)
            continue
        misses += 1
        size = layer_bytes[layer]
        loaded += size
        if size > capacity_bytes:
            continue
        while used + size > capacity_bytes:
            _, freed = cache.popitem(last=False)
            used -= freed
            evictions += 1
        cache[layer] = size
        used += size
    return {"hits": hits, "misses": misses, "bytes_loaded": loaded, "evictions": evictions}
    ### END SOLUTION


class _LRUTier:
    """name -> value, bounded by total bytes; least recently used first."""

    def __init__(self, capacity_bytes: int):
        self.capacity, self.used, self.items = capacity_bytes, 0, OrderedDict()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        return None

    def put(self, key, value, nbytes: int, keep=()) -> bool:
        """Insert as most recent, evicting LRU entries (never those in ``keep``); False if it can't fit."""
        if nbytes > self.capacity:
            return False
        while self.used + nbytes > self.capacity:
            victim = next((k for k in self.items if k not in keep), None)
            if victim is None:
                return False
            self.used -= self.items.pop(victim)[1]
        self.items[key] = (value, nbytes)
        self.used += nbytes
        return True


class _Pending:
    """A tier entry still in flight: ``part`` of the prefetch future's ``(host, device)`` result."""

    def __init__(self, future, part: int):
        self.future, self.part = future, part

    def result(self) -> dict:
        return self.future.result()[self.part]


def _resolve(value):
    return value.result() if isinstance(value, _Pending) else value


class TieredLayerCache:
    """Layer weights served from device memory, host RAM or disk, with LRU tiers and prefetch.

    Args:
        checkpoint: a ``.safetensors`` file or a sharded ``*.index.json`` (each tensor read from the
            shard the index names).
        n_layers: number of layers; layer ``i`` is every tensor whose name starts with
            ``layer_prefix.format(i)``.
        device_bytes, host_bytes: capacities of the two cached tiers, in bytes.
        device: where :meth:`get` returns tensors (``"cpu"`` simulates the device tier with copies).
        prefetch: after serving layer i, bring layer ``(i + 1) % n_layers`` to the device tier **in the
            background**: a worker thread reads it from disk and copies it (on CUDA, on a side stream
            whose event the compute stream waits for), while the caller computes with layer i.
        pin_host: keep host-tier copies in pinned memory (only with CUDA available).

    ``stats`` counts, per :meth:`get`, where the layer was found (``device``/``host``/``disk``; a layer
    brought to the device by a prefetch counts as ``prefetched``) and the bytes moved on each link,
    demand and prefetch separately. ``trace`` has one record per :meth:`get`: the layer, its tier, the
    demand bytes it moved, the bytes of the prefetch issued after it, and ``wait_s``, the wall time the
    call spent waiting (for a demand load, or for an unfinished prefetch) — the measured stall.
    """

    def __init__(self, checkpoint, n_layers: int, device_bytes: int, host_bytes: int,
                 layer_prefix: str = "layers.{}.", device="cpu", prefetch: bool = True,
                 pin_host: bool = False):
        if n_layers <= 0:
            raise ValueError(f"n_layers must be positive, got {n_layers}")
        if device_bytes < 0 or host_bytes < 0:
            raise ValueError(f"capacities must be non-negative, got device_bytes={device_bytes}, "
                             f"host_bytes={host_bytes}")
        plan = _checkpoint_plan(checkpoint)
        self.files = [(SafetensorsFile(f), listed) for f, listed in plan]
        self.names = []
        for i in range(n_layers):
            prefix = layer_prefix.format(i)
            names = [(f, n) for f, listed in self.files for n in listed if n.startswith(prefix)]
            if not names:
                raise ValueError(f"no tensor in the checkpoint starts with {prefix!r}")
            self.names.append(names)
        self.layer_bytes = [sum(tensor_bytes(f[n]) for f, n in names) for names in self.names]
        self.n_layers, self.device, self.prefetch = n_layers, torch.device(device), prefetch
        self.pin_host = pin_host and torch.cuda.is_available()
        self.device_tier, self.host_tier = _LRUTier(device_bytes), _LRUTier(host_bytes)
        self._prefetched = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if prefetch else None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = {"device": 0, "prefetched": 0, "host": 0, "disk": 0,
                      "bytes": {"disk->host": 0, "host->device": 0},
                      "prefetch_bytes": {"disk->host": 0, "host->device": 0}}
        self.trace = []

    # ---- moving one layer between tiers (the data work: runs on the worker thread for prefetches) ----

    def _read_layer(self, i: int) -> dict:
        """Layer ``i`` copied out of the mapping into memory the host tier owns (pinned if asked),
        like a real loader filling a staging buffer from NVMe. The slow part; override to simulate."""
        layer = {}
        for f, name in self.names[i]:
            t = f[name]
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_host)
            host.copy_(t)
            layer[name] = host
        return layer

    def _copy_to_device(self, layer: dict) -> dict:
        if self.device.type == "cpu":
            return {n: t.clone() for n, t in layer.items()}   # a real copy, as a transfer would be
        return {n: t.to(self.device, non_blocking=self.pin_host) for n, t in layer.items()}

    def _fetch(self, i: int, host) -> tuple[dict, dict]:
        """(host copy, device copy) of layer i; ``host`` is the host-tier entry or None (read disk)."""
        host = self._read_layer(i) if host is None else _resolve(host)
        if self._stream is None:
            return host, self._copy_to_device(host)
        with torch.cuda.stream(self._stream):
            on_device = self._copy_to_device(host)
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, (on_device, done)

    def _bring_to_device(self, i: int, counter: str, keep=(), background: bool = False) -> tuple[object, str]:
        found = self.device_tier.get(i)
        if found is not None:
            return found, "device"
        host = self.host_tier.get(i)
        tier = "host" if host is not None else "disk"
        if tier == "disk":
            self.stats[counter]["disk->host"] += self.layer_bytes[i]
        self.stats[counter]["host->device"] += self.layer_bytes[i]
        if background:
            future = self._pool.submit(self._fetch, i, host)
            new_host, on_device = _Pending(future, 0), _Pending(future, 1)
        else:
            new_host, on_device = self._fetch(i, host)
        if tier == "disk":
            self.host_tier.put(i, new_host, self.layer_bytes[i])
        self.device_tier.put(i, on_device, self.layer_bytes[i], keep=keep)
        return on_device, tier

    def _ready(self, value) -> dict:
        value = _resolve(value)
        if isinstance(value, tuple):           # CUDA: (tensors, event) — order the compute stream after it
            tensors, done = value
            torch.cuda.current_stream(self.device).wait_event(done)
            for t in tensors.values():
                t.record_stream(torch.cuda.current_stream(self.device))
            return tensors
        return value

    # ---- public ---------------------------------------------------------------------------------

    def get(self, i: int) -> dict:
        """Layer ``i``'s tensors (name → tensor on ``device``); starts prefetching layer i+1 before
        returning, so that it loads while the caller computes with layer i."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range [0, {self.n_layers})")
        start = time.perf_counter()
        before = dict(self.stats["bytes"])
        layer, tier = self._bring_to_device(i, "bytes")
        layer = self._ready(layer)
        wait = time.perf_counter() - start
        if tier == "device" and i in self._prefetched:
            tier = "prefetched"
        self._prefetched.discard(i)
        self.stats[tier] += 1
        record = {"layer": i, "tier": tier, "wait_s": wait,
                  "demand_bytes": {k: self.stats["bytes"][k] - before[k] for k in before},
                  "prefetch_bytes": {"disk->host": 0, "host->device": 0}}
        if self.prefetch and self.n_layers > 1:
            nxt = (i + 1) % self.n_layers
            if self.device_tier.get(nxt) is None:
                before = dict(self.stats["prefetch_bytes"])
                self._bring_to_device(nxt, "prefetch_bytes", keep={i}, background=True)
                record["prefetch_bytes"] = {k: self.stats["prefetch_bytes"][k] - before[k] for k in before}
                if self.device_tier.get(nxt) is not None:
                    self._prefetched.add(nxt)
            self.device_tier.get(i)  # keep layer i the most recent: it is the one in use
        self.trace.append(record)
        return layer

    def close(self) -> None:
        """Wait for a prefetch in flight and stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def hit_rate(self) -> float:
        """Fraction of :meth:`get` calls served from the device tier (prefetched counts as a hit)."""
        total = sum(self.stats[k] for k in ("device", "prefetched", "host", "disk"))
        return (self.stats["device"] + self.stats["prefetched"]) / max(total, 1)

    def simulated_seconds(self, disk_GBps: float, host_to_device_GBps: float,
                          compute_seconds_per_layer=0.0) -> dict:
        """Time the recorded trace would take on links of the given bandwidths, **per layer**: call k
        stalls for its demand transfers plus whatever the prefetch issued at call k−1 takes beyond
        call k−1's compute (a prefetch only hides behind the compute it overlaps — one large layer
        among small ones stalls even when the totals would balance).

        Args:
            compute_seconds_per_layer: seconds of compute per layer, one float for all layers or a
                sequence indexed by layer id.

        Returns ``{"stall_s", "compute_s", "total_s", "per_call_stall_s": [...]}``.
        """
        def seconds(moved):
            return moved["disk->host"] / (disk_GBps * 1e9) + moved["host->device"] / (host_to_device_GBps * 1e9)

        def compute_of(layer):
            if isinstance(compute_seconds_per_layer, (int, float)):
                return float(compute_seconds_per_layer)
            return float(compute_seconds_per_layer[layer])

        stalls, compute, previous = [], 0.0, None
        for record in self.trace:
            stall = seconds(record["demand_bytes"])
            if previous is not None:
                stall += max(0.0, seconds(previous["prefetch_bytes"]) - compute_of(previous["layer"]))
            stalls.append(stall)
            compute += compute_of(record["layer"])
            previous = record
        return {"stall_s": sum(stalls), "compute_s": compute, "total_s": sum(stalls) + compute,
                "per_call_stall_s": stalls}


def pin_module(module: torch.nn.Module) -> torch.nn.Module:
    """Move a CPU module's parameters and buffers into pinned (page-locked) memory, which the GPU can
    copy from asynchronously with DMA. A no-op without CUDA (pinning needs a CUDA driver)."""
    if torch.cuda.is_available():
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = t.data.pin_memory()
    return module


def upload_weights(block: torch.nn.Module, device) -> dict:
    """``block``'s state dict copied to ``device`` (``non_blocking``: asynchronous when the source is
    pinned and the current stream is a CUDA side stream). On the CPU, real copies."""
    device = torch.device(device)
    if device.type == "cpu":
        return {n: t.detach().clone() for n, t in block.state_dict().items()}
    return {n: t.to(device, non_blocking=True) for n, t in block.state_dict().items()}


def offloaded_forward(blocks, x: torch.Tensor, device=None) -> torch.Tensor:
    """Run ``x`` through ``blocks`` (a sequence of modules whose weights stay in host memory) on
    ``device``, holding at most two blocks' weights there: the one computing and the next one,
    which is copied meanwhile on a side stream (CUDA) or by a worker thread (CPU).

    Returns the output on ``device``; equals ``blocks[-1](...blocks[0](x))`` on the host.
    """
    device = torch.device(device if device is not None else x.device)
    call = torch.func.functional_call
    x = x.to(device)
    if device.type != "cuda":   # a worker thread copies block i+1 while block i computes
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload") as pool:
            upcoming = pool.submit(upload_weights, blocks[0], device)
            for i, block in enumerate(blocks):
                weights = upcoming.result()
                if i + 1 < len(blocks):
                    upcoming = pool.submit(upload_weights, blocks[i + 1], device)
                x = call(block, weights, (x,))
        return x
    compute, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        upcoming = upload_weights(blocks[0], device)
    for i, block in enumerate(blocks):
        compute.wait_stream(side)               # block i's weights have arrived
        weights = upcoming
        for t in weights.values():
            t.record_stream(compute)            # allocated on `side`, used on `compute`: don't recycle early
        if i + 1 < len(blocks):
            with torch.cuda.stream(side):       # overlaps the compute below
                upcoming = upload_weights(blocks[i + 1], device)
        x = call(block, weights, (x,))
        del weights
    return x

"""TinyLM: a small causal transformer over bytes, trained here on the standard library's source.

Part of :mod:`llmspace.models`; see the package docstring.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


ASSETS = Path(__file__).resolve().parent.parent / "assets"   # llmspace/assets
TINY_LM_WEIGHTS = ASSETS / "tiny_lm.safetensors"
TINY_LM_RECORD = ASSETS / "tiny_lm.json"
VALIDATION_EVERY = 10        # file i of the sorted list is validation when i % 10 == 9
# The tiny LM's one evaluation slice, used by every page and benchmark: the whole validation split (16 files,
# 413,540 bytes) cut into its 3,205 non-overlapping windows of 129 bytes (the last 95 bytes fit no window).
EVAL_BYTES = 3205 * 129


# --------------------------------------------------------------------------------------------------
# Corpus: the standard library's own source
# --------------------------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """The corpus files: every top-level ``*.py`` of ``sysconfig.get_paths()["stdlib"]``, sorted by name.

    Top-level only (no packages, no ``test/``), so the list is the same on every install of one
    Python version: 168 files, 4.7 MB on CPython 3.11.7.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"), key=lambda p: p.name)


@lru_cache(maxsize=1)
def load_corpus() -> dict:
    """Bytes of the corpus, split by file (a file is wholly train or wholly validation).

    Returns:
        dict: ``{"train": uint8 tensor (n_train,), "validation": uint8 tensor (n_val,), "sha256": hex digest
        over (name, bytes) of every file in order, "files": {"train": [...], "validation": [...]}}``.
        Files are concatenated in sorted order, each followed by one ``\\0`` byte as a separator.
    """
    digest = hashlib.sha256()
    parts = {"train": [], "validation": []}
    names = {"train": [], "validation": []}
    for i, path in enumerate(stdlib_files()):
        data = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + data)
        split = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        parts[split].append(data + b"\0")
        names[split].append(path.name)
    out = {split: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
           for split, chunks in parts.items()}
    return {**out, "sha256": digest.hexdigest(), "files": names}


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int = 256     # bytes
    context: int = 128        # tokens (bytes) per sequence
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Byte-level causal LM. ``forward(idx)``: idx ``(B, T)`` int64 bytes, T <= context → logits
    ``(B, T, 256)`` float32. Learned positional embeddings; the output head is its own ``nn.Linear``
    (untied) so that every matmul of the model can be quantized or pruned."""

    def __init__(self, cfg: TinyLMConfig = TinyLMConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.context:
            raise ValueError(f"idx has {T} positions, more than the context of {self.cfg.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _windows(data: torch.Tensor, context: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of ``context + 1`` bytes → ``(n, context + 1)`` int64."""
    n = data.numel() // (context + 1)        # a window holds its own targets: k * (context + 1) bytes are k windows
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be None or a positive int, got {max_windows!r}")
    if max_windows is not None:
        n = min(n, max_windows)
    return data[: n * (context + 1)].view(n, context + 1).long()


def window_files(data: torch.Tensor, *, context: int = 128) -> torch.Tensor:
    """Which corpus file each non-overlapping window of ``context + 1`` bytes of ``data`` starts in.

    Args:
        data: a prefix of one split of :func:`load_corpus` (1-D uint8), whose files are joined by one NUL byte.

    Returns:
        int64 ``(n_windows,)``: file ``k`` of the split for window ``k``'s first byte. These are the groups of
        ``llmspace.evaluate.paired_bootstrap(..., groups=)``: windows of one file are correlated, so an
        interval that resamples whole files is the honest one.

    Raises:
        TypeError: ``data`` is not a 1-D uint8 tensor.
    """
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"data must be a 1-D uint8 tensor, got {type(data).__name__}")
    n = data.numel() // (context + 1)
    nul = (data == 0).long()
    return (torch.cumsum(nul, 0) - nul)[torch.arange(n) * (context + 1)]


def calibration_windows(n_windows: int, seed: int, *, context: int = 128) -> torch.Tensor:
    """Random windows of the *training* split, the calibration data of every tiny-LM page and benchmark.

    Args:
        n_windows: how many windows; seed: seed of the ``torch.Generator`` that draws their starts
            (uniform over ``[0, len(train) - context - 1)``; windows may overlap).

    Returns:
        int64 ``(n_windows, context)`` byte windows. One seed is one calibration draw: GPTQ's Hessians and
        Wanda's input norms are computed from it, and results are reported over several seeds.

    Raises:
        ValueError: ``n_windows`` is not a positive int.
    """
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int, got {n_windows!r}")
    train = load_corpus()["train"]
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, train.numel() - context - 1, (n_windows,), generator=gen)
    return train[starts[:, None] + torch.arange(context)].long()


@torch.no_grad()
def window_nll(model: nn.Module, data: torch.Tensor, *, context: int = 128, batch_size: int = 64,
               max_windows: int | None = None) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of each non-overlapping window of ``context + 1`` bytes.

    Args:
        model: maps ``(B, context)`` int64 to ``(B, context, 256)`` logits.
        data: 1-D uint8 tensor of bytes (e.g. ``load_corpus()["validation"][:EVAL_BYTES]``).
        max_windows: evaluate only the first windows (``None``: all).
        batch_size: windows per forward pass (does not change the result beyond float rounding).

    Returns:
        float64 tensor ``(n_windows,)``: window ``i`` covers bytes ``i*(context+1)`` to
        ``(i+1)*(context+1) - 1``, and every one of its ``context`` targets is scored (the first byte
        predicts from a context of 1, the last from ``context``). Two models scored on the same data are
        paired window by window, which is what ``llmspace.evaluate.paired_bootstrap`` needs.

    Raises:
        TypeError: ``data`` is not a 1-D uint8 tensor.
        ValueError: ``data`` is shorter than one window, or ``max_windows`` is not ``None`` or a positive int.
    """
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"data must be a 1-D uint8 tensor, got {type(data).__name__}"
                        f"{'' if not isinstance(data, torch.Tensor) else f' {data.dtype} {tuple(data.shape)}'}")
    windows = _windows(data, context, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"data has {data.numel()} bytes, fewer than one window of {context + 1}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                   reduction="none")
            out.append(loss.view(batch.shape[0], -1).double().mean(dim=1))   # float64: 10^5 bytes summed later
    finally:
        model.train(was_training)
    return torch.cat(out)


def perplexity(model: nn.Module, data: torch.Tensor, *, context: int = 128, batch_size: int = 64,
               max_windows: int | None = None) -> float:
    """exp(mean next-byte cross-entropy) over non-overlapping windows of ``context + 1`` bytes.

    Args:
        model: maps ``(B, context)`` int64 to ``(B, context, 256)`` logits.
        data: 1-D uint8 tensor of bytes (e.g. ``load_corpus()["validation"][:EVAL_BYTES]``).
        max_windows: evaluate only the first windows (``None``: all).

    Every position of every window is scored (see :func:`window_nll`; windows have equal length, so the
    mean over windows is the mean over bytes), so the number is comparable across models, not with
    sliding-window evaluations. Raises as :func:`window_nll`.
    """
    nll = window_nll(model, data, context=context, batch_size=batch_size, max_windows=max_windows)
    return math.exp(nll.mean().item())


def train_tiny_lm(*, steps: int = 600, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                  cfg: TinyLMConfig = TinyLMConfig(), log_every: int = 0) -> TinyLM:
    """Train a :class:`TinyLM` on the training split; deterministic for a given seed and torch build.

    AdamW (β = 0.9, 0.95; weight decay 0.1 on matrices), linear warm-up over 100 steps then cosine decay
    to lr/10, gradient clipping at 1.0. Batches are random windows drawn with a generator seeded by
    ``seed``, independent of the global RNG.
    """
    torch.manual_seed(seed)
    model = TinyLM(cfg)
    data = load_corpus()["train"]
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = min(100, steps)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))

    model.train()
    offsets = torch.arange(cfg.context + 1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, data.numel() - cfg.context - 1, (batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets].long()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}", flush=True)
    model.eval()
    return model


def tiny_lm_record() -> dict:
    """The settings and results recorded next to the committed weights (``assets/tiny_lm.json``)."""
    return json.loads(TINY_LM_RECORD.read_text())


def load_tiny_lm() -> TinyLM:
    """The committed trained :class:`TinyLM` (fp32, eval mode), from ``assets/tiny_lm.safetensors``."""
    from safetensors.torch import load_file
    record = tiny_lm_record()
    model = TinyLM(TinyLMConfig(**record["config"]))
    model.load_state_dict(load_file(str(TINY_LM_WEIGHTS)))
    return model.eval()


def _train_and_save(steps: int, batch_size: int, lr: float, seed: int) -> dict:
    from safetensors.torch import save_file
    torch.set_num_threads(int(os.environ.get("LLMSPACE_THREADS", torch.get_num_threads())))
    cfg = TinyLMConfig()
    start = time.perf_counter()
    model = train_tiny_lm(steps=steps, batch_size=batch_size, lr=lr, seed=seed, cfg=cfg, log_every=100)
    seconds = time.perf_counter() - start
    corpus = load_corpus()
    ASSETS.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(TINY_LM_WEIGHTS))
    record = {
        "command": "python -m llmspace.models train",
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                     "optimizer": "AdamW(0.9, 0.95), wd 0.1 on matrices, warm-up 100, cosine to lr/10, clip 1.0",
                     "seconds": round(seconds, 1), "threads": torch.get_num_threads()},
        "corpus": {"sha256": corpus["sha256"], "train_bytes": corpus["train"].numel(),
                   "validation_bytes": corpus["validation"].numel(),
                   "files": {k: len(v) for k, v in corpus["files"].items()}},
        "validation_perplexity": perplexity(model, corpus["validation"]),
        "eval_slice_perplexity": perplexity(model, corpus["validation"][:EVAL_BYTES]),
        "versions": {"torch": torch.__version__},
    }
    TINY_LM_RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    """``python -m llmspace.models train``: retrain the tiny LM and save it under llmspace/assets/."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m llmspace.models",
                                     description="Train the tiny byte LM and save it under llmspace/assets/")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(_train_and_save(args.steps, args.batch_size, args.lr, args.seed), indent=2))

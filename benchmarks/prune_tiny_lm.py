"""Pruning the trained tiny byte LM: perplexity vs sparsity, magnitude vs Wanda, unstructured vs 2:4,
one-shot vs a short masked recovery fine-tune, and structured (neurons, heads) that physically shrinks.

    python benchmarks/prune_tiny_lm.py          # writes benchmarks/results/prune_tiny_lm.json (~30 min, 2 cores)
    python benchmarks/prune_tiny_lm.py --smoke  # 64 windows, one seed, a few variants, writes nothing

Pruned: every nn.Linear inside the transformer blocks (qkv, proj, fc1, fc2 — 96% of the matmul
weights); the embeddings and the output head stay dense, as in the Wanda and SparseGPT papers.

Evaluation: the tiny LM's one evaluation slice, the whole validation split (``llmspace.models.EVAL_BYTES``,
3,205 windows of 129 bytes from files the model never trained on), scored window by window so that two
variants are compared by a paired bootstrap over windows (``llmspace.evaluate.paired_bootstrap``, 2,000
resamples, 95%). Everything with a seed runs with three: Wanda's input norms come from 64 random
training windows drawn with each of CALIB_SEEDS (the same draws as ``prune_wanda_parts.py``), and each
recovery fine-tune (and the dense control given the same fine-tune) runs with each of FINETUNE_SEEDS.
Magnitude pruning has no seed.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import evaluate as E  # noqa: E402
from llmspace import models as M  # noqa: E402
from llmspace import prune as P  # noqa: E402

CALIB_WINDOWS = 64
CALIB_SEEDS = (1, 2, 3)
FINETUNE = {"steps": 100, "batch_size": 16, "lr": 1e-3}
FINETUNE_SEEDS = (1, 2, 3)
SPARSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
CONTEXT = 128


def block_linears(model) -> dict:
    return P.linear_weights(model, skip=("head",))


def ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


def calibration_norms(dense, seed) -> dict:
    """Wanda's per-input-channel norms from CALIB_WINDOWS random training windows (one draw per seed)."""
    return P.input_norms(dense, block_linears(dense), [M.calibration_windows(CALIB_WINDOWS, seed, context=CONTEXT)])


def masks_for(model, method: str, sparsity: float | None, norms: dict) -> dict:
    layers = block_linears(model)
    if method == "magnitude (layer-wise)":
        return {n: P.magnitude_mask(l.weight, sparsity) for n, l in layers.items()}
    if method == "magnitude (global)":
        masks = P.global_magnitude_mask([l.weight for l in layers.values()], sparsity)
        return dict(zip(layers, masks))
    if method == "wanda":
        return {n: P.wanda_mask(l.weight, norms[n], sparsity) for n, l in layers.items()}
    if method == "magnitude 2:4":
        return {n: P.nm_mask(l.weight) for n, l in layers.items()}
    if method == "wanda 2:4":
        return {n: P.nm_mask(P.wanda_scores(l.weight, norms[n])) for n, l in layers.items()}
    raise ValueError(method)


def finetune(model, handle, train, steps, batch_size, lr, seed) -> list:
    """Masked recovery fine-tune: AdamW on random training windows; masks re-applied after each step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    offsets = torch.arange(model.cfg.context + 1)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - model.cfg.context - 1, (batch_size,), generator=gen)
        batch = train[starts[:, None] + offsets].long()
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if handle is not None:
            handle.reapply()
        losses.append(loss.item())
    model.eval()
    return losses


def pruned(method, sparsity, norms):
    model = M.load_tiny_lm()
    layers = block_linears(model)
    masks = masks_for(model, method, sparsity, norms)
    handle = P.apply_masks([(layers[n].weight, masks[n]) for n in layers])
    return model, handle


def shrink_model(model, neuron_sparsity: float, heads_to_remove: int):
    """Structured: drop the lowest-norm MLP neurons (‖fc1 row‖·‖fc2 column‖) and attention heads
    (‖proj column block‖) of every block, physically."""
    for block in model.blocks:
        score = P.channel_norms(block.fc1.weight, 0) * P.channel_norms(block.fc2.weight, 1)
        n_drop = P.n_to_prune(neuron_sparsity, score.numel())
        keep = torch.ones_like(score, dtype=torch.bool)
        if n_drop:
            keep[score.topk(n_drop, largest=False).indices] = False
        block.fc1, block.fc2 = P.shrink_mlp(block.fc1, block.fc2, keep)
        if heads_to_remove:
            C, H = block.proj.out_features, block.n_heads
            heads = P.head_norms(block.proj, H)
            keep_h = torch.ones(H, dtype=torch.bool)
            keep_h[heads.topk(heads_to_remove, largest=False).indices] = False
            q, k, v = (torch.nn.Linear(C, C) for _ in range(3))
            with torch.no_grad():
                for lin, w, b in zip((q, k, v), block.qkv.weight.split(C), block.qkv.bias.split(C)):
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
            q, k, v, o = P.remove_heads(q, k, v, block.proj, H, keep_h)
            width = q.out_features
            qkv = torch.nn.Linear(C, 3 * width)
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
                qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            block.qkv, block.proj, block.n_heads = qkv, o, H - heads_to_remove
    return model


def structured_forward_patch():
    """TinyLM's Block splits qkv by the model width C; after head removal the attention width is
    narrower. Patch Block.forward (here only) to split by the attention width instead."""
    def forward(self, x):
        B, T, C = x.shape
        width = self.qkv.out_features // 3
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, width // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, width))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
    M.Block.forward = forward


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    global SPARSITIES, CALIB_SEEDS, FINETUNE_SEEDS
    smoke = "--smoke" in sys.argv
    if smoke:
        SPARSITIES, CALIB_SEEDS, FINETUNE_SEEDS = [0.5], CALIB_SEEDS[:1], FINETUNE_SEEDS[:1]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.perf_counter()
    corpus = M.load_corpus()
    val, train = corpus["validation"][:M.EVAL_BYTES if not smoke else 64 * 129], corpus["train"]
    nll_of = lambda model: M.window_nll(model, val)  # noqa: E731
    dense = M.load_tiny_lm()
    dense_nll = nll_of(dense)
    norms = {seed: calibration_norms(dense, seed) for seed in CALIB_SEEDS}
    print(f"dense perplexity {ppl(dense_nll):.4f} on {dense_nll.numel()} windows", flush=True)
    interval = E.paired_bootstrap

    sweep, nll = [], {}
    for s in SPARSITIES:
        for method in ("magnitude (layer-wise)", "magnitude (global)", "wanda"):
            for seed in (CALIB_SEEDS if method == "wanda" else (None,)):
                model, _ = pruned(method, s, norms.get(seed))
                nll[(method, s, seed)] = nll_of(model)
                row = {"method": method, "sparsity": s, "calib_seed": seed, "perplexity": ppl(nll[(method, s, seed)]),
                       "vs_dense": interval(dense_nll, nll[(method, s, seed)])}
                if method != "magnitude (layer-wise)":
                    row["vs_layer_wise"] = interval(nll[("magnitude (layer-wise)", s, None)], nll[(method, s, seed)])
                sweep.append(row)
                print(f"{method:24} {s:.1f} seed {seed}  ppl {row['perplexity']:8.4f}", flush=True)
    two_four = []
    for method in ("magnitude 2:4", "wanda 2:4"):
        for seed in (CALIB_SEEDS if method == "wanda 2:4" else (None,)):
            model, _ = pruned(method, None, norms.get(seed))
            nll[(method, 0.5, seed)] = nll_of(model)
            row = {"method": method, "sparsity": 0.5, "calib_seed": seed, "perplexity": ppl(nll[(method, 0.5, seed)]),
                   "vs_dense": interval(dense_nll, nll[(method, 0.5, seed)]),
                   "vs_unstructured": interval(nll[(method.replace(" 2:4", "") if seed is not None else
                                                    "magnitude (layer-wise)", 0.5, seed)], nll[(method, 0.5, seed)])}
            if seed is not None:
                row["vs_magnitude_2:4"] = interval(nll[("magnitude 2:4", 0.5, None)], nll[(method, 0.5, seed)])
            two_four.append(row)
            print({k: row[k] for k in ("method", "calib_seed", "perplexity")}, flush=True)

    # the dense model gets the same fine-tune, so the recovery is not credited with what training alone does
    control = {}
    for seed in FINETUNE_SEEDS:
        model = M.load_tiny_lm()
        finetune(model, None, train, **FINETUNE, seed=seed)
        control[seed] = nll_of(model)
        print(f"dense fine-tuned, seed {seed}: {ppl(control[seed]):.4f}", flush=True)
    recovery = []
    for method, s in (("magnitude (layer-wise)", 0.5), ("wanda", 0.5), ("magnitude 2:4", None), ("wanda 2:4", None)):
        for i, seed in enumerate(FINETUNE_SEEDS):
            calib_seed = CALIB_SEEDS[i % len(CALIB_SEEDS)] if "wanda" in method else None
            model, handle = pruned(method, s, norms.get(calib_seed))
            before = nll[(method, 0.5, calib_seed)]
            losses = finetune(model, handle, train, **FINETUNE, seed=seed)
            after = nll_of(model)
            report = P.sparsity_report(model, value_bytes=2, skip=("head",))
            recovery.append({"method": method, "sparsity": 0.5, "calib_seed": calib_seed, "finetune_seed": seed,
                             "one_shot": ppl(before), "finetuned": ppl(after),
                             "vs_dense_finetuned": interval(control[seed], after), "vs_dense": interval(dense_nll, after),
                             "final_train_loss": sum(losses[-10:]) / 10,
                             "bytes_fp16": {k: report[-1][k] for k in ("dense", "csr", "bitmask", "2:4")},
                             "measured_sparsity": report[-1]["sparsity"]})
            print({k: recovery[-1][k] for k in ("method", "finetune_seed", "one_shot", "finetuned")}, flush=True)

    structured_forward_patch()
    structured = []
    for neuron_s, heads in ((0.25, 0), (0.5, 0), (0.5, 1)):
        model = shrink_model(M.load_tiny_lm(), neuron_s, heads)
        one_shot = nll_of(model)
        row = {"mlp_neurons_removed": neuron_s, "heads_removed_per_block": heads, "parameters": n_params(model),
               "block_linear_bytes_fp16": P.sparsity_report(model, 2, skip=("head",))[-1]["dense"],
               "one_shot": ppl(one_shot), "finetuned": {}}
        for seed in FINETUNE_SEEDS:
            model = shrink_model(M.load_tiny_lm(), neuron_s, heads)
            finetune(model, None, train, **FINETUNE, seed=seed)
            after = nll_of(model)
            row["finetuned"][str(seed)] = {"perplexity": ppl(after), "vs_dense_finetuned": interval(control[seed], after)}
        structured.append(row)
        print(row, flush=True)

    if smoke:
        return
    write_result("prune_tiny_lm", {
        "settings": {"evaluation": "the whole validation split: llmspace.models.EVAL_BYTES = 3205 windows of 129 bytes",
                     "n_windows": int(dense_nll.numel()), "calib_windows": CALIB_WINDOWS, "calib_seeds": CALIB_SEEDS,
                     "finetune": FINETUNE, "finetune_seeds": FINETUNE_SEEDS,
                     "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0},
                     "pruned_layers": list(block_linears(dense)), "threads": torch.get_num_threads(),
                     "tiny_lm": {k: M.tiny_lm_record()[k] for k in ("config", "parameters")}},
        "tiny_lm_sha256": hashlib.sha256(M.TINY_LM_WEIGHTS.read_bytes()).hexdigest(),
        "dense_perplexity": ppl(dense_nll),
        "dense_finetuned": {str(seed): {"perplexity": ppl(v), "vs_dense": interval(dense_nll, v)}
                            for seed, v in control.items()},
        "dense_parameters": n_params(dense),
        "dense_block_linear_bytes_fp16": P.sparsity_report(dense, 2, skip=("head",))[-1]["dense"],
        "sweep": sweep, "two_four": two_four, "recovery": recovery, "structured": structured,
        "seconds": round(time.perf_counter() - start, 1)})
    assert all(math.isfinite(r["perplexity"]) for r in sweep)


if __name__ == "__main__":
    main()

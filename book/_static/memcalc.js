/* Memory calculator for book/memory-calculator.md — the byte formulas of llmspace.memory in JavaScript.
 *
 * One source of truth: every function below mirrors a Python function (named in its comment), computes
 * in BigInt (exact integers: a 70B model's activation bytes can pass 2**53) and is checked against the
 * Python estimator on hundreds of random configurations by tests/test_book.py::test_memcalc_matches_python.
 * Change the Python side and this file together.
 */
(function () {
  "use strict";
  const N = (x) => BigInt(x);
  const ceilDiv = (a, b) => (a + b - 1n) / b;   // a >= 0, b > 0

  // llmspace.memory.PRECISION_POLICIES: bytes per parameter of each copy
  const POLICIES = {
    "fp32": { weights: 4, grads: 4, master: 0, optimizer: 8, source: "fp32 weights and grads, fp32 Adam moments" },
    "mixed-zero": { weights: 2, grads: 2, master: 4, optimizer: 8, source: "ZeRO paper: 2 + 2 + K=12" },
    "bf16-fp32-grads": { weights: 2, grads: 4, master: 4, optimizer: 8, source: "Megatron-LM: 16-bit param, fp32 grads" },
    "fp16-fp32-main-grads": { weights: 2, grads: 6, master: 4, optimizer: 8, source: "Megatron-LM: 16-bit param, 16-bit grads + fp32 main grad" },
    "autocast-hf": { weights: 6, grads: 4, master: 0, optimizer: 8, source: "HF docs: 4+2 weights, 4 grads, 8 Adam" },
  };
  // llmspace.memory.OPTIMIZER_STATE_BYTES
  const OPTIMIZERS = { "adam": 8, "adamw": 8, "sgd": 0, "sgd-momentum": 4, "adam-8bit": 2 };

  const LLAMA = { max_seq_len: 4096, norm: "rmsnorm", mlp: "swiglu", bias: false, learned_positions: false,
                  tie_embeddings: false, attention: "sdpa", n_kv_heads: null };
  // TransformerConfig fields; Llama-2 shapes as llmspace.memory.LLAMA2_7B / LLAMA2_70B, the rest from the
  // models' released config.json.
  const PRESETS = {
    "SmolLM2-135M": { ...LLAMA, vocab_size: 49152, d_model: 576, n_layers: 30, n_heads: 9, n_kv_heads: 3,
                      d_ff: 1536, max_seq_len: 8192, tie_embeddings: true },
    "Llama-2-7B": { ...LLAMA, vocab_size: 32000, d_model: 4096, n_layers: 32, n_heads: 32, d_ff: 11008 },
    "Llama-2-13B": { ...LLAMA, vocab_size: 32000, d_model: 5120, n_layers: 40, n_heads: 40, d_ff: 13824 },
    "Llama-2-70B": { ...LLAMA, vocab_size: 32000, d_model: 8192, n_layers: 80, n_heads: 64, n_kv_heads: 8, d_ff: 28672 },
    "Llama-3-8B": { ...LLAMA, vocab_size: 128256, d_model: 4096, n_layers: 32, n_heads: 32, n_kv_heads: 8,
                    d_ff: 14336, max_seq_len: 8192 },
    "Llama-3-70B": { ...LLAMA, vocab_size: 128256, d_model: 8192, n_layers: 80, n_heads: 64, n_kv_heads: 8,
                     d_ff: 28672, max_seq_len: 8192 },
  };

  function kvHeads(c) { return c.n_kv_heads == null ? c.n_heads : c.n_kv_heads; }

  function validate(c) {
    for (const k of ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff"]) {
      if (!Number.isInteger(c[k]) || c[k] <= 0) throw new Error(`${k} must be a positive int, got ${c[k]}`);
    }
    if (c.d_model % c.n_heads) throw new Error(`d_model (${c.d_model}) must be divisible by n_heads (${c.n_heads})`);
    const kv = kvHeads(c);
    if (!Number.isInteger(kv) || kv <= 0 || c.n_heads % kv) throw new Error(`n_heads (${c.n_heads}) must be divisible by n_kv_heads (${kv})`);
    if (c.attention === "math" && kv !== c.n_heads) throw new Error("attention='math' supports only n_kv_heads == n_heads");
  }

  // llmspace.memory.count_parameters(TransformerConfig): the parameters of llmspace.memory.Transformer
  function countParameters(c) {
    validate(c);
    const d = N(c.d_model), f = N(c.d_ff), V = N(c.vocab_size), b = c.bias ? 1n : 0n;
    const kv = N(kvHeads(c)) * (d / N(c.n_heads));
    const norm = c.norm === "layernorm" ? d + b * d : d;          // LayerNorm weight (+ bias) | RMSNorm weight
    const attn = d * (d + 2n * kv) + b * (d + 2n * kv) + d * d + b * d;
    const mlp = (c.mlp === "swiglu" ? 2n : 1n) * (d * f + b * f) + f * d + b * d;
    const block = 2n * norm + attn + mlp;
    return V * d + (c.learned_positions ? N(c.max_seq_len) * d : 0n) + N(c.n_layers) * block + norm
      + (c.tie_embeddings ? 0n : V * d);
  }

  // llmspace.memory.model_state_bytes (policy fields are whole bytes here, so ceil(x * bytes) = x * bytes)
  function modelStateBytes(nParams, policy, zeroStage, worldSize) {
    const n = N(nParams), shard = ceilDiv(n, N(worldSize));
    const held = { weights: zeroStage < 3 ? n : shard, grads: zeroStage < 2 ? n : shard,
                   master: zeroStage < 1 ? n : shard, optimizer: zeroStage < 1 ? n : shard };
    const out = {};
    for (const k of Object.keys(held)) out[k] = held[k] * N(policy[k]);
    return out;
  }

  function normBytes(c, tokens, dt) {   // what a norm saves (block_activation_bytes, activation_bytes)
    const d = N(c.d_model);
    return c.norm === "layernorm" ? 2n * tokens * d * dt + 2n * tokens * 4n : 3n * tokens * d * dt + tokens * 4n;
  }

  // llmspace.memory.block_activation_bytes
  function blockActivationBytes(c, batch, seq, dtypeBytes) {
    const B = N(batch), T = N(seq), d = N(c.d_model), f = N(c.d_ff), h = N(c.n_heads), dt = N(dtypeBytes);
    const tokens = B * T, headDim = d / h;
    let attention;
    if (c.attention === "sdpa") {
      const qkv = tokens * (d + 2n * N(kvHeads(c)) * headDim) * dt;
      attention = qkv + tokens * d * dt + B * h * T * 4n;
    } else {
      attention = (4n * tokens * d + B * h * T * T) * dt + T * T;
    }
    const mlp = (c.mlp === "swiglu" ? 4n : 2n) * tokens * f * dt;
    return 2n * normBytes(c, tokens, dt) + attention + mlp;
  }

  // llmspace.memory.checkpointing._per_segment: the largest of n_segments near-equal segments
  function perSegment(nLayers, nSegments) { return Math.ceil(nLayers / nSegments); }

  // llmspace.memory.activation_bytes
  function activationBytes(c, batch, seq, dtypeBytes, segments) {
    const B = N(batch), T = N(seq), dt = N(dtypeBytes), tokens = B * T;
    const block = blockActivationBytes(c, batch, seq, dtypeBytes);
    const extra = 8n * tokens + (c.learned_positions ? 8n * T : 0n) + normBytes(c, tokens, dt)
      + tokens * N(c.vocab_size) * dt + 8n * tokens + 4n;
    if (segments == null) return extra + N(c.n_layers) * block;
    if (!Number.isInteger(segments) || segments < 1 || segments > c.n_layers) {
      throw new Error(`checkpoint_segments must be an int in [1, n_layers=${c.n_layers}], got ${segments}`);
    }
    return extra + N(segments) * tokens * N(c.d_model) * dt + N(perSegment(c.n_layers, segments)) * block;
  }

  // llmspace.memory.estimate_training_memory (the five terms; the step peaks are not ported)
  function estimateTraining(c, o) {
    const policy = { ...POLICIES[o.policy] };
    if (!policy.source) throw new Error(`unknown policy ${o.policy}`);
    if (o.optimizer != null) {
      if (!(o.optimizer in OPTIMIZERS)) throw new Error(`unknown optimizer ${o.optimizer}`);
      policy.optimizer = OPTIMIZERS[o.optimizer];
    }
    const s = modelStateBytes(countParameters(c), policy, o.zero_stage, o.world_size);
    return { params: s.weights, grads: s.grads, master: s.master, optimizer: s.optimizer,
             activations: activationBytes(c, o.batch_size, o.seq_len, o.activation_dtype_bytes, o.checkpoint_segments) };
  }

  // bytes per element as an exact fraction (0.5 for 4-bit)
  function frac(x) { return x === 0.5 ? [1n, 2n] : [N(x), 1n]; }

  // llmspace.kv_cache.kv_cache_bytes
  function kvCacheBytes(c, batch, seq, dtypeBytes) {
    const [num, den] = frac(dtypeBytes);
    const elements = 2n * N(c.n_layers) * N(kvHeads(c)) * (N(c.d_model) / N(c.n_heads)) * N(seq) * N(batch);
    return ceilDiv(elements * num, den);
  }

  // serving: weights (count_parameters x bytes per weight, rounded up; no quantization scales) + KV cache
  function estimateInference(c, o) {
    const [num, den] = frac(o.weight_dtype_bytes);
    return { weights: ceilDiv(countParameters(c) * num, den),
             kv_cache: kvCacheBytes(c, o.batch_size, o.seq_len, o.kv_dtype_bytes) };
  }

  const api = { POLICIES, OPTIMIZERS, PRESETS, countParameters, modelStateBytes, blockActivationBytes,
                activationBytes, estimateTraining, kvCacheBytes, estimateInference };
  window.llmspaceMemory = api;

  // ---------------------------------------------------------------------------------------------- UI
  const COLORS = { params: "#0072B2", grads: "#E69F00", master: "#009E73", optimizer: "#CC79A7",
                   activations: "#D55E00", weights: "#0072B2", kv_cache: "#56B4E9" };
  const LABELS = { params: "weights", grads: "gradients", master: "fp32 master weights", optimizer: "optimizer state",
                   activations: "activations", weights: "weights", kv_cache: "KV cache" };
  const GIB = 2 ** 30;
  const fmt = (b) => (Number(b) / GIB).toFixed(2) + " GiB";

  function el(tag, attrs, ...children) {
    const e = document.createElementNS(tag === "svg" || tag === "rect" || tag === "line" || tag === "text"
      ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const ch of children) e.append(ch);
    return e;
  }

  function stackedBar(terms, capacity) {
    const total = Object.values(terms).reduce((a, b) => a + b, 0n);
    const max = Math.max(Number(total), capacity), W = 600, H = 34;
    const svg = el("svg", { viewBox: `0 0 ${W} ${H + 16}`, width: "100%", role: "img",
                            "aria-label": `per-GPU bytes: ${fmt(total)}` });
    let x = 0;
    for (const [k, v] of Object.entries(terms)) {
      const w = (Number(v) / max) * W;
      const r = el("rect", { x: x, y: 0, width: Math.max(w, 0), height: H, fill: COLORS[k], "data-term": k });
      r.append(el("title", {}, `${LABELS[k]}: ${fmt(v)}`));
      svg.append(r);
      x += w;
    }
    const cx = (capacity / max) * W;
    svg.append(el("line", { x1: cx, x2: cx, y1: 0, y2: H + 4, stroke: "currentColor", "stroke-width": 2,
                            "stroke-dasharray": "4 3" }));
    svg.append(el("text", { x: Math.min(cx, W - 2), y: H + 14, "text-anchor": "end", "font-size": 11,
                            fill: "currentColor" }, "GPU memory"));
    return svg;
  }

  function table(terms) {
    const t = el("table", { class: "table memcalc-table" });
    let total = 0n;
    for (const [k, v] of Object.entries(terms)) {
      total += v;
      t.append(el("tr", { "data-term": k }, el("td", {}, el("span", { class: "memcalc-swatch",
        style: `background:${COLORS[k]}` }), " " + LABELS[k]), el("td", { class: "memcalc-bytes" }, v.toLocaleString("en")),
        el("td", {}, fmt(v))));
    }
    t.append(el("tr", { "data-term": "total" }, el("th", {}, "total per GPU"),
      el("th", { class: "memcalc-bytes" }, total.toLocaleString("en")), el("th", {}, fmt(total))));
    return t;
  }

  function readConfig(form) {
    const v = (name) => form.elements[name].value;
    const int = (name) => parseInt(v(name), 10);
    if (v("preset") !== "custom") return { ...PRESETS[v("preset")] };
    const kv = int("n_kv_heads");
    return { vocab_size: int("vocab_size"), d_model: int("d_model"), n_layers: int("n_layers"),
             n_heads: int("n_heads"), n_kv_heads: kv > 0 ? kv : null, d_ff: int("d_ff"),
             max_seq_len: int("max_seq_len"), norm: v("norm"), mlp: v("mlp"), bias: form.elements.bias.checked,
             learned_positions: form.elements.learned_positions.checked, tie_embeddings: form.elements.tie_embeddings.checked,
             attention: v("attention") };
  }

  function fillCustom(form, c) {
    for (const k of ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"]) form.elements[k].value = c[k];
    form.elements.n_kv_heads.value = kvHeads(c);
    form.elements.norm.value = c.norm; form.elements.mlp.value = c.mlp; form.elements.attention.value = c.attention;
    form.elements.bias.checked = c.bias; form.elements.learned_positions.checked = c.learned_positions;
    form.elements.tie_embeddings.checked = c.tie_embeddings;
  }

  function update(root) {
    const form = root.querySelector("form"), out = root.querySelector(".memcalc-out"), e = form.elements;
    const custom = e.preset.value === "custom";
    root.querySelectorAll(".memcalc-custom input, .memcalc-custom select").forEach((i) => { i.disabled = !custom; });
    if (!custom) fillCustom(form, PRESETS[e.preset.value]);
    out.replaceChildren();
    try {
      const c = readConfig(form);
      const capacity = parseFloat(e.capacity_gib.value) * GIB;
      const ckpt = e.checkpointing.checked ? Math.max(1, Math.min(c.n_layers, Math.round(Math.sqrt(c.n_layers)))) : null;
      const train = estimateTraining(c, { policy: e.policy.value, optimizer: e.optimizer.value,
        zero_stage: parseInt(e.zero_stage.value, 10), world_size: parseInt(e.world_size.value, 10),
        batch_size: parseInt(e.micro_batch.value, 10), seq_len: parseInt(e.seq_len.value, 10),
        activation_dtype_bytes: parseInt(e.activation_dtype_bytes.value, 10), checkpoint_segments: ckpt });
      const infer = estimateInference(c, { weight_dtype_bytes: parseFloat(e.weight_dtype_bytes.value),
        kv_dtype_bytes: parseFloat(e.kv_dtype_bytes.value), batch_size: parseInt(e.infer_batch.value, 10),
        seq_len: parseInt(e.context.value, 10) });
      const n = countParameters(c);
      out.append(el("p", {}, `${n.toLocaleString("en")} parameters` +
        (ckpt ? `; activation checkpointing in ${ckpt} segments (√L)` : "")));
      out.append(el("h3", {}, "Training, per GPU"), stackedBar(train, capacity), table(train));
      out.append(el("h3", {}, "Inference, per GPU (one replica)"), stackedBar(infer, capacity), table(infer));
      out.dataset.trainTotal = Object.values(train).reduce((a, b) => a + b, 0n).toString();
    } catch (err) {
      out.append(el("p", { class: "memcalc-error" }, String(err.message || err)));
    }
  }

  function init() {
    document.querySelectorAll(".memcalc").forEach((root) => {
      const preset = root.querySelector("select[name=preset]");
      for (const name of Object.keys(PRESETS)) preset.insertBefore(el("option", { value: name }, name), preset.lastElementChild);
      preset.value = "Llama-2-7B";
      const policy = root.querySelector("select[name=policy]");
      for (const [name, p] of Object.entries(POLICIES)) policy.append(el("option", { value: name },
        `${name} (${p.weights + p.grads + p.master} + optimizer: ${p.source})`));
      policy.value = "bf16-fp32-grads";
      root.querySelector("form").addEventListener("input", () => update(root));
      root.querySelector("form").addEventListener("submit", (ev) => ev.preventDefault());
      update(root);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();

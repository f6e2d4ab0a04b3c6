"""llmspace — reference library of the llmspace book: making large language models fit.

One module per chapter; each module's docstring says why the technique exists and what it trades.

* :mod:`llmspace.sparse` — chapter 1, sparse storage (COO/CSR/CSC, sparse add, SpMV).
* :mod:`llmspace.memory` — chapter 2, memory strategies (measured memory anatomy and estimator, accumulation, checkpointing, mixed precision); :mod:`llmspace.allocator` its caching allocator; :mod:`llmspace.parallel` DDP, ZeRO-1/2/3, FSDP2, tensor and pipeline parallel on torch.distributed.
* :mod:`llmspace.quant` — chapter 3, quantization (affine/symmetric, per-group int4, NF4, LLM.int8, GPTQ); :mod:`llmspace.quant_triton` its W4A16 kernel; :mod:`llmspace.models` the tiny byte LM and all-MiniLM-L6-v2 the book measures on.
* :mod:`llmspace.prune` — chapter 4, pruning (magnitude/global/structured/N:M/Wanda masks, compressed 2:4, masks through fine-tuning, byte reports).
* :mod:`llmspace.distill` — chapter 5, knowledge distillation (Hinton KD with T², KD + CE, feature distillation, sequence-level sampling).
* :mod:`llmspace.storage` — chapter 6, storage I/O (safetensors from the spec, defensive parsing, shards + index, mmap/streaming loads, compression, crash-safe checkpoints); :mod:`llmspace.tiered` its device → host → disk layer cache and offloaded forward.
"""
__version__ = "0.1.0"

"""Estimating the peak of a training step from the timeline of what is alive when (validated against
:func:`llmspace.memory.measure_training_peaks`). Part of :mod:`llmspace.memory`, which re-exports it."""
from __future__ import annotations

import math

import torch

from llmspace.memory import _policy, activation_bytes
from llmspace.models.transformer import Transformer, TransformerConfig

__all__ = ["estimate_step_peaks"]


# --------------------------------------------------------------------------------------------------
# The peak of a training step: estimated from the timeline of what is alive when
# --------------------------------------------------------------------------------------------------

def _block_saved_parts(config: TransformerConfig, B: int, T: int, dt: int) -> dict:
    """What one block saves, split by the part of the block that frees it in backward (bytes).
    The parts sum to :func:`block_activation_bytes` (tested)."""
    tokens, d, f, h = B * T, config.d_model, config.d_ff, config.n_heads
    norm = (2 * tokens * d * dt + 2 * tokens * 4 if config.norm == "layernorm"
            else 3 * tokens * d * dt + tokens * 4)
    out = tokens * d * dt                                    # attention output, saved by the projection
    if config.attention == "sdpa":
        core = tokens * (d + 2 * config.kv_heads * config.head_dim) * dt + B * h * T * 4
    else:
        core = 3 * tokens * d * dt + B * h * T * T * dt + T * T
    mlp = (4 if config.mlp == "swiglu" else 2) * tokens * f * dt
    return {"norm1": norm, "attention": core, "attention_out": out, "norm2": norm, "mlp": mlp}


def _aligned(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment if nbytes else 0


def estimate_step_peaks(config: TransformerConfig, batch_size: int, seq_len: int, *, policy="fp32",
                        activation_dtype_bytes: int = 4, device: str = "cpu") -> dict:
    """Peak bytes of one training step of :class:`Transformer` with Adam, first step and steady state.

    The step is ``zero_grad(set_to_none=True)``, ``loss = model.loss(tokens, targets)``,
    ``loss.backward()``, ``optimizer.step()``. What the allocator holds, in bytes, at the moments
    where the peak can fall (``R`` = resident at the start of the step: parameters, the int64 batch,
    and from step 2 on the Adam state, which ``torch.optim.Adam`` allocates lazily in its first
    ``step()``; ``A`` = the activations saved for backward, :func:`activation_bytes`; ``Λ`` = the
    logits ``B·T·V``):

    * **backward start** — ``R + A + 2Λ``: the cross-entropy's backward allocates the gradient of the
      log-probabilities (``nll_loss_backward``, B·T·V) and the gradient of the logits
      (``log_softmax_backward``, B·T·V) while the saved log-probabilities (part of ``A``) are alive.
      The end of the forward pass, ``R + A + Λ`` (logits and log-probabilities together), is lower.
    * **MLP and attention backward of the last block** — the first block the backward reaches, where
      nearly all activations are still alive: the loss and the final norm have freed their saved
      tensors and written their gradients; the MLP's backward holds the gradient of the
      down-projection's input (B·T·d_ff; SwiGLU two more); explicit attention holds ``∂P`` and the
      softmax's input gradient, two ``B·h·T²`` tensors, besides the saved probabilities. (Later
      blocks hold less: fewer activations remain.)
    * **optimizer step** — parameters + gradients + Adam state + the update's temporaries: the
      for-loop Adam (``torch.optim.Adam`` on CPU) computes ``denom = exp_avg_sq.sqrt() / c + eps``
      per parameter, so the square root and the quotient of one parameter coexist with the previous
      parameter's ``denom``; ``foreach`` (the CUDA default) computes all square roots at once (one
      more copy of every parameter); ``fused`` none.

    Args:
        config: the model's shape.
        batch_size, seq_len: the micro-batch (``B``, ``T``).
        policy: a :class:`PrecisionPolicy` or the name of one; the peak model is validated for
            ``"fp32"`` (weights, gradients, Adam in fp32) — other policies scale the same terms.
        activation_dtype_bytes: bytes per element of activations and logits.
        device: "cpu" (exact sizes, for-loop Adam, 0-d ``step`` tensors on the device) or "cuda"
            (every block rounded up to 512 bytes, foreach Adam, ``step`` on the host).

    Returns:
        ``{"first_step": {...}, "steady": {...}}``, each with ``peak`` (bytes), ``phase``
        ("backward" or "optimizer"), and ``candidates`` (bytes at each moment listed above).
    """
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("activation_dtype_bytes", activation_dtype_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    policy = _policy(policy)
    align = 512 if device == "cuda" else 1
    B, T, dt, c = batch_size, seq_len, activation_dtype_bytes, config
    with torch.device("meta"):
        model = Transformer(config)
    numels = [p.numel() for p in model.parameters()]
    per = {k: getattr(policy, k) for k in ("weights", "grads", "master", "optimizer")}

    def sized(numel, bpp):
        return _aligned(int(math.ceil(numel * bpp)), align)
    weights = sum(sized(n, per["weights"] + per["master"]) for n in numels)
    grads = sum(sized(n, per["grads"]) for n in numels)
    state = sum(2 * sized(n, per["optimizer"] / 2) for n in numels) if per["optimizer"] else 0
    if per["optimizer"] and device == "cpu":
        state += 4 * len(numels)                          # Adam's 0-d fp32 `step`, one per parameter
    batch = 2 * _aligned(8 * B * T, align)                # int64 tokens and targets
    acts = activation_bytes(c, B, T, dt)
    logits = _aligned(B * T * c.vocab_size * dt, align)

    # optimizer temporaries (fp32 per element of the update)
    temp_sizes = [_aligned(4 * n, align) for n in numels]
    impl = "foreach" if device == "cuda" else "for-loop"
    if not per["optimizer"]:
        adam_temps = 0
    elif impl == "foreach":
        adam_temps = sum(temp_sizes)
    else:
        adam_temps = max((temp_sizes[i - 1] if i else 0) + 2 * temp_sizes[i] for i in range(len(temp_sizes)))

    # the last block's attention backward
    parts = _block_saved_parts(c, B, T, dt)
    final_norm = parts["norm2"]
    d = c.d_model
    block_params = model.blocks[-1]
    grads_before_attention = (sized(model.head.weight.numel(), per["grads"])
                              + sum(sized(p.numel(), per["grads"]) for p in model.norm.parameters())
                              + sum(sized(p.numel(), per["grads"]) for p in block_params.mlp.parameters())
                              + sum(sized(p.numel(), per["grads"]) for p in block_params.norm2.parameters())
                              + sum(sized(p.numel(), per["grads"]) for p in block_params.attn.proj.parameters()))
    freed_before_attention = (B * T * c.vocab_size * dt + final_norm + parts["norm2"] + parts["mlp"]
                              + parts["attention_out"])
    residual_grad = B * T * d * dt
    grads_before_mlp = (sized(model.head.weight.numel(), per["grads"])
                        + sum(sized(p.numel(), per["grads"]) for p in model.norm.parameters())
                        + sum(sized(p.numel(), per["grads"]) for p in block_params.mlp.down.parameters()))
    # ∂(down's input); SwiGLU's product backward then writes ∂gate and ∂up while it is alive
    mlp_transient = (2 if c.mlp == "swiglu" else 1) * B * T * c.d_ff * dt
    if c.attention == "math":
        attention_transient = 2 * B * c.n_heads * T * T * dt + B * T * d * dt   # ∂P, ∂S; ∂V
    else:
        attention_transient = 2 * B * T * (d + 2 * c.kv_heads * c.head_dim) * dt  # ∂q,∂k,∂v and their cat
    out = {}
    for step, resident_state in (("first_step", 0), ("steady", state)):
        resident = weights + batch + resident_state
        candidates = {
            "backward start": resident + acts + 2 * logits,
            "MLP backward": resident + acts - B * T * c.vocab_size * dt - final_norm + grads_before_mlp
                            + residual_grad + mlp_transient,
            "attention backward": resident + acts - freed_before_attention + grads_before_attention
                                  + residual_grad + attention_transient,
            "optimizer step": weights + batch + grads + state + adam_temps,
        }
        where = max(candidates, key=candidates.get)
        out[step] = {"peak": candidates[where], "candidates": candidates,
                     "phase": "optimizer" if where == "optimizer step" else "backward"}
    return out

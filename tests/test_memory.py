"""llmspace.memory: the estimator against measurement, accumulation, checkpointing, ZeRO-1, loss scaling.

References nobody here wrote: the tensors' own storages and PyTorch autograd's saved tensors
(``torch.autograd.graph.saved_tensors_hooks``), full-batch ``torch.autograd`` gradients,
``torch.utils.checkpoint``, ``torch.optim.Adam``, ``torch.amp.GradScaler``, the published Llama-2
parameter counts and the ZeRO paper's worked example (Rajbhandari et al. 2020, Figure 1).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmspace.memory import (LLAMA2_7B, LLAMA2_70B, PRECISION_POLICIES, SMALL_CONFIGS, DynamicLossScaler,
                             LiveGraphCounter, SavedTensorLog, Transformer, TransformerConfig, accumulate_gradients,
                             activation_bytes, block_activation_bytes, checkpointed_activation_bytes,
                             count_parameters, estimate_training_memory, measure_training_memory,
                             model_state_bytes, saved_activation_bytes, zero1_adam_step, measure_peak_bytes,
                             measure_training_peaks, estimate_step_peaks, checkpoint_segments, segment_bounds)
from llmspace.memory.peak import _block_saved_parts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(config, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config.vocab_size, (B, T), generator=g),
            torch.randint(0, config.vocab_size, (B, T), generator=g))


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
@pytest.mark.parametrize("B, T", [(2, 32), (4, 64)])
def test_estimator_agrees_with_measurement(name, B, T):
    """Every term of the estimate within 5% of what one real Adam step holds: parameter, gradient and
    optimizer bytes read from the tensors, activation bytes from autograd's saved-tensor hooks."""
    config = SMALL_CONFIGS[name]
    torch.manual_seed(0)
    model = Transformer(config)
    measured = measure_training_memory(model, *_batch(config, B, T), torch.optim.Adam(model.parameters()))
    estimated = estimate_training_memory(model, B, T, policy="fp32")
    for key in ("params", "grads", "optimizer", "activations", "total"):
        got, want = getattr(estimated, key), getattr(measured, key)
        assert got == pytest.approx(want, rel=0.05), (key, got, want)
    assert estimated.activations == measured.activations   # the activation count is exact
    assert measured.params == 4 * count_parameters(model)


#: The configurations the peak estimator must predict: three small shapes at two batch shapes, a long
#: sequence (sdpa and explicit attention: its B·h·T² gradients) and a large vocabulary (B·T·V logits).
PEAK_CASES = [(name, SMALL_CONFIGS[name], B, T) for name in SMALL_CONFIGS for B, T in [(2, 32), (4, 64)]] + [
    ("gpt-tiny long", SMALL_CONFIGS["gpt-tiny"], 1, 1024),
    ("math-attn long", TransformerConfig(vocab_size=256, d_model=96, n_layers=3, n_heads=4, d_ff=384,
                                         attention="math", tie_embeddings=True, max_seq_len=512), 2, 512),
    ("large vocab", TransformerConfig(vocab_size=32000, d_model=64, n_layers=2, n_heads=4, d_ff=256), 4, 64),
]


@pytest.mark.parametrize("name, config, B, T", PEAK_CASES, ids=[c[0] for c in PEAK_CASES])
def test_peak_estimate_matches_allocator(name, config, B, T):
    """first_step_peak and peak (steady state) within 5% of the CPU allocator's own peak, measured from
    torch.profiler's memory events (every allocation and free, replayed in time order) over two real
    torch.optim.Adam steps, and the peak falls in the phase the estimator names."""
    measured = measure_training_peaks(config, B, T, n_steps=2)
    est = estimate_training_memory(config, B, T, policy="fp32")
    for row, want, phase in ((measured[0], est.first_step_peak, est.first_step_peak_phase),
                             (measured[1], est.peak, est.peak_phase)):
        assert want == pytest.approx(row["peak"], rel=0.05), (row, want)
        assert phase == row["phase"], (row, phase)


def test_peak_step2_exceeds_step1_when_adam_state_arrives_during_backward():
    """Adam allocates its state in the first step() — after the first backward: the second step's
    backward peak carries 8 bytes/param more (measured: step 2 > step 1 by about that)."""
    config, B, T = SMALL_CONFIGS["llama-tiny"], 4, 64
    first, second = measure_training_peaks(config, B, T, n_steps=2)
    assert first["phase"] == second["phase"] == "backward"
    state = 8 * count_parameters(config)
    assert second["peak"] - first["peak"] == pytest.approx(state, rel=0.01)


def test_measure_peak_bytes_counts_known_tensors():
    """The profiler-based measurement on tensors of known size: 4000 + 8000 bytes live together, then
    one freed; regions opened with record_function get their own peak; frees of older memory ignored."""
    old = torch.empty(10_000)

    def fn():
        nonlocal old
        with torch.profiler.record_function("two"):
            a = torch.empty(1000)                       # 4000 bytes
            b = torch.empty(1000, dtype=torch.float64)  # 8000 bytes
            del a
        with torch.profiler.record_function("one"):
            c = torch.empty(500)                        # 2000 bytes, b still live
            del c
        old = None                                      # allocated before: not counted
        return b
    out = measure_peak_bytes(fn)
    assert out["peak"] == 12_000
    assert out["regions"]["two"]["peak"] == 12_000
    assert out["regions"]["one"]["peak"] == 10_000
    assert out["end"] == 0                              # b is freed when fn's return value is dropped
    with pytest.raises(ValueError, match="device"):
        measure_peak_bytes(fn, device="tpu")


def test_block_parts_sum_to_block_bytes():
    for config in SMALL_CONFIGS.values():
        assert sum(_block_saved_parts(config, 3, 24, 4).values()) == block_activation_bytes(config, 3, 24)


def test_step_peaks_bad_input():
    with pytest.raises(ValueError, match="device"):
        estimate_step_peaks(SMALL_CONFIGS["gpt-tiny"], 2, 8, device="tpu")
    with pytest.raises(ValueError, match="seq_len"):
        estimate_step_peaks(SMALL_CONFIGS["gpt-tiny"], 2, 0)
    with pytest.raises(TypeError, match="config"):
        estimate_step_peaks("gpt", 2, 8)


@pytest.mark.parametrize("name, make", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("sgd-momentum", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
    ("adamw", lambda ps: torch.optim.AdamW(ps)),
])
def test_optimizer_state_bytes(name, make):
    """The optimizer term for SGD (none), SGD with momentum (one buffer) and AdamW (two moments)
    against the state torch.optim actually allocates (AdamW adds a 4-byte step per tensor)."""
    config = SMALL_CONFIGS["llama-tiny"]
    torch.manual_seed(0)
    model = Transformer(config)
    measured = measure_training_memory(model, *_batch(config, 2, 16), make(model.parameters()))
    estimated = estimate_training_memory(model, 2, 16, optimizer=name)
    assert estimated.optimizer == pytest.approx(measured.optimizer, rel=0.001, abs=1)
    with pytest.raises(ValueError, match="optimizer"):
        estimate_training_memory(model, 2, 16, optimizer="lion")


def test_block_activation_bytes_is_one_layer():
    """Adding a layer adds exactly block_activation_bytes to what autograd saves."""
    for config in SMALL_CONFIGS.values():
        small = TransformerConfig(**{**config.__dict__, "n_layers": 1})
        big = TransformerConfig(**{**config.__dict__, "n_layers": 2})
        torch.manual_seed(0)
        tokens, targets = _batch(config, 3, 24)
        delta = saved_activation_bytes(Transformer(big), tokens, targets) - \
            saved_activation_bytes(Transformer(small), tokens, targets)
        assert delta == block_activation_bytes(config, 3, 24)


def test_bf16_model_activations():
    """A pure-bf16 model: the big tensors halve, norm/softmax statistics stay fp32 (measured)."""
    config = SMALL_CONFIGS["gpt-tiny"]
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16)
    tokens, targets = _batch(config, 2, 32)
    measured = saved_activation_bytes(model, tokens, targets)
    assert activation_bytes(config, 2, 32, dtype_bytes=2) == pytest.approx(measured, rel=0.05)


def test_llama2_on_meta_device():
    """Parameter counts of the released Llama-2 7B and 70B checkpoints, from meta tensors (no memory)."""
    assert count_parameters(LLAMA2_7B) == 6_738_415_616
    assert count_parameters(LLAMA2_70B) == 68_976_648_192
    with torch.device("meta"):
        model = Transformer(LLAMA2_70B)
    assert all(p.is_meta for p in model.parameters())
    est = estimate_training_memory(model, 1, 4096, policy="mixed-zero", activation_dtype_bytes=2,
                                   zero_stage=3, world_size=64)
    assert est.params == 2 * -(-68_976_648_192 // 64)
    assert est.optimizer == 8 * -(-68_976_648_192 // 64)


def test_bytes_per_parameter_conventions():
    """16 (fp32 / ZeRO paper), 18 (Megatron bf16 + fp32 grads, HF autocast), 20 (fp16 + fp32 main grads)."""
    per_param = {k: p.bytes_per_param for k, p in PRECISION_POLICIES.items()}
    assert per_param == {"fp32": 16, "mixed-zero": 16, "bf16-fp32-grads": 18,
                         "fp16-fp32-main-grads": 20, "autocast-hf": 18}


def test_zero_paper_example():
    """ZeRO paper, Figure 1: Ψ = 7.5B, N = 64, K = 12 → 120, 31.4, 16.6, 1.88 GB per device."""
    psi, policy = 7_500_000_000, PRECISION_POLICIES["mixed-zero"]
    totals = [sum(model_state_bytes(psi, policy, stage, 64).values()) / 1e9 for stage in range(4)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.88], abs=0.05)


def test_model_state_bytes_bad_input():
    policy = PRECISION_POLICIES["fp32"]
    with pytest.raises(ValueError, match="zero_stage"):
        model_state_bytes(10, policy, 4, 2)
    with pytest.raises(ValueError, match="world_size"):
        model_state_bytes(10, policy, 1, 0)
    with pytest.raises(ValueError, match="n_params"):
        model_state_bytes(-1, policy)
    with pytest.raises(TypeError, match="model_or_config"):
        estimate_training_memory("gpt", 1, 1)
    with pytest.raises(ValueError, match="policy"):
        estimate_training_memory(SMALL_CONFIGS["gpt-tiny"], 1, 1, policy="fp8")
    with pytest.raises(ValueError, match="d_model"):
        TransformerConfig(vocab_size=10, d_model=10, n_layers=1, n_heads=3, d_ff=4)


def test_gradient_accumulation_matches_large_batch():
    """Accumulated micro-batch gradients equal the full-batch gradient (torch autograd on the whole
    batch), while the activations saved at any time are those of one micro-batch."""
    config = SMALL_CONFIGS["gpt-tiny"]
    torch.manual_seed(0)
    model = Transformer(config)
    tokens, targets = _batch(config, 8, 32)

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    full = loss_fn(model(tokens), targets)
    full.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    counter = LiveGraphCounter(model)
    loss, grads = accumulate_gradients(counter, loss_fn, tokens, targets, 4)
    assert float(loss) == pytest.approx(float(full.detach()), rel=1e-6)
    assert int(counter.max_alive) == 1
    for p, grad, g in zip(model.parameters(), grads, reference):
        assert p.grad is grad
        torch.testing.assert_close(grad, g, rtol=1e-5, atol=1e-7)
    # activations: one micro-batch of 2 sequences at a time vs 8
    assert activation_bytes(config, 2, 32) < 0.3 * activation_bytes(config, 8, 32)
    with SavedTensorLog(exclude=list(model.parameters())) as log:
        model.loss(tokens[:2].clone(), targets[:2].clone())   # a slice would save the whole batch storage
    assert log.bytes == activation_bytes(config, 2, 32)
    with pytest.raises(ValueError, match="divide"):
        accumulate_gradients(model, loss_fn, tokens, targets, 3)


def test_accumulation_with_padding_normalises_by_tokens():
    """Per-token mean cross-entropy with padding (ignore_index): dividing each micro-batch mean by the
    number of micro-batches gives gradients different from the full batch's (what transformers 4.46
    fixed, huggingface/transformers#34191); weighting by token counts (ignore_index=...) matches full-batch torch autograd, also when a
    micro-batch is all padding."""
    config = SMALL_CONFIGS["gpt-tiny"]
    torch.manual_seed(0)
    model = Transformer(config)
    tokens, targets = _batch(config, 8, 16)
    targets = targets.clone()
    lengths = [16, 3, 9, 1, 12, 16, 5, 2]
    for i, n in enumerate(lengths):
        targets[i, n:] = -100
    targets[6:] = -100                                 # the last micro-batch (of 4) is all padding

    def loss_fn(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    full = loss_fn(model(tokens), targets)
    full.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    loss, grads = accumulate_gradients(model, loss_fn, tokens, targets, 4, ignore_index=-100)
    assert float(loss) == pytest.approx(float(full.detach()), rel=1e-5)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    targets_ok = targets.clone()
    targets_ok[6:, 0] = 1                              # no all-padding micro-batch: the naive division runs
    full = loss_fn(model(tokens), targets_ok)
    model.zero_grad()
    full.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    naive, _ = accumulate_gradients(model, loss_fn, tokens, targets_ok, 4)
    assert abs(float(naive) - float(full.detach())) > 1e-3   # the bug: a different loss and gradient
    weighted, grads = accumulate_gradients(model, loss_fn, tokens, targets_ok, 4, ignore_index=-100)
    assert float(weighted) == pytest.approx(float(full.detach()), rel=1e-5)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ignore_index"):
        accumulate_gradients(model, loss_fn, tokens, torch.full_like(targets, -100), 4, ignore_index=-100)
    with pytest.raises(TypeError, match="ignore_index"):
        accumulate_gradients(model, loss_fn, tokens, targets, 4, ignore_index="pad")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_checkpointing_same_gradients_fewer_bytes(k):
    """Our segment checkpointing and torch.utils.checkpoint give the plain gradients; the measured peak
    (forward saves + one segment's recomputation) equals the estimator's."""
    config = TransformerConfig(vocab_size=128, d_model=64, n_layers=4, n_heads=4, d_ff=256)
    torch.manual_seed(0)
    model = Transformer(config)
    tokens, targets = _batch(config, 2, 32)
    model.loss(tokens, targets).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    ours = checkpointed_activation_bytes(model, tokens, targets, k)
    theirs = checkpointed_activation_bytes(model, tokens, targets, k, use_torch=True)
    for a, b, c in zip(ours["grads"], theirs["grads"], reference):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)
    assert ours["forward"] == theirs["forward"]            # both keep only segment inputs
    assert ours["saved_peak"] == activation_bytes(config, 2, 32, checkpoint_segments=k)
    assert ours["forward"] < activation_bytes(config, 2, 32) / 4
    # the allocator's peak (profiler memory events) holds more than the saved bytes: gradients and
    # backward temporaries; checkpointing lowers it against plain backprop from 2 segments on (one
    # segment recomputes the whole stack at once: no saving)
    plain = checkpointed_activation_bytes(model, tokens, targets, None)
    assert ours["allocator_peak"] > ours["saved_peak"]
    if k > 1:
        assert ours["allocator_peak"] < plain["allocator_peak"]


def test_checkpointing_frozen_parameter_in_segment():
    """A frozen parameter inside a checkpointed segment (LoRA-style fine-tuning): gradients of the
    trainable parameters equal plain backprop's and torch.utils.checkpoint's; the frozen one gets none."""
    config = TransformerConfig(vocab_size=128, d_model=64, n_layers=4, n_heads=4, d_ff=256)
    torch.manual_seed(0)
    model = Transformer(config)
    for block in model.blocks:
        block.attn.qkv.weight.requires_grad_(False)
        block.mlp.up.requires_grad_(False)
    tokens, targets = _batch(config, 2, 16)
    model.loss(tokens, targets).backward()
    reference = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for use_torch in (False, True):
        out = checkpointed_activation_bytes(model, tokens, targets, 2, use_torch=use_torch)
        got = [p.grad for p in model.parameters()]
        for p, g, r in zip(model.parameters(), got, reference):
            if p.requires_grad:
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
            else:
                assert g is None and r is None


def test_checkpoint_segment_count_is_honoured():
    """n_segments is never silently changed: 3 segments of 4 blocks are 3 recomputations (2+1+1
    blocks); more segments than blocks raise."""
    config = TransformerConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, d_ff=64)
    torch.manual_seed(0)
    model = Transformer(config)
    log = []
    x = model.embed_tokens(_batch(config, 1, 8)[0])
    checkpoint_segments(model.blocks, x, 3, log).sum().backward()
    assert len(log) == 3
    assert segment_bounds(4, 3) == [(0, 2), (2, 3), (3, 4)]
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match="n_segments"):
            checkpoint_segments(model.blocks, x, bad)


@pytest.mark.parametrize("n, world", [(10, 2), (11, 3), (7, 4)])
def test_zero1_step_matches_adam(n, world):
    """Simulated ZeRO-1 over `world` ranks = torch.optim.Adam on the mean gradient, for 3 steps
    (shards padded when n is not a multiple of world)."""
    torch.manual_seed(n)
    param = torch.randn(n)
    ref = nn.Parameter(param.clone())
    adam = torch.optim.Adam([ref], lr=0.1)
    shard = -(-n // world)
    states = [{"exp_avg": torch.zeros(shard), "exp_avg_sq": torch.zeros(shard)} for _ in range(world)]
    flat = param.clone()
    for step in range(1, 4):
        grads = [torch.randn(n) for _ in range(world)]
        ref.grad = torch.stack(grads).mean(0)
        adam.step()
        flat = zero1_adam_step(flat, grads, states, step, lr=0.1)
        torch.testing.assert_close(flat, ref.detach(), rtol=1e-6, atol=1e-6)
    full_m = torch.cat([s["exp_avg"] for s in states])[:n]
    torch.testing.assert_close(full_m, adam.state[ref]["exp_avg"])


def test_loss_scaler_matches_grad_scaler():
    """Scale sequence of DynamicLossScaler = torch.amp.GradScaler's on the same overflow pattern."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    ours = DynamicLossScaler(scale=1024.0, growth_interval=2)
    for overflow in [False, False, True, False, False, False, True, True, False]:
        grad = torch.tensor([1.0, float("inf") if overflow else 2.0, 3.0])
        theirs.scale(torch.ones(()))                       # initialises the scale tensor
        p.grad = grad * theirs.get_scale()
        theirs.step(opt)
        theirs.update()
        stepped = ours.unscale_and_check([grad * ours.scale])
        assert stepped is not overflow
        assert ours.scale == theirs.get_scale()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.max_memory_allocated)")
@pytest.mark.parametrize("name, config, B, T", PEAK_CASES, ids=[c[0] for c in PEAK_CASES])
def test_gpu_peak_estimate_matches_max_memory_allocated(name, config, B, T):
    """On a GPU: first_step_peak and peak (device="cuda": 512-byte blocks, foreach Adam) within 5% of
    torch.cuda.max_memory_allocated over each phase of two real Adam steps."""
    measured = measure_training_peaks(config, B, T, n_steps=2, device="cuda")
    est = estimate_training_memory(config, B, T, policy="fp32", device="cuda")
    assert est.first_step_peak == pytest.approx(measured[0]["peak"], rel=0.05), (measured[0], est)
    assert est.peak == pytest.approx(measured[1]["peak"], rel=0.05), (measured[1], est)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.max_memory_allocated)")
def test_gpu_peak_bounds():
    """On a GPU, torch.cuda.max_memory_allocated during the step is at least what must coexist: the
    parameters with every saved activation (end of forward), and the model states (after the step)."""
    config = SMALL_CONFIGS["gpt-tiny"]
    torch.manual_seed(0)
    model = Transformer(config).cuda()
    tokens, targets = (t.cuda() for t in _batch(config, 4, 64))
    measured = measure_training_memory(model, tokens, targets, torch.optim.Adam(model.parameters()))
    assert measured.peak_allocated >= measured.params + measured.activations
    assert measured.peak_allocated >= measured.model_states

"""Distributed strategies on 2 CPU processes (gloo, file-store rendezvous in a temp dir, no ports).

References nobody here wrote: single-process ``torch.optim.Adam`` training on the full batch (what
data parallelism must reproduce), ``torch.nn.parallel.DistributedDataParallel`` and
``torch.distributed.fsdp.fully_shard`` (FSDP2). All strategies run in one spawn (a spawn costs ~5 s).
"""
import pytest
import torch

from llmspace.memory import PRECISION_POLICIES, TransformerConfig, count_parameters, model_state_bytes
from llmspace.parallel import gpipe_bubble_fraction, gpipe_step, ring_bytes_sent, shard_range, spawn, strategy_worker

CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16,
                           bias=False)  # with biases, the key bias has an exactly-zero gradient:
# Adam turns its rounding noise into ±lr steps, which no two summation orders reproduce
BATCH, SEQ, STEPS, WORLD = 8, 16, 3, 2
STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "tp", "pp", "zero1-allreduce",
              "zero1-unused", "zero2-unused", "zero3-unused")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    spawn(strategy_worker, WORLD, str(out), str(out), CONFIG, BATCH, SEQ, STEPS, STRATEGIES)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """Single-process Adam on the full batch: the training every strategy must reproduce."""
    from llmspace.parallel import _data, _model
    tokens, targets = _data(CONFIG, BATCH, SEQ)
    model = _model(CONFIG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model.loss(tokens, targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, dict(model.named_parameters())


@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2", "zero3", "fsdp2"])
def test_data_parallel_matches_single_process(results, reference, name):
    """DDP, ZeRO-1/2/3 (ours) and FSDP2 (torch) train exactly like single-process Adam on the full batch."""
    ref_losses, ref_params = reference
    got = results[0][name]
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert results[1][name]["losses"] == got["losses"]
    for p, q in zip(got["params"], ref_params.values()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["zero1-unused", "zero2-unused", "zero3-unused"])
def test_zero_skips_parameter_without_gradient(results, name):
    """A layer that never runs has no gradient: ZeroAdam (stages 1, 2, 3) skips it as torch.optim.Adam
    does — it stays at its initial value, and everything else trains exactly like single-process
    torch.optim.Adam on the same model."""
    import torch.nn as nn

    from llmspace.parallel import _data, _model
    tokens, targets = _data(CONFIG, BATCH, SEQ)
    model = _model(CONFIG)
    model.unused = nn.Linear(CONFIG.d_model, CONFIG.d_model, bias=False)
    initial = model.unused.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model.loss(tokens, targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert model.unused.weight not in opt.state                # torch.optim.Adam never touched it
    got = results[0][name]
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    for p, q in zip(got["params"], model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["params"][-1], initial, rtol=0, atol=0)


def test_zero1_traffic_equals_ddp(results, reference):
    """ZeRO-1 as reduce-scatter + all-gather sends what DDP's all-reduce sends (ring algorithms:
    2(N-1)/N of the gradient bytes per step); the naive all-reduce + all-gather form sends 1.5x.
    Same training either way."""
    n = count_parameters(CONFIG)
    ddp = ring_bytes_sent({"all_reduce": 4 * n * STEPS}, WORLD)      # DDP all-reduces every gradient once
    rs = ring_bytes_sent(results[0]["zero1"]["comm"], WORLD)
    ar = ring_bytes_sent(results[0]["zero1-allreduce"]["comm"], WORLD)
    assert results[0]["zero1"]["comm"]["all_reduce"] == 0
    assert rs == pytest.approx(ddp, rel=0.02)                          # per-parameter padding only
    assert ar == pytest.approx(1.5 * ddp, rel=0.02)
    assert results[0]["zero1-allreduce"]["losses"] == pytest.approx(reference[0], rel=1e-5)


def test_gpipe_rejects_indivisible_batch_before_any_collective():
    """A batch the micro-batch count does not divide: a clear ValueError, raised before any send/recv
    (no process group exists here, so reaching a collective would raise a different error)."""
    import torch.nn as nn
    stage = nn.Linear(4, 4)
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="divisible by n_micro_batches"):
        gpipe_step(stage, 0, 2, x, y, 4, nn.functional.mse_loss, (2, 4))
    with pytest.raises(ValueError, match="divisible by n_micro_batches"):
        gpipe_step(stage, 1, 2, x, y, 4, nn.functional.mse_loss, (2, 4))
    with pytest.raises(ValueError, match="act_shape"):
        gpipe_step(stage, 0, 2, x, y, 3, nn.functional.mse_loss, (3, 4))
    with pytest.raises(ValueError, match="n_micro_batches"):
        gpipe_step(stage, 0, 2, x, y, 0, nn.functional.mse_loss, (3, 4))


@pytest.mark.parametrize("name, stage", [("ddp", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3), ("fsdp2", 3)])
def test_per_rank_memory_matches_estimator(results, name, stage):
    """Per-rank parameter, gradient and optimizer bytes measured from tensors vs the ZeRO formulas
    (Rajbhandari et al. 2020: 16P, 4P + 12P/N, 4P + 14P/N... in fp32 Adam terms) within 2%
    (per-parameter padding makes shards slightly larger than P/N)."""
    n = count_parameters(CONFIG)
    expected = model_state_bytes(n, PRECISION_POLICIES["fp32"], stage, WORLD)
    for r in range(WORLD):
        mem = results[r][name]["memory"]
        assert mem["optimizer"] == pytest.approx(expected["optimizer"], rel=0.02)
        assert mem["params"] == pytest.approx(expected["weights"], rel=0.02)
        if name != "zero1" and name != "ddp":   # after step: ZeRO-1/DDP keep full grads, others shards
            assert mem["grads"] == pytest.approx(expected["grads"], rel=0.02)
        else:
            assert mem["grads"] == pytest.approx(4 * n, rel=0.02)


def test_tensor_parallel_mlp_matches_full_mlp(results):
    """Column- then row-parallel MLP (Megatron-LM, Shoeybi et al. 2019) vs the unsplit MLP: same output
    and input gradient; each rank's weight gradient is its slice of the full one; weights and the d_ff
    activations are halved."""
    for r in range(WORLD):
        tp = results[r]["tp"]
        for key in ("out_err", "grad_x_err", "grad_up_err", "grad_down_err"):
            assert tp[key] < 1e-5, (key, tp[key])
        assert tp["param_bytes_full"] == 4 * 2 * CONFIG.d_model * CONFIG.d_ff   # two fp32 matrices
        assert tp["param_bytes"] == tp["param_bytes_full"] // WORLD               # half of each per rank
        assert tp["saved_bytes"] < tp["saved_bytes_full"]


def test_pipeline_matches_single_process(results, reference):
    """GPipe (Huang et al. 2019) with 4 micro-batches over 2 stages: same losses and parameters as
    full-batch training; stage 0 holds the activations of all its micro-batches at once."""
    ref_losses, ref_params = reference
    assert results[0]["pp"]["losses"] == pytest.approx(ref_losses, rel=1e-5)
    seen = set()
    for r in range(WORLD):
        for name, p in results[r]["pp"]["params"].items():
            torch.testing.assert_close(p, ref_params[name].detach(), rtol=1e-4, atol=1e-5)
            seen.add(name)
    assert seen == set(ref_params)


def test_bubble_fraction_and_shards():
    """GPipe bubble (p-1)/(m+p-1) from the paper; shards cover a padded tensor exactly once."""
    assert gpipe_bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert gpipe_bubble_fraction(1, 8) == 0
    assert gpipe_bubble_fraction(2, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_stages"):
        gpipe_bubble_fraction(0, 4)
    ranges = [shard_range(10, r, 3) for r in range(3)]
    assert ranges == [(0, 4), (4, 8), (8, 12)]

"""benchmarks/smollm2_compress.py: its LLM.int8 layer equals ``llmspace.quant.llm_int8_matmul`` bit for bit,
its calibration windows never overlap the evaluation windows, and the smoke path (2 short windows, layer 0
only) runs end to end on the real SmolLM2 weights (loaded once per process, shared with test_smollm2.py).
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import smollm2_compress as C  # noqa: E402

from llmspace import quant as Q  # noqa: E402


@pytest.mark.parametrize("n_outlier_cols", [0, 3, 1536])
def test_llm_int8_f64_equals_library(n_outlier_cols):
    """Reference: the library's int64-accumulator ``llm_int8_matmul`` (the float64 GEMM must be exact)."""
    gen = torch.Generator().manual_seed(n_outlier_cols)
    x = torch.randn(64, 1536, generator=gen)
    x[:, :n_outlier_cols] *= 40                      # columns far over the threshold
    x[5, 700] = 300.0 if n_outlier_cols else 5.0     # one more outlier (or just under the threshold)
    w = torch.randn(96, 1536, generator=gen) * 0.05
    got, n_out = C.llm_int8_matmul_f64(x, w, 6.0)
    assert torch.equal(got, Q.llm_int8_matmul(x, w, 6.0))
    assert n_out == int((x.abs() > 6).any(0).sum())
    layer = torch.nn.Linear(1536, 96)
    wrapped = C.LLMInt8Linear(layer, 6.0)
    y = wrapped(x.view(4, 16, 1536))
    assert torch.equal(y, (Q.llm_int8_matmul(x, layer.weight.detach(), 6.0) + layer.bias).view(4, 16, 96))
    assert wrapped.calls == 1 and wrapped.outlier_columns == n_out


def test_calibration_windows_disjoint_from_evaluation():
    ids = torch.arange(20_000)
    spans = [(s, s + 512) for s in C.eval_starts(ids.numel(), 512, 8)]
    assert torch.equal(torch.stack([ids[a:b] for a, b in spans]), __import__("llmspace.evaluate").evaluate
                       .token_windows(ids, 512, 8))                            # same starts as the harness
    picks = {}
    for seed in (0, 1, 2):
        windows, starts = C.calibration_windows(ids, 512, 8, 256, 12, seed)
        assert windows.shape == (12, 256) and torch.equal(windows[:, 0], torch.tensor(starts))
        for s in starts:
            assert all(s + 256 <= a or s >= b for a, b in spans)             # no overlap with evaluation
        assert all(b - a >= 256 for a, b in zip(starts, starts[1:]))         # nor with each other
        assert starts == C.calibration_windows(ids, 512, 8, 256, 12, seed)[1]  # the seed decides
        picks[seed] = starts
    assert picks[0] != picks[1] != picks[2]
    with pytest.raises(ValueError, match="calibration windows"):
        C.calibration_windows(ids, 512, 8, 256, 500, 0)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LLMSPACE_BENCH_SMOKE") != "1",
                    reason="the smoke path takes minutes on 2 cores (GPTQ of one layer for 2 seeds, 16 short "
                           "evaluations): set LLMSPACE_BENCH_SMOKE=1 to run it")
def test_smoke_quant_and_prune_on_smollm2():
    """The smoke path of both benchmarks on layer 0 of the real model (the model itself is loaded once per
    process and shared with test_smollm2.py); every row records its calibration seed, not the bootstrap's."""
    quant = C.run("quant", smoke=True, write=False)
    prune = C.run("prune", smoke=True, write=False)
    for payload in (quant, prune):
        assert payload["complete"] and math.isfinite(payload["dense"]["ppl"])
        assert len(payload["dense"]["nll"]) == 2 and all(len(r["nll"]) == 2 for r in payload["rows"])
        assert all(r["ratio_low"] <= r["ratio"] <= r["ratio_high"] for r in payload["rows"])
    assert [r["seed"] for r in quant["rows"]] == [None, None, 0, 1, None, None]
    assert [r["seed"] for r in prune["rows"]] == [None, None, 0, 1, None, 0, 1]
    assert all(r["bootstrap_seed"] == 0 for r in quant["rows"] + prune["rows"])
    rows = {(r["variant"], r["seed"]): r for r in quant["rows"]}
    int8 = rows[("int8 per-channel RTN (symmetric)", None)]
    assert abs(math.log(int8["ratio"])) < 0.01                   # one int8 layer barely moves the NLL
    assert rows[("int4 g64 RTN (symmetric)", None)]["bits_per_weight"] == pytest.approx(4 + 16 / 64)
    gptq = [r for (v, s), r in rows.items() if v.startswith("int4 g64 GPTQ")]
    assert [r["seed"] for r in gptq] == [0, 1] and gptq[0]["calibration_starts"] != gptq[1]["calibration_starts"]
    fractions = rows[("LLM.int8 (threshold 6)", None)]["fp16_column_fraction_by_kind"]
    assert set(fractions) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(0 <= f <= 1 for f in fractions.values())
    down = quant["outliers"]["by_kind"]["down_proj"][0]
    assert down["layer"] == 0 and down["max"] >= down["p99"] >= down["median"] > 0
    prows = {(r["variant"], r["seed"]): r for r in prune["rows"]}
    for (variant, _), r in prows.items():
        assert r["sparsity"] == pytest.approx(0.5, abs=1e-9), variant
        assert r["ratio"] > 1.0, variant                          # half of layer 0 gone costs something
    assert prows[("Wanda 2:4", 0)]["calibration_starts"] != prows[("Wanda 2:4", 1)]["calibration_starts"]


def test_fresh_copy_shares_only_what_is_not_compressed():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    copy_ = C.fresh_copy(base, (0,))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    for name, p in copy_.named_parameters():
        shared = p is dict(base.named_parameters())[name]
        assert shared != name.startswith("model.layers.0."), name
    C.block_linears(copy_, (0,))["model.layers.0.mlp.down_proj"].weight.data.zero_()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())   # base untouched
    ids = torch.randint(0, 97, (2, 8))
    full = C.fresh_copy(base, None)
    assert full.model.embed_tokens.weight is base.model.embed_tokens.weight
    assert torch.equal(full(ids).logits, base(ids).logits)

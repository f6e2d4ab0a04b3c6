"""llmspace.models: the tiny LM trains deterministically, its committed weights reproduce the recorded
perplexity, and all-MiniLM-L6-v2 loads offline and embeds like sentence-transformers' own pipeline
(reference: transformers' BertModel + mean pooling + L2 normalization, the model card's recipe)."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmspace import models as M


def test_corpus_is_deterministic_and_split_by_file():
    corpus = M.load_corpus()
    files = [p.name for p in M.stdlib_files()]
    assert files == sorted(files) and len(files) > 100
    assert set(corpus["files"]["train"]).isdisjoint(corpus["files"]["validation"])
    assert corpus["files"]["validation"] == files[M.VALIDATION_EVERY - 1::M.VALIDATION_EVERY]
    assert corpus["train"].dtype == torch.uint8
    total = sum(p.stat().st_size + 1 for p in M.stdlib_files())   # + one separator byte per file
    assert corpus["train"].numel() + corpus["validation"].numel() == total


def test_training_is_deterministic():
    """Same seed → bit-identical weights after a few steps; another seed → different weights."""
    cfg = M.TinyLMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, context=32)
    a = M.train_tiny_lm(steps=2, batch_size=4, seed=0, cfg=cfg).state_dict()
    b = M.train_tiny_lm(steps=2, batch_size=4, seed=0, cfg=cfg).state_dict()
    c = M.train_tiny_lm(steps=2, batch_size=4, seed=1, cfg=cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_lm_is_causal():
    """Logits at position t must not depend on tokens after t."""
    torch.manual_seed(0)
    model = M.TinyLM(M.TinyLMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, context=16)).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(idx)[0, :10], model(changed)[0, :10], atol=1e-6)
        assert not torch.allclose(model(idx)[0, 10:], model(changed)[0, 10:])


def test_committed_weights_reproduce_the_recorded_perplexity():
    record = M.tiny_lm_record()
    corpus = M.load_corpus()
    if corpus["sha256"] != record["corpus"]["sha256"]:
        pytest.skip("this Python's standard library differs from the one the LM was trained on")
    model = M.load_tiny_lm()
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    ppl = M.perplexity(model, corpus["validation"][:M.EVAL_BYTES])
    assert ppl == pytest.approx(record["eval_slice_perplexity"], rel=1e-4)
    # the one evaluation slice is the whole split: every window of 129 bytes, the rest (< 129 bytes) dropped
    assert M.EVAL_BYTES == corpus["validation"].numel() // 129 * 129
    assert ppl == pytest.approx(record["validation_perplexity"], rel=1e-4)
    assert ppl < 8   # far below the 256 of a uniform guess and the ~20 of a unigram model


def test_perplexity_of_a_uniform_model_is_256():
    """Reference: a model with constant logits predicts 1/256 per byte, perplexity exactly 256."""
    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(*idx.shape, 256)
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    assert M.perplexity(Uniform(), data, context=16) == pytest.approx(256, rel=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        M.perplexity(Uniform(), data.long())
    with pytest.raises(ValueError, match="fewer than one window"):
        M.perplexity(Uniform(), data[:10], context=16)


def test_perplexity_scores_every_whole_window():
    """k * (context + 1) bytes are k windows (64 * 129 bytes are 64 windows, not 63); the reference is
    F.cross_entropy over the windows written out by hand, window by window for ``window_nll``."""
    class PreviousByte(torch.nn.Module):      # predicts the previous byte again: content-dependent losses
        def forward(self, idx):
            return 4.0 * torch.nn.functional.one_hot(idx, 256).float()
    context = 8
    data = torch.randint(0, 256, (3 * (context + 1) + 5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3):
        windows = data[: k * (context + 1)].long().view(k, context + 1)
        logits = PreviousByte()(windows[:, :-1])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1)).exp().item()
        assert M.perplexity(PreviousByte(), data[: k * (context + 1)], context=context) == pytest.approx(ref, rel=1e-6)
        per_window = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
        nll = M.window_nll(PreviousByte(), data[: k * (context + 1)], context=context, batch_size=2)
        assert nll.dtype == torch.float64 and nll.shape == (k,)
        torch.testing.assert_close(nll, per_window.double(), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        M.window_nll(PreviousByte(), data.long(), context=context)
    with pytest.raises(ValueError, match="fewer than one window"):
        M.window_nll(PreviousByte(), data[:context], context=context)
    for bad in (0, -1, 1.5):   # -1 used to slice off the last window silently, 0 to claim the data too short
        with pytest.raises(ValueError, match="max_windows"):
            M.window_nll(PreviousByte(), data, context=context, max_windows=bad)


def test_calibration_windows_are_training_text_drawn_by_the_seed():
    """Each window is 128 consecutive bytes of the training split (found in it by substring search, not by
    re-drawing the starts); one seed is one draw, another seed another draw."""
    corpus = M.load_corpus()
    train = bytes(corpus["train"].numpy())
    windows = M.calibration_windows(8, seed=1)
    assert windows.dtype == torch.int64 and windows.shape == (8, 128)
    assert all(bytes(w.to(torch.uint8).numpy()) in train for w in windows)
    assert torch.equal(windows, M.calibration_windows(8, seed=1))
    assert not torch.equal(windows, M.calibration_windows(8, seed=2))
    assert M.calibration_windows(4, seed=0, context=16).shape == (4, 16)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="n_windows"):
            M.calibration_windows(bad, seed=0)


def test_sentences_are_real_and_deterministic():
    sentences = M.stdlib_sentences()
    assert len(sentences) == 256 == len(set(sentences))
    assert all(len(s.split()) >= 5 for s in sentences)
    assert sentences == M.stdlib_sentences.__wrapped__()


def test_minilm_loads_offline_and_matches_mean_pooling():
    """Reference: the transformers BertModel inside it, mean-pooled over the attention mask by hand and
    L2-normalized — the recipe of the all-MiniLM-L6-v2 model card."""
    sentences = list(M.stdlib_sentences()[:16])
    model = M.load_minilm()
    emb = model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    assert emb.shape == (16, 384)
    bert, tok = model[0].auto_model, model.tokenizer   # the transformers BertModel and its tokenizer
    assert type(bert).__name__ == "BertModel"
    batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert torch.allclose(emb, ref, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216


def test_embedding_fidelity_against_brute_force():
    """Reference: per-query Python loops over cosine similarities."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 8, generator=g)
    emb = ref + 0.3 * torch.randn(40, 8, generator=g)
    k = 5
    got = M.embedding_fidelity(ref, emb, k=k)
    cos = lambda a, b: (a @ b / (a.norm() * b.norm())).item()  # noqa: E731
    mean_cos = sum(cos(ref[i], emb[i]) for i in range(40)) / 40
    overlaps, top1 = [], []
    for i in range(40):
        def ranked(x):
            return sorted((j for j in range(40) if j != i), key=lambda j: -cos(x[i], x[j]))
        a, b = ranked(ref), ranked(emb)
        overlaps.append(len(set(a[:k]) & set(b[:k])) / k)
        top1.append(a[0] == b[0])
    assert got["mean_cosine"] == pytest.approx(mean_cos, abs=1e-6)
    assert got["topk_agreement"] == pytest.approx(sum(overlaps) / 40, abs=1e-6)
    assert got["top1_agreement"] == pytest.approx(sum(top1) / 40, abs=1e-6)
    same = M.embedding_fidelity(ref, ref, k=k)
    assert same["topk_agreement"] == 1 and math.isclose(same["mean_cosine"], 1, abs_tol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        M.embedding_fidelity(ref, emb[:10])


def test_window_files_are_the_files_windows_start_in():
    """Against the file list itself: window k's first byte lies inside the file window_files names."""
    corpus = M.load_corpus()
    val = corpus["validation"][:M.EVAL_BYTES]
    files = M.window_files(val)
    assert files.dtype == torch.int64 and files.shape == (M.EVAL_BYTES // 129,)
    sizes = [len((M.stdlib_files()[0].parent / name).read_bytes()) + 1 for name in corpus["files"]["validation"]]
    ends = torch.cumsum(torch.tensor(sizes), 0)
    starts = torch.arange(files.numel()) * 129
    expected = torch.searchsorted(ends, starts, right=True)
    assert torch.equal(files, expected)
    assert files.unique().numel() == len(sizes) == 16
    with pytest.raises(TypeError, match="uint8"):
        M.window_files(val.long())

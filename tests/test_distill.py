"""llmspace.distill losses against torch.nn.functional (kl_div, cross_entropy, mse_loss) and autograd."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmspace import distill as D


def logits(seed, *shape, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 50), st.floats(0.5, 8.0), st.integers(0, 9999))
def test_kd_loss_equals_torch_kl_div_times_t_squared(batch, seq, vocab, T, seed):
    """Reference: T² · F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, 'batchmean')."""
    s, t = logits(seed, batch, seq, vocab), logits(seed + 1, batch, seq, vocab)
    ref = T * T * F.kl_div(F.log_softmax(s.view(-1, vocab) / T, -1), F.log_softmax(t.view(-1, vocab) / T, -1),
                           log_target=True, reduction="batchmean")
    torch.testing.assert_close(D.kd_loss(s, t, T), ref, rtol=1e-5, atol=1e-6)


def test_kd_loss_is_finite_for_huge_logits_and_zero_when_equal():
    """log(softmax) underflows to -inf for confident logits; log_softmax does not (reference: kl_div)."""
    s = torch.tensor([[200.0, 0.0, -200.0]])
    t = torch.tensor([[0.0, 200.0, -200.0]])
    got = D.kd_loss(s, t, 1.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                             reduction="batchmean"))
    assert D.kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_scale_is_independent_of_temperature():
    """Hinton et al. (2015): for large T, ∂KD/∂z_s ≈ (z_s - z_t)/N·(1/V) after T² scaling (zero-mean
    logits), so the gradient norm stays put as T grows. Reference: autograd vs that closed form."""
    V = 50
    s = logits(0, 8, V, scale=1.0)
    t = logits(1, 8, V, scale=1.0)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    for T in (100.0, 1000.0):  # the approximation's relative error is O(|z| / T)
        z = s.clone().requires_grad_()
        D.kd_loss(z, t, T).backward()
        closed_form = (s - t) / (V * T) * T / 8  # (1/T)(p_s - p_t) ≈ (z_s - z_t)/(V T) per position, ×T² / T
        torch.testing.assert_close(z.grad, closed_form, rtol=0.05, atol=1e-5)


def test_kd_loss_gradient_flows_only_to_student():
    s = logits(0, 4, 10).requires_grad_()
    t = logits(1, 4, 10).requires_grad_()
    D.kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 30), st.floats(0.5, 5.0), st.floats(0, 1),
       st.integers(0, 9999))
def test_distillation_loss_equals_torch_mix(batch, seq, vocab, T, alpha, seed):
    """Reference: alpha·T²·F.kl_div(...) + (1-alpha)·F.cross_entropy(ignore_index=-100) on kept positions."""
    s, t = logits(seed, batch, seq, vocab), logits(seed + 1, batch, seq, vocab)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100
    keep = labels.view(-1) != -100
    got = D.distillation_loss(s, t, labels, T, alpha)
    if not keep.any():
        assert got.item() == 0.0
        return
    ls, lt = s.view(-1, vocab)[keep], t.view(-1, vocab)[keep]
    kd = T * T * F.kl_div(F.log_softmax(ls / T, -1), F.log_softmax(lt / T, -1), log_target=True,
                          reduction="batchmean")
    ce = F.cross_entropy(s.view(-1, vocab), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(got, alpha * kd + (1 - alpha) * ce, rtol=1e-5, atol=1e-6)


def test_feature_distillation_equals_mse_loss_and_trains_projection():
    """Reference: F.mse_loss on the kept tokens; a projection fitted by gradient descent drives it toward 0
    when the teacher's features are a linear map of the student's."""
    torch.manual_seed(0)
    hs = torch.randn(3, 7, 16)
    target_map = torch.randn(16, 32)
    ht = hs @ target_map
    proj = D.FeatureProjector(16, 32)
    mask = torch.rand(3, 7) > 0.3
    got = D.feature_distillation_loss(hs, ht, proj, mask)
    torch.testing.assert_close(got, F.mse_loss(proj(hs)[mask], ht[mask]))
    torch.testing.assert_close(D.feature_distillation_loss(hs, ht, proj), F.mse_loss(proj(hs), ht))
    opt = torch.optim.LBFGS(proj.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    first = D.feature_distillation_loss(hs, ht, proj).item()

    def closure():
        opt.zero_grad()
        loss = D.feature_distillation_loss(hs, ht, proj)
        loss.backward()
        return loss

    opt.step(closure)
    assert D.feature_distillation_loss(hs, ht, proj).item() < 1e-6 * first


def test_sample_sequences_follows_the_model_distribution():
    """A 'model' with fixed next-token probabilities: sample frequencies match them (reference: the
    probabilities themselves, 5 sigma)."""
    probs = torch.tensor([0.7, 0.2, 0.1, 0.0])

    def model(idx):
        return probs.log().expand(idx.shape[0], idx.shape[1], 4)

    g = torch.Generator().manual_seed(0)
    out = D.sample_sequences(model, torch.zeros(2000, 1, dtype=torch.int64), 3, generator=g)
    assert out.shape == (2000, 4) and torch.all(out[:, 0] == 0)
    freq = torch.bincount(out[:, 1:].flatten(), minlength=4).float() / 6000
    assert torch.all((freq - probs).abs() <= 5 * (probs * (1 - probs) / 6000).sqrt() + 1e-9)


@pytest.mark.parametrize("fn, args, error, words", [
    (D.kd_loss, (torch.zeros(2, 3), torch.zeros(2, 4), 1.0), ValueError, "same shape"),
    (D.kd_loss, (torch.zeros(2, 3), torch.zeros(2, 3), 0.0), ValueError, "temperature must be positive"),
    (D.kd_loss, (torch.zeros(2, 3), torch.zeros(2, 3), "2"), TypeError, "temperature"),
    (D.kd_loss, (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), 1.0), TypeError, "floating"),
    (D.distillation_loss, (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 1.0, 1.5),
     ValueError, "alpha"),
    (D.distillation_loss, (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), 1.0, 0.5),
     ValueError, "labels must have shape"),
    (D.distillation_loss, (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), 1.0, 0.5), TypeError, "int64"),
    (D.feature_distillation_loss, (torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), torch.nn.Identity()),
     ValueError, "agree on"),
    (D.feature_distillation_loss, (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.nn.Identity(),
                                   torch.ones(2, 3)), ValueError, "mask must be a bool"),
])
def test_bad_input_is_rejected_clearly(fn, args, error, words):
    with pytest.raises(error, match=words):
        fn(*args)


# ---- masked vocabulary entries (issue 11): a teacher logit of -inf means probability 0, 0·log 0 = 0 ----

def _masked(seed, batch, seq, vocab, frac):
    t = logits(seed, batch, seq, vocab)
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.rand(batch, seq, vocab, generator=g) < frac
    mask[..., 0] = False                                    # every position keeps one finite logit
    return t.masked_fill(mask, -torch.inf)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 40), st.floats(0.5, 8.0), st.floats(0.05, 0.9),
       st.integers(0, 9999))
def test_kd_loss_with_masked_teacher_logits_equals_kl_div_with_probability_targets(batch, seq, vocab, T, frac,
                                                                                   seed):
    """Reference: T² · F.kl_div(log_softmax(s/T), softmax(t/T), reduction='batchmean') — probability targets,
    where torch defines 0 · log 0 = 0 (log_target=True would give NaN); the gradients agree too.
    In float64: torch sums p·log p - p·log q, we sum p·(log p - log q); in float32 the two roundings of a
    small KL differ by ~1e-7 absolute, which is not what this test is about."""
    s, t = logits(seed, batch, seq, vocab).double(), _masked(seed + 1, batch, seq, vocab, frac).double()
    ours, theirs = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = D.kd_loss(ours, t, T)
    ref = T * T * F.kl_div(F.log_softmax(theirs.view(-1, vocab) / T, -1), F.softmax(t.view(-1, vocab) / T, -1),
                           reduction="batchmean")
    assert torch.isfinite(ref)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    got.backward()
    ref.backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)
    labels = torch.zeros(batch, seq, dtype=torch.int64)     # label 0 is never masked
    mixed = D.distillation_loss(s, t, labels, T, 0.5)
    ce = F.cross_entropy(s.view(-1, vocab), labels.view(-1))
    torch.testing.assert_close(mixed, 0.5 * ref.detach() + 0.5 * ce, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kd_loss_masked_in_both_models_is_finite(dtype):
    """A token masked in teacher *and* student contributes 0 (torch's kl_div gives 0·(-inf) = NaN there:
    the reference is kl_div on the vocabulary without the masked column), and its gradient is finite."""
    s, t = logits(0, 3, 8).to(dtype), logits(1, 3, 8).to(dtype)
    s[:, 5], t[:, 5] = -torch.inf, -torch.inf
    s.requires_grad_()
    got = D.kd_loss(s, t, 2.0)
    keep = torch.arange(8) != 5
    ref = 4.0 * F.kl_div(F.log_softmax(s.detach()[:, keep].float() / 2, -1),
                         F.softmax(t[:, keep].float() / 2, -1), reduction="batchmean")
    torch.testing.assert_close(got.detach().float(), ref.to(got.dtype).float(), rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:, 5] == 0).all()

"""Chapter 5 — knowledge distillation: train a small student to imitate a large teacher.

Distillation saves space by *replacing* the model: the student has fewer or narrower layers, so its
weights, its KV cache and its activations are smaller, by exactly the ratio of the architectures —
nothing needs special kernels or formats. The price is paid in training: every student step also runs
the teacher's forward pass (or the teacher's outputs are computed once and stored), and the student
still needs enough data and steps to learn.

What makes a teacher better than the labels is the *soft* target: a full distribution over the
vocabulary per position ("this could also be *cat*, a bit *dog*, never *the*") instead of one correct
token. Dividing the logits by a temperature ``T > 1`` spreads that distribution so the student sees the
relative sizes of the small probabilities; the gradient of the softened loss shrinks like ``1/T²``, so
the loss is multiplied by ``T²`` (Hinton et al., 2015) to keep its scale independent of ``T``.

Losses here take logits of shape ``(..., vocab)`` and average over positions; all probabilities are
formed with ``log_softmax`` (never ``log(softmax(...))``, which underflows to ``-inf`` for confident
logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "kd_loss", "distillation_loss", "feature_distillation_loss", "FeatureProjector",
    "sample_sequences", "check_logits", "check_temperature",
]


# --------------------------------------------------------------------------------------------------
# Validation helpers (given to students)
# --------------------------------------------------------------------------------------------------

def check_logits(name: str, value) -> None:
    """``value`` must be a floating tensor with at least one dimension (the last is the vocabulary)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.ndim < 1 or value.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., vocab) with vocab >= 1, got {tuple(value.shape)}")


def check_same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 → float32 for the softmax and the sums (their 8-10 bit mantissas lose the small
    probabilities); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p · (log p - log q)`` with ``0 · log 0 = 0``: a vocabulary entry that ``p`` gives
    probability 0 (a logit of ``-inf``, e.g. a masked token) contributes 0, as in
    ``F.kl_div(log_q, p, reduction="none")`` with probability targets — not ``0 · (-inf) = NaN``.
    (Where ``q`` is 0 too, the term is 0 here but NaN in ``F.kl_div``.)"""
    return torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_q), torch.zeros_like(log_q))


def check_temperature(temperature) -> float:
    """A temperature must be a positive finite number; returns it as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


# --------------------------------------------------------------------------------------------------
# Logit distillation
# --------------------------------------------------------------------------------------------------

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: ``T² · KL(p_teacher^T ‖ p_student^T)``, averaged over positions.

    Args:
        student_logits: ``(..., vocab)`` floating tensor (e.g. ``(batch, seq, vocab)``).
        teacher_logits: same shape. Treated as a constant target (no gradient flows into it).
        temperature: ``T > 0``; both logits are divided by ``T`` before the softmax.

    Returns:
        0-D tensor: ``T**2 * mean over positions of sum_v p_t[v] * (log p_t[v] - log p_s[v])`` with
        ``p = softmax(logits / T)`` over the last dimension. ``KL(teacher ‖ student)`` is the forward KL
        (the cross-entropy to the teacher's distribution minus its constant entropy); ``T²`` keeps the
        gradient's scale independent of ``T``. Both log-probabilities come from ``log_softmax``, so the
        loss stays finite for logits of any size. A teacher logit of ``-inf`` (a masked token) has
        ``p_t = 0`` and contributes 0 (``0 · log 0 = 0``, as in ``F.kl_div``; see :func:`kl_terms`).

    Precision: computed in float32 or wider — fp16/bf16 logits are upcast first (their 8–11 bit
    mantissas lose the small probabilities); float32 or float64 arithmetic are both fine, and the result
    may be float32 or float64. Graded against a float64 reference to a relative tolerance of 1e-4.

    Raises:
        TypeError: if the logits are not floating tensors or the temperature is not a number.
        ValueError: if the shapes differ or the temperature is not positive.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    T = check_temperature(temperature)
    ### BEGIN SOLUTION
    log_p_student = F.log_softmax(at_least_fp32(student_logits) / T, dim=-1)
    log_p_teacher = F.log_softmax(at_least_fp32(teacher_logits.detach()) / T, dim=-1)
    kl = kl_terms(log_p_teacher, log_p_student).sum(-1)    # per position
    return T * T * kl.mean()
    ### END SOLUTION


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float, ignore_index: int = -100) -> torch.Tensor:
    """Soft and hard targets mixed: ``alpha · KD + (1 - alpha) · CE``.

    Args:
        student_logits, teacher_logits: ``(..., vocab)``, same shape.
        labels: ``(...)`` int64 class (token) ids, the logits' shape without the last dim; positions equal
            to ``ignore_index`` (padding, prompt tokens) count in neither term.
        temperature: ``T > 0`` for the KD term (the CE term always uses ``T = 1``).
        alpha: weight of the KD term in ``[0, 1]``.
        ignore_index: label value of positions to skip.

    Returns:
        0-D tensor ``alpha * kd + (1 - alpha) * ce`` where ``kd`` is :func:`kd_loss`'s
        ``T² · KL(teacher ‖ student)`` averaged over the kept positions and ``ce`` is the mean
        cross-entropy of the student (at ``T = 1``) over the kept positions. If no position is kept, a
        0-D tensor equal to 0 (not NaN, the mean of nothing). Precision as :func:`kd_loss` (float32 or
        wider; you may call your ``kd_loss``).

    Raises:
        ValueError: if ``alpha`` is outside [0, 1] or the labels' shape does not match.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    T = check_temperature(temperature)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    ### BEGIN SOLUTION
    vocab = student_logits.shape[-1]
    keep = labels.reshape(-1) != ignore_index
    student = at_least_fp32(student_logits.reshape(-1, vocab)[keep])
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0  # keeps the graph, no NaN from an empty mean
    teacher = teacher_logits.reshape(-1, vocab)[keep]
    kd = kd_loss(student, teacher, T)
    ce = F.cross_entropy(student, labels.reshape(-1)[keep])
    return alpha * kd + (1 - alpha) * ce
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# Feature (hidden-state) distillation
# --------------------------------------------------------------------------------------------------

class FeatureProjector(nn.Module):
    """Learned map from the student's width to the teacher's: ``Linear(d_student, d_teacher)``.

    Needed because a narrower student's hidden states cannot be compared with the teacher's directly;
    the projection is trained with the student and thrown away afterwards (it costs nothing at
    inference).
    """

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.proj = nn.Linear(d_student, d_teacher, bias=False)
        nn.init.normal_(self.proj.weight, std=d_student ** -0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def feature_distillation_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                              projection: nn.Module, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between projected student hidden states and the teacher's.

    Args:
        student_hidden: ``(batch, seq, d_student)`` floating tensor.
        teacher_hidden: ``(batch, seq, d_teacher)``, a constant target (no gradient flows into it).
        projection: a module mapping ``(..., d_student)`` to ``(..., d_teacher)`` (a
            :class:`FeatureProjector`, trained along with the student).
        mask: optional ``(batch, seq)`` bool, ``True`` for real tokens; padding does not count.

    Returns:
        0-D tensor: the mean over kept tokens and over the ``d_teacher`` features of
        ``(projection(student_hidden) - teacher_hidden) ** 2``; a 0-D tensor equal to 0 if no token is
        kept. Computed in float32 or wider: float64 inputs may be computed in float32 or float64 (graded
        against a float64 reference to a relative tolerance of 1e-4); fp16/bf16 inputs are upcast.

    Raises:
        ValueError: if batch/seq dims differ, the mask's shape is not ``(batch, seq)``, or
            ``projection(student_hidden)`` does not have ``teacher_hidden``'s shape (a width-1 output
            would otherwise broadcast silently).
    """
    for name, h in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.ndim != 3:
            raise ValueError(f"{name} must be a floating (batch, seq, dim) tensor, got "
                             f"{getattr(h, 'dtype', type(h).__name__)} {tuple(getattr(h, 'shape', ()))}")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(f"student_hidden and teacher_hidden must agree on (batch, seq), got "
                         f"{tuple(student_hidden.shape[:2])} and {tuple(teacher_hidden.shape[:2])}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != student_hidden.shape[:2]):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(student_hidden.shape[:2])}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    ### BEGIN SOLUTION
    projected = projection(student_hidden)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(f"projection(student_hidden) has shape {tuple(projected.shape)}, "
                         f"teacher_hidden {tuple(teacher_hidden.shape)}")
    err = (at_least_fp32(projected) - at_least_fp32(teacher_hidden.detach())) ** 2   # (batch, seq, d_teacher)
    if mask is None:
        return err.mean()
    if not mask.any():
        return projected.sum() * 0.0
    return err[mask].mean()
    ### END SOLUTION


# --------------------------------------------------------------------------------------------------
# Sequence-level distillation (Kim & Rush, 2016): train the student on the teacher's own samples
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_sequences(model, prompt: torch.Tensor, n_new: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None, context: int | None = None) -> torch.Tensor:
    """Sample ``n_new`` tokens after ``prompt`` from an autoregressive LM.

    Args:
        model: called as ``model(idx) -> logits`` with ``idx`` ``(batch, seq)`` int64 and logits
            ``(batch, seq, vocab)``.
        prompt: ``(batch, seq0)`` int64 token ids, ``seq0 >= 1``.
        n_new: number of tokens to append.
        temperature: sampling temperature (``> 0``).
        generator: for reproducible samples.
        context: if given, only the last ``context`` tokens are fed to the model (its maximum length).

    Returns:
        ``(batch, seq0 + n_new)`` int64: the prompt followed by the samples. Training the student on
        these with plain cross-entropy is sequence-level KD — it needs only the teacher's samples, not
        its logits, so the teacher can be run once, offline, even through an API.
    """
    if not isinstance(prompt, torch.Tensor) or prompt.dtype != torch.int64 or prompt.ndim != 2 \
            or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be an int64 (batch, seq>=1) tensor, got "
                         f"{getattr(prompt, 'dtype', type(prompt).__name__)} {tuple(getattr(prompt, 'shape', ()))}")
    T = check_temperature(temperature)
    idx = prompt
    for _ in range(n_new):
        logits = model(idx if context is None else idx[:, -context:])[:, -1, :].float() / T
        probs = torch.softmax(logits, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx

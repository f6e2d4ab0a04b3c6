"""ex05_distill — chapter 5, knowledge distillation."""
from autograder.specs import Assignment, Markdown, Task

# torch's KL divergence: flagged for review when used
KL_LIBRARIES = (
    'torch.nn.functional.kl_div',
    'torch.nn.KLDivLoss',
    'torch.kl_div',
    'torch.nn.modules.loss.KLDivLoss',
)

ASSIGNMENT = Assignment(
    name="ex05_distill",
    module="llmspace.distill",
    title="Exercise 5 — Knowledge distillation",
    cells=[
        Markdown("""\
# Exercise 5 — Knowledge distillation

Companion to chapter 5 of the llmspace book. You will write the three losses a distillation run is
built from: Hinton's temperature-softened KD loss, its mix with the ordinary hard-label cross-entropy,
and feature (hidden-state) distillation through a learned projection.

**How this works.** Each task is a function whose signature and docstring are the specification. Replace
`raise NotImplementedError()` with your code. The cell after each function runs its checks: the visible
cases print their inputs when they fail; the grader also runs hidden cases (identical logits, extreme
logits, ignored positions, masks, bad input). Check your work before submitting with

    python -m autograder check ex05_distill.ipynb

The validation helpers (`check_logits`, `check_same_shape`, `check_temperature`) are given and already
called at the top of each function. Every loss returns a 0-D tensor that backpropagates into the
student — and never into the teacher, which is a fixed target.
"""),
        Markdown("""\
## Task 1: the KD loss

Soften both distributions with the temperature, `p = softmax(logits / T)`, and compute the forward KL
`KL(p_teacher ‖ p_student) = Σ_v p_t (log p_t − log p_s)` per position; average over positions and
multiply by `T²`. Three classic mistakes are checked: forgetting `T²` (the gradient then shrinks like
`1/T²`), swapping the direction of the KL, and `torch.log(torch.softmax(...))` — it is `-inf` as soon as
a probability underflows; `F.log_softmax` is exact.
"""),
        Task("kd_loss", points=3, forbids=KL_LIBRARIES),
        Markdown("""\
## Task 2: soft and hard targets together

`alpha · KD + (1 − alpha) · CE`, both averaged over the positions whose label is not `ignore_index`
(padding and prompt tokens count in neither term). The cross-entropy is the ordinary one, at `T = 1`.
You may call your `kd_loss`.
"""),
        Task("distillation_loss", points=2, forbids=KL_LIBRARIES),
        Markdown("""\
## Task 3: feature distillation

A narrower student's hidden states (`d_student` wide) are mapped to the teacher's width by a learned
`projection` and compared with mean squared error — the mean over the kept tokens *and* the features.
With a padding `mask`, only the `True` tokens count.
"""),
        Task("feature_distillation_loss", points=2),
    ],
)

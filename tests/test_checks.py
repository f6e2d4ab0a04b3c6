"""The graded checks themselves: they pass on the reference library and fail on wrong answers.

Every check of every assignment runs on the reference implementation (visible and hidden cases); every
wrong-answer fixture (the source article's code, verbatim, and plausible bugs) must fail its check, and
the article's answers must fail with a message that names the problem.
"""
import importlib
import inspect

import pytest

from autograder.checks import CheckFailed
from autograder.fixtures import article
from autograder.specs import all_assignments

TASKS = [(a, t) for a in all_assignments().values() for t in a.tasks]
WRONG = []
for assignment in all_assignments().values():
    try:
        module = importlib.import_module(f"autograder.fixtures.{assignment.topic}_wrong")
    except ModuleNotFoundError:
        continue
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if "__" in name and fn.__module__ == module.__name__:
            WRONG.append((assignment, name.split("__")[0], name, fn))


ALT = []
for assignment in all_assignments().values():
    try:
        module = importlib.import_module(f"autograder.fixtures.{assignment.topic}_alt")
    except ModuleNotFoundError:
        continue
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if "__" in name and fn.__module__ == module.__name__:
            ALT.append((assignment, name.split("__")[0], name, fn))


def check_for(assignment, function):
    return getattr(importlib.import_module(f"autograder.checks.{assignment.topic}"), f"check_{function}")


@pytest.mark.parametrize("assignment, task", TASKS, ids=[a.grade_id(t.function) for a, t in TASKS])
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_reference_passes(assignment, task, hidden):
    reference = getattr(importlib.import_module(task.module or assignment.module), task.function)
    check_for(assignment, task.function)(reference, hidden=hidden)


@pytest.mark.parametrize("assignment, task", TASKS, ids=[a.grade_id(t.function) for a, t in TASKS])
def test_unsolved_stub_fails(assignment, task):
    def stub(*args, **kwargs):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check_for(assignment, task.function)(stub)


@pytest.mark.parametrize("assignment, function, name, fn", WRONG, ids=[w[2] for w in WRONG])
def test_wrong_answer_fails(assignment, function, name, fn):
    """A plausible bug must fail the graded check (visible + hidden, as the grader runs them)."""
    check = check_for(assignment, function)
    with pytest.raises(CheckFailed):
        check(fn)
        check(fn, hidden=True)


@pytest.mark.parametrize("assignment, function, name, fn", ALT, ids=[a[2] for a in ALT])
def test_alternative_answer_passes(assignment, function, name, fn):
    """A valid answer written differently from the reference gets full marks (in-process; through the
    sandbox: tests/test_zoos.py)."""
    check = check_for(assignment, function)
    check(fn)
    check(fn, hidden=True)


def test_every_task_has_wrong_answer_fixtures():
    covered = {(w[0].name, w[1]) for w in WRONG}
    missing = [a.grade_id(t.function) for a, t in TASKS if (a.name, t.function) not in covered]
    assert not missing, f"tasks without a wrong-answer fixture: {missing}"


@pytest.mark.parametrize("function, names_the_problem", [
    ("sparse_matrix_add", r"not enough values to unpack[\s\S]*\(key, value\) pairs"),
    ("matrix_vector_multiply", r"must return a list, got dict"),
])
def test_article_answers_fail_with_a_helpful_message(function, names_the_problem):
    check = check_for(all_assignments()["ex01_sparse"], function)
    with pytest.raises(CheckFailed, match=names_the_problem):
        check(getattr(article, function))


def test_hidden_messages_do_not_show_inputs():
    """Hidden-case failures name the case but not its inputs (nbgrader shows them in feedback)."""
    from autograder.fixtures.sparse_wrong import csr_matvec__float64_always
    from autograder.checks.sparse import check_csr_matvec
    with pytest.raises(CheckFailed) as info:
        check_csr_matvec(csr_matvec__float64_always, hidden=True)
    message = str(info.value)
    assert "hidden case" in message and "array(" not in message and "CSR(" not in message


def test_check_failed_renders_without_traceback():
    """IPython prints CheckFailed through _render_traceback_: the message only, no check source."""
    lines = CheckFailed("f, case 'x': wrong values\nHint: do y")._render_traceback_()
    assert lines == ["CheckFailed: f, case 'x': wrong values", "Hint: do y"]


# ---- the Checker's rules (issue 10) -----------------------------------------------------------------

def test_undeclared_mutation_fails_and_reference_uses_the_originals():
    import numpy as np
    from autograder.checks import Checker

    def doubles_in_place(x):
        x *= 2
        return x.sum()
    x = np.arange(3.0)
    c = Checker("f", doubles_in_place, hidden=False, params=("x",))
    with pytest.raises(CheckFailed, match="modified its input argument `x`") as info:
        c.call("case", x)
    assert np.array_equal(x, [0.0, 1.0, 2.0])                      # the check's own copy is untouched
    assert "np.array([0., 1., 2.])" in str(info.value)              # shown as it was before the call
    c.call("case", x, mutates=(0,))                                 # declared: allowed
    assert np.array_equal(c.last_args[0], [0.0, 2.0, 4.0]) and np.array_equal(x, [0.0, 1.0, 2.0])


def test_returning_an_argument_fails_where_a_new_object_is_required():
    from autograder.checks import Checker
    c = Checker("f", lambda A, B: A, hidden=True, params=("A", "B"))
    with pytest.raises(CheckFailed, match="returned its input argument `A` itself"):
        c.call("case", {(0, 0): 1}, {}, new=True)


def test_show_is_plain_and_complete_for_short_values():
    import numpy as np
    import torch
    from autograder.checks import show
    from llmspace.sparse import CSR
    assert show(np.int32(2)) == "2" and show(np.float64(0.5)) == "0.5"
    assert show({(0, 1): np.int64(3)}) == "{(0, 1): 3}"
    assert show(np.arange(3, dtype=np.int32)) == "np.array([0, 1, 2], dtype=np.int32)"
    assert show(torch.tensor([0.5, 1.5])) == "torch.tensor([0.5, 1.5], dtype=torch.float32)"
    csr = show(CSR.from_dense(np.eye(2)))
    assert csr.startswith("CSR(indptr=np.array([0, 1, 2]") and "data=np.array([1., 1.])" in csr
    assert show(np.zeros((100, 3))) == "<array of shape (100, 3), dtype float64>"
    assert "nnz=500" in show(CSR.from_dense(np.eye(500)))


@pytest.mark.parametrize("got, expected, says", [
    (8, 2, "too large by 4×"), (2, 8, "too small by 4×"), (11, 10, "too large by 1"), (-3.0, 3.0, "wrong sign"),
    ([2.0, 4.0, 0.0], [1.0, 2.0, 0.0], "too large by 2×"), ([3, 4], [2, 3], "every value is too large by 1"),
    ([1.0, 2.0], [1.5, 2.0], "too small"), ([1.0, 2.0], [1.0, 2.0], ""),
])
def test_direction_of_numeric_errors(got, expected, says):
    from autograder.checks import direction
    text = direction(got, expected)
    assert (says in text) if says else text == ""


def test_hidden_cases_never_echo_returned_values():
    from autograder.checks import Checker
    c = Checker("f", lambda x: 12345, hidden=True, params=("x",))
    with pytest.raises(CheckFailed) as info:
        c.expect_raises("bad input", ValueError, 678, what="x must be positive")
    assert "12345" not in str(info.value) and "678" not in str(info.value)
    with pytest.raises(CheckFailed) as info:
        c.expect_number("case", c.call("case", 678), 3, (678,))
    assert "12345" not in str(info.value) and "678" not in str(info.value) and "too large" in str(info.value)


def test_failure_names_a_failed_dependency():
    """A task that builds on an earlier one says so when the earlier one failed for the same student."""
    from autograder.checks import Checker
    namespace = {}
    exec("def first(x):\n    return x + 1\ndef second(x):\n    return first(x) * 2\n", namespace)
    with pytest.raises(CheckFailed):
        Checker("first", namespace["first"], hidden=False).fail("c", "wrong")
    with pytest.raises(CheckFailed, match="builds on `first`, which failed its own check"):
        Checker("second", namespace["second"], hidden=False, builds_on=("first",)).fail("c", "wrong")
    Checker("first", namespace["first"], hidden=False)  # a new, passing run of `first`...
    with pytest.raises(CheckFailed) as info:
        Checker("second", namespace["second"], hidden=False, builds_on=("first",)).fail("c", "wrong")
    assert "builds on" not in str(info.value)          # ...and the note goes away

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


def check_for(assignment, function):
    return getattr(importlib.import_module(f"autograder.checks.{assignment.topic}"), f"check_{function}")


@pytest.mark.parametrize("assignment, task", TASKS, ids=[a.grade_id(t.function) for a, t in TASKS])
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_reference_passes(assignment, task, hidden):
    reference = getattr(importlib.import_module(assignment.module), task.function)
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

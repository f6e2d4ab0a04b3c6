"""`python -m autograder check` and nbgrader's Validate button agree on what they can both see.

Validate executes the learner's notebook as it is, test cells included, and fails a graded cell on any
error or stderr output; `check` runs the learner's cells (the locked setup cell as released) in a worker
and calls each task's *visible* check on the learner's function from outside. Both see the visible cases
only (the release's test cells hold nothing else), so on a notebook mixing reference answers, wrong
answers and untouched stubs, the set of failing questions must be the same.
"""
import importlib
import inspect
from pathlib import Path

import nbformat
import pytest

from autograder import cli
from autograder.specs import all_assignments
from autograder.sync import notebook_path
from notebooks import release_all, solution_cells, with_answers

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = list(all_assignments().values())
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release_all(tmp_path_factory.mktemp("course"), ROOT / "exercises", ASSIGNMENTS)


def _wrong(assignment, function):
    module = importlib.import_module(f"autograder.fixtures.{assignment.topic}_wrong")
    return [fn for name, fn in sorted(inspect.getmembers(module, inspect.isfunction))
            if name.split("__")[0] == function and "__" in name and fn.__module__ == module.__name__]


def mixed_notebook(assignment, release) -> nbformat.NotebookNode:
    """Task k: the reference answer (k % 3 == 0), a wrong answer (1), or the untouched stub (2)."""
    reference = solution_cells(nbformat.read(notebook_path(assignment), as_version=4))
    answers = {}
    for k, task in enumerate(assignment.tasks):
        if k % 3 == 0:
            answers[task.function] = reference[assignment.grade_id(task.function)].source
        elif k % 3 == 1:
            wrong = _wrong(assignment, task.function)
            answers[task.function] = wrong[k % len(wrong)]
    return with_answers(release, assignment.prefix, answers)


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: a.name)
def test_check_and_validate_fail_the_same_questions(assignment, released, tmp_path):
    from nbgrader.validator import Validator
    release = nbformat.read(released / assignment.name / f"{assignment.name}.ipynb", as_version=4)
    nb = mixed_notebook(assignment, release)
    path = tmp_path / f"{assignment.name}.ipynb"
    nbformat.write(nb, path)

    results = Validator().validate(str(path))
    assert not results.get("changed") and not results.get("type_changed")
    by_source = {c.source.strip(): c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                 if c.metadata.get("nbgrader", {}).get("grade")}
    validate_failed = {by_source[f["source"]] for f in results.get("failed", [])}

    report = cli.check_notebook(path, hidden=False)
    check_failed = {gid for gid, d in report["details"].items() if d["status"] != "passed"}
    assert report["checks"] == "visible"
    assert check_failed == validate_failed
    gids = [assignment.grade_id(t.function) for t in assignment.tasks]
    assert not check_failed & set(gids[0::3])      # the reference answers pass both
    assert set(gids[2::3]) <= check_failed          # the stubs fail both (wrong answers may pass visible cases)

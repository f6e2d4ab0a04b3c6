"""Every assignment, generically: the instructor notebook (reference answers) scores full marks with the
hidden checks included, and the untouched student release scores 0 (issue 2, CI invariants 3-5).

Uses the learner-side runner (`autograder.cli.check_notebook`), which executes a notebook with the
instructor's test cells; tests/test_grading.py shows it agrees with nbgrader's autograde.
"""
import shutil
from pathlib import Path

import nbformat
import pytest

from autograder import cli
from autograder.specs import all_assignments
from autograder.sync import notebook_path

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = list(all_assignments().values())
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "exercises" / "source", course / "source")
    for a in ASSIGNMENTS:
        done = cli._nbgrader(course, "generate_assignment", a.name, "--force")
        assert done.returncode == 0, done.stderr
    return course / "release"


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: a.name)
def test_reference_notebook_scores_full_marks(assignment, tmp_path):
    path = tmp_path / f"{assignment.name}.ipynb"
    shutil.copy(notebook_path(assignment), path)
    report = cli.check_notebook(path, hidden=True)
    failed = {k: v["message"] for k, v in report["details"].items() if v["status"] != "passed"}
    assert not failed
    assert sum(v["score"] for v in report["details"].values()) == assignment.max_score


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: a.name)
def test_untouched_release_scores_zero(assignment, released, tmp_path):
    release = released / assignment.name / f"{assignment.name}.ipynb"
    nb = nbformat.read(release, as_version=4)
    solutions = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert solutions and all("raise NotImplementedError()" in c.source for c in solutions)
    path = tmp_path / release.name
    shutil.copy(release, path)
    report = cli.check_notebook(path, hidden=True)
    assert sum(v["score"] for v in report["details"].values()) == 0
    assert all("not implemented yet" in v["message"] for v in report["details"].values())

"""End to end: release (nbgrader) → submissions → `python -m autograder grade` and `check` (learner side).

Invariants of the course (issue 2): released solution cells raise NotImplementedError and carry no hidden
tests; the reference answers score full marks with hidden tests included; the untouched release scores 0;
the article's buggy answers lose exactly their questions' points; feedback never shows hidden test code;
scores land in nbgrader's gradebook; the learner's `check` agrees with the instructor's grade.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from autograder import cli
from autograder.fixtures import article, sparse_wrong
from notebooks import solution_cells, with_answers

ROOT = Path(__file__).resolve().parents[1]
NAME = "ex01_sparse"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A private copy of the nbgrader course (its own gradebook), released."""
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "exercises" / "source", course / "source")
    done = cli._nbgrader(course, "generate_assignment", NAME, "--force")
    assert done.returncode == 0, done.stderr
    return course


@pytest.fixture(scope="module")
def notebooks(course):
    source = nbformat.read(course / "source" / NAME / f"{NAME}.ipynb", as_version=4)
    release = nbformat.read(course / "release" / NAME / f"{NAME}.ipynb", as_version=4)
    reference = {k.removeprefix("ex01_"): c.source for k, c in solution_cells(source).items()}
    article_nb = with_answers(release, "ex01", {**reference, "sparse_matrix_add": article.sparse_matrix_add,
                                                "matrix_vector_multiply": article.matrix_vector_multiply})
    bug_nb = with_answers(source, "ex01", {"csr_matvec": sparse_wrong.csr_matvec__reduceat_empty_rows})
    return {"perfect": source, "blank": release, "article": article_nb, "bug": bug_nb}


@pytest.fixture(scope="module")
def graded(course, notebooks, tmp_path_factory):
    submitted = tmp_path_factory.mktemp("incoming")
    for student, nb in notebooks.items():
        folder = submitted / student / NAME
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{NAME}.ipynb")
    (submitted / "misnamed" / NAME).mkdir(parents=True)
    nbformat.write(notebooks["perfect"], submitted / "misnamed" / NAME / f"{NAME} (1).ipynb")
    (submitted / "corrupt" / NAME).mkdir(parents=True)
    (submitted / "corrupt" / NAME / f"{NAME}.ipynb").write_text('{"cells": [')
    out = tmp_path_factory.mktemp("out")
    results = cli.grade(NAME, submitted, out / "grades.csv", out / "grades.json", course=course, workers=2)
    return results, out


def test_release_has_stubs_and_no_hidden_tests(course):
    release = nbformat.read(course / "release" / NAME / f"{NAME}.ipynb", as_version=4)
    cells = solution_cells(release)
    assert len(cells) == 6
    for cell in cells.values():
        assert "raise NotImplementedError()" in cell.source and "BEGIN SOLUTION" not in cell.source
        assert '"""' in cell.source  # the docstring (the task statement) stays
    text = nbformat.writes(release)
    assert "hidden=True" not in text and "HIDDEN TESTS" not in text


def test_scores(graded):
    results, _ = graded
    assert results["perfect"]["status"] == "graded"
    assert results["perfect"]["score"] == results["perfect"]["max_score"] == 13
    assert results["blank"]["score"] == 0
    article_items = results["article"]["items"]
    assert article_items["ex01_sparse_matrix_add"] == 0 and article_items["ex01_matrix_vector_multiply"] == 0
    assert results["article"]["score"] == 11
    assert results["bug"]["items"]["ex01_csr_matvec"] == 0 and results["bug"]["score"] == 10
    assert results["misnamed"]["status"] == "missing" and f"{NAME} (1).ipynb" in results["misnamed"]["reason"]
    assert results["corrupt"]["status"] == "invalid" and results["corrupt"]["score"] == 0


def test_csv_and_json_outputs(graded):
    results, out = graded
    data = json.loads((out / "grades.json").read_text())
    assert data["perfect"]["items"]["ex01_csr_matvec"] == 3.0
    assert set(data) == set(results)
    rows = (out / "grades.csv").read_text().splitlines()
    assert rows[0].startswith("student,status,score,max_score,ex01_sparse_matrix_add")
    assert any(r.startswith("article,graded,11.0,13.0") for r in rows)


def test_feedback_reveals_no_hidden_tests(graded, course):
    for student in ("article", "bug"):
        for ext in ("html", "md"):
            text = (course / "feedback" / student / NAME / f"{NAME}.{ext}").read_text()
            assert ("not enough values to unpack" in text) == (student == "article")  # what went wrong...
            for secret in ("hidden=True", "BEGIN HIDDEN TESTS", "autograder/checks", "most recent call last"):
                assert secret not in text  # ...but not hidden test code or the checks' source
    bug = (course / "feedback" / "bug" / NAME / f"{NAME}.md").read_text()
    assert "hidden case 'empty first and last rows'" in bug or "case '3x4 example'" in bug


def test_scores_are_in_the_gradebook(graded, course):
    from nbgrader.api import Gradebook
    with Gradebook(cli.gradebook_url(course)) as gb:
        assert gb.find_submission(NAME, "perfect").score == 13
        assert gb.find_submission(NAME, "article").score == 11
        assert gb.find_grade("ex01_sparse_matrix_add", NAME, NAME, "article").score == 0


def test_learner_check_agrees_with_grader(graded, notebooks, tmp_path):
    results, _ = graded
    for student in ("perfect", "blank", "article", "bug"):
        path = tmp_path / student / f"{NAME}.ipynb"
        path.parent.mkdir()
        nbformat.write(notebooks[student], path)
        report = cli.check_notebook(path, hidden=True)
        assert {k: float(v["score"]) for k, v in report["details"].items()} == results[student]["items"], student


def test_check_cli_json_and_messages(notebooks, tmp_path):
    path = tmp_path / f"{NAME}.ipynb"
    nbformat.write(notebooks["article"], path)
    out = subprocess.run([sys.executable, "-m", "autograder", "check", str(path), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["checks"] == "visible" and report["status"] == "graded"
    assert report["score"] == sum(report["items"].values()) and report["max_score"] == 13
    items = report["details"]
    assert items["ex01_matrix_vector_multiply"]["status"] == "failed"
    assert "must return a list, got dict" in items["ex01_matrix_vector_multiply"]["message"]
    assert items["ex01_csr_matvec"] == {"score": 3, "max_score": 3, "status": "passed", "message": ""}

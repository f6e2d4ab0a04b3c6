"""One source of truth: the committed exercise notebooks and interview index are what the sources give."""
import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from autograder import sync
from autograder.specs import all_assignments

ROOT = Path(__file__).resolve().parents[1]


def test_sync_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "autograder.sync", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_interview_index_is_fresh():
    result = subprocess.run([sys.executable, "book/_ext/interview_index.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("assignment", all_assignments().values(), ids=lambda a: a.name)
def test_solution_cells_are_the_library_functions_verbatim(assignment):
    nb = nbformat.read(sync.notebook_path(assignment), as_version=4)
    solutions = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert len(solutions) == len(assignment.tasks)
    for cell, task in zip(solutions, assignment.tasks):
        module = __import__(task.module or assignment.module, fromlist=["_"])
        source, _ = sync.function_source(module, task.function)
        assert cell.source == source
        assert cell.source.rstrip().endswith(sync.END)  # trailing marker comment was kept
        ast.parse(cell.source)


@pytest.mark.parametrize("assignment", all_assignments().values(), ids=lambda a: a.name)
def test_graded_cells_are_locked_with_points(assignment):
    nb = nbformat.read(sync.notebook_path(assignment), as_version=4)
    graded = [c.metadata["nbgrader"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert [g["grade_id"] for g in graded] == [assignment.grade_id(t.function) for t in assignment.tasks]
    assert all(g["locked"] for g in graded)
    assert sum(g["points"] for g in graded) == assignment.max_score
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells]
    assert len(ids) == len(set(ids)), "grade_ids must be unique"


def test_check_reports_drift(tmp_path, monkeypatch):
    """--check must fail (exit 1, with a diff) when a notebook differs from what the sources give."""
    assignment = next(iter(all_assignments().values()))
    fake_source = tmp_path / "source"
    monkeypatch.setattr(sync, "SOURCE", fake_source)
    path = sync.notebook_path(assignment)
    path.parent.mkdir(parents=True)
    path.write_text(sync.render(assignment).replace("### END SOLUTION", "### END SOLUTION\n    pass", 1))
    assert sync.main(["--check"]) == 1
    assert sync.main([]) == 0
    assert sync.main(["--check"]) == 0


def test_function_without_markers_is_rejected():
    import types
    module = types.ModuleType("m")
    with pytest.raises((ValueError, TypeError)):
        sync.function_source(module, "nothing")
    with pytest.raises(ValueError, match="markers"):
        sync.function_source(sync, "render")

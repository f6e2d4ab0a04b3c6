"""benchmarks/mutation_score.py: mutants are generated inside the solution region only, and a check
that catches them scores them as killed (the full run over every task is a benchmark, not a test)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mutation_score  # noqa: E402

from autograder.specs import all_assignments  # noqa: E402


def test_mutants_stay_inside_the_solution_region():
    import ast
    import inspect
    import llmspace.sparse as module
    source = Path(inspect.getsourcefile(module)).read_text()
    function = next(n for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.FunctionDef) and n.name == "matrix_vector_multiply")
    begin, end = mutation_score.solution_lines(source, function)
    sites = mutation_score.mutation_sites(function, (begin, end))
    lines = {int(mutant_id.split(":")[0][1:]) for mutant_id, _ in sites}
    assert lines and all(begin < line < end for line in lines)
    kinds = " ".join(mutant_id for mutant_id, _ in sites)
    assert "NotEq->Eq" in kinds and "delete Raise" in kinds and "delete Expr" in kinds


@pytest.mark.parametrize("task", ["sparse_matrix_add", "matrix_vector_multiply"])
def test_warm_up_checks_kill_every_mutant(task):
    result = mutation_score.score_task(all_assignments()["ex01_sparse"], task, timeout=60, log=lambda *a: None)
    assert result["killed"] >= 6 and result["survived"] == 0 and result["score"] == 1.0


def test_a_check_that_misses_a_bug_lets_its_mutant_survive(monkeypatch):
    """With a check that ignores the length rule, deleting the ValueError survives: the score can fail."""
    import autograder.checks.sparse as checks
    original = checks.check_matrix_vector_multiply

    def lenient(impl, *, hidden=False):
        if not hidden:
            original(impl)
    monkeypatch.setattr(checks, "check_matrix_vector_multiply", lenient)
    result = mutation_score.score_task(all_assignments()["ex01_sparse"], "matrix_vector_multiply", timeout=60,
                                       log=lambda *a: None)
    assert any("delete Raise" in s["mutant"] for s in result["survivors"]) and result["score"] < 1


def test_a_task_living_in_another_module_is_scored():
    """A task with ``Task(module=...)`` (ex02's paged_kv_gather lives in llmspace.kv_cache, not
    llmspace.memory) is mutated in its own module; it used to be skipped with a StopIteration."""
    result = mutation_score.score_task(all_assignments()["ex02_memory"], "paged_kv_gather", timeout=60,
                                       log=lambda *a: None)
    assert result["killed"] >= 15 and result["survived"] == 0 and result["timeout"] == 0

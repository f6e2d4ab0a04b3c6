"""Both zoos through the real grading boundary (issue 10): every wrong answer loses points with a message
that names the problem, every alternative correct answer gets full marks.

Zoos live in ``autograder/fixtures/<topic>_wrong.py`` (``<function>__<bug>``, docstring = the bug) and
``autograder/fixtures/<topic>_alt.py`` (``<function>__<variant>``, docstring = why it is valid). A topic
takes part here once it has an ``_alt`` module; from then on each of its graded tasks needs at least
:data:`MIN_WRONG` wrong and :data:`MIN_ALT` alternative answers.

How an entry is graded, as :func:`autograder.grading.grade_notebook` grades a student: one sandbox worker
per topic (:class:`autograder.sandbox.Sandbox`, degraded when not root) runs each zoo module's source (in
a namespace of its own) and then the reference notebook's code cells; the task functions an entry calls
(e.g. a student's own ``coo_to_csr`` inside ``sparse_add``) are the notebook's; the check then runs in
this process with a
:class:`autograder.grading.RemoteFunction` standing for the entry: arguments are pickled to the worker,
results and exceptions come back through :mod:`autograder.codec`.

A wrong entry's docstring may end with a line ``Message: <regex>``: the failure message must match it
(the message names the problem). Without one, the failure must still be a graded case failure (it names
a case), never a grader error or "not implemented". Keyword arguments cross the boundary too (e.g.
``accumulate_gradients(..., ignore_index=-100)``), so every entry is graded exactly as a student would be.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import nbformat
import pytest

import autograder.checks
from autograder.checks import CheckFailed
from autograder.specs import all_assignments
from autograder.sync import notebook_path

ROOT = Path(__file__).resolve().parents[1]
MIN_WRONG, MIN_ALT = 6, 2
pytestmark = pytest.mark.slow


def _zoo(topic: str, kind: str):
    try:
        module = importlib.import_module(f"autograder.fixtures.{topic}_{kind}")
    except ModuleNotFoundError:
        return None, []
    entries = [(name, fn) for name, fn in inspect.getmembers(module, inspect.isfunction)
               if "__" in name and fn.__module__ == module.__name__]
    return module, entries


ASSIGNMENTS = [a for a in all_assignments().values() if _zoo(a.topic, "alt")[0] is not None]
ENTRIES = [(a.name, kind, name) for a in ASSIGNMENTS for kind in ("wrong", "alt")
           for name, _ in _zoo(a.topic, kind)[1]]


def _message_pattern(fn) -> str | None:
    match = re.search(r"^\s*Message:\s*(.+?)\s*$", inspect.getdoc(fn) or "", re.M)
    return match.group(1) if match else None


def _grade_topic(assignment) -> dict:
    """{entry name: (passed, message)} for every zoo entry of ``assignment``, graded remotely."""
    from autograder.grading import RemoteFunction
    from autograder.sandbox import Limits, Sandbox
    checks = importlib.import_module(f"autograder.checks.{assignment.topic}")
    reference = nbformat.read(notebook_path(assignment), as_version=4)
    code = [c.source for c in reference.cells if c.cell_type == "code"
            and not c.metadata.get("nbgrader", {}).get("grade")]          # setup + solution cells
    results = {}
    limits = Limits(notebook_seconds=1800.0, call_seconds=120.0)
    tasks = [t.function for t in assignment.tasks]
    with Sandbox(limits) as box:
        # Each zoo module runs in a namespace of its own (their private helpers may share names) ...
        for kind in ("wrong", "alt"):
            module, entries = _zoo(assignment.topic, kind)
            if module is None:
                continue
            source = Path(module.__file__).read_text()
            reply = box.run_cell(f"_zoo_{kind} = {{'__name__': 'zoo_{kind}'}}\n"
                                 f"exec(compile({source!r}, {module.__name__!r}, 'exec'), _zoo_{kind})")
            assert reply["ok"], f"{module.__name__} does not run in the sandbox: {reply.get('error')}"
        # ... then the reference notebook defines the task functions, as a student's notebook would ...
        for source in code:
            reply = box.run_cell(source)
            assert reply["ok"], f"reference cell failed in the sandbox: {reply.get('error')}"
        # ... which the entries call (a student's sparse_add calls their own coo_to_csr).
        for kind in ("wrong", "alt"):
            if _zoo(assignment.topic, kind)[0] is not None:
                reply = box.run_cell(f"_zoo_{kind}.update({{t: globals()[t] for t in {tasks!r}}})\n"
                                     f"globals().update({{k: v for k, v in _zoo_{kind}.items() if '__' in k "
                                     f"and not k.startswith('_') and callable(v)}})")
                assert reply["ok"], reply.get("error")
        for kind in ("wrong", "alt"):
            for name, _ in _zoo(assignment.topic, kind)[1]:
                check = getattr(checks, f"check_{name.split('__')[0]}")
                proxy = RemoteFunction(box, name)
                autograder.checks._OUTCOMES_BY_SANDBOX.clear()   # each entry is its own "student"
                try:
                    check(proxy)
                    check(proxy, hidden=True)
                except CheckFailed as failure:
                    results[name] = (False, str(failure))
                else:
                    results[name] = (True, "")
    return results


_GRADED: dict = {}


def graded(assignment_name: str) -> dict:
    if assignment_name not in _GRADED:
        _GRADED[assignment_name] = _grade_topic(all_assignments()[assignment_name])
    return _GRADED[assignment_name]


@pytest.mark.parametrize("assignment, kind, name", ENTRIES, ids=[f"{e[0]}-{e[2]}" for e in ENTRIES])
def test_zoo_entry_through_the_grader(assignment, kind, name):
    passed, message = graded(assignment)[name]
    topic = all_assignments()[assignment].topic
    fn = dict(_zoo(topic, kind)[1])[name]
    if kind == "alt":
        assert passed, f"a valid answer lost points: {message}"
        return
    assert not passed, "a wrong answer got full marks"
    assert "not implemented yet" not in message and "grader error" not in message
    assert "case '" in message, f"the failure names no case: {message}"
    pattern = _message_pattern(fn)
    if pattern:
        assert re.search(pattern, message), f"message does not name the problem ({pattern!r}): {message}"


@pytest.mark.parametrize("assignment", [a.name for a in ASSIGNMENTS])
def test_every_task_has_both_zoos(assignment):
    a = all_assignments()[assignment]
    counts = {t.function: [0, 0] for t in a.tasks}
    for i, kind in enumerate(("wrong", "alt")):
        for name, fn in _zoo(a.topic, kind)[1]:
            function = name.split("__")[0]
            assert function in counts, f"{name}: no graded task {function!r} in {assignment}"
            assert (inspect.getdoc(fn) or "").strip(), f"{name} needs a docstring (the bug / why it is valid)"
            counts[function][i] += 1
    short = {f: c for f, c in counts.items() if c[0] < MIN_WRONG or c[1] < MIN_ALT}
    assert not short, f"tasks with fewer than {MIN_WRONG} wrong / {MIN_ALT} alternative answers: {short}"

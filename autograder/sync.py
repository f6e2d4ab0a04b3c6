"""Build the exercise notebooks from the specs and the reference library (one source of truth).

    python -m autograder.sync            # (re)write exercises/source/<name>/<name>.ipynb
    python -m autograder.sync --check    # write nothing; exit 1 with a diff if a notebook is stale

For every :class:`~autograder.specs.Task`, the function's source is copied verbatim from its module file
(decorators, signature, docstring and the body with nbgrader's ``### BEGIN/END SOLUTION`` markers) into a
solution cell, followed by a locked graded cell that calls the check. The setup cell's imports are
derived from the names the task functions use, so the notebook runs exactly the code the library runs.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import difflib
import importlib
import inspect
import sys
import types
from pathlib import Path

import nbformat

from autograder.specs import Assignment, Markdown, Task, all_assignments

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "exercises" / "source"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"


def function_source(module: types.ModuleType, name: str) -> tuple[str, ast.FunctionDef]:
    """The exact text of top-level function ``name`` in ``module``'s file, decorators included."""
    path = Path(inspect.getsourcefile(module))
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            all_lines = text.splitlines()
            end = node.end_lineno
            # The AST ends at the last statement; the body's trailing comments (### END SOLUTION) follow it.
            while end < len(all_lines) and all_lines[end].strip().startswith("#") and \
                    len(all_lines[end]) - len(all_lines[end].lstrip()) > node.col_offset:
                end += 1
            lines = all_lines[first - 1:end]
            source = "\n".join(lines)
            if BEGIN not in source or END not in source:
                raise ValueError(f"{module.__name__}.{name} has no '{BEGIN}' / '{END}' markers in its body")
            return source, node
    raise ValueError(f"{module.__name__} has no top-level function {name!r}")


def _used_globals(node: ast.FunctionDef) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def setup_source(assignment: Assignment) -> str:
    """Import lines for every module-level name the task functions use but do not define."""
    task_names = {t.function for t in assignment.tasks}
    names: dict[str, str] = {}   # global name -> the module of the first task that uses it
    for task in assignment.tasks:
        home_module = task.module or assignment.module
        for name in _used_globals(function_source(importlib.import_module(home_module), task.function)[1]):
            names.setdefault(name, home_module)
    modules, from_imports = set(), {}
    for name in sorted(set(names) - task_names):
        module = importlib.import_module(names[name])
        if hasattr(builtins, name) or not hasattr(module, name):
            continue  # builtins, locals and parameters
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            modules.add(f"import {obj.__name__}" + ("" if obj.__name__ == name else f" as {name}"))
        else:
            home = getattr(obj, "__module__", None) or names[name]
            if not hasattr(obj, "__module__") or isinstance(obj, (int, float, str, tuple, frozenset)):
                home = names[name]   # constants: take them from the reference module
            from_imports.setdefault(home, []).append(name)
    lines = sorted(modules) + [f"from {home} import {', '.join(sorted(ns))}"
                               for home, ns in sorted(from_imports.items())]
    return "\n".join(lines)


def _locked(grade_id: str, **extra) -> dict:
    meta = {"grade": False, "grade_id": grade_id, "locked": True, "schema_version": 3,
            "solution": False, "task": False}
    meta.update(extra)
    return {"nbgrader": meta, "deletable": False, "editable": False}


def test_source(assignment: Assignment, task: Task) -> str:
    check = f"check_{task.function}"
    return "\n".join([
        f"# Checks for {task.function} ({task.points} point{'s' if task.points != 1 else ''}).",
        f"from autograder.checks.{assignment.topic} import {check}",
        f"{check}({task.function})",
        f'print("{task.function}: visible checks passed")',
        "### BEGIN HIDDEN TESTS",
        f"{check}({task.function}, hidden=True)",
        "### END HIDDEN TESTS",
    ])


def install_note() -> str:
    """The first cell's line saying how to get the course package (built by ``make student``)."""
    from autograder.student import install_line, wheel_name
    return (f"**Before you start:** download `{wheel_name()}` from the book next to this notebook and run "
            f"`{install_line()}` once in a cell (then restart the kernel).")


def build_notebook(assignment: Assignment) -> nbformat.NotebookNode:
    module = importlib.import_module(assignment.module)
    checks = importlib.import_module(f"autograder.checks.{assignment.topic}")
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    cells, n_md = [], 0
    for item in assignment.cells:
        if isinstance(item, Markdown):
            n_md += 1
            gid = f"{assignment.prefix}_md{n_md:02d}"
            text = item.text.rstrip("\n")
            if n_md == 1:
                text += "\n\n" + install_note()
            cells.append(nbformat.v4.new_markdown_cell(text, id=gid.replace("_", "-"),
                                                       metadata=_locked(gid)))
            if n_md == 1:  # setup right after the title
                gid = f"{assignment.prefix}_setup"
                cells.append(nbformat.v4.new_code_cell(setup_source(assignment), id=gid.replace("_", "-"),
                                                       metadata=_locked(gid)))
        elif isinstance(item, Task):
            if not hasattr(checks, f"check_{item.function}"):
                raise ValueError(f"autograder.checks.{assignment.topic} has no check_{item.function}")
            gid = assignment.grade_id(item.function)
            source, _ = function_source(importlib.import_module(item.module) if item.module else module,
                                        item.function)
            sol = {"nbgrader": {"grade": False, "grade_id": f"{gid}_solution", "locked": False,
                                "schema_version": 3, "solution": True, "task": False}}
            cells.append(nbformat.v4.new_code_cell(source, id=f"{gid}-solution".replace("_", "-"), metadata=sol))
            cells.append(nbformat.v4.new_code_cell(test_source(assignment, item), id=gid.replace("_", "-"),
                                                   metadata=_locked(gid, grade=True, points=item.points)))
        else:
            raise TypeError(f"unknown cell spec {item!r}")
    nb.cells = cells
    return nb


def notebook_path(assignment: Assignment) -> Path:
    return SOURCE / assignment.name / f"{assignment.name}.ipynb"


def _display(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render(assignment: Assignment) -> str:
    return nbformat.writes(build_notebook(assignment)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 on drift")
    args = parser.parse_args(argv)
    stale = 0
    for assignment in all_assignments().values():
        path, text = notebook_path(assignment), render(assignment)
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        if args.check:
            stale += 1
            rel = _display(path)
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       f"{rel} (committed)", f"{rel} (from solutions/)", n=2))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {_display(path)}")
    if stale:
        print(f"\n{stale} exercise notebook(s) are stale: run `python -m autograder.sync` and commit.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

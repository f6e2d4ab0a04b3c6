"""Build the student package: the wheel a learner installs next to the exercise notebooks.

    python -m autograder.student [--out dist]      # writes dist/<wheel>, prints its path and size

The wheel (distribution ``llmspace-course``; its metadata is ``[tool.llmspace.student]`` in
pyproject.toml) holds what a release notebook imports and what ``python -m autograder check`` runs:

* ``llmspace`` — the library with every ``### BEGIN/END SOLUTION`` region replaced by the stub the release
  notebook shows (nbgrader's ``code_stub``), without the tiny-LM weights (no exercise uses them);
* ``autograder.checks`` — the *visible* cases only: each check module is partially evaluated with
  ``hidden=False`` (:func:`strip_hidden`), so branches, helpers and constants only the hidden cases use are
  not in it, and calling a check with ``hidden=True`` says the hidden cases stay with the instructor;
* ``autograder.specs``, the learner-side runner (``cli``, ``grading``, ``sandbox``, ``worker``, ``codec``)
  and ``locked_cells.json`` (the locked setup cells of each release notebook, which ``check`` runs in place of
  the learner's copy, as the instructor's grader does).

Not in it: ``autograder/fixtures`` (wrong answers, the article's code, adversarial notebooks), the reference
solutions, the hidden cases, the instructor notebooks, and this builder. ``tests/test_student_package.py``
unzips the wheel and proves each of these.

The wheel is written directly (it is a zip with a ``.dist-info`` folder, PEP 427): no build backend runs,
no file outside the list above can slip in, and the same sources give a byte-identical wheel.
"""
from __future__ import annotations

import argparse
import ast
import base64
import copy
import hashlib
import io
import json
import re
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "solutions" / "llmspace"
AUTOGRADER = ROOT / "autograder"
# The stub nbgrader writes into the release notebook (exercises/nbgrader_config.py, ClearSolutions.code_stub).
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
_SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*\n", re.M | re.S)
# autograder modules the learner side needs (cli imports feedback; grading imports sync for its paths)
RUNNER = ("__init__.py", "__main__.py", "cli.py", "codec.py", "feedback.py", "grading.py", "sandbox.py",
          "sync.py", "worker.py")
LOCKED_CELLS = "locked_cells.json"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # fixed timestamps: reproducible wheels


# ---- metadata ---------------------------------------------------------------------------------------------

def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def metadata() -> dict:
    """{name, version, summary, requires_python, dependencies, extras} of the student distribution."""
    project = _pyproject()
    student = project["tool"]["llmspace"]["student"]
    return {"name": student["name"], "version": project["project"]["version"],
            "summary": student["description"], "requires_python": project["project"]["requires-python"],
            "dependencies": list(student["dependencies"]),
            "extras": {k: list(v) for k, v in student.get("optional-dependencies", {}).items()}}


def wheel_name() -> str:
    """File name of the student wheel, e.g. ``llmspace_course-0.1.0-py3-none-any.whl``."""
    meta = metadata()
    return f"{re.sub(r'[-_.]+', '_', meta['name']).lower()}-{meta['version']}-py3-none-any.whl"


def install_line() -> str:
    """The one line a notebook shows: install the wheel downloaded next to it."""
    return f"%pip install {wheel_name()}"


# ---- stripping ----------------------------------------------------------------------------------------------

def strip_solutions(text: str) -> str:
    """Replace every solution region by the release notebook's stub, at the region's indentation."""
    return _SOLUTION.sub(lambda m: "".join(f"{m.group(1)}{line}\n" for line in CODE_STUB), text)


class _HiddenFalse(ast.NodeTransformer):
    """Partial evaluation with ``hidden = False``: the name ``hidden`` and any ``<x>.hidden`` read become
    ``False``; constant ``not``/``and``/``or``/``if``-expressions and ``if`` statements fold; statements after a
    ``return`` or ``raise`` in the same block are dropped."""

    def visit_Name(self, node):
        if node.id == "hidden" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Constant(False), node)
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        if node.attr == "hidden" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Constant(False), node)
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and isinstance(node.operand, ast.Constant):
            return ast.copy_location(ast.Constant(not node.operand.value), node)
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        values = list(node.values)
        is_and = isinstance(node.op, ast.And)
        while values and isinstance(values[0], ast.Constant):
            decisive = (not values[0].value) if is_and else bool(values[0].value)
            if decisive or len(values) == 1:
                return ast.copy_location(values[0], node)
            values.pop(0)
        if len(values) == 1:
            return values[0]
        node.values = values
        return node

    def visit_IfExp(self, node):
        self.generic_visit(node)
        if isinstance(node.test, ast.Constant):
            return node.body if node.test.value else node.orelse
        return node

    def visit_If(self, node):
        self.generic_visit(node)
        if isinstance(node.test, ast.Constant):
            return (node.body if node.test.value else node.orelse) or None
        return node

    def generic_visit(self, node):
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                for i, stmt in enumerate(block):
                    if isinstance(stmt, (ast.Return, ast.Raise)):
                        del block[i + 1:]
                        break
        if not isinstance(node, ast.Module) and getattr(node, "body", None) == []:
            node.body = [ast.Pass()]
        return node


def _names_read(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} | \
           {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def _defined(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


_GUARD = ("if hidden:\n    raise ValueError('the hidden cases are not in the student package: "
          "the instructor runs them when grading')")


def strip_hidden(source: str, keep: set[str] = frozenset()) -> str:
    """Source of a check module with only its visible cases (see the module docstring).

    Private module-level names (``_x``) that nothing reads after folding — helpers and constants only the
    hidden cases used — are removed, repeatedly; ``keep`` names private helpers other modules import.
    Each function with a ``hidden`` parameter first refuses ``hidden=True``. Comments do not survive."""
    tree = ast.parse(source)
    guarded = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and "hidden" in {a.arg for a in node.args.args + node.args.kwonlyargs}:
            guarded.append(node)
    tree = _HiddenFalse().visit(tree)
    while True:
        body = tree.body
        removable = []
        for stmt in body:
            names = _defined(stmt)
            if names and all(n.startswith("_") and n not in keep for n in names):
                others = ast.Module(body=[s for s in body if s is not stmt], type_ignores=[])
                if not set(names) & _names_read(others):
                    removable.append(stmt)
        if not removable:
            break
        tree.body = [s for s in body if not any(s is r for r in removable)]
    guard = ast.parse(_GUARD).body[0]
    for fn in guarded:
        doc = 1 if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(
            getattr(fn.body[0], "value", None), ast.Constant) and isinstance(fn.body[0].value.value, str) else 0
        if not fn.name.startswith("check_"):
            continue  # helpers (and Checker's constructor) get hidden=False from their callers
        fn.body.insert(doc, copy.deepcopy(guard))
    ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"


def _private_imports(sources: dict[str, str]) -> set[str]:
    """Private names one check module imports from another (they must survive :func:`strip_hidden`)."""
    names = set()
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autograder.checks"):
                names |= {a.name for a in node.names if a.name.startswith("_")}
    return names


def locked_setup_cells() -> dict:
    """{assignment: {grade_id: source}} of each exercise notebook's locked, ungraded code cells (the setup
    cell): what the grader runs in place of the learner's copy."""
    import nbformat

    from autograder.specs import all_assignments
    from autograder.sync import notebook_path
    out = {}
    for name, assignment in all_assignments().items():
        nb = nbformat.read(notebook_path(assignment), as_version=4)
        cells = {}
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type == "code" and meta.get("locked") and not meta.get("grade") \
                    and not meta.get("solution"):
                cells[meta["grade_id"]] = cell.source
        out[name] = cells
    return out


def package_files() -> dict[str, bytes]:
    """{path inside the wheel: content} of the student package (no .dist-info)."""
    files: dict[str, bytes] = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        files[f"llmspace/{path.relative_to(LIBRARY).as_posix()}"] = strip_solutions(path.read_text()).encode()
    for name in RUNNER:
        files[f"autograder/{name}"] = (AUTOGRADER / name).read_bytes()
    for path in sorted((AUTOGRADER / "specs").glob("*.py")):
        files[f"autograder/specs/{path.name}"] = path.read_bytes()
    checks = {p.name: p.read_text() for p in sorted((AUTOGRADER / "checks").glob("*.py"))}
    keep = _private_imports(checks)
    for name, text in checks.items():
        files[f"autograder/checks/{name}"] = strip_hidden(text, keep).encode()
    files[f"autograder/{LOCKED_CELLS}"] = (json.dumps(locked_setup_cells(), indent=1, sort_keys=True)
                                           + "\n").encode()
    return files


# ---- the wheel -----------------------------------------------------------------------------------------------

def _metadata_text(meta: dict) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}",
             f"Summary: {meta['summary']}", f"Requires-Python: {meta['requires_python']}"]
    lines += [f"Requires-Dist: {d}" for d in meta["dependencies"]]
    for extra, deps in meta["extras"].items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f"Requires-Dist: {d}; extra == \"{extra}\"" for d in deps]
    return "\n".join(lines) + "\n"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(out_dir: Path) -> Path:
    """Write the student wheel into ``out_dir``; returns its path."""
    meta = metadata()
    files = package_files()
    dist_info = f"{wheel_name().split('-')[0]}-{meta['version']}.dist-info"
    files[f"{dist_info}/METADATA"] = _metadata_text(meta).encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: autograder.student\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{dist_info}/top_level.txt"] = b"autograder\nllmspace\n"
    record = io.StringIO()
    for name, data in files.items():
        record.write(f"{name},{_record_hash(data)},{len(data)}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel_name()
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    tmp.replace(target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder.student", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="folder for the wheel (default dist/)")
    args = parser.parse_args(argv)
    path = build_wheel(args.out)
    with zipfile.ZipFile(path) as zf:
        n = len(zf.namelist())
    print(f"built {path} ({path.stat().st_size / 1024:.0f} KiB, {n} files); install: {install_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

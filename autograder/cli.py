"""Grading command line.

    python -m autograder check NOTEBOOK.ipynb [--json] [--quiet]
        Learner side (also in the student package, autograder.student): run your notebook cell by cell in a
        worker process as the grader does, call each task's *visible* checks on your functions, and print a
        score per question with the checks' messages and a total (progress on stderr). Needs no gradebook.
        ``--json`` prints the instructor's per-student JSON (status, reason, score, max_score, items,
        details) plus ``assignment`` and ``checks``.

    python -m autograder grade ASSIGNMENT SUBMITTED_DIR [--workers N] [--shard i/n] [--csv F] [--json F]
        Instructor side: grade ``SUBMITTED_DIR/<student>/<ASSIGNMENT>/<ASSIGNMENT>.ipynb`` (trusted engine:
        :mod:`autograder.grading`), record scores in the nbgrader gradebook (``exercises/gradebook.db`` or
        ``$LLMSPACE_GRADEBOOK_URL``, e.g. PostgreSQL shared by several machines), write per-student
        feedback (HTML + Markdown) and a CSV / JSON of results. Every student gets exactly one status:
        graded | invalid | missing | timeout | kernel_died | resource_exceeded.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from autograder import feedback
from autograder.grading import Result, find_notebook, grade_notebook
from autograder.sandbox import Limits
from autograder.specs import Assignment, all_assignments
from autograder.sync import ROOT

COURSE = ROOT / "exercises"
STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}$")


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run nbgrader in the course folder (its nbgrader_config.py applies), with this venv on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True)


def gradebook_url(course: Path) -> str:
    return os.environ.get("LLMSPACE_GRADEBOOK_URL", f"sqlite:///{course.resolve()}/gradebook.db")


def _assignment_for(nb_path: Path) -> Assignment:
    import nbformat
    assignments = all_assignments()
    if nb_path.stem in assignments:
        return assignments[nb_path.stem]
    try:
        nb = nbformat.read(nb_path, as_version=4)
        ids = {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in nb.cells}
    except Exception:  # noqa: BLE001
        ids = set()
    for a in assignments.values():
        if ids & {a.grade_id(t.function) for t in a.tasks}:
            return a
    raise SystemExit(f"{nb_path}: not an exercise notebook of this course (known: {', '.join(assignments)})")


# ---- learner side --------------------------------------------------------------------------------------

def reference_imports(nb, assignment: Assignment) -> dict[str, str]:
    """{task function: the statement} for tasks whose last binding in the notebook, in cell order, is an
    import from ``llmspace`` (``from llmspace.x import f``, ``import llmspace.x as m; f = m.f``) rather than
    the learner's own ``def``. The graded library holds only the stub, so such a task is not implemented."""
    import ast
    tasks = {t.function for t in assignment.tasks}
    bound: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        modules = {}   # local alias -> llmspace module
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llmspace":
                for alias in node.names:
                    if alias.name == "*":
                        for t in tasks:
                            bound[t] = f"from {node.module} import *"
                    elif (alias.asname or alias.name) in tasks:
                        bound[alias.asname or alias.name] = f"from {node.module} import {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "llmspace":
                        modules[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and (root.id in modules or root.id == "llmspace"):
                    for target in node.targets:
                        if isinstance(target, ast.Name) and target.id in tasks:
                            bound[target.id] = ast.unparse(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in tasks:
                bound.pop(node.name, None)
    return bound


def check_notebook(path: Path, limits: Limits | None = None, *, hidden: bool | None = None,
                   progress=None) -> dict:
    """Grade one notebook as the instructor would, without a gradebook.

    ``hidden``: run the hidden cases too (default: when this installation has them, i.e. not in the student
    package). Returns the instructor JSON of :meth:`Result.to_json` (status, reason, score, max_score, items,
    details, tamper flags) plus ``assignment``, ``checks`` ("visible" or "visible+hidden") and ``cell_errors``.
    A task whose function the notebook imports from llmspace fails with "task X imports the reference
    implementation" rather than "not implemented"."""
    import warnings
    assignment = _assignment_for(path)
    if hidden is None:
        hidden = hidden_checks_available()
    with warnings.catch_warnings():
        # The learner runs their own code: no isolation needed, and saying so is no warning for them.
        warnings.filterwarnings("ignore", message="sandbox degraded")
        result = grade_notebook(path, assignment, limits=limits, hidden=hidden, progress=progress,
                                isolate=None if hidden else False)
    try:
        import nbformat
        imported = reference_imports(nbformat.read(path, as_version=4), assignment)
    except Exception:  # noqa: BLE001 - an unreadable notebook is already reported by the result
        imported = {}
    for task in assignment.tasks:
        item = result.items[assignment.grade_id(task.function)]
        if task.function in imported and item["status"] != "passed":
            item.update(status="failed", message=(
                f"task {task.function} imports the reference implementation ({imported[task.function]}); "
                f"the course library only has the stub: write the function in its cell"))
        elif imported and "not implemented yet" in item["message"]:
            item["message"] += (f" — it may call {', '.join(sorted(imported))}, which this notebook imports "
                                f"from llmspace (only the stub is there)")
    report = result.to_json()
    report.update(assignment=assignment.name, checks="visible+hidden" if hidden else "visible",
                  cell_errors=result.cell_errors)
    return report


def hidden_checks_available() -> bool:
    """False in the student package, whose checks refuse ``hidden=True`` (autograder.student)."""
    from autograder.checks import sparse
    import inspect
    return "hidden cases are not in the student package" not in inspect.getsource(sparse)


class _Progress:
    """One line per step on stderr (a notebook takes seconds to minutes: the learner sees it move)."""

    def __init__(self, assignment: Assignment, stream=sys.stderr):
        self.stream, self.n_tasks, self.done, self.t0 = stream, len(assignment.tasks), 0, time.monotonic()
        self.name = assignment.name

    def __call__(self, event: str, detail) -> None:
        elapsed = time.monotonic() - self.t0
        if event == "cell":
            print(f"[{elapsed:5.1f}s] {self.name}: running cell {detail}", file=self.stream, flush=True)
        elif event == "check":
            self.done += 1
            print(f"[{elapsed:5.1f}s] {self.name}: checking {detail} ({self.done}/{self.n_tasks})",
                  file=self.stream, flush=True)


def _print_table(report: dict) -> None:
    items = report["details"]
    width = max([len(k) for k in items] + [len("total")])
    reason = f" ({report['reason']})" if report["reason"] else ""
    print(f"{report['assignment']}: {report['status']}{reason} — {report['checks']} checks")
    print(f"  {'question':<{width}}  {'score':>7}  status")
    for gid, r in items.items():
        print(f"  {gid:<{width}}  {r['score']:>3g}/{r['max_score']:<3g}  {r['status']}")
        for line in r["message"].splitlines():
            print(f"  {'':<{width}}      {line}")
    print(f"  {'total':<{width}}  {report['score']:>3g}/{report['max_score']:<3g}")
    for err in report.get("cell_errors", []):
        print(f"  note: {err}")
    if report["checks"] == "visible":
        print("  (visible checks only: the instructor also runs hidden cases, so the final score can be lower)")


# ---- instructor side ---------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def record_in_gradebook(course: Path, assignment: Assignment, student: str, result: Result) -> None:
    """Write the trusted scores into nbgrader's gradebook (one transaction per student)."""
    import warnings

    from nbgrader.api import Gradebook
    warnings.filterwarnings("ignore", message=".*not in session.*")  # nbgrader's own SQLAlchemy usage
    for attempt in range(5):  # concurrent graders on one PostgreSQL database may race on the student row
        try:
            with Gradebook(gradebook_url(course)) as gb:
                gb.update_or_create_student(student)
                gb.update_or_create_submission(assignment.name, student)
                for gid, item in result.items.items():
                    grade = gb.find_grade(gid, assignment.name, assignment.name, student)
                    grade.auto_score = float(item["score"])
                gb.db.commit()
            return
        except Exception:  # noqa: BLE001
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def select_shard(students: list[str], shard: str | None) -> list[str]:
    if not shard:
        return students
    m = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise SystemExit(f"--shard must be i/n with 0 <= i < n, got {shard!r}")
    i, n = int(m[1]), int(m[2])
    return [s for k, s in enumerate(sorted(students)) if k % n == i]


def grade(assignment_name: str, submitted: Path, csv_out: Path | None = None, json_out: Path | None = None,
          course: Path = COURSE, workers: int = 1, shard: str | None = None, limits: Limits | None = None,
          isolate: bool | None = None, progress: bool = False) -> dict:
    """Grade a folder of submissions; returns {student: Result.to_json() + reason}."""
    assignments = all_assignments()
    if assignment_name not in assignments:
        raise SystemExit(f"unknown assignment {assignment_name!r} (known: {', '.join(assignments)})")
    assignment = assignments[assignment_name]
    if not submitted.is_dir():
        raise SystemExit(f"{submitted}: not a folder of <student>/{assignment_name}/{assignment_name}.ipynb")
    from nbgrader.api import Gradebook, MissingEntry
    with Gradebook(gradebook_url(course)) as gb:
        try:
            gb.find_assignment(assignment_name)
            known = True
        except MissingEntry:
            known = False
    if not known:  # the assignment (its graded cells) must be in the gradebook: release it once
        done = _nbgrader(course, "generate_assignment", assignment_name, "--force")
        if done.returncode != 0:
            raise SystemExit(f"nbgrader generate_assignment failed:\n{done.stderr[-2000:]}")

    entries = sorted(p.name for p in submitted.iterdir())
    students = select_shard(entries, shard)
    results: dict[str, dict] = {}
    slots = list(range(max(1, workers)))
    slot_lock = threading.Lock()

    def one(student: str) -> tuple[str, Result]:
        folder = submitted / student
        if not STUDENT_ID.match(student) or folder.is_symlink() or not folder.is_dir():
            return student, Result("invalid", "student folder name is not a plain identifier, or is a link",
                                   {})
        path, why = find_notebook(folder / assignment_name, assignment)
        if path is None:
            from autograder.grading import _empty_items
            return student, Result("missing", why, _empty_items(assignment, "missing", why))
        with slot_lock:
            slot = slots.pop()
        try:
            return student, grade_notebook(path, assignment, limits=limits, slot=slot,
                                           hide=(submitted.resolve(), course.resolve()), isolate=isolate)
        finally:
            with slot_lock:
                slots.append(slot)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(students), unit="nb", desc=f"grading {assignment_name}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        futures = [pool.submit(one, s) for s in students]
        for future in as_completed(futures):
            student, result = future.result()
            if not result.items:
                from autograder.grading import _empty_items
                result.items = _empty_items(assignment, result.status, result.reason)
            if STUDENT_ID.match(student):
                record_in_gradebook(course, assignment, student, result)
                out = course / "feedback" / student / assignment_name
                _atomic_write(out / f"{assignment_name}.html", feedback.to_html(student, assignment_name, result))
                _atomic_write(out / f"{assignment_name}.md", feedback.markdown(student, assignment_name, result))
            results[student] = result.to_json()
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    results = dict(sorted(results.items()))
    if csv_out:
        item_ids = [assignment.grade_id(t.function) for t in assignment.tasks]
        rows = [["student", "status", "score", "max_score", *item_ids, "tamper_suspected", "reason"]]
        for student, r in results.items():
            rows.append([student, r["status"], r["score"], r["max_score"],
                         *[r["items"].get(i, 0.0) for i in item_ids], r["tamper_suspected"], r["reason"]])
        import io
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        _atomic_write(csv_out, buf.getvalue())
    if json_out:
        _atomic_write(json_out, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def _check_command(args) -> int:
    """The learner's ``check``: visible checks, progress on stderr, a table (or JSON) on stdout."""
    import warnings
    if not args.notebook.is_file():
        raise SystemExit(f"{args.notebook}: no such file")
    warnings.simplefilter("ignore")  # the checks' and libraries' warnings are no news to the learner
    assignment = _assignment_for(args.notebook)
    progress = None if args.quiet else _Progress(assignment)
    try:
        report = check_notebook(args.notebook, hidden=False, progress=progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description="llmspace autograder")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check your own notebook (the visible checks)")
    p_check.add_argument("notebook", type=Path)
    p_check.add_argument("--json", action="store_true",
                         help="print {assignment, status, reason, score, max_score, items, details, ...}")
    p_check.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p_grade = sub.add_parser("grade", help="grade a folder of submissions into the gradebook")
    p_grade.add_argument("assignment")
    p_grade.add_argument("submitted", type=Path, help="folder laid out as <student>/<assignment>/<assignment>.ipynb")
    p_grade.add_argument("--csv", type=Path, default=None, help="CSV of scores (default <assignment>_grades.csv)")
    p_grade.add_argument("--json", type=Path, default=None, help="also write per-student results as JSON")
    p_grade.add_argument("--course", type=Path, default=COURSE, help="nbgrader course folder (default exercises/)")
    p_grade.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="notebooks graded in parallel")
    p_grade.add_argument("--shard", default=None, help="i/n: grade only every n-th student starting at i")
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check_command(args)
    csv_out = args.csv or Path(f"{args.assignment}_grades.csv")
    results = grade(args.assignment, args.submitted, csv_out, args.json, course=args.course,
                    workers=args.workers, shard=args.shard, progress=sys.stderr.isatty())
    for student, r in results.items():
        flag = "  [tamper suspected]" if r["tamper_suspected"] else ""
        print(f"{student:<24} {r['status']:<18} {r['score']:>6.1f}/{r['max_score']:.0f}"
              + (f"  ({r['reason']})" if r["reason"] else "") + flag)
    print(f"scores: {csv_out}   feedback: {args.course / 'feedback'}")
    return 0

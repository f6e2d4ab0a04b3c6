"""Grading command line.

    python -m autograder check NOTEBOOK.ipynb [--json]
        Learner side: run your notebook in the grader's sandbox with the visible *and* hidden checks and
        print a score per question with the checks' messages. Needs no gradebook.

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

def check_notebook(path: Path, limits: Limits | None = None) -> dict:
    """Grade one notebook as the instructor would; returns {assignment, status, reason, items}."""
    assignment = _assignment_for(path)
    result = grade_notebook(path, assignment, limits=limits)
    items = {gid: {"score": i["score"], "max_score": i["max_score"], "status": i["status"],
                   "message": i["message"]} for gid, i in result.items.items()}
    return {"assignment": assignment.name, "status": result.status, "reason": result.reason, "items": items,
            "cell_errors": result.cell_errors}


def _print_table(report: dict) -> None:
    items = report["items"]
    width = max((len(k) for k in items), default=10)
    print(f"{report['assignment']}: {report['status']}" + (f" ({report['reason']})" if report["reason"] else ""))
    for gid, r in items.items():
        print(f"  {gid:<{width}}  {r['score']:>3}/{r['max_score']:<3} {r['status']}")
        for line in r["message"].splitlines():
            print(f"  {'':<{width}}    {line}")
    print(f"  {'total':<{width}}  {sum(r['score'] for r in items.values()):>3}/"
          f"{sum(r['max_score'] for r in items.values())}")
    for err in report.get("cell_errors", []):
        print(f"  note: {err}")


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description="llmspace autograder")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check your own notebook (visible and hidden checks)")
    p_check.add_argument("notebook", type=Path)
    p_check.add_argument("--json", action="store_true", help="print {grade_id: {score, max_score, status, message}}")
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
        if not args.notebook.is_file():
            raise SystemExit(f"{args.notebook}: no such file")
        report = check_notebook(args.notebook)
        if args.json:
            print(json.dumps(report["items"], indent=2))
        else:
            _print_table(report)
        return 0
    csv_out = args.csv or Path(f"{args.assignment}_grades.csv")
    results = grade(args.assignment, args.submitted, csv_out, args.json, course=args.course,
                    workers=args.workers, shard=args.shard, progress=sys.stderr.isatty())
    for student, r in results.items():
        flag = "  [tamper suspected]" if r["tamper_suspected"] else ""
        print(f"{student:<24} {r['status']:<18} {r['score']:>6.1f}/{r['max_score']:.0f}"
              + (f"  ({r['reason']})" if r["reason"] else "") + flag)
    print(f"scores: {csv_out}   feedback: {args.course / 'feedback'}")
    return 0

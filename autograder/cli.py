"""Grading command line.

    python -m autograder check NOTEBOOK.ipynb [--json] [--timeout S]
        Learner side: run your notebook with the course's visible *and* hidden checks, print a score
        per question with the checks' messages. Needs no gradebook.

    python -m autograder grade ASSIGNMENT SUBMITTED_DIR [--csv OUT.csv] [--json OUT.json]
        Instructor side: autograde ``SUBMITTED_DIR/<student>/<ASSIGNMENT>/<ASSIGNMENT>.ipynb`` with nbgrader
        into the course gradebook (``exercises/gradebook.db``, or ``$LLMSPACE_GRADEBOOK_URL``), write
        feedback HTML (hidden tests stripped) and a CSV of scores.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from autograder.specs import all_assignments
from autograder.sync import ROOT, notebook_path

COURSE = ROOT / "exercises"
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"


def _nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _strip_markers(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if line.strip() not in (HIDDEN_BEGIN, HIDDEN_END))


def graded_cells(nb) -> dict[str, dict]:
    """grade_id -> cell for every graded (test) cell."""
    return {_nbgrader_meta(c)["grade_id"]: c for c in nb.cells if _nbgrader_meta(c).get("grade")}


def assignment_of(nb, path: Path):
    """The assignment a notebook belongs to: by its graded cells' grade_ids, else by its file name."""
    assignments = all_assignments()
    for a in assignments.values():
        ids = {a.grade_id(t.function) for t in a.tasks}
        if ids & set(graded_cells(nb)) or path.stem == a.name:
            return a
    raise SystemExit(f"{path}: not an exercise notebook of this course "
                     f"(known assignments: {', '.join(assignments)})")


def check_notebook(path: Path, timeout: int = 120) -> dict:
    """Execute a student notebook with the instructor's test cells; return per-item results."""
    from nbclient import NotebookClient

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the learner's to fix
        raise SystemExit(f"{path}: not a readable notebook ({type(exc).__name__}: {exc})") from None
    assignment = assignment_of(nb, path)
    reference = graded_cells(nbformat.read(notebook_path(assignment), as_version=4))
    present = graded_cells(nb)
    for grade_id, cell in present.items():  # the instructor's test code, hidden cases included
        if grade_id in reference:
            cell.source = _strip_markers(reference[grade_id].source)
    client = NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    crash = None
    try:
        client.execute()
    except Exception as exc:  # noqa: BLE001 - timeouts and dead kernels end the run; scores so far stand
        crash = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    results = {}
    for grade_id, ref in reference.items():
        points = _nbgrader_meta(ref)["points"]
        cell = present.get(grade_id)
        if cell is None:
            results[grade_id] = dict(score=0, max_score=points, status="missing",
                                     message="this test cell was deleted; restore it from the released notebook")
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        ran = cell.get("execution_count") is not None
        if errors:
            e = errors[0]
            message = e["evalue"] if e["ename"] == "CheckFailed" else f"{e['ename']}: {e['evalue']}"
            results[grade_id] = dict(score=0, max_score=points, status="failed", message=message)
        elif not ran:
            results[grade_id] = dict(score=0, max_score=points, status="not_run",
                                     message=f"not reached ({crash})" if crash else "not executed")
        else:
            results[grade_id] = dict(score=points, max_score=points, status="passed", message="")
    return {"assignment": assignment.name, "items": results, "error": crash}


def _print_table(report: dict) -> None:
    items = report["items"]
    width = max(len(k) for k in items) if items else 10
    print(f"{report['assignment']}")
    for grade_id, r in items.items():
        print(f"  {grade_id:<{width}}  {r['score']:>3}/{r['max_score']:<3} {r['status']}")
        for line in r["message"].splitlines():
            print(f"  {'':<{width}}    {line}")
    total = sum(r["score"] for r in items.values())
    best = sum(r["max_score"] for r in items.values())
    print(f"  {'total':<{width}}  {total:>3}/{best}")
    if report["error"]:
        print(f"\nThe run stopped early: {report['error']}")


# ---- instructor side -------------------------------------------------------------------------------

def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run nbgrader in the course folder (its nbgrader_config.py applies), with this venv on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True)


def gradebook_url(course: Path) -> str:
    return os.environ.get("LLMSPACE_GRADEBOOK_URL", f"sqlite:///{course.resolve()}/gradebook.db")


def _scores_from_gradebook(course: Path, assignment: str, student: str) -> dict | None:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(gradebook_url(course)) as gb:
        try:
            sub = gb.find_submission(assignment, student)
        except MissingEntry:
            return None
        items = {}
        for nb in sub.notebooks:
            for grade in nb.grades:
                items[grade.name] = float(grade.score)
        return {"score": float(sub.score), "max_score": float(sub.max_score), "items": dict(sorted(items.items()))}


def grade(assignment_name: str, submitted: Path, csv_out: Path | None = None, json_out: Path | None = None,
          course: Path = COURSE) -> dict:
    """Autograde every ``submitted/<student>/<assignment>/<assignment>.ipynb``; returns per-student results
    ``{student: {status, score, max_score, items: {grade_id: score}, [reason]}}``."""
    assignments = all_assignments()
    if assignment_name not in assignments:
        raise SystemExit(f"unknown assignment {assignment_name!r} (known: {', '.join(assignments)})")
    assignment = assignments[assignment_name]
    if not submitted.is_dir():
        raise SystemExit(f"{submitted}: not a folder of <student>/{assignment_name}/{assignment_name}.ipynb")
    done = _nbgrader(course, "generate_assignment", assignment_name, "--force")
    if done.returncode != 0:
        raise SystemExit(f"nbgrader generate_assignment failed:\n{done.stderr[-2000:]}")
    target = course / "submitted"
    results = {}
    for student_dir in sorted(p for p in submitted.iterdir() if p.is_dir()):
        student = student_dir.name
        src = student_dir / assignment_name
        notebook = src / f"{assignment_name}.ipynb"
        if not notebook.is_file():
            found = sorted(p.name for p in src.glob("*.ipynb")) if src.is_dir() else []
            results[student] = {"status": "missing", "score": 0.0, "max_score": float(assignment.max_score),
                                "items": {}, "reason": f"no {assignment_name}.ipynb"
                                + (f" (found {', '.join(found)})" if found else "")}
            continue
        dest = target / student / assignment_name
        if dest.resolve() != src.resolve():
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dest)
        run = _nbgrader(course, "autograde", assignment_name, "--student", student, "--force", "--create")
        scores = _scores_from_gradebook(course, assignment_name, student)
        if run.returncode != 0 or scores is None:
            results[student] = {"status": "invalid", "score": 0.0, "max_score": float(assignment.max_score),
                                "items": {}, "reason": (run.stderr.strip().splitlines() or ["autograde failed"])[-1]}
            continue
        _nbgrader(course, "generate_feedback", assignment_name, "--student", student, "--force")
        results[student] = {"status": "graded", **scores}
    if csv_out:
        item_ids = [assignment.grade_id(t.function) for t in assignment.tasks]
        with open(csv_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["student", "status", "score", "max_score", *item_ids])
            for student, r in results.items():
                w.writerow([student, r["status"], r["score"], r["max_score"],
                            *[r["items"].get(i, 0.0) for i in item_ids]])
    if json_out:
        tmp = json_out.with_suffix(json_out.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
        tmp.replace(json_out)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description="llmspace autograder")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check your own notebook (visible and hidden checks)")
    p_check.add_argument("notebook", type=Path)
    p_check.add_argument("--json", action="store_true", help="print {grade_id: {score, max_score, status, message}}")
    p_check.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    p_grade = sub.add_parser("grade", help="autograde a folder of submissions into the gradebook")
    p_grade.add_argument("assignment")
    p_grade.add_argument("submitted", type=Path, help="folder laid out as <student>/<assignment>/<assignment>.ipynb")
    p_grade.add_argument("--csv", type=Path, default=None, help="CSV of scores (default <assignment>_grades.csv)")
    p_grade.add_argument("--json", type=Path, default=None, help="also write per-student results as JSON")
    p_grade.add_argument("--course", type=Path, default=COURSE, help="nbgrader course folder (default exercises/)")
    args = parser.parse_args(argv)

    if args.command == "check":
        if not args.notebook.is_file():
            raise SystemExit(f"{args.notebook}: no such file")
        report = check_notebook(args.notebook, timeout=args.timeout)
        if args.json:
            print(json.dumps(report["items"], indent=2))
        else:
            _print_table(report)
        return 0
    csv_out = args.csv or Path(f"{args.assignment}_grades.csv")
    results = grade(args.assignment, args.submitted, csv_out, args.json, course=args.course)
    for student, r in results.items():
        print(f"{student:<24} {r['status']:<8} {r['score']:>6.1f}/{r['max_score']:.0f}"
              + (f"  ({r['reason']})" if r.get("reason") else ""))
    print(f"scores: {csv_out}   feedback: {args.course / 'feedback'}")
    return 0

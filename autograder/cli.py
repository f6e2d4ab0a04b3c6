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
        graded | invalid | missing | timeout | kernel_died | resource_exceeded | grader_error.
        Refuses to run where student code cannot be isolated unless --no-sandbox is given; Ctrl-C stops
        the running notebooks and still writes the CSV / JSON of everyone graded so far (exit 130).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

from autograder import feedback
from autograder.grading import Result, find_notebook, grade_notebook, sanitize
from autograder.sandbox import Limits
from autograder.specs import Assignment, all_assignments
from autograder.sync import ROOT

COURSE = ROOT / "exercises"
STUDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}")  # always .fullmatch: "alice\n" is not "alice"


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
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _venv_on_path() -> None:
    """nbgrader's gradebook migrations run the ``alembic`` script by name: make this interpreter's bin
    folder the first place to look, so ``.venv/bin/python -m autograder grade`` works without an activated
    venv."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def submission_time(folder: Path, notebook: Path | None) -> datetime | None:
    """When the student submitted (naive UTC, as nbgrader stores it): nbgrader's ``timestamp.txt`` in the
    submission folder when it parses, else the notebook file's modification time."""
    from nbgrader.utils import parse_utc
    stamp = folder / "timestamp.txt"
    try:
        if stamp.is_file() and not stamp.is_symlink() and stamp.stat().st_size < 200:
            return parse_utc(stamp.read_text(encoding="utf-8", errors="strict").strip())
    except (OSError, ValueError, OverflowError, UnicodeError, TypeError):
        pass
    try:
        if notebook is not None:
            return datetime.fromtimestamp(notebook.stat().st_mtime, timezone.utc).replace(tzinfo=None)
    except (OSError, ValueError, OverflowError):
        pass
    return None


def _late_penalty_plugin(course: Path):
    """nbgrader's late-submission plugin as the course configures it (``c.AssignLatePenalties.plugin_class``,
    ``c.LateSubmissionPlugin.penalty_method``); its default assigns no penalty."""
    from nbgrader.preprocessors import AssignLatePenalties
    from traitlets.config.loader import PyFileConfigLoader
    config = None
    if (course / "nbgrader_config.py").is_file():
        try:
            config = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
        except Exception:  # noqa: BLE001 - an unreadable config: nbgrader's defaults
            config = None
    preprocessor = AssignLatePenalties(config=config) if config is not None else AssignLatePenalties()
    preprocessor.init_plugin()
    return preprocessor


def record_in_gradebook(course: Path, assignment: Assignment, student: str, result: Result,
                        submitted_at: datetime | None = None) -> None:
    """Write the trusted scores into nbgrader's gradebook (one transaction per student), as nbgrader's own
    autograder would: each graded cell's ``auto_score`` with ``needs_manual_grade`` cleared (set only where
    a human already gave a manual score, which a new auto score must not silently override), the check's
    message as the auto comment of the task's solution cell, the submission's timestamp (so ``nbgrader
    export`` and late penalties work), the course's late penalty, and the tamper flag as nbgrader's
    ``flagged``."""
    import warnings

    from nbgrader.api import Gradebook, MissingEntry
    warnings.filterwarnings("ignore", message=".*not in session.*")  # nbgrader's own SQLAlchemy usage
    penalties = _late_penalty_plugin(course)
    for attempt in range(5):  # concurrent graders on one PostgreSQL database may race on the student row
        try:
            with Gradebook(gradebook_url(course)) as gb:
                gb.update_or_create_student(student)
                if submitted_at is not None:
                    submission = gb.update_or_create_submission(assignment.name, student, timestamp=submitted_at)
                else:
                    submission = gb.update_or_create_submission(assignment.name, student)
                for gid, item in result.items.items():
                    grade = gb.find_grade(gid, assignment.name, assignment.name, student)
                    grade.auto_score = float(item["score"])
                    grade.needs_manual_grade = grade.manual_score is not None
                    try:
                        comment = gb.find_comment(f"{gid}_solution", assignment.name, assignment.name, student)
                    except MissingEntry:
                        continue
                    comment.auto_comment = (item["message"] or "Passed every check (visible and hidden).")
                notebook = gb.find_submission_notebook(assignment.name, assignment.name, student)
                notebook.flagged = bool(result.tamper_suspected)
                notebook.late_submission_penalty = None
                gb.db.commit()
                late = submission.total_seconds_late or 0
                if late > 0:
                    penalty = penalties.plugin_inst.late_submission_penalty(student, notebook.score, late)
                    if penalty is not None:
                        notebook.late_submission_penalty = min(max(float(penalty), 0.0), float(notebook.score))
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


def _csv_field(value) -> str:
    """One CSV cell: sanitised to one line, and never read as a formula by a spreadsheet."""
    text = sanitize(value, multiline=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not re.fullmatch(r"-?[0-9.]+", text) else text


def _released(course: Path, assignment_name: str) -> bool:
    return (course / "release" / assignment_name / f"{assignment_name}.ipynb").is_file()


def grade(assignment_name: str, submitted: Path, csv_out: Path | None = None, json_out: Path | None = None,
          course: Path = COURSE, workers: int = 1, shard: str | None = None, limits: Limits | None = None,
          isolate: bool | None = None, progress: bool = False, no_sandbox: bool = False) -> dict:
    """Grade a folder of submissions; returns {student: Result.to_json() + recorded_in_gradebook}.

    Every folder entry gets exactly one result; nothing a submission contains stops the batch. The CSV and
    JSON are always written (also after Ctrl-C, for the students graded so far: then ``SystemExit(130)``)
    and the gradebook holds everyone who ran. Refuses to run without the sandbox's isolation unless
    ``no_sandbox`` (or ``isolate=False``) says so; an unknown, unreleased or empty cohort is an error."""
    from autograder import grading
    from autograder.sandbox import isolation_available

    _venv_on_path()
    assignments = all_assignments()
    if assignment_name not in assignments:
        raise SystemExit(f"unknown assignment {assignment_name!r} (known: {', '.join(assignments)})")
    assignment = assignments[assignment_name]
    if no_sandbox or isolate is False:
        isolate = False
    else:
        available, why = isolation_available()
        if not available:
            raise SystemExit(f"the sandbox cannot isolate student code here ({why}); run as root where it can, "
                             f"or pass --no-sandbox to grade with resource limits only (trusted submissions)")
        isolate = True
    if not submitted.is_dir():
        raise SystemExit(f"{submitted}: not a folder of <student>/{assignment_name}/{assignment_name}.ipynb")
    if not _released(course, assignment_name):
        raise SystemExit(f"{assignment_name} was never released in {course} (no release/{assignment_name}/): "
                         f"release it first with `nbgrader generate_assignment {assignment_name}` in that folder")
    entries = sorted(os.listdir(submitted))
    if not entries:
        raise SystemExit(f"{submitted} is empty: no student folders <student>/{assignment_name}/ to grade")
    if not any((submitted / e / assignment_name).is_dir() for e in entries):
        raise SystemExit(f"none of the {len(entries)} entries in {submitted} has a {assignment_name}/ folder "
                         f"(expected <student>/{assignment_name}/{assignment_name}.ipynb): wrong assignment or folder?")
    from nbgrader.api import Gradebook, MissingEntry
    with Gradebook(gradebook_url(course)) as gb:
        try:
            gb.find_assignment(assignment_name)
            known = True
        except MissingEntry:
            known = False
    if not known:  # released, but not in this gradebook (e.g. a fresh PostgreSQL database): register it
        done = _nbgrader(course, "generate_assignment", assignment_name, "--force")
        if done.returncode != 0:
            raise SystemExit(f"nbgrader generate_assignment failed:\n{done.stderr[-2000:]}")

    students = select_shard(entries, shard)
    grading.reset_cancel()
    results: dict[str, dict] = {}
    slots = list(range(max(1, workers)))
    slot_lock = threading.Lock()
    keys: dict[str, str] = {}  # folder entry -> its key in the results (escaped when not a plain id)
    for entry in students:
        key = entry if STUDENT_ID.fullmatch(entry) else f"<invalid folder name {sanitize(entry, False)!r}>"
        while key in keys.values():
            key += "'"
        keys[entry] = key

    def one(entry: str) -> tuple[str, Result, datetime | None]:
        folder = submitted / entry
        if not STUDENT_ID.fullmatch(entry):
            why = (f"the folder name {sanitize(entry, False)!r} is not a plain student id (letters, digits and "
                   f"_.@+- only, no spaces or control characters): rename it to grade it")
            return entry, Result("invalid", why, grading._empty_items(assignment, "invalid", why)), None
        if folder.is_symlink() or not folder.is_dir():
            why = "the student entry is not a folder (or is a link)"
            return entry, Result("invalid", why, grading._empty_items(assignment, "invalid", why)), None
        path, why = find_notebook(folder / assignment_name, assignment)
        when = submission_time(folder / assignment_name, path)
        if path is None:
            return entry, Result("missing", why, grading._empty_items(assignment, "missing", why)), when
        with slot_lock:
            slot = slots.pop()
        try:
            return entry, grade_notebook(path, assignment, limits=limits, slot=slot,
                                         hide=(submitted.resolve(), course.resolve()), isolate=isolate), when
        finally:
            with slot_lock:
                slots.append(slot)

    def safe_one(entry: str):
        if interrupted.is_set():
            raise grading.Interrupted()
        try:
            return one(entry)
        except grading.Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - grade_notebook never raises; this guards the code around it
            why = f"grader error: {grading._fault(exc)}"
            return entry, Result("grader_error", why, grading._empty_items(assignment, "grader_error", why)), None

    def finish(entry: str, result: Result, when: datetime | None) -> None:
        result.sanitized()
        recorded, problem = False, ""
        if STUDENT_ID.fullmatch(entry):
            try:
                record_in_gradebook(course, assignment, entry, result, when)
                recorded = True
            except Exception as exc:  # noqa: BLE001 - one student's gradebook failure is reported, not fatal
                problem = f"not recorded in the gradebook: {grading._fault(exc)}"
            try:
                out = course / "feedback" / entry / assignment_name
                graded_at = datetime.now(timezone.utc)
                _atomic_write(out / f"{assignment_name}.html", feedback.to_html(
                    entry, assignment_name, result, submitted_at=when, graded_at=graded_at))
                _atomic_write(out / f"{assignment_name}.md", feedback.markdown(
                    entry, assignment_name, result, submitted_at=when, graded_at=graded_at))
            except Exception as exc:  # noqa: BLE001
                problem += ("; " if problem else "") + f"feedback not written: {grading._fault(exc)}"
        data = result.to_json()
        data["recorded_in_gradebook"] = recorded
        data["submitted_at"] = when.isoformat() + "Z" if when else None
        if problem:
            data["reason"] = sanitize("; ".join(filter(None, [data["reason"], problem])), multiline=False)
            print(f"warning: {keys[entry]}: {sanitize(problem, multiline=False)}", file=sys.stderr)
        results[keys[entry]] = data

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(students), unit="nb", desc=f"grading {assignment_name}", file=sys.stderr)
    interrupted = threading.Event()
    previous_handler = None

    def on_interrupt(signum, frame):
        if interrupted.is_set():  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        interrupted.set()
        grading.cancel_all()
        # os.write, not print: the handler may interrupt a print to stderr (a reentrant call would raise)
        os.write(2, b"\ninterrupted: stopping the running notebooks and writing the results so far "
                    b"(Ctrl-C again to quit at once)\n")

    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    pool = ThreadPoolExecutor(max_workers=len(slots))
    try:
        pending = {pool.submit(safe_one, s) for s in students}
        while pending:
            # a timeout, so that the main thread runs the SIGINT handler promptly even when the kernel
            # delivered the signal to a worker thread (a blocked lock wait is not interrupted then)
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    entry, result, when = future.result()
                except (grading.Interrupted, CancelledError):
                    continue
                finish(entry, result, when)
                if bar:
                    bar.update(1)
    except KeyboardInterrupt:
        interrupted.set()
        grading.cancel_all()
    finally:
        pool.shutdown(wait=not interrupted.is_set(), cancel_futures=True)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if bar:
            bar.close()
        _write_outputs(assignment, dict(sorted(results.items())), csv_out, json_out)
    if interrupted.is_set():
        written = ", ".join(str(p) for p in (csv_out, json_out) if p)
        print(f"interrupted: {len(results)} of {len(students)} graded" + (f"; written to {written}" if written else ""),
              file=sys.stderr)
        raise SystemExit(130)
    return dict(sorted(results.items()))


def _write_outputs(assignment: Assignment, results: dict, csv_out: Path | None, json_out: Path | None) -> None:
    if csv_out:
        item_ids = [assignment.grade_id(t.function) for t in assignment.tasks]
        rows = [["student", "status", "score", "max_score", *item_ids, "tamper_suspected", "submitted_at",
                 "reason"]]
        for student, r in results.items():
            rows.append([_csv_field(student), r["status"], r["score"], r["max_score"],
                         *[r["items"].get(i, 0.0) for i in item_ids], r["tamper_suspected"],
                         r.get("submitted_at") or "", _csv_field(r["reason"])])
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        _atomic_write(csv_out, buf.getvalue())
    if json_out:
        _atomic_write(json_out, json.dumps(results, indent=2, sort_keys=True, ensure_ascii=True) + "\n")


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
    p_grade.add_argument("--json", type=Path, default=None,
                         help="per-student results as JSON (default: the CSV's name with .json)")
    p_grade.add_argument("--course", type=Path, default=COURSE, help="nbgrader course folder (default exercises/)")
    p_grade.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="notebooks graded in parallel")
    p_grade.add_argument("--shard", default=None, help="i/n: grade only every n-th student starting at i")
    p_grade.add_argument("--no-sandbox", action="store_true",
                         help="grade even where student code cannot be isolated (resource limits only)")
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check_command(args)
    csv_out = args.csv or Path(f"{args.assignment}_grades.csv")
    json_out = args.json or csv_out.with_suffix(".json")
    results = grade(args.assignment, args.submitted, csv_out, json_out, course=args.course,
                    workers=args.workers, shard=args.shard, progress=sys.stderr.isatty(),
                    no_sandbox=args.no_sandbox)
    for student, r in results.items():
        flag = "  [tamper suspected]" if r["tamper_suspected"] else ""
        print(f"{sanitize(student, False):<24} {r['status']:<18} {r['score']:>6.1f}/{r['max_score']:.0f}"
              + (f"  ({sanitize(r['reason'], False)})" if r["reason"] else "") + flag)
    print(f"scores: {csv_out}  {json_out}   feedback: {args.course / 'feedback'}")
    return 0

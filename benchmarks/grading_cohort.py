"""Grading at course scale: a generated cohort graded twice into PostgreSQL, once by one grader with
``--workers 2`` and once by two ``--shard`` processes at the same time — nothing lost, the same scores.

    make postgres    # Debian's PostgreSQL, started locally (as root)
    python benchmarks/grading_cohort.py [--students 200] [--assignment ex01_sparse] [--seed 0]
        → benchmarks/results/grading_cohort.json

Each generated student answers every task of the assignment with one of: the reference (the instructor
notebook's solution cell), an alternative correct answer (``autograder/fixtures/<topic>_alt.py``, where
it exists), a wrong answer (``<topic>_wrong.py``), or the untouched stub — drawn per task with a seeded
RNG. The expected score of every item is decided beforehand, in this process and without the grader: the
notebook's setup and answer cells run in a plain namespace and the instructor's checks (visible + hidden)
run on what they define. The grades must equal it. Both runs must
put all students in their own fresh gradebook database with those scores, and agree with each other.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from autograder.checks import CheckFailed  # noqa: E402
from autograder.specs import all_assignments  # noqa: E402
from autograder.sync import ROOT, notebook_path  # noqa: E402

PSQL_HOST = "/var/run/postgresql"


def _psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-d", "postgres", "-qAtc", sql], capture_output=True, text=True)


def fixture_answers(assignment, kind: str) -> dict[str, list]:
    """{function: [(name, source with the fixture module's imports, function)]} from <topic>_<kind>.py."""
    try:
        module = importlib.import_module(f"autograder.fixtures.{assignment.topic}_{kind}")
    except ModuleNotFoundError:
        return {}
    text = Path(inspect.getsourcefile(module)).read_text()
    tasks = {t.function for t in assignment.tasks}
    lines = []
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            # a task imported from llmspace would replace the student's own earlier answer by the stub
            node.names = [a for a in node.names if not (node.module.startswith("llmspace") and a.name in tasks)]
            if node.names:
                lines.append(ast.unparse(node))
        elif isinstance(node, ast.Import):
            lines.append(ast.unparse(node))
    imports = "\n".join(lines)
    out: dict[str, list] = {}
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        function = name.split("__")[0]
        if "__" in name and function in tasks and fn.__module__ == module.__name__:
            source = inspect.getsource(fn).replace(f"def {name}(", f"def {function}(", 1)
            out.setdefault(function, []).append((name, f"{imports}\n\n\n{source}", fn))
    return out


def expected_scores(assignment, nb) -> dict:
    """{grade_id: points} decided without the grader: the setup and solution cells are executed in a plain
    namespace of this process (answers call each other, e.g. a reference ``sparse_add`` calls the notebook's
    ``coo_to_csr``), then each task's check runs, visible and hidden cases, on the function found there."""
    checks = importlib.import_module(f"autograder.checks.{assignment.topic}")
    namespace: dict = {"__name__": "__main__"}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and (meta.get("solution") or meta.get("grade_id", "").endswith("_setup")):
            exec(compile(cell.source, meta.get("grade_id", "cell"), "exec"), namespace)
    out = {}
    for task in assignment.tasks:
        check = getattr(checks, f"check_{task.function}")
        try:
            check(namespace[task.function])
            check(namespace[task.function], hidden=True)
        except CheckFailed:
            out[assignment.grade_id(task.function)] = 0.0
        else:
            out[assignment.grade_id(task.function)] = float(task.points)
    return out


def generate(assignment, release: Path, out: Path, students: int, seed: int) -> dict:
    """Write ``out/<student>/<assignment>/<assignment>.ipynb``; returns {student: {grade_id: expected}}."""
    rng = random.Random(seed)
    source = nbformat.read(notebook_path(assignment), as_version=4)
    blank = nbformat.read(release, as_version=4)
    solution = {c.metadata["nbgrader"]["grade_id"].removesuffix("_solution"): c.source
                for c in source.cells if c.metadata.get("nbgrader", {}).get("solution")}
    wrong, alt = fixture_answers(assignment, "wrong"), fixture_answers(assignment, "alt")
    expected, mix, cache = {}, {"reference": 0, "alt": 0, "wrong": 0, "stub": 0}, {}
    for i in range(students):
        student = f"s{i:04d}"
        nb = nbformat.from_dict(blank)
        cells = {c.metadata.get("nbgrader", {}).get("grade_id", ""): c for c in nb.cells}
        for task in assignment.tasks:
            gid = assignment.grade_id(task.function)
            r = rng.random()
            if r < 0.05:
                kind, text = "stub", cells[f"{gid}_solution"].source
            elif r < 0.45 and wrong.get(task.function):
                kind, text = "wrong", rng.choice(wrong[task.function])[1]
            elif r < 0.75 and alt.get(task.function):
                kind, text = "alt", rng.choice(alt[task.function])[1]
            else:
                kind, text = "reference", solution[gid]
            mix[kind] += 1
            cells[f"{gid}_solution"].source = text
        key = tuple(c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution"))
        if key not in cache:
            cache[key] = expected_scores(assignment, nb)
        expected[student] = cache[key]
        folder = out / student / assignment.name
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{assignment.name}.ipynb")
    return {"expected": expected, "mix": mix, "fixtures": {"wrong": sum(map(len, wrong.values())),
                                                           "alt": sum(map(len, alt.values()))}}


def course_copy(tmp: Path, name: str) -> Path:
    course = tmp / name
    course.mkdir()
    shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "exercises" / "source", course / "source")
    return course


def run(cmds: list[list[str]], course: Path, db_url: str, assignment: str) -> float:
    """Release into the database, then start every grader command at once; wall seconds of the grading."""
    env = dict(os.environ, LLMSPACE_GRADEBOOK_URL=db_url,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", assignment, "--force"],
                          cwd=course, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"release failed:\n{done.stderr[-3000:]}")
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args)} failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def gradebook_scores(db_url: str, assignment) -> dict:
    from nbgrader.api import Gradebook
    out = {}
    with Gradebook(db_url) as gb:
        for s in gb.students:
            out[s.id] = {assignment.grade_id(t.function):
                         float(gb.find_grade(assignment.grade_id(t.function), assignment.name, assignment.name,
                                             s.id).score) for t in assignment.tasks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--assignment", default="ex01_sparse")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("psql") is None or _psql("select 1").returncode != 0:
        raise SystemExit("no local PostgreSQL server: run `make postgres` (as root) first")
    assignment = all_assignments()[args.assignment]
    databases = [f"llmspace_cohort_{uuid.uuid4().hex[:8]}_{k}" for k in ("workers", "shards")]
    for db in databases:
        assert _psql(f"create database {db}").returncode == 0
    urls = [f"postgresql+psycopg2:///{db}?host={PSQL_HOST}" for db in databases]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            courses = [course_copy(tmp, "course_workers"), course_copy(tmp, "course_shards")]
            gen_course = course_copy(tmp, "course_release")
            from autograder import cli
            done = cli._nbgrader(gen_course, "generate_assignment", args.assignment, "--force")
            assert done.returncode == 0, done.stderr
            release = gen_course / "release" / args.assignment / f"{args.assignment}.ipynb"
            t0 = time.perf_counter()
            cohort = generate(assignment, release, tmp / "incoming", args.students, args.seed)
            generate_seconds = time.perf_counter() - t0
            grade = [sys.executable, "-m", "autograder", "grade", args.assignment, str(tmp / "incoming")]
            seconds_workers = run([grade + ["--course", str(courses[0]), "--workers", "2",
                                            "--csv", str(tmp / "workers.csv"), "--json", str(tmp / "workers.json")]],
                                  courses[0], urls[0], args.assignment)
            seconds_shards = run([grade + ["--course", str(courses[1]), "--workers", "1", "--shard", f"{k}/2",
                                           "--csv", str(tmp / f"shard{k}.csv"), "--json", str(tmp / f"shard{k}.json")]
                                  for k in range(2)], courses[1], urls[1], args.assignment)
            json_workers = json.loads((tmp / "workers.json").read_text())
            json_shards = {**json.loads((tmp / "shard0.json").read_text()),
                           **json.loads((tmp / "shard1.json").read_text())}
            books = [gradebook_scores(u, assignment) for u in urls]
    finally:
        for db in databases:
            _psql(f"drop database if exists {db} with (force)")
    expected = cohort["expected"]
    items = {name: {s: {k: float(v) for k, v in r["items"].items()} for s, r in data.items()}
             for name, data in (("workers", json_workers), ("shards", json_shards))}
    statuses = {name: sorted({r["status"] for r in data.values()})
                for name, data in (("workers", json_workers), ("shards", json_shards))}
    checks = {
        "every student graded by the --workers run": sorted(json_workers) == sorted(expected),
        "every student graded by the --shard runs": sorted(json_shards) == sorted(expected),
        "--workers scores == expected": items["workers"] == expected,
        "--shard scores == expected": items["shards"] == expected,
        "gradebook (workers) == expected": books[0] == expected,
        "gradebook (shards) == expected": books[1] == expected,
    }
    mismatches = sorted(s for s in expected if items["workers"].get(s) != expected[s]
                        or items["shards"].get(s) != expected[s])[:10]
    n = args.students
    payload = {
        "assignment": args.assignment, "students": n, "seed": args.seed,
        "cohort": {"answers_per_kind": cohort["mix"], "fixtures_available": cohort["fixtures"],
                   "mean_expected_score": sum(map(sum, (v.values() for v in expected.values()))) / n,
                   "max_score": assignment.max_score, "generate_seconds": generate_seconds},
        "runs": [
            {"mode": "one grader, --workers 2", "seconds": seconds_workers,
             "notebooks_per_minute": n / seconds_workers * 60, "statuses": statuses["workers"]},
            {"mode": "two graders at once, --shard 0/2 and 1/2, --workers 1 each", "seconds": seconds_shards,
             "notebooks_per_minute": n / seconds_shards * 60, "statuses": statuses["shards"]},
        ],
        "gradebook": "PostgreSQL (one fresh database per run)",
        "checks": checks, "first_mismatches": mismatches,
    }
    path = write_result("grading_cohort", payload)
    for r in payload["runs"]:
        print(f"{r['mode']:<58} {n} notebooks in {r['seconds']:.0f} s = {r['notebooks_per_minute']:.1f} notebooks/min")
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    print(f"wrote {path}")
    if not all(checks.values()):
        raise SystemExit(f"cohort check failed (first mismatches: {mismatches})")


if __name__ == "__main__":
    main()

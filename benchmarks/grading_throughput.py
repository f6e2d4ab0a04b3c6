"""Grading throughput and sandbox overhead.

    python benchmarks/grading_throughput.py [--notebooks 12] [--workers 2]
        → benchmarks/results/grading_throughput.json
    python benchmarks/grading_throughput.py --notebooks 2 --no-result   # a smoke run: prints, no file

Grades the same cohort (half reference answers, half untouched releases of ex01_sparse) twice in one
run — with the full sandbox (bubblewrap, a slot user and a cgroup: needs root) and degraded (rlimits
only) — and times the start and stop of an empty sandbox (start the worker, run one empty cell, stop it
and clean the slot), so the per-notebook overhead of isolation is measured, not guessed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from autograder import cli  # noqa: E402
from autograder.sandbox import Sandbox, isolation, isolation_available  # noqa: E402
from autograder.sync import ROOT, notebook_path  # noqa: E402

NAME = "ex01_sparse"


def cohort(tmp: Path, n: int, release: Path) -> Path:
    incoming = tmp / "incoming"
    source = nbformat.read(notebook_path(cli.all_assignments()[NAME]), as_version=4)
    blank = nbformat.read(release, as_version=4)
    for i in range(n):
        folder = incoming / f"student{i:03d}" / NAME
        folder.mkdir(parents=True)
        nbformat.write(source if i % 2 == 0 else blank, folder / f"{NAME}.ipynb")
    return incoming


def empty_sandbox_seconds(isolate: bool, repeat: int = 5) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        with Sandbox(isolate=isolate) as sb:
            sb.run_cell("pass")
        samples.append(time.perf_counter() - start)
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--notebooks", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-result", action="store_true", help="print only; write no results JSON")
    args = parser.parse_args()
    isolated, why = isolation_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        course = tmp / "course"
        course.mkdir()
        shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
        shutil.copytree(ROOT / "exercises" / "source", course / "source")
        done = cli._nbgrader(course, "generate_assignment", NAME, "--force")
        assert done.returncode == 0, done.stderr
        incoming = cohort(tmp, args.notebooks, course / "release" / NAME / f"{NAME}.ipynb")
        for mode in (["sandbox", "degraded"] if isolated else ["degraded"]):
            start = time.perf_counter()
            results = cli.grade(NAME, incoming, course=course, workers=args.workers, isolate=(mode == "sandbox"))
            seconds = time.perf_counter() - start
            assert all(r["status"] == "graded" for r in results.values())
            rows.append({"mode": mode, "notebooks": args.notebooks, "workers": args.workers, "seconds": seconds,
                         "notebooks_per_minute": args.notebooks / seconds * 60,
                         "empty_sandbox_seconds": empty_sandbox_seconds(mode == "sandbox")})
    iso = isolation()
    payload = {"assignment": NAME, "isolation": isolated or why, "sandbox": {"mode": iso.mode, "cgroup": iso.cgroup,
                                                                             "why": iso.why},
               "results": rows,
               "settings": {"cohort": "half reference answers, half untouched releases"}}
    path = None if args.no_result else write_result("grading_throughput", payload)
    for r in rows:
        print(f"{r['mode']:<9} {r['notebooks']} notebooks, {r['workers']} workers: {r['seconds']:.1f} s = "
              f"{r['notebooks_per_minute']:.1f} notebooks/min; empty sandbox start+stop "
              f"{r['empty_sandbox_seconds'] * 1e3:.0f} ms")
    print(f"wrote {path}" if path else "no results file written")


if __name__ == "__main__":
    main()

"""Two grader processes on one PostgreSQL gradebook (`--shard 0/2` and `--shard 1/2`, run at the same time,
as two machines of a batch scheduler would): every student's scores land, none is lost.

Needs a local PostgreSQL server (`make postgres`, run by `make test` as root); skipped elsewhere, and
in CI a missing server is a failure.
"""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nbformat
import pytest

from autograder.fixtures import article
from notebooks import with_answers

ROOT = Path(__file__).resolve().parents[1]
NAME = "ex01_sparse"
pytestmark = pytest.mark.slow


def _psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-d", "postgres", "-qAtc", sql], capture_output=True, text=True)


@pytest.fixture(scope="module")
def database():
    if shutil.which("psql") is None or _psql("select 1").returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not running (make postgres)")
        pytest.skip("no local PostgreSQL server (make postgres)")
    name = f"llmspace_test_{uuid.uuid4().hex[:8]}"
    assert _psql(f"create database {name}").returncode == 0
    yield f"postgresql+psycopg2:///{name}?host=/var/run/postgresql"
    _psql(f"drop database {name} with (force)")


def test_two_sharded_graders_share_one_gradebook(database, tmp_path):
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "exercises" / "source", course / "source")
    env = dict(os.environ, LLMSPACE_GRADEBOOK_URL=database,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    release = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", NAME, "--force"],
                             cwd=course, env=env, capture_output=True, text=True)
    assert release.returncode == 0, release.stderr
    source = nbformat.read(course / "source" / NAME / f"{NAME}.ipynb", as_version=4)
    buggy = with_answers(source, "ex01", {"sparse_matrix_add": article.sparse_matrix_add})
    expected = {}
    for i in range(8):
        student = f"student{i}"
        folder = tmp_path / "incoming" / student / NAME
        folder.mkdir(parents=True)
        nbformat.write(buggy if i % 2 else source, folder / f"{NAME}.ipynb")
        expected[student] = 12.0 if i % 2 else 13.0
    graders = [subprocess.Popen([sys.executable, "-m", "autograder", "grade", NAME, str(tmp_path / "incoming"),
                                 "--course", str(course), "--workers", "1", "--shard", f"{k}/2",
                                 "--csv", str(tmp_path / f"shard{k}.csv")],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k in range(2)]
    for g in graders:
        out, err = g.communicate(timeout=600)
        assert g.returncode == 0, err[-3000:]
    from nbgrader.api import Gradebook
    with Gradebook(database) as gb:
        scores = {s.id: gb.find_submission(NAME, s.id).score for s in gb.students}
    assert scores == expected
    shards = [(tmp_path / f"shard{k}.csv").read_text().splitlines()[1:] for k in range(2)]
    assert sorted(len(s) for s in shards) == [4, 4]

"""Notebooks that run anywhere: each release notebook, copied alone into an empty folder, runs in a fresh venv
that has nothing but the student wheel and its declared dependencies (+ ipykernel to execute it).

How the venv is made (fast, offline, and still a proof): ``python -m venv --without-pip``; the wheel is
installed with ``pip --python VENV install --no-deps``; its dependencies are not downloaded again but taken
from this environment: the closure of the wheel's ``Requires-Dist`` (plus ``ipykernel``) is resolved with
``importlib.metadata``, each of those distributions' top-level files is symlinked into ``VENV/deps``, and
one ``.pth`` file puts that folder on the venv's path. Nothing else of this environment is visible: not
the repository (``PYTHONPATH`` is cleared, the folder is empty), not the editable install of the reference
library, not a package the wheel forgot to declare.

Then: the only errors in an executed release notebook are its graded cells failing on the unsolved stubs
(``CheckFailed: ... not implemented yet``), ``python -m autograder check`` from the wheel says the same
for the release and gives full visible marks to the instructor's solved notebook, and prints no warning
or traceback. Per-notebook check times are printed (``-s``).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement

from autograder import student
from autograder.specs import all_assignments
from autograder.sync import notebook_path
from notebooks import release_all

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = list(all_assignments().values())
pytestmark = pytest.mark.slow


def requirement_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions that ``requirements`` pull in, transitively (markers evaluated, no extras)."""
    seen, todo, out = set(), list(requirements), []
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(req.name)   # raises if a declared dependency is not installed here
        out.append(dist)
        todo += dist.requires or []
    return out


def link_distributions(dists, target: Path) -> None:
    target.mkdir(parents=True)
    for dist in dists:
        site = Path(dist.locate_file(""))
        for top in sorted({Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}):
            if top == "__pycache__" or (target / top).exists() or not (site / top).exists():
                continue
            (target / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("student-venv")
    wheel = student.build_wheel(base / "dist")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    declared = student.metadata()["dependencies"]
    link_distributions(requirement_closure(declared + ["ipykernel"]), base / "deps")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "llmspace_course_deps.pth").write_text(str(base / "deps") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JUPYTER"))}
    env.update(PYTHONNOUSERSITE="1", PYTHONWARNINGS="default", HOME=str(base / "home"),
               PATH=f"{env_dir / 'bin'}:/usr/bin:/bin")
    (base / "home").mkdir()
    return python, env


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release_all(tmp_path_factory.mktemp("course"), ROOT / "exercises", ASSIGNMENTS)


def test_venv_sees_only_the_wheel_and_its_dependencies(venv, tmp_path):
    python, env = venv
    probe = ("import json, sys, llmspace, autograder, importlib.util as u; print(json.dumps({"
             "'llmspace': llmspace.__file__, 'autograder': autograder.__file__, 'path': sys.path, "
             "'fixtures': u.find_spec('autograder.fixtures') is not None, 'nbgrader': u.find_spec('nbgrader') is not None}))")
    out = json.loads(subprocess.run([str(python), "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                                    text=True, check=True).stdout)
    venv_root = str(python.parent.parent)
    assert out["llmspace"].startswith(venv_root) and out["autograder"].startswith(venv_root)
    assert not any(str(ROOT) in p for p in out["path"])
    assert not out["fixtures"] and not out["nbgrader"]


def _execute(nb_path: Path, python: Path, env: dict) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    spec_dir = nb_path.parent.parent / "kernels" / "llmspace-student"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "student venv", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
    km = KernelManager(kernel_name="llmspace-student", kernel_spec_manager=ksm)
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json, sys, llmspace, autograder\n"
        "print(json.dumps({'llmspace': llmspace.__file__, 'path': sys.path}))"))
    client = NotebookClient(nb, km=km, timeout=120, allow_errors=True, startup_timeout=120,
                            resources={"metadata": {"path": str(nb_path.parent)}})
    client.execute(env=env, cwd=str(nb_path.parent))
    return nb


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: a.name)
def test_release_notebook_runs_alone_in_the_student_venv(assignment, venv, released, tmp_path):
    python, env = venv
    folder = tmp_path / "empty"
    folder.mkdir()
    path = folder / f"{assignment.name}.ipynb"
    shutil.copy(released / assignment.name / path.name, path)
    nb = _execute(path, python, env)
    graded = {assignment.grade_id(t.function) for t in assignment.tasks}
    failed_graded = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        for err in errors:
            assert err.ename not in ("ImportError", "ModuleNotFoundError"), (gid, err.evalue)
            assert gid in graded, f"cell {gid or cell.source[:60]!r} raised {err.ename}: {err.evalue}"
            assert err.ename == "CheckFailed" and "not implemented yet" in err.evalue, (gid, err.evalue)
            failed_graded.add(gid)
    assert failed_graded == graded   # every graded cell fails on its stub, and only that fails
    where = json.loads(nb.cells[-1].outputs[0]["text"])
    assert where["llmspace"].startswith(str(python.parent.parent))
    assert not any(str(ROOT) in p for p in where["path"])


def _check(python, env, path: Path) -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([str(python), "-m", "autograder", "check", str(path), "--json"], env=env,
                          cwd=path.parent, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr, seconds


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: a.name)
def test_check_from_the_wheel(assignment, venv, released, tmp_path):
    """`check` in the student venv: 0 on the release, full visible marks on the instructor's solved notebook,
    progress on stderr and no warning or traceback anywhere."""
    python, env = venv
    for kind, source in (("release", released / assignment.name / f"{assignment.name}.ipynb"),
                         ("solved", notebook_path(assignment))):
        path = tmp_path / kind / f"{assignment.name}.ipynb"
        path.parent.mkdir()
        shutil.copy(source, path)
        report, stderr, seconds = _check(python, env, path)
        print(f"check {assignment.name} ({kind}): {seconds:.1f} s, {report['score']:g}/{report['max_score']:g}")
        assert report["checks"] == "visible" and report["status"] == "graded"
        assert report["max_score"] == assignment.max_score
        assert "checking" in stderr and "Traceback" not in stderr and "Warning" not in stderr, stderr[-2000:]
        details = report["details"]
        if kind == "release":
            assert report["score"] == 0
            assert all("not implemented yet" in d["message"] for d in details.values()), details
        else:
            assert report["score"] == assignment.max_score, {k: d["message"] for k, d in details.items()}
            assert not report["cell_errors"]


def test_check_from_the_wheel_names_an_imported_reference(venv, released, tmp_path):
    """Importing the answer from llmspace gets the stub in the student package: `check` says so, in the
    table, with no traceback."""
    python, env = venv
    nb = nbformat.read(released / "ex01_sparse" / "ex01_sparse.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "ex01_coo_to_csr_solution":
            cell.source = "from llmspace.sparse import coo_to_csr"
    path = tmp_path / "ex01_sparse.ipynb"
    nbformat.write(nb, path)
    done = subprocess.run([str(python), "-m", "autograder", "check", str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "task coo_to_csr imports the reference implementation" in done.stdout
    assert re.search(r"^  total\s+0/13", done.stdout, re.M)
    assert "Traceback" not in done.stdout + done.stderr and "Warning" not in done.stdout + done.stderr

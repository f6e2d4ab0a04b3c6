"""The student package (`make student`, autograder/student.py): what the learner installs next to the notebooks.

Unzips the wheel and proves what is *not* in it — no reference solution text, no hidden case, no fixture, no
weights — and that what is in it behaves: each stripped check gives the same verdict and message as the
instructor's check with ``hidden=False`` on the reference, the unsolved stub, and every wrong and alternative
answer in autograder/fixtures, and refuses ``hidden=True``. The slow tests (tests/test_student_venv.py) install
the wheel into a fresh venv and run the release notebooks and ``check`` there.
"""
import ast
import base64
import hashlib
import importlib
import inspect
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest

from autograder import student
from autograder.checks import Checker, CheckFailed
from autograder.specs import all_assignments
from autograder.sync import notebook_path

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = list(all_assignments().values())
TASKS = [(a, t) for a in ASSIGNMENTS for t in a.tasks]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return student.build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def files(wheel):
    with zipfile.ZipFile(wheel) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def test_wheel_name_is_not_taken_and_matches_the_book():
    assert student.metadata()["name"] == "llmspace-course"   # "autograder", "llmspace"… checked on PyPI
    assert student.wheel_name() == f"llmspace_course-{student.metadata()['version']}-py3-none-any.whl"


def test_wheel_holds_only_the_student_files(wheel, files):
    dist_info = f"llmspace_course-{student.metadata()['version']}.dist-info"
    allowed = re.compile(r"^(llmspace/(\w+/)*\w+\.py|autograder/(specs|checks)/\w+\.py|autograder/locked_cells\.json|"
                         rf"autograder/({'|'.join(re.escape(n) for n in student.RUNNER)})|"
                         rf"{re.escape(dist_info)}/(METADATA|WHEEL|RECORD|top_level\.txt))$")
    assert [n for n in files if not allowed.match(n)] == []
    assert not any("fixtures" in n or "assets" in n or n.endswith("student.py") for n in files)
    library = {p.relative_to(ROOT / "solutions").as_posix() for p in (ROOT / "solutions/llmspace").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert library <= set(files)   # every module the notebooks and checks import
    checks = {f"autograder/checks/{p.name}" for p in (ROOT / "autograder/checks").glob("*.py")}
    assert checks <= set(files)
    assert wheel.stat().st_size < 400 * 1024
    # RECORD: every file with its sha256 and size (pip verifies this on install)
    record = files[f"{dist_info}/RECORD"].decode().splitlines()
    for line in record:
        name, digest, size = line.rsplit(",", 2)
        if name.endswith("RECORD"):
            continue
        data = files[name]
        assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert int(size) == len(data)
    assert len(record) == len(files)


def test_wheel_declares_its_dependencies(files):
    meta = files[next(n for n in files if n.endswith("METADATA"))].decode()
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)(.*)$", meta, re.M)
    plain = {name for name, rest in requires if "extra" not in rest}
    assert {"numpy", "scipy", "torch", "safetensors", "nbformat", "cloudpickle", "ipython"} <= plain
    assert "Provides-Extra: jupyter" in meta
    assert {name for name, rest in requires if 'extra == "jupyter"' in rest} >= {"jupyterlab", "ipykernel"}
    # every third-party module the checks and the runner import (anywhere in them), and every one the
    # library modules a notebook or a check uses import at module level, is declared (or in the stdlib)
    def imports(name, everywhere):
        tree = ast.parse(files[name])
        for node in (ast.walk(tree) if everywhere else tree.body):
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                yield node.module

    todo = [(n, True) for n in files if n.startswith("autograder/") and n.endswith(".py")]
    import json
    for cells in json.loads(files["autograder/locked_cells.json"]).values():
        for source in cells.values():
            todo.append(("<setup>" + source, False))
    seen = set()
    while todo:
        name, everywhere = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        mods = (list(imports(name, everywhere)) if not name.startswith("<setup>") else
                [m for m in re.findall(r"^(?:from|import) ([\w.]+)", name[7:], re.M)])
        for mod in mods:
            top = mod.split(".")[0]
            if top == "llmspace" and mod != "llmspace":
                stem = mod.replace(".", "/")
                todo.append((f"{stem}.py" if f"{stem}.py" in files else f"{stem}/__init__.py", False))
            elif name == "autograder/cli.py" and top in ("nbgrader", "tqdm", "psycopg2"):
                continue  # the instructor's `grade` path; `check` never imports them (tests/test_student_venv.py)
            elif top not in sys.stdlib_module_names and top not in ("llmspace", "autograder", "__future__", "codec"):
                assert top in plain or top.lower() in plain or top.replace("_", "-") in plain or \
                    (top == "IPython" and "ipython" in plain), f"{name[:60]} imports undeclared {top}"


def _solution_regions():
    """(file, region text) of every solution region in the reference library."""
    for path in sorted((ROOT / "solutions/llmspace").rglob("*.py")):
        for m in re.finditer(r"### BEGIN SOLUTION\n(.*?)^[ \t]*### END SOLUTION", path.read_text(), re.M | re.S):
            yield path, m.group(1)


def test_no_reference_solution_text(files):
    texts = [data.decode() for name, data in files.items() if name.endswith((".py", ".json"))]
    everything = "\n".join(texts)
    library = "\n".join(data.decode() for name, data in files.items() if name.startswith("llmspace/"))
    assert "### BEGIN SOLUTION" not in library and "### END SOLUTION" not in library
    outside = student.strip_solutions("\n".join(p.read_text() for p in (ROOT / "solutions/llmspace").rglob("*.py")))
    outside_lines = {line.strip() for line in outside.splitlines()}
    # A visible check may compute its expected value with the same generic line (e.g. `for name, info in
    # header.items():`); such lines are the check's own, shown to every student, not the answer leaking.
    outside_lines |= {line.strip() for p in (ROOT / "autograder/checks").glob("*.py") for line in p.read_text().splitlines()}
    outside_text = outside + "\n".join(p.read_text() for p in (ROOT / "autograder/checks").glob("*.py"))
    regions = list(_solution_regions())
    assert len(regions) >= 20
    checked = 0
    for path, region in regions:
        # lines that are the answer: long enough to be specific, and not also written outside any region
        answer = [line.strip() for line in region.splitlines()
                  if len(line.strip()) >= 25 and line.strip() not in outside_lines and not line.strip().startswith("#")
                  and line.strip() not in outside_text]   # e.g. a continuation line of shipped library code
        for line in answer:
            assert line not in everything, f"{path.name}: reference line in the wheel: {line}"
            checked += 1
    assert checked >= 100


def test_stub_is_the_release_notebooks(files):
    """The library's stub is nbgrader's code_stub from the course config (what the release notebook shows)."""
    from traitlets.config.loader import PyFileConfigLoader
    config = PyFileConfigLoader("nbgrader_config.py", str(ROOT / "exercises")).load_config()
    assert "\n".join(student.CODE_STUB) == config.ClearSolutions.code_stub["python"]
    sparse = files["llmspace/sparse.py"].decode()
    stubs = re.findall(r"^( +)# YOUR CODE HERE\n\1raise NotImplementedError\(\)\n", sparse, re.M)
    assert len(stubs) == len(all_assignments()["ex01_sparse"].tasks)


def _case_names(hidden: bool, monkeypatch) -> set:
    """Every case name the instructor's checks pass to the Checker when run on the reference."""
    names = set()
    call, raises = Checker.call, Checker.expect_raises

    def recording_call(self, case, *args, **kwargs):
        names.add(case)
        return call(self, case, *args, **kwargs)

    def recording_raises(self, case, *args, **kwargs):
        names.add(case)
        return raises(self, case, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Checker, "call", recording_call)
        m.setattr(Checker, "expect_raises", recording_raises)
        for assignment, task in TASKS:
            reference = getattr(importlib.import_module(task.module or assignment.module), task.function)
            check = getattr(importlib.import_module(f"autograder.checks.{assignment.topic}"), f"check_{task.function}")
            check(reference, hidden=hidden)
    return names


@pytest.mark.slow
def test_no_hidden_case_in_the_wheel(files, monkeypatch):
    """The hidden cases' names (recorded by running the instructor's checks) appear nowhere in the wheel."""
    visible, hidden = _case_names(False, monkeypatch), _case_names(True, monkeypatch)
    hidden_only = {n for n in hidden - visible if len(n) >= 6}
    assert len(hidden_only) >= 30
    # a case name is a string literal in the check (names like "float32" may also be literals for other uses:
    # those are listed in the failure message and must be judged by reading the stripped check)
    literals = {node.value for n, d in files.items() if n.startswith("autograder/checks/")
                for node in ast.walk(ast.parse(d)) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    leaked = sorted(n for n in hidden_only if n in literals)
    assert not leaked, f"hidden case names in the student checks: {leaked}"
    for name, data in files.items():
        if name.startswith("autograder/checks/"):
            tree = ast.parse(data)
            reads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            assert not {r for r in reads if "HIDDEN" in r.upper() and r != "hidden"}, name


def _stripped_checks(files) -> dict:
    """The wheel's check modules, loaded beside the instructor's (their imports resolve to this checkout)."""
    modules = {}
    for assignment in ASSIGNMENTS:
        # named as in the wheel (the Checker names arguments after its caller's module), not registered
        module = types.ModuleType(f"autograder.checks.{assignment.topic}")
        source = files[f"autograder/checks/{assignment.topic}.py"].decode()
        exec(compile(source, f"stripped {assignment.topic}", "exec"), module.__dict__)
        modules[assignment.topic] = module
    return modules


def _answers(assignment, task):
    """The reference, the unsolved stub, and every wrong or alternative answer in the fixtures."""
    def stub(*args, **kwargs):
        raise NotImplementedError()
    function = task.function
    answers = [("reference", getattr(importlib.import_module(task.module or assignment.module), function)),
               ("stub", stub)]
    for kind in ("wrong", "alt"):
        try:
            module = importlib.import_module(f"autograder.fixtures.{assignment.topic}_{kind}")
        except ModuleNotFoundError:
            continue
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.split("__")[0] == function and "__" in name and fn.__module__ == module.__name__:
                answers.append((name, fn))
    return answers


def _verdict(check, answer):
    try:
        check(answer)
    except CheckFailed as failure:
        return f"failed: {failure}"
    return "passed"


@pytest.mark.slow
def test_stripped_checks_give_the_instructors_visible_verdicts(files):
    import torch
    stripped = _stripped_checks(files)
    # torch's warn-once warnings (e.g. a tensor over read-only bytes) would fire in the first run only
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        _compare_verdicts(stripped)
    finally:
        torch.set_warn_always(warn_always)


def _compare_verdicts(stripped):
    n = 0
    for assignment, task in TASKS:
        original = getattr(importlib.import_module(f"autograder.checks.{assignment.topic}"), f"check_{task.function}")
        mine = getattr(stripped[assignment.topic], f"check_{task.function}")
        for name, answer in _answers(assignment, task):
            ours, theirs = _verdict(mine, answer), _verdict(original, answer)
            if ours != theirs and _verdict(original, answer) != theirs:
                # the instructor's own message varies from run to run (e.g. a case named after the first key
                # of a dict safetensors returns in hash order): only the verdict can be compared
                ours, theirs = ours.split(":")[0], theirs.split(":")[0]
            assert ours == theirs, (task.function, name)
            n += 1
        with pytest.raises(ValueError, match="hidden cases are not in the student package"):
            mine(answer, hidden=True)
    assert n >= len(TASKS) * 3


def test_strip_hidden_folds_the_patterns_the_checks_use():
    source = '''
_HIDDEN_CASES = [("secret case", 42)]
def _cases(hidden):
    if not hidden:
        return [("shown", 1)]
    return _HIDDEN_CASES
def check_f(impl, *, hidden=False):
    """Doc."""
    c = Checker("f", impl, hidden)
    seed = 3 if hidden else 4
    extra = [] if not hidden else _HIDDEN_CASES
    if hidden and seed:
        c.fail("x", "secret")
    msg = "" if c.hidden else "shown detail"
    for name, v in _cases(hidden):
        pass
    if hidden:
        c.expect_raises("secret raise", ValueError, 1)
'''
    out = student.strip_hidden(source)
    assert "secret" not in out and "_HIDDEN_CASES" not in out and "42" not in out
    assert "seed = 4" in out and "'shown detail'" in out and "Checker('f', impl, False)" in out
    assert out.count("if hidden:") == 1          # the guard, and only in check_f
    namespace = {"Checker": lambda *a: types.SimpleNamespace(hidden=False)}
    exec(out, namespace)
    with pytest.raises(ValueError):
        namespace["check_f"](None, hidden=True)


def test_locked_cells_are_the_setup_cells(files):
    import json
    packaged = json.loads(files["autograder/locked_cells.json"])
    assert set(packaged) == {a.name for a in ASSIGNMENTS}
    for a in ASSIGNMENTS:
        assert set(packaged[a.name]) == {f"{a.prefix}_setup"}
        assert "import" in packaged[a.name][f"{a.prefix}_setup"]


def test_every_notebook_and_chapter_says_how_to_install():
    import nbformat
    wheel = student.wheel_name()
    for a in ASSIGNMENTS:
        first = nbformat.read(notebook_path(a), as_version=4).cells[0]
        assert student.install_line() in first.source and first.cell_type == "markdown"
    chapters = sorted((ROOT / "book").glob("0*/index.md"))
    assert len(chapters) == len(ASSIGNMENTS)
    for chapter in chapters:
        text = chapter.read_text()
        assert f"{{download}}`{wheel} </dist/{wheel}>`" in text, chapter
        assert "{download}`ex" in text


def test_check_names_a_task_that_imports_the_reference():
    """`check` says "task X imports the reference implementation" for an answer imported from llmspace (the
    student package's llmspace only has the stub), whatever the import's form; a later own `def` wins."""
    import nbformat

    from autograder import cli
    a = all_assignments()["ex01_sparse"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in (
        "from llmspace.sparse import coo_to_csr, CSR",
        "import llmspace.sparse as S\nsparse_add = S.sparse_add",
        "from llmspace.sparse import csr_matvec\ndef csr_matvec(A, x):\n    return A @ x",
        "csr_to_csc = llmspace.sparse.csr_to_csc",
        "this is not python",
    )]
    found = cli.reference_imports(nb, a)
    assert set(found) == {"coo_to_csr", "sparse_add", "csr_to_csc"}
    assert found["coo_to_csr"] == "from llmspace.sparse import coo_to_csr"
    assert found["sparse_add"] == "sparse_add = S.sparse_add"

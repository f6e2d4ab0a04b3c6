"""Nothing a student does ends, hangs or skews a batch (issue 16 items 1 and 3, issue 11's grader bullet) and
the gradebook/feedback instructors get (issue 14 item 5).

Most tests need no sandbox: preflight, the codec's bounds, the write-back rules of ``RemoteFunction`` (with a
fake sandbox that answers whatever a hostile worker could), the tamper scan, the gradebook and the feedback.
One batch graded with ``--workers 2`` and one Ctrl-C run use the real sandbox, with small notebooks; they and
the tests that run nbgrader are marked slow (the rest takes seconds).
"""
import ast
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from autograder import cli, codec, feedback, grading
from autograder.grading import RemoteFunction, Result, preflight, sanitize
from autograder.sandbox import Limits, Sandbox, SandboxGone, isolation_available
from autograder.specs import all_assignments
from autograder.sync import notebook_path

ROOT = Path(__file__).resolve().parents[1]
NAME = "ex01_sparse"
A01 = all_assignments()[NAME]
CONTROL = "\x1b[2J\x1b[H\r"
ISOLATED = isolation_available()[0]   # CI runs as root with the full sandbox; elsewhere grade --no-sandbox


def _source_nb() -> dict:
    return json.loads(notebook_path(A01).read_text())


def _write(path: Path, nb) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nb if isinstance(nb, str) else json.dumps(nb))
    return path


# ---- sanitising ---------------------------------------------------------------------------------------

def test_sanitize_escapes_control_characters_and_surrogates():
    text = f"ok\udce9 {CONTROL}graded 13/13\u202e\x85\tend\nnext"
    one_line = sanitize(text, multiline=False)
    assert one_line.isprintable() and "\x1b" not in one_line and "\n" not in one_line
    assert "\\x1b[2J" in one_line and "\ufffd" in one_line and "\\u202e" in one_line
    one_line.encode("utf-8")  # no surrogate left
    assert sanitize(text).count("\n") == 1 and "\t" in sanitize(text)
    assert sanitize("plain ascii") == "plain ascii"


# ---- preflight: every malformed notebook is `invalid` with a reason, fast ---------------------------------

def _mutate(fn):
    nb = _source_nb()
    fn(nb)
    return json.dumps(nb)


PREFLIGHT_CASES = {
    "nbgrader metadata null": (_mutate(lambda nb: nb["cells"][3]["metadata"].update(nbgrader=None)),
                               "nbgrader metadata is null"),
    "grade_id a list": (_mutate(lambda nb: nb["cells"][4]["metadata"]["nbgrader"].update(grade_id=["ex01_x"])),
                        "'grade_id' must be a string, got a list"),
    "locked a string": (_mutate(lambda nb: nb["cells"][1]["metadata"]["nbgrader"].update(locked="no")),
                        "'locked' must be true/false"),
    "metadata a list": (_mutate(lambda nb: nb["cells"][3].update(metadata=[1])), "metadata must be an object"),
    "source a number": (_mutate(lambda nb: nb["cells"][3].update(source=7)), "'source' must be a string"),
    "lone surrogate in source": (_mutate(lambda nb: nb["cells"][3].update(source="x = '\ud800'")),
                                 "not valid Unicode"),
    "cell not an object": (_mutate(lambda nb: nb["cells"].append("cell")), "not an object"),
    "nested very deeply": ('{"nbformat": 4, "cells": [], "metadata": {"a": ' + "[" * 200_000 + "]" * 200_000 + "}}",
                           "not valid JSON"),
    "not UTF-8": (b'{"nbformat": 4, "cells": ["\xff\xfe"]}', "not UTF-8"),
    "a million empty lists": ('{"nbformat": 4, "cells": [' + ",".join(["[]"] * 1_100_000) + "]}",
                              "JSON elements"),
    "old format (v3), large": (json.dumps({"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": [
        {"cells": [{"cell_type": "code", "input": "x = 1\n" * 50, "language": "python", "metadata": {},
                    "outputs": [{"output_type": "stream", "text": "y\n" * 500}]} for _ in range(4000)]}]}),
        "format 3"),
}


@pytest.mark.parametrize("case", PREFLIGHT_CASES)
def test_preflight_rejects_with_a_reason_in_bounded_time(case, tmp_path):
    content, reason = PREFLIGHT_CASES[case]
    path = tmp_path / f"{NAME}.ipynb"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    start = time.process_time()
    nb, why = preflight(path, A01)
    assert time.process_time() - start < 5.0  # grader CPU: was a minute for a large old-format notebook
    assert nb is None and reason in why, why


def test_preflight_keeps_only_what_grading_reads(tmp_path):
    nb = _source_nb()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":  # a lot of output: dropped unread, not validated
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["line\n"] * 20_000}]
    nb["metadata"]["deep"] = json.loads("[" * 900 + "]" * 900)
    path = _write(tmp_path / f"{NAME}.ipynb", nb)
    start = time.process_time()
    clean, why = preflight(path, A01)
    assert time.process_time() - start < 5.0
    assert clean is not None, why
    assert all(c.get("outputs", []) == [] for c in clean.cells) and "deep" not in clean.metadata
    assert clean.cells[3].metadata.nbgrader["grade_id"] == "ex01_sparse_matrix_add_solution"


# ---- codec: bounded replies ----------------------------------------------------------------------------

def _peak(fn):
    tracemalloc.start()
    try:
        fn()
    except codec.DecodeError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_huge_reply_is_refused_before_it_is_parsed():
    payload = b'{"ok": true, "result": [' + b",".join([b"[]"] * 3_000_000) + b"]}"   # ~9 MB, legal JSON
    with pytest.raises(codec.TooLarge, match="elements"):
        codec.loads(payload)
    assert _peak(lambda: codec.loads(payload)) < 2 * 2**20   # parsing it would take ~200 MB (~25x)


def test_a_reply_within_the_bounds_costs_a_bounded_multiple_of_its_size():
    payload = b'{"ok": true, "result": [' + b",".join([b"[]"] * 50_000) + b"]}"
    peak = _peak(lambda: codec.decode(codec.loads(payload)["result"]))
    assert peak < 3 * len(payload) + 150 * 50_000


def test_array_headers_are_checked_before_allocating():
    import base64
    import io
    buf = io.BytesIO()
    np.save(buf, np.zeros(4))
    data = buf.getvalue().replace(b"(4,)", b"(10000000000,)".ljust(4, b" "))
    bad = {"__ndarray__": base64.b64encode(data).decode()}
    assert _peak(lambda: codec.decode(bad)) < 2**20
    with pytest.raises(codec.DecodeError, match="bad array"):
        codec.decode(bad)
    back = codec.decode(codec.encode(np.arange(6.0).reshape(2, 3).T))
    assert back.flags.writeable and np.array_equal(back, np.arange(6.0).reshape(2, 3).T)


@pytest.mark.parametrize("payload", [
    {"__bigint__": "9" * 5000}, {"__bigint__": "12x"}, {"__complex__": [1]}, {"__complex__": "ab"},
    {"__set__": [[1]]}, {"__npscalar__": ["<f8"]}, {"__npscalar__": ["V8", 1]}, {"__np_dtype__": "O"},
    {"__tuple__": 5}, {"__torch_dtype__": "__class__"}, {"__dataclass__": 5}, {"__tensor__": "AAAA"},
    {"__tuple__": [], "extra": 1}, {"__dataclass__": "llmspace.no_such_module:X", "fields": {}},
])
def test_every_malformed_value_is_a_decode_error(payload):
    with pytest.raises(codec.DecodeError):
        codec.decode(payload)


def test_encode_and_decode_keep_an_element_budget(monkeypatch):
    monkeypatch.setattr(codec, "MAX_ITEMS", 1000)
    with pytest.raises(codec.EncodeError, match="elements"):
        codec.encode([[]] * 1000)
    assert len(codec.decode(codec.encode([[]] * 998))) == 998
    with pytest.raises(codec.TooLarge, match="elements"):
        codec.decode({"__tuple__": [[[]] * 10] * 100})


# ---- RemoteFunction: decisions stay trusted --------------------------------------------------------------

class FakeSandbox:
    """Answers every call with a canned reply, as a hostile worker could."""

    def __init__(self, reply):
        self.reply = reply

    def call(self, name, args, kwargs=None):
        return self.reply(args) if callable(self.reply) else self.reply


def _after(*values):
    return [None if v is None else codec.encode(v) for v in values]


def test_student_changes_reach_only_the_checks_copies():
    """Through the real Checker: the student's in-place change lands in the check's fresh copy, so the check
    reports it, and the check's own argument (from which it computes the expected value) stays intact."""
    from autograder.checks import CheckFailed, Checker
    x = np.arange(4.0)
    reply = {"ok": True, "result": codec.encode(np.zeros(4)), "args_after": _after(np.zeros(4))}
    c = Checker("f", RemoteFunction(FakeSandbox(reply), "f"), hidden=False)
    with pytest.raises(CheckFailed, match="modified its input argument"):
        c.call("case", x)
    assert np.array_equal(x, np.arange(4.0))
    assert np.array_equal(c.call("allowed", x, mutates=(0,)), np.zeros(4)) and not c.last_args[0].any()
    assert np.array_equal(x, np.arange(4.0))


def test_write_backs_keep_objects_shapes_and_dtypes():
    state = [{"m": torch.zeros(3, dtype=torch.float64)}, {"m": torch.zeros(3, dtype=torch.float64)}]
    inner, storage = state[0], state[0]["m"].data_ptr()
    new = [{"m": torch.ones(3, dtype=torch.float64)}, {"m": torch.full((3,), 2.0, dtype=torch.float64)}]
    reply = {"ok": True, "result": None, "args_after": _after(None, new)}
    RemoteFunction(FakeSandbox(reply), "f")(1.0, state)
    assert state[0] is inner and state[0]["m"].data_ptr() == storage    # same objects, new values
    assert torch.equal(state[1]["m"], new[1]["m"])
    for bad in ([{"m": torch.ones(4, dtype=torch.float64)}] * 2, [{"m": torch.ones(3)}] * 2):
        reply = {"ok": True, "result": None, "args_after": _after(None, bad)}
        with pytest.raises(TypeError, match="must stay"):
            RemoteFunction(FakeSandbox(reply), "f")(1.0, state)
    assert state[0]["m"].shape == (3,) and state[0]["m"].data_ptr() == storage  # never a new .data
    # a list may shrink or grow (a student's pop/append on the check's fresh copy): the same list object
    # then holds what the student left, so the check can say "modified its input argument"
    accesses = [0, 1, 2]
    reply = {"ok": True, "result": None, "args_after": _after([0, 1])}
    RemoteFunction(FakeSandbox(reply), "f")(accesses)
    assert accesses == [0, 1]
    x = np.zeros(3, dtype=np.float32)
    reply = {"ok": True, "result": None, "args_after": _after(np.zeros(3))}   # float64 into float32
    with pytest.raises(TypeError, match="must stay"):
        RemoteFunction(FakeSandbox(reply), "f")(x)


def test_a_returned_argument_is_the_same_object_updated_in_place():
    model = torch.nn.Linear(2, 2)
    changed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    reply = {"ok": True, "result": {"__same_as_arg__": 0},
             "args_after": [{"__state_dict__": codec.encode(changed)}]}
    weight = model.weight
    assert RemoteFunction(FakeSandbox(reply), "f")(model) is model
    assert model.weight is weight and torch.equal(model.weight, changed["weight"])
    renamed = {"__state_dict__": codec.encode({"w2": torch.zeros(2, 2)})}
    with pytest.raises(TypeError, match="changed names"):
        RemoteFunction(FakeSandbox({"ok": True, "result": None, "args_after": [renamed]}), "f")(model)


@pytest.mark.parametrize("reply", [
    {"result": 1}, {"ok": "yes"}, {"ok": False, "exception": "boom"}, {"ok": False, "exception": [1]},
    {"ok": True, "result": 1, "args_after": 5}, {"ok": True, "result": 1, "args_after": [None, None, None]},
    {"ok": True, "result": {"__same_as_arg__": 7}}, {"ok": True, "result": {"__same_as_arg__": True}},
])
def test_malformed_replies_end_the_notebook_as_kernel_died(reply):
    with pytest.raises(SandboxGone) as gone:
        RemoteFunction(FakeSandbox(reply), "f")(np.zeros(2))
    assert gone.value.status == "kernel_died" and "malformed" in gone.value.reason


def test_an_undecodable_result_is_the_students_error(monkeypatch):
    monkeypatch.setattr(codec, "MAX_ITEMS", 1000)
    reply = {"ok": True, "result": {"__tuple__": [[[]] * 10] * 100}}
    with pytest.raises(TypeError, match="cannot accept"):
        RemoteFunction(FakeSandbox(reply), "f")()


# ---- tamper scan: forbidden library equivalents -----------------------------------------------------

@pytest.mark.parametrize("source, flagged", [
    ("import scipy.sparse as sp\ndef csr_matvec(A, x):\n    return sp.csr_matrix(A.to_dense()) @ x", "scipy.sparse"),
    ("from scipy.sparse import csr_matrix\ny = csr_matrix", "scipy.sparse"),
    ("import scipy\ny = scipy.sparse.coo_matrix", "scipy.sparse"),
    ("import importlib\nsp = importlib.import_module('scipy.sparse')", "scipy.sparse"),
    ("def coo_to_csr(A):\n    return t.to_sparse_csr()", "torch.Tensor.to_sparse_csr"),
    ("import torch\nx = torch.sparse_csr_tensor", "torch.sparse_csr_tensor"),
])
def test_forbidden_library_equivalents_are_flagged(source, flagged):
    reasons = grading.forbidden_uses(source, {t.function: t.forbids for t in A01.tasks})
    assert any(flagged in r for r in reasons), reasons


def test_kl_div_is_flagged_for_the_kd_loss_task():
    tasks = {t.function: t.forbids for t in all_assignments()["ex05_distill"].tasks}
    for source in ("import torch.nn.functional as F\ndef kd_loss(s, t, T):\n    return F.kl_div(s, t)",
                   "from torch.nn.functional import kl_div as k\nk", "from torch import nn\nnn.KLDivLoss()"):
        assert any("kd_loss forbids" in r for r in grading.forbidden_uses(source, tasks)), source


@pytest.mark.parametrize("name", list(all_assignments()))
def test_reference_answers_use_no_forbidden_equivalent(name):
    assignment = all_assignments()[name]
    nb = nbformat.read(notebook_path(assignment), as_version=4)
    assert not [r for r in grading.tamper_scan(nb, assignment) if "forbids" in r]


def test_student_code_is_parsed_under_one_lock(monkeypatch):
    """CPython 3.11's parser is not thread-safe for large inputs: two threads must never parse at once."""
    real, overlaps, inside = ast.parse, [], threading.Semaphore(1)

    def watched(source, *args, **kwargs):
        if not inside.acquire(blocking=False):
            overlaps.append(1)
            return real(source, *args, **kwargs)
        try:
            time.sleep(0.01)
            return real(source, *args, **kwargs)
        finally:
            inside.release()

    monkeypatch.setattr(ast, "parse", watched)
    big = "".join(f"x{i} = ({i} + 1) * 2\n" for i in range(2_000))
    threads = [threading.Thread(target=grading.parse_source, args=(big,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps


# ---- grader faults: retried once, then `grader_error` ---------------------------------------------------

def test_a_grader_fault_is_retried_once_then_named(monkeypatch, tmp_path):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise KeyError("boom")

    monkeypatch.setattr(grading, "_grade_once", broken)
    result = grading.grade_notebook(tmp_path / "x.ipynb", A01)
    assert len(calls) == 2 and result.status == "grader_error"
    assert "KeyError" in result.reason and "boom" in result.reason and result.score == 0
    assert set(result.items) == {A01.grade_id(t.function) for t in A01.tasks}

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("transient")
        return Result("graded", "", grading._empty_items(A01, "passed", ""))

    monkeypatch.setattr(grading, "_grade_once", flaky)
    result = grading.grade_notebook(tmp_path / "x.ipynb", A01)
    assert result.status == "graded" and any("transient" in e for e in result.cell_errors)


# ---- the instructor side without a sandbox run --------------------------------------------------------

@pytest.fixture(scope="module")
def course(tmp_path_factory):
    course = tmp_path_factory.mktemp("course")
    config = (ROOT / "exercises" / "nbgrader_config.py").read_text()
    (course / "nbgrader_config.py").write_text(config + '\nc.LateSubmissionPlugin.penalty_method = "zero"\n')
    shutil.copytree(ROOT / "exercises" / "source" / NAME, course / "source" / NAME)
    done = cli._nbgrader(course, "generate_assignment", NAME, "--force")
    assert done.returncode == 0, done.stderr
    return course


@pytest.mark.slow
def test_empty_unreleased_and_unisolated_cohorts_are_errors(course, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="is empty"):
        cli.grade(NAME, tmp_path / "empty", course=course, no_sandbox=True)
    (tmp_path / "other" / "alice" / "ex02_memory").mkdir(parents=True)
    with pytest.raises(SystemExit, match="wrong assignment or folder"):
        cli.grade(NAME, tmp_path / "other", course=course, no_sandbox=True)
    (tmp_path / "unreleased").mkdir()
    with pytest.raises(SystemExit, match="never released"):
        cli.grade(NAME, tmp_path / "other", course=tmp_path / "unreleased", no_sandbox=True)
    import autograder.sandbox
    monkeypatch.setattr(autograder.sandbox, "isolation_available", lambda: (False, "no namespaces here"))
    with pytest.raises(SystemExit, match="--no-sandbox"):
        cli.grade(NAME, tmp_path / "other", course=course)


@pytest.mark.slow
def test_gradebook_records_grades_comments_timestamps_and_late_penalties(course, tmp_path):
    from nbgrader.api import Gradebook
    with Gradebook(cli.gradebook_url(course)) as gb:
        gb.update_or_create_assignment(NAME, duedate=datetime(2026, 1, 10, 12, 0))
    folder = tmp_path / "late" / NAME
    folder.mkdir(parents=True)
    (folder / "timestamp.txt").write_text("2026-01-11 12:00:00.000000 UTC")
    when = cli.submission_time(folder, None)
    assert when == datetime(2026, 1, 11, 12, 0)
    items = grading._empty_items(A01, "passed", "")
    items["ex01_csr_matvec"].update(score=0, status="failed", message="csr_matvec, hidden case 'empty rows': wrong")
    for gid, item in items.items():
        if item["status"] == "passed":
            item["score"] = item["max_score"]
    result = Result("graded", "", items, tamper_suspected=True, tamper_reasons=["cell 3: uses scipy.sparse"])
    cli.record_in_gradebook(course, A01, "latecomer", result, when)
    cli.record_in_gradebook(course, A01, "ontime", result, datetime(2026, 1, 9))
    with Gradebook(cli.gradebook_url(course)) as gb:
        late = gb.find_submission(NAME, "latecomer")
        assert late.timestamp == when and late.total_seconds_late == 86400
        assert not late.needs_manual_grade and late.score == 10 and late.max_score == 13
        assert late.late_submission_penalty == 10           # the course's "zero" policy
        grade = gb.find_grade("ex01_csr_matvec", NAME, NAME, "latecomer")
        assert grade.auto_score == 0 and not grade.needs_manual_grade
        comment = gb.find_comment("ex01_csr_matvec_solution", NAME, NAME, "latecomer")
        assert "hidden case 'empty rows'" in comment.auto_comment
        assert gb.find_submission_notebook(NAME, NAME, "latecomer").flagged
        ontime = gb.find_submission(NAME, "ontime")
        assert ontime.total_seconds_late == 0 and not ontime.late_submission_penalty
    export = cli._nbgrader(course, "export", "--to", str(tmp_path / "grades.csv"))
    assert export.returncode == 0, export.stderr
    rows = (tmp_path / "grades.csv").read_text().splitlines()
    row = next(r for r in rows if ",latecomer," in r)
    # due, submitted, student, ..., raw score, late penalty, score, max score
    assert row.startswith(f"{NAME},2026-01-10 12:00:00,2026-01-11 12:00:00,latecomer,")
    assert row.endswith(",10.0,10.0,0.0,13.0")


def test_submission_time_falls_back_to_the_file_time(tmp_path):
    nb = _write(tmp_path / f"{NAME}.ipynb", "{}")
    os.utime(nb, (1_700_000_000, 1_700_000_000))
    (tmp_path / "timestamp.txt").write_text("not a date")
    assert cli.submission_time(tmp_path, nb) == datetime(2023, 11, 14, 22, 13, 20)


def test_feedback_shows_code_scores_links_and_reads_on_a_phone():
    items = grading._empty_items(A01, "passed", "")
    items["ex01_csr_matvec"].update(message="csr_matvec(…) [case '3x4']: result has wrong values <b>",
                                    status="failed")
    result = Result("graded", "", items, code={"ex01_csr_matvec": "def csr_matvec(A, x):\n    return x < 1"})
    graded = datetime(2026, 3, 1, 9, 30)
    page = feedback.to_html("alice", NAME, result, submitted_at=datetime(2026, 3, 1, 8, 0), graded_at=graded)
    assert 'name="viewport"' in page and "overflow-x: auto" in page
    assert "return x &lt; 1" in page and "wrong values &lt;b&gt;" in page and "values <b>" not in page
    from docutils.nodes import make_id
    chapter = (ROOT / "book" / "01-sparse-storage" / "index.md").read_text().splitlines()
    sections = {make_id(line.lstrip("#").strip()) for line in chapter if line.startswith("## ")}
    anchor = page.split("01-sparse-storage/index.html#", 1)[1].split('"', 1)[0]
    assert anchor in sections - {"interview-questions"}   # the chapter's section about SpMV
    assert "2026-03-01 09:30 UTC" in page and "2026-03-01 08:00 UTC" in page
    text = feedback.markdown("alice", NAME, result, graded_at=graded)
    assert "```python\ndef csr_matvec(A, x):\n    return x < 1\n```" in text and "2026-03-01 09:30 UTC" in text


def test_csv_fields_cannot_be_formulas_or_rows():
    assert cli._csv_field("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert "\n" not in cli._csv_field("a\nstudent,graded,13") and cli._csv_field("-1.5") == "-1.5"


@pytest.mark.slow
def test_grade_works_without_the_venv_on_path(course, tmp_path):
    """nbgrader creates a new gradebook by running `alembic` by name: the venv's bin must not be required."""
    incoming = tmp_path / "incoming"
    (incoming / "bob" / NAME).mkdir(parents=True)  # submitted nothing: no sandbox run needed
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH="/usr/bin:/bin", LLMSPACE_GRADEBOOK_URL=f"sqlite:///{tmp_path}/fresh.db",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "solutions")]))
    out = subprocess.run([sys.executable, "-m", "autograder", "grade", NAME, str(incoming), "--course", str(course),
                          "--csv", str(tmp_path / "g.csv"), "--no-sandbox"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "g.json").read_text())["bob"]["status"] == "missing"
    from nbgrader.api import Gradebook
    with Gradebook(f"sqlite:///{tmp_path}/fresh.db") as gb:
        assert gb.find_submission(NAME, "bob").score == 0


# ---- the real sandbox -----------------------------------------------------------------------------------

STOP_READING = """\
import gc, time
worker = next(f.__globals__ for f in gc.get_objects()  # the worker module's namespace
              if callable(f) and getattr(f, "__name__", "") == "read_frame" and "write_frame" in f.__globals__)
worker["read_frame"] = lambda fd: time.sleep(3600)
"""


@pytest.mark.slow
def test_a_worker_that_stops_reading_cannot_block_the_grader():
    limits = Limits(cell_seconds=5, call_seconds=5, notebook_seconds=60)
    outcome = []

    def run():  # in a thread, so that a blocking write fails this test instead of hanging it
        try:
            with Sandbox(limits) as sandbox:
                sandbox.run_cell(STOP_READING)
                sandbox.run_cell("x = 1\n" + "# padding\n" * 50_000)   # 500 KB: more than a pipe holds
        except SandboxGone as gone:
            outcome.append(gone)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(90)
    assert not thread.is_alive(), "the grader blocked writing to a worker that stopped reading"
    assert outcome and outcome[0].status == "timeout" and "stopped reading" in outcome[0].reason
    assert time.monotonic() - start < 60


def _release_nb(course: Path) -> dict:
    return json.loads((course / "release" / NAME / f"{NAME}.ipynb").read_text())


def _with_cell(nb: dict, index: int, source: str) -> dict:
    nb = copy.deepcopy(nb)
    nb["cells"].insert(index, nbformat.v4.new_code_cell(source))
    return json.loads(nbformat.writes(nbformat.from_dict(nb)))


@pytest.fixture(scope="module")
def batch(course, tmp_path_factory):
    """One batch, --workers 2: attacks on the grader next to blank (honest, unanswered) submissions."""
    release = _release_nb(course)
    incoming = tmp_path_factory.mktemp("incoming")
    hostile = ("def csr_matvec(A, x):\n    raise ValueError('\\udce9" + CONTROL.encode("unicode_escape").decode()
               + "\\nalice  graded  13/13')\n")
    big = "".join(f"v{i} = {i}\n" for i in range(60_000))   # two large notebooks parsed at once (ast lock)
    notebooks = {
        "big_a": _with_cell(_with_cell(release, 19, hostile), 2, big),
        "big_b": _with_cell(release, 2, big),
        "huge_reply": _with_cell(release, 4, "import sys\nsys.modules['codec'].encode = "
                                            "lambda obj, depth=0, budget=None: [[]] * 2_000_000\n"
                                            "def sparse_matrix_add(A, B):\n    return {}"),
        "malformed_reply": _with_cell(release, 2, "import os, sys\nmsg = b'{\"ok\": false, \"error\": \"x\"}'\n"
                                                  "os.write(int(sys.argv[2]), len(msg).to_bytes(4, 'big') + msg)"),
        "null_meta": _mutate(lambda nb: nb["cells"][3]["metadata"].update(nbgrader=None)),
        "list_meta": _mutate(lambda nb: nb["cells"][4]["metadata"]["nbgrader"].update(grade_id=[1])),
        "deep": '{"nbformat": 4, "cells": [' + "[" * 100_000 + "]" * 100_000 + "]}",
    }
    for student, nb in notebooks.items():
        _write(incoming / student / NAME / f"{NAME}.ipynb", nb)
    _write(incoming / "big_b\n" / NAME / f"{NAME}.ipynb", release)         # not a second "big_b"
    os.makedirs(os.fsencode(incoming) + b"/caf\xe9/" + NAME.encode())       # not UTF-8
    badname = os.fsencode(incoming / "badname" / NAME)
    os.makedirs(badname)
    Path(os.fsdecode(badname + b"/ex01_sparse\xff\x1b[2J.ipynb")).write_text("{}")  # a near-miss, not UTF-8
    out = tmp_path_factory.mktemp("out")
    limits = Limits(cell_seconds=60, call_seconds=60, notebook_seconds=240)
    start = time.monotonic()
    results = cli.grade(NAME, incoming, out / "g.csv", out / "g.json", course=course, workers=2, limits=limits,
                        no_sandbox=not ISOLATED)
    return results, out, time.monotonic() - start


@pytest.mark.slow
def test_no_student_ends_or_skews_the_batch(batch, course):
    results, out, seconds = batch
    status = {k: r["status"] for k, r in results.items()}
    assert status["big_b"] == status["big_a"] == "graded"    # blank answers, a large extra cell each
    assert results["big_b"]["score"] == 0 and results["big_b"]["max_score"] == 13
    assert status["huge_reply"] == "resource_exceeded" and "elements" in results["huge_reply"]["reason"]
    assert status["malformed_reply"] == "kernel_died" and "malformed" in results["malformed_reply"]["reason"]
    for student in ("null_meta", "list_meta", "deep"):
        assert status[student] == "invalid" and results[student]["reason"], student
    weird = [k for k in results if k.startswith("<invalid folder name")]
    assert len(weird) == 2 and all(results[k]["status"] == "invalid" for k in weird)
    assert any("\\x0a" in k for k in weird) and any("\ufffd" in k for k in weird)
    assert status["badname"] == "missing" and "\ufffd\\x1b[2J" in results["badname"]["reason"]
    assert len(results) == 10 and seconds < 600


@pytest.mark.slow
def test_outputs_are_sanitised_and_complete(batch, course):
    results, out, _ = batch
    message = results["big_a"]["details"]["ex01_csr_matvec"]["message"]
    assert "\x1b" not in message and "\\x1b[2J" in message and "\ufffd" in message
    text = (out / "g.csv").read_text(encoding="utf-8")
    assert "\x1b" not in text and "\r" not in text.replace("\r\n", "\n")
    rows = [r for r in text.splitlines()[1:] if r]
    assert len(rows) == len(results) == 10          # one line per entry: no row drawn by a message
    assert set(json.loads((out / "g.json").read_text())) == set(results)
    page = (course / "feedback" / "big_a" / NAME / f"{NAME}.html").read_text(encoding="utf-8")
    assert "\x1b" not in page and "def csr_matvec" in page
    from nbgrader.api import Gradebook
    with Gradebook(cli.gradebook_url(course)) as gb:
        ids = {s.id for s in gb.students}
    ran = {k for k in results if not k.startswith("<")}
    assert ran <= ids and not any(i.startswith("big_b") and i != "big_b" for i in ids)


@pytest.mark.slow
def test_ctrl_c_stops_grade_and_writes_what_it_has(course, tmp_path):
    incoming = tmp_path / "incoming"
    (incoming / "a_missing" / NAME).mkdir(parents=True)
    _write(incoming / "z_hangs" / NAME / f"{NAME}.ipynb", _with_cell(_release_nb(course), 2, "while True:\n    pass"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "solutions")]))
    command = [sys.executable, "-m", "autograder", "grade", NAME, str(incoming), "--course", str(course),
               "--workers", "1", "--csv", str(tmp_path / "g.csv")] + ([] if ISOLATED else ["--no-sandbox"])
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not _sandbox_started(proc.pid):
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"grade did not stop within 60 s of Ctrl-C:\n{err[-3000:]}")
    assert time.monotonic() - stopped < 30
    assert proc.returncode == 130, err[-2000:]
    data = json.loads((tmp_path / "g.json").read_text())
    assert set(data) == {"a_missing"} and data["a_missing"]["status"] == "missing"
    assert "a_missing" in (tmp_path / "g.csv").read_text() and "z_hangs" not in (tmp_path / "g.csv").read_text()


def _sandbox_started(pid: int) -> bool:
    """Whether the grader process ``pid`` has started a sandbox (a child running the worker)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.py" in cmdline or b"unshare" in cmdline or b"bwrap" in cmdline:
                return True
    return False


def test_grade_notebook_turns_bad_metadata_into_invalid(tmp_path):
    nb = _mutate(lambda nb: nb["cells"][3]["metadata"].update(nbgrader=None))
    result = grading.grade_notebook(_write(tmp_path / f"{NAME}.ipynb", nb), A01)
    assert result.status == "invalid" and "nbgrader metadata is null" in result.reason
    assert result.score == 0 and result.max_score == 13

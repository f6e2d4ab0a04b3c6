"""The adversarial corpus (autograder/fixtures/adversarial.py) graded in one batch, as CI's root user,
with the full sandbox: every case ends with its expected status, score and named limit, honest students
interleaved with the attacks keep full marks, nothing reaches the network or a host unix socket, and
afterwards no process, file, SysV IPC object, mount, cgroup or staging directory survives.

Beside the batch, the sandbox is attacked directly where order matters: the next notebook in the same
slot, leftovers planted on the host for a slot user, and a grader killed with SIGKILL mid-notebook.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path

import nbformat
import pytest

from autograder import cli
from autograder import sandbox as sbx
from autograder.fixtures.adversarial import CASES, FULL, NAME
from autograder.sandbox import (SLOTS_USED, WORLD_WRITABLE, Limits, Sandbox, _Cgroup, ipc_objects_of,
                                isolation, isolation_available, leftover_processes, leftovers)
from autograder.sync import notebook_path

ROOT = Path(__file__).resolve().parents[1]
ISOLATED, WHY = isolation_available()
FULL_SANDBOX = ISOLATED and isolation().mode == "root"
slow = pytest.mark.slow
needs_root = pytest.mark.skipif(not FULL_SANDBOX and not os.environ.get("CI"),
                                reason=f"full sandbox unavailable here ({WHY or 'not root'}); CI runs it as root")
# Generous enough for honest work on a loaded 2-core machine; the attacks run forever, so any limit catches them.
LIMITS = Limits(cell_seconds=20, call_seconds=20, notebook_seconds=180, cpu_seconds=300,
                resident_bytes=1 * 2**30, tmp_bytes=64 * 2**20, processes=32)  # an idle sandbox: 4 processes
MEMORY_CHUNKS = 24  # 24 x 64 MiB = 1.5 GiB > resident_bytes
HONEST = [f"honest_{i:02d}" for i in range(4)]
TAG = uuid.uuid4().hex[:12]


def _mounts() -> set:
    return set(Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture(scope="module")
def listener():
    """A loopback server the 'network' case tries to reach; it must never see a connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    seen, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                seen.append(conn.recv(100))
                conn.close()
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    server.close()


@pytest.fixture(scope="module")
def host_traps():
    """What a notebook must not reach on the host: two other copies of the course (world-readable, under
    /tmp and /opt), a unix socket file any user may connect to, and an abstract unix socket."""
    copies, made = [], []
    for base in (Path("/tmp"), Path("/opt")):
        top = base / f"llmspace-copy-{TAG}"
        try:
            (top / "solutions" / "llmspace").mkdir(parents=True)
        except OSError:
            continue
        made.append(top)
        shutil.copy(ROOT / "solutions" / "llmspace" / "sparse.py", top / "solutions" / "llmspace" / "sparse.py")
        nb_dir = top / "exercises" / "source" / NAME
        nb_dir.mkdir(parents=True)
        shutil.copy(notebook_path(cli.all_assignments()[NAME]), nb_dir / f"{NAME}.ipynb")
        for p in [top, *top.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        copies += [top / "solutions" / "llmspace" / "sparse.py", nb_dir / f"{NAME}.ipynb"]
    sock_dir = Path(f"/tmp/llmspace-sock-{TAG}")
    sock_dir.mkdir(mode=0o777)
    os.chmod(sock_dir, 0o777)
    servers, seen, stop = [], [], threading.Event()
    for address in (str(sock_dir / "s"), f"\0llmspace-test-{TAG}"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(address)
        if not address.startswith("\0"):
            os.chmod(address, 0o777)
        s.listen(8)
        s.settimeout(0.2)
        servers.append(s)

    def accept():
        while not stop.is_set():
            for s in servers:
                try:
                    conn, _ = s.accept()
                    seen.append(conn.recv(100))
                    conn.close()
                except OSError:
                    pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield {"course_copies": copies, "unix_sockets": [sock_dir / "s"], "abstract_socket": f"\0llmspace-test-{TAG}",
           "seen": seen}
    stop.set()
    for s in servers:
        s.close()
    shutil.rmtree(sock_dir, ignore_errors=True)
    for top in made:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def graded(tmp_path_factory, listener, host_traps):
    assert FULL_SANDBOX, f"CI must run the full sandbox: {WHY or isolation()}"
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "exercises" / "source", course / "source")
    done = cli._nbgrader(course, "generate_assignment", NAME, "--force")
    assert done.returncode == 0, done.stderr
    source = nbformat.read(notebook_path(cli.all_assignments()[NAME]), as_version=4)
    release = nbformat.read(course / "release" / NAME / f"{NAME}.ipynb", as_version=4)
    context = {"source_notebook": notebook_path(cli.all_assignments()[NAME]),
               "library": ROOT / "solutions" / "llmspace" / "sparse.py", "port": listener[0],
               "tag": TAG, "ipc_key": int(TAG[:7], 16), "memory_chunks": MEMORY_CHUNKS, **host_traps}
    incoming = tmp_path_factory.mktemp("incoming")

    def put(student, content, filename=f"{NAME}.ipynb"):
        folder = incoming / student / NAME
        folder.mkdir(parents=True)
        if isinstance(content, bytes):
            (folder / filename).write_bytes(content)
        else:
            nbformat.write(content, folder / filename)

    for i, case in enumerate(CASES):
        put(case.name, case.build(source, release, context))
        if i % 12 == 0:
            put(HONEST[i // 12], source)
    put("wrong_file_name", source, f"{NAME} (1).ipynb")
    (incoming / "symlinked_student").symlink_to(course)
    out = tmp_path_factory.mktemp("out")
    mounts_before = _mounts()
    poison_before = {p for p in Path(sys.prefix).rglob("sitecustomize.py")}
    results = cli.grade(NAME, incoming, out / "grades.csv", out / "grades.json", course=course, workers=2,
                        limits=LIMITS, isolate=True)
    return {"results": results, "course": course, "context": context, "mounts_before": mounts_before,
            "poison_before": poison_before}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@slow
@needs_root
def test_case(graded, case):
    r = graded["results"][case.name]
    if case.status is not None:
        assert r["status"] == case.status, r
    assert r["score"] == case.score, r
    assert r["max_score"] == FULL
    assert r["reason"].startswith(case.reason), r
    if case.tamper is not None:
        assert r["tamper_suspected"] == case.tamper, r["tamper_reasons"]
    assert r["status"] in ("graded", "invalid", "missing", "timeout", "kernel_died", "resource_exceeded",
                           "grader_error")


@pytest.mark.usefixtures("graded")
class TestBatch:
    pytestmark = [slow, needs_root]

    def test_honest_students_are_unaffected(self, graded):
        for student in HONEST:
            r = graded["results"][student]
            assert r["status"] == "graded" and r["score"] == FULL, r

    def test_file_and_folder_problems(self, graded):
        results = graded["results"]
        assert results["wrong_file_name"]["status"] == "missing"
        assert "rename 'ex01_sparse (1).ipynb' to 'ex01_sparse.ipynb'" in results["wrong_file_name"]["reason"]
        assert results["symlinked_student"]["status"] == "invalid"

    def test_nothing_reached_the_network_or_a_host_socket(self, listener, host_traps):
        assert listener[1] == []
        assert host_traps["seen"] == []

    def test_no_process_file_ipc_object_or_state_survives(self):
        """Audited per slot under the slot's lock: other graders (other test workers) may be busy in other
        slots, but anything of a slot's user while nobody holds the slot outlived its notebook."""
        assert SLOTS_USED
        for slot in sorted(SLOTS_USED):
            assert leftovers(slot) == {"processes": [], "files": [], "ipc": [], "state": [], "stages": []}, slot
            assert leftover_processes(slot) == []

    def test_no_marker_shm_or_poison_survives(self, graded):
        tag = graded["context"]["tag"]
        places = [*WORLD_WRITABLE, "/run", "/var/run/postgresql", "/opt", "/home", "/root", "/srv", "/etc",
                  "/usr/local", "/", str(Path.home())]
        for place in places:
            for name in (f"llmspace-leak-{tag}", f"answers-{tag}.py"):
                assert not os.path.lexists(os.path.join(place, name)), os.path.join(place, name)
        shm = Path("/proc/sysvipc/shm").read_text().split("\n")[1:]
        assert not [line for line in shm if line.split() and int(line.split()[0]) == graded["context"]["ipc_key"]]
        assert not list(Path(sys.prefix).rglob(f"llmspace_poison_{tag}.pth"))
        assert set(Path(sys.prefix).rglob("sitecustomize.py")) == graded["poison_before"]

    def test_no_mount_or_cgroup_survives(self, graded):
        assert _mounts() - graded["mounts_before"] == set()
        base = _Cgroup._base or {}
        for key, path in base.items():
            if key != "version":
                assert not list(Path(path).glob(f"slot*-{os.getpid()}-*")), path

    def test_every_student_is_in_the_gradebook(self, graded):
        from nbgrader.api import Gradebook
        with Gradebook(cli.gradebook_url(graded["course"])) as gb:
            for student, r in graded["results"].items():
                if student != "symlinked_student":
                    assert gb.find_submission(NAME, student).score == r["score"]


# ---- the sandbox attacked directly --------------------------------------------------------------------

def _free_slot() -> int:
    """A slot no test worker is likely to use (the batch uses the lowest ones)."""
    return 20 + os.getpid() % 10


@pytest.mark.skipif(not FULL_SANDBOX, reason=f"needs root and bubblewrap ({WHY or 'not root'})")
def test_next_student_in_the_same_slot_finds_nothing():
    key = int(TAG[:7], 16) + 1
    with Sandbox(LIMITS, slot=_free_slot(), isolate=True) as first:
        slot = first.slot
        reply = first.run_cell(textwrap.dedent(f"""\
            import ctypes, ctypes.util, os, time
            for folder in ["/tmp", "/dev/shm", os.path.expanduser("~"), os.getcwd()]:
                open(os.path.join(folder, "left-{TAG}"), "w").write("answers")
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            assert libc.shmget({key}, 4096, 0o1666) >= 0
            if os.fork() == 0:
                os.setsid()
                while True:
                    time.sleep(0.1)
            """))
        assert reply["ok"], reply
    with Sandbox(LIMITS, slot=slot, isolate=True) as second:
        assert second.slot == slot
        reply = second.run_cell(textwrap.dedent(f"""\
            import ctypes, ctypes.util, os
            found = [f for f in ["/tmp", "/dev/shm", os.path.expanduser("~"), os.getcwd()]
                     if os.path.exists(os.path.join(f, "left-{TAG}"))]
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]
            print(found, libc.shmget({key}, 4096, 0o666), others)
            """))
        assert reply["ok"] and reply["output"].strip() == "[] -1 []", reply
    assert leftovers(slot) == {"processes": [], "files": [], "ipc": [], "state": [], "stages": []}


@pytest.mark.skipif(not FULL_SANDBOX, reason=f"needs root and bubblewrap ({WHY or 'not root'})")
def test_slot_leftovers_are_removed_when_the_slot_is_taken():
    """A slot user's process, files in /var/tmp, /dev/shm and /tmp and a SysV segment on the host (as an
    older grader or a killed one could leave them) are gone before the next notebook in that slot starts."""
    slot = _free_slot()
    uid, gid = sbx._slot_user(slot)
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    planted = [f"/var/tmp/planted-{TAG}", f"/dev/shm/planted-{TAG}", f"/tmp/planted-{TAG}"]
    subprocess.run([*as_user, "sh", "-c", "touch " + " ".join(planted) + "; ipcmk -M 4096 >/dev/null; "
                    "setsid sleep 600 </dev/null >/dev/null 2>&1 &"], check=True)
    time.sleep(0.2)
    assert sbx.processes_of(uid) and all(os.path.exists(p) for p in planted) and ipc_objects_of(uid)
    with Sandbox(LIMITS, slot=slot, isolate=True) as sb:
        assert sb.slot == slot
        assert sbx.processes_of(uid) and sb.run_cell("pass")["ok"]  # only the sandbox's own processes now
        assert not any(os.path.exists(p) for p in planted) and ipc_objects_of(uid) == []
    assert leftovers(slot) == {"processes": [], "files": [], "ipc": [], "state": [], "stages": []}


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@slow
@pytest.mark.skipif(not FULL_SANDBOX, reason=f"needs root and bubblewrap ({WHY or 'not root'})")
def test_killing_a_hung_grade_kills_its_notebooks(tmp_path):
    """SIGKILL to ``python -m autograder grade`` while two notebooks hang (one with a detached daemon):
    bubblewrap's --die-with-parent ends both sandboxes, across the change to the slot users, so no process
    of theirs survives; the next taker of each slot removes the stale cgroup and staging directory."""
    import pwd
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(ROOT / "exercises" / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "exercises" / "source", course / "source")
    # `grade` refuses an assignment that was never released: a released copy, as nbgrader writes it
    (course / "release" / NAME).mkdir(parents=True)
    shutil.copy(notebook_path(cli.all_assignments()[NAME]), course / "release" / NAME / f"{NAME}.ipynb")
    source = nbformat.read(notebook_path(cli.all_assignments()[NAME]), as_version=4)
    hang = nbformat.v4.new_code_cell("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                                     "    while True:\n        time.sleep(0.1)\nwhile True:\n    pass")
    source.cells.insert(2, hang)
    for student in ("hung_a", "hung_b"):
        (tmp_path / "in" / student / NAME).mkdir(parents=True)
        nbformat.write(source, tmp_path / "in" / student / NAME / f"{NAME}.ipynb")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    grader = subprocess.Popen([sys.executable, "-m", "autograder", "grade", NAME, str(tmp_path / "in"),
                               "--course", str(course), "--workers", "2", "--csv", str(tmp_path / "g.csv")],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:  # both notebooks running: a worker and its daemon each
            tree = _descendants(grader.pid)
            uids = {os.stat(f"/proc/{p}").st_uid for p in tree if os.path.exists(f"/proc/{p}")} - {0}
            if len(uids) == 2 and all(len(sbx.processes_of(u)) >= 2 for u in uids):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the two notebooks never started")
        time.sleep(0.5)
    finally:
        grader.kill()
        grader.wait()
    end = time.monotonic() + 10
    while any(sbx.processes_of(u) for u in uids) and time.monotonic() < end:
        time.sleep(0.05)
    assert {u: sbx.processes_of(u) for u in uids} == {u: [] for u in uids}
    for uid in uids:
        slot = int(pwd.getpwuid(uid).pw_name.rsplit("-", 1)[1])
        stale = leftovers(slot)
        assert stale["state"] and stale["stages"], stale  # the killed grader could not clean up
        _take(slot)
        assert leftovers(slot) == {"processes": [], "files": [], "ipc": [], "state": [], "stages": []}


def _take(slot: int, wait: float = 60.0) -> None:
    """Run an empty notebook in exactly this slot (on a shared machine another grader may hold it)."""
    end = time.monotonic() + wait
    while True:
        with Sandbox(LIMITS, slot=slot, isolate=True) as sb:
            if sb.slot == slot:
                return
        assert time.monotonic() < end, f"slot {slot} stayed busy"
        time.sleep(0.2)


@pytest.mark.skipif(not FULL_SANDBOX, reason=f"needs root and bubblewrap ({WHY or 'not root'})")
def test_user_namespace_mode_isolates_too(monkeypatch, tmp_path):
    """The learner's mode (bubblewrap in an unprivileged user namespace, no slot user, no cgroup), forced
    here as root: same allow-list root, network, IPC and PID isolation."""
    iso = isolation()
    monkeypatch.setattr(sbx, "isolation", lambda: sbx.Isolation("user", "forced by the test", None,
                                                                  iso.disable_userns))
    copy = tmp_path / "course-copy.txt"
    copy.write_text("answers")
    os.chmod(tmp_path, 0o755)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with Sandbox(LIMITS, isolate=True) as sb:
            reply = sb.run_cell(textwrap.dedent(f"""\
                import os, socket
                print(os.path.exists({str(copy)!r}), os.path.exists("/var/tmp"), os.path.exists("/home"),
                      len([p for p in os.listdir("/proc") if p.isdigit()]) <= 3)
                try:
                    socket.create_connection(("1.1.1.1", 53), timeout=1)
                    print("online")
                except OSError:
                    print("offline")
                """))
    assert reply["ok"] and reply["output"].split() == ["False", "False", "False", "True", "offline"], reply


def test_degraded_mode_says_so_once(monkeypatch):
    """Where neither root nor user namespaces allow bubblewrap, the grader warns once and still grades."""
    monkeypatch.setattr(sbx, "isolation", lambda: sbx.Isolation(None, "no bwrap (test)", None))
    monkeypatch.setattr(sbx, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            Sandbox(LIMITS)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "sandbox degraded (no bwrap (test))" in messages[0]
    with pytest.raises(RuntimeError, match="isolation requested but unavailable"):
        Sandbox(LIMITS, isolate=True)


"""Run untrusted notebook code in a sandbox and talk to it over pipes.

A :class:`Sandbox` is one student notebook's worker process (:mod:`autograder.worker`). Isolation, when the
grader runs as root on Linux with ``unshare`` and ``setpriv`` (CI does):

* **user** — a dedicated unprivileged user per parallel slot (``llmspace-sbx-N``, created on demand);
* **network** — a new network namespace with only a down loopback: no connection leaves;
* **processes** — a new PID namespace (``--kill-child``): when the worker or its namespace init dies,
  every process the notebook started dies with it, detached ones included; RLIMIT_NPROC caps fork bombs;
* **files** — a new mount namespace where the repository (reference library, instructor notebooks,
  gradebook), the grader's staging area (other students' files), ``/root`` and ``/home`` are covered by
  empty tmpfs mounts; the virtual environment and the Python installation are re-exposed read-only; the
  worker gets a size-capped tmpfs of its own as working directory, HOME and TMPDIR;
* **resources** — RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_CPU, RLIMIT_NPROC, and a
  wall-clock deadline per cell and per call enforced from outside with SIGKILL.

The library inside the sandbox is the *student* version of ``llmspace`` (solution regions replaced by
``raise NotImplementedError()``), so importing the answers is impossible. Without root or namespaces the
grader says so once and degrades explicitly: resource limits, a process group killed at the end, a
private working directory — but no network or filesystem isolation.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "solutions" / "llmspace"
MAX_REPLY_BYTES = 256 * 2**20
SLOT_DIR = Path("/run/llmspace-sandbox")  # one lock file per slot: slot N runs as user llmspace-sbx-N
MAX_SLOTS = 32
SLOTS_USED: set[int] = set()  # slots this process has run notebooks in (for audits and tests)
_SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*\n", re.M | re.S)


@dataclass
class Limits:
    memory_bytes: int = 6 * 2**30      # RLIMIT_AS: torch + numpy reserve a lot of address space
    file_bytes: int = 64 * 2**20       # RLIMIT_FSIZE: largest file the notebook may write
    cpu_seconds: int = 900             # RLIMIT_CPU for the whole notebook
    processes: int = 64                # RLIMIT_NPROC for the slot's user
    workdir_bytes: int = 512 * 2**20   # tmpfs size of the working directory
    cell_seconds: float = 120.0        # wall clock per cell
    call_seconds: float = 60.0         # wall clock per graded function call
    notebook_seconds: float = 600.0    # wall clock for everything


class SandboxGone(BaseException):
    """The worker is dead or was killed (BaseException: a check's ``except Exception`` must not eat it)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def student_library(dest: Path) -> Path:
    """Copy llmspace with every solution region replaced by ``raise NotImplementedError()``."""
    target = dest / "llmspace"
    shutil.copytree(_stripped_library(), target)
    return target


@functools.lru_cache(maxsize=None)
def _stripped_library() -> Path:
    """Built once per grader process (the library does not change during a run)."""
    target = Path(tempfile.mkdtemp(prefix="llmspace-lib-")) / "llmspace"
    shutil.copytree(LIBRARY, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text()
        stripped = _SOLUTION.sub(lambda m: f"{m.group(1)}raise NotImplementedError()\n", text)
        if stripped != text:
            path.write_text(stripped)
    return target


_warned = False


@functools.lru_cache(maxsize=None)
def isolation_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not running as root"
    for tool in ("unshare", "setpriv", "useradd", "mount"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found"
    probe = subprocess.run(["unshare", "--mount", "--net", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        return False, f"unshare failed: {probe.stderr.decode(errors='replace').strip()}"
    return True, ""


def _slot_user(slot: int) -> tuple[int, int]:
    import pwd
    name = f"llmspace-sbx-{slot}"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "--user-group", name],
                       check=False, capture_output=True)
        entry = pwd.getpwnam(name)  # raises if useradd failed: the caller degrades
    return entry.pw_uid, entry.pw_gid


# Run as root inside the new mount/net/pid namespaces, then drop to the slot user.
_SETUP = r"""
set -eu
mount --make-rprivate /
mount -t tmpfs -o size="$WORKDIR_BYTES",mode=0755 llmspace-work /mnt
cp -a "$STAGE"/. /mnt/
chmod 0755 /mnt
mkdir -p /mnt/home /mnt/tmp
chown -R "$SBX_UID:$SBX_GID" /mnt/home /mnt/tmp /mnt/work
i=0
for keep in $KEEP; do mkdir -p "/mnt/.keep/$i"; mount --bind "$keep" "/mnt/.keep/$i"; i=$((i+1)); done
for hide in $HIDE; do [ -d "$hide" ] && mount -t tmpfs -o size=64k,mode=0755 llmspace-hidden "$hide"; done
mount -t tmpfs -o size=256m,mode=1777 llmspace-tmp /tmp
[ -d /dev/shm ] && mount -t tmpfs -o size=64m,mode=1777 llmspace-shm /dev/shm
# Re-expose what Python needs only now, so that no later mount (e.g. /tmp above) covers it again.
i=0
for keep in $KEEP; do
  mkdir -p "$keep"; mount --bind "/mnt/.keep/$i" "$keep"; mount -o remount,bind,ro "$keep"
  umount "/mnt/.keep/$i"; i=$((i+1))
done
rmdir /mnt/.keep/* /mnt/.keep 2>/dev/null || true
cd /mnt/work
exec setpriv --reuid="$SBX_UID" --regid="$SBX_GID" --clear-groups --no-new-privs --inh-caps=-all \
  --bounding-set=-all "$PYTHON" /mnt/worker.py "$CMD_FD" "$REPLY_FD"
"""


class Sandbox:
    """One worker process for one notebook. Use as a context manager."""

    def __init__(self, limits: Limits | None = None, slot: int = 0, hide: tuple[Path, ...] = (),
                 isolate: bool | None = None):
        self.limits = limits or Limits()
        self.slot, self.extra_hide = slot, tuple(Path(h) for h in hide)
        available, why = isolation_available() if isolate is not False else (False, "disabled")
        self.isolated = available if isolate is None else (isolate and available)
        if isolate and not available:
            raise RuntimeError(f"sandbox isolation requested but unavailable: {why}")
        if not self.isolated:
            global _warned
            if not _warned:
                warnings.warn(f"sandbox degraded ({why}): resource limits and process-group cleanup only; "
                              f"no network or filesystem isolation", RuntimeWarning, stacklevel=2)
                _warned = True
        self.proc = None
        self.deadline = time.monotonic() + self.limits.notebook_seconds
        self.resource_events: list[str] = []

    # ---- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self):
        try:
            return self._start()
        except BaseException:
            self.close()  # releases the slot lock and kills whatever started
            raise

    def _start(self):
        self.stage = Path(tempfile.mkdtemp(prefix="llmspace-stage-"))
        os.chmod(self.stage, 0o700)
        student_library(self.stage / "lib")
        for name in ("worker.py", "codec.py"):
            shutil.copy(Path(__file__).parent / name, self.stage / name)
        (self.stage / "work").mkdir()
        cmd_r, self.cmd_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TRITON_INTERPRET": "1", "PYTHONHASHSEED": "0"}
        self.uid = None
        if self.isolated:
            self.slot = self._acquire_slot()
            uid, gid = _slot_user(self.slot)
            self.uid = uid
            venv = Path(sys.prefix)
            keep = sorted({str(venv), str(Path(sys.base_prefix))})
            hide = sorted({str(ROOT), str(self.stage.parent), "/root", "/home",
                           *(str(h) for h in self.extra_hide)})
            env.update(HOME="/mnt/home", TMPDIR="/mnt/tmp", IPYTHONDIR="/mnt/home/.ipython",
                       MPLCONFIGDIR="/mnt/home/.mpl", PYTHONPATH="/mnt/lib:/mnt",
                       STAGE=str(self.stage), KEEP=" ".join(keep), HIDE=" ".join(hide),
                       SBX_UID=str(uid), SBX_GID=str(gid), PYTHON=sys.executable,
                       WORKDIR_BYTES=str(self.limits.workdir_bytes), CMD_FD=str(cmd_r), REPLY_FD=str(reply_w))
            args = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc",
                    "sh", "-c", _SETUP]
        else:
            home = self.stage / "work"
            env.update(HOME=str(home), TMPDIR=str(home), IPYTHONDIR=str(home / ".ipython"),
                       MPLCONFIGDIR=str(home / ".mpl"), PYTHONPATH=f"{self.stage / 'lib'}:{self.stage}")
            args = [sys.executable, str(self.stage / "worker.py"), str(cmd_r), str(reply_w)]
        log = open(self.stage / "worker.log", "wb")
        self.proc = subprocess.Popen(args, env=env, pass_fds=(cmd_r, reply_w), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True,
                                     cwd=str(self.stage / "work"), preexec_fn=self._limits_preexec)
        log.close()
        os.close(cmd_r)
        os.close(reply_w)
        hello = self._reply(min(60.0, self.limits.cell_seconds), "starting the notebook")
        if not hello.get("ready"):
            raise SandboxGone("kernel_died", "the sandbox did not start")
        return self

    def _limits_preexec(self):
        lim = self.limits
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_NPROC, (lim.processes, lim.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the PID namespace takes the rest with it
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.isolated and getattr(self, "uid", None) is not None:
            self._wait_until_gone(self.uid)
        if getattr(self, "_slot_fd", None) is not None:
            os.close(self._slot_fd)  # releases the slot's lock
            self._slot_fd = None
        for fd in (getattr(self, "cmd_w", None), getattr(self, "reply_r", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.cmd_w = self.reply_r = None
        if hasattr(self, "stage"):
            shutil.rmtree(self.stage, ignore_errors=True)

    def _acquire_slot(self) -> int:
        """A machine-wide exclusive slot (and so its user): graders in other processes use other slots."""
        import fcntl
        SLOT_DIR.mkdir(parents=True, exist_ok=True)
        for attempt in range(600):
            for k in range(MAX_SLOTS):
                slot = (self.slot + k) % MAX_SLOTS
                fd = os.open(SLOT_DIR / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self._slot_fd = fd
                SLOTS_USED.add(slot)
                return slot
            time.sleep(0.1)
        raise RuntimeError("no free sandbox slot")

    @staticmethod
    def processes_of(uid: int) -> list[int]:
        alive = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.stat(f"/proc/{entry}").st_uid == uid:
                        alive.append(int(entry))
                except OSError:
                    pass
        return alive

    @staticmethod
    def _wait_until_gone(uid: int, timeout: float = 10.0) -> None:
        """The kernel tears a PID namespace down asynchronously: wait until the slot user owns no process,
        so the next notebook in this slot starts clean (and nothing outlives its notebook)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            alive = Sandbox.processes_of(uid)
            if not alive:
                return
            for pid in alive:  # stragglers (should not exist outside the namespace, but be thorough)
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.stage / "worker.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # ---- protocol ------------------------------------------------------------------------------------

    def _send(self, cmd: dict) -> None:
        data = pickle.dumps(cmd)
        try:
            os.write(self.cmd_w, struct.pack(">I", len(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(self.cmd_w, view):]
        except (BrokenPipeError, OSError):
            raise self._gone("the notebook's process ended") from None

    def _gone(self, default: str) -> SandboxGone:
        code = self.proc.poll()
        if code is None:
            return SandboxGone("kernel_died", default)
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            return SandboxGone("resource_exceeded", "CPU time limit exceeded")
        if code in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGABRT) and self.resource_events:
            return SandboxGone("resource_exceeded", f"crashed after {self.resource_events[-1]}")
        last = [line for line in self.log_tail().splitlines() if line.strip()][-1:]
        detail = f": {last[0][:300]}" if last and code == 3 else ""  # 3: the worker's own error exit
        return SandboxGone("kernel_died", f"the notebook's process exited (code {code}){detail}")

    def _reply(self, timeout: float, what: str) -> dict:
        timeout = min(timeout, self.deadline - time.monotonic())
        if timeout <= 0:
            self.close()
            raise SandboxGone("timeout", f"the notebook's total time limit ({self.limits.notebook_seconds:.0f} s) "
                                         f"ran out while {what}")
        header = self._read(4, timeout, what)
        (length,) = struct.unpack(">I", header)
        if length > MAX_REPLY_BYTES:
            self.close()
            raise SandboxGone("resource_exceeded", f"a reply of {length} bytes exceeds the {MAX_REPLY_BYTES} limit")
        payload = self._read(length, timeout, what)
        try:
            reply = json.loads(payload)
        except ValueError:
            self.close()
            raise SandboxGone("kernel_died", "the notebook's process sent a malformed reply") from None
        if not isinstance(reply, dict):
            raise SandboxGone("kernel_died", "the notebook's process sent a malformed reply")
        return reply

    def _read(self, n: int, timeout: float, what: str) -> bytes:
        end = time.monotonic() + timeout
        chunks, got = [], 0
        while got < n:
            left = end - time.monotonic()
            ready, _, _ = select.select([self.reply_r], [], [], max(left, 0))
            if not ready:
                self.close()
                raise SandboxGone("timeout", f"no answer within {timeout:.0f} s while {what}")
            chunk = os.read(self.reply_r, min(n - got, 1 << 20))
            if not chunk:
                raise self._gone(f"the notebook's process ended while {what}")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def run_cell(self, source: str) -> dict:
        """Execute one cell; returns {"ok", "output", "error": {type, message} | None}."""
        self._send({"op": "run", "source": source})
        reply = self._reply(self.limits.cell_seconds, "running a cell")
        err = reply.get("error") or {}
        if err.get("type") == "MemoryError":
            self.resource_events.append("a MemoryError (memory limit)")
        if err.get("type") == "OSError" and "too large" in str(err.get("message", "")).lower():
            self.resource_events.append("a write past the file-size limit")
        return reply

    def defined(self, name: str) -> bool:
        self._send({"op": "defined", "name": name})
        return bool(self._reply(30.0, f"looking up {name}").get("defined"))

    def call(self, name: str, args: tuple) -> dict:
        self._send({"op": "call", "name": name, "args": cloudpickle.dumps(args)})
        return self._reply(self.limits.call_seconds, f"calling {name}")


def leftover_processes(slot: int, wait: float = 120.0) -> list[int]:
    """Processes of a slot's user while holding the slot's lock (so no grader is using it): any process
    found is one that outlived its notebook. Used by the tests to audit cleanup."""
    import fcntl
    import pwd
    fd = os.open(SLOT_DIR / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        end = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise TimeoutError(f"slot {slot} stayed busy for {wait} s") from None
                time.sleep(0.1)
        return Sandbox.processes_of(pwd.getpwnam(f"llmspace-sbx-{slot}").pw_uid)
    finally:
        os.close(fd)

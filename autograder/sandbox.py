"""Run untrusted notebook code in a sandbox and talk to it over pipes.

A :class:`Sandbox` is one student notebook's worker process (:mod:`autograder.worker`), started by
**bubblewrap** (Debian's ``bubblewrap``, the tool Flatpak sandboxes apps with) in a root file system
assembled from an allow-list, so nothing of the host is visible unless it is named here:

* **files** — a fresh tmpfs root holding read-only binds of ``/usr`` (the C library, system binaries), the
  Python installation and the virtual environment, a synthetic ``/etc`` (passwd, group, hosts), the
  *student* version of ``llmspace`` (solution regions replaced by ``raise NotImplementedError()``) and the
  worker's two modules; plus private size-capped tmpfs mounts for ``/tmp``, ``/dev/shm`` and the working
  directory, a fresh ``/proc`` and a minimal ``/dev``. No ``/home``, ``/root``, ``/var``, ``/run``, ``/opt``,
  ``/srv``, no other checkout of the course, no gradebook, no host unix socket (PostgreSQL's included); the
  root itself is read-only;
* **namespaces** — new mount, PID, IPC (SysV shared memory, semaphores and queues die with the
  notebook), network (only a private loopback) and UTS namespaces; a new user namespace where the grader
  is not root; ``--die-with-parent`` (killing the grader kills the notebook), ``--new-session``;
* **user** — as root, a dedicated unprivileged user per parallel slot (``llmspace-sbx-N``, created on
  demand), no capabilities, ``no_new_privs``; its leftovers (processes, files in world-writable host
  directories, SysV IPC objects, the previous sandbox's cgroup and staging directory) are removed when a
  slot is taken and when it is released;
* **resources** — a cgroup per sandbox (v2 ``memory.max``/``pids.max`` where a v2 hierarchy with both
  controllers can be used, else v1 ``memory.limit_in_bytes``/``pids.max``) that counts every page the
  notebook owns, tmpfs files, ``memfd_create`` and SysV shared memory included; rlimits (address space,
  file size, CPU time, open files, processes) as a second line and as the fallback; a wall-clock deadline
  per cell, per call and per notebook enforced from outside with SIGKILL. The limit that was hit is named
  in the reason (``memory: ...``, ``processes: ...``, ``files: ...``, ``cpu: ...``).

Without root, bubblewrap runs in an unprivileged user namespace where the kernel allows it (the learner's
``check`` is isolated too; there is no cgroup, so memory and processes are bounded by rlimits only).
Where neither works, the grader says so once and degrades explicitly: rlimits, a process group killed
at the end and a private working directory — no network or file-system isolation.
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
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cloudpickle

from autograder import codec

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "solutions" / "llmspace"
if not LIBRARY.is_dir():  # the student package (autograder.student): its llmspace is already stubbed
    LIBRARY = ROOT / "llmspace"
MAX_REPLY_BYTES = 256 * 2**20
SLOT_DIR = Path("/run/llmspace-sandbox")  # per slot: a lock file, the staging dir and the cgroups in use
MAX_SLOTS = 32
SLOTS_USED: set[int] = set()  # slots this process has run notebooks in (for audits and tests)
INSIDE = Path("/sandbox")     # the worker's code, library and working directory inside the sandbox
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")  # swept for slot users' files
_SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*\n", re.M | re.S)


@dataclass
class Limits:
    memory_bytes: int = 6 * 2**30      # RLIMIT_AS: torch + numpy reserve a lot of address space
    resident_bytes: int = 4 * 2**30    # cgroup memory: RAM + tmpfs files + shared memory + memfd, all processes
    file_bytes: int = 64 * 2**20       # RLIMIT_FSIZE: largest file the notebook may write
    cpu_seconds: int = 900             # RLIMIT_CPU for the whole notebook
    processes: int = 64                # cgroup pids.max (RLIMIT_NPROC of the slot user without a cgroup)
    open_files: int = 1024             # RLIMIT_NOFILE
    workdir_bytes: int = 512 * 2**20   # tmpfs size of the working directory
    tmp_bytes: int = 256 * 2**20       # tmpfs size of /tmp and of /dev/shm (each)
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
    """Built once per grader process (the library does not change during a run); world-readable, since
    it is bound read-only into every sandbox (it is what students download anyway)."""
    folder = Path(tempfile.mkdtemp(prefix="llmspace-lib-"))
    os.chmod(folder, 0o755)
    target = folder / "llmspace"
    shutil.copytree(LIBRARY, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        text = path.read_text()
        stripped = _SOLUTION.sub(lambda m: f"{m.group(1)}raise NotImplementedError()\n", text)
        if stripped != text:
            path.write_text(stripped)
    return target


# ---- what isolation this machine allows --------------------------------------------------------------

@dataclass(frozen=True)
class Isolation:
    mode: str | None   # "root": bwrap + slot user + cgroup | "user": bwrap in a user namespace | None
    why: str           # why there is no (or less) isolation; "" when full
    cgroup: str | None  # "v2" | "v1" | None (root mode only)
    disable_userns: bool = False  # bwrap supports --disable-userns (no nested user namespaces)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def isolation() -> Isolation:
    """Probe once per process: run a tiny bubblewrap sandbox with the flags this mode will use."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Isolation(None, "bubblewrap (bwrap) not installed: apt-get install bubblewrap", None)
    if sys.platform != "linux":
        return Isolation(None, "not Linux", None)
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True).stdout
    disable_userns = "--disable-userns" in help_text
    root = os.geteuid() == 0
    if root and shutil.which("setpriv") is None:
        return Isolation(None, "setpriv (util-linux) not found", None)
    mode = "root" if root else "user"
    probe = subprocess.run([bwrap, *_namespace_flags(mode, disable_userns), *_system_binds(),
                            "--proc", "/proc", "--dev", "/dev", "true"], capture_output=True)
    if probe.returncode != 0:
        err = probe.stderr.decode(errors="replace").strip()
        why = "not root and unprivileged user namespaces are disabled" if not root else "bwrap failed"
        return Isolation(None, f"{why}: {err}", None)
    if not root:
        return Isolation("user", "not root: no slot users and no cgroup (rlimits bound memory and processes)",
                         None, disable_userns)
    version, why = _Cgroup.probe()
    return Isolation("root", "" if version else f"no usable cgroup ({why}): rlimits bound memory and processes",
                     version, disable_userns)


def isolation_available() -> tuple[bool, str]:
    """(True, "") when notebooks run in a bubblewrap sandbox; else (False, why)."""
    iso = isolation()
    return iso.mode is not None, iso.why


def _namespace_flags(mode: str, disable_userns: bool) -> list[str]:
    flags = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if mode == "user":  # as root no user namespace: the slot user is a real host user, dropped to by setpriv
        flags = ["--unshare-user", *(["--disable-userns"] if disable_userns else []), *flags]
    return flags


# The system trees bound into every sandbox (not /usr/local or /usr/src, where a checkout could lie).
USR_TREES = ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/libexec", "/usr/share")


def _system_binds() -> list[str]:
    """The system's programs and libraries read-only (not /usr/local or /usr/src, where a checkout could
    lie), and the merged-/usr links (or binds) for /bin, /lib, /lib64, /sbin."""
    args = ["--perms", "0755", "--dir", "/usr"]
    for tree in USR_TREES:
        if os.path.isdir(tree) and not os.path.islink(tree):
            args += ["--ro-bind", tree, tree]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


# ---- cgroups -----------------------------------------------------------------------------------------

def _own_cgroups() -> dict[str, str]:
    """{controller or "": path} of this process (from /proc/self/cgroup; "" is the v2 hierarchy)."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _cgroup_mounts() -> dict[str, Path]:
    """{"memory": mountpoint, "pids": mountpoint} for v1, {"": mountpoint} for v2."""
    out = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, options = right.split(" ", 2)
        point = left.split(" ")[4]
        if fstype == "cgroup2":
            out.setdefault("", Path(point))
        elif fstype == "cgroup":
            for opt in options.split(" ")[-1].split(","):
                if opt in ("memory", "pids"):
                    out.setdefault(opt, Path(point))
    return out


class _Cgroup:
    """One sandbox's cgroup: memory (RAM, tmpfs, shm, memfd; no swap) and process count for all its
    processes. v2 when a v2 hierarchy with the memory and pids controllers can be delegated to us, else
    v1 (one group in each of the memory and pids hierarchies), created under this process's own groups
    so that the limits of the grader's container still apply."""

    _base: dict | None = None
    _lock = threading.Lock()
    _count = 0

    @classmethod
    @functools.lru_cache(maxsize=None)
    def probe(cls) -> tuple[str | None, str]:
        if os.geteuid() != 0:
            return None, "not root"
        try:
            mounts, own = _cgroup_mounts(), _own_cgroups()
        except OSError as exc:
            return None, str(exc)
        if "" in mounts:  # v2: enable memory+pids for children of a group without processes of its own
            for parent in (mounts[""] / own.get("", "/").lstrip("/"), mounts[""]):
                base = parent / "llmspace-sandboxes"
                try:
                    if not {"memory", "pids"} <= set((parent / "cgroup.controllers").read_text().split()):
                        continue
                    (parent / "cgroup.subtree_control").write_text("+memory +pids")
                    base.mkdir(exist_ok=True)
                    (base / "cgroup.subtree_control").write_text("+memory +pids")
                except OSError:
                    continue
                cls._base = {"version": "v2", "": base}
                return "v2", ""
        if "memory" in mounts and "pids" in mounts:
            base = {}
            for c in ("memory", "pids"):
                mine = mounts[c] / own.get(c, "/").lstrip("/")
                base[c] = (mine if mine.is_dir() else mounts[c]) / "llmspace-sandboxes"
            try:
                for c, path in base.items():
                    path.mkdir(exist_ok=True)
                    (path / "cgroup.procs").read_text()
            except OSError as exc:
                return None, f"cgroup v1: {exc}"
            cls._base = {"version": "v1", **base}
            return "v1", ""
        return None, "neither a cgroup v2 hierarchy with memory and pids controllers nor v1 memory and pids"

    def __init__(self, name: str, limits: Limits):
        version, why = self.probe()
        if version is None:
            raise RuntimeError(why)
        self.version = version
        self.dirs = [self._base[k] / name for k in (("",) if version == "v2" else ("memory", "pids"))]
        try:
            for d in self.dirs:
                d.mkdir()
            self._set_limits(limits)
        except OSError:
            self.remove()
            raise

    def _set_limits(self, limits: Limits) -> None:
        if self.version == "v2":
            d = self.dirs[0]
            (d / "memory.max").write_text(str(limits.resident_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "pids.max").write_text(str(limits.processes))
        else:
            mem, pids = self.dirs
            (mem / "memory.limit_in_bytes").write_text(str(limits.resident_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():  # swap accounting on: no swapping past the limit
                (mem / "memory.memsw.limit_in_bytes").write_text(str(limits.resident_bytes))
            (pids / "pids.max").write_text(str(limits.processes))

    @classmethod
    def new_name(cls, slot: int) -> str:
        with cls._lock:
            cls._count += 1
            return f"slot{slot}-{os.getpid()}-{cls._count}"

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        out = set()
        for f in self.procs_files():
            try:
                out |= {int(x) for x in Path(f).read_text().split()}
            except OSError:
                pass
        return out

    def limits_hit(self) -> list[str]:
        """Which limits the kernel enforced: "memory" (an out-of-memory kill), "processes" (a refused fork)."""
        def counter(path: Path, key: str) -> int:
            try:
                for line in path.read_text().splitlines():
                    k, _, v = line.partition(" ")
                    if k == key:
                        return int(v)
            except (OSError, ValueError):
                pass
            return 0
        if self.version == "v2":
            mem, pids = self.dirs[0] / "memory.events", self.dirs[0] / "pids.events"
        else:
            mem, pids = self.dirs[0] / "memory.oom_control", self.dirs[1] / "pids.events"
        hit = []
        if counter(mem, "oom_kill") > 0:
            hit.append("memory")
        if counter(pids, "max") > 0:
            hit.append("processes")
        return hit

    def kill(self, timeout: float = 10.0) -> None:
        _kill_cgroup_dirs(self.dirs, timeout)

    def remove(self) -> None:
        _remove_cgroup_dirs(self.dirs)


def _kill_cgroup_dirs(dirs, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    for d in dirs:
        kill = Path(d) / "cgroup.kill"
        if kill.exists():
            try:
                kill.write_text("1")
            except OSError:
                pass

    def members() -> set[int]:
        alive = set()
        for d in dirs:
            try:
                alive |= {int(x) for x in (Path(d) / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return alive

    _sigkill_until_gone(members, end)


def _sigkill_until_gone(alive, end: float) -> None:
    """SIGKILL every PID that ``alive()`` lists, again and again (a process can fork while it is being
    killed), until it lists none or ``time.monotonic()`` passes ``end``."""
    while time.monotonic() < end:
        pids = alive()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def _remove_cgroup_dirs(dirs) -> None:
    for d in dirs:
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY while the kernel finishes tearing down the last process
                time.sleep(0.02)


# ---- slots (root mode): a user, a lock, a state file -------------------------------------------------

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


def processes_of(uid: int) -> list[int]:
    """PIDs of every host process whose owner is ``uid``."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    alive.append(int(entry))
            except OSError:
                pass
    return alive


def files_of(uid: int, roots=WORLD_WRITABLE) -> list[str]:
    """Host files owned by ``uid`` wherever that user could have created them: in the world-writable
    directories (and, recursively, world-writable directories inside them and its own directories)."""
    found = []

    def walk(folder: str, depth: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                found.append(e.path)
            elif e.is_dir(follow_symlinks=False) and st.st_mode & 0o002 and depth < 8:
                walk(e.path, depth + 1)
    for root in roots:
        if os.path.isdir(root) and not os.path.islink(root):
            walk(root, 0)
    return found


def ipc_objects_of(uid: int) -> list[tuple[str, int]]:
    """SysV IPC objects (("shm"|"msg"|"sem", id)) in the host's IPC namespace owned or created by ``uid``."""
    found = []
    for kind in ("shm", "msg", "sem"):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        header = lines[0].split() if lines else []
        for line in lines[1:]:
            row = dict(zip(header, line.split()))
            if str(uid) in (row.get("uid"), row.get("cuid")):
                found.append((kind, int(row.get("shmid") or row.get("msqid") or row.get("semid"))))
    return found


def _clean_user(uid: int, timeout: float = 10.0) -> None:
    """Kill every process of ``uid`` and remove its files and SysV IPC objects on the host."""
    _sigkill_until_gone(lambda: processes_of(uid), time.monotonic() + timeout)
    for path in files_of(uid):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    flags = {"shm": "-m", "msg": "-q", "sem": "-s"}
    for kind, ident in ipc_objects_of(uid):
        subprocess.run(["ipcrm", flags[kind], str(ident)], capture_output=True)


def _slot_state(slot: int) -> Path:
    return SLOT_DIR / f"slot-{slot}.json"


def _clean_slot(slot: int, uid: int) -> None:
    """Remove everything a previous notebook in this slot may have left (its grader may have been killed):
    the sandbox's cgroups (and their processes), its staging directory, the slot user's processes, files
    and IPC objects. Called with the slot's lock held, when the slot is taken and when it is released."""
    import json  # local on purpose: the slot state does not depend on the protocol section's imports
    state = _slot_state(slot)
    try:
        previous = json.loads(state.read_text())
    except (OSError, ValueError):
        previous = {}
    dirs = [Path(d) for d in previous.get("cgroups", [])]
    _kill_cgroup_dirs(dirs)
    _remove_cgroup_dirs(dirs)
    if previous.get("stage"):
        shutil.rmtree(previous["stage"], ignore_errors=True)
    _clean_user(uid)
    try:
        state.unlink()
    except FileNotFoundError:
        pass


def _write_slot_state(slot: int, **state) -> None:
    import json
    tmp = _slot_state(slot).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _slot_state(slot))


def _user_nproc_budget(extra: int) -> int:
    """RLIMIT_NPROC for a non-root learner counts *all* their processes: allow today's count + ``extra``."""
    return len(processes_of(os.getuid())) + extra


class Sandbox:
    """One worker process for one notebook. Use as a context manager.

    ``isolate``: None — the best this machine allows (bubblewrap as root or in a user namespace, else
    degraded with a warning once); True — bubblewrap or RuntimeError; False — degraded.
    ``hide``: host paths that must stay invisible. The root is an allow-list, so they already are unless
    they lie inside one of the trees bound into it (then an empty tmpfs covers them)."""

    def __init__(self, limits: Limits | None = None, slot: int = 0, hide: tuple[Path, ...] = (),
                 isolate: bool | None = None):
        self.limits = limits or Limits()
        self.slot, self.extra_hide = slot, tuple(Path(h) for h in hide)
        iso = isolation() if isolate is not False else Isolation(None, "disabled", None)
        if isolate and iso.mode is None:
            raise RuntimeError(f"sandbox isolation requested but unavailable: {iso.why}")
        self.mode = iso.mode
        self.isolated = iso.mode is not None
        self._iso = iso
        if not self.isolated and isolate is None:
            _warn_once("degraded", f"sandbox degraded ({iso.why}): rlimits and process-group cleanup only; "
                                   f"no network or file-system isolation")
        elif iso.why and self.isolated:
            _warn_once("partial", f"sandbox without cgroup limits ({iso.why})")
        self.proc = None
        self.uid = None
        self.cgroup: _Cgroup | None = None
        self._slot_fd = None
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
        if self.mode == "root":
            self.slot = self._acquire_slot()
            self.uid, self.gid = _slot_user(self.slot)
            _clean_slot(self.slot, self.uid)
            self.stage = Path(tempfile.mkdtemp(prefix=f"slot-{self.slot}-", dir=SLOT_DIR))
            if self._iso.cgroup:
                try:
                    self.cgroup = _Cgroup(_Cgroup.new_name(self.slot), self.limits)
                except OSError as exc:  # e.g. the cgroup tree ran out of room: rlimits still hold
                    _warn_once("cgroup", f"sandbox without a cgroup ({exc}): rlimits bound memory and processes")
            _write_slot_state(self.slot, stage=str(self.stage),
                              cgroups=[str(d) for d in self.cgroup.dirs] if self.cgroup else [])
        else:
            self.stage = Path(tempfile.mkdtemp(prefix="llmspace-stage-"))
        os.chmod(self.stage, 0o700)
        code = self.stage / "code"
        code.mkdir(mode=0o755)
        for name in ("worker.py", "codec.py"):
            shutil.copy(Path(__file__).parent / name, code / name)
            os.chmod(code / name, 0o644)
        cmd_r, self.cmd_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
               "PYTHONPATH": "", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TRITON_INTERPRET": "1", "PYTHONHASHSEED": "0", "USER": "student", "LOGNAME": "student"}
        if self.isolated:
            work = INSIDE / "work"
            env.update(HOME=str(work), TMPDIR="/tmp", IPYTHONDIR=str(work / ".ipython"),
                       MPLCONFIGDIR=str(work / ".mpl"), PYTHONPATH=f"{INSIDE / 'lib'}:{INSIDE / 'code'}")
            args = self._bwrap_args() + [sys.executable, str(INSIDE / "code" / "worker.py"),
                                         str(cmd_r), str(reply_w)]
        else:
            home = self.stage / "work"
            home.mkdir()
            student_library(self.stage / "lib")
            env.update(HOME=str(home), TMPDIR=str(home), IPYTHONDIR=str(home / ".ipython"),
                       MPLCONFIGDIR=str(home / ".mpl"), PYTHONPATH=f"{self.stage / 'lib'}:{code}")
            args = [sys.executable, str(code / "worker.py"), str(cmd_r), str(reply_w)]
        if self.mode == "root":  # counts the slot user's processes; the cgroup's pids.max is the real bound
            self._nproc = self.limits.processes if self.cgroup is None else 4 * self.limits.processes
        elif os.geteuid() != 0:  # counts all of the learner's processes, not just the notebook's
            self._nproc = _user_nproc_budget(self.limits.processes)
        else:
            self._nproc = self.limits.processes  # not enforced for root (degraded on request)
        log = open(self.stage / "worker.log", "wb")
        self.proc = subprocess.Popen(args, env=env, pass_fds=(cmd_r, reply_w), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True,
                                     cwd=str(self.stage if self.isolated else self.stage / "work"),
                                     preexec_fn=self._preexec)
        log.close()
        os.close(cmd_r)
        os.close(reply_w)
        hello = self._reply(min(60.0, self.limits.cell_seconds), "starting the notebook")
        if not hello.get("ready"):
            raise SandboxGone("kernel_died", "the sandbox did not start")
        return self

    def _bwrap_args(self) -> list[str]:
        """The allow-list root: every path the worker can see is named here."""
        lim = self.limits
        etc = self.stage / "etc"
        etc.mkdir(mode=0o755)
        uid = self.uid if self.uid is not None else os.getuid()
        gid = self.gid if self.uid is not None else os.getgid()
        (etc / "passwd").write_text(f"student:x:{uid}:{gid}:student:{INSIDE / 'work'}:/usr/sbin/nologin\n"
                                    f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
        (etc / "group").write_text(f"student:x:{gid}:\nnogroup:x:65534:\n")
        (etc / "hosts").write_text("127.0.0.1 localhost sandbox\n::1 localhost\n")
        for f in etc.iterdir():
            os.chmod(f, 0o644)
        args = ["bwrap", *_namespace_flags(self.mode, self._iso.disable_userns), *_system_binds(),
                "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(lim.tmp_bytes), "--tmpfs", "/dev/shm",
                "--perms", "1777", "--size", str(lim.tmp_bytes), "--tmpfs", "/tmp",
                "--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", str(INSIDE),
                "--perms", "0755", "--dir", str(INSIDE / "lib"),
                "--perms", "0777", "--size", str(lim.workdir_bytes), "--tmpfs", str(INSIDE / "work"),
                "--ro-bind", str(_stripped_library()), str(INSIDE / "lib" / "llmspace"),
                "--ro-bind", str(self.stage / "code"), str(INSIDE / "code")]
        for name in ("passwd", "group", "hosts"):
            args += ["--ro-bind", str(etc / name), f"/etc/{name}"]
        for name in ("ld.so.cache", "localtime", "nsswitch.conf"):
            if os.path.isfile(f"/etc/{name}"):
                args += ["--ro-bind", os.path.realpath(f"/etc/{name}"), f"/etc/{name}"]
        # The Python installation and the virtual environment, at their own paths (the venv's interpreter is
        # a link into the installation), with world-traversable parents created in the new root.
        trees = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)} |
                       {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix)})
        trees = [t for t in trees if t != "/usr" and not any(_inside(t, u) for u in USR_TREES)]
        made = {"/", "/tmp", "/usr", "/etc", str(INSIDE)}
        for tree in trees:
            parents = []
            p = os.path.dirname(tree)
            while p not in made and p != "/":
                parents.append(p)
                p = os.path.dirname(p)
            for parent in reversed(parents):
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
            args += ["--ro-bind", tree, tree]
            made.add(tree)
        # Deny on top of the allow-list: course copies inside a bound tree (a checkout inside the Python
        # installation, a non-editable install of the reference llmspace in a site-packages).
        bound = [*USR_TREES, *trees]
        installed = {str(p) for t in trees for p in Path(t).glob("lib*/python3*/site-packages/llmspace")}
        for h in sorted({str(ROOT), *(str(h) for h in self.extra_hide), *installed}):
            if os.path.isdir(h) and any(_inside(h, b) for b in bound):
                args += ["--size", "4096", "--tmpfs", h]
                for tree in trees:  # a bound tree inside the covered one (the venv inside the checkout)
                    if _inside(tree, h) and tree != h:
                        args += ["--ro-bind", tree, tree]
        args += ["--remount-ro", "/", "--chdir", str(INSIDE / "work")]
        if self.mode == "root":
            args += ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                     "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
        return args

    def _preexec(self):
        """In the child, before exec, still as the grader's user: join the cgroup, set the rlimits."""
        if self.cgroup is not None:
            for f in self.cgroup.procs_files():
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))
        lim = self.limits
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.open_files, lim.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (self._nproc, self._nproc))

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap; its PID namespace takes the rest with it
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.cgroup is not None:
            self._note_limits_hit()
            self.cgroup.remove()
            self.cgroup = None
        if self._slot_fd is not None:
            if self.uid is not None:
                _clean_slot(self.slot, self.uid)  # also removes the staging dir
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

    def _note_limits_hit(self) -> None:
        if self.cgroup is None:
            return
        hit = self.cgroup.limits_hit()
        if "memory" in hit:
            self._event(f"memory: a process was killed for using more than {_size(self.limits.resident_bytes)}")
        if "processes" in hit:
            self._event(f"processes: the limit of {self.limits.processes} processes was reached")

    def _event(self, text: str) -> None:
        if text not in self.resource_events:
            self.resource_events.append(text)

    def _acquire_slot(self) -> int:
        """A machine-wide exclusive slot (and so its user): graders in other processes use other slots."""
        import fcntl
        SLOT_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(SLOT_DIR, 0o700)
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

    processes_of = staticmethod(processes_of)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.stage / "worker.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # ---- protocol ------------------------------------------------------------------------------------

    def _send(self, cmd: dict, timeout: float = 30.0) -> None:
        """Write one command frame with a deadline: a worker that stops reading (its pipe full) must not
        block the grader, so the pipe is written without blocking and waited on with ``select``."""
        data = pickle.dumps(cmd)
        frame = memoryview(struct.pack(">I", len(data)) + data)
        end = time.monotonic() + max(0.0, min(timeout, self.deadline - time.monotonic()))
        try:
            os.set_blocking(self.cmd_w, False)
            while frame:
                left = end - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise SandboxGone("timeout", f"the notebook's process stopped reading its commands "
                                                 f"(no progress within {timeout:.0f} s)")
                _, writable, _ = select.select([], [self.cmd_w], [], left)
                if writable:
                    try:
                        frame = frame[os.write(self.cmd_w, frame):]
                    except BlockingIOError:
                        continue
        except (BrokenPipeError, OSError, ValueError, TypeError):  # closed fd (killed) or pipe gone
            raise self._gone("the notebook's process ended") from None

    def kill(self) -> None:
        """Kill the worker (and its process group) without closing anything: a thread blocked on this
        sandbox sees the end of its pipe and finishes with :class:`SandboxGone`. Safe from any thread."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _gone(self, default: str) -> SandboxGone:
        try:
            code = self.proc.wait(timeout=2)  # the pipe closes a moment before bwrap reports the exit
        except subprocess.TimeoutExpired:
            code = None
        self._check_limits()
        killed = [e for e in self.resource_events if e.startswith("memory: a process was killed")]
        if killed:
            return SandboxGone("resource_exceeded", killed[-1])
        if code is None:
            return SandboxGone("kernel_died", default)
        sig = -code if code < 0 else code - 128 if code > 128 else 0  # bwrap reports 128 + signal
        if sig == signal.SIGXCPU:
            return SandboxGone("resource_exceeded", f"cpu: the CPU time limit ({self.limits.cpu_seconds} s) "
                                                    f"was exceeded")
        if sig == signal.SIGXFSZ:
            return SandboxGone("resource_exceeded", f"files: a write past the file-size limit "
                                                    f"({_size(self.limits.file_bytes)})")
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT) and self.resource_events:
            return SandboxGone("resource_exceeded", f"{self.resource_events[-1]} (then the process crashed)")
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
            reply = codec.loads(payload)  # bounded: the grader never allocates many times a reply's size
        except codec.DecodeError as exc:
            self.close()
            status = "resource_exceeded" if isinstance(exc, codec.TooLarge) else "kernel_died"
            raise SandboxGone(status, f"the notebook's process sent {exc}") from None
        if not isinstance(reply, dict):
            self.close()
            raise SandboxGone("kernel_died", "the notebook's process sent a malformed reply (not an object)")
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
        self._send({"op": "run", "source": source}, self.limits.cell_seconds)
        reply = self._reply(self.limits.cell_seconds, "running a cell")
        err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
        kind, message = err.get("type"), str(err.get("message", "")).lower()
        if kind == "MemoryError":
            self._event(f"memory: a MemoryError (address-space limit {_size(self.limits.memory_bytes)})")
        if kind in ("OSError", "IOError") and "too large" in message:
            self._event(f"files: a write past the file-size limit ({_size(self.limits.file_bytes)})")
        if kind in ("OSError", "IOError") and "no space left" in message:
            self._event("files: a file system of the sandbox is full")
        if kind in ("OSError", "BlockingIOError") and "too many open files" in message:
            self._event(f"files: the limit of {self.limits.open_files} open files was reached")
        if kind == "BlockingIOError" and "temporarily unavailable" in message and self.cgroup is None:
            self._event(f"processes: the limit of {self.limits.processes} processes was reached")
        self._check_limits()
        return reply

    def _check_limits(self) -> None:
        """Limits the kernel enforced in the cgroup (an out-of-memory kill, a refused fork) since the start."""
        self._note_limits_hit()

    def defined(self, name: str) -> bool:
        self._send({"op": "defined", "name": name})
        return bool(self._reply(30.0, f"looking up {name}").get("defined"))

    def call(self, name: str, args: tuple, kwargs: dict | None = None) -> dict:
        """Call the student's ``name(*args, **kwargs)`` in the sandbox; the reply as the worker wrote it."""
        self._send({"op": "call", "name": name, "args": cloudpickle.dumps(args),
                    "kwargs": cloudpickle.dumps(dict(kwargs or {}))}, self.limits.call_seconds)
        reply = self._reply(self.limits.call_seconds, f"calling {name}")
        self._check_limits()
        return reply


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MiB"


def _inside(path: str, tree: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(tree)]) == os.path.abspath(tree)


def leftover_processes(slot: int, wait: float = 120.0) -> list[int]:
    """Processes of a slot's user while holding the slot's lock (so no grader is using it): any process
    found is one that outlived its notebook. Used by the tests to audit cleanup."""
    return leftovers(slot, wait)["processes"]


def leftovers(slot: int, wait: float = 120.0) -> dict:
    """Everything a slot's user owns on the host, audited under the slot's lock (so no grader is using
    it): processes, files in world-writable directories, SysV IPC objects, and the slot's state (the
    last sandbox's staging directory and cgroups, which the release removes)."""
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
        uid = pwd.getpwnam(f"llmspace-sbx-{slot}").pw_uid
        stages = sorted(str(p) for p in SLOT_DIR.glob(f"slot-{slot}-*"))
        return {"processes": processes_of(uid), "files": files_of(uid), "ipc": ipc_objects_of(uid),
                "state": [str(_slot_state(slot))] if _slot_state(slot).exists() else [], "stages": stages}
    finally:
        os.close(fd)

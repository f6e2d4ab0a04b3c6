"""Trusted grading of one notebook: preflight, sandboxed execution, decisions in the grader's process.

Nothing the student's process prints, returns or patches can award points. The notebook's own cells run
in a :class:`~autograder.sandbox.Sandbox`; its locked cells are replaced by the instructor's versions and
its graded test cells are *not* executed. At the position of each graded test cell, the grader runs that
item's check (visible and hidden cases) in its own process, with a :class:`RemoteFunction` standing in for
the student's function: arguments go to the sandbox, the student's function runs there, and only
values decoded by :mod:`autograder.codec` (plain data, numpy arrays, tensors, llmspace dataclasses) come
back to be compared against the reference by the check. Warnings and stderr do not matter.

Every notebook ends with exactly one status — ``graded``, ``invalid``, ``missing``, ``timeout``,
``kernel_died`` or ``resource_exceeded`` — and per-item scores for everything that ran before the end.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograder import codec
from autograder.checks import CheckFailed
from autograder.sandbox import Limits, Sandbox, SandboxGone
from autograder.specs import Assignment
from autograder.sync import notebook_path

MAX_NOTEBOOK_BYTES = 16 * 2**20
MAX_CELLS = 400
MAX_SOURCE_CHARS = 2 * 2**20
STATUSES = ("graded", "invalid", "missing", "timeout", "kernel_died", "resource_exceeded")


@dataclass
class Result:
    status: str
    reason: str = ""
    items: dict = field(default_factory=dict)    # grade_id -> {score, max_score, status, message}
    tamper_suspected: bool = False
    tamper_reasons: list = field(default_factory=list)
    cell_errors: list = field(default_factory=list)

    @property
    def score(self) -> float:
        return float(sum(i["score"] for i in self.items.values()))

    @property
    def max_score(self) -> float:
        return float(sum(i["max_score"] for i in self.items.values()))

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "score": self.score, "max_score": self.max_score,
                "items": {k: v["score"] for k, v in self.items.items()}, "details": self.items,
                "tamper_suspected": self.tamper_suspected, "tamper_reasons": self.tamper_reasons}


# ---- preflight ---------------------------------------------------------------------------------------

def _empty_items(assignment: Assignment, status: str, message: str) -> dict:
    return {assignment.grade_id(t.function): {"score": 0, "max_score": t.points, "status": status,
                                               "message": message} for t in assignment.tasks}


def find_notebook(folder: Path, assignment: Assignment) -> tuple[Path | None, str]:
    """The submission's notebook in ``folder``, or None and why (with a hint for near-miss names)."""
    expected = f"{assignment.name}.ipynb"
    if folder.is_symlink() or not folder.is_dir():
        return None, f"no folder {assignment.name}/ (or it is a link)"
    path = folder / expected
    if path.is_symlink():
        return None, f"{expected} is a symbolic link; submit the file itself"
    if path.is_file():
        return path, ""
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".ipynb")
    near = [n for n in found if n.lower().replace(" ", "").startswith(assignment.name.lower())]
    hint = f" — rename {near[0]!r} to {expected!r}" if near else ""
    return None, f"no {expected}" + (f" (found {', '.join(found)})" if found else "") + hint


def preflight(path: Path, assignment: Assignment) -> tuple[nbformat.NotebookNode | None, str]:
    """Read and validate a submission without executing anything; (notebook, "") or (None, reason)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return None, f"cannot read the file: {exc}"
    if size > MAX_NOTEBOOK_BYTES:
        return None, f"the notebook is {size} bytes; the limit is {MAX_NOTEBOOK_BYTES} (clear large outputs)"
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not valid JSON: {exc}"
    if not isinstance(raw, dict) or "cells" not in raw:
        return None, "not a Jupyter notebook (no 'cells')"
    try:
        nb = nbformat.reads(json.dumps(raw), as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # noqa: BLE001 - any schema problem is the submission's
        return None, f"not a valid notebook: {str(exc).splitlines()[0][:300]}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    if len(nb.cells) > MAX_CELLS:
        return None, f"{len(nb.cells)} cells; the limit is {MAX_CELLS}"
    if sum(len(c.source) for c in nb.cells) > MAX_SOURCE_CHARS:
        return None, f"more than {MAX_SOURCE_CHARS} characters of source"
    if not code:
        return None, "the notebook has no code cells"
    return nb, ""


# ---- tamper scan (flag for a human, never auto-zero) -------------------------------------------------

_SUSPICIOUS = [
    (r"\bautograder\b|\bnbgrader\b", "touches the grader"),
    (r"sys\.modules|__builtins__|\bbuiltins\b|sys\._getframe|inspect\.(stack|currentframe)|gc\.get_objects",
     "reaches into interpreter internals"),
    (r"\bctypes\b|\bcffi\b", "loads native code"),
    (r"\bsocket\b|\burllib\b|\brequests\b|\bhttp\.client\b", "opens network connections"),
    (r"\bsubprocess\b|os\.system|os\.popen|os\.fork|os\.exec|\bpty\b", "starts processes"),
    (r"os\.kill|\bsignal\.(signal|pthread_kill)", "sends or traps signals"),
    (r"numpy\.testing|np\.testing|unittest\.mock|\bmonkeypatch", "patches test helpers"),
    (r"/proc/|\.\./|exercises/|solutions/|source/", "reads paths outside the notebook"),
]


def tamper_scan(nb, assignment: Assignment) -> list[str]:
    reasons = []
    tasks = {t.function for t in assignment.tasks}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or cell.get("metadata", {}).get("nbgrader", {}).get("locked"):
            continue
        src = cell.source
        for pattern, what in _SUSPICIOUS:
            if re.search(pattern, src):
                reasons.append(f"cell {index}: {what}")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmspace"):
                imported = {a.name for a in node.names} & tasks
                if imported:
                    reasons.append(f"cell {index}: imports the task function(s) {sorted(imported)} from llmspace")
    return sorted(set(reasons))


# ---- remote calls ----------------------------------------------------------------------------------------

class RemoteFunction:
    """Stands in for the student's function inside a trusted check: runs it in the sandbox."""

    def __init__(self, sandbox: Sandbox, name: str):
        self.sandbox, self.name, self.__name__ = sandbox, name, name

    def __call__(self, *args):
        reply = self.sandbox.call(self.name, args)
        if reply.get("undefined"):
            raise NameError(f"{self.name} is not defined (did its cell run without errors?)")
        if not reply.get("ok"):
            raise codec.decode_exception(reply.get("exception") or {})
        for info in (reply.get("warnings") or [])[:10]:   # warnings the call emitted in the sandbox
            category = getattr(builtins, str(info.get("category")), None)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = UserWarning
            warnings.warn(str(info.get("message"))[:500], category, stacklevel=2)
        for arg, after in zip(args, reply.get("args_after") or []):
            if after is not None:
                _update_in_place(arg, after)
        result = reply.get("result")
        if isinstance(result, dict) and "__same_as_arg__" in result:
            index = result["__same_as_arg__"]
            if not isinstance(index, int) or not 0 <= index < len(args):
                raise TypeError("malformed reply")
            return args[index]
        try:
            return codec.decode(result)
        except codec.DecodeError as exc:
            raise TypeError(f"returned a value the grader cannot accept: {exc}") from None
        except (TypeError, ValueError) as exc:  # e.g. an llmspace dataclass whose constructor rejects it
            raise type(exc)(f"returned an invalid {type(exc).__name__ and 'value'}: {exc}") from None


def _update_in_place(arg, encoded) -> None:
    """Reflect the sandbox-side mutation of an argument onto the grader's object."""
    import numpy as np
    if isinstance(encoded, dict) and "__state_dict__" in encoded:
        import torch
        state = codec.decode(encoded["__state_dict__"])
        if isinstance(arg, torch.nn.Module) and isinstance(state, dict):
            for key, value in state.items():
                owner_name, _, attr = key.rpartition(".")
                owner = arg.get_submodule(owner_name) if owner_name else arg
                current = getattr(owner, attr, None)
                if isinstance(current, torch.nn.Parameter):
                    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=current.requires_grad))
                elif attr in owner._buffers:
                    owner._buffers[attr] = value
        return
    value = codec.decode(encoded)
    if isinstance(arg, np.ndarray) and isinstance(value, np.ndarray) and value.shape == arg.shape:
        if arg.flags.writeable:
            arg[...] = value
    elif type(arg).__name__ == "Tensor" and type(value).__name__ == "Tensor":
        import torch
        with torch.no_grad():
            if value.shape == arg.shape:
                arg.copy_(value)
            else:
                arg.data = value
    elif isinstance(arg, dict) and isinstance(value, dict):
        arg.clear()
        arg.update(value)
    elif isinstance(arg, list) and isinstance(value, list):
        arg[:] = value


# ---- the grading loop ----------------------------------------------------------------------------------

def _reference_cells(assignment: Assignment) -> dict:
    path = notebook_path(assignment)
    if not path.exists():  # the student package ships only the locked setup cells (autograder.student)
        packaged = json.loads((Path(__file__).parent / "locked_cells.json").read_text())[assignment.name]
        return {gid: nbformat.v4.new_code_cell(source, metadata={"nbgrader": {"grade_id": gid, "locked": True}})
                for gid, source in packaged.items()}
    nb = nbformat.read(path, as_version=4)
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def grade_notebook(path: Path, assignment: Assignment, *, limits: Limits | None = None, slot: int = 0,
                   hide: tuple = (), isolate: bool | None = None, hidden: bool = True,
                   progress=None) -> Result:
    """Grade one notebook. ``hidden=False`` runs the visible cases only (the learner's ``check``);
    ``progress(event, detail)`` is called before each cell (``"cell"``, its index) and each check
    (``"check"``, its grade_id) and after each check (``"checked"``, the item)."""
    nb, reason = preflight(path, assignment)
    if nb is None:
        return Result("invalid", reason, _empty_items(assignment, "invalid", reason))
    reference = _reference_cells(assignment)
    tasks = {assignment.grade_id(t.function): t for t in assignment.tasks}
    checks = importlib.import_module(f"autograder.checks.{assignment.topic}")
    items = _empty_items(assignment, "not_run", "not reached")
    result = Result("graded", "", items)
    result.tamper_reasons = tamper_scan(nb, assignment)
    result.tamper_suspected = bool(result.tamper_reasons)

    # The run: student cells in order; locked cells as the instructor wrote them; test cells -> checks.
    plan, seen = [], set()
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if gid in tasks:
            if gid not in seen:
                plan.append(("check", gid, index))
                seen.add(gid)
            continue
        ref = reference.get(gid)
        if ref is not None and ref.metadata["nbgrader"].get("locked"):
            plan.append(("run", ref.source, index))
        else:
            plan.append(("run", cell.source, index))
    plan += [("check", gid, None) for gid in tasks if gid not in seen]  # deleted test cells: grade anyway

    def run_check(sandbox: Sandbox, gid: str) -> None:
        task = tasks[gid]
        check = getattr(checks, f"check_{task.function}")
        proxy = RemoteFunction(sandbox, task.function)
        if progress:
            progress("check", gid)
        try:
            check(proxy)
            if hidden:
                check(proxy, hidden=True)
        except CheckFailed as failure:
            items[gid].update(score=0, status="failed", message=str(failure))
        except SandboxGone:
            raise
        except Exception as exc:  # noqa: BLE001 - a grader bug must not cost other items
            items[gid].update(score=0, status="error", message=f"grader error: {type(exc).__name__}: {exc}")
        else:
            items[gid].update(score=task.points, status="passed", message="")
        if progress:
            progress("checked", items[gid])

    deferred = []
    try:
        with Sandbox(limits, slot=slot, hide=hide, isolate=isolate) as sandbox:
            for kind, payload, index in plan:
                if kind == "run":
                    if progress:
                        progress("cell", index)
                    reply = sandbox.run_cell(payload)
                    if not reply.get("ok") and reply.get("error"):
                        err = reply["error"]
                        result.cell_errors.append(f"cell {index}: {err.get('type')}: {str(err.get('message'))[:300]}")
                elif sandbox.defined(tasks[payload].function):
                    run_check(sandbox, payload)
                else:
                    deferred.append(payload)   # test cell moved above its function: check at the end
            for gid in deferred:
                run_check(sandbox, gid)
            if sandbox.resource_events:
                result.status = "resource_exceeded"
                result.reason = "; ".join(sorted(set(sandbox.resource_events)))
    except SandboxGone as gone:
        result.status, result.reason = gone.status, gone.reason
        for item in items.values():
            if item["status"] == "not_run":
                item["message"] = f"not reached: {gone.reason}"
    for item in items.values():
        if item["status"] == "not_run" and item["message"] == "not reached":
            item["message"] = "not reached"
    return result

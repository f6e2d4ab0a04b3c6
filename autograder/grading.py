"""Trusted grading of one notebook: preflight, sandboxed execution, decisions in the grader's process.

Nothing the student's process prints, returns or patches can award points. The notebook's own cells run
in a :class:`~autograder.sandbox.Sandbox`; its locked cells are replaced by the instructor's versions and
its graded test cells are *not* executed. At the position of each graded test cell, the grader runs that
item's check (visible and hidden cases) in its own process, with a :class:`RemoteFunction` standing in for
the student's function: arguments go to the sandbox, the student's function runs there, and only
values decoded by :mod:`autograder.codec` (plain data, numpy arrays, tensors, llmspace dataclasses, each
bounded in size) come back to be compared against the reference by the check. Changed arguments are
written back only into the check's fresh copies, and only with the same type, shape and dtype. Warnings
and stderr do not matter.

Every notebook ends with exactly one status — ``graded``, ``invalid``, ``missing``, ``timeout``,
``kernel_died``, ``resource_exceeded`` or ``grader_error`` — and per-item scores for everything that ran
before the end. Nothing a submission contains makes :func:`grade_notebook` raise: a fault of the grader
itself (or an input it failed to reject) is retried once and then becomes ``grader_error`` naming the
fault. Every string in a :class:`Result` is sanitised (:func:`sanitize`) before it leaves this module.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import json
import re
import threading
import traceback
import unicodedata
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
MAX_NOTEBOOK_ITEMS = 1_000_000     # JSON elements in a notebook file (bounds the grader's memory)
MAX_CELLS = 400
MAX_SOURCE_CHARS = 2 * 2**20
MAX_CODE_IN_FEEDBACK = 20_000      # characters of a student's answer shown next to its score
STATUSES = ("graded", "invalid", "missing", "timeout", "kernel_died", "resource_exceeded", "grader_error")


# ---- sanitising what the grader writes ------------------------------------------------------------------

_BIDI_AND_SEPARATORS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                           "\u2028\u2029\ufeff")


def sanitize(text, multiline: bool = True, limit: int | None = None) -> str:
    """``text`` made safe to print, write to CSV/JSON/HTML/SQL: lone surrogates (from non-UTF-8 file names or
    JSON escapes) become U+FFFD; control characters (C0, C1, DEL, bidirectional overrides, line separators)
    are shown escaped (``\\x1b``), so no submission can move the cursor, draw fake rows or reorder text.
    ``multiline`` keeps newlines and tabs; otherwise they are escaped too (one-line fields)."""
    if not isinstance(text, str):
        text = str(text)
    if limit is not None and len(text) > limit + 40:   # + 40: sanitising twice keeps the first note
        text = text[:limit] + f"[... {len(text) - limit} more characters]"
    if text.isascii() and text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")
        elif multiline and ch in "\n\t":
            out.append(ch)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif ch in _BIDI_AND_SEPARATORS or unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _sanitize_tree(value, multiline=True):
    if isinstance(value, str):
        return sanitize(value, multiline)
    if isinstance(value, dict):
        return {sanitize(k, False) if isinstance(k, str) else k: _sanitize_tree(v, multiline)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitize_tree(v, multiline) for v in value]
    return value


@dataclass
class Result:
    status: str
    reason: str = ""
    items: dict = field(default_factory=dict)    # grade_id -> {score, max_score, status, message}
    tamper_suspected: bool = False
    tamper_reasons: list = field(default_factory=list)
    cell_errors: list = field(default_factory=list)
    code: dict = field(default_factory=dict)     # grade_id -> the student's answer (source), for feedback

    @property
    def score(self) -> float:
        return float(sum(i["score"] for i in self.items.values()))

    @property
    def max_score(self) -> float:
        return float(sum(i["max_score"] for i in self.items.values()))

    def sanitized(self) -> "Result":
        self.reason = sanitize(self.reason, multiline=False)
        self.items = _sanitize_tree(self.items)
        self.tamper_reasons = [sanitize(r, multiline=False) for r in self.tamper_reasons]
        self.cell_errors = [sanitize(e, multiline=False) for e in self.cell_errors]
        self.code = {sanitize(k, False): sanitize(v, limit=MAX_CODE_IN_FEEDBACK) for k, v in self.code.items()}
        return self

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "score": self.score, "max_score": self.max_score,
                "items": {k: v["score"] for k, v in self.items.items()}, "details": self.items,
                "tamper_suspected": self.tamper_suspected, "tamper_reasons": self.tamper_reasons}


class Interrupted(BaseException):
    """Grading was cancelled (Ctrl-C): the notebook's result is not a grade and must not be recorded."""


# ---- preflight ---------------------------------------------------------------------------------------

def _empty_items(assignment: Assignment, status: str, message: str) -> dict:
    return {assignment.grade_id(t.function): {"score": 0, "max_score": t.points, "status": status,
                                               "message": message} for t in assignment.tasks}


def find_notebook(folder: Path, assignment: Assignment) -> tuple[Path | None, str]:
    """The submission's notebook in ``folder``, or None and why (with a hint for near-miss names)."""
    expected = f"{assignment.name}.ipynb"
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None, f"no folder {assignment.name}/ (or it is a link)"
        path = folder / expected
        if path.is_symlink():
            return None, f"{expected} is a symbolic link; submit the file itself"
        if path.is_file():
            return path, ""
        found = sorted(sanitize(p.name, False) for p in folder.iterdir() if p.suffix.lower() == ".ipynb")
    except OSError as exc:
        return None, f"cannot read the submission folder: {exc.strerror}"
    near = [n for n in found if n.lower().replace(" ", "").startswith(assignment.name.lower())]
    hint = f" — rename {near[0]!r} to {expected!r}" if near else ""
    return None, f"no {expected}" + (f" (found {', '.join(found[:10])})" if found else "") + hint


# nbgrader's cell metadata: the keys the grader reads and the JSON type each must have
_NBGRADER_KEYS = {"grade_id": str, "locked": bool, "solution": bool, "grade": bool, "task": bool,
                  "points": (int, float), "schema_version": int, "checksum": str, "cell_type": str}
_JSON_NAMES = {str: "a string", bool: "true/false", int: "an integer", (int, float): "a number",
               dict: "an object", list: "a list", type(None): "null", float: "a number"}


def _json_type(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _source_text(source, where: str) -> str:
    if isinstance(source, str):
        text = source
    elif isinstance(source, list) and all(isinstance(s, str) for s in source):
        text = "".join(source)
    else:
        raise ValueError(f"{where}: 'source' must be a string or a list of strings, got {_json_type(source)}")
    if _has_surrogates(text):
        raise ValueError(f"{where}: the source holds text that is not valid Unicode (a lone surrogate)")
    return text


def _clean_cell(raw, index: int) -> nbformat.NotebookNode:
    """A fresh v4 cell holding only what grading reads (type, source, nbgrader metadata), type-checked."""
    where = f"cell {index}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is {_json_type(raw)}, not an object")
    kind = raw.get("cell_type")
    if kind not in ("code", "markdown", "raw"):
        raise ValueError(f"{where}: unknown cell_type {sanitize(str(kind)[:40], False)!r}")
    source = _source_text(raw.get("source", ""), where)
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: metadata must be an object, got {_json_type(metadata)}")
    clean_meta = {}
    if "nbgrader" in metadata:
        nbg = metadata["nbgrader"]
        if not isinstance(nbg, dict):
            raise ValueError(f"{where}: its nbgrader metadata is {_json_type(nbg)}, not an object (restore the "
                             f"cell from the released notebook)")
        clean = {}
        for key, expected in _NBGRADER_KEYS.items():
            if key in nbg:
                value = nbg[key]
                ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
                if not ok or (key == "grade_id" and _has_surrogates(value)):
                    raise ValueError(f"{where}: nbgrader metadata '{key}' must be {_JSON_NAMES[expected]}, got "
                                     f"{_json_type(value)} (restore the cell from the released notebook)")
                clean[key] = value
        clean_meta["nbgrader"] = clean
    make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
            "raw": nbformat.v4.new_raw_cell}[kind]
    return make(source=source, metadata=clean_meta)


def preflight(path: Path, assignment: Assignment) -> tuple[nbformat.NotebookNode | None, str]:
    """Read and validate a submission without executing anything; (notebook, "") or (None, reason).

    Bounded in the grader's time and memory whatever the file holds: the size is checked first, the JSON
    elements are counted before parsing, nesting too deep for the parser is an error, and only what grading
    reads (each cell's type, source and nbgrader metadata, type-checked) is kept — outputs, attachments and
    other metadata are dropped unread, so nbformat validates a small clean notebook. Only format 4 is read."""
    try:
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            return None, f"the notebook is {size} bytes; the limit is {MAX_NOTEBOOK_BYTES} (clear large outputs)"
        data = path.read_bytes()[:MAX_NOTEBOOK_BYTES + 1]
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror}"
    if len(data) > MAX_NOTEBOOK_BYTES:
        return None, f"the notebook is over {MAX_NOTEBOOK_BYTES} bytes (clear large outputs)"
    try:
        raw = codec.loads(data, max_items=MAX_NOTEBOOK_ITEMS, what="a notebook")
    except codec.TooLarge:
        return None, f"the notebook has more than {MAX_NOTEBOOK_ITEMS} JSON elements (clear its outputs)"
    except codec.DecodeError as exc:
        return None, f"not readable: {exc}"
    if not isinstance(raw, dict) or not isinstance(raw.get("cells", raw.get("worksheets")), list):
        return None, "not a Jupyter notebook (no list of 'cells')"
    major = raw.get("nbformat")
    if major != 4:
        shown = major if isinstance(major, int) else _json_type(major)
        return None, (f"notebook format {shown}; the grader reads format 4 only (open it in Jupyter and save it "
                      f"again, or start from the released notebook)")
    cells = raw["cells"]
    if len(cells) > MAX_CELLS:
        return None, f"{len(cells)} cells; the limit is {MAX_CELLS}"
    try:
        clean = [_clean_cell(c, i) for i, c in enumerate(cells)]
    except ValueError as exc:
        return None, str(exc)
    if sum(len(c.source) for c in clean) > MAX_SOURCE_CHARS:
        return None, f"more than {MAX_SOURCE_CHARS} characters of source"
    if not any(c.cell_type == "code" for c in clean):
        return None, "the notebook has no code cells"
    nb = nbformat.v4.new_notebook(cells=clean)
    try:
        nbformat.validate(nb)
    except Exception as exc:  # noqa: BLE001 - any schema problem is the submission's
        return None, f"not a valid notebook: {str(exc).splitlines()[0][:300]}"
    return nb, ""


def _nbgrader(cell) -> dict:
    """The nbgrader metadata of a cell (preflight guarantees a dict with well-typed values)."""
    meta = cell.get("metadata") or {}
    nbg = meta.get("nbgrader") if isinstance(meta, dict) else None
    return nbg if isinstance(nbg, dict) else {}


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
    (r"\bimportlib\b|__import__", "imports modules by name"),
]
# CPython 3.11's parser is not thread-safe for large inputs: two threads parsing big cells at once can
# crash the process. Every ast.parse of student code in the grader goes through this lock.
_AST_LOCK = threading.Lock()


def parse_source(source: str):
    """``ast.parse`` under the grader-wide lock; None if the source does not parse (any reason)."""
    with _AST_LOCK:
        try:
            return ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError, UnicodeError):
            return None


def _dotted(node, aliases: dict) -> str | None:
    """``np.linalg.norm`` → ``numpy.linalg.norm`` given ``import numpy as np``; None if not a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def forbidden_uses(source: str, forbids: dict[str, tuple]) -> list[str]:
    """Uses, in one cell, of the library equivalents tasks forbid (``forbids``: function -> dotted names).

    Names are resolved through the cell's imports (``import scipy.sparse as sp; sp.csr_matrix`` is
    ``scipy.sparse.csr_matrix``); ``torch.Tensor.<method>`` entries match any ``.method`` attribute; string
    constants naming a forbidden module or function (``importlib.import_module("scipy.sparse")``) match too.
    """
    tree = parse_source(source)
    if tree is None or not forbids:
        return []
    aliases, used = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                used.append(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            used.append(node.module)
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    methods = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = _dotted(node, aliases)
            if name:
                used.append(name)
            if isinstance(node, ast.Attribute):
                methods.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 200:
            used.append(node.value.strip())
    found = []
    for function, names in forbids.items():
        for forbidden in names:
            if forbidden.startswith("torch.Tensor."):
                hit = forbidden.rsplit(".", 1)[1] in methods
            else:
                hit = any(u == forbidden or u.startswith(forbidden + ".") for u in used)
            if hit:
                found.append(f"uses {forbidden}, a library equivalent that task {function} forbids")
    return found


def tamper_scan(nb, assignment: Assignment, cells: list[int] | None = None) -> list[str]:
    """Reasons to look at a submission by hand. ``cells``: indices of the cells whose *student* source runs
    (default: every code cell) — a student cannot hide a cell by marking it locked."""
    reasons = []
    tasks = {t.function for t in assignment.tasks}
    forbids = {t.function: t.forbids for t in assignment.tasks if getattr(t, "forbids", ())}
    indices = cells if cells is not None else [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    for index in indices:
        src = nb.cells[index].source
        for pattern, what in _SUSPICIOUS:
            if re.search(pattern, src):
                reasons.append(f"cell {index}: {what}")
        reasons += [f"cell {index}: {use}" for use in forbidden_uses(src, forbids)]
        tree = parse_source(src)
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmspace"):
                imported = {a.name for a in node.names} & tasks
                if imported:
                    reasons.append(f"cell {index}: imports the task function(s) {sorted(imported)} from llmspace")
    return sorted(set(reasons))


# ---- remote calls ----------------------------------------------------------------------------------------

def _malformed(what: str) -> SandboxGone:
    return SandboxGone("kernel_died", f"the notebook's process sent a malformed reply ({what})")


class RemoteFunction:
    """Stands in for the student's function inside a trusted check: runs it in the sandbox.

    Arguments are pickled to the sandbox, so the student's code only ever changes its own copies. After the
    call, the sandbox's versions of the arguments are written into the objects this call received — which
    are the check's fresh deep copies (:meth:`autograder.checks.Checker.call` and ``expect_raises`` copy
    every argument before every call and compute expected values from the originals), so the check sees
    an in-place update where the task asks for one and "modified its input argument" where it does not,
    while nothing the student does reaches the check's own objects. Write-backs keep type, shape, dtype and
    names (elementwise into existing arrays, tensors and parameters; never a new ``.data``), else the call
    fails with a TypeError. Keyword arguments travel the same way but are not written back (checks pass
    only immutable values, such as ``ignore_index=-100``, by keyword). A result that *is* one of the arguments comes back as that same object.
    """

    def __init__(self, sandbox: Sandbox, name: str):
        self.sandbox, self.name, self.__name__ = sandbox, name, name

    def __call__(self, *args, **kwargs):
        reply = self.sandbox.call(self.name, args, kwargs)
        if reply.get("undefined") is True:
            raise NameError(f"{self.name} is not defined (did its cell run without errors?)")
        ok = reply.get("ok")
        if ok is not True:
            info = reply.get("exception")
            if ok is not False or not isinstance(info, dict):
                raise _malformed("no valid 'ok' and 'exception'")
            raise codec.decode_exception(info)
        emitted = reply.get("warnings")
        for info in (emitted[:10] if isinstance(emitted, list) else []):   # warnings the call emitted there
            if not isinstance(info, dict):
                continue
            category = getattr(builtins, str(info.get("category"))[:100], None)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = UserWarning
            warnings.warn(sanitize(str(info.get("message"))[:500], multiline=False), category, stacklevel=2)
        after = reply.get("args_after") or []
        if not isinstance(after, list) or len(after) > len(args):
            raise _malformed("'args_after' is not a list of the arguments")
        for index, state in enumerate(after):
            if state is not None:
                _write_back(args[index], state, f"argument {index}")
        result = reply.get("result")
        if isinstance(result, dict) and "__same_as_arg__" in result:
            index = result["__same_as_arg__"]
            if type(index) is not int or not 0 <= index < len(args) or len(result) != 1:
                raise _malformed("'__same_as_arg__' is not an argument's position")
            return args[index]
        try:
            return codec.decode(result)
        except codec.DecodeError as exc:
            raise TypeError(f"returned a value the grader cannot accept: {exc}") from None
        except (TypeError, ValueError) as exc:  # e.g. an llmspace dataclass whose constructor rejects it
            raise type(exc)(f"returned an invalid value: {exc}") from None


def _describe(value) -> str:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {dtype}"
    return type(value).__name__


def _write_back(arg, encoded, what: str) -> None:
    """Copy the sandbox's state of an in-place argument into the check's object ``arg``. Raises TypeError
    (which the check reports as the student's failure) when the type, shape, dtype or keys differ."""
    import numpy as np
    import torch

    if isinstance(arg, torch.nn.Module):
        if not (isinstance(encoded, dict) and set(encoded) == {"__state_dict__"}):
            raise TypeError(f"{what}: expected the state of a module")
        state = codec.decode(encoded["__state_dict__"])
        current = arg.state_dict(keep_vars=True)
        if not isinstance(state, dict) or set(state) != set(current):
            raise TypeError(f"{what}: the module's parameters and buffers changed names")
        with torch.no_grad():
            for key, value in state.items():
                _copy_tensor(current[key], value, f"{what}: {key}")
        return
    value = codec.decode(encoded)
    if isinstance(arg, np.ndarray):
        if not (isinstance(value, np.ndarray) and value.shape == arg.shape and value.dtype == arg.dtype):
            raise TypeError(f"{what} must stay a {_describe(arg)} when updated in place, became a {_describe(value)}")
        if arg.flags.writeable:
            arg[...] = value
    elif isinstance(arg, torch.Tensor):
        with torch.no_grad():
            _copy_tensor(arg, value, what)
    elif isinstance(arg, dict):
        if not isinstance(value, dict):
            raise TypeError(f"{what} must stay a dict, became a {type(value).__name__}")
        for key in list(arg):
            if key not in value:
                del arg[key]
        for key, new in value.items():
            old = arg.get(key)
            if isinstance(old, (np.ndarray, torch.Tensor)):
                _write_back_value(old, new, f"{what}[{key!r}]")
            else:
                arg[key] = new
    elif isinstance(arg, list):
        if not isinstance(value, list):
            raise TypeError(f"{what} must stay a list when updated in place")
        if len(value) != len(arg):   # a list may shrink or grow in place (pop, append): the check's copy follows
            arg[:] = value
            return
        for i, (old, new) in enumerate(zip(arg, value)):
            if isinstance(old, (np.ndarray, torch.Tensor, dict, list)):
                _write_back_value(old, new, f"{what}[{i}]")
            else:
                arg[i] = new


def _write_back_value(old, new, what: str) -> None:
    """Like :func:`_write_back` for an already decoded value (nested in a list or dict)."""
    import numpy as np
    import torch
    if isinstance(old, np.ndarray):
        if not (isinstance(new, np.ndarray) and new.shape == old.shape and new.dtype == old.dtype):
            raise TypeError(f"{what} must stay a {_describe(old)} when updated in place, became a {_describe(new)}")
        if old.flags.writeable:
            old[...] = new
    elif isinstance(old, torch.Tensor):
        with torch.no_grad():
            _copy_tensor(old, new, what)
    elif isinstance(old, dict):
        if not isinstance(new, dict):
            raise TypeError(f"{what} must stay a dict, became a {type(new).__name__}")
        for key in list(old):
            if key not in new:
                del old[key]
        for key, value in new.items():
            if isinstance(old.get(key), (np.ndarray, torch.Tensor, dict, list)):
                _write_back_value(old[key], value, f"{what}[{key!r}]")
            else:
                old[key] = value
    elif isinstance(old, list):
        if not isinstance(new, list):
            raise TypeError(f"{what} must stay a list when updated in place")
        if len(new) != len(old):
            old[:] = new
            return
        for i, value in enumerate(new):
            if isinstance(old[i], (np.ndarray, torch.Tensor, dict, list)):
                _write_back_value(old[i], value, f"{what}[{i}]")
            else:
                old[i] = value


def _copy_tensor(target, value, what: str) -> None:
    import torch
    if not (isinstance(value, torch.Tensor) and value.shape == target.shape and value.dtype == target.dtype):
        raise TypeError(f"{what} must stay a {_describe(target)} when updated in place, became a {_describe(value)}")
    target.copy_(value)   # elementwise into the existing storage: never a new .data


# ---- the grading loop ----------------------------------------------------------------------------------

_ACTIVE: set = set()                  # sandboxes in use, so that cancel_all() can stop them
_ACTIVE_LOCK = threading.Lock()
_CANCELLED = threading.Event()


def cancel_all() -> None:
    """Stop grading (Ctrl-C): no new notebook starts; every running sandbox is killed, and the notebook
    grading in it ends with :class:`Interrupted` (not a grade). Safe from any thread; see :func:`reset_cancel`."""
    _CANCELLED.set()
    with _ACTIVE_LOCK:
        running = list(_ACTIVE)
    for sandbox in running:
        sandbox.kill()


def reset_cancel() -> None:
    _CANCELLED.clear()


def _reference_cells(assignment: Assignment) -> dict:
    path = notebook_path(assignment)
    if not path.exists():  # the student package ships only the locked setup cells (autograder.student)
        packaged = json.loads((Path(__file__).parent / "locked_cells.json").read_text())[assignment.name]
        return {gid: nbformat.v4.new_code_cell(source, metadata={"nbgrader": {"grade_id": gid, "locked": True}})
                for gid, source in packaged.items()}
    nb = nbformat.read(path, as_version=4)
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def _student_code(nb, assignment: Assignment) -> dict:
    """grade_id -> the source of the student's answer: the task's solution cell, else the cell defining it."""
    code = {}
    for task in assignment.tasks:
        gid = assignment.grade_id(task.function)
        cells = [c for c in nb.cells if c.cell_type == "code" and _nbgrader(c).get("grade_id") == f"{gid}_solution"]
        if not cells:
            pattern = re.compile(rf"^\s*def\s+{re.escape(task.function)}\s*\(", re.M)
            cells = [c for c in nb.cells if c.cell_type == "code" and pattern.search(c.source)]
        code[gid] = cells[0].source if cells else ""
    return code


def _fault(exc: BaseException) -> str:
    """``Type: message (file.py:line in function)`` for the innermost frame of the grader's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "autograder" in f.filename] or frames
    where = f" ({Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name})" if ours else ""
    return f"{type(exc).__name__}: {str(exc)[:300]}{where}"


def grade_notebook(path: Path, assignment: Assignment, *, limits: Limits | None = None, slot: int = 0,
                   hide: tuple = (), isolate: bool | None = None, hidden: bool = True, progress=None) -> Result:
    """Grade one submission. Never raises for anything the submission contains; raises :class:`Interrupted`
    only after :func:`cancel_all`. A fault of the grader is retried once, then reported as ``grader_error``.

    ``hidden=False`` runs the visible cases only (the learner's ``check``); ``progress(event, detail)`` is
    called before each cell (``"cell"``, its index) and each check (``"check"``, its grade_id) and after
    each check (``"checked"``, the item)."""
    faults, last = [], None
    for _attempt in range(2):
        if _CANCELLED.is_set():
            raise Interrupted()
        try:
            result = _grade_once(path, assignment, limits=limits, slot=slot, hide=hide, isolate=isolate,
                                 hidden=hidden, progress=progress)
        except (Interrupted, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a fault of the grader: one student's status, not the batch's
            faults.append(_fault(exc))
            continue
        errors = [f"{gid}: {i['message']}" for gid, i in result.items.items() if i["status"] == "error"]
        if not errors:
            if faults:
                result.cell_errors.append(f"note: graded on the second attempt after a grader fault: {faults[0]}")
            return result.sanitized()
        faults.append("; ".join(errors))
        last = result
    if last is not None:  # checks themselves failed twice: keep the scores that exist
        last.status, last.reason = "grader_error", f"grader error (twice): {faults[-1]}"
        return last.sanitized()
    reason = f"grader error (twice): {faults[-1]}"
    return Result("grader_error", reason, _empty_items(assignment, "grader_error", reason)).sanitized()


def _grade_once(path: Path, assignment: Assignment, *, limits, slot, hide, isolate, hidden=True,
                progress=None) -> Result:
    nb, reason = preflight(path, assignment)
    if nb is None:
        return Result("invalid", reason, _empty_items(assignment, "invalid", reason))
    reference = _reference_cells(assignment)
    tasks = {assignment.grade_id(t.function): t for t in assignment.tasks}
    checks = importlib.import_module(f"autograder.checks.{assignment.topic}")
    items = _empty_items(assignment, "not_run", "not reached")
    result = Result("graded", "", items)
    result.code = _student_code(nb, assignment)

    # The run: student cells in order; locked cells as the instructor wrote them; test cells -> checks.
    plan, seen, student_cells = [], set(), []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        gid = _nbgrader(cell).get("grade_id")
        if gid in tasks:
            if gid not in seen:
                plan.append(("check", gid, index))
                seen.add(gid)
            continue
        ref = reference.get(gid) if gid is not None else None
        if ref is not None and ref.metadata["nbgrader"].get("locked"):
            plan.append(("run", ref.source, index))
        else:
            plan.append(("run", cell.source, index))
            student_cells.append(index)
    plan += [("check", gid, None) for gid in tasks if gid not in seen]  # deleted test cells: grade anyway
    result.tamper_reasons = tamper_scan(nb, assignment, student_cells)
    result.tamper_suspected = bool(result.tamper_reasons)

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
            items[gid].update(score=0, status="error", message=f"grader error: {_fault(exc)}")
        else:
            items[gid].update(score=task.points, status="passed", message="")
        if progress:
            progress("checked", items[gid])

    deferred = []
    sandbox = Sandbox(limits, slot=slot, hide=hide, isolate=isolate)
    with _ACTIVE_LOCK:
        _ACTIVE.add(sandbox)   # before it starts: cancel_all() can kill a sandbox that is still starting
    try:
        if _CANCELLED.is_set():
            raise Interrupted()
        with sandbox:
            for kind, payload, index in plan:
                if _CANCELLED.is_set():
                    raise Interrupted()
                if kind == "run":
                    if progress:
                        progress("cell", index)
                    reply = sandbox.run_cell(payload)
                    err = reply.get("error")
                    if reply.get("ok") is not True and err:
                        if not isinstance(err, dict):
                            raise _malformed("'error' is not an object")
                        result.cell_errors.append(
                            f"cell {index}: {str(err.get('type'))[:100]}: {str(err.get('message'))[:300]}")
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
        if _CANCELLED.is_set():
            raise Interrupted() from None
        result.status, result.reason = gone.status, gone.reason
        for item in items.values():
            if item["status"] == "not_run":
                item["message"] = f"not reached: {gone.reason}"
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(sandbox)
    if _CANCELLED.is_set():
        raise Interrupted()
    return result


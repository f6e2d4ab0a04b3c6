"""Graded checks: one function ``check_<name>(impl, *, hidden=False)`` per exercise function.

A check calls the implementation under test on a list of cases, compares each result with an
independent reference (scipy, numpy, torch — never the reference solution's own output where a
library can answer) and raises :class:`CheckFailed` with a message a student can act on.

* ``hidden=False`` runs the visible cases: their messages show the inputs (as they were *before* the
  student's code ran) and the returned value.
* ``hidden=True`` runs the hidden cases: their messages name the case and the expected property but
  never the inputs nor the returned value, because nbgrader shows these messages in feedback.

Rules every check follows through :class:`Checker` (issue 10):

* **Inputs are protected.** :meth:`Checker.call` deep-copies the arguments before every call; the check
  computes its expected values from its own (original) arguments. A function may change only the
  arguments the check declares with ``mutates=(index, ...)`` (the changed copies are in
  :attr:`Checker.last_args`); any other change fails with "your function modified its input argument".
* **Readable values.** :func:`show` prints numpy scalars as plain numbers, short arrays, tensors and
  sparse matrices in full and long ones as shape + dtype.
* **Direction of numeric errors.** :func:`direction` says "too large by 4×" / "too small by 1" where the
  numbers tell.
* **Dependencies.** A check declares the tasks it builds on (``builds_on=("coo_to_csr",)``); when one of
  them failed its own check for the same student, the failure says so.

The same functions serve four callers: pytest (on the reference library, so every check is known to
pass on a correct answer), the wrong-answer and alternative-answer zoos (``autograder/fixtures``), the
grader (through :class:`autograder.grading.RemoteFunction`) and the locked test cells of the notebooks.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import math
import sys
import weakref

import numpy as np

SHOW_ELEMENTS = 64      # arrays / tensors up to this many elements are shown in full
SHOW_ITEMS = 16         # dicts / lists up to this many items are shown in full
SHOW_CHARS = 1200       # one shown value is cut after this many characters


class CheckFailed(AssertionError):
    """A graded check failed. In IPython it renders as its message alone: a traceback would print
    lines of the check's source, which hidden checks must not reveal."""

    def _render_traceback_(self):  # IPython's hook for custom exception rendering
        return [f"CheckFailed: {line}" if i == 0 else line
                for i, line in enumerate(str(self).splitlines() or [""])]


# ---- showing values --------------------------------------------------------------------------------

def _torch():
    return sys.modules.get("torch")


def _elements(value) -> int:
    torch = _torch()
    if isinstance(value, np.ndarray):
        return value.size
    if torch is not None and isinstance(value, torch.Tensor):
        return value.numel()
    return 0


def show(value, depth: int = 0) -> str:
    """A short, exact, copy-pasteable rendering of an argument or result for visible feedback."""
    text = _show(value, depth)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS - 5] + " ...)"


def _show(value, depth):
    torch = _torch()
    if depth > 4:
        return "..."
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, np.ndarray):
        if value.size <= SHOW_ELEMENTS:
            body = np.array2string(value, separator=", ", threshold=SHOW_ELEMENTS, max_line_width=10**6)
            default = value.dtype in (np.float64, np.int64, np.bool_) or value.size == 0 and value.dtype == np.float64
            return f"np.array({body}" + ("" if default else f", dtype=np.{value.dtype}") + ")"
        return f"<array of shape {value.shape}, dtype {value.dtype}>"
    if torch is not None and isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        if value.numel() <= SHOW_ELEMENTS:
            t = value.detach().cpu()
            array = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            body = np.array2string(array, separator=", ", threshold=SHOW_ELEMENTS, max_line_width=10**6)
            return f"torch.tensor({body}, dtype=torch.{dtype})"
        return f"<tensor of shape {tuple(value.shape)}, dtype torch.{dtype}>"
    if torch is not None and isinstance(value, torch.nn.Module):
        text = " ".join(line.strip() for line in repr(value).splitlines())
        return text if len(text) <= 200 else f"<{type(value).__name__} with " \
                                             f"{sum(p.numel() for p in value.parameters())} parameters>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f for f in dataclasses.fields(value) if f.repr]
        big = sum(_elements(getattr(value, f.name)) for f in fields)
        if big > 3 * SHOW_ELEMENTS:
            parts = [f"{f.name}={_show(getattr(value, f.name), depth + 1)}" for f in fields
                     if not _elements(getattr(value, f.name))]
            nnz = getattr(value, "nnz", None)
            return f"<{type(value).__name__} " + ", ".join(parts + ([f"nnz={nnz}"] if nnz is not None else [])) + ">"
        return f"{type(value).__name__}(" + ", ".join(
            f"{f.name}={_show(getattr(value, f.name), depth + 1)}" for f in fields) + ")"
    if isinstance(value, dict):
        if len(value) > SHOW_ITEMS:
            return f"<dict with {len(value)} entries>"
        return "{" + ", ".join(f"{_show(k, depth + 1)}: {_show(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        if len(value) > SHOW_ITEMS:
            return f"<{type(value).__name__} of {len(value)} items>"
        inner = ", ".join(_show(v, depth + 1) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if callable(value) and hasattr(value, "__name__"):
        module = getattr(value, "__module__", "") or ""
        prefix = "F." if module.startswith("torch.nn.functional") else ""
        return prefix + value.__name__
    if isinstance(value, float):
        return repr(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:195] + " ...>"


# ---- comparing values --------------------------------------------------------------------------------

def same(a, b, depth: int = 0) -> bool:
    """Whether ``b`` is an unchanged copy of ``a`` (values, shapes, dtypes; NaN equals NaN)."""
    torch = _torch()
    if a is b or depth > 24:
        return True
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if torch is not None and isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
            return False
        a, b = a.detach(), b.detach()
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return bool(torch.equal(a, b))
    if torch is not None and isinstance(a, torch.nn.Module):
        return isinstance(b, torch.nn.Module) and same(dict(a.state_dict()), dict(b.state_dict()), depth + 1)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name), depth + 1)
                                          for f in dataclasses.fields(a))
    if callable(a) and callable(b) and not isinstance(a, type):
        return True   # functions (a loss_fn, a functools.partial) are code, not data the answer could change
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(same(a[k], b[k], depth + 1) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y, depth + 1) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values we cannot compare are not judged
        return True


def _copy(value):
    torch = _torch()
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - e.g. a non-leaf tensor
        if torch is not None and isinstance(value, torch.Tensor):
            return value.detach().clone().requires_grad_(value.requires_grad)
        return value


def _ratio_text(r: float) -> str:
    return f"{r:.0f}" if abs(r - round(r)) < 1e-6 else f"{r:.3g}"


def direction(got, expected) -> str:
    """How a numeric result misses: "too large by 4×", "too small by 1", "has the wrong sign", or "".

    Works on numbers and on arrays/tensors of one shape (where the same factor or offset holds for all
    entries, or at least the sign of every error agrees)."""
    torch = _torch()
    try:
        if torch is not None and isinstance(got, torch.Tensor):
            got = got.detach().double().cpu().numpy()
        if torch is not None and isinstance(expected, torch.Tensor):
            expected = expected.detach().double().cpu().numpy()
        g = np.asarray(got, dtype=np.float64).ravel()
        e = np.asarray(expected, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return ""
    if g.shape != e.shape or g.size == 0 or not (np.isfinite(g).all() and np.isfinite(e).all()):
        return ""
    if np.array_equal(g, e):
        return ""
    scalar = g.size == 1
    nz = e != 0
    if nz.any() and not g[~nz].any():
        ratios = g[nz] / e[nz]
        r = float(ratios[0])
        if r != 0 and np.allclose(ratios, r, rtol=1e-6, atol=0):
            if abs(r + 1) < 1e-9:
                return "has the wrong sign"
            whole = lambda k: not scalar or abs(k - round(k)) < 1e-6  # noqa: E731
            if r >= 1.5 and whole(r):
                return f"is too large by {_ratio_text(r)}×"
            if 0 < r <= 1 / 1.5 and whole(1 / r):
                return f"is too small by {_ratio_text(1 / r)}×"
    d = g - e
    if np.allclose(d, d[0], rtol=1e-9, atol=0):
        what = "" if scalar else "every value "
        return f"{what}is too {'large' if d[0] > 0 else 'small'} by {_ratio_text(abs(d[0]))}"
    if (d >= 0).all():
        return "values are too large (none too small)"
    if (d <= 0).all():
        return "values are too small (none too large)"
    return ""


# ---- dependencies between tasks ----------------------------------------------------------------------

_OUTCOMES_BY_SANDBOX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OUTCOMES_BY_GLOBALS: dict = {}


def _outcomes(impl) -> dict | None:
    """Where the results of one student's checks are remembered: per sandbox (remote grading) or per
    namespace the function was defined in (a notebook, a module)."""
    sandbox = getattr(impl, "sandbox", None)
    if sandbox is not None:
        try:
            return _OUTCOMES_BY_SANDBOX.setdefault(sandbox, {})
        except TypeError:
            return None
    namespace = getattr(inspect.unwrap(impl), "__globals__", None)
    if namespace is None:
        return None
    if len(_OUTCOMES_BY_GLOBALS) > 4096:
        _OUTCOMES_BY_GLOBALS.clear()
    return _OUTCOMES_BY_GLOBALS.setdefault(id(namespace), {})


# ---- the checker -------------------------------------------------------------------------------------

def _parameter_names(name: str, module: str | None) -> tuple[str, ...]:
    """Argument names of the reference function ``llmspace.<topic>.<name>`` for messages."""
    if module and module.startswith("autograder.checks."):
        try:
            reference = getattr(importlib.import_module("llmspace." + module.rsplit(".", 1)[-1]), name)
            return tuple(inspect.signature(reference).parameters)
        except (ImportError, AttributeError, TypeError, ValueError):
            pass
    return ()


class Checker:
    """Runs one exercise function on cases and turns every way it can go wrong into a CheckFailed.

    ``builds_on``: names of earlier tasks whose functions this task's answer is expected to use; a
    failure then mentions any of them that failed its own check. ``params``: argument names for
    messages (default: the reference function's)."""

    def __init__(self, name: str, impl, hidden: bool, *, builds_on: tuple = (), params: tuple | None = None):
        if not callable(impl):
            raise CheckFailed(f"{name}: expected a function, got {type(impl).__name__}")
        self.name, self.impl, self.hidden = name, impl, hidden
        self.builds_on = tuple(builds_on)
        caller = sys._getframe(1).f_globals.get("__name__")
        self.params = tuple(params) if params is not None else _parameter_names(name, caller)
        self.last_args: tuple = ()
        self._outcomes = _outcomes(impl)
        if self._outcomes is not None and not hidden:
            self._outcomes[name] = True   # a fresh run (visible cases come first)

    # ---- messages --------------------------------------------------------------------------------

    def where(self, case: str, args=None) -> str:
        if self.hidden:
            return f"{self.name}, hidden case '{case}'"
        if args is None:
            return f"{self.name}, case '{case}'"
        shown = ", ".join(show(a) for a in args)
        return f"{self.name}({shown}) [case '{case}']"

    def arg_name(self, index: int) -> str:
        return self.params[index] if index < len(self.params) else f"#{index + 1}"

    def _raise(self, message: str):
        if self._outcomes is not None:
            self._outcomes[self.name] = False
            failed = [dep for dep in self.builds_on if self._outcomes.get(dep) is False]
            if failed:
                names = ", ".join(f"`{dep}`" for dep in failed)
                message += (f"\nNote: this task builds on {names}, which failed its own check; "
                            f"fix {'that' if len(failed) == 1 else 'those'} first.")
        raise CheckFailed(message)

    def fail(self, case: str, problem: str, args=None):
        self._raise(f"{self.where(case, args)}: {problem}")

    def got(self, value) -> str:
        """``value`` for a message: shown on visible cases, withheld on hidden ones."""
        return "" if self.hidden else show(value)

    # ---- calling ---------------------------------------------------------------------------------

    def _not_implemented(self):
        self._raise(f"{self.name}: not implemented yet (it still raises NotImplementedError)")

    @property
    def remote(self) -> bool:
        """Whether the implementation runs in the grader's sandbox (a RemoteFunction)."""
        return getattr(self.impl, "sandbox", None) is not None

    def call(self, case: str, *args, hint: str = "", mutates: tuple = (), new: bool = False,
             keywords: dict | None = None):
        """Call the implementation on deep copies of ``args``; an exception becomes a CheckFailed.

        ``mutates``: indices of the arguments the task allows (or requires) the function to change; the
        changed copies are in :attr:`last_args`. Any other argument that changes fails the case.
        ``new``: the result must be a new object, not one of the arguments. ``keywords``: keyword
        arguments (immutable values only: they are neither copied nor checked for changes)."""
        copies = tuple(_copy(a) for a in args)
        self.last_args = copies
        try:
            result = self.impl(*copies, **(keywords or {}))
        except NotImplementedError:
            self._not_implemented()
        except CheckFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any error in student code is a failed case
            self._raise(f"{self.where(case, args)} raised {type(exc).__name__}: {exc}"
                        + (f"\nHint: {hint}" if hint else ""))
        self.check_unchanged(case, args, copies, allowed=mutates)
        if new:
            for i, copied in enumerate(copies):
                if result is copied:
                    self.fail(case, f"returned its input argument `{self.arg_name(i)}` itself; the task "
                                    f"asks for a new object", args)
        return result

    def check_unchanged(self, case, originals, copies, allowed=()):
        for i, (original, copied) in enumerate(zip(originals, copies)):
            if i not in allowed and copied is not original and not same(original, copied):
                self.fail(case, f"your function modified its input argument `{self.arg_name(i)}`; "
                                f"leave the inputs unchanged and build the result separately", originals)

    def expect_raises(self, case: str, errors, *args, what: str = "", keywords: dict | None = None):
        """The implementation must reject these arguments with one of ``errors``."""
        errors = errors if isinstance(errors, tuple) else (errors,)
        names = " or ".join(e.__name__ for e in errors)
        copies = tuple(_copy(a) for a in args)
        try:
            result = self.impl(*copies, **(keywords or {}))
        except NotImplementedError:
            self._not_implemented()
        except errors:
            return
        except CheckFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            self.fail(case, f"should raise {names} ({what}), raised {type(exc).__name__}: {exc}", args)
        else:
            returned = "" if self.hidden else f" {show(result)}"
            self.fail(case, f"should raise {names} ({what}) instead of returning{returned or ' a value'}", args)

    # ---- comparisons -----------------------------------------------------------------------------

    def expect_type(self, case, got, cls, args=None):
        if not isinstance(got, cls):
            names = " or ".join(c.__name__ for c in cls) if isinstance(cls, tuple) else cls.__name__
            self.fail(case, f"must return a {names}, got {type(got).__name__}", args)

    def expect_number(self, case, got, expected, args=None, *, what="result", rtol=0.0, atol=0.0, hint=""):
        """A scalar result: equal (integers) or close (floats); the message says which way it misses."""
        try:
            ok = (got == expected) if rtol == 0 and atol == 0 else math.isclose(got, expected, rel_tol=rtol,
                                                                                 abs_tol=atol)
        except TypeError:
            ok = False
        if ok:
            return
        way = direction(got, expected)
        shown = "" if self.hidden else f"got {show(got)}, expected {show(expected)}"
        parts = [p for p in (shown, f"{what} {way}" if way else "") if p]
        self.fail(case, "; ".join(parts or [f"{what} is wrong"]) + (f" — {hint}" if hint else ""), args)

    def expect_array(self, case, got, expected, args=None, *, what="result", exact=None,
                     rtol=1e-7, atol=1e-9, check_dtype=True):
        """Shape, dtype and values of a numpy result. Integers compare exactly, floats to tolerance."""
        if not isinstance(got, np.ndarray):
            self.fail(case, f"{what} must be a numpy array, got {type(got).__name__}", args)
        if got.shape != expected.shape:
            self.fail(case, f"{what} has shape {got.shape}, expected {expected.shape}", args)
        if check_dtype and got.dtype != expected.dtype:
            self.fail(case, f"{what} has dtype {got.dtype}, expected {expected.dtype}", args)
        exact = expected.dtype.kind in "iub" if exact is None else exact
        ok = (np.array_equal(got, expected) if exact
              else np.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True))
        if not ok:
            with np.errstate(all="ignore"):
                diff = np.argwhere(~np.isclose(got, expected, rtol=0 if exact else rtol,
                                               atol=0 if exact else atol, equal_nan=True))
            at = tuple(int(i) for i in diff[0]) if diff.size else ()
            detail = "" if self.hidden or not diff.size else (
                f" (first difference at index {at}: got {show(got[at])}, expected {show(expected[at])}; "
                f"{len(diff)} of {expected.size} entries differ)")
            way = direction(got, expected)
            self.fail(case, f"{what} has wrong values{detail}" + (f"; {what} {way}" if way else ""), args)

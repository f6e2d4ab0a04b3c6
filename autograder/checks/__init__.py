"""Graded checks: one function ``check_<name>(impl, *, hidden=False)`` per exercise function.

A check calls the implementation under test on a list of cases, compares each result with an
independent reference (scipy, numpy, torch — never the reference solution's own output where a
library can answer) and raises :class:`CheckFailed` with a message a student can act on.

* ``hidden=False`` runs the visible cases: their messages show the inputs.
* ``hidden=True`` runs the hidden cases: their messages name the case and the expected property but
  never the inputs, because nbgrader shows these messages in feedback.

The same functions serve three callers: pytest (on the reference library, so every check is known to
pass on a correct answer), the wrong-answer tests (so every check is known to fail on plausible bugs),
and the locked test cells of the exercise notebooks.
"""
from __future__ import annotations

import reprlib

import numpy as np

_short = reprlib.Repr()
_short.maxlist = _short.maxdict = _short.maxtuple = 8
_short.maxstring = _short.maxother = 120


class CheckFailed(AssertionError):
    """A graded check failed. In IPython it renders as its message alone: a traceback would print
    lines of the check's source, which hidden checks must not reveal."""

    def _render_traceback_(self):  # IPython's hook for custom exception rendering
        return [f"CheckFailed: {line}" if i == 0 else line
                for i, line in enumerate(str(self).splitlines() or [""])]


class Checker:
    """Runs one exercise function on cases and turns every way it can go wrong into a CheckFailed."""

    def __init__(self, name: str, impl, hidden: bool):
        if not callable(impl):
            raise CheckFailed(f"{name}: expected a function, got {type(impl).__name__}")
        self.name, self.impl, self.hidden = name, impl, hidden

    def where(self, case: str, args=None) -> str:
        if self.hidden:
            return f"{self.name}, hidden case '{case}'"
        if args is None:
            return f"{self.name}, case '{case}'"
        shown = ", ".join(_short.repr(a) for a in args)
        return f"{self.name}({shown}) [case '{case}']"

    def fail(self, case: str, problem: str, args=None):
        raise CheckFailed(f"{self.where(case, args)}: {problem}")

    def call(self, case: str, *args, hint: str = ""):
        """Call the implementation; an exception becomes a CheckFailed naming the case."""
        try:
            return self.impl(*args)
        except NotImplementedError:
            raise CheckFailed(f"{self.name}: not implemented yet "
                              f"(it still raises NotImplementedError)") from None
        except CheckFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any error in student code is a failed case
            raise CheckFailed(f"{self.where(case, args)} raised {type(exc).__name__}: {exc}"
                              + (f"\nHint: {hint}" if hint else "")) from None

    def expect_raises(self, case: str, errors, *args, what: str = ""):
        """The implementation must reject these arguments with one of ``errors``."""
        errors = errors if isinstance(errors, tuple) else (errors,)
        names = " or ".join(e.__name__ for e in errors)
        try:
            result = self.impl(*args)
        except NotImplementedError:
            raise CheckFailed(f"{self.name}: not implemented yet "
                              f"(it still raises NotImplementedError)") from None
        except errors:
            return
        except Exception as exc:  # noqa: BLE001
            self.fail(case, f"should raise {names} ({what}), raised {type(exc).__name__}: {exc}", args)
        else:
            self.fail(case, f"should raise {names} ({what}) instead of returning "
                            f"{_short.repr(result)}", args)

    # ---- comparisons ------------------------------------------------------------------------------

    def expect_type(self, case, got, cls, args=None):
        if not isinstance(got, cls):
            self.fail(case, f"must return a {cls.__name__}, got {type(got).__name__}", args)

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
            diff = np.argwhere(~np.isclose(got, expected, rtol=0 if exact else rtol,
                                           atol=0 if exact else atol))
            at = tuple(int(i) for i in diff[0]) if diff.size else ()
            detail = "" if self.hidden or not diff.size else (
                f" (first difference at index {at}: got {got[at]!r}, expected {expected[at]!r})")
            self.fail(case, f"{what} has wrong values{detail}", args)

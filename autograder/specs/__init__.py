"""Assignment specs: the cells of each exercise notebook, in order.

An assignment interleaves prose (:class:`Markdown`) with tasks (:class:`Task`). A task names a function
of the assignment's reference module; :mod:`autograder.sync` turns it into two cells — the function's
source, verbatim, as the solution cell (nbgrader's markers already sit inside its body), and a locked,
graded test cell that runs ``autograder.checks.<topic>.check_<function>`` on it, visible cases first,
hidden cases between nbgrader's hidden-test markers.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class Task:
    function: str          # name of a function in the assignment's module
    points: int
    module: str | None = None   # the function's module when it is not the assignment's
    # Library equivalents of the very function asked for (dotted names, prefixes match): a submission
    # that uses one is flagged for review (never auto-zeroed).
    forbids: tuple = ()


@dataclass(frozen=True)
class Assignment:
    name: str              # exNN_topic: folder and notebook name, prefix of every grade_id
    module: str            # the reference module, e.g. "llmspace.sparse"
    title: str
    cells: list = field(default_factory=list)

    @property
    def topic(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    @property
    def prefix(self) -> str:
        return self.name.split("_", 1)[0]   # "ex01"

    def grade_id(self, function: str) -> str:
        return f"{self.prefix}_{function}"

    @property
    def tasks(self) -> list[Task]:
        return [c for c in self.cells if isinstance(c, Task)]

    @property
    def max_score(self) -> int:
        return sum(t.points for t in self.tasks)


def all_assignments() -> dict[str, Assignment]:
    """Every ``ASSIGNMENT`` defined in a module of this package, by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        assignment = getattr(module, "ASSIGNMENT", None)
        if isinstance(assignment, Assignment):
            found[assignment.name] = assignment
    return dict(sorted(found.items()))

"""Graded checks, the exercise-notebook sync tool and the grading CLI of the llmspace course.

* :mod:`autograder.checks` — ``check_<function>(impl, hidden=False)``: the one definition of what a
  correct answer is. pytest runs them on the reference library; notebook test cells run them on students.
* :mod:`autograder.specs` — the layout of each assignment notebook (prose, tasks, points).
* :mod:`autograder.sync` — builds ``exercises/source/<assignment>/<assignment>.ipynb`` from the specs and
  the reference functions (``--check`` reports drift).
* :mod:`autograder.cli` — ``python -m autograder check|grade``.
"""

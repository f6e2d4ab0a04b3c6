"""Helpers to build student submissions from the instructor notebook (for grading tests)."""
import inspect
import re

import nbformat


def solution_cells(nb):
    return {c.metadata["nbgrader"]["grade_id"].removesuffix("_solution"): c
            for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")}


def with_answers(nb, prefix: str, answers: dict) -> nbformat.NotebookNode:
    """Copy of ``nb`` whose solution cells for the given functions hold ``answers[function]`` — a source
    string or a function object (renamed to the task's name, as a student would have written it)."""
    nb = nbformat.from_dict(nb)
    cells = solution_cells(nb)
    for function, answer in answers.items():
        source = answer if isinstance(answer, str) else inspect.getsource(answer)
        source = re.sub(r"^def \w+\(", f"def {function}(", source, count=1, flags=re.M)
        cells[f"{prefix}_{function}"].source = source
    return nb


def release_all(course, source, assignments):
    """Release every assignment with nbgrader's own ``generate_assignment``, in this process (one nbgrader
    import for all of them); returns ``course/release``."""
    import shutil

    from nbgrader.apps import NbGraderAPI
    from traitlets.config.loader import PyFileConfigLoader
    shutil.copy(source / "nbgrader_config.py", course)
    shutil.copytree(source / "source", course / "source")
    config = PyFileConfigLoader("nbgrader_config.py", str(course)).load_config()
    config.CourseDirectory.root = str(course)
    config.CourseDirectory.db_url = f"sqlite:///{course}/gradebook.db"
    api = NbGraderAPI(config=config)
    for a in assignments:
        done = api.generate_assignment(a.name, force=True)
        assert done["success"], done.get("error")
    return course / "release"

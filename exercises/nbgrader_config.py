"""nbgrader course configuration for the llmspace exercises (run nbgrader from this folder).

source/ holds the instructor notebooks, generated from solutions/ by `python -m autograder.sync`;
release/, submitted/, autograded/ and feedback/ are nbgrader's working folders (git-ignored).
"""
import os

c = get_config()  # noqa: F821 - provided by nbgrader

here = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.root = here
c.CourseDirectory.course_id = "llmspace"
# SQLite by default; an instructor running several graders points this at PostgreSQL instead.
c.CourseDirectory.db_url = os.environ.get("LLMSPACE_GRADEBOOK_URL", f"sqlite:///{here}/gradebook.db")

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
# Per-cell limit while autograding; interrupt_on_timeout stays True so an infinite loop is cut, not fatal.
c.Execute.timeout = 120
c.ClearHiddenTests.enforce_metadata = True

# Feedback is built from the autograded notebook, which holds the hidden tests: strip them again.
# (Their failure messages stay, and the checks word those without the hidden inputs.)
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests, GetGrades  # noqa: E402

c.GenerateFeedback.preprocessors = [GetGrades, ClearHiddenTests, CSSHTMLHeaderPreprocessor]

"""Per-student feedback (HTML and Markdown) from a grading result, rendered from Jinja templates
(``autograder/templates/feedback.html.j2`` and ``feedback.md.j2``, autoescaped for HTML).

Each question shows the student's own answer (the source of their solution cell) next to its score, status
and the check's message — messages never contain hidden inputs or check code — with a link to the section of
the chapter that teaches it; then the errors the student's own cells raised, the status of the whole
submission and when it was submitted and graded. The HTML is one self-contained page that reads on a phone
(viewport meta, fluid width, code that scrolls sideways instead of widening the page).

Section links point at ``$LLMSPACE_BOOK_URL`` (the published book), or at the local build in ``_build/html``.
"""
from __future__ import annotations

import functools
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import jinja2

from autograder.grading import Result, sanitize
from autograder.specs import all_assignments
from autograder.sync import ROOT

TEMPLATES = Path(__file__).parent / "templates"
STATUS_TEXT = {
    "graded": "graded", "invalid": "not gradable", "missing": "not found", "timeout": "stopped: time limit",
    "kernel_died": "stopped: the notebook's process ended", "resource_exceeded": "stopped: resource limit",
    "grader_error": "grader error — your instructor has been told",
}


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=jinja2.select_autoescape(["html.j2"]), keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["md_cell"] = lambda text: sanitize(text, multiline=False).replace("|", "\\|").replace("`", "'")
    env.filters["score"] = lambda value: f"{float(value):g}"
    return env


def book_url() -> str:
    return os.environ.get("LLMSPACE_BOOK_URL", (ROOT / "_build" / "html").as_uri()).rstrip("/")


def _make_id(title: str) -> str:
    """The HTML id docutils gives a section with this title (``docutils.nodes.make_id``)."""
    from docutils import nodes
    return nodes.make_id(title)


@functools.lru_cache(maxsize=None)
def section_links(assignment_name: str) -> dict[str, str]:
    """function -> URL of the chapter section that teaches it: the first ``##``/``###`` section of the
    chapter page (before its interview questions) that mentions the function; else the chapter page."""
    assignment = all_assignments()[assignment_name]
    pages = sorted((ROOT / "book").glob(f"{assignment.name[2:4]}-*/index.md"))
    if not pages:
        return {}
    page = pages[0]
    url = f"{book_url()}/{page.parent.relative_to(ROOT).as_posix()}/index.html"
    lines = page.read_text().splitlines()
    links = {}
    for task in assignment.tasks:
        heading, link = None, url
        mention = re.compile(rf"`{re.escape(task.function)}`|\b{re.escape(task.function)}\(")
        for line in lines:
            if line.startswith(("## ", "### ")):
                heading = line.lstrip("#").strip()
                if heading.lower().startswith("interview"):
                    break
            elif heading and mention.search(line):
                link = f"{url}#{_make_id(heading)}"
                break
        links[task.function] = link
    return links


def _context(student: str, assignment_name: str, result: Result, submitted_at: datetime | None,
             graded_at: datetime | None) -> dict:
    assignment = all_assignments().get(assignment_name)
    tasks = {assignment.grade_id(t.function): t.function for t in assignment.tasks} if assignment else {}
    links = section_links(assignment_name) if assignment else {}
    graded_at = graded_at or datetime.now(timezone.utc)
    items = []
    for gid, item in result.items.items():
        function = tasks.get(gid, gid)
        items.append({"id": gid, "function": function, "score": item["score"], "max_score": item["max_score"],
                      "status": item["status"], "message": item["message"], "code": result.code.get(gid, ""),
                      "link": links.get(function, "")})
    stamp = "%Y-%m-%d %H:%M UTC"
    return {"student": student, "assignment": assignment_name,
            "title": assignment.title if assignment else assignment_name,
            "status": result.status, "status_text": STATUS_TEXT.get(result.status, result.status),
            "reason": result.reason, "score": result.score, "max_score": result.max_score, "items": items,
            "cell_errors": result.cell_errors,
            "submitted": submitted_at.strftime(stamp) if submitted_at else "",
            "graded": graded_at.astimezone(timezone.utc).strftime(stamp), "graded_iso": graded_at.isoformat()}


def markdown(student: str, assignment: str, result: Result, *, submitted_at: datetime | None = None,
             graded_at: datetime | None = None) -> str:
    return _environment().get_template("feedback.md.j2").render(
        _context(student, assignment, result, submitted_at, graded_at))


def to_html(student: str, assignment: str, result: Result, *, submitted_at: datetime | None = None,
            graded_at: datetime | None = None) -> str:
    return _environment().get_template("feedback.html.j2").render(
        _context(student, assignment, result, submitted_at, graded_at))

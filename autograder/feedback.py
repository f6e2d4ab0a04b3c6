"""Per-student feedback (HTML and Markdown) from a grading result: statuses, scores and the checks'
messages — which never contain hidden inputs or check code — plus the errors the student's own cells raised."""
from __future__ import annotations

import html

from autograder.grading import Result


def markdown(student: str, assignment: str, result: Result) -> str:
    lines = [f"# {assignment} — feedback for {student}", "",
             f"**Status:** {result.status}" + (f" — {result.reason}" if result.reason else ""),
             f"**Score:** {result.score:g} / {result.max_score:g}", "",
             "| Question | Score | Status | Message |", "|---|---|---|---|"]
    for gid, item in result.items.items():
        message = item["message"].replace("|", "\\|").replace("\n", "<br>")
        lines.append(f"| {gid} | {item['score']:g}/{item['max_score']:g} | {item['status']} | {message} |")
    if result.cell_errors:
        lines += ["", "## Errors raised by your cells", ""] + [f"- {e}" for e in result.cell_errors]
    return "\n".join(lines) + "\n"


def to_html(student: str, assignment: str, result: Result) -> str:
    rows = "\n".join(
        f"<tr class='{html.escape(i['status'])}'><td>{html.escape(gid)}</td><td>{i['score']:g}/{i['max_score']:g}</td>"
        f"<td>{html.escape(i['status'])}</td><td><pre>{html.escape(i['message'])}</pre></td></tr>"
        for gid, i in result.items.items())
    errors = "".join(f"<li>{html.escape(e)}</li>" for e in result.cell_errors)
    reason = f" — {html.escape(result.reason)}" if result.reason else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(assignment)} feedback</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}td,th{{border:1px solid #ccc;padding:.3rem;
vertical-align:top}}table{{border-collapse:collapse}}pre{{white-space:pre-wrap;margin:0}}
tr.passed td:nth-child(3){{color:#080}}tr.failed td:nth-child(3){{color:#a00}}</style></head><body>
<h1>{html.escape(assignment)} — feedback for {html.escape(student)}</h1>
<p><b>Status:</b> {html.escape(result.status)}{reason}<br><b>Score:</b> {result.score:g} / {result.max_score:g}</p>
<table><tr><th>Question</th><th>Score</th><th>Status</th><th>Message</th></tr>
{rows}</table>
{"<h2>Errors raised by your cells</h2><ul>" + errors + "</ul>" if errors else ""}
</body></html>
"""

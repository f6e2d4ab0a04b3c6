"""Math typeset at build time: the reader gets MathJax's HTML output (CHTML) and its fonts, not the 1.1 MiB
MathJax script that would typeset the same TeX again in every reader's browser.

A Sphinx HTML math renderer (`html_math_renderer = "static_mathjax"`). Each formula goes to one Node.js
process running the MathJax that sphinx-mathjax-offline ships (book/_ext/static_math.js); the page gets the
returned `<mjx-container>` markup, and pages with math get a `<style>` with the rules for the characters
they use, whose `@font-face` rules point at the MathJax woff fonts copied to `_static/mathjax-fonts/`.
A TeX error (unknown macro, missing brace) fails the build with the document and the formula.

Equation numbers and permalinks follow sphinx.ext.mathjax's HTML (`span.eqno`); the TeX source stays in
the page as the formula's `aria-label`, for screen readers and for copying.
"""
from __future__ import annotations

import atexit
import html
import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from docutils import nodes
from sphinx.errors import ExtensionError
from sphinx.locale import _
from sphinx.util.math import get_node_equation_number

SCRIPT = Path(__file__).with_name("static_math.js")
FONTS = "_static/mathjax-fonts"


def _mathjax_dir() -> Path:
    package = importlib.import_module("sphinx-mathjax-offline")      # MathJax 3 (es5 build), offline
    return Path(package.__file__).parent / "static" / "mathjax"


class _MathJax:
    """One `node static_math.js` per writing process, started on first use (Sphinx may fork writers)."""

    def __init__(self):
        self.proc, self.pid, self.count = None, None, 0

    def _ask(self, request: dict) -> dict:
        if self.proc is None or self.pid != os.getpid():
            node = shutil.which("node") or shutil.which("nodejs")
            if node is None:
                raise ExtensionError("static_math: Node.js (`node`) is needed to typeset the book's math")
            self.proc = subprocess.Popen([node, str(SCRIPT), str(_mathjax_dir())], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1)
            self.pid = os.getpid()
            atexit.register(self.proc.kill)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise ExtensionError(f"static_math: the MathJax process exited ({self.proc.poll()})")
        return json.loads(line)

    def typeset(self, tex: str, display: bool, where: str) -> str:
        answer = self._ask({"tex": tex, "display": display})
        self.count += 1
        if "error" in answer:
            raise ExtensionError(f"static_math: {where}: TeX error {answer['error']!r} in {tex!r}")
        return answer["html"]

    def stylesheet(self) -> str:
        """The rules for the characters typeset since the last call ("" if none), then forget them."""
        if not self.count or self.pid != os.getpid():
            return ""
        self.count = 0
        return self._ask({"css": True})["css"]


MATHJAX = _MathJax()


def _container(translator, tex: str, display: bool) -> str:
    markup = MATHJAX.typeset(tex, display, where=translator.builder.current_docname)
    label = html.escape(tex.strip(), quote=True)
    # role=math + the TeX as label: screen readers and copy get the source (CHTML itself is glyph boxes)
    return markup.replace("<mjx-container ", f'<mjx-container role="math" aria-label="{label}" ', 1)


def visit_math(self, node: nodes.math) -> None:
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate nohighlight"))
    self.body.append(_container(self, node.astext(), display=False) + "</span>")
    raise nodes.SkipNode


def visit_displaymath(self, node: nodes.math_block) -> None:
    # the same structure as sphinx.ext.mathjax.html_visit_displaymath, typeset instead of \[...\]
    self.body.append(self.starttag(node, "div", CLASS="math notranslate nohighlight"))
    if node["nowrap"]:                      # amsmath environments (align, equation, ...) as written
        tex = node.astext()
    else:
        if node["number"]:
            number = get_node_equation_number(self, node)
            self.body.append('<span class="eqno">(%s)' % number)
            self.add_permalink_ref(node, _("Link to this equation"))
            self.body.append("</span>")
        parts = [part for part in node.astext().split("\n\n") if part.strip()]
        parts = [r"\begin{split}" + p + r"\end{split}" if r"\\" in p else p for p in parts]
        tex = r"\begin{align}\begin{aligned}" + r"\\".join(parts) + r"\end{aligned}\end{align}" \
            if len(parts) > 1 else parts[0]
    self.body.append(_container(self, tex, display=True) + "</div>\n")
    raise nodes.SkipNode


def _page_styles(app, pagename, templatename, context, doctree):
    # The characters this page used since the last page (one writer process writes pages one by one).
    if app.builder.format != "html" or app.builder.math_renderer_name != "static_mathjax":
        return
    css = MATHJAX.stylesheet()
    if not css:                              # no formula on this page
        return
    fonts = context["pathto"](FONTS, 1)
    css = css.replace("@FONTS@", fonts)
    context["metatags"] = context.get("metatags", "") + f'<style id="llmspace-math">{css}</style>\n'


def _copy_fonts(app, exc):
    if exc is None and app.builder.format == "html":
        shutil.copytree(_mathjax_dir() / "output" / "chtml" / "fonts" / "woff-v2",
                        Path(app.outdir) / FONTS, dirs_exist_ok=True)


def setup(app):
    app.add_html_math_renderer("static_mathjax", (visit_math, None), (visit_displaymath, None))
    app.connect("html-page-context", _page_styles)
    app.connect("build-finished", _copy_fonts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

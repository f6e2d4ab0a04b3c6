"""Code you can open: inline code in the book that names library code, a repository file or a test becomes a
link (tests/test_book.py::test_chapters_link_their_code).

* ``llmspace.sparse.csr_matvec``, ``csr_matvec()``, ``CSR.nbytes``: when the name (with or without the
  ``llmspace.`` prefix and module) is an object documented in the API reference (book/api/, autodoc), a
  link to its entry; a short name links only when it is unique.
* In code cells, the names a page imports from ``llmspace`` (``from llmspace import sparse as S`` ...
  ``S.csr_matvec``; ``from llmspace.memory import LLAMA2_7B`` ... ``LLAMA2_7B``) link to the same entries.
* ``tests/test_memory.py``, ``benchmarks/prune_tiny_lm.py``, ``benchmarks/results/gguf_load.json``,
  ``tests/test_storage.py::test_sigkill_during_save...``: a highlighted copy of the file in the site
  (``_repo/<path>.html``, the way sphinx.ext.viewcode shows the library; ``solutions/llmspace/*.py`` links
  to viewcode's own page), at the test's line. A test or file the text names that does not exist is a build
  warning (an error under -W): the book cannot promise code that is not there.

No repository URL is configured (the book works offline), so the site carries the files it links.
"""
from __future__ import annotations

import ast
import html
import re
from pathlib import Path

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
REPO_PAGES = "_repo"
REPO_PATH = re.compile(r"^(tests|benchmarks|autograder|solutions)/[\w./-]+\.(py|json)(::(\w+))?$")
COMMAND = re.compile(r"^python3? ((?:benchmarks|autograder|tests)/[\w./-]+\.py)(?: .*)?$")   # `python benchmarks/x.py`
NAME = re.compile(r"^[A-Za-z_][\w.]*(\(\))?$")
BARE_TEST = re.compile(r"^test_\w+$")


def _definitions(path: Path) -> dict[str, int]:
    """Top-level and class-level function/class names of a Python file -> line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines.setdefault(node.name, node.lineno)
    return lines


def _test_index() -> dict[str, list[tuple[str, int]]]:
    index: dict[str, list[tuple[str, int]]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name, line in _definitions(path).items():
            if name.startswith("test_"):
                index.setdefault(name, []).append((path.relative_to(ROOT).as_posix(), line))
    return index


def _collect_repo_files(app, doctree):
    """Read phase: remember the repository files each document names (their pages are written later)."""
    env = app.env
    if not hasattr(env, "llmspace_repo_files"):
        env.llmspace_repo_files = {}
    files = set()
    for literal in doctree.findall(nodes.literal):
        match = REPO_PATH.match(literal.astext())
        command = COMMAND.match(literal.astext())
        if match:
            files.add(literal.astext().split("::")[0])
        elif command:
            files.add(command.group(1))
        elif BARE_TEST.match(literal.astext()):
            files.update(path for path, _ in _test_index().get(literal.astext(), ())[:1])
    env.llmspace_repo_files[env.docname] = files


def _purge(app, env, docname):
    getattr(env, "llmspace_repo_files", {}).pop(docname, None)


def _merge(app, env, docnames, other):
    env.llmspace_repo_files = getattr(env, "llmspace_repo_files", {})
    env.llmspace_repo_files.update({d: getattr(other, "llmspace_repo_files", {}).get(d, set()) for d in docnames})


def _ancestors(node):
    while node.parent is not None:
        node = node.parent
        yield node


class CodeLinks(SphinxPostTransform):
    default_priority = 5          # before the reference resolver: the new nodes are plain references
    formats = ("html",)

    def run(self, **kwargs):
        objects = self.env.get_domain("py").objects
        short: dict[str, list[str]] = {}
        for full in objects:
            if full.startswith("llmspace."):
                parts = full.split(".")
                for i in range(1, len(parts)):
                    short.setdefault(".".join(parts[i:]), []).append(full)
        tests = None
        depth = self.env.docname.count("/")
        for literal in list(self.document.findall(nodes.literal)):
            if "xref" in literal["classes"] or any(isinstance(a, (nodes.reference, nodes.title, nodes.literal_block))
                                                   for a in _ancestors(literal)):
                continue
            text = literal.astext()
            uri = None
            repo, command = REPO_PATH.match(text), COMMAND.match(text)
            if repo:
                uri = self._repo_uri(text, depth)
            elif command:
                uri = self._repo_uri(command.group(1), depth)
            elif BARE_TEST.match(text):
                tests = tests if tests is not None else _test_index()
                found = tests.get(text, [])
                if len(found) == 1:
                    uri = "../" * depth + f"{REPO_PAGES}/{found[0][0]}.html#L-{found[0][1]}"
            elif NAME.match(text):
                name = text.removesuffix("()")
                full = name if name in objects and name.startswith("llmspace.") else None
                candidates = short.get(name, [])
                # a bare name links only to a unique function or class (`nbytes` alone could be anything)
                if full is None and len(candidates) == 1 and ("." in name or objects[candidates[0]].objtype
                                                              in ("function", "class", "exception")):
                    full = candidates[0]
                if full is not None:
                    entry = objects[full]
                    uri = self.app.builder.get_relative_uri(self.env.docname, entry.docname) + "#" + entry.node_id
            if uri:
                ref = nodes.reference("", "", internal=True, refuri=uri, classes=["llmspace-code-link"])
                literal.replace_self(ref)
                ref += literal
        self.document["llmspace_imports"] = self._imports(objects)

    def _imports(self, objects) -> dict[str, str]:
        """Names the page's Python code binds to llmspace modules and objects -> their full names."""
        bound = {}
        for block in self.document.findall(nodes.literal_block):
            code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line    # IPython magics
                             for line in block.astext().splitlines())
            try:
                tree = ast.parse(code)
            except SyntaxError:                   # not Python (shell, output, IPython magics)
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llmspace":
                    for alias in node.names:
                        full = f"{node.module}.{alias.name}"
                        if full in objects:
                            bound[alias.asname or alias.name] = full
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("llmspace.") and alias.name in objects and alias.asname:
                            bound[alias.asname] = alias.name
        return bound

    def _repo_uri(self, text: str, depth: int) -> str | None:
        path, _, test = text.partition("::")
        where = f"{self.env.docname}: `{text}`"
        if not (ROOT / path).is_file():
            logger.warning(f"code_links: {where} names a file that does not exist", location=self.document)
            return None
        if _viewcode_module(path):                              # sphinx.ext.viewcode's highlighted page
            module = path.removeprefix("solutions/").removesuffix(".py").removesuffix("/__init__")
            return "../" * depth + f"_modules/{module}.html"
        anchor = ""
        if test:
            line = _definitions(ROOT / path).get(test)
            if line is None:
                logger.warning(f"code_links: {where}: no `{test}` in {path}", location=self.document)
                return None
            anchor = f"#L-{line}"
        return "../" * depth + f"{REPO_PAGES}/{path}.html{anchor}"


def _viewcode_module(path: str) -> bool:
    """Library modules have sphinx.ext.viewcode's page; every other file (the library's data files such as
    ``solutions/llmspace/assets/tiny_lm.json`` included) gets a copy under ``_repo/``."""
    return path.startswith("solutions/llmspace/") and path.endswith(".py")


_CODE_NAME = re.compile(r'(<span class="n">(\w+)</span><span class="o">\.</span>)?<span class="n">(\w+)</span>'
                        r'|<span class="nn">(llmspace(?:\.\w+)*)</span>')


def _link_code_cells(app, pagename, templatename, context, doctree):
    """Highlighted code cells: wrap the llmspace names the page imported in links to their API entries."""
    bound = doctree.get("llmspace_imports") if doctree is not None else None
    if not bound or "body" not in context:
        return
    objects = app.env.get_domain("py").objects

    def uri(full):
        entry = objects[full]
        return app.builder.get_relative_uri(pagename, entry.docname) + "#" + entry.node_id

    def link(match):
        owner, attribute, name, module = match.group(2), match.group(3), match.group(3), match.group(4)
        if module:
            return f'<a class="llmspace-code-link" href="{uri(module)}">{match.group(0)}</a>' if module in objects \
                else match.group(0)
        if owner:
            full = f"{bound.get(owner, '')}.{attribute}"
            if owner in bound and full in objects:
                head = match.group(1)
                return f'{head}<a class="llmspace-code-link" href="{uri(full)}"><span class="n">{attribute}</span></a>'
            return match.group(0)
        if name in bound:
            return f'<a class="llmspace-code-link" href="{uri(bound[name])}">{match.group(0)}</a>'
        return match.group(0)

    context["body"] = _CODE_NAME.sub(link, context["body"])


def _repo_pages(app):
    """Write phase: one highlighted page per repository file the book names (like viewcode's pages)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_for_filename

    files = set()
    for names in getattr(app.env, "llmspace_repo_files", {}).values():
        files.update(f for f in names if not _viewcode_module(f))
    formatter = HtmlFormatter(lineanchors="L", linespans=None, cssclass="highlight", wrapcode=True)
    for path in sorted(files):
        source = ROOT / path
        if not source.is_file():
            continue
        code = source.read_text(encoding="utf-8")
        body = (f"<h1>{html.escape(path)}</h1>\n<p>The repository file as this book was built from it "
                f"({len(code.splitlines())} lines).</p>\n"
                + highlight(code, get_lexer_for_filename(path), formatter))
        yield f"{REPO_PAGES}/{path}", {"title": path, "body": body, "parents": []}, "page.html"


def setup(app):
    app.connect("doctree-read", _collect_repo_files)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    app.add_post_transform(CodeLinks)
    app.connect("html-collect-pages", _repo_pages)
    app.connect("html-page-context", _link_code_cells)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}

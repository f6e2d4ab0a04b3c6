"""The built book (`make book` → _build/html), opened in headless Chromium like a reader would.

Serves _build/html on 127.0.0.1, opens the home page and every chapter from the sidebar, and asserts:
math rendered by the locally shipped MathJax (`mjx-container`), no browser-console errors, no request
leaving 127.0.0.1, the exercise download link resolves, and no execution-failure reports.
"""
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser


def _require(condition: bool, reason: str):
    if not condition:
        if os.environ.get("CI"):  # in CI `make test` builds the book and installs chromium first
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def site():
    _require((HTML / "index.html").exists(), "book not built: run `make book` first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    handler.func.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    _require(Path(CHROMIUM).exists(), "Debian chromium not installed (`make chromium`)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-quic", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.console_errors, page.foreign_requests = [], []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("response", lambda r: r.status >= 400 and page.console_errors.append(f"HTTP {r.status} {r.url}"))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", None)
            and not r.url.startswith("data:") and page.foreign_requests.append(r.url))
    yield page
    context.close()


def test_no_execution_reports():
    _require((HTML / "index.html").exists(), "book not built: run `make book` first")
    assert not (HTML / "reports").exists(), "a notebook failed to execute: see _build/html/reports/"


def test_reader_walks_the_book(site, page):
    page.goto(f"{site}/index.html")
    page.wait_for_url("**/book/intro.html")
    assert "llmspace" in page.title()
    links = page.locator("nav.bd-docs-nav a.reference.internal")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    assert any("01-sparse-storage" in h for h in hrefs) and any("interview" in h for h in hrefs)
    for i in range(links.count()):
        link = page.locator("nav.bd-docs-nav a.reference.internal").nth(i)
        label = link.inner_text()
        link.click()
        page.wait_for_load_state("load")
        assert page.locator("main h1").count() >= 1, label
    assert not page.console_errors, page.console_errors
    assert not page.foreign_requests, page.foreign_requests


def test_chapter_renders_math_plots_and_exercise_link(site, page):
    page.goto(f"{site}/book/01-sparse-storage/index.html")
    page.wait_for_selector("mjx-container", state="attached", timeout=15000)
    assert page.locator("mjx-container").count() >= 3
    assert page.locator("main img").count() >= 2  # the executed matplotlib figures
    href = page.locator("a.reference.download").first.get_attribute("href")
    assert href.endswith("ex01_sparse.ipynb")
    response = page.request.get(f"{site}/book/01-sparse-storage/{href}")
    assert response.ok and b'"nbgrader"' in response.body()
    assert b"BEGIN SOLUTION" not in response.body()  # the student version, not the answers
    page.locator("details.sd-dropdown summary").first.click()  # an interview answer opens
    assert page.locator("details.sd-dropdown[open]").count() == 1
    assert not page.console_errors, page.console_errors
    assert not page.foreign_requests, page.foreign_requests


def test_interview_index_links_resolve(site, page):
    page.goto(f"{site}/book/interview.html")
    links = page.locator("main a.reference.internal[href*='#iq-']")
    assert links.count() >= 10
    target = links.first.get_attribute("href")
    page.goto(f"{site}/book/{target}")
    anchor = target.split("#", 1)[1]
    assert page.locator(f"[id='{anchor}']").count() == 1
    assert not page.console_errors, page.console_errors


def test_every_chapter_offers_the_student_wheel_beside_its_notebook():
    """Each chapter links its exercise notebook and the student package (`make student`, built by `make
    book`); the linked file is that wheel, with the stubbed library and without the answers' fixtures."""
    import re
    import zipfile

    from autograder.student import wheel_name
    _require((HTML / "index.html").exists(), "book not built: run `make book` first")
    chapters = sorted((HTML / "book").glob("0*/index.html"))
    assert chapters
    for chapter in chapters:
        text = chapter.read_text()
        notebooks = re.findall(r'href="([^"]+\.ipynb)"', text)
        wheels = re.findall(rf'href="([^"]+/{re.escape(wheel_name())})"', text)
        assert notebooks and wheels, chapter
        path = (chapter.parent / wheels[0]).resolve()
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        assert "llmspace/sparse.py" in names and "autograder/checks/sparse.py" in names
        assert not any("fixtures" in n for n in names)

"""The built book (`make book` → _build/html), opened in headless Chromium like a reader would.

Serves _build/html on 127.0.0.1, opens the home page and every chapter from the sidebar, and asserts:
math rendered by the locally shipped MathJax (`mjx-container`), no browser-console errors, no request
leaving 127.0.0.1, the exercise download link resolves, and no execution-failure reports. On every chapter
page: each figure is a numbered, captioned <figure> with descriptive alt text and vector text of at least
10 pt at the reading width; no output shows an object repr (`at 0x...`) or a space-padded text table.
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


# ------------------------------------------------------------------------------------------------
# The memory calculator's JavaScript is a port of llmspace.memory: the Python estimator is the contract
# ------------------------------------------------------------------------------------------------

MEMCALC_JS = ROOT / "book" / "_static" / "memcalc.js"


def _random_config(rng):
    from llmspace.memory import TransformerConfig
    n_heads = rng.choice([1, 2, 3, 4, 6, 8, 9, 12, 16])
    kv = rng.choice([k for k in range(1, n_heads + 1) if n_heads % k == 0])
    attention = rng.choice(["sdpa", "math"])
    if attention == "math":
        kv = n_heads
    return TransformerConfig(vocab_size=rng.randint(1, 70000), d_model=n_heads * rng.randint(1, 96),
                             n_layers=rng.randint(1, 12), n_heads=n_heads, d_ff=rng.randint(1, 3000),
                             max_seq_len=rng.randint(1, 9000), n_kv_heads=rng.choice([None, kv]),
                             norm=rng.choice(["layernorm", "rmsnorm"]), mlp=rng.choice(["gelu", "swiglu"]),
                             bias=rng.random() < 0.5, learned_positions=rng.random() < 0.5,
                             tie_embeddings=rng.random() < 0.5, attention=attention)


def _js_config(config):
    import dataclasses
    return dataclasses.asdict(config)


def test_memcalc_presets_match_the_books_shapes(browser):
    """The page's Llama-2 presets are the estimator's LLAMA2_7B / LLAMA2_70B, field by field."""
    from llmspace.memory import LLAMA2_7B, LLAMA2_70B
    page = browser.new_page()
    page.add_script_tag(content=MEMCALC_JS.read_text())
    presets = page.evaluate("window.llmspaceMemory.PRESETS")
    page.close()
    for name, config in (("Llama-2-7B", LLAMA2_7B), ("Llama-2-70B", LLAMA2_70B)):
        assert presets[name] == _js_config(config), name


def test_memcalc_matches_python(browser):
    """300 random configurations (shapes, policies, optimizers, ZeRO stages, ranks, batch, checkpointing,
    KV and weight dtypes) plus the presets: every byte count of the page equals the Python estimator's."""
    import random

    from llmspace.kv_cache import kv_cache_bytes
    from llmspace.memory import (OPTIMIZER_STATE_BYTES, PRECISION_POLICIES, count_parameters,
                                 estimate_training_memory)
    page = browser.new_page()
    page.add_script_tag(content=MEMCALC_JS.read_text())
    presets = page.evaluate("window.llmspaceMemory.PRESETS")
    from llmspace.memory import TransformerConfig
    rng = random.Random(0)
    cases, expected = [], []
    configs = [TransformerConfig(**p) for p in presets.values()] + [_random_config(rng) for _ in range(300)]
    # past 2**53 bytes (doubles lose integers there): explicit softmax at 128k context, batch 256
    huge = dict(presets["Llama-2-7B"], attention="math")
    configs.append(TransformerConfig(**huge))
    for i, config in enumerate(configs):
        big = i < len(presets)
        o = {"policy": rng.choice(sorted(PRECISION_POLICIES)),
             "optimizer": rng.choice([None, *sorted(OPTIMIZER_STATE_BYTES)]),
             "zero_stage": rng.randint(0, 3), "world_size": rng.choice([1, 2, 3, 7, 8, 64, 1000]),
             "batch_size": rng.randint(1, 64 if big else 16), "seq_len": rng.randint(1, 32768 if big else 2048),
             "activation_dtype_bytes": rng.choice([1, 2, 4]),
             "checkpoint_segments": rng.choice([None, rng.randint(1, config.n_layers)])}
        if i == len(configs) - 1:
            o.update(batch_size=256, seq_len=131072, activation_dtype_bytes=4, checkpoint_segments=None)
        inf = {"weight_dtype_bytes": rng.choice([4, 2, 1, 0.5]), "kv_dtype_bytes": rng.choice([4, 2, 1, 0.5]),
               "batch_size": rng.randint(1, 256), "seq_len": rng.randint(1, 131072)}
        train = estimate_training_memory(config, o["batch_size"], o["seq_len"], policy=o["policy"],
                                         optimizer=o["optimizer"], activation_dtype_bytes=o["activation_dtype_bytes"],
                                         zero_stage=o["zero_stage"], world_size=o["world_size"],
                                         checkpoint_segments=o["checkpoint_segments"])
        n = count_parameters(config)
        expected.append({"params": train.params, "grads": train.grads, "master": train.master,
                         "optimizer": train.optimizer, "activations": train.activations,
                         "weights": -(-n * inf["weight_dtype_bytes"] // 1) if inf["weight_dtype_bytes"] != 0.5 else -(-n // 2),
                         "kv_cache": kv_cache_bytes(config, inf["batch_size"], inf["seq_len"], inf["kv_dtype_bytes"]),
                         "n_params": n})
        cases.append({"config": _js_config(config), "train": o, "infer": inf})
    got = page.evaluate("""cases => cases.map(({config, train, infer}) => {
        const m = window.llmspaceMemory, t = m.estimateTraining(config, train), i = m.estimateInference(config, infer);
        const out = {n_params: m.countParameters(config).toString()};
        for (const [k, v] of Object.entries({...t, ...i})) out[k] = v.toString();
        return out; })""", cases)
    page.close()
    assert len(got) == len(expected) == len(presets) + 301
    for case, g, e in zip(cases, got, expected):
        assert {k: int(v) for k, v in g.items()} == {k: int(v) for k, v in e.items()}, case
    assert max(e["activations"] for e in expected) > 2 ** 53  # the BigInt path is exercised


# ------------------------------------------------------------------------------------------------
# The pages' tools: interview drill, memory calculator, API reference, theme settings
# ------------------------------------------------------------------------------------------------

def _shown(page) -> int:
    return page.locator("details.iq-item:visible").count()


def test_interview_drill_filters_random_and_reveal(site, page):
    page.goto(f"{site}/book/interview.html")
    total = page.locator("details.iq-item").count()
    assert total >= 60 and _shown(page) == total
    assert page.locator(".iq-count").inner_text() == f"{total} of {total} shown"
    topics = page.locator(".iq-drill select[name=topic] option").all_inner_texts()
    assert 8 <= len(topics) - 1 <= 10, topics               # a small fixed topic set ("all" + topics)
    page.select_option(".iq-drill select[name=level]", "hard")
    hard = _shown(page)
    assert 0 < hard < total and hard == page.locator("details.iq-level-hard").count()
    assert page.locator(".iq-count").inner_text() == f"{hard} of {total} shown"
    assert "level=hard" in page.url
    page.select_option(".iq-drill select[name=chapter]", "3")
    both = _shown(page)
    assert 0 < both < hard and both == page.locator("details.iq-level-hard.iq-chapter-3").count()
    page.select_option(".iq-drill select[name=level]", "")
    page.select_option(".iq-drill select[name=chapter]", "")
    page.select_option(".iq-drill select[name=topic]", "quantization")
    quant = _shown(page)
    assert 0 < quant < total and quant == page.locator("details.iq-topic-quantization").count()
    for _ in range(10):                                       # the random pick is always a visible question
        page.click(".iq-drill button[name=random]")
        picked = page.locator("details.iq-picked")
        assert picked.count() == 1 and picked.is_visible()
        assert "iq-topic-quantization" in picked.get_attribute("class")
        assert picked.get_attribute("open") is None          # the answer stays hidden until asked for
    page.click(".iq-drill button[name=reveal]")
    assert page.locator("details.iq-item[open]").count() == quant
    assert page.locator("details.iq-item[open] .sd-summary-content:visible").count() == quant
    page.click(".iq-drill button[name=hide]")
    assert page.locator("details.iq-item[open]").count() == 0
    back = page.locator("details.iq-item:not([hidden]) a.reference.internal[href*='#iq-']").first.get_attribute("href")
    page.goto(f"{site}/book/{back}")                          # each question links back to its section
    assert page.locator(f"[id='{back.split('#', 1)[1]}']").count() == 1
    page.goto(f"{site}/book/interview.html#level=easy")       # a drill can be linked
    assert _shown(page) == page.locator("details.iq-level-easy").count() < total
    assert not page.console_errors, page.console_errors
    assert not page.foreign_requests, page.foreign_requests


def test_memory_calculator_page(site, page):
    page.goto(f"{site}/book/memory-calculator.html")
    page.wait_for_selector(".memcalc-out svg rect[data-term=activations]")
    assert page.locator(".memcalc select[name=preset] option").count() == 7   # 6 presets + custom
    total = int(page.locator(".memcalc-out").get_attribute("data-train-total"))
    page.fill(".memcalc input[name=world_size]", "64")          # ZeRO-3 over more ranks: less per GPU
    page.dispatch_event(".memcalc input[name=world_size]", "input")
    assert int(page.locator(".memcalc-out").get_attribute("data-train-total")) < total
    page.select_option(".memcalc select[name=preset]", "custom")
    assert page.locator(".memcalc input[name=d_model]").is_enabled()
    page.fill(".memcalc input[name=n_heads]", "31")             # 4096 % 31 != 0: a clear error, no bars
    page.dispatch_event(".memcalc input[name=n_heads]", "input")
    assert "divisible" in page.locator(".memcalc-error").inner_text()
    assert not page.console_errors, page.console_errors
    assert not page.foreign_requests, page.foreign_requests


def test_api_reference_and_source_pages(site, page):
    page.goto(f"{site}/book/api.html")
    modules = page.locator("main table.autosummary a.reference.internal")
    assert modules.count() >= 13
    page.goto(f"{site}/book/api/memory.html")
    assert page.locator("dt[id='llmspace.memory.estimate_training_memory']").count() == 1
    assert page.locator("dl.field-list dt", has_text="Parameters").count() >= 1   # napoleon's Args
    page.locator("a:has(span.viewcode-link)").first.click()      # [source]: highlighted, offline
    page.wait_for_load_state("load")
    assert "_modules/llmspace" in page.url and page.locator("div.highlight").count() >= 1
    assert not page.console_errors, page.console_errors
    assert not page.foreign_requests, page.foreign_requests


def test_theme_settings(site, page):
    page.goto(f"{site}/book/grading.html")
    assert page.locator("html").get_attribute("data-mode") == "auto"        # follows the system setting
    assert page.locator("script[src*='mathjax']").count() == 0              # no math on this page
    assert page.locator("meta[property='og:title']").count() == 1
    assert page.locator("meta[property='og:description']").count() == 1
    assert page.locator("link[rel='icon']").count() >= 1
    search = page.locator(".search-button-field:visible, .search-button:visible")
    assert search.count() == 1, search.count()                                # one search box
    page.goto(f"{site}/book/03-quantization/index.html")
    # math is typeset at build time (book/_ext/static_math.py): markup, per-page styles and fonts, no script
    assert page.locator("main mjx-container[jax=CHTML]").count() >= 20
    assert page.locator("script[src*='mathjax'], script[src*='MathJax']").count() == 0
    assert page.locator("style#llmspace-math").count() == 1
    labels = page.locator("main mjx-container").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    assert all(labels) and any("\\frac" in label for label in labels)        # the TeX source, for screen readers
    page.evaluate("document.fonts.ready.then(() => 0)")
    assert page.evaluate("[...document.fonts].filter(f => f.family.startsWith('MJX') && f.status === 'loaded').length") >= 1
    assert not page.console_errors, page.console_errors


# ------------------------------------------------------------------------------------------------
# Layout at phone and desktop width, print, and page weight
# ------------------------------------------------------------------------------------------------

def _site_pages() -> list[str]:
    """Every HTML page of the built site (chapters, API reference, source pages, index, search), except
    the root index.html, which only redirects to book/intro.html."""
    pages = sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                   if p.relative_to(HTML).parts[0] not in ("_static", "reports") and p.relative_to(HTML).as_posix() != "index.html")
    assert len(pages) >= 40 and "book/02-memory-strategies/index.html" in pages and "_modules/index.html" in pages
    return pages


# The elements that make a page wider than the viewport, by the innermost overflowing element named by its
# block (an equation, a code span, a table...): overflow that a scroll box of its own (or a fixed drawer)
# contains does not count, text wider than its box does.
WIDE_ELEMENTS_JS = """() => { const w = document.documentElement.clientWidth, out = [], seen = new Set();
  const right = e => { const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    return s.overflowX === 'visible' && e.scrollWidth > e.clientWidth && e.clientWidth > 0
      ? Math.max(r.right, r.left + e.scrollWidth) : r.right; };
  const contained = e => { for (let a = e.parentElement; a; a = a.parentElement) {
      const s = getComputedStyle(a); if (s.position === 'fixed') return true;
      if (s.overflowX !== 'visible') return a.getBoundingClientRect().right <= w + 0.5; }
    return false; };
  const over = e => e.getBoundingClientRect().width > 0 && right(e) > w + 0.5 && !contained(e)
    && getComputedStyle(e).position !== 'fixed';
  for (const leaf of document.body.querySelectorAll('*')) {
    if (!over(leaf) || [...leaf.children].some(over)) continue;
    const e = leaf.closest('mjx-container, code, pre, table, svg, img, select, input, textarea') || leaf;
    if (seen.has(e)) continue; seen.add(e);
    const cls = [...e.classList].slice(0, 3).map(c => '.' + c).join('');
    out.push(`${e.tagName.toLowerCase()}${cls} to x=${Math.round(right(e))}: "${(e.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 70)}"`); }
  return out; }"""


@pytest.mark.parametrize("width", [390, 1280])
def test_no_page_scrolls_sideways(site, browser, width):
    """A phone (390 x 844) and a desktop: on every page of the site the document is no wider than the
    viewport; long code words wrap, code, outputs, tables and equations scroll inside their own box."""
    context = browser.new_context(viewport={"width": width, "height": 844})
    page = context.new_page()
    wide = {}
    for name in _site_pages():
        page.goto(f"{site}/{name}")
        page.wait_for_load_state("load")
        scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
        if scroll_width > inner_width:
            wide[name] = (scroll_width, page.evaluate(WIDE_ELEMENTS_JS)[:8])
    context.close()
    assert not wide, f"pages wider than {width} px:\n" + "\n".join(
        f"{name}: {sw} px\n    " + "\n    ".join(elements) for name, (sw, elements) in wide.items())


def test_print_keeps_every_column_and_equation(site, browser):
    """Printed (print media, about an A4 text column wide), a chapter is clipped nowhere: no scroll box keeps
    part of a table, code cell, output or equation off the paper, and nothing runs past the column."""
    context = browser.new_context(viewport={"width": 650, "height": 900})
    page = context.new_page()
    page.emulate_media(media="print")
    clipped = {}
    chapters = sorted(p.relative_to(HTML).as_posix() for p in HTML.glob("book/0*/*.html"))
    assert len(chapters) >= 6
    for name in chapters:
        page.goto(f"{site}/{name}")
        page.wait_for_load_state("load")
        boxes = page.evaluate("""() => [...document.querySelectorAll('main *')].filter(e =>
            !e.tagName.startsWith('MJX-') && e.offsetParent !== null && getComputedStyle(e).overflowX !== 'visible'
            && e.scrollWidth > e.clientWidth + 1).map(e => `${e.tagName.toLowerCase()}.${[...e.classList].join('.')}`
            + ` ${e.scrollWidth} > ${e.clientWidth} px: "${e.textContent.trim().slice(0, 50)}"`)""")
        if boxes or page.evaluate("document.documentElement.scrollWidth > innerWidth"):
            clipped[name] = boxes + page.evaluate(WIDE_ELEMENTS_JS)
    context.close()
    assert not clipped, clipped


PAGE_WEIGHT_LIMIT = int(1.5 * 2**20)      # bytes per chapter page, figures excluded (issue 15)


def test_chapter_page_weight(site, browser):
    """Every chapter page, opened with an empty cache, transfers at most 1.5 MiB of HTML, CSS, JavaScript
    and fonts (figures excluded). Writes the per-page numbers to _build/page-weights.json."""
    import json
    weights, heavy = {}, {}
    chapters = sorted(p.relative_to(HTML).as_posix() for p in HTML.glob("book/0*/*.html"))
    assert len(chapters) >= 6
    for name in chapters:
        context = browser.new_context(viewport={"width": 390, "height": 844})   # a cold cache per page
        page = context.new_page()
        page.goto(f"{site}/{name}")
        page.wait_for_load_state("load")
        page.evaluate("document.fonts.ready.then(() => 0)")
        page.wait_for_timeout(300)                                   # late font and script requests
        entries = page.evaluate("""() => [...performance.getEntriesByType('navigation'),
            ...performance.getEntriesByType('resource')].map(e => [e.name, e.initiatorType, e.transferSize])""")
        context.close()
        figures = sum(size for url, kind, size in entries if kind == "img" or "/_images/" in url)
        rest = [(size, url) for url, kind, size in entries if not (kind == "img" or "/_images/" in url)]
        total = sum(size for size, _ in rest)
        weights[name] = {"bytes": total, "figure_bytes": figures, "requests": len(rest),
                         "largest": {url.split("/", 3)[-1]: size for size, url in sorted(rest, reverse=True)[:5]}}
        scripts = " ".join(url for _, url in rest)
        assert "fontawesome.js" not in scripts and "searchindex.js" not in scripts and "mathjax/" not in scripts, name
        assert all(size > 0 for size, _ in rest), name                 # a cold cache: everything transferred
        if total > PAGE_WEIGHT_LIMIT:
            heavy[name] = weights[name]
    (HTML.parent / "page-weights.json").write_text(json.dumps(weights, indent=1))
    print("\n".join(f"{n}: {w['bytes'] / 2**20:.2f} MiB (+ {w['figure_bytes'] / 2**20:.2f} MiB figures)"
                    for n, w in weights.items()))
    assert not heavy, heavy


def test_download_menu_entries_resolve(site, page):
    """The header's download menu offers only what exists: the page's source file and print-to-PDF."""
    page.goto(f"{site}/book/03-quantization/index.html")
    items = page.locator(".dropdown-download-buttons .dropdown-item")
    assert items.count() >= 1
    for i in range(items.count()):
        href = items.nth(i).get_attribute("href")
        if href is None:
            assert items.nth(i).get_attribute("onclick") == "window.print()"
            continue
        response = page.request.get(f"{site}/book/03-quantization/{href}")
        assert response.ok, href
    assert not page.console_errors, page.console_errors


# ------------------------------------------------------------------------------------------------
# Figures and printed results on the chapter pages (issue 15: figures you can read, tables that are tables)
# ------------------------------------------------------------------------------------------------

READING_WIDTH_PX = 700      # the book's reading column on a desktop screen
MIN_FONT_PT = 10


def _chapter_pages():
    _require((HTML / "index.html").exists(), "book not built: run `make book` first")
    pages = sorted(p.relative_to(HTML).as_posix() for p in (HTML / "book").glob("0*/*.html"))
    assert len(pages) >= 9, pages
    return pages


def looks_like_text_table(text: str) -> bool:
    """True for printed text laid out as a table: at least 3 lines with 2 or more column gaps each (runs of
    2+ spaces, or a '|', between non-blank characters). Array and tensor reprs ('[', 'tensor(') aside."""
    import re
    gap = re.compile(r"\S( {2,}|\s*\|\s*)(?=\S)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and "[" not in line and "tensor(" not in line]
    return sum(len(gap.findall(line)) >= 2 for line in lines) >= 3


def test_text_table_detector():
    table = "name      n\n" + "a        1  2\n" * 3
    assert looks_like_text_table("density      nnz  CSR bytes\n    0.01    10486      87988\n    0.10   104858      842964")
    assert looks_like_text_table("p | m=1 | m=4\n2 | 50% | 20%\n4 | 75% | 43%")
    assert looks_like_text_table(table)
    assert not looks_like_text_table("loss 1.0  then 0.5\nsecond line\nthird line")
    assert not looks_like_text_table("tensor([[1.,  0.,  2.],\n        [0.,  3.,  0.],\n        [4.,  0.,  5.]])")


def _svg_min_font_pt(svg: str) -> tuple[float, float]:
    """(smallest font size in the SVG's user units = pt at natural size, natural width in CSS px)."""
    import re
    width = re.search(r'<svg[^>]*\bwidth="([\d.]+)(pt|px)?"', svg)
    assert width, "SVG without a width"
    natural_px = float(width.group(1)) * (4 / 3 if width.group(2) == "pt" else 1)
    sizes = [float(s) for s in re.findall(r"font-size:\s*([\d.]+)px", svg)]
    sizes += [float(s) for s in re.findall(r'font-size="([\d.]+)', svg)]
    assert sizes, "SVG without <text>: its text was drawn as outlines (set svg.fonttype 'none')"
    return min(sizes), natural_px


def test_chapter_figures_are_numbered_described_and_readable(site, page):
    """Every figure on a chapter page: inside <figure> with a caption numbered "Fig. N", alt text of 5+
    words that is not a file name, vector (SVG with text as text; or a raster of 2x the reading width), and
    text of at least 10 pt when shown at the ~700 px reading width."""
    import re
    seen = 0
    for path in _chapter_pages():
        page.goto(f"{site}/{path}")
        images = page.locator("main article img, main article svg").evaluate_all("""els => els
            .filter(e => !e.closest('button, .sd-summary-title, summary, .headerlink') && !e.closest('svg:not(:scope)'))
            .filter(e => e.getBoundingClientRect().width >= 150 || e.tagName === 'IMG')
            .map(e => { const f = e.closest('figure'), cap = f && f.querySelector('figcaption');
                        return {tag: e.tagName, src: e.getAttribute('src'), alt: e.getAttribute('alt') || '',
                                label: e.getAttribute('aria-label') || '',
                                caption: cap ? cap.innerText.trim() : null,
                                naturalWidth: e.naturalWidth || 0}; })""")
        for image in images:
            seen += 1
            where = f"{path}: {image['src'] or image['tag']}"
            assert image["caption"] is not None, f"{where} is not in a <figure> with a <figcaption>"
            assert image["caption"].startswith("Fig. "), f"{where}: caption not numbered: {image['caption'][:60]}"
            alt = image["alt"] or image["label"]
            assert not re.search(r"(_images/|\.\./|\b[\w-]+\.(png|svg|jpe?g|gif)\b)", alt, re.I), \
                f"{where}: alt text is a file name: {alt!r}"
            assert len(alt.split()) >= 5, f"{where}: alt text too short: {alt!r}"
            if image["tag"] == "IMG":
                src = image["src"]
                if src.endswith(".svg"):
                    svg = page.request.get(page.url.rsplit("/", 1)[0] + "/" + src).text()
                    font_pt, natural_px = _svg_min_font_pt(svg)
                    shown_pt = font_pt * min(1.0, READING_WIDTH_PX / natural_px)
                    assert shown_pt >= MIN_FONT_PT, f"{where}: smallest text {shown_pt:.1f} pt at {READING_WIDTH_PX} px"
                else:
                    assert image["naturalWidth"] >= 2 * READING_WIDTH_PX, f"{where}: raster below 200 dpi"
    assert seen >= 10, seen
    assert not page.console_errors, page.console_errors


def test_chapter_outputs_have_no_object_reprs_or_text_tables(site, page):
    """No `<... at 0x...>` reprs (e.g. torch.manual_seed's Generator) and no space-padded text tables in
    the executed outputs: tables are HTML tables."""
    problems = []
    for path in _chapter_pages():
        page.goto(f"{site}/{path}")
        outputs = page.locator("main article .cell_output").all_inner_texts()
        pres = page.locator("main article .cell_output pre").all_inner_texts()
        problems += [f"{path}: repr {o.strip()[:80]!r}" for o in outputs if " at 0x" in o]
        problems += [f"{path}: text table {p.strip()[:80]!r}" for p in pres if looks_like_text_table(p)]
    assert not problems, "\n".join(problems)


def test_chapters_link_their_code(site, page):
    """Code you can open: every chapter page links the llmspace objects it uses (inline code naming them and
    the names its code cells import) to their API reference entries, and the repository files and tests it
    names to highlighted copies in the site (book/_ext/code_links.py); every link lands on an existing anchor."""
    import re
    chapters = sorted(p.relative_to(HTML).as_posix() for p in HTML.glob("book/0*/*.html"))
    assert len(chapters) >= 6
    targets, counts = {}, {}
    for name in chapters:
        page.goto(f"{site}/{name}")
        hrefs = page.locator("main a.llmspace-code-link").evaluate_all("els => els.map(a => a.href)")
        api = {h for h in hrefs if "/book/api/" in h and "#llmspace." in h}
        counts[name] = (len(api), len({h for h in hrefs if "/_repo/" in h or "/_modules/" in h}))
        for href in hrefs:
            targets.setdefault(href, name)
    assert all(n_api >= 2 for n_api, _ in counts.values()), counts
    assert sum(n_api for n_api, _ in counts.values()) >= 60, counts
    assert sum(n_repo for _, n_repo in counts.values()) >= 20, counts
    assert any("/_repo/tests/" in h and "#L-" in h for h in targets)      # a test named in the text, at its line
    pages = {}
    for href, source in sorted(targets.items()):
        url, _, anchor = href.partition("#")
        if url not in pages:
            response = page.request.get(url)
            assert response.ok, (source, href)
            pages[url] = response.text()
        if anchor:
            assert re.search(rf'\bid="{re.escape(anchor)}"', pages[url]), (source, href)
    assert not page.console_errors, page.console_errors

"""The chapters' MyST sources (book/0*/*.md), read without building the book (the browser test checks
the built pages): plotting code is folded, figures are glued into numbered, described figures, and no cell
prints a space-padded text table. Plus llmspace.display, the helpers the chapters use for both."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("0*/*.md"))
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.M | re.S)
GLUE_FIGURE = re.compile(r"^```\{glue:figure\} (\S+)\n(.*?)^```", re.M | re.S)
# a width in a format spec ({x:8.2f}, {name:>10}, {s:<48s}) only lines text up in columns
# (zero padding such as {b:02x} is not a column)
WIDTH_SPEC = re.compile(r"\{(?:[^{}:\[\]]|\[[^\]]*\])*(![rsa])?:(.?[<>^=])?[+\- ]?z?#?(?!0)\d+[^{}]*\}")
# an image file name or path where a description belongs
FILE_NAME = re.compile(r"(_images/|\.\./|\b[\w-]+\.(png|svg|jpe?g|gif|pdf)\b)", re.I)


def _cells(path):
    for m in CELL.finditer(path.read_text()):
        body = m.group(1)
        tags = re.search(r"^:tags:\s*\[(.*?)\]", body, re.M)
        code = "\n".join(line for line in body.splitlines() if not line.startswith(":"))
        yield {t.strip().strip("'\"") for t in tags.group(1).split(",")} if tags else set(), code


def test_sources_found():
    assert len(CHAPTERS) >= 9


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.relative_to(ROOT / "book").as_posix())
def test_plotting_cells_are_folded_and_glued(path):
    """A cell that draws (plt.subplots / plt.figure) hides its input and glues its figure (no plt.show:
    the figure appears once, in a {glue:figure} with a caption and alt text)."""
    for tags, code in _cells(path):
        if re.search(r"plt\.(subplots|figure)\(", code):
            assert tags & {"hide-input", "remove-input"}, f"plotting cell not folded:\n{code[:200]}"
            assert "glue_figure(" in code, f"plotting cell does not glue its figure:\n{code[:200]}"
            assert "plt.show()" not in code


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.relative_to(ROOT / "book").as_posix())
def test_every_glued_figure_is_named_captioned_and_described(path):
    text = path.read_text()
    glued = set(re.findall(r"glue_figure\(\s*[\"']([\w-]+)[\"']", text))
    shown = {}
    for key, body in GLUE_FIGURE.findall(text):
        options = dict(re.findall(r"^:(\w+):\s*(.*)$", body, re.M))
        caption = "\n".join(line for line in body.splitlines() if not line.startswith(":")).strip()
        assert options.get("name") == key, f"{key}: :name: must equal the glue key (a reference target)"
        alt = options.get("alt", "")
        assert len(alt.split()) >= 5 and not FILE_NAME.search(alt), f"{key}: alt text must say what it shows: {alt!r}"
        assert caption, f"{key}: no caption"
        shown[key] = alt
    assert glued == set(shown), f"glued but not shown: {glued - set(shown)}; shown but never glued: {set(shown) - glued}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.relative_to(ROOT / "book").as_posix())
def test_no_cell_prints_a_text_table(path):
    """Column widths in a print's format spec, ljust/rjust: a text table. Use llmspace.display.table."""
    for _, code in _cells(path):
        for line in code.splitlines():
            if "ljust(" in line or "rjust(" in line:
                pytest.fail(f"text padding: {line.strip()}")
        for call in re.findall(r"print\((.*?)\)\s*$", code, re.M | re.S):
            spec = WIDTH_SPEC.search(call)
            assert not spec, f"print with a column width {spec.group(0)}: {call.strip()[:120]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.relative_to(ROOT / "book").as_posix())
def test_no_bare_seed_repr(path):
    """torch.manual_seed returns a Generator: as a cell's last line it prints `<torch._C.Generator at 0x...>`."""
    for _, code in _cells(path):
        lines = [line for line in code.splitlines() if line.strip() and not line.startswith((" ", "#"))]
        if lines:
            assert not re.match(r"^torch\.manual_seed\([^)]*\)\s*$", lines[-1]), code[-200:]


# ------------------------------------------------------------------------------------------------
# llmspace.display
# ------------------------------------------------------------------------------------------------

def test_table_is_html_with_numbers_right_aligned():
    from llmspace.display import table
    html = table([["fp32 <weights>", "1,234", "5.0%"], ["bf16", "n/a", "10.25×"]], ["weights", "bytes", "share"]).data
    assert html.startswith('<table class="table llmspace-table">') and html.count("<tr>") == 3
    assert "fp32 &lt;weights&gt;" in html                    # cells are escaped, not injected
    cells = re.findall(r"<td([^>]*)>\s*([^<]*?)\s*</td>", html)
    assert [c[1] for c in cells] == ["fp32 &lt;weights&gt;", "1,234", "5.0%", "bf16", "n/a", "10.25×"]
    assert [("right" in c[0]) for c in cells] == [False, True, True, False, True, True]
    assert "10.25×" in html                                  # formatted text kept: nothing re-rounded


def test_table_rejects_ragged_rows():
    from llmspace.display import table
    with pytest.raises(ValueError, match="row 1 has 1 cells, expected 2"):
        table([["a", "1"], ["b"]], ["name", "n"])
    with pytest.raises(ValueError, match="align has 1 entries, expected 2"):
        table([["a", "1"]], ["name", "n"], align=["left"])


def test_book_style_fonts_and_svg_text():
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmspace.display import MAX_WIDTH_IN, glue_figure, plain_log_ticks, use_book_style
    with matplotlib.rc_context():
        use_book_style()
        fig, ax = plt.subplots()
        ax.plot([1, 2], [1e-3, 1e3], label="a line")
        ax.set_yscale("log")                                 # default labels: 10^k with 7-pt exponents
        ax.legend()
        ax.set_xlabel("bytes")
        plain_log_ticks(fig)
        out = io.StringIO()
        fig.savefig(out, format="svg")
        sizes = [float(s) for s in re.findall(r"font-size:\s*([\d.]+)px", out.getvalue())]
        assert sizes and min(sizes) >= 10                    # <text>, ≥ 10 pt at natural size
        assert ">0.001<" in out.getvalue() and ">1000<" in out.getvalue()
        assert fig.get_figwidth() <= MAX_WIDTH_IN
        assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0].lower() == "#006ba4"  # colorblind10
        plt.close(fig)
        wide = plt.figure(figsize=(10, 3))
        with pytest.raises(ValueError, match="10.00 in wide"):
            glue_figure("fig-too-wide", wide)
        plt.close(wide)

"""How the book shows numbers: vector figures a reader can read, and tables that are tables.

The chapters are notebooks; what they print becomes the web page. Two habits make a notebook page hard
to read: 100-dpi PNG figures whose tick labels shrink to a few pixels on a phone, and tables printed as
space-padded text, which break when the page is narrower than the text. This module gives the chapters
one style instead:

* :func:`use_book_style` — SVG output with real text (searchable, sharp at any zoom), fonts of at least
  10 pt at the figure's natural width (≤ 7 in ≈ 670 CSS px, inside the book's reading column) and the
  colour-blind-safe ``tableau-colorblind10`` cycle (Petroff's palette, the one matplotlib ships for this).
* :func:`table` — rows of already formatted cells as an HTML ``<table>`` (tabulate's ``html`` format),
  numbers right-aligned, so the browser wraps and scrolls it like any other table.
* :func:`glue_figure` — hand a finished figure to myst-nb's ``glue`` so a ``{glue:figure}`` directive
  shows it with a numbered caption and alt text, instead of the bare output of the plotting cell.

Everything here imports matplotlib, tabulate, IPython and myst-nb lazily: the exercises never need them.
"""
import re

#: Font sizes in points; at the figure's natural size one SVG user unit is one point.
FONT_PT = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "xtick.labelsize": 10,
           "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10, "figure.titlesize": 11}

#: Widest figure the book draws, in inches: 7 in = 672 CSS px, within a ~700 px reading column, so the
#: fonts above are not scaled down on a desktop screen.
MAX_WIDTH_IN = 7.0

_NUMBER = re.compile(r"^[-+−]?[\d,.]+\s*(%|×|x|[kMGT]?i?B|ms|s|ns|MB/s|GB/s|KiB|MiB|GiB)?$|^(n/a|–|-|—)$")


def use_book_style() -> None:
    """Set matplotlib's defaults for the book: SVG with text as text, ≥ 10 pt fonts, colour-blind palette.

    Call once in a chapter's setup cell. In IPython it also switches the inline backend to SVG.
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    plt.style.use("tableau-colorblind10")
    mpl.rcParams.update(FONT_PT)
    mpl.rcParams.update({"svg.fonttype": "none",          # <text> elements, not glyph outlines
                         "svg.hashsalt": "llmspace",      # stable ids: the same figure gives the same file
                         "figure.figsize": (MAX_WIDTH_IN, 3.4), "figure.dpi": 100,
                         "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False,
                         "figure.constrained_layout.use": True})
    try:
        from IPython import get_ipython
        if get_ipython() is not None:
            from matplotlib_inline.backend_inline import set_matplotlib_formats
            set_matplotlib_formats("svg")
    except ImportError:  # plain Python: nothing to configure
        pass


def glue_figure(name: str, fig) -> None:
    """Store ``fig`` under ``name`` for a ``{glue:figure}`` directive and close it (no bare output).

    Args:
        name: the glue key, also used as the figure's label, e.g. ``"fig-csr-bytes"``.
        fig: a ``matplotlib.figure.Figure``; wider than :data:`MAX_WIDTH_IN` raises ``ValueError``
            (its text would shrink below 10 pt in the reading column).
    """
    import matplotlib.pyplot as plt
    from myst_nb import glue

    width = fig.get_figwidth()
    if width > MAX_WIDTH_IN + 1e-9:
        raise ValueError(f"figure {name!r} is {width:.2f} in wide; the book's limit is {MAX_WIDTH_IN} in")
    plain_log_ticks(fig)
    glue(name, fig, display=False)
    plt.close(fig)


def plain_log_ticks(fig) -> None:
    """Label every log-scaled axis of ``fig`` with plain numbers (``0.01``, ``20``, ``256``).

    matplotlib's default log labels are ``10^k`` / ``2^k`` in mathtext, whose exponent is set at 70% of
    the tick font: a 7-pt superscript under a 10-pt base. Plain numbers keep every glyph at the tick size.
    """
    from matplotlib.ticker import FixedFormatter, LogFormatter

    class PlainLogFormatter(LogFormatter):   # LogFormatter's choice of ticks to label, printed with %g
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                base = axis.get_transform().base
                if not isinstance(axis.get_major_formatter(), FixedFormatter):   # keep labels set by hand
                    axis.set_major_formatter(PlainLogFormatter(base=base))
                axis.set_minor_formatter(PlainLogFormatter(base=base, labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def table(rows, headers, align=None):
    """An HTML table of ``rows`` (already formatted cells) for a notebook cell to display.

    Args:
        rows: iterable of sequences, one per row; cells are shown as ``str(cell)`` (format numbers first,
            e.g. ``f"{x:,.1f}"``; nothing is re-parsed or re-rounded).
        headers: one column title per cell.
        align: ``None`` (numbers right, text left, decided per column), or one of ``"left"``,
            ``"right"``, ``"center"`` per column.

    Returns:
        ``IPython.display.HTML`` wrapping a ``<table>``; show it as a cell's last value or with ``display``.

    Raises:
        ValueError: a row whose length differs from ``headers``, or ``align`` of the wrong length.
    """
    from IPython.display import HTML
    from tabulate import tabulate

    headers = [str(h) for h in headers]
    rows = [[str(c) for c in row] for row in rows]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)} (one per header)")
    if align is None:
        align = ["right" if rows and all(_NUMBER.match(r[j].strip()) for r in rows) else "left"
                 for j in range(len(headers))]
    elif len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries, expected {len(headers)}")
    html = tabulate(rows, headers, tablefmt="html", disable_numparse=True, colalign=align)
    return HTML(str(html).replace("<table>", '<table class="table llmspace-table">', 1))

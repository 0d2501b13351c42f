"""Charts from series: PNG and SVG pictures of a report, Persian labels shaped right to left.

A pure rendering module like ``documents``: the caller hands over categories and series, this
module draws them with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``/SVG; never
``pyplot``, whose global figure manager is not thread safe: gRPC handlers run in threads).

API
---
``Series(name, values)``
    One line, one set of bars or one pie: ``values[i]`` belongs to ``categories[i]`` (``None``
    is a gap; ``Decimal`` and ``int`` are fine).

``Chart(kind, categories, series, *, title="", x_label="", y_label="", percent=False,
rtl=None, persian_digits=False, no_data="", width=960, height=540)``
    ``kind`` is one of ``KINDS``:

    * ``bar``: one series' bars per category (more series: grouped, as ``grouped_bar``);
    * ``grouped_bar``: the series side by side in each category;
    * ``stacked_bar``: the series stacked in each category (negative values stack downwards,
      so a points ledger's redemptions show below the axis);
    * ``line``: each series a line over the categories (periods);
    * ``pie`` / ``donut``: the first series' positive values as shares of their sum;
    * ``pareto``: the first series' values as bars in the given order (largest first for a
      Pareto chart) and, on a second axis, their cumulative share of the total (0..100%), with
      the 80% line.

    ``percent``: the values are shares (0.5 = 50%) and the value axis says so. ``rtl`` forces
    the layout; ``None`` detects it from the texts (``documents.detect_rtl``). ``persian_digits``
    writes the value axis' numbers (and a pie's percentages) in Persian digits. ``no_data``:
    the sentence shown when there is nothing to draw (default "No data" / "داده‌ای نیست").
    ``width`` x ``height`` in pixels for the PNG (the SVG has the same size at 96 px per inch).

``render(fmt, chart) -> bytes``, ``render_to(fmt, chart, out)``, ``figure(chart) -> Figure``
    ``fmt`` is ``png`` or ``svg`` (``FORMATS``; anything else raises ``ValueError``).
    ``figure`` is the matplotlib figure itself (tests read its axes; nothing is drawn yet).
``content_type(fmt)``, ``file_extension(fmt)``, ``stream_chart(message, fmt, chart, filename=)``
    The download side, as in ``documents`` (``stream_chart`` is ``documents.stream_file``).
``is_empty(chart)``: nothing to draw (no category, or no value that is not 0 or None).

Text, direction and fonts
-------------------------
Every text uses the suite's font, Noto Sans Arabic (``documents.font_path()``; it covers
Latin, digits and Persian). Shaping and ordering are matplotlib's own since 3.11: its text
layout goes through libraqm (HarfBuzz shaping, the Unicode bidi algorithm), so labels are
passed in logical order. Pre-shaping them with ``documents``' arabic-reshaper/python-bidi path
(right for reportlab, which has no shaping) would be reversed a second time here; the module
refuses to load on a matplotlib without libraqm rather than draw Persian backwards.

A right-to-left chart (Persian labels) is laid out as a reader of Persian expects: the first
category on the right (the category axis runs right to left), the value axis on the right, the
title aligned right, the legend on the left with its markers after the text.

SVG keeps text as text (``svg.fonttype`` "none"): searchable, selectable, small, and readable
by a test. A viewer shapes it with the font it has; "Noto Sans Arabic" is named first. Each
``<text>`` whose first strong letter is right-to-left is marked ``direction: rtl`` (its
``text-anchor`` swapped so that it stays where matplotlib measured it), so neutral characters
(brackets, %, digits) land where the PNG has them. The output is deterministic (fixed
``svg.hashsalt``, no date in the metadata), so the same chart gives the same bytes.

Threads: figures are private to a call; the shared parts (the font manager's caches, the rc
parameters set for one render with ``rc_context``) are used under one module lock, so two
handlers drawing at once cannot interleave (charts are drawn one at a time per process).

matplotlib's font cache goes to ``MPLCONFIGDIR``; unless it is set, this module points it at
``$CRM_RUN_DIR/matplotlib`` (else the temporary directory), since the services' root filesystem
is read-only in k8s and /tmp (CRM_RUN_DIR) is their writable scratch directory.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import IO, Any, TypeVar

# matplotlib keeps its font cache in MPLCONFIGDIR (default ~/.config, ~/.cache): the services'
# root filesystem is read-only in k8s, /tmp is the writable emptyDir. An explicit setting wins.
os.environ.setdefault(
    "MPLCONFIGDIR", os.path.join(os.environ.get("CRM_RUN_DIR") or tempfile.gettempdir(), "matplotlib")
)

import matplotlib  # noqa: E402
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import __libraqm_version__ as _RAQM
from matplotlib.ticker import FuncFormatter, MaxNLocator

from . import documents
from .persian import to_persian_digits

if not _RAQM:  # pragma: no cover - every matplotlib >= 3.11 wheel has it
    raise ImportError("crm_chassis.charts needs matplotlib built with libraqm (3.11 or later) to shape Persian")

M = TypeVar("M")

__all__ = [
    "FORMATS",
    "KINDS",
    "Chart",
    "Series",
    "content_type",
    "figure",
    "file_extension",
    "is_empty",
    "render",
    "render_to",
    "stream_chart",
]

FORMATS: dict[str, tuple[str, str]] = {"png": ("image/png", "png"), "svg": ("image/svg+xml", "svg")}
KINDS = ("bar", "grouped_bar", "stacked_bar", "line", "pie", "donut", "pareto")
DPI = 96
FONT_FAMILY = "Noto Sans Arabic"
SVG_SALT = "crm-chassis-charts"
PALETTE = (
    "#1f6fb2", "#e07b39", "#3a9d5d", "#c0392b", "#8e6cc0",
    "#8c564b", "#d45f9e", "#7f7f7f", "#b5a21b", "#17a2b8",
)  # fmt: skip
MAX_SLICES = 10  # a pie keeps its largest slices; the rest is one "other" slice
NO_DATA = ("No data", "داده‌ای نیست")
OTHER = ("Other", "سایر")


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | int | Decimal | None]


@dataclass(frozen=True)
class Chart:
    kind: str
    categories: Sequence[str] = ()
    series: Sequence[Series] = ()
    title: str = ""
    x_label: str = ""
    y_label: str = ""
    percent: bool = False
    rtl: bool | None = None
    persian_digits: bool = False
    no_data: str = ""
    width: int = 960
    height: int = 540


def _check(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown chart format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def content_type(fmt: str) -> str:
    return FORMATS[_check(fmt)][0]


def file_extension(fmt: str) -> str:
    return FORMATS[_check(fmt)][1]


def _number(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def is_empty(chart: Chart) -> bool:
    if not chart.categories or not chart.series:
        return True
    return not any(_number(v) for s in chart.series for v in s.values)


def _is_rtl(chart: Chart) -> bool:
    if chart.rtl is not None:
        return chart.rtl
    texts = [chart.title, chart.x_label, chart.y_label, *chart.categories, *(s.name for s in chart.series)]
    return documents.detect_rtl(texts)


# --------------------------------------------------------------------------- fonts and numbers

_lock = threading.RLock()
_font_ready = False


def _font() -> None:
    """Add the suite's font to matplotlib's font manager once per process."""
    global _font_ready
    if not _font_ready:
        font_manager.fontManager.addfont(str(documents.font_path()))
        _font_ready = True


def _rc() -> dict[str, Any]:
    return {
        "font.family": [FONT_FAMILY, "DejaVu Sans"],
        "font.size": 10,
        "svg.fonttype": "none",
        "svg.hashsalt": SVG_SALT,
        "axes.spines.top": False,
        "axes.titlesize": 14,
        "axes.titleweight": "normal",  # the variable font has its regular instance only
        "axes.unicode_minus": False,  # a plain hyphen-minus: one glyph fewer for viewers to lack
        "text.usetex": False,
    }


def _text(s: str) -> str:
    """A label as matplotlib should get it: logical order; a lone '$' is not mathtext."""
    return str(s).replace("$", r"\$")


_SCALES_EN = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
_SCALES_FA = ((1e12, " هزار میلیارد"), (1e9, " میلیارد"), (1e6, " میلیون"), (1e3, " هزار"))


def _fmt_number(v: float, persian: bool, percent: bool, decimals: int | None = None) -> str:
    if percent:
        text = f"{v * 100:.{0 if decimals is None else decimals}f}"
        return to_persian_digits(text) + "٪" if persian else text + "%"
    a = abs(v)
    suffix = ""
    for scale, name in _SCALES_FA if persian else _SCALES_EN:
        if a >= scale:
            v, suffix = v / scale, name
            break
    text = f"{v:,.{decimals if decimals is not None else (0 if v == int(v) else 1)}f}"
    if persian:
        text = to_persian_digits(text.replace(",", "\u066c").replace(".", "\u066b"))
    return text + suffix


# --------------------------------------------------------------------------- the figure


def figure(chart: Chart) -> Figure:
    """The chart as a matplotlib Figure (with its Agg canvas), ready to be saved."""
    if chart.kind not in KINDS:
        raise ValueError(f"unknown chart kind {chart.kind!r}; expected one of {', '.join(KINDS)}")
    with _lock, matplotlib.rc_context(_rc()):
        _font()
        return _figure(chart)


def _figure(chart: Chart) -> Figure:
    rtl = _is_rtl(chart)
    fa = chart.persian_digits
    fig = Figure(figsize=(chart.width / DPI, chart.height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if chart.title:
        ax.set_title(_text(chart.title), loc="right" if rtl else "left", pad=12)
    if is_empty(chart):
        ax.set_axis_off()
        msg = chart.no_data or NO_DATA[1 if rtl else 0]
        ax.text(0.5, 0.5, _text(msg), ha="center", va="center", fontsize=16, color="#7b8794", transform=ax.transAxes)
        return fig

    categories = [_text(c) for c in chart.categories]
    series = [(s.name, [_number(v) for v in s.values][: len(categories)]) for s in chart.series]
    series = [(name, vals + [None] * (len(categories) - len(vals))) for name, vals in series]
    kind = chart.kind
    if kind == "bar" and len(series) > 1:
        kind = "grouped_bar"
    if kind in ("pie", "donut"):
        _pie(fig, ax, chart, categories, series[0][1], rtl, fa)
        return fig

    x = list(range(len(categories)))
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    if kind in ("bar", "grouped_bar"):
        n = len(series)
        width = 0.8 / n
        for i, ((name, vals), color) in enumerate(zip(series, colors, strict=True)):
            offs = (i - (n - 1) / 2) * width
            ax.bar([p + offs for p in x], [v or 0 for v in vals], width, label=_text(name), color=color)
    elif kind == "stacked_bar":
        up = [0.0] * len(x)
        down = [0.0] * len(x)
        for (name, vals), color in zip(series, colors, strict=True):
            heights = [v or 0.0 for v in vals]
            bottoms = [down[i] if h < 0 else up[i] for i, h in enumerate(heights)]
            ax.bar(x, heights, 0.7, bottom=bottoms, label=_text(name), color=color)
            for i, h in enumerate(heights):
                if h < 0:
                    down[i] += h
                else:
                    up[i] += h
        ax.axhline(0, color="#52606d", linewidth=0.8)
    elif kind == "line":
        for (name, vals), color in zip(series, colors, strict=True):
            ax.plot(x, [math.nan if v is None else v for v in vals], marker="o", markersize=4, label=_text(name),
                    color=color, linewidth=2)  # fmt: skip
    else:  # pareto
        _pareto(ax, x, series[0], rtl, chart)

    ax.set_xticks(x, categories)
    long_labels = len(categories) > 8 or max(len(c) for c in categories) > 12
    if long_labels:
        for label in ax.get_xticklabels():
            label.set_rotation(-40 if rtl else 40)
            label.set_ha("left" if rtl else "right")
            label.set_rotation_mode("anchor")
    if chart.x_label:
        ax.set_xlabel(_text(chart.x_label))
    if rtl:
        ax.invert_xaxis()  # the first category on the right
    if kind != "pareto":
        values = [v for _, vals in series for v in vals if v is not None]
        whole = not chart.percent and all(float(v).is_integer() for v in values)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=whole))  # counts: no 10.5 tick
        if kind == "line" and min(values) >= 0:
            ax.set_ylim(bottom=0)  # a line of counts from zero, as bars are
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_number(v, fa, chart.percent)))
        ax.grid(axis="y", color="#e4e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
        if chart.y_label:
            ax.set_ylabel(_text(chart.y_label))
        if rtl:
            ax.yaxis.tick_right()
            ax.yaxis.set_label_position("right")
            ax.spines["left"].set_visible(False)
            ax.spines["right"].set_visible(True)
        else:
            ax.spines["right"].set_visible(False)
    if len(series) > 1 and kind != "pareto":
        _legend(fig, ax, rtl)
    return fig


def _legend(fig: Figure, ax, rtl: bool, handles=None, labels=None) -> None:
    kw: dict[str, Any] = {"frameon": False, "fontsize": 9, "markerfirst": not rtl}
    if handles is not None:
        kw.update(handles=handles, labels=labels)
    fig.legend(loc="outside left upper" if rtl else "outside right upper", alignment="right" if rtl else "left", **kw)


def _pareto(ax, x: list[int], series: tuple[str, list[float | None]], rtl: bool, chart: Chart):
    """Bars of the values and their cumulative share; returns the axes of the bars. The bars' axis
    is on the value side (left; right when RTL), the share's on the other."""
    name, vals = series
    values = [v or 0.0 for v in vals]
    total = sum(values)
    running, shares = 0.0, []
    for v in values:
        running += v
        shares.append(running / total if total else 0.0)
    twin = ax.twinx()  # on the right
    bars, line = (twin, ax) if rtl else (ax, twin)
    bars.bar(x, values, 0.7, color=PALETTE[0], label=_text(name))
    line.plot(x, shares, color=PALETTE[1], marker="o", markersize=4, linewidth=2)
    line.axhline(0.8, color=PALETTE[3], linestyle="--", linewidth=1)
    line.set_ylim(0, 1.05)
    line.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_number(v, chart.persian_digits, True)))
    line.set_zorder(bars.get_zorder() + 1)  # the curve over the bars
    line.patch.set_visible(False)
    bars.patch.set_visible(True)
    for a in (ax, twin):
        a.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    twin.spines["left"].set_visible(False)
    bars.yaxis.set_major_locator(MaxNLocator(nbins=6))
    bars.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_number(v, chart.persian_digits, chart.percent)))
    bars.grid(axis="y", color="#e4e7eb", linewidth=0.8)
    bars.set_axisbelow(True)
    if chart.y_label:
        bars.set_ylabel(_text(chart.y_label))
    return bars


def _pie(fig: Figure, ax, chart: Chart, categories: list[str], values: list[float | None], rtl: bool, fa: bool) -> None:
    pairs = [(c, v) for c, v in zip(categories, values, strict=True) if v and v > 0]
    if len(pairs) > MAX_SLICES:
        pairs.sort(key=lambda p: -p[1])
        rest = sum(v for _, v in pairs[MAX_SLICES - 1 :])
        pairs = [*pairs[: MAX_SLICES - 1], (OTHER[1 if rtl else 0], rest)]
    if not pairs:  # only negative values: nothing a pie can show
        ax.set_axis_off()
        msg = chart.no_data or NO_DATA[1 if rtl else 0]
        ax.text(0.5, 0.5, _text(msg), ha="center", va="center", fontsize=16, color="#7b8794", transform=ax.transAxes)
        return
    wedge = {"width": 0.42, "edgecolor": "white"} if chart.kind == "donut" else {"edgecolor": "white"}
    wedges, _texts, _autotexts = ax.pie(
        [v for _, v in pairs],
        colors=[PALETTE[i % len(PALETTE)] for i in range(len(pairs))],
        startangle=90,
        counterclock=False,
        autopct=lambda pct: _fmt_number(pct / 100, fa, True) if pct >= 4 else "",
        pctdistance=0.79 if chart.kind == "donut" else 0.65,
        wedgeprops=wedge,
        textprops={"color": "white", "fontsize": 9},
    )
    ax.set_aspect("equal")
    _legend(fig, ax, rtl, handles=wedges, labels=[c for c, _ in pairs])


# --------------------------------------------------------------------------- output

_SVG_TEXT = re.compile(r'<text style="([^"]*)"([^>]*)>([^<]*)</text>')
_ANCHOR_SWAP = {"start": "end", "end": "start", "middle": "middle"}


def _svg_rtl(svg: str) -> str:
    """Mark right-to-left texts ``direction: rtl`` (anchor swapped: it keeps its place)."""

    def fix(m: re.Match[str]) -> str:
        style, rest, content = m.groups()
        if documents.text_direction(html.unescape(content)) != "R":
            return m.group(0)
        style = re.sub(r"text-anchor: (\w+)", lambda a: f"text-anchor: {_ANCHOR_SWAP.get(a[1], a[1])}", style)
        return f'<text style="{style}; direction: rtl"{rest}>{content}</text>'

    return _SVG_TEXT.sub(fix, svg)


def render_to(fmt: str, chart: Chart, out: IO[bytes]) -> None:
    """Draw ``chart`` as a PNG or an SVG into the binary file object ``out``."""
    _check(fmt)
    with _lock, matplotlib.rc_context(_rc()):
        _font()
        fig = figure(chart)
        if fmt == "png":
            fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
            return
        buf = io.StringIO()
        fig.savefig(buf, format="svg", dpi=DPI, metadata={"Date": None, "Creator": None})
    out.write(_svg_rtl(buf.getvalue()).encode("utf-8"))


def render(fmt: str, chart: Chart) -> bytes:
    """Draw ``chart`` as a PNG or an SVG and return its bytes."""
    out = io.BytesIO()
    render_to(fmt, chart, out)
    return out.getvalue()


def stream_chart(
    message: Callable[..., M], fmt: str, chart: Chart, *, filename: str, chunk_size: int = documents.DOWNLOAD_CHUNK
) -> Iterator[M]:
    """``render_to`` as a streamed download (head: content_type and filename with the extension)."""
    _check(fmt)

    def write(out: IO[bytes]) -> dict[str, Any]:
        render_to(fmt, chart, out)
        return {"content_type": content_type(fmt), "filename": f"{filename}.{file_extension(fmt)}"}

    return documents.stream_file(message, write, chunk_size=chunk_size)

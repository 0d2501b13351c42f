"""Documents from rows: CSV, XLSX, PDF and DOCX, with Persian right-to-left text shaped correctly.

A pure rendering module: no database and no gRPC message of its own. The caller picks the
columns and hands over the rows (a filtered list, a search result, an invoice's lines); this
module turns them into a document, and ``stream_table`` / ``stream_document`` / ``stream_file``
turn a document into the chunks of a gRPC server-streaming download.

API
---
``Column(key, header, width=1.0)``
    ``key`` indexes each row (``row.get(key)``; a missing key is an empty cell), ``header`` is
    the title people see (may be Persian), ``width`` a relative width hint used by XLSX, PDF and
    DOCX (a column of width 2 gets twice the room of a column of width 1).

``render(fmt, columns, rows, *, title="", rtl=None) -> bytes``
    ``fmt`` is one of ``FORMATS`` ("csv", "xlsx", "pdf", "docx"); anything else raises
    ``ValueError``. ``rows`` is any iterable of mappings (it is consumed once, lazily, so a
    generator or a server-side cursor works). Cell values may be ``str``, ``int``, ``float``,
    ``Decimal``, ``bool``, ``date``, ``datetime``, ``None`` or a list/tuple of those (joined with
    ", "); anything else is rendered with ``str()``. ``title`` is the document title (PDF and
    DOCX heading, XLSX sheet name and document property; CSV has none). ``rtl`` forces a
    right-to-left (True) or left-to-right (False) layout; ``None`` detects it from the title,
    the headers and the first ``SAMPLE_ROWS`` rows (see ``detect_rtl``).

``render_to(fmt, columns, rows, out, *, title="", rtl=None) -> None``
    The same, written to a binary file object (a temporary file, a response body...) instead of
    being returned, so a large export need not be held in memory twice.

``Document(title, columns, rows, fields=(), totals=(), notes="", rtl=None)``,
``render_document(fmt, doc) -> bytes`` and ``render_document_to(fmt, doc, out)``
    A quote, an invoice or a statement: a heading, a block of key/value lines under it
    (``fields``: "Invoice no." / "1403/05/12" pairs), the table, ``totals`` (label/value pairs
    under the table, their values under its last column) and closing ``notes``. PDF, DOCX and
    XLSX (``DOCUMENT_FORMATS``); a CSV has no place for a heading, so "csv" raises ValueError.
    ``chart`` (PNG bytes, e.g. ``charts.render("png", ...)``) puts a picture between the
    key/value lines and the table: in the PDF as wide as the page allows and at most half its
    height, in the DOCX as a picture, in the XLSX on a second sheet ("Chart" / "نمودار") so the
    table's sheet stays plain rows. ``png_size(png)`` reads a PNG's width and height.

``text_direction(text)``: "R", "L" or None, the direction of the first strong letter (the base
direction a renderer gives the line; charts uses it for SVG text).

``content_type(fmt)`` (alias ``media_type``) and ``file_extension(fmt)`` (without the dot) for
the download; both raise ``ValueError`` for an unknown format. The CSV type is
``text/csv; charset=utf-8``, charset included once: an HTTP layer must send it as the whole
Content-Type (Werkzeug's ``mimetype=`` would append a second charset; use ``content_type=``).

Streamed downloads (gRPC server streaming)
    ``stream_table(message, fmt, columns, rows, *, filename, title="", rtl=None)`` renders into
    a spooled temporary file (memory up to ``SPOOL_BYTES``, disk beyond) and yields
    ``message(content_type=..., filename="<filename>.<ext>", row_count=N)`` first (row_count
    only if the message has that field), then ``message(data=chunk)`` per ``DOWNLOAD_CHUNK``
    bytes. The file is rendered completely before the first message, so a bad request (a
    validation error raised while the rows are produced) fails the call before any byte is
    sent, as the gateway expects (it reads the head, then streams the data). ``stream_document``
    does the same for a ``Document``; ``stream_file(message, write)`` for any writer that
    returns the head's fields.

Per format
----------
* CSV: UTF-8 with a byte order mark (Excel then reads Persian correctly), RFC 4180 (comma,
  CRLF, fields quoted when needed), one header row. Text cells that start with ``=``, ``+``,
  ``-``, ``@``, a tab or a carriage return get a leading apostrophe so that a spreadsheet does not
  run them as formulas (CSV/formula injection); numbers are not touched (``-5`` stays a number).
* XLSX (openpyxl, write-only/streaming): bold, frozen header row with an autofilter, column
  widths from the headers, the width hints and the sampled rows, dates and datetimes as real
  Excel dates (an aware datetime keeps its wall-clock time, its zone is dropped: Excel has
  none), numbers as numbers, every text stored as text (never a formula), and a right-to-left
  sheet view for right-to-left content.
* PDF (reportlab): title, table whose header row is repeated on every page, "page N of M"
  footer, A4 portrait up to ``PORTRAIT_MAX_COLUMNS`` columns and landscape beyond. The text
  uses the embedded Noto Sans Arabic TrueType font (SIL OFL 1.1, from the PyPI package
  ``fontpkg-noto-sans-arabic``; it also covers Latin, digits and the Arabic presentation
  forms). PDF has no text shaping of its own, so Persian/Arabic cells are shaped here
  (arabic-reshaper: joined letter forms and lam-alef ligatures) and put into visual order line
  by line (python-bidi's Unicode bidi algorithm; brackets and guillemets are mirrored here, as
  python-bidi does not). Long text is wrapped inside its cell *before* the reordering so that
  wrapped right-to-left text reads top to bottom correctly. A right-to-left table puts the first
  column on the right. Diacritics (harakat) are dropped in the PDF (reportlab cannot position
  them), and so are zero-width (non-)joiners once shaping has used them (the font would draw
  them as a bar); characters the font lacks become their compatibility form or "?". Each page holds
  its own table (paginated here in linear time; one long reportlab table is quadratic).
* DOCX (python-docx): title heading, a table (grid style) with a bold header row that repeats
  on every page, column widths from the hints, landscape beyond ``PORTRAIT_MAX_COLUMNS``
  columns. Text stays logical-order Unicode (Word shapes it itself); paragraphs with
  right-to-left text are marked ``bidi`` and, for right-to-left content, the table is
  ``bidiVisual`` (first column on the right) and the section is right-to-left.

Right-to-left detection: a text cell "is RTL" when it contains a Hebrew/Arabic-script letter and
"is LTR" when it has only left-to-right letters (digits and punctuation count for neither); the
layout is right-to-left when RTL cells are at least as many as LTR ones (and there is one).
Within a document, each cell still gets its own direction: a cell with RTL letters is laid out
right-to-left (in an LTR document: when its first strong letter is RTL), a cell with Latin text
only left-to-right, so e-mail addresses and codes never come out mirrored.

Performance (10,000 rows x 6 mixed Persian/Latin columns, one core): CSV about 0.2 s, XLSX
about 2 s, DOCX about 1 s, PDF about 5.5 s (445 A4 pages).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import re
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar
from xml.sax.saxutils import escape

M = TypeVar("M")

__all__ = [
    "DOCUMENT_FORMATS",
    "DOWNLOAD_CHUNK",
    "FORMATS",
    "Column",
    "Document",
    "content_type",
    "detect_rtl",
    "file_extension",
    "font_path",
    "media_type",
    "render",
    "render_document",
    "render_document_to",
    "render_to",
    "stream_document",
    "stream_file",
    "png_size",
    "stream_table",
    "text_direction",
]

FORMATS: dict[str, tuple[str, str]] = {
    "csv": ("text/csv; charset=utf-8", "csv"),
    "xlsx": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx"),
    "pdf": ("application/pdf", "pdf"),
    "docx": ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx"),
}
DOCUMENT_FORMATS = ("pdf", "docx", "xlsx")  # a Document (heading, key/value lines, table, totals)

SAMPLE_ROWS = 200  # rows looked at (before streaming the rest) for rtl=None and XLSX widths
PORTRAIT_MAX_COLUMNS = 6  # more columns than this: A4 landscape (PDF, DOCX)
XLSX_MAX_TEXT = 32767  # Excel's limit for one cell
PDF_MAX_LINES = 20  # lines kept per PDF cell (the rest is cut with an ellipsis)
DOWNLOAD_CHUNK = 256 * 1024  # bytes per message of a streamed download
SPOOL_BYTES = 8 * 1024 * 1024  # a download is rendered in memory up to this size, then on disk

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Characters XML 1.0 (XLSX, DOCX) cannot hold; also meaningless in a PDF.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff\ud800-\udfff]")
# Invisible bidi controls: their job is done once a line is in visual order.
_BIDI_CONTROLS = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069\u061c]")
# Zero-width non-joiner and joiner: the shaper reads them, the font would draw them.
_JOINER_CONTROLS = re.compile("[\u200c\u200d]")
# Bidi classes reset to the paragraph level at the end of a line (UAX #9 rule L1).
_L1_CLASSES = frozenset({"WS", "S", "BN", "LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})
_LEVELS_FIELD = "\n    levels: [\n"
_LEVEL = re.compile(r"Level\(\s*(\d+),?\s*\)")


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    width: float = 1.0


@dataclass(frozen=True)
class Document:
    """A titled document: key/value lines, a table and its totals (a quote, an invoice)."""

    title: str
    columns: Sequence[Column]
    rows: Iterable[Mapping[str, Any]]
    fields: Sequence[tuple[str, Any]] = ()  # (label, value) lines under the heading
    totals: Sequence[tuple[str, Any]] = ()  # (label, value) lines under the table
    notes: str = ""  # closing text (terms, thanks); newlines start new lines
    rtl: bool | None = None
    chart: bytes | None = None  # a PNG (charts.render("png", ...)) drawn above the table


@dataclass(frozen=True)
class _Extras:
    """What a Document adds around the table."""

    fields: tuple[tuple[str, Any], ...] = ()  # (label, value as given)
    totals: tuple[tuple[str, Any], ...] = ()
    notes: str = ""
    chart: bytes | None = None

    def texts(self) -> Iterator[str]:
        for label, value in (*self.fields, *self.totals):
            yield label
            yield _text(value)
        yield self.notes


def _check(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def content_type(fmt: str) -> str:
    """The MIME type of a document in ``fmt`` (the CSV one with its charset, once)."""
    return FORMATS[_check(fmt)][0]


media_type = content_type


def file_extension(fmt: str) -> str:
    """The file name extension (no dot) of a document in ``fmt``."""
    return FORMATS[_check(fmt)][1]


def render(
    fmt: str,
    columns: Sequence[Column],
    rows: Iterable[Mapping[str, Any]],
    *,
    title: str = "",
    rtl: bool | None = None,
) -> bytes:
    """Render ``rows`` as a ``fmt`` document and return its bytes."""
    out = io.BytesIO()
    render_to(fmt, columns, rows, out, title=title, rtl=rtl)
    return out.getvalue()


def render_to(
    fmt: str,
    columns: Sequence[Column],
    rows: Iterable[Mapping[str, Any]],
    out: IO[bytes],
    *,
    title: str = "",
    rtl: bool | None = None,
) -> None:
    """Render ``rows`` as a ``fmt`` document into the binary file object ``out``."""
    _render(_check(fmt), columns, rows, out, title, rtl, None)


def render_document(fmt: str, doc: Document) -> bytes:
    """Render a ``Document`` as PDF, DOCX or XLSX and return its bytes."""
    out = io.BytesIO()
    render_document_to(fmt, doc, out)
    return out.getvalue()


def render_document_to(fmt: str, doc: Document, out: IO[bytes]) -> None:
    """Render a ``Document`` as PDF, DOCX or XLSX into the binary file object ``out``."""
    if _check(fmt) not in DOCUMENT_FORMATS:
        raise ValueError(f"a document with a heading is rendered as {', '.join(DOCUMENT_FORMATS)}, not {fmt!r}")
    extras = _Extras(
        tuple((_text(k), v) for k, v in doc.fields),
        tuple((_text(k), v) for k, v in doc.totals),
        _text(doc.notes),
        doc.chart or None,
    )
    if extras.chart:
        png_size(extras.chart)  # refuse anything but a PNG before rendering
    _render(fmt, doc.columns, doc.rows, out, doc.title, doc.rtl, extras)


def _render(
    fmt: str,
    columns: Sequence[Column],
    rows: Iterable[Mapping[str, Any]],
    out: IO[bytes],
    title: str,
    rtl: bool | None,
    extras: _Extras | None,
) -> None:
    """A table export (``extras`` None) or a Document (its heading, fields, totals, notes)."""
    columns = list(columns)
    if not columns:
        raise ValueError("an export needs at least one column")
    sample, rows = _peek(rows, SAMPLE_ROWS)
    if rtl is None:
        texts = itertools.chain(
            [title],
            extras.texts() if extras else (),
            (c.header for c in columns),
            (_text(row.get(c.key)) for row in sample for c in columns),
        )
        rtl = detect_rtl(texts)
    if fmt == "csv":
        _write_csv(out, columns, rows)
    elif fmt == "xlsx":
        _write_xlsx(out, columns, rows, sample, title, rtl, extras)
    elif fmt == "pdf":
        _write_pdf(out, columns, rows, title, rtl, extras)
    else:
        _write_docx(out, columns, rows, title, rtl, extras)


# --------------------------------------------------------------------------- streamed downloads


def stream_file(
    message: Callable[..., M], write: Callable[[IO[bytes]], Mapping[str, Any]], *, chunk_size: int = DOWNLOAD_CHUNK
) -> Iterator[M]:
    """The messages of a server-streaming download: ``write(out)`` renders the file into a
    spooled temporary file and returns the first message's fields (content_type, filename,
    ...); then ``message(data=chunk)`` until the end. Nothing is yielded before ``write``
    returns, so an error it raises fails the call before any byte."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as out:
        head = write(out)
        out.seek(0)
        yield message(**head)
        while chunk := out.read(chunk_size):
            yield message(data=chunk)


def _has_field(message: Any, name: str) -> bool:
    descriptor = getattr(message, "DESCRIPTOR", None)
    return descriptor is not None and name in descriptor.fields_by_name


def stream_table(
    message: Callable[..., M],
    fmt: str,
    columns: Sequence[Column],
    rows: Iterable[Mapping[str, Any]],
    *,
    filename: str,
    title: str = "",
    rtl: bool | None = None,
    chunk_size: int = DOWNLOAD_CHUNK,
) -> Iterator[M]:
    """``render_to`` as a streamed download: the head carries the media type, ``filename``
    with the format's extension and, if ``message`` has the field, ``row_count``."""
    _check(fmt)
    counted = 0

    def counting() -> Iterator[Mapping[str, Any]]:
        nonlocal counted
        for row in rows:
            counted += 1
            yield row

    def write(out: IO[bytes]) -> dict[str, Any]:
        render_to(fmt, columns, counting(), out, title=title, rtl=rtl)
        head: dict[str, Any] = {"content_type": content_type(fmt), "filename": f"{filename}.{file_extension(fmt)}"}
        if _has_field(message, "row_count"):
            head["row_count"] = counted
        return head

    return stream_file(message, write, chunk_size=chunk_size)


def stream_document(
    message: Callable[..., M], fmt: str, doc: Document, *, filename: str, chunk_size: int = DOWNLOAD_CHUNK
) -> Iterator[M]:
    """``render_document_to`` as a streamed download (head: content_type, filename and, if
    ``message`` has the field, ``row_count``: the table's rows)."""
    counted = 0

    def counting() -> Iterator[Mapping[str, Any]]:
        nonlocal counted
        for row in doc.rows:
            counted += 1
            yield row

    def write(out: IO[bytes]) -> dict[str, Any]:
        render_document_to(fmt, dataclasses.replace(doc, rows=counting()), out)
        head: dict[str, Any] = {"content_type": content_type(fmt), "filename": f"{filename}.{file_extension(fmt)}"}
        if _has_field(message, "row_count"):
            head["row_count"] = counted
        return head

    return stream_file(message, write, chunk_size=chunk_size)


# --------------------------------------------------------------------------- text and direction


def _peek(rows: Iterable[Mapping[str, Any]], n: int) -> tuple[list[Mapping[str, Any]], Iterator[Mapping[str, Any]]]:
    it = iter(rows)
    sample = list(itertools.islice(it, n))
    return sample, itertools.chain(sample, it)


def _text(value: Any) -> str:
    """A cell value as the text shown in CSV, PDF and DOCX."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _strong(ch: str) -> str | None:
    bidi = unicodedata.bidirectional(ch)
    if bidi in ("R", "AL"):
        return "R"
    if bidi == "L":
        return "L"
    return None


@lru_cache(maxsize=4096)
def _has_rtl(text: str) -> bool:
    return any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text)


def _first_strong(text: str) -> str | None:
    for ch in text:
        d = _strong(ch)
        if d:
            return d
    return None


def text_direction(text: str) -> str | None:
    """The direction of ``text``'s first strong letter: "R" (Hebrew/Arabic script), "L", or None
    (digits and punctuation only). The base direction a renderer should give the line."""
    return _first_strong(text)


def detect_rtl(texts: Iterable[str]) -> bool:
    """True when the texts are mostly right-to-left (see the module docstring)."""
    rtl_cells = ltr_cells = 0
    for text in texts:
        if not text:
            continue
        if _has_rtl(text):
            rtl_cells += 1
        elif _first_strong(text) == "L":
            ltr_cells += 1
    return rtl_cells > 0 and rtl_cells >= ltr_cells


def _cell_is_rtl(text: str, doc_rtl: bool) -> bool:
    """The base direction of one cell's paragraph."""
    if not _has_rtl(text):
        return False
    return doc_rtl or _first_strong(text) == "R"


def _xml_text(text: str) -> str:
    return _XML_ILLEGAL.sub("", text)


# --------------------------------------------------------------------------- CSV


def _csv_cell(value: Any) -> str:
    text = _text(value)
    if isinstance(value, str | list | tuple) and text.startswith(_FORMULA_START):
        return "'" + text
    return text


def _write_csv(out: IO[bytes], columns: list[Column], rows: Iterable[Mapping[str, Any]]) -> None:
    text = io.TextIOWrapper(out, encoding="utf-8-sig", newline="", write_through=False)
    try:
        writer = csv.writer(text, dialect="excel", lineterminator="\r\n")
        writer.writerow([_csv_cell(c.header) for c in columns])
        keys = [c.key for c in columns]
        writer.writerows([_csv_cell(row.get(k)) for k in keys] for row in rows)
        text.flush()
    finally:
        text.detach()  # leave ``out`` open for the caller


# --------------------------------------------------------------------------- XLSX


def _sheet_title(title: str) -> str:
    name = re.sub(r"[\[\]:*?/\\]", " ", _xml_text(title)).strip().strip("'")[:31].strip()
    return name or "Export"


def _xlsx_width(column: Column, sample: list[Mapping[str, Any]]) -> float:
    longest = max((len(line) for line in column.header.splitlines()), default=0)
    for row in sample:
        text = _text(row.get(column.key))
        if text:
            longest = max(longest, max(len(line) for line in text.splitlines()))
    return round(min(max(longest + 2, 10 * column.width, 8), 60), 1)


def _write_xlsx(
    out: IO[bytes],
    columns: list[Column],
    rows: Iterable[Mapping[str, Any]],
    sample: list[Mapping[str, Any]],
    title: str,
    rtl: bool,
    extras: _Extras | None = None,
) -> None:
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ERROR_CODES
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    wb = Workbook(write_only=True)
    ws = wb.create_sheet(title=_sheet_title(title))
    if title:
        wb.properties.title = _xml_text(title)
    bold = Font(bold=True)

    def text_cell(text: str, font: Font | None = None) -> WriteOnlyCell:
        cell = WriteOnlyCell(ws, value=_xml_text(text)[:XLSX_MAX_TEXT])
        cell.data_type = "s"  # never a formula
        if font is not None:
            cell.font = font
        return cell

    def value(v: Any) -> Any:
        if v is None or isinstance(v, bool | int | float | Decimal):
            return v
        if isinstance(v, datetime):
            return v.replace(tzinfo=None) if v.tzinfo is not None else v
        if isinstance(v, date):
            return v
        text = _xml_text(_text(v))[:XLSX_MAX_TEXT]
        if text.startswith("=") or text in ERROR_CODES:
            # openpyxl would store these as a formula or an error value: force plain text.
            cell = WriteOnlyCell(ws, value=text)
            cell.data_type = "s"
            return cell
        return text

    # A document's heading, key/value lines and a blank row come before the table's header.
    preamble: list[list[Any]] = []
    if extras is not None:
        if title:
            preamble.append([text_cell(title, Font(bold=True, size=14))])
        preamble += [[text_cell(k, bold), value(v)] for k, v in extras.fields]
        if preamble:
            preamble.append([])
    header_row = len(preamble) + 1
    # Everything before the first row must be set now: write-only sheets stream from there.
    ws.sheet_view.rightToLeft = rtl
    ws.freeze_panes = f"A{header_row + 1}"
    for i, column in enumerate(columns, 1):
        ws.column_dimensions[get_column_letter(i)].width = _xlsx_width(column, sample)
    for line in preamble:
        ws.append(line)

    header_align = Alignment(vertical="center", wrap_text=True)
    header = []
    for column in columns:
        cell = text_cell(column.header, bold)
        cell.alignment = header_align
        header.append(cell)
    ws.append(header)

    keys = [c.key for c in columns]
    last_row = header_row
    for row in rows:
        ws.append([value(row.get(k)) for k in keys])
        last_row += 1
    ws.auto_filter.ref = f"A{header_row}:{get_column_letter(len(columns))}{last_row}"
    if extras is not None:
        # Totals under the table: the label beside the last column, the value in it.
        if extras.totals:
            ws.append([])
        pad = [None] * max(len(columns) - 2, 0)
        for k, v in extras.totals:
            ws.append([*pad, text_cell(k, bold), value(v)] if len(columns) > 1 else [text_cell(f"{k}: {_text(v)}")])
        if extras.notes:
            ws.append([])
            for line in extras.notes.splitlines():
                ws.append([text_cell(line)])
        if extras.chart:
            from openpyxl.drawing.image import Image

            chart_ws = wb.create_sheet(title="نمودار" if rtl else "Chart")
            chart_ws.sheet_view.rightToLeft = rtl
            chart_ws.add_image(Image(io.BytesIO(extras.chart)), "A1")
    wb.save(out)


# --------------------------------------------------------------------------- PDF


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height in pixels of a PNG, from its header; ValueError if it is not one."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("a document's chart must be a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


_PDF_FONT = "CRMExportSans"
_NOTO_FILE = "NotoSansArabic[wdth,wght].ttf"


def font_path() -> Path:
    """The TrueType font embedded in PDFs (Noto Sans Arabic, from ``fontpkg-noto-sans-arabic``)."""
    import fontpkg_noto_sans_arabic

    files = Path(fontpkg_noto_sans_arabic.__file__).resolve().parent / "files"
    path = files / _NOTO_FILE
    if path.is_file():
        return path
    found = sorted(files.glob("*.ttf"))
    if not found:
        raise FileNotFoundError(f"no .ttf font in {files}")
    return found[0]


_font_lock = threading.Lock()
_font: tuple[str, frozenset[int]] | None = None


def _pdf_font() -> tuple[str, frozenset[int]]:
    """Register the PDF font once per process; return its name and the code points it covers."""
    global _font
    with _font_lock:  # two first exports at once must not register two different font objects
        if _font is None:
            from reportlab.pdfbase import pdfmetrics
            from reportlab.pdfbase.ttfonts import TTFont

            font = TTFont(_PDF_FONT, str(font_path()))
            pdfmetrics.registerFont(font)
            _font = (_PDF_FONT, frozenset(font.face.charToGlyph))
        return _font


class _PdfText:
    """Turns logical-order cell text into wrapped, shaped, visual-order lines for one font size."""

    def __init__(self, font: str, covered: frozenset[int], size: float) -> None:
        import arabic_reshaper
        from reportlab.pdfbase.pdfmetrics import stringWidth

        self.font, self.covered, self.size = font, covered, size
        self._reshape = arabic_reshaper.reshape
        self._string_width = stringWidth
        self._widths: dict[str, float] = {}
        self._shaped: dict[str, str] = {}
        self.space = self.width(" ")

    def width(self, text: str) -> float:
        w = self._widths.get(text)
        if w is None:
            w = self._string_width(text, self.font, self.size)
            if len(self._widths) < 200_000:
                self._widths[text] = w
        return w

    def _shape(self, text: str) -> str:
        """arabic-reshaper, word by word: joining never crosses a space, and words repeat a lot."""
        cache = self._shaped
        out = []
        for word in text.split(" "):
            shaped = cache.get(word)
            if shaped is None:
                shaped = self._reshape(word) if _has_rtl(word) else word
                if len(cache) < 100_000:
                    cache[word] = shaped
            out.append(shaped)
        return " ".join(out)

    def _cover(self, text: str) -> str:
        """Replace characters the font lacks (after shaping) by a compatibility form or '?'."""
        covered = self.covered
        if all(ord(ch) in covered for ch in text):
            return text
        out = []
        for ch in text:
            if ord(ch) in covered or ch == "\n":
                out.append(ch)
                continue
            alt = unicodedata.normalize("NFKC", ch)
            out.append(alt if alt and all(ord(c) in covered for c in alt) else "?")
        return "".join(out)

    def _wrap(self, paragraph: str, width: float) -> list[str]:
        """Greedy word wrap of one logical-order (already shaped) paragraph."""
        lines: list[str] = []
        line: list[str] = []
        line_w = 0.0
        for word in paragraph.split(" "):
            word_w = self.width(word)
            gap = self.space if line else 0.0
            if line and line_w + gap + word_w <= width:
                line.append(word)
                line_w += gap + word_w
                continue
            if line:
                lines.append(" ".join(line))
                line, line_w = [], 0.0
            if word_w <= width:
                line, line_w = [word], word_w
                continue
            # A word wider than the cell (a long e-mail address, say): break it after an "@", else
            # after the last ". - / _", else anywhere.
            piece, piece_w = "", 0.0
            for ch in word:
                ch_w = self.width(ch)
                if piece and piece_w + ch_w > width:
                    cut = piece.find("@")
                    if cut <= 0:
                        cut = max(piece.rfind(c) for c in "./-_")
                    head, tail = (piece[: cut + 1], piece[cut + 1 :]) if 0 < cut < len(piece) - 1 else (piece, "")
                    lines.append(head)
                    piece, piece_w = tail, self._string_width(tail, self.font, self.size)
                piece += ch
                piece_w += ch_w
            line, line_w = ([piece], piece_w) if piece else ([], 0.0)
        if line or not lines:
            lines.append(" ".join(line))
        return lines

    def lines(self, text: str, width: float, rtl: bool, max_lines: int = PDF_MAX_LINES) -> list[str]:
        """``text`` (logical order) as visual-order lines no wider than ``width`` points."""
        text = _XML_ILLEGAL.sub("", text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " "))
        shaped = _has_rtl(text)
        if shaped:
            # Joining is decided; a zero-width (non-)joiner left in would be drawn as a bar.
            text = _JOINER_CONTROLS.sub("", self._shape(text))
        text = self._cover(text)
        out: list[str] = []
        for paragraph in text.split("\n"):
            out.extend(self._wrap(paragraph, width))
            if len(out) > max_lines:
                break
        if len(out) > max_lines:
            out = out[:max_lines]
            out[-1] = out[-1].rstrip() + "…"
        if shaped:
            base = "R" if rtl else "L"
            out = [_BIDI_CONTROLS.sub("", _visual(line, base)) for line in out]
        return out


@lru_cache(maxsize=1)
def _mirrors() -> dict[str, str]:
    """Bidi_Mirroring_Glyph pairs: ( ) [ ] { } < > « » and friends."""
    try:
        from bidi.mirror import MIRRORED
    except ImportError:  # pragma: no cover - python-bidi always ships it
        MIRRORED = {}
    pairs = dict(MIRRORED)
    for a, b in ("()", "[]", "{}", "<>", "«»", "‹›"):
        pairs.setdefault(a, b)
        pairs.setdefault(b, a)
    return pairs


def _bidi_levels(line: str, base: str) -> list[int] | None:
    """The resolved embedding level of each character of ``line`` (python-bidi's debug output).

    python-bidi (the Rust unicode-bidi crate) reorders but does not mirror; the levels say which
    characters end up right-to-left and so need their mirrored glyph. None if unreadable.
    """
    from bidi import get_display

    info = get_display(line, base_dir=base, debug=True)
    start = info.rfind(_LEVELS_FIELD)  # the text field is Debug-escaped: it holds no newline
    if start < 0:
        return None
    end = info.find("\n    ],", start)
    per_byte = [int(n) for n in _LEVEL.findall(info, start, end if end > 0 else len(info))]
    if len(per_byte) != len(line.encode("utf-8")):
        return None
    levels, pos = [], 0
    for ch in line:
        levels.append(per_byte[pos])
        pos += len(ch.encode("utf-8"))
    return levels


def _visual(line: str, base: str) -> str:
    """One line of logical-order text in visual (left-to-right drawing) order, mirrored (UAX #9 L1-L4)."""
    from bidi import get_display

    mirrors = _mirrors()
    if not any(ch in mirrors for ch in line):
        return get_display(line, base_dir=base)
    levels = _bidi_levels(line, base)
    if levels is None:
        return get_display(line, base_dir=base)
    end = len(line)  # L1: trailing whitespace takes the paragraph level
    while end and unicodedata.bidirectional(line[end - 1]) in _L1_CLASSES:
        end -= 1
        levels[end] = 1 if base == "R" else 0
    order = list(range(len(line)))  # L2: reverse runs, from the highest level to the lowest odd one
    odd = [lvl for lvl in levels if lvl % 2]
    if odd:
        for level in range(max(levels), min(odd) - 1, -1):
            i = 0
            while i < len(order):
                if levels[order[i]] < level:
                    i += 1
                    continue
                j = i
                while j < len(order) and levels[order[j]] >= level:
                    j += 1
                order[i:j] = order[i:j][::-1]
                i = j
    # L4: right-to-left characters take their mirrored glyph.
    return "".join(mirrors.get(line[k], line[k]) if levels[k] % 2 else line[k] for k in order)


def _numbered_canvas(font: str, size: float, rtl: bool):
    from reportlab.pdfgen.canvas import Canvas

    class NumberedCanvas(Canvas):
        """Keeps every page until the end so the footer can say "page N of M"."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:  # reportlab's camelCase name
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for number, state in enumerate(self._pages, 1):
                self.__dict__.update(state)
                self._footer(number, total)
                super().showPage()
            super().save()

        def _footer(self, number: int, total: int) -> None:
            if rtl:
                import arabic_reshaper

                label = _visual(arabic_reshaper.reshape(f"صفحه {number} از {total}"), "R")
            else:
                label = f"Page {number} of {total}"
            width, _ = self._pagesize
            self.saveState()
            self.setFont(font, size)
            self.setFillGray(0.35)
            self.drawCentredString(width / 2, 8 * 2.834645669, label)
            self.restoreState()

    return NumberedCanvas


def _pdf_closing(
    extras: _Extras,
    font: str,
    body: _PdfText,
    frame_w: float,
    last_w: float,
    rtl: bool,
    size: float,
    leading: float,
    pad_x: float,
    pad_y: float,
) -> list[Any]:
    """A document's totals (values under the table's last column) and notes."""
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_LEFT, TA_RIGHT
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

    out: list[Any] = []
    if extras.totals:
        value_w = max(last_w, frame_w * 0.22)
        label_w = frame_w - value_w
        value_col = 0 if rtl else 1
        rows = []
        for label, value in extras.totals:
            label_lines = "\n".join(body.lines(label, label_w - 2 * pad_x - 0.5, _cell_is_rtl(label, rtl), 4))
            value_text = _text(value)
            value_lines = "\n".join(body.lines(value_text, value_w - 2 * pad_x - 0.5, _cell_is_rtl(value_text, rtl), 4))
            rows.append([value_lines, label_lines] if rtl else [label_lines, value_lines])
        table = Table(rows, colWidths=[value_w, label_w] if rtl else [label_w, value_w])
        table.setStyle(
            TableStyle(
                [
                    ("FONTNAME", (0, 0), (-1, -1), font),
                    ("FONTSIZE", (0, 0), (-1, -1), size),
                    ("LEADING", (0, 0), (-1, -1), leading),
                    ("LEFTPADDING", (0, 0), (-1, -1), pad_x),
                    ("RIGHTPADDING", (0, 0), (-1, -1), pad_x),
                    ("TOPPADDING", (0, 0), (-1, -1), pad_y),
                    ("BOTTOMPADDING", (0, 0), (-1, -1), pad_y),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                    # Labels lean towards their values; values as the table's cells are aligned.
                    ("ALIGN", (0, 0), (-1, -1), "LEFT" if rtl else "RIGHT"),
                    ("ALIGN", (value_col, 0), (value_col, -1), "RIGHT" if rtl else "LEFT"),
                    ("GRID", (value_col, 0), (value_col, -1), 0.25, colors.HexColor("#9aa5b1")),
                    ("BACKGROUND", (value_col, -1), (value_col, -1), colors.HexColor("#e4e9f0")),
                ]
            )
        )
        out += [table]
    if extras.notes:
        style = ParagraphStyle(
            "document-notes", fontName=font, fontSize=size, leading=leading, alignment=TA_RIGHT if rtl else TA_LEFT
        )
        lines = body.lines(extras.notes, frame_w - 2, _cell_is_rtl(extras.notes, rtl), max_lines=60)
        out += [Spacer(1, 5 * mm), Paragraph("<br/>".join(escape(line) for line in lines), style)]
    return out


def _write_pdf(
    out: IO[bytes],
    columns: list[Column],
    rows: Iterable[Mapping[str, Any]],
    title: str,
    rtl: bool,
    extras: _Extras | None = None,
) -> None:
    from reportlab.lib import colors
    from reportlab.lib.enums import TA_LEFT, TA_RIGHT
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    font, covered = _pdf_font()
    many = len(columns) > PORTRAIT_MAX_COLUMNS
    pagesize = landscape(A4) if many else A4
    size = 7.5 if len(columns) > 10 else 8.5
    leading = size * 1.3
    pad_x, pad_y = 4.0, 3.0
    margin = 12 * mm

    doc = SimpleDocTemplate(
        out,
        pagesize=pagesize,
        leftMargin=margin,
        rightMargin=margin,
        topMargin=margin,
        bottomMargin=margin + 4 * mm,  # room for the page number
        title=title,
        author="CRM",
        creator="crm_chassis.documents",
        initialFontName=font,  # else an unused, unembedded Helvetica lands in every page's resources
        initialFontSize=size,
        initialLeading=leading,
    )
    frame_w = doc.width - 12  # a Frame pads 6pt on each side
    frame_h = doc.height - 12 - 2  # 2pt of slack against rounding

    weights = [max(float(c.width), 0.05) for c in columns]
    total = sum(weights)
    col_widths = [frame_w * w / total for w in weights]
    order = list(range(len(columns)))
    if rtl:
        order.reverse()  # the first column on the right
    keys = [columns[i].key for i in order]
    widths = [col_widths[i] for i in order]
    text_widths = [w - 2 * pad_x - 0.5 for w in widths]

    body = _PdfText(font, covered, size)
    story: list[Any] = []
    available = frame_h
    if title:
        title_size = 14.0
        title_text = _PdfText(font, covered, title_size)
        title_lines = title_text.lines(title, frame_w - 2, rtl, max_lines=4)
        style = ParagraphStyle(
            "export-title",
            fontName=font,
            fontSize=title_size,
            leading=title_size * 1.35,
            alignment=TA_RIGHT if rtl else TA_LEFT,
        )
        para = Paragraph("<br/>".join(escape(line) for line in title_lines), style)
        _, h = para.wrap(frame_w, frame_h)
        story += [para, Spacer(1, 4 * mm)]
        available -= h + 4 * mm

    def cell(text: str, width: float, max_lines: int = PDF_MAX_LINES) -> tuple[str, bool]:
        """The cell's wrapped visual lines, and whether it is a right-to-left paragraph."""
        if not text:
            return "", False
        right = _cell_is_rtl(text, rtl)
        return "\n".join(body.lines(text, width, right, max_lines)), right

    if extras is not None and extras.fields:
        # The key/value lines under the heading: label then value (label on the right when RTL).
        widest = max((body.width(_JOINER_CONTROLS.sub("", body._shape(k))) for k, _ in extras.fields), default=0.0)
        label_w = min(max(widest + 2 * pad_x + 2, frame_w * 0.12), frame_w * 0.4)
        value_w = frame_w - label_w
        kv_rows: list[list[str]] = []
        kv_style = [
            ("FONTNAME", (0, 0), (-1, -1), font),
            ("FONTSIZE", (0, 0), (-1, -1), size),
            ("LEADING", (0, 0), (-1, -1), leading),
            ("LEFTPADDING", (0, 0), (-1, -1), pad_x),
            ("RIGHTPADDING", (0, 0), (-1, -1), pad_x),
            ("TOPPADDING", (0, 0), (-1, -1), 1.5),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("TEXTCOLOR", (1, 0) if rtl else (0, 0), (1, -1) if rtl else (0, -1), colors.HexColor("#52606d")),
        ]
        for r, (label, value) in enumerate(extras.fields):
            pair = [cell(label, label_w - 2 * pad_x - 0.5, 4), cell(_text(value), value_w - 2 * pad_x - 0.5)]
            if rtl:
                pair.reverse()
            kv_rows.append([text for text, _ in pair])
            kv_style += [
                ("ALIGN", (c, r), (c, r), "RIGHT" if rtl or right else "LEFT") for c, (_, right) in enumerate(pair)
            ]
        kv = Table(kv_rows, colWidths=[value_w, label_w] if rtl else [label_w, value_w], hAlign="CENTER")
        kv.setStyle(TableStyle(kv_style))
        _, h = kv.wrap(frame_w, frame_h)
        story += [kv, Spacer(1, 4 * mm)]
        available -= h + 4 * mm

    if extras is not None and extras.chart:
        # The chart above the table, as wide as the frame and at most half its height.
        from reportlab.platypus import Image

        px_w, px_h = png_size(extras.chart)
        scale = min(frame_w / px_w, frame_h * 0.5 / px_h)
        image = Image(io.BytesIO(extras.chart), width=px_w * scale, height=px_h * scale)
        story += [image, Spacer(1, 4 * mm)]
        available -= px_h * scale + 4 * mm

    header: list[str] = []
    header_aligns: list[tuple[int, int]] = []  # (column, row) cells to right-align in an LTR table
    for c, (i, width) in enumerate(zip(order, text_widths, strict=True)):
        text, right = cell(columns[i].header, width, max_lines=4)
        header.append(text)
        if right and not rtl:
            header_aligns.append((c, 0))
    header_h = max(h.count("\n") + 1 for h in header) * leading + 2 * pad_y
    base_style = [
        ("FONTNAME", (0, 0), (-1, -1), font),
        ("FONTSIZE", (0, 0), (-1, -1), size),
        ("LEADING", (0, 0), (-1, -1), leading),
        ("LEFTPADDING", (0, 0), (-1, -1), pad_x),
        ("RIGHTPADDING", (0, 0), (-1, -1), pad_x),
        ("TOPPADDING", (0, 0), (-1, -1), pad_y),
        ("BOTTOMPADDING", (0, 0), (-1, -1), pad_y),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("ALIGN", (0, 0), (-1, -1), "RIGHT" if rtl else "LEFT"),
        ("GRID", (0, 0), (-1, -1), 0.25, colors.HexColor("#9aa5b1")),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#1f3a5f")),
        ("TEXTCOLOR", (0, 0), (-1, 0), colors.white),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#f2f5f9")]),
    ]

    def flush(page_rows: list[list[str]], aligns: list[tuple[int, int]]) -> None:
        extra = [("ALIGN", cr, cr, "RIGHT") for cr in header_aligns + aligns]
        table = Table([header, *page_rows], colWidths=widths, repeatRows=1)
        table.setStyle(TableStyle(base_style + extra))
        story.append(table)

    # Paginate here, in linear time: reportlab re-measures the rest of a table at every page
    # break, which makes one 10,000-row table quadratic. Each page gets its own table, header
    # first (repeatRows still repeats it should reportlab split a page's table after all).
    page_rows: list[list[str]] = []
    page_aligns: list[tuple[int, int]] = []
    used = header_h
    for row in rows:
        texts: list[str] = []
        right_cols: list[int] = []
        n_lines = 1
        for c, (key, width) in enumerate(zip(keys, text_widths, strict=True)):
            text, right = cell(_text(row.get(key)), width)
            texts.append(text)
            n_lines = max(n_lines, text.count("\n") + 1)
            if right and not rtl:
                right_cols.append(c)
        row_h = n_lines * leading + 2 * pad_y
        if page_rows and used + row_h > available:
            flush(page_rows, page_aligns)
            story.append(PageBreak())
            available, used, page_rows, page_aligns = frame_h, header_h, [], []
        page_aligns.extend((c, len(page_rows) + 1) for c in right_cols)
        page_rows.append(texts)
        used += row_h
    flush(page_rows, page_aligns)
    if extras is not None:
        story += _pdf_closing(extras, font, body, frame_w, col_widths[-1], rtl, size, leading, pad_x, pad_y)

    doc.build(story, canvasmaker=_numbered_canvas(font, 7.5, rtl))


# --------------------------------------------------------------------------- DOCX


def _write_docx(
    out: IO[bytes],
    columns: list[Column],
    rows: Iterable[Mapping[str, Any]],
    title: str,
    rtl: bool,
    extras: _Extras | None = None,
) -> None:
    from docx import Document
    from docx.enum.section import WD_ORIENT
    from docx.enum.table import WD_TABLE_DIRECTION
    from docx.oxml import parse_xml
    from docx.oxml.ns import nsmap, qn
    from docx.shared import Mm, Pt
    from lxml import etree

    document = Document()
    section = document.sections[0]
    if len(columns) > PORTRAIT_MAX_COLUMNS:
        section.orientation = WD_ORIENT.LANDSCAPE
        section.page_width, section.page_height = Mm(297), Mm(210)
    else:
        section.page_width, section.page_height = Mm(210), Mm(297)
    for side in ("left_margin", "right_margin", "top_margin", "bottom_margin"):
        setattr(section, side, Mm(15))
    if rtl:
        # A right-to-left section; schema order puts w:bidi just before w:rtlGutter/w:docGrid.
        sect_pr = section._sectPr
        bidi = etree.Element(qn("w:bidi"))
        successor = next((el for el in sect_pr if el.tag in (qn("w:rtlGutter"), qn("w:docGrid"))), None)
        if successor is not None:
            successor.addprevious(bidi)
        else:
            sect_pr.append(bidi)

    # 9pt text for the Latin and the complex-script (Persian) runs alike: a table, not prose.
    normal = document.styles["Normal"]
    normal.font.size = Pt(9)
    size_cs = etree.Element(qn("w:szCs"))
    size_cs.set(qn("w:val"), "18")  # half-points
    normal.element.rPr.find(qn("w:sz")).addnext(size_cs)
    # Persian as the document's complex-script language (Word picks fonts and digits by it).
    for lang in document.styles.element.iterfind(f"{qn('w:docDefaults')}//{qn('w:lang')}"):
        lang.set(qn("w:bidi"), "fa-IR")

    def set_direction(p_pr: Any, text: str) -> None:
        """Mark a paragraph right-to-left for RTL text; right-align LTR text in an RTL layout."""
        if _cell_is_rtl(text, rtl):
            p_pr.append(etree.Element(qn("w:bidi")))  # alignment then defaults to the right
        elif rtl:
            jc = etree.Element(qn("w:jc"))
            jc.set(qn("w:val"), "right")
            p_pr.append(jc)

    if title:
        document.core_properties.title = _xml_text(title)
        heading = document.add_heading(_xml_text(title), level=1)
        set_direction(heading._p.get_or_add_pPr(), title)

    usable = section.page_width - section.left_margin - section.right_margin  # EMU
    total = sum(max(float(c.width), 0.05) for c in columns)
    widths = [int(usable / 635 * max(float(c.width), 0.05) / total) for c in columns]  # twips

    def pairs_table(pairs: tuple[tuple[str, Any], ...], pair_widths: list[int], grid: bool) -> None:
        """Label/value lines as a two-column table (label first; on the right when RTL)."""
        kv = document.add_table(rows=0, cols=2)
        if grid:
            kv.style = document.styles["Table Grid"]
        kv.autofit = False
        if rtl:
            kv.table_direction = WD_TABLE_DIRECTION.RTL
        for grid_col, w in zip(kv._tbl.tblGrid.findall(qn("w:gridCol")), pair_widths, strict=True):
            grid_col.set(qn("w:w"), str(w))
        for label, value in pairs:
            cells = kv.add_row().cells
            for c, (cell, text, w) in enumerate(zip(cells, (label, _text(value)), pair_widths, strict=True)):
                cell.width = w * 635
                text = _xml_text(text)
                paragraph = cell.paragraphs[0]
                set_direction(paragraph._p.get_or_add_pPr(), text)
                lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                run = paragraph.add_run(lines[0])
                for line in lines[1:]:
                    run.add_break()
                    run.add_text(line)
                run.bold = c == 0

    if extras is not None and extras.fields:
        pairs_table(extras.fields, [int(sum(widths) * 0.3), sum(widths) - int(sum(widths) * 0.3)], grid=False)
        document.add_paragraph()
    if extras is not None and extras.chart:
        px_w, px_h = png_size(extras.chart)
        max_h = (section.page_height - section.top_margin - section.bottom_margin) * 0.5
        width = int(min(usable, max_h * px_w / px_h))
        document.add_picture(io.BytesIO(extras.chart), width=width)

    table = document.add_table(rows=0, cols=len(columns))
    table.style = document.styles["Table Grid"]
    table.autofit = False  # w:tblLayout fixed: the widths below hold
    if rtl:
        table.table_direction = WD_TABLE_DIRECTION.RTL  # w:bidiVisual: first column on the right
    tbl = table._tbl
    tbl_w = tbl.tblPr.find(qn("w:tblW"))
    if tbl_w is not None:
        tbl_w.set(qn("w:type"), "dxa")
        tbl_w.set(qn("w:w"), str(sum(widths)))
    for grid_col, w in zip(tbl.tblGrid.findall(qn("w:gridCol")), widths, strict=True):
        grid_col.set(qn("w:w"), str(w))

    # Rows are written as XML text and parsed in batches: far faster than building them one
    # element at a time through python-docx (10,000 rows in about a second).
    cell_props = [f'<w:tcPr><w:tcW w:w="{w}" w:type="dxa"/></w:tcPr>' for w in widths]
    bidi_ppr, right_ppr = "<w:pPr><w:bidi/></w:pPr>", '<w:pPr><w:jc w:val="right"/></w:pPr>'
    bold_rpr = "<w:rPr><w:b/><w:bCs/></w:rPr>"  # bCs: bold for the complex script (Persian) too

    def row_xml(texts: list[str], is_header: bool = False) -> str:
        parts = ["<w:tr>"]
        if is_header:
            parts.append("<w:trPr><w:cantSplit/><w:tblHeader/></w:trPr>")  # repeat on every page
        for text, tc_pr in zip(texts, cell_props, strict=True):
            p_pr = bidi_ppr if _cell_is_rtl(text, rtl) else right_ppr if rtl else ""
            parts.append(f"<w:tc>{tc_pr}<w:p>{p_pr}")
            if text:
                lines = "<w:br/>".join(f'<w:t xml:space="preserve">{escape(line)}</w:t>' for line in text.split("\n"))
                parts.append(f"<w:r>{bold_rpr if is_header else ''}{lines}</w:r>")
            parts.append("</w:p></w:tc>")
        parts.append("</w:tr>")
        return "".join(parts)

    def append(rows_xml: list[str]) -> None:
        batch = parse_xml(f'<w:tbl xmlns:w="{nsmap["w"]}">{"".join(rows_xml)}</w:tbl>')
        tbl.extend(list(batch))

    def clean(v: Any) -> str:
        return _xml_text(_text(v)).replace("\r\n", "\n").replace("\r", "\n")

    pending = [row_xml([clean(c.header) for c in columns], is_header=True)]
    keys = [c.key for c in columns]
    for row in rows:
        pending.append(row_xml([clean(row.get(k)) for k in keys]))
        if len(pending) >= 500:
            append(pending)
            pending = []
    if pending:
        append(pending)
    if extras is not None:
        if extras.totals:
            # Under the table, the values under its last column.
            value_w = max(widths[-1], sum(widths) // 5)
            document.add_paragraph()
            pairs_table(extras.totals, [sum(widths) - value_w, value_w], grid=True)
        if extras.notes:
            document.add_paragraph()
            for line in extras.notes.splitlines():
                p = document.add_paragraph(_xml_text(line))
                set_direction(p._p.get_or_add_pPr(), line)
    document.save(out)

"""crm_chassis.documents: every format is rendered, opened again with a reader and checked."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from datetime import date, datetime

import pytest

from crm_chassis import documents as exports
from crm_chassis.documents import Column, render

COLUMNS = [
    Column("name", "نام مشتری", 1.2),
    Column("email", "ایمیل", 1.5),
    Column("city", "شهر", 0.8),
    Column("note", "یادداشت", 2.5),
    Column("since", "تاریخ عضویت", 1.0),
    Column("tags", "برچسب‌ها", 1.0),
]

ROWS = [
    {
        "name": "علی رضایی",
        "email": "ali@example.com",
        "city": "تهران",
        "note": "مشتری VIP از سال 1402 با کد ABC-123",
        "since": date(2023, 3, 21),
        "tags": ["VIP", "عمده‌فروش"],
    },
    {
        "name": "مریم احمدی",
        "email": "maryam@example.ir",
        "city": "اصفهان",
        "note": 'نشانی: خیابان چهارباغ، پلاک ۱۲، "طبقه دوم"\nتلفن: 031-1234',
        "since": datetime(2024, 1, 5, 14, 30),
        "tags": [],
    },
    {"name": "John Smith", "email": None, "city": "Shiraz", "note": "prefers e-mail, not calls", "since": None},
]

LATIN_COLUMNS = [Column("name", "Name"), Column("city", "City"), Column("joined", "Joined")]
LATIN_ROWS = [{"name": f"Customer {i}", "city": "Berlin", "joined": date(2024, 5, 1 + i % 28)} for i in range(40)]

# "مشتری" shaped by hand (meem initial, sheen medial, teh medial, reh final, Farsi yeh isolated),
# first in logical order, then as drawn left to right.
MOSHTARI = "مشتری"
MOSHTARI_SHAPED = "\ufee3\ufeb8\ufe98\ufeae\ufbfc"
MOSHTARI_VISUAL = MOSHTARI_SHAPED[::-1]


def _many(n: int) -> list[dict]:
    return [{**ROWS[i % 2], "name": f"{ROWS[i % 2]['name']} {i}"} for i in range(n)]


# --------------------------------------------------------------------------- API


def test_content_types_and_extensions():
    assert exports.content_type("csv").startswith("text/csv")
    assert exports.content_type("pdf") == "application/pdf"
    assert exports.content_type("xlsx").endswith("spreadsheetml.sheet")
    assert exports.content_type("docx").endswith("wordprocessingml.document")
    assert [exports.file_extension(f) for f in ("csv", "xlsx", "pdf", "docx")] == ["csv", "xlsx", "pdf", "docx"]


@pytest.mark.parametrize("call", [exports.content_type, exports.file_extension, lambda f: render(f, COLUMNS, ROWS)])
def test_unknown_format_is_rejected(call):
    with pytest.raises(ValueError, match="unknown export format"):
        call("odt")


def test_rtl_detection():
    assert exports.detect_rtl(["نام", "ali@example.com", "تهران", "2024-01-01"])
    assert not exports.detect_rtl(["Name", "Berlin", "2024-01-01", "42"])
    assert not exports.detect_rtl(["", "123"])
    # Mostly Latin with one Persian cell stays left-to-right.
    assert not exports.detect_rtl(["Name", "City", "Email", "تهران"])


def test_rows_are_consumed_lazily_once():
    def gen():
        yield from _many(300)

    data = render("csv", COLUMNS, gen())
    assert len(list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))) == 301


# --------------------------------------------------------------------------- CSV


def _csv(data: bytes) -> list[list[str]]:
    assert data.startswith(b"\xef\xbb\xbf"), "UTF-8 byte order mark for Excel"
    return list(csv.reader(io.StringIO(data[3:].decode("utf-8"), newline="")))


def test_csv_round_trip_keeps_persian_and_quotes_rfc4180():
    data = render("csv", COLUMNS, ROWS)
    assert b"\r\n" in data and data.count(b"\xef\xbb\xbf") == 1
    table = _csv(data)
    assert table[0] == [c.header for c in COLUMNS]
    assert table[1] == ["علی رضایی", "ali@example.com", "تهران", ROWS[0]["note"], "2023-03-21", "VIP, عمده‌فروش"]
    # The embedded newline and double quotes survive (quoted field, doubled quotes).
    assert table[2][3] == ROWS[1]["note"]
    assert table[2][4] == "2024-01-05 14:30:00" and table[2][5] == ""
    assert table[3][1] == "" and table[3][4] == ""  # None -> empty
    assert len(table) == 4


def test_csv_guards_against_formula_injection():
    cols = [Column("v", "=HEADER()"), Column("n", "n")]
    values = ['=HYPERLINK("http://x","y")', "+98 912 000 0000", "-2+3", "@SUM(A1:A2)", "\tcmd", "\rcmd", "safe = ok"]
    rows = [{"v": v, "n": -5} for v in values] + [{"v": ["=1+1", "x"], "n": 1.5}]
    table = _csv(render("csv", cols, rows))
    assert table[0] == ["'=HEADER()", "n"]
    assert [r[0] for r in table[1:]] == ["'" + v for v in values[:-1]] + ["safe = ok", "'=1+1, x"]
    # Numbers are data, not text: a negative number stays a number.
    assert [r[1] for r in table[1:]] == ["-5"] * len(values) + ["1.5"]


# --------------------------------------------------------------------------- XLSX


def _xlsx(data: bytes):
    from openpyxl import load_workbook

    return load_workbook(io.BytesIO(data))


def test_xlsx_values_dates_and_rtl_view():
    wb = _xlsx(render("xlsx", COLUMNS, ROWS, title="فهرست مشتریان"))
    ws = wb.active
    assert ws.title == "فهرست مشتریان"
    assert [c.value for c in ws[1]] == [c.header for c in COLUMNS]
    assert all(c.font.b for c in ws[1])
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == "A1:F4"
    assert ws.sheet_view.rightToLeft is True

    assert [c.value for c in ws[2]][:4] == ["علی رضایی", "ali@example.com", "تهران", ROWS[0]["note"]]
    assert ws["F2"].value == "VIP, عمده‌فروش"
    assert ws["D3"].value == ROWS[1]["note"]
    assert ws["E2"].is_date and ws["E2"].value == datetime(2023, 3, 21)
    assert ws["E3"].is_date and ws["E3"].value == datetime(2024, 1, 5, 14, 30)
    assert ws["B4"].value is None and ws["E4"].value is None
    assert ws.max_row == 4
    widths = [ws.column_dimensions[letter].width for letter in "ABCDEF"]
    assert all(8 <= w <= 60 for w in widths) and widths[3] > widths[2]  # the long note column is wider


def test_xlsx_latin_only_is_left_to_right_and_numbers_stay_numbers():
    rows = [{"name": "Acme", "city": "Berlin", "joined": date(2024, 5, 1), "n": 3, "f": -2.5}]
    cols = [*LATIN_COLUMNS, Column("n", "N"), Column("f", "F")]
    ws = _xlsx(render("xlsx", cols, rows)).active
    assert not ws.sheet_view.rightToLeft
    assert ws["D2"].value == 3 and ws["E2"].value == -2.5 and ws["E2"].data_type == "n"
    assert ws["C2"].is_date
    # Forced direction wins over detection.
    assert _xlsx(render("xlsx", cols, rows, rtl=True)).active.sheet_view.rightToLeft is True


def test_xlsx_text_is_never_a_formula():
    rows = [{"v": "=cmd|' /C calc'!A0"}, {"v": "#REF!"}, {"v": "bad\x00char\x1b"}]
    ws = _xlsx(render("xlsx", [Column("v", "v")], rows)).active
    assert ws["A2"].data_type == "s" and ws["A2"].value == "=cmd|' /C calc'!A0"
    assert ws["A3"].data_type == "s" and ws["A3"].value == "#REF!"
    assert ws["A4"].value == "badchar"


def test_xlsx_streams_many_rows():
    ws = _xlsx(render("xlsx", COLUMNS, _many(2500))).active
    assert ws.max_row == 2501 and ws.auto_filter.ref == "A1:F2501"
    assert ws["A2501"].value == "مریم احمدی 2499"


# --------------------------------------------------------------------------- PDF


def _pdf_visual_lines(data: bytes) -> list[list[str]]:
    """Per page, the drawn text lines exactly as drawn: glyph codes decoded through each font's
    ToUnicode map, in drawing (left-to-right, visual) order, with no reader-side bidi guessing."""
    from pypdf import PdfReader
    from pypdf.generic import ContentStream

    reader = PdfReader(io.BytesIO(data))
    pages = []
    for page in reader.pages:
        maps = {}
        for name, ref in page["/Resources"]["/Font"].items():
            cmap = ref.get_object()["/ToUnicode"].get_object().get_data().decode("latin-1")
            table = {
                int(a, 16): chr(int(b, 16)) for a, b in re.findall(r"<([0-9A-Fa-f]{2})>\s*<([0-9A-Fa-f]{4})>", cmap)
            }
            maps[name] = table
        lines, line, font = [], [], None
        for operands, op in ContentStream(page.get_contents(), reader).operations:
            if op == b"Tf":
                font = maps[operands[0]]
            elif op == b"Tj":
                raw = operands[0]
                raw = raw.get_original_bytes() if hasattr(raw, "get_original_bytes") else bytes(raw)
                line.append("".join(font.get(b, chr(b)) for b in raw))
            elif op in (b"T*", b"ET") and line:
                lines.append("".join(line))
                line = []
        pages.append(lines)
    return pages


def test_pdf_persian_is_shaped_right_to_left_with_embedded_font():
    from pypdf import PdfReader

    data = render("pdf", COLUMNS, ROWS, title="گزارش مشتریان (March 2024)")
    assert data.startswith(b"%PDF")
    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1
    width, height = reader.pages[0].mediabox.width, reader.pages[0].mediabox.height
    assert width < height  # six columns: A4 portrait
    assert reader.metadata.title == "گزارش مشتریان (March 2024)"

    # Every font on the page is the embedded TrueType subset of Noto Sans Arabic.
    fonts = [ref.get_object() for ref in reader.pages[0]["/Resources"]["/Font"].values()]
    assert fonts
    for font in fonts:
        assert font["/Subtype"] == "/TrueType"
        assert "NotoSansArabic" in font["/BaseFont"]
        assert "/FontFile2" in font["/FontDescriptor"].get_object()

    lines = _pdf_visual_lines(data)[0]
    text = "\n".join(lines)
    # Shaped: joined presentation forms, drawn right to left; no unshaped letters for the word.
    assert MOSHTARI_VISUAL in text
    assert MOSHTARI not in text
    # The title: Persian on the right, "(March 2024)" on the left with its brackets mirrored right.
    title = lines[0]
    assert title.startswith("(March 2024) ")
    assert unicodedata.normalize("NFKC", title[len("(March 2024) ") :])[::-1] == "گزارش مشتریان"
    # A mixed cell, logical "مشتری VIP از سال 1402 با کد ABC-123": the first word is rightmost,
    # the Latin code leftmost, and Latin words and digits keep their own left-to-right order.
    mixed = next(line for line in lines if "ABC-123" in line)
    assert mixed.startswith("ABC-123 ") and mixed.endswith(" VIP " + MOSHTARI_VISUAL)
    assert " 1402 " in mixed
    # Latin-only cells are untouched; Persian digits come out as Persian digits.
    assert "ali@example.com" in text and "maryam@example.ir" in text
    assert "2023-03-21" in text and "2024-01-05" in text and "14:30:00" in text  # may wrap in its cell
    assert "۱۲" in text
    # Page numbers, in Persian for a right-to-left document.
    assert unicodedata.normalize("NFKC", lines[-1])[::-1] == "صفحه 1 از 1"


def test_pdf_text_is_readable_by_an_extractor():
    """A text extractor (pypdf, which applies its own right-to-left reordering) finds the words."""
    from pypdf import PdfReader

    text = PdfReader(io.BytesIO(render("pdf", COLUMNS, ROWS))).pages[0].extract_text()
    normalised = unicodedata.normalize("NFKC", text)
    assert MOSHTARI_SHAPED in text or MOSHTARI_VISUAL in text
    assert MOSHTARI in normalised or MOSHTARI in normalised[::-1]
    assert "ABC-123" in text and "1402" in text and "ali@example.com" in text


def test_pdf_many_rows_paginate_with_repeated_header_and_page_numbers():
    from pypdf import PdfReader

    data = render("pdf", LATIN_COLUMNS, LATIN_ROWS * 5, title="Customers")
    assert len(PdfReader(io.BytesIO(data)).pages) > 1
    pages = _pdf_visual_lines(data)
    total = len(pages)
    for number, lines in enumerate(pages, 1):
        assert lines[-1] == f"Page {number} of {total}"
        assert "Name" in lines and "City" in lines and "Joined" in lines  # header on every page
    assert pages[0][0] == "Customers"
    body = [line for lines in pages for line in lines if line.startswith("Customer ")]
    assert len(body) == len(LATIN_ROWS) * 5  # every row once, none lost at page breaks


def test_pdf_many_columns_use_landscape():
    from pypdf import PdfReader

    cols = [Column(f"c{i}", f"ستون {i}") for i in range(9)]
    page = PdfReader(io.BytesIO(render("pdf", cols, [{f"c{i}": i for i in range(9)}]))).pages[0]
    assert page.mediabox.width > page.mediabox.height


def test_pdf_long_text_wraps_inside_the_cell_in_reading_order():
    words = [f"کلمه{n}" for n in ("اول", "دوم", "سوم", "چهارم", "پنجم", "ششم", "هفتم", "هشتم", "نهم", "دهم")] * 6
    note = " ".join(words)
    data = render("pdf", COLUMNS, [{**ROWS[0], "note": note}])
    lines = _pdf_visual_lines(data)[0]
    logical = [unicodedata.normalize("NFKC", line)[::-1] for line in lines]
    wrapped = [line for line in logical if "کلمه" in line]
    assert len(wrapped) >= 4, "long text wraps onto several lines"
    # Wrapping happened before reordering: reading the lines top to bottom gives the text back.
    assert " ".join(wrapped) == note


def test_pdf_lines_fit_their_width_and_shaping_matches_the_reshaper():
    import arabic_reshaper
    from reportlab.pdfbase.pdfmetrics import stringWidth

    font, covered = exports._pdf_font()
    text = exports._PdfText(font, covered, 8.5)
    long = "user4476@example.com and a.very.long.domain-name.example.org " + ROWS[1]["note"] + " کتابخانهٔ الله لا"
    for width in (40.0, 90.0, 200.0):
        lines = text.lines(long, width, rtl=True)
        assert len(lines) > 1
        assert all(stringWidth(line, font, 8.5) <= width + 0.01 for line in lines)
    assert text.lines("user4476@example.com", 60.0, rtl=False)[0] == "user4476@"
    # Shaping word by word (cached) gives what the reshaper gives for the whole text.
    for sample in (ROWS[0]["note"], ROWS[1]["note"], "کتابخانه‌ها «الله» لا ۱۲۳ abc"):
        assert text._shape(sample) == arabic_reshaper.reshape(sample)
    # Characters the font lacks are replaced, never drawn as empty boxes.
    assert text.lines("Emoji 😀 ok", 200.0, rtl=False) == ["Emoji ? ok"]


def test_pdf_bracket_and_quote_mirroring():
    assert exports._visual("ab (cd)", "L") == "ab (cd)"
    # Logical «سلام» (Persian quotation marks) inside right-to-left text keeps its shape.
    visual = exports._visual("گفت «سلام» (hi)", "R")
    assert visual == "(hi) «" + "سلام"[::-1] + "» " + "گفت"[::-1]


# --------------------------------------------------------------------------- DOCX


def _docx(data: bytes):
    from docx import Document

    return Document(io.BytesIO(data))


def _bidi(paragraph) -> bool:
    from docx.oxml.ns import qn

    p_pr = paragraph._p.pPr
    return p_pr is not None and p_pr.find(qn("w:bidi")) is not None


def test_docx_table_persian_logical_order_and_bidi():
    from docx.oxml.ns import qn

    doc = _docx(render("docx", COLUMNS, ROWS, title="فهرست مشتریان"))
    assert doc.paragraphs[0].text == "فهرست مشتریان" and _bidi(doc.paragraphs[0])
    assert doc.core_properties.title == "فهرست مشتریان"
    table = doc.tables[0]
    assert len(table.rows) == 4
    header = table.rows[0]
    assert [c.text for c in header.cells] == [c.header for c in COLUMNS]
    assert all(run.bold for c in header.cells for run in c.paragraphs[0].runs)
    assert header._tr.trPr.find(qn("w:tblHeader")) is not None  # repeated on each page
    # Text stays logical-order Unicode: Word shapes it; no presentation forms here.
    assert [c.text for c in table.rows[1].cells] == [
        "علی رضایی",
        "ali@example.com",
        "تهران",
        ROWS[0]["note"],
        "2023-03-21",
        "VIP, عمده‌فروش",
    ]
    assert table.rows[2].cells[3].text == ROWS[1]["note"]  # the newline is a line break
    assert table.rows[3].cells[1].text == "" and table.rows[3].cells[4].text == ""
    assert not any("\ufb50" <= ch <= "\ufeff" for row in table.rows for c in row.cells for ch in c.text)
    # Right-to-left: the table (first column on the right), the section, Persian paragraphs.
    assert table._tbl.tblPr.find(qn("w:bidiVisual")) is not None
    assert doc.sections[0]._sectPr.find(qn("w:bidi")) is not None
    assert _bidi(table.rows[1].cells[0].paragraphs[0])
    assert not _bidi(table.rows[1].cells[1].paragraphs[0])  # an e-mail address stays LTR


def test_docx_latin_only_is_left_to_right_and_landscape_for_many_columns():
    from docx.enum.section import WD_ORIENT
    from docx.oxml.ns import qn

    doc = _docx(render("docx", LATIN_COLUMNS, LATIN_ROWS, title="Customers"))
    table = doc.tables[0]
    assert table._tbl.tblPr.find(qn("w:bidiVisual")) is None
    assert doc.sections[0].orientation == WD_ORIENT.PORTRAIT
    assert not any(_bidi(c.paragraphs[0]) for row in table.rows for c in row.cells)
    assert table.rows[1].cells[2].text == "2024-05-01"
    cols = [Column(f"c{i}", f"C{i}") for i in range(8)]
    wide = _docx(render("docx", cols, [{"c0": "x"}]))
    assert wide.sections[0].orientation == WD_ORIENT.LANDSCAPE
    assert wide.sections[0].page_width > wide.sections[0].page_height


def test_docx_streams_many_rows():
    table = _docx(render("docx", COLUMNS, _many(1200))).tables[0]
    assert len(table.rows) == 1201
    assert table.rows[-1].cells[0].text == "مریم احمدی 1199"


# --------------------------------------------------------------------------- documents (quotes, invoices)

INVOICE_COLUMNS = [
    Column("n", "ردیف", 0.5),
    Column("item", "شرح کالا یا خدمات", 3.0),
    Column("qty", "تعداد", 0.7),
    Column("price", "فی (ریال)", 1.3),
    Column("amount", "مبلغ (ریال)", 1.5),
]
INVOICE_LINES = [
    ("نرم‌افزار مدیریت مشتری (CRM)", 2, 125_000_000),
    ("پشتیبانی و آموزش «حضوری»", 10, 4_500_000),
    ("Cloud hosting, 12 months", 1, 60_000_000),
]


def _invoice(**overrides) -> exports.Document:
    from crm_chassis import persian

    rows = [
        {
            "n": persian.to_persian_digits(i),
            "item": item,
            "qty": persian.to_persian_digits(qty),
            "price": persian.format_number(price),
            "amount": persian.format_number(qty * price),
        }
        for i, (item, qty, price) in enumerate(INVOICE_LINES, 1)
    ]
    kwargs = {
        "title": "پیش‌فاکتور فروش",
        "columns": INVOICE_COLUMNS,
        "rows": rows,
        "fields": [
            ("شماره", "Q-1403-0042"),
            ("تاریخ", persian.format_jalali(date(2024, 8, 2), persian_digits=True)),
            ("خریدار", "شرکت البرز"),
            ("ایمیل", "buyer@alborz.example.ir"),
        ],
        "totals": [
            ("جمع", persian.format_number(355_000_000)),
            ("مبلغ قابل پرداخت", persian.format_number(390_500_000)),
        ],
        "notes": "اعتبار این پیش‌فاکتور هفت روز است.",
    }
    return exports.Document(**{**kwargs, **overrides})


def _pdf_placed(data: bytes) -> list[tuple[float, float, str]]:
    """Page 1's drawn strings as (x, y, text): text as drawn (visual order, glyphs through the
    ToUnicode map), x and y where the string starts (translations and text positions only)."""
    from pypdf import PdfReader
    from pypdf.generic import ContentStream

    reader = PdfReader(io.BytesIO(data))
    page = reader.pages[0]
    maps = {}
    for name, ref in page["/Resources"]["/Font"].items():
        cmap = ref.get_object()["/ToUnicode"].get_object().get_data().decode("latin-1")
        maps[name] = {
            int(a, 16): chr(int(b, 16)) for a, b in re.findall(r"<([0-9A-Fa-f]{2})>\s*<([0-9A-Fa-f]{4})>", cmap)
        }
    out, stack, origin, pos, leading, font = [], [], [0.0, 0.0], [0.0, 0.0], 0.0, None
    for operands, op in ContentStream(page.get_contents(), reader).operations:
        if op == b"q":
            stack.append(list(origin))
        elif op == b"Q":
            origin = stack.pop()
        elif op == b"cm":
            origin = [origin[0] + float(operands[4]), origin[1] + float(operands[5])]
        elif op == b"Tm":
            pos = [float(operands[4]), float(operands[5])]
        elif op == b"Td":
            pos = [pos[0] + float(operands[0]), pos[1] + float(operands[1])]
        elif op == b"TL":
            leading = float(operands[0])
        elif op == b"T*":
            pos = [pos[0], pos[1] - leading]
        elif op == b"Tf":
            font = maps[operands[0]]
        elif op == b"Tj":
            raw = operands[0]
            raw = raw.get_original_bytes() if hasattr(raw, "get_original_bytes") else bytes(raw)
            out.append((origin[0] + pos[0], origin[1] + pos[1], "".join(font.get(b, chr(b)) for b in raw)))
    return out


def _logical(visual: str) -> str:
    """A drawn right-to-left string back in logical order: reversed, presentation forms and
    ligatures (lam-alef) unshaped, mirrored brackets swapped back."""
    return unicodedata.normalize("NFKC", visual[::-1]).translate(str.maketrans("()«»", ")(»«"))


def _find(placed, logical: str) -> tuple[float, float]:
    """Where the string that reads ``logical`` (right to left) or equals it (left to right) is drawn."""
    for x, y, text in placed:
        if _logical(text) == logical or text == logical:
            return x, y
    raise AssertionError(f"{logical!r} is not drawn; drawn: {[t for _, _, t in placed]}")


def test_persian_invoice_pdf_is_shaped_and_laid_out_right_to_left():
    from pypdf import PdfReader

    data = exports.render_document("pdf", _invoice())
    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1 and reader.metadata.title == "پیش‌فاکتور فروش"
    placed = _pdf_placed(data)
    drawn = [text for _, _, text in placed]
    # Shaped: presentation forms, never the plain letters; no zero-width (non-)joiner drawn as a bar.
    assert any(MOSHTARI_VISUAL in text for text in drawn)
    assert not any(MOSHTARI in text for text in drawn)
    assert not any("\u200c" in text or "\u200d" in text for text in drawn)
    # The heading: "پیش" and "فاکتور" are not joined across the non-joiner (final sheen, then initial feh).
    title_x, title_y = _find(placed, "پیشفاکتور فروش")
    assert "\ufeb6\ufed3" in next(t for _, _, t in placed if _logical(t) == "پیشفاکتور فروش")[::-1]
    # Key/value lines under the heading: label on the right, value to its left.
    for label, value in (("شماره", "Q-1403-0042"), ("تاریخ", "۱۴۰۳/۰۵/۱۲"), ("خریدار", "شرکت البرز")):
        (lx, ly), (vx, vy) = _find(placed, label), _find(placed, value)
        assert ly == vy < title_y and vx < lx, label
    assert _find(placed, "buyer@alborz.example.ir")  # Latin drawn as is
    # The table: first column on the right; header above the rows; numbers keep their digit order.
    header = [_find(placed, c.header) for c in INVOICE_COLUMNS]
    assert [x for x, _ in header] == sorted((x for x, _ in header), reverse=True)
    amount_x, header_y = header[-1]
    line_x, line_y = _find(placed, "۲۵۰٬۰۰۰٬۰۰۰")
    assert line_y < header_y and abs(line_x - amount_x) < 40
    assert _find(placed, "Cloud hosting, 12 months")
    # Totals below the rows, each value left of its label and under the amount column.
    for label, value in (("جمع", "۳۵۵٬۰۰۰٬۰۰۰"), ("مبلغ قابل پرداخت", "۳۹۰٬۵۰۰٬۰۰۰")):
        (lx, ly), (vx, vy) = _find(placed, label), _find(placed, value)
        assert ly == vy < line_y and vx < lx and abs(vx - amount_x) < 40, label
    notes_x, notes_y = _find(placed, "اعتبار این پیشفاکتور هفت روز است.")
    assert notes_y < vy
    # A text extractor finds the words too.
    text = unicodedata.normalize("NFKC", reader.pages[0].extract_text())
    assert "Q-1403-0042" in text and "buyer@alborz.example.ir" in text


def test_latin_quote_pdf_is_left_to_right():
    doc = exports.Document(
        "Quote Q-42",
        [Column("item", "Item", 3), Column("amount", "Amount", 1)],
        [{"item": "CRM licence", "amount": "250,000,000"}],
        fields=[("Customer", "Alborz Ltd")],
        totals=[("Total due", "250,000,000")],
    )
    placed = _pdf_placed(exports.render_document("pdf", doc))
    (lx, ly), (vx, vy) = _find(placed, "Customer"), _find(placed, "Alborz Ltd")
    assert ly == vy and lx < vx
    assert _find(placed, "Item")[0] < _find(placed, "Amount")[0]
    (tx, ty), (ax, ay) = _find(placed, "Total due"), [p[:2] for p in placed if p[2] == "250,000,000"][-1]
    assert ty == ay and tx < ax and abs(ax - _find(placed, "Amount")[0]) < 1


def test_invoice_docx_reads_back_in_logical_order_right_to_left():
    from docx.oxml.ns import qn

    doc = _docx(exports.render_document("docx", _invoice()))
    assert doc.paragraphs[0].text == "پیش‌فاکتور فروش" and _bidi(doc.paragraphs[0])
    fields, table, totals = doc.tables
    assert [[c.text for c in r.cells] for r in fields.rows] == [
        ["شماره", "Q-1403-0042"],
        ["تاریخ", "۱۴۰۳/۰۵/۱۲"],
        ["خریدار", "شرکت البرز"],
        ["ایمیل", "buyer@alborz.example.ir"],
    ]
    assert [c.text for c in table.rows[0].cells] == [c.header for c in INVOICE_COLUMNS]
    assert [c.text for c in table.rows[1].cells] == [
        "۱",
        "نرم‌افزار مدیریت مشتری (CRM)",
        "۲",
        "۱۲۵٬۰۰۰٬۰۰۰",
        "۲۵۰٬۰۰۰٬۰۰۰",
    ]
    assert [[c.text for c in r.cells] for r in totals.rows] == [
        ["جمع", "۳۵۵٬۰۰۰٬۰۰۰"],
        ["مبلغ قابل پرداخت", "۳۹۰٬۵۰۰٬۰۰۰"],
    ]
    for t in (fields, table, totals):
        assert t._tbl.tblPr.find(qn("w:bidiVisual")) is not None  # first column on the right
    assert doc.paragraphs[-1].text == "اعتبار این پیش‌فاکتور هفت روز است." and _bidi(doc.paragraphs[-1])


def test_invoice_xlsx_keeps_numbers_and_dates_and_freezes_below_the_header():
    doc = _invoice(
        fields=[("شماره", "Q-1403-0042"), ("تاریخ", date(2024, 8, 2))],
        totals=[("جمع", 355_000_000), ("مالیات", "=1+1")],
    )
    ws = _xlsx(exports.render_document("xlsx", doc)).active
    assert ws.sheet_view.rightToLeft is True
    assert ws["A1"].value == "پیش‌فاکتور فروش" and ws["A1"].font.b
    assert (ws["A2"].value, ws["B2"].value) == ("شماره", "Q-1403-0042")
    assert ws["B3"].is_date and ws["B3"].value == datetime(2024, 8, 2)
    assert [c.value for c in ws[5]] == [c.header for c in INVOICE_COLUMNS]  # title, 2 fields, blank, header
    assert ws.freeze_panes == "A6" and ws.auto_filter.ref == "A5:E8"
    assert ws["B6"].value == "نرم‌افزار مدیریت مشتری (CRM)"
    assert (ws["D10"].value, ws["E10"].value) == ("جمع", 355_000_000) and ws["E10"].data_type == "n"
    assert ws["E11"].value == "=1+1" and ws["E11"].data_type == "s"  # text, never a formula
    assert ws["A13"].value == "اعتبار این پیش‌فاکتور هفت روز است."


def test_a_document_is_not_a_csv():
    with pytest.raises(ValueError, match="pdf, docx, xlsx"):
        exports.render_document("csv", _invoice())
    with pytest.raises(ValueError, match="unknown export format"):
        exports.render_document("odt", _invoice())


# --------------------------------------------------------------------------- streamed downloads


def test_stream_table_head_then_chunks_with_the_media_type_once():
    from crm.customer.v1 import customer_service_pb2 as pb

    messages = list(
        exports.stream_table(pb.ExportCustomersResponse, "csv", COLUMNS, _many(3000), filename="c", chunk_size=4096)
    )
    head, chunks = messages[0], messages[1:]
    assert head.content_type == "text/csv; charset=utf-8" and head.content_type.count("charset") == 1
    assert head.filename == "c.csv" and head.row_count == 3000 and not head.data
    assert len(chunks) > 1 and all(0 < len(m.data) <= 4096 and not m.filename for m in chunks)
    assert b"".join(m.data for m in chunks) == render("csv", COLUMNS, _many(3000))
    assert exports.media_type("xlsx") == exports.content_type("xlsx")


def test_stream_table_fails_before_the_first_message():
    from crm.customer.v1 import customer_service_pb2 as pb

    def rows():
        yield ROWS[0]
        raise LookupError("too many rows")

    stream = exports.stream_table(pb.ExportCustomersResponse, "pdf", COLUMNS, rows(), filename="c")
    with pytest.raises(LookupError):
        next(stream)


def test_stream_document_without_a_row_count_field():
    from crm.customer.v1 import customer_service_pb2 as pb

    messages = list(exports.stream_document(pb.DownloadImportErrorReportResponse, "pdf", _invoice(), filename="q-42"))
    assert messages[0].content_type == "application/pdf" and messages[0].filename == "q-42.pdf"
    data = b"".join(m.data for m in messages[1:])
    assert data.startswith(b"%PDF") and len(data) > 1000

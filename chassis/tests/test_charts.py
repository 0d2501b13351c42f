"""crm_chassis.charts: PNG and SVG charts, Persian labels shaped right to left, a right-to-left
layout for Persian and left-to-right for English, deterministic output; and a Document carrying
a chart (PDF, XLSX, DOCX)."""

from __future__ import annotations

import html
import io
import re
import threading
import xml.etree.ElementTree as ET

import pytest

from crm_chassis import charts, documents
from crm_chassis.charts import Chart, Series

FA_TITLE = "فروش ماهانه (کل)"
FA_SERIES = [Series("مشتریان جدید", [5, 8, 3, 12]), Series("سرنخ‌ها", [9, 4, -2, 7])]
FA_MONTHS = ["فروردین ۱۴۰۵", "اردیبهشت ۱۴۰۵", "خرداد ۱۴۰۵", "تیر ۱۴۰۵"]
EN_SERIES = [Series("Customers", [5, 8, 3, 12]), Series("Leads", [9, 4, 2, 7])]
EN_MONTHS = ["Jan", "Feb", "Mar", "Apr"]


def svg_texts(svg: bytes) -> list[tuple[str, str]]:
    """(style, text) of every <text> element of an SVG."""
    root = ET.fromstring(svg)
    return [(el.get("style", ""), el.text or "") for el in root.iter("{http://www.w3.org/2000/svg}text")]


def test_png_has_the_requested_size():
    from PIL import Image

    png = charts.render("png", Chart("bar", EN_MONTHS, EN_SERIES[:1], title="Sales", width=640, height=360))
    assert documents.png_size(png) == (640, 360)
    with Image.open(io.BytesIO(png)) as im:  # it decodes
        im.load()
        assert im.size == (640, 360) and im.format == "PNG"


@pytest.mark.parametrize("kind", charts.KINDS)
def test_every_kind_in_both_formats(kind):
    chart = Chart(kind, FA_MONTHS, FA_SERIES, title=FA_TITLE, y_label="تعداد", persian_digits=True)
    png, svg = charts.render("png", chart), charts.render("svg", chart)
    assert png.startswith(b"\x89PNG") and documents.png_size(png) == (960, 540)
    texts = [t for _, t in svg_texts(svg)]
    assert FA_TITLE in texts


def test_svg_keeps_the_persian_labels_as_right_to_left_text():
    svg = charts.render("svg", Chart("grouped_bar", FA_MONTHS, FA_SERIES, title=FA_TITLE))
    texts = svg_texts(svg)
    title = [style for style, t in texts if t == FA_TITLE]
    # logical order (the viewer shapes it, as matplotlib did for the PNG), marked right to left
    assert title and "direction: rtl" in title[0]
    assert "font-family: 'Noto Sans Arabic'" in title[0]
    for label in (*FA_MONTHS, "مشتریان جدید", "سرنخ‌ها"):
        assert any(t == label and "direction: rtl" in s for s, t in texts), label
    # text that starts with no right-to-left letter keeps the default direction
    assert all("direction: rtl" not in s for s, t in texts if t and documents.text_direction(t) != "R")


def test_the_png_text_is_shaped_and_ordered_right_to_left():
    """The engine that draws the PNG (matplotlib's libraqm layout) joins the letters and puts
    the first one on the right: what the PDF path does by hand with arabic-reshaper + bidi."""
    from matplotlib import _text_helpers
    from matplotlib.ft2font import FT2Font

    font = FT2Font(str(documents.font_path()))
    font.set_size(12, 72)
    items = list(_text_helpers.layout("سلام", font))
    by_char = {it.char: it for it in items}
    # visual order: س (first in logical order) is drawn rightmost, م before ا ...
    assert by_char["س"].x == max(it.x for it in items)
    assert by_char["م"].x < by_char["ل"].x < by_char["س"].x
    # shaped: the joined (initial) form of س is not its isolated glyph
    assert by_char["س"].glyph_index != font.get_char_index(ord("س"))


def test_a_persian_chart_is_laid_out_right_to_left():
    fig = charts.figure(Chart("line", FA_MONTHS, FA_SERIES, title=FA_TITLE, y_label="تعداد"))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.xaxis_inverted()  # the first period on the right
    assert ax.yaxis.get_ticks_position() == "right" and ax.yaxis.get_label_position() == "right"
    assert ax.title.get_text() == "" and ax._right_title.get_text() == FA_TITLE  # title on the right
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert legend.x1 <= ax.get_window_extent(renderer).x0 + 1  # legend on the left


def test_an_english_chart_stays_left_to_right():
    chart = Chart("line", EN_MONTHS, EN_SERIES, title="Monthly sales", y_label="Count")
    fig = charts.figure(chart)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not ax.xaxis_inverted()
    assert ax.yaxis.get_ticks_position() == "left"
    assert ax.get_title(loc="left") == "Monthly sales"
    renderer = fig.canvas.get_renderer()
    assert fig.legends[0].get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1 - 1
    svg = charts.render("svg", chart)
    assert b"direction: rtl" not in svg
    assert [t for _, t in svg_texts(svg) if t in EN_MONTHS] == EN_MONTHS


def test_persian_digits_are_optional():
    chart = Chart("bar", FA_MONTHS, FA_SERIES[:1], title=FA_TITLE)
    latin = {t for _, t in svg_texts(charts.render("svg", chart))}
    persian = {t for _, t in svg_texts(charts.render("svg", Chart(**{**chart.__dict__, "persian_digits": True})))}
    assert "12" in latin and "۱۲" not in latin
    assert "۱۲" in persian and "12" not in persian
    assert latin >= {"0", "3", "6", "9"}  # whole-number ticks for counts (no 1.5)


def test_large_values_and_shares_on_the_axis():
    big = Chart("bar", EN_MONTHS, [Series("Revenue", [2_000_000, 4_000_000, 1_000_000, 5_000_000])])
    assert {"2M", "4M"} <= {t for _, t in svg_texts(charts.render("svg", big))}
    share = Chart("line", EN_MONTHS, [Series("SLA", [0.5, 0.75, 0.9, 1])], percent=True)
    assert {"0%", "80%", "100%"} <= {t for _, t in svg_texts(charts.render("svg", share))}  # a line from zero


def test_pareto_curve_reaches_the_whole():
    chart = Chart("pareto", [f"D{i}" for i in range(1, 6)], [Series("Revenue", [50, 30, 10, 5, 5])])
    fig = charts.figure(chart)
    share_axes = [a for a in fig.axes if a.get_ylim() == (0, 1.05)]
    assert len(share_axes) == 1
    line = share_axes[0].get_lines()[0]
    assert [round(y, 2) for y in line.get_ydata()] == [0.5, 0.8, 0.9, 0.95, 1.0]
    assert "80%" in {t for _, t in svg_texts(charts.render("svg", chart))}


def test_nothing_to_draw_says_no_data():
    for chart, text in (
        (Chart("bar", [], [], title="Support"), "No data"),
        (Chart("line", ["a", "b"], [Series("x", [0, None])], title="Support"), "No data"),
        (Chart("pie", [], [], title="گزارش پشتیبانی"), "داده‌ای نیست"),
        (Chart("bar", [], [], title="Support", no_data="Nothing yet"), "Nothing yet"),
    ):
        assert charts.is_empty(chart)
        assert text in {t for _, t in svg_texts(charts.render("svg", chart))}
        assert documents.png_size(charts.render("png", chart)) == (960, 540)


def test_output_is_deterministic():
    chart = Chart("stacked_bar", FA_MONTHS, FA_SERIES, title=FA_TITLE)
    for fmt in charts.FORMATS:
        assert charts.render(fmt, chart) == charts.render(fmt, chart)
    svg = charts.render("svg", chart).decode()
    assert "<dc:date>" not in svg
    assert not re.search(r"\b20\d\d-\d\d-\d\d", svg)


def test_charts_drawn_in_threads_are_the_same_as_alone():
    made = [Chart(k, FA_MONTHS, FA_SERIES, title=f"{FA_TITLE} {i}") for i, k in enumerate(charts.KINDS)]
    alone = [charts.render("png", c) for c in made]
    got: dict[int, bytes] = {}

    def draw(i: int) -> None:
        got[i] = charts.render("png", made[i])

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(len(made))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(made))] == alone


def test_a_dollar_sign_is_text_not_mathtext():
    svg = charts.render("svg", Chart("bar", ["$5 plan", "$9 plan"], [Series("Sold $", [1, 2])], title="Plans $"))
    assert {"$5 plan", "$9 plan", "Plans $"} <= {html.unescape(t) for _, t in svg_texts(svg)}


def test_bad_kind_and_format():
    with pytest.raises(ValueError, match="kind"):
        charts.render("png", Chart("radar", EN_MONTHS, EN_SERIES))
    with pytest.raises(ValueError, match="format"):
        charts.render("gif", Chart("bar", EN_MONTHS, EN_SERIES))
    with pytest.raises(ValueError):
        charts.content_type("jpeg")
    assert charts.content_type("svg") == "image/svg+xml" and charts.file_extension("png") == "png"


def test_stream_chart_head_then_data():
    from crm.reporting.v1 import reporting_service_pb2 as pb

    msgs = list(charts.stream_chart(pb.ExportReportResponse, "svg", Chart("bar", EN_MONTHS, EN_SERIES), filename="x"))
    assert (msgs[0].content_type, msgs[0].filename) == ("image/svg+xml", "x.svg")
    assert b"".join(m.data for m in msgs[1:]).startswith(b"<?xml")


# --------------------------------------------------------------------------- a Document with a chart


def _report(rtl_title: bool = False) -> documents.Document:
    png = charts.render("png", Chart("bar", EN_MONTHS, EN_SERIES[:1], title="Customers per month"))
    rows = [{"month": m, "customers": n} for m, n in zip(EN_MONTHS, [5, 8, 3, 12], strict=True)]
    return documents.Document(
        "گزارش جذب" if rtl_title else "Acquisition report",
        [documents.Column("month", "Month"), documents.Column("customers", "Customers")],
        rows,
        fields=[("Period", "month")],
        chart=png,
        rtl=rtl_title or None,
    )


def test_a_report_pdf_holds_the_chart_above_the_table():
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(documents.render_document("pdf", _report())))
    page = reader.pages[0]
    assert len(page.images) == 1
    assert documents.png_size(page.images[0].data) == (960, 540) or page.images[0].image.size == (960, 540)
    text = page.extract_text()
    for word in ("Acquisition report", "Month", "Customers", "Jan", "Apr", "12"):
        assert word in text
    # top to bottom: the title, the chart, the table (page coordinates: y grows upwards)
    ys: dict[str, float] = {}

    def text_y(text, cm, tm, font_dict, font_size):
        word = text.strip()
        if word in ("Month", "Acquisition report") and word not in ys:
            ys[word] = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]

    def image_box(op, args, cm, tm):
        if op == b"Do":  # an image fills the unit square scaled by the current matrix
            ys["image_bottom"], ys["image_top"] = cm[5], cm[5] + cm[3]

    page.extract_text(visitor_text=text_y, visitor_operand_before=image_box)
    assert ys["Acquisition report"] > ys["image_top"] > ys["image_bottom"] > ys["Month"]


def test_xlsx_and_docx_carry_the_chart():
    from docx import Document as Docx
    from openpyxl import load_workbook

    wb = load_workbook(io.BytesIO(documents.render_document("xlsx", _report())))
    assert wb.sheetnames[1] == "Chart" and len(wb["Chart"]._images) == 1
    assert [c.value for c in next(wb.worksheets[0].iter_rows(min_row=1, max_row=1))][0] == "Acquisition report"
    assert load_workbook(io.BytesIO(documents.render_document("xlsx", _report(True)))).sheetnames[1] == "نمودار"
    doc = Docx(io.BytesIO(documents.render_document("docx", _report())))
    assert len(doc.inline_shapes) == 1


def test_a_document_chart_must_be_a_png():
    bad = documents.Document("x", [documents.Column("a", "A")], [], chart=b"<svg/>")
    with pytest.raises(ValueError, match="PNG"):
        documents.render_document("pdf", bad)

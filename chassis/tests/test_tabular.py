"""crm_chassis.tabular: CSV encodings and delimiters, XLSX, streaming, row numbers, header mapping."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from openpyxl import Workbook

from crm_chassis import tabular
from crm_chassis.tabular import TabularError, alias_table, cell_text, header_key, map_headers, open_table

HEADER = ["نام", "نام خانوادگی", "شهر"]
ROWS = [["علی", "رضایی", "تهران"], ["مریم", "کریمی", "اصفهان"]]


def _csv_text(rows: list[list], delimiter: str = ",") -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    return out.getvalue()


def _read(source, fmt="csv") -> tuple[list[str], list[tuple[int, list]]]:
    with open_table(source, fmt) as table:
        return table.headers, list(table)


class _Trickle(io.RawIOBase):
    """An unseekable byte stream (an upload being received) that counts what was read from it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), 64 * 1024, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


# --------------------------------------------------------------------------- CSV encodings


@pytest.mark.parametrize(
    ("encoding", "delimiter"),
    [("utf-8-sig", ","), ("utf-8", ","), ("cp1256", ","), ("utf-16", "\t"), ("utf-8", ";")],
)
def test_csv_encodings_and_delimiters_as_spreadsheets_save_them(encoding, delimiter):
    table = [HEADER, *ROWS]
    if encoding == "cp1256":  # Windows-1256 has the Arabic yeh and kaf only (Excel saves those)
        table = [[c.replace("ی", "ي").replace("ک", "ك") for c in r] for r in table]
    data = _csv_text(table, delimiter).encode(encoding)
    headers, rows = _read(data)
    assert headers == table[0]
    assert rows == [(2, table[1]), (3, table[2])]


def test_cp1256_is_detected_on_the_whole_file_not_its_start():
    """A file that is plain ASCII for its first megabytes and Windows-1256 after is not UTF-8."""
    lines = [["name", "city"]] + [[f"customer {i}", "Tehran"] for i in range(120_000)] + [["رضا", "شيراز"]]
    data = _csv_text(lines).encode("cp1256")
    assert len(data) > 2 * tabular.SNIFF_BYTES
    assert tabular.detect_encoding(io.BytesIO(data)) == "cp1256"
    headers, rows = _read(data)
    assert rows[-1] == (len(lines), ["رضا", "شيراز"])


def test_bytes_that_are_not_utf8_are_read_as_windows_1256():
    data = b"name\r\n\x81\xff\r\n"  # not UTF-8; in Windows-1256 Persian peh and yeh barree
    assert _read(data) == (["name"], [(2, ["\u067e\u06d2"])])


def test_delimiter_is_not_fooled_by_quoted_commas():
    data = b'"Name, full";"City"\r\n"Rezaei, Ali";Tehran\r\n'
    assert _read(data) == (["Name, full", "City"], [(2, ["Rezaei, Ali", "Tehran"])])


def test_row_numbers_count_records_and_keep_blank_lines_and_embedded_newlines():
    data = b'a,b\r\n"line one\nline two",x\r\n\r\n3,y\r\n'
    headers, rows = _read(data)
    assert headers == ["a", "b"]
    assert rows == [(2, ["line one\nline two", "x"]), (3, []), (4, ["3", "y"])]


def test_headers_are_trimmed_text():
    assert _read(b"\xef\xbb\xbf Name ,City\r\n")[0] == ["Name", "City"]


def test_unreadable_csv_files():
    with pytest.raises(TabularError, match="the file is empty"):
        _read(b"")
    big = b"a\r\n" + b'"' + b"x" * (csv.field_size_limit() + 10) + b'"\r\n'
    with pytest.raises(TabularError, match="not a readable CSV file"):
        _read(big)
    odd = "a,b\r\n1,2\r\n".encode("utf-16") + b"\x00"  # UTF-16 cut in the middle of a character
    with pytest.raises(TabularError, match="not readable as utf-16"):
        _read(odd)


def test_csv_streams_rows_before_the_upload_is_read_to_the_end():
    lines = [["name", "city"]] + [[f"مشتری {i}", "تهران"] for i in range(100_000)]
    data = _csv_text(lines).encode("utf-8")
    source = _Trickle(data)
    with tabular.read_csv(io.BufferedReader(source, buffer_size=tabular.SNIFF_BYTES)) as table:
        first = next(iter(table))
        assert first == (2, ["مشتری 0", "تهران"])
        assert source.pos < len(data) // 2, "the first row came before most of the file was read"
        rest = list(table)
    assert len(rest) == 99_999 and rest[-1] == (100_001, ["مشتری 99999", "تهران"])
    assert source.pos == len(data)


def test_a_seekable_file_is_read_where_it_stands_and_left_open():
    data = _csv_text([HEADER, *ROWS]).encode("utf-8-sig")
    f = io.BytesIO(data)
    with tabular.read_csv(f) as table:
        assert table.headers == HEADER and len(list(table)) == 2
    assert not f.closed


# --------------------------------------------------------------------------- XLSX


def _xlsx(rows: list[list] | None) -> bytes:
    wb = Workbook()
    if rows is not None:
        for r in rows:
            wb.active.append(r)
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def test_xlsx_first_sheet_with_typed_cells():
    data = _xlsx([["کد ملی", 2024, "Born"], ["0499370899", 42, dt.datetime(1990, 8, 3)], [None, 1.5, "x"]])
    headers, rows = _read(data, "xlsx")
    assert headers == ["کد ملی", "2024", "Born"]  # header cells as text
    assert rows == [(2, ["0499370899", 42, dt.datetime(1990, 8, 3)]), (3, [None, 1.5, "x"])]


def test_unreadable_xlsx_files():
    with pytest.raises(TabularError, match="not a readable XLSX workbook"):
        _read(b"PK\x03\x04 not really a zip", "xlsx")
    with pytest.raises(TabularError, match="the first sheet is empty"):
        _read(_xlsx(None), "xlsx")
    with pytest.raises(ValueError, match="unknown table format"):
        open_table(b"x", "ods")


# --------------------------------------------------------------------------- cells and headers


def test_cell_text():
    assert cell_text(None) == "" and cell_text("  a ") == "a"
    assert cell_text(12.0) == "12" and cell_text(1.5) == "1.5" and cell_text(7) == "7"
    assert cell_text(True) == "true"
    assert cell_text(dt.datetime(2024, 3, 20)) == "2024-03-20"
    assert cell_text(dt.datetime(2024, 3, 20, 8, 30)) == "2024-03-20 08:30:00"
    assert cell_text(dt.date(2024, 3, 20)) == "2024-03-20"


def test_header_keys_ignore_case_spacing_punctuation_and_letter_variants():
    assert header_key("E-mail") == header_key("email") == header_key(" E_MAIL ") == "email"
    assert header_key("كد ملي") == header_key("کد ملی") == header_key("کد‌ملی")  # Arabic kaf/yeh, ZWNJ


ALIASES = alias_table(
    {"given_name": ["given_name"], "family_name": ["family_name"], "email": ["email"]},
    {"given_name": ["first name", "نام"], "family_name": ["last name", "نام خانوادگی"], "email": ["ایمیل", "mail"]},
    {"family_name": ["name"]},  # a later group never overrides an earlier name: "نام" stays given_name
)


def test_alias_table_first_name_wins():
    assert ALIASES[header_key("نام")] == "given_name"
    assert ALIASES[header_key("name")] == "family_name"
    assert ALIASES[header_key("Last Name")] == "family_name"


def test_headers_map_by_alias_with_unknown_and_duplicate_columns_reported():
    headers = ["نام", "Last Name", "E-Mail", "Favourite colour", "First name", ""]
    m = map_headers(headers, ALIASES)
    assert [(c.index, c.field) for c in m.columns] == [(0, "given_name"), (1, "family_name"), (2, "email")]
    assert [c.label for c in m.columns] == ["نام (given_name)", "Last Name (family_name)", "E-Mail"]
    assert m.unknown == ["Favourite colour"]  # the blank header is no column to report
    assert m.duplicates == ["First name"]  # given_name is filled by the first column already
    assert m.missing == [] and m.ignored == []
    assert m.values(["علی", "", "a@example.ir", "blue", "x"]) == {"given_name": "علی", "email": "a@example.ir"}
    assert m.values(["علی"]) == {"given_name": "علی"}  # a short row


def test_the_callers_mapping_wins_over_aliases():
    headers = ["Name", "Surname", "Mail", "Notes"]
    mapping = {"name": "family_name", "Surname": "", "Phone": "mobile", "Notes": "note"}
    m = map_headers(headers, ALIASES, mapping)
    # "name" matches the header "Name" by key; the mapping fills family_name, so no alias does.
    assert [(c.header, c.field) for c in m.columns] == [("Name", "family_name"), ("Mail", "email"), ("Notes", "note")]
    assert m.ignored == ["Surname"]
    assert m.missing == ["Phone"]  # the mapping names a column the file does not have
    assert m.unknown == []


def test_a_field_the_mapping_fills_is_not_also_filled_by_an_alias():
    m = map_headers(["Email", "Work mail"], ALIASES, {"Work mail": "email"})
    assert [(c.header, c.field) for c in m.columns] == [("Work mail", "email")]
    assert m.duplicates == ["Email"]

"""Reading CSV and XLSX files people upload: rows with their row numbers, and header mapping.

Reading (streaming: rows are produced one at a time, a big file is never held as rows)
    ``open_table(source, fmt)`` (``fmt`` "csv" or "xlsx"), ``read_csv(source)``,
    ``read_xlsx(source)``: a ``Table`` with ``headers`` (the first row, as text) and, as its
    iterator, ``(row_number, cells)`` pairs; the header is row 1, so the first data row is 2,
    as a spreadsheet numbers it (what an error report should say). ``source`` is ``bytes`` or a
    binary file object. Use it as a context manager (an XLSX workbook holds its file open).
    A file that cannot be read at all raises ``TabularError`` with a message for the person who
    uploaded it (possibly while iterating, for a CSV that breaks half-way).

CSV encodings, as spreadsheets save them
    UTF-16 with a byte order mark (Excel's "Unicode text"), else UTF-8 with or without a byte
    order mark when the whole file is valid UTF-8, else Windows-1256 (Persian "CSV" from
    older Excel; every byte has a character there). Checking "valid UTF-8" reads the file once
    without keeping it (bytes, or a seekable file); an unseekable stream is judged by its
    first ``SNIFF_BYTES``. The delimiter is the most frequent of ``,`` ``;`` and tab outside
    quotes in the first line (comma if none).

Cells
    CSV cells are strings; XLSX cells are what openpyxl reads (str, int, float, bool, datetime,
    None; formulas as their cached values). ``cell_text(v)`` is a cell as trimmed text
    (``1.0`` -> ``"1"``, a midnight datetime -> ``"2024-03-20"``).

Header mapping
    ``header_key(h)``: a header as compared (Persian-normalised, lower case, no spaces or
    punctuation), so "E-mail", "email" and "ایمیل " compare as their keys. ``alias_table``
    builds ``{key: field}`` from ``{field: [names...]}`` groups (earlier names win).
    ``map_headers(headers, aliases, mapping)`` decides which column fills which field: the
    caller's explicit ``mapping`` (header -> field, ``""`` to ignore a column) first, then the
    aliases (never for a field the mapping fills from another column); a field is filled by
    the first column that names it. The result lists the ``columns`` used (index, header,
    field, a label for error messages), the ``unknown`` headers (matched nothing), the
    ``duplicates`` (a field already filled), the ``ignored`` ones and the mapping's
    ``missing`` headers (not in the file); ``values(cells)`` turns one row into ``{field: cell}``.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from .persian import normalize

__all__ = [
    "SNIFF_BYTES",
    "HeaderMapping",
    "MappedColumn",
    "Table",
    "TabularError",
    "alias_table",
    "cell_text",
    "detect_encoding",
    "header_key",
    "map_headers",
    "open_table",
    "read_csv",
    "read_xlsx",
]

SNIFF_BYTES = 1024 * 1024  # an unseekable CSV stream's encoding is judged on this much
_BLOCK = 1024 * 1024


class TabularError(Exception):
    """The file cannot be read at all; the message is for the person who sent it."""


# --------------------------------------------------------------------------- cells and headers


def cell_text(v: Any) -> str:
    """A cell as trimmed text: numbers without a spurious ``.0``, a midnight datetime as its date."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, dt.datetime):
        return v.date().isoformat() if v.time() == dt.time() else v.isoformat(sep=" ")
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    return str(v).strip()


_HEADER_NOISE = re.compile(r"[\s_\-.:/()'\"]+")


def header_key(header: Any) -> str:
    """A header as compared: Persian-normalised, lower case, no spaces or punctuation."""
    return _HEADER_NOISE.sub("", normalize(str(header or "")))


def alias_table(*groups: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """``{header key: field}`` from groups of ``{field: [header names]}``; the first wins."""
    table: dict[str, str] = {}
    for group in groups:
        for f, names in group.items():
            for name in names:
                table.setdefault(header_key(name), f)
    return table


@dataclass(frozen=True)
class MappedColumn:
    index: int  # the column's position in the row (0-based)
    header: str  # as the file has it
    field: str  # the field it fills
    label: str  # how an error message names it: the header, and the field if they differ


@dataclass
class HeaderMapping:
    columns: list[MappedColumn]
    unknown: list[str] = field(default_factory=list)  # headers that matched no field
    duplicates: list[str] = field(default_factory=list)  # their field is filled by an earlier column
    ignored: list[str] = field(default_factory=list)  # the mapping said "" (ignore)
    missing: list[str] = field(default_factory=list)  # mapping headers the file does not have

    def values(self, cells: list) -> dict[str, Any]:
        """One row as ``{field: cell}``; empty cells (None or blank text) are left out."""
        out = {}
        for c in self.columns:
            v = cells[c.index] if c.index < len(cells) else None
            if v is None or (isinstance(v, str) and not v.strip()):
                continue
            out[c.field] = v
        return out


def map_headers(
    headers: list[str], aliases: Mapping[str, str], mapping: Mapping[str, str] | None = None
) -> HeaderMapping:
    """Which column fills which field (see the module docstring). ``aliases`` is
    ``{header_key(name): field}`` (``alias_table`` builds one); ``mapping`` is the caller's
    ``{header: field}``, matched exactly or by key, ``""`` meaning "ignore this column"."""
    mapping = dict(mapping or {})
    explicit = {header_key(h): t for h, t in mapping.items()}
    explicit_exact = {h.strip(): t for h, t in mapping.items()}
    mapped_targets = {t for t in mapping.values() if t}
    result = HeaderMapping(columns=[])
    used: set[str] = set()
    matched_explicit: set[str] = set()
    for i, h in enumerate(headers):
        k = header_key(h)
        if h in explicit_exact or k in explicit:
            target = explicit_exact[h] if h in explicit_exact else explicit[k]
            matched_explicit.add(k)
            if not target:
                result.ignored.append(h)
                continue
        else:  # by name, unless the mapping fills that field from another column
            target = aliases.get(k, "")
            if not target:
                if h:
                    result.unknown.append(h)
                continue
            if target in mapped_targets:
                result.duplicates.append(h)
                continue
        if target in used:
            result.duplicates.append(h)
            continue
        used.add(target)
        label = h if header_key(h) == header_key(target) else f"{h} ({target})".lstrip()
        result.columns.append(MappedColumn(i, h, target, label))
    result.missing = [h for h in mapping if header_key(h) not in matched_explicit]
    return result


# --------------------------------------------------------------------------- tables


class Table:
    """A file's header row and, as an iterator, its ``(row_number, cells)`` (see the module docstring)."""

    def __init__(self, headers: list[str], rows: Iterator[tuple[int, list]], close=None) -> None:
        self.headers = headers
        self._rows = rows
        self._close = close

    def __iter__(self) -> Iterator[tuple[int, list]]:
        return self._rows

    def close(self) -> None:
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _binary(source: bytes | IO[bytes]) -> IO[bytes]:
    return io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source


def _valid_utf8(f: IO[bytes], *, complete: bool) -> bool:
    """Whether the bytes from f's position are UTF-8, read without keeping them. A sample
    (``complete`` False) may end inside a character."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        while block := f.read(_BLOCK):
            decoder.decode(block)
        if complete:
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _encoding(head: bytes, utf8: bool) -> str:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text" (UTF-16, tabs)
        return "utf-16"
    # Persian spreadsheets saved as "CSV" by older Excel are in Windows-1256.
    return "utf-8-sig" if utf8 else "cp1256"


def detect_encoding(f: IO[bytes]) -> str:
    """The encoding of a seekable CSV file (see the module docstring); ``f`` is left where it was."""
    start = f.tell()
    head = f.read(4)
    f.seek(start)
    utf8 = _valid_utf8(f, complete=True)
    f.seek(start)
    return _encoding(head, utf8)


class _Prefixed(io.RawIOBase):
    """An unseekable stream whose first bytes were read to sniff it, given back first."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self._prefix, self._rest = prefix, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n], self._prefix = self._prefix[:n], self._prefix[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _sniffed(f: IO[bytes]) -> tuple[str, IO[bytes]]:
    """The encoding of a CSV source, and the stream to read it from."""
    if f.seekable():
        return detect_encoding(f), f
    sample = f.read(SNIFF_BYTES)
    complete = len(sample) < SNIFF_BYTES
    encoding = _encoding(sample[:4], _valid_utf8(io.BytesIO(sample), complete=complete))
    return encoding, io.BufferedReader(_Prefixed(sample, f))


def _delimiter(first_line: str) -> str:
    counts = {d: 0 for d in ",;\t"}
    quoted = False
    for ch in first_line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_csv(source: bytes | IO[bytes], *, encoding: str | None = None, delimiter: str | None = None) -> Table:
    """A CSV file as a streaming ``Table`` (encoding and delimiter detected unless given)."""
    f = _binary(source)
    if encoding is None:
        encoding, f = _sniffed(f)
    text = io.TextIOWrapper(f, encoding=encoding, errors="replace" if encoding == "cp1256" else "strict", newline="")
    try:
        first = text.readline()
    except UnicodeDecodeError as e:  # only with an encoding the caller named
        raise TabularError(f"the file is not readable as {encoding}: {e}") from None
    reader = csv.reader(
        itertools.chain([first] if first else [], text), delimiter=delimiter or _delimiter(first.split("\n", 1)[0])
    )

    def records() -> Iterator[list[str]]:
        try:
            yield from reader
        except csv.Error as e:
            raise TabularError(f"the file is not a readable CSV file: {e}") from None
        except UnicodeDecodeError as e:
            raise TabularError(f"the file is not readable as {encoding}: {e}") from None

    rows = records()
    header = next(rows, None)
    if header is None:
        text.detach()
        raise TabularError("the file is empty")

    def numbered() -> Iterator[tuple[int, list]]:
        yield from enumerate(rows, start=2)

    return Table([cell_text(h) for h in header], numbered(), close=text.detach)


def read_xlsx(source: bytes | IO[bytes]) -> Table:
    """The first sheet of an XLSX workbook as a streaming ``Table`` (openpyxl, read-only)."""
    from openpyxl import load_workbook

    try:
        wb = load_workbook(_binary(source), read_only=True, data_only=True)
    except Exception as e:  # zipfile.BadZipFile, KeyError, InvalidFileException, ...
        raise TabularError(f"the file is not a readable XLSX workbook ({type(e).__name__})") from None
    try:
        if not wb.worksheets:
            raise TabularError("the workbook has no sheet")
        rows = wb.worksheets[0].iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            raise TabularError("the first sheet is empty")
    except BaseException:
        wb.close()
        raise

    def numbered() -> Iterator[tuple[int, list]]:
        for n, r in enumerate(rows, start=2):
            yield n, list(r)

    return Table([cell_text(h) for h in header], numbered(), close=wb.close)


def open_table(source: bytes | IO[bytes], fmt: str) -> Table:
    """``read_csv`` or ``read_xlsx`` by ``fmt`` ("csv" or "xlsx")."""
    if fmt == "csv":
        return read_csv(source)
    if fmt == "xlsx":
        return read_xlsx(source)
    raise ValueError(f"unknown table format {fmt!r}; expected 'csv' or 'xlsx'")

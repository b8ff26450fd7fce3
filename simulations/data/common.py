"""Reading helpers the loaders share: `RowFile` turns decoding, gzip and CSV failures into
DataErrors with a line number; `read_table` converts columns chunk by chunk (so a 25M-row
file never sits in memory as Python strings); id coding; and the events -> Dataset step.

Converters raise `BadValue(row, expected)`; `read_table` turns that into a DataError that
names the file, the 1-based line and the column, so each converter only knows about values.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import numpy as np
from fedinterest.shared.errors import ConfigError, DataError
from fedinterest.shared.schema import Catalog, Dataset, Note, SkipReport, _id_sort_key

# Unix seconds of 0001-01-01 and 9999-12-31 23:59:59 UTC: anything outside cannot be a date.
MIN_TS, MAX_TS = -62135596800, 253402300799
CHUNK_ROWS = 1 << 18
_OPEN_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError

class BadValue(Exception):
    """A converter's complaint about value number `row` of the chunk it was given."""

    def __init__(self, row: int, expected: str):
        super().__init__(expected)
        self.row, self.expected = row, expected


def open_binary(path: Path):
    """The file's bytes, transparently gunzipped for *.gz."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _undecodable_line(path: Path, encoding: str) -> int | None:
    """First line whose bytes do not decode (error path only: a text stream reports no line)."""
    with open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                return n
    return None


def text_lines(path: Path, encoding: str) -> Iterator[str]:
    """Decoded lines; bad bytes or a broken gzip stream become a DataError with the line."""
    path = Path(path)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"encoding: unknown text encoding {encoding!r}") from None
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    try:
        with open_binary(path) as raw:
            yield from io.TextIOWrapper(raw, encoding=encoding, newline="")
    except UnicodeDecodeError as e:
        line = _undecodable_line(path, encoding)
        raise DataError(path, line, None, f"bytes are not valid {encoding} ({e.reason})") from None
    except _OPEN_ERRORS as e:
        raise DataError(path, None, None, f"cannot read the file ({e})") from None


def _is_blank(row: list[str]) -> bool:
    return not any(f.strip() for f in row)


@dataclass
class RowFile:
    """A delimited text file read in chunks of rows at C speed (csv module + islice). The line
    of a row is recovered by re-reading, only when an error needs it: a quoted field may span
    lines, and tracking lines row by row would cost more than the parsing itself."""

    path: Path
    sep: str = ","
    encoding: str = "utf-8-sig"
    quoted: bool = True  # CSV quoting; False = split on `sep` (MovieLens '::', '|', tab files)

    def _rows(self) -> tuple[Iterator[list[str]], Callable[[], int]]:
        lines = text_lines(self.path, self.encoding)
        if self.quoted:
            reader = csv.reader(lines, delimiter=self.sep)
            return reader, lambda: reader.line_num
        sep = self.sep
        rows = (ln.rstrip("\r\n").split(sep) if ln.strip() else [] for ln in lines)
        return rows, lambda: 0

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[list[list[str]]]:
        rows, line_num = self._rows()
        while True:
            try:
                chunk = list(islice(rows, size))
            except csv.Error as e:
                raise DataError(self.path, line_num(), None, f"malformed CSV ({e})") from None
            if not chunk:
                return
            yield chunk

    def line_of(self, row: int) -> int:
        """1-based line on which row number `row` (0-based, header included) ends."""
        if not self.quoted:
            return row + 1
        rows, line_num = self._rows()
        for k, _ in enumerate(rows):
            if k == row:
                break
        return line_num()


def _check_header(src: RowFile, row: int, fields: list[str], required: Sequence[str]) -> list[str]:
    header = [f.strip() for f in fields]
    found = ", ".join(header)
    for col in required:
        if col not in header:
            problem = f"missing column (the header has: {found})"
        elif header.count(col) > 1:
            problem = "column appears more than once in the header"
        else:
            continue
        raise DataError(src.path, src.line_of(row), col, problem)
    return header


Converter = Callable[[Sequence[str]], "np.ndarray | list"]


def read_table(
    src: RowFile,
    converters: dict[str, Converter],
    skipped: SkipReport,
    columns: Sequence[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, np.ndarray | list]:
    """Converts the named columns chunk by chunk. `columns` names a header-less file's fields;
    without it the first non-blank row is the header and must hold every converted column.

    A wrong field count is fatal (a shifted column would silently corrupt every later value);
    blank lines are skipped and reported."""
    width = None if columns is None else len(columns)
    where = {} if columns is None else {c: list(columns).index(c) for c in converters}
    parts: dict[str, list] = {c: [] for c in converters}
    start = 0  # file row index of the next chunk's first row (the header is row 0)
    for rows in src.chunks(chunk_rows):
        first, start = start, start + len(rows)
        if width is None:  # the header is still to come
            k = next((k for k, r in enumerate(rows) if not _is_blank(r)), None)
            if k is None:
                continue
            columns = _check_header(src, first + k, rows[k], list(converters))
            width = len(columns)
            where = {c: columns.index(c) for c in converters}
            rows, first = rows[k + 1:], first + k + 1
        index = None  # file row of each kept row, once some were dropped
        if rows and set(map(len, rows)) != {width}:
            index = [first + k for k, r in enumerate(rows) if len(r) == width]
            for k, r in enumerate(rows):
                if len(r) == width:
                    continue
                if not _is_blank(r):
                    raise DataError(
                        src.path, src.line_of(first + k), None,
                        f"expected {width} fields ({', '.join(columns)}), found {len(r)}",
                    )
                first_blank = "blank lines" not in skipped.examples
                where_blank = f"{Path(src.path).name} line {src.line_of(first + k)}"
                skipped.add("blank lines", where_blank if first_blank else "")
            rows = [rows[i - first] for i in index]
        if not rows:
            continue
        for col, conv in converters.items():
            k = where[col]
            values = [r[k] for r in rows]  # 7x faster than zip(*rows), which churns the GC
            try:
                parts[col].append(conv(values))
            except BadValue as e:
                row = index[e.row] if index is not None else first + e.row
                raise DataError(
                    src.path, src.line_of(row), col,
                    f"expected {e.expected}, found {values[e.row]!r}",
                ) from None
    if width is None:
        wanted = ", ".join(converters)
        raise DataError(src.path, None, None, f"empty file: expected a header line with {wanted}")
    out: dict[str, np.ndarray | list] = {}
    for col, chunks in parts.items():
        if chunks and isinstance(chunks[0], np.ndarray):
            out[col] = np.concatenate(chunks)
        else:
            out[col] = [v for c in chunks for v in c]
    return out


# ---- converters -------------------------------------------------------------------------


def _first_bad(values: Sequence[str], ok: Callable[[str], bool]) -> int:
    return next(i for i, v in enumerate(values) if not ok(v))


def _is_int64(v: str) -> bool:
    try:
        return -(2**63) <= int(v) < 2**63
    except ValueError:
        return False


def _is_finite(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def to_unix_seconds(values: Sequence[str]) -> np.ndarray:
    """Integer unix seconds (MovieLens, Amazon); numpy parses, Python pins down a failure."""
    try:
        ts = np.asarray(values, dtype=np.str_).astype(np.int64)
    except (ValueError, OverflowError):
        raise BadValue(_first_bad(values, _is_int64), "integer unix seconds") from None
    return check_time_range(ts)


def check_time_range(ts: np.ndarray) -> np.ndarray:
    bad = np.flatnonzero((ts < MIN_TS) | (ts > MAX_TS))
    if len(bad):
        raise BadValue(int(bad[0]), "unix seconds between the years 1 and 9999")
    return ts


def to_rating(values: Sequence[str], optional: bool = False) -> np.ndarray:
    """Finite float ratings; with `optional`, an empty field means no rating (NaN)."""
    arr = np.asarray(values, dtype=np.str_)
    given = np.char.strip(arr) != "" if optional else np.ones(len(arr), bool)
    out = np.full(len(arr), np.nan, np.float32)
    try:
        parsed = arr[given].astype(np.float64)  # numpy's parse allows surrounding spaces
        if not np.isfinite(parsed).all():
            raise ValueError
    except ValueError:
        rows = np.flatnonzero(given)
        bad = _first_bad([values[i] for i in rows], _is_finite)
        raise BadValue(int(rows[bad]), "a number (rating)") from None
    out[given] = parsed
    return out


def to_text(values: Sequence[str]) -> list[str | None]:
    """Free text; an empty or blank field is no text (None)."""
    return [v.strip() or None for v in values]


def to_raw(values: Sequence[str]) -> list[str]:
    return list(values)


@dataclass
class IdCodes:
    """Converter giving string ids dense codes in first-seen order; `resolve_events` later
    renumbers them in id order (numeric when every id is an integer), as the schema sorts."""

    codes: dict[str, int] = field(default_factory=dict)

    def __call__(self, values: Sequence[str]) -> np.ndarray:
        uniq, inverse = np.unique(np.asarray(values, dtype=np.str_), return_inverse=True)
        names = [u.strip() for u in uniq.tolist()]  # strip the few distinct ids, not every row
        if "" in names:
            raise BadValue(int(np.flatnonzero(inverse == names.index(""))[0]), "a non-empty id")
        d = self.codes
        mapped = np.fromiter((d.setdefault(u, len(d)) for u in names), np.int64, len(names))
        return mapped[inverse].astype(np.int32)


class UniqueIds:
    """Converter for a catalog's id column: a repeated id is fatal (which text is right?)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, values: Sequence[str]) -> list[str]:
        out = []
        for i, v in enumerate(values):
            v = v.strip()
            if not v:
                raise BadValue(i, "a non-empty id")
            if v in self.seen:
                raise BadValue(i, "an id not used before in this file (duplicate id)")
            self.seen.add(v)
            out.append(v)
        return out


def parse_time(value: str, unit_seconds: float = 1.0) -> int:
    """Unix time in `unit_seconds` or ISO-8601 (a naive ISO time is taken as UTC) -> seconds."""
    v = value.strip()
    try:
        t = float(v)
    except ValueError:
        pass
    else:
        if not math.isfinite(t):
            raise ValueError(f"not a time: {value!r}")
        return math.floor(t * unit_seconds)
    if v.endswith(("Z", "z")):  # Python 3.10's fromisoformat rejects the 'Z' suffix
        v = v[:-1] + "+00:00"
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return math.floor(dt.timestamp())


def time_converter(unit_seconds: float = 1.0) -> Converter:
    """Unix time in `unit_seconds` (1 = seconds, 0.001 = milliseconds) or ISO-8601 strings."""

    def convert(values: Sequence[str]) -> np.ndarray:
        try:  # fast path: every value numeric
            ts = np.floor(np.asarray(values, dtype=np.str_).astype(np.float64) * unit_seconds)
        except ValueError:
            ts = np.empty(len(values), np.float64)
            for i, v in enumerate(values):
                try:
                    ts[i] = parse_time(v, unit_seconds)
                except (ValueError, OverflowError):
                    raise BadValue(i, "unix time or an ISO-8601 date/time") from None
        ok = np.isfinite(ts) & (ts >= MIN_TS) & (ts <= MAX_TS)
        if not ok.all():
            raise BadValue(int(np.flatnonzero(~ok)[0]), "a time between the years 1 and 9999")
        return ts.astype(np.int64)

    return convert


# ---- events -> Dataset ------------------------------------------------------------------


@dataclass
class Events:
    """Events after id resolution, before canonical ordering (tags attach here)."""

    catalog: Catalog
    user_ids: list[str]
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None
    text: list[str | None] | None

    def to_dataset(self, name: str, path: Path, skipped: SkipReport, **kw) -> Dataset:
        if not len(self.user):
            raise DataError(path, None, None, f"no usable events ({skipped.summary()})")
        return Dataset.from_events(
            name, self.catalog, self.user_ids, self.user, self.item, self.timestamp,
            self.rating, self.text, skipped=skipped, **kw,
        )


def resolve_events(
    catalog_rows: dict[str, tuple[str, tuple[str, ...]]],
    users: IdCodes,
    user: np.ndarray,
    items: IdCodes,
    item: np.ndarray,
    timestamp: np.ndarray,
    rating: np.ndarray | None,
    text: list[str | None] | None,
    skipped: SkipReport,
    unknown_item_reason: str,
) -> Events:
    """Maps item codes onto the catalog, drops (and reports) events whose item is not in it,
    and numbers users in id order counting only users that keep an event."""
    user = np.asarray(user, np.int32)
    item = np.asarray(item, np.int32)
    timestamp = np.asarray(timestamp, np.int64)
    rating = None if rating is None else np.asarray(rating, np.float32)
    catalog = Catalog.build(catalog_rows)
    item_names = list(items.codes)
    to_index = np.array([catalog.index.get(i, -1) for i in item_names], np.int32)
    item_idx = to_index[item]
    keep = item_idx >= 0
    if not keep.all():
        missing = np.flatnonzero(~keep)
        for pos in missing:
            skipped.add(unknown_item_reason, item_names[item[pos]])
    user_names = list(users.codes)
    kept_users = sorted({user_names[c] for c in np.unique(user[keep]).tolist()},
                        key=_id_sort_key(user_names))
    user_index = {u: i for i, u in enumerate(kept_users)}
    user_map = np.array([user_index.get(u, -1) for u in user_names], np.int32)
    return Events(
        catalog=catalog,
        user_ids=kept_users,
        user=user_map[user[keep]],
        item=item_idx[keep],
        timestamp=timestamp[keep],
        rating=None if rating is None else rating[keep],
        text=None if text is None else [t for t, k in zip(text, keep.tolist()) if k],
    )


def attach_texts(
    events: Events,
    pieces: Iterable[tuple[int, int, int, str]],
) -> tuple[int, list[Note]]:
    """Attaches private texts (user index, item index, time, text) to that user's event of that
    item (the closest in time if there are several), joining several with '; '. A text with no
    such event becomes a Note. Returns (number attached, notes)."""
    pieces = sorted(pieces, key=lambda p: p[2])  # stable: file order among equal times
    if not pieces:
        return 0, []
    n_items = max(len(events.catalog), 1)
    event_key = events.user.astype(np.int64) * n_items + events.item
    piece_key = np.array([u * n_items + i for u, i, _, _ in pieces], np.int64)
    positions: dict[int, list[int]] = {}
    for pos in np.flatnonzero(np.isin(event_key, piece_key)).tolist():
        positions.setdefault(int(event_key[pos]), []).append(pos)
    text: list[str | None] = events.text if events.text is not None else [None] * len(events.user)
    joined: dict[int, list[str]] = {}
    notes: list[Note] = []
    for key, (u, i, t, s) in zip(piece_key.tolist(), pieces):
        candidates = positions.get(key)
        if not candidates:
            notes.append(Note(user=u, item=i, timestamp=t, text=s))
            continue
        pos = min(candidates, key=lambda p: abs(int(events.timestamp[p]) - t))
        joined.setdefault(pos, []).append(s)
    for pos, parts in joined.items():
        prior = [text[pos]] if text[pos] else []
        text[pos] = "; ".join(prior + parts)
    events.text = text
    return len(pieces) - len(notes), notes

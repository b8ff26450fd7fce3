"""Amazon reviews (McAuley et al. 2014 / 2018 releases): one JSON object per line, plain or
gzipped, plus an optional metadata file.

Reviews need reviewerID, asin and unixReviewTime; `overall` is the optional rating; summary and
reviewText are the user's private text (joined by a newline). Metadata lines carry asin and
optionally title, description (string or list) and categories (2014: list of lists) or
category (2018: list). The 2014 metadata files are Python literals rather than JSON (single
quotes), so a line that is not JSON is read with `ast.literal_eval`, which evaluates literals
only, never code.

Item text is "title. Categories: a, b. description", the categories being the topics. An item
with no metadata (no metadata file, or its asin absent from it) gets its asin as text: the
model then has nothing to read but the id, which `extras["load_info"]` says.

What is fatal and what is skipped:
- fatal (DataError naming file, line, field): missing or empty file, bytes that are not UTF-8,
  a broken gzip stream, a line that is not a JSON object, a missing or ill-typed required
  field (reviewerID, asin, unixReviewTime; asin in metadata), a rating that is not a number.
- skipped and reported: blank lines, metadata lines repeating an asin (the first is kept).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
from fedinterest.shared.errors import DataError
from fedinterest.shared.schema import Dataset, SkipReport
from fedinterest.simulations.data.common import MAX_TS, MIN_TS, IdCodes, resolve_events, text_lines


def _objects(path: Path, skipped: SkipReport, literal_ok: bool = False):
    """(line, dict) for every non-blank line."""
    for line, raw in enumerate(text_lines(path, "utf-8-sig"), 1):
        if not raw.strip():
            skipped.add("blank lines", f"{path.name} line {line}")
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            obj = None
            if literal_ok:
                try:
                    obj = ast.literal_eval(raw.strip())
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    pass
            if obj is None:
                raise DataError(path, line, None, f"expected a JSON object ({e})") from None
        except RecursionError:
            raise DataError(path, line, None, "expected a JSON object (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise DataError(path, line, None, f"expected a JSON object, found {type(obj).__name__}")
        yield line, obj


def _string(path: Path, line: int, obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, line, key, f"expected a non-empty string, found {value!r}")
    return value.strip()


def _optional_text(obj: dict, key: str) -> str:
    """Free text that may be missing, null, a string or (2018 description) a list of strings."""
    value = obj.get(key)
    if isinstance(value, list):
        value = " ".join(v for v in value if isinstance(v, str))
    return value.strip() if isinstance(value, str) else ""


def _unix_time(path: Path, line: int, obj: dict, key: str = "unixReviewTime") -> int:
    value = obj.get(key)
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
        value = int(value)
    if isinstance(value, float) and math.isfinite(value):
        value = math.floor(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_TS <= value <= MAX_TS:
        raise DataError(path, line, key, f"expected integer unix seconds, found {value!r}")
    return value


def _rating(path: Path, line: int, obj: dict, key: str = "overall") -> float:
    value = obj.get(key)
    if value is None:
        return math.nan
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(path, line, key, f"expected a number (rating), found {value!r}")
    return float(value)


def _categories(obj: dict) -> tuple[str, ...]:
    """Flattened, de-duplicated categories from 2014 `categories` or 2018 `category`."""
    out: dict[str, None] = {}
    stack = [obj.get("categories"), obj.get("category")]
    while stack:
        v = stack.pop(0)
        if isinstance(v, str) and v.strip():
            out.setdefault(v.strip(), None)
        elif isinstance(v, list):
            stack[:0] = v
    return tuple(out)


def _read_meta(path: Path, skipped: SkipReport) -> dict[str, tuple[str, tuple[str, ...]]]:
    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line, obj in _objects(path, skipped, literal_ok=True):
        asin = _string(path, line, obj, "asin")
        if asin in rows:
            skipped.add(f"metadata lines repeating an asin in {path.name} (first kept)", asin)
            continue
        title, description = _optional_text(obj, "title"), _optional_text(obj, "description")
        topics = _categories(obj)
        parts = [title, f"Categories: {', '.join(topics)}" if topics else "", description]
        rows[asin] = (". ".join(p for p in parts if p) or asin, topics)
    if not rows:
        raise DataError(path, None, None, "empty file: expected one JSON object per line")
    return rows


def load_amazon(
    path: str | Path,
    meta: str | Path | None = None,
    name: str | None = None,
    keep_unreviewed_items: bool = True,
) -> Dataset:
    """Reviews from `path` (*.json, *.jsonl, optionally .gz), item text from `meta` if given.
    `keep_unreviewed_items=False` keeps only reviewed items in the catalog (metadata files often
    hold millions of items the review file never mentions)."""
    path = Path(path)
    skipped = SkipReport()
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    texts: list[str | None] = []
    for line, obj in _objects(path, skipped):
        users.append(_string(path, line, obj, "reviewerID"))
        items.append(_string(path, line, obj, "asin"))
        times.append(_unix_time(path, line, obj))
        ratings.append(_rating(path, line, obj))
        parts = [_optional_text(obj, "summary"), _optional_text(obj, "reviewText")]
        texts.append("\n".join(p for p in parts if p) or None)
    if not users:
        raise DataError(path, None, None, "empty file: expected one JSON review per line")

    catalog_rows = _read_meta(Path(meta), skipped) if meta is not None else {}
    reviewed = dict.fromkeys(items)
    if not keep_unreviewed_items:
        catalog_rows = {a: row for a, row in catalog_rows.items() if a in reviewed}
    no_meta = [a for a in reviewed if a not in catalog_rows]
    info = []
    if no_meta:
        why = "no metadata file given" if meta is None else f"not in {Path(meta).name}"
        info.append(
            f"{len(no_meta):,} items have no metadata ({why}): their text is the asin "
            f"(e.g. {no_meta[0]})"
        )
    for asin in no_meta:
        catalog_rows[asin] = (asin, ())

    user_codes, item_codes = IdCodes(), IdCodes()
    events = resolve_events(
        catalog_rows, user_codes, user_codes(users), item_codes, item_codes(items),
        np.asarray(times, np.int64), np.asarray(ratings, np.float32), texts, skipped,
        "reviews of unknown items",  # cannot happen: every reviewed asin is in the catalog
    )
    stem = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return events.to_dataset(name or stem, path, skipped, extras={"load_info": info})

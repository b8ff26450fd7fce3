"""Validation of what goes into the device store: items, timestamps, ratings, text, blob
names and text vectors, each refused with an EventValidationError naming the field."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from fedinterest.shared.errors import ConfigError

from .store_schema import EventValidationError

MAX_ITEM_CHARS = 256
MAX_BLOB_NAME_CHARS = 200
MAX_VECTOR_DIM = 65536
_INT64 = (-(2**63), 2**63 - 1)


# --------------------------------------------------------------------------- validation


def _check_item(value: Any, index: int | None = None) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise EventValidationError(
            "item", f"expected a str (or int) item id, got {type(value).__name__}", index)
    item = str(int(value)) if isinstance(value, numbers.Integral) else value
    if not item:
        raise EventValidationError("item", "expected a non-empty item id", index)
    if len(item) > MAX_ITEM_CHARS:
        raise EventValidationError(
            "item", f"item id has {len(item)} characters, limit is {MAX_ITEM_CHARS}", index)
    _check_utf8(item, "item", index)
    return item


def _check_utf8(text: str, field: str, index: int | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EventValidationError(
            field, f"not valid UTF-8 (unpaired surrogate at character {e.start})", index) from None


def _check_timestamp(value: Any, index: int | None = None, field: str = "timestamp") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EventValidationError(
            field, f"expected integer unix seconds, got {type(value).__name__}", index)
    if not isinstance(value, numbers.Integral):
        f = float(value)
        if not math.isfinite(f):
            raise EventValidationError(field, f"expected a finite time, got {f}", index)
        if not f.is_integer():
            raise EventValidationError(field, f"expected whole unix seconds, got {f}", index)
    ts = int(value)
    if not _INT64[0] <= ts <= _INT64[1]:
        raise EventValidationError(field, f"{ts} does not fit in a signed 64-bit integer", index)
    return ts


class _Limits:
    def __init__(self, max_text_chars: int, rating_range: tuple[float, float]):
        if isinstance(max_text_chars, bool) or not isinstance(max_text_chars, int) \
                or max_text_chars < 1:
            raise ConfigError(f"max_text_chars: expected a positive int, got {max_text_chars!r}")
        try:
            lo, hi = (float(x) for x in rating_range)
        except (TypeError, ValueError):
            raise ConfigError(
                f"rating_range: expected (low, high) numbers, got {rating_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ConfigError(f"rating_range: expected finite low <= high, got {rating_range!r}")
        self.max_text_chars, self.rating_lo, self.rating_hi = max_text_chars, lo, hi

    def rating(self, value: Any, index: int | None = None) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise EventValidationError(
                "rating", f"expected a number or None, got {type(value).__name__}", index)
        r = float(value)
        if math.isnan(r):
            raise EventValidationError("rating", "NaN is not a rating; pass None for none", index)
        if not self.rating_lo <= r <= self.rating_hi:
            raise EventValidationError(
                "rating", f"{r} is outside [{self.rating_lo}, {self.rating_hi}]", index)
        return r + 0.0  # -0.0 -> 0.0: SQLite stores integral REALs as integers, dropping the sign

    def text(self, value: Any, index: int | None = None) -> str | None:
        if value is None:
            return None
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as e:
                raise EventValidationError(
                    "text", f"not valid UTF-8 (bad byte at offset {e.start})", index) from None
        if not isinstance(value, str):
            raise EventValidationError(
                "text", f"expected str, UTF-8 bytes or None, got {type(value).__name__}", index)
        if len(value) > self.max_text_chars:
            raise EventValidationError(
                "text", f"has {len(value)} characters, limit is {self.max_text_chars}", index)
        _check_utf8(value, "text", index)
        return value


_EVENT_KEYS = ("item", "timestamp", "rating", "text")


def _unpack_event(ev: Any, index: int) -> tuple:
    """A batch element: a mapping with the keys above, or a tuple (item, timestamp[, rating
    [, text]])."""
    if isinstance(ev, Mapping):
        unknown = set(ev) - set(_EVENT_KEYS)
        if unknown:
            raise EventValidationError(
                min(map(str, unknown)), f"unknown key; expected {_EVENT_KEYS}", index)
        for key in ("item", "timestamp"):
            if key not in ev:
                raise EventValidationError(key, "missing", index)
        return ev["item"], ev["timestamp"], ev.get("rating"), ev.get("text")
    if isinstance(ev, (tuple, list)) and 2 <= len(ev) <= 4:
        return tuple(ev) + (None,) * (4 - len(ev))
    raise EventValidationError(
        "event", "expected a mapping with keys item, timestamp[, rating, text] or a tuple "
        f"(item, timestamp[, rating[, text]]), got {type(ev).__name__}", index)


def _check_blob_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise EventValidationError("name", f"expected a non-empty str blob name, got {name!r}")
    if len(name) > MAX_BLOB_NAME_CHARS:
        raise EventValidationError(
            "name", f"blob name has {len(name)} characters, limit is {MAX_BLOB_NAME_CHARS}")
    _check_utf8(name, "name", None)
    return name


def _vector_bytes(event_id: Any, vec: Any) -> bytes:
    arr = np.asarray(vec)
    if arr.dtype.kind not in "fiu":
        raise EventValidationError("vec", f"event {event_id}: expected numbers, got {arr.dtype}")
    if arr.ndim != 1 or not 1 <= arr.shape[0] <= MAX_VECTOR_DIM:
        raise EventValidationError(
            "vec", f"event {event_id}: expected a 1-D vector of 1..{MAX_VECTOR_DIM} numbers, "
            f"got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below, clearly
        f32 = arr.astype("<f4")
    if not np.isfinite(f32).all():
        raise EventValidationError("vec", f"event {event_id}: NaN/inf (or too large for float32)")
    return f32.tobytes()

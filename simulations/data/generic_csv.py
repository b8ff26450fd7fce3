"""Any interaction log in a CSV file, given which column is what.

`load_generic_csv(path, user="uid", item="iid", timestamp="ts", ...)`; from the command line
the same mapping is `--map user=uid,item=iid,timestamp=ts,...` (see `parse_mapping`).
Timestamps are unix time (seconds, or milliseconds with timestamp_unit=ms) or ISO-8601; an ISO
time without a zone is taken as UTC. Item text comes from `item_text`: a column of the items
file if `items_path` is given, else a column of the interactions file (the first non-empty
value per item wins). An item with no text gets its id as text, which `extras["load_info"]`
says.

What is fatal and what is skipped:
- fatal (DataError naming file, line, field): a missing or empty file, undecodable bytes, a
  missing column, a row with the wrong number of fields, an empty id, a timestamp or rating
  that does not parse, a duplicate id in the items file.
- skipped and reported: blank lines, interactions whose item is not in the items file.
An empty rating or text field means "none" (NaN / no text), not an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.schema import Dataset, SkipReport
from fedinterest.simulations.data.common import (
    IdCodes,
    RowFile,
    UniqueIds,
    read_table,
    resolve_events,
    time_converter,
    to_rating,
    to_raw,
    to_text,
)

TIME_UNITS = {"s": 1.0, "ms": 0.001}
DELIMITERS = {"comma": ",", "tab": "\t", "\\t": "\t", "semicolon": ";", "pipe": "|"}
MAPPING_KEYS = (
    "user", "item", "timestamp", "rating", "text", "item_text", "item_topics", "items_path",
    "items_id", "topic_sep", "delimiter", "encoding", "timestamp_unit", "name",
)


def parse_mapping(spec: str | list[str] | None) -> dict[str, str]:
    """'user=uid,item=iid,timestamp=ts' (or several such strings) -> keyword arguments of
    `load_generic_csv`. Delimiters that clash with ',' are written by name: tab, semicolon."""
    if not spec:
        return {}
    out: dict[str, str] = {}
    for part in ",".join([spec] if isinstance(spec, str) else spec).split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ConfigError(f"--map: expected KEY=VALUE, found {part!r}")
        if key not in MAPPING_KEYS:
            raise ConfigError(f"--map: unknown key {key!r}; accepted: {', '.join(MAPPING_KEYS)}")
        out[key] = value.strip()
    return out


def _item_catalog(
    items_path: Path,
    items_id: str,
    item_text: str | None,
    item_topics: str | None,
    topic_sep: str,
    delimiter: str,
    encoding: str,
    skipped: SkipReport,
) -> dict[str, tuple[str, tuple[str, ...]]]:
    convs: dict = {items_id: UniqueIds()}
    convs.update({c: to_raw for c in (item_text, item_topics) if c})
    cols = read_table(RowFile(items_path, delimiter, encoding), convs, skipped)
    ids = cols[items_id]
    texts = cols[item_text] if item_text else [""] * len(ids)
    topic_col = cols[item_topics] if item_topics else [""] * len(ids)
    rows = {}
    for iid, text, topics in zip(ids, texts, topic_col):
        t = tuple(x.strip() for x in topics.split(topic_sep) if x.strip())
        rows[iid] = (text.strip(), t)
    return rows


def _inline_catalog(cols: dict, items: IdCodes, item: str, item_text: str | None,
                    item_topics: str | None, topic_sep: str) -> dict[str, tuple]:
    """Item text and topics read from the interactions file itself: per item, the first
    non-empty text (and the topics of that row)."""
    catalog_rows: dict[str, tuple] = {}
    texts = cols[item_text] if item_text else None
    topics = cols[item_topics] if item_topics else None
    names = list(items.codes)
    for n, code in enumerate(np.asarray(cols[item]).tolist()):
        iid = names[code]
        t = (texts[n] or "").strip() if texts else ""
        old = catalog_rows.get(iid)
        if old is None or (not old[0] and t):
            tp = (topics[n] or "") if topics else ""
            catalog_rows[iid] = (t, tuple(x.strip() for x in tp.split(topic_sep) if x.strip()))
    return catalog_rows


def load_generic_csv(
    path: str | Path,
    user: str,
    item: str,
    timestamp: str,
    rating: str | None = None,
    text: str | None = None,
    item_text: str | None = None,
    item_topics: str | None = None,
    items_path: str | Path | None = None,
    items_id: str | None = None,
    topic_sep: str = "|",
    delimiter: str = ",",
    encoding: str = "utf-8-sig",
    timestamp_unit: str = "s",
    name: str | None = None,
) -> Dataset:
    """Interactions from `path` (columns named by user/item/timestamp/rating/text); item text
    and topics from `items_path` (its id column is `items_id`, default the same name as `item`)
    or from the interactions file itself."""
    path = Path(path)
    delimiter = DELIMITERS.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise ConfigError(f"delimiter: expected one character or {', '.join(DELIMITERS)}")
    if not topic_sep:
        raise ConfigError("topic_sep: expected a non-empty separator")
    if timestamp_unit not in TIME_UNITS:
        raise ConfigError(f"timestamp_unit: expected one of {', '.join(TIME_UNITS)}")
    skipped = SkipReport()
    on_items = items_path is not None
    inline = [c for c in (item_text, item_topics) if c and not on_items]
    optional = [c for c in (rating, text) if c]
    if len({user, item, timestamp, *optional}) != 3 + len(optional):
        raise ConfigError("--map: user, item, timestamp, rating and text need distinct columns")
    taken = {items_id or item} if on_items else {user, item, timestamp, rating}
    for key, col in (("item_text", item_text), ("item_topics", item_topics)):
        if col is not None and col in taken:
            raise ConfigError(f"--map: {key} cannot be the same column as an id, time or rating")
    users, items = IdCodes(), IdCodes()
    convs = {user: users, item: items, timestamp: time_converter(TIME_UNITS[timestamp_unit])}
    if rating:
        convs[rating] = lambda v: to_rating(v, optional=True)
    if text:
        convs[text] = to_text
    for c in inline:
        convs.setdefault(c, to_raw)
    cols = read_table(RowFile(path, delimiter, encoding), convs, skipped)

    if on_items:
        catalog_rows = _item_catalog(
            Path(items_path), items_id or item, item_text, item_topics, topic_sep, delimiter,
            encoding, skipped,
        )
    else:
        catalog_rows = _inline_catalog(cols, items, item, item_text, item_topics, topic_sep)
    no_text = [i for i, (t, _) in catalog_rows.items() if not t]
    info = []
    if no_text:
        why = "no item_text column mapped" if not item_text else f"empty {item_text}"
        info.append(f"{len(no_text):,} items have no text ({why}): their text is the item id "
                    f"(e.g. {no_text[0]})")
    for i in no_text:
        catalog_rows[i] = (i, catalog_rows[i][1])

    events = resolve_events(
        catalog_rows, users, cols[user], items, cols[item], cols[timestamp],
        cols[rating] if rating else None, cols[text] if text else None, skipped,
        f"interactions with items not in {Path(items_path).name}" if on_items else "unknown items",
    )
    return events.to_dataset(
        name or path.name.removesuffix(".gz").removesuffix(".csv"), path, skipped,
        extras={"load_info": info},
    )

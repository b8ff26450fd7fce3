"""The one data schema every loader produces and every consumer reads.

Events are stored column-wise (numpy arrays) so that 25M-row datasets stay cheap, sorted by
user, then chronologically with ties broken by (timestamp, item id). The catalog is ordered by
item id (numerically when every id is an integer), so comparing item *indices* is the same as
comparing item ids: the tie-break needs no string lookups.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError  # noqa: F401  (re-exported: loaders raise it)


@dataclass
class SkipReport:
    """What a loader left out and why; printed, never silent."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, example: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if example and reason not in self.examples:
            self.examples[reason] = example

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            ex = self.examples.get(reason)
            parts.append(f"{n} {reason}" + (f" (e.g. {ex})" if ex else ""))
        return "skipped: " + "; ".join(parts)


_INT_ID = re.compile(r"-?[0-9]+")


def _id_sort_key(ids: Sequence[str]):
    """Numeric order when every id is an integer (MovieLens), else lexicographic."""
    # ASCII digits only: str.isdigit() accepts '²' and lstrip('-') accepts '--5', which int() rejects
    if all(_INT_ID.fullmatch(i) for i in ids):
        return lambda i: (int(i), i)
    return lambda i: i


@dataclass
class Catalog:
    """Public item side: id -> text (title, description, ...) and optional topics/genres."""

    item_ids: list[str]
    texts: list[str]
    topics: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.texts):
            raise ValueError("catalog: item_ids and texts differ in length")
        if self.topics and len(self.topics) != len(self.item_ids):
            raise ValueError("catalog: topics and item_ids differ in length")
        self.index = {iid: i for i, iid in enumerate(self.item_ids)}
        if len(self.index) != len(self.item_ids):
            raise ValueError("catalog: duplicate item ids")

    @classmethod
    def build(cls, rows: dict[str, tuple[str, tuple[str, ...]]]) -> Catalog:
        """From {item_id: (text, topics)}; sorts by id so index order is id order."""
        ids = sorted(rows, key=_id_sort_key(list(rows)))
        return cls(ids, [rows[i][0] for i in ids], [tuple(rows[i][1]) for i in ids])

    def __len__(self) -> int:
        return len(self.item_ids)

    def topic_vocab(self) -> list[str]:
        return sorted({t for ts in self.topics for t in ts})


@dataclass
class Note:
    """Private text that belongs to no event (e.g. a tag on an unrated movie): stays on device."""

    user: int
    item: int
    timestamp: int
    text: str


@dataclass
class Dataset:
    """Events (user, item, timestamp, rating?, private text?) plus the catalog.

    Invariants (checked by `validate`): sorted by (user, timestamp, item); `text[i]` is the
    private text of event i or None; `rating` is NaN where absent.
    """

    name: str
    catalog: Catalog
    user_ids: list[str]
    user: np.ndarray  # int32, index into user_ids
    item: np.ndarray  # int32, index into catalog
    timestamp: np.ndarray  # int64, unix seconds
    rating: np.ndarray  # float32, NaN = no rating
    text: list[str | None]
    notes: list[Note] = field(default_factory=list)
    n_text_pieces: int = 0  # raw private texts (e.g. tag rows), incl. those merged or kept as notes
    skipped: SkipReport = field(default_factory=SkipReport)
    extras: dict = field(default_factory=dict)  # e.g. the synthetic world's ground truth

    @classmethod
    def from_events(
        cls,
        name: str,
        catalog: Catalog,
        user_ids: Sequence[str],
        user: Sequence[int],
        item: Sequence[int],
        timestamp: Sequence[int],
        rating: Sequence[float] | None = None,
        text: Sequence[str | None] | None = None,
        **kw,
    ) -> Dataset:
        """Builds a dataset and puts events in canonical order (user, timestamp, item)."""
        user_a = np.asarray(user, dtype=np.int32)
        item_a = np.asarray(item, dtype=np.int32)
        ts_a = np.asarray(timestamp, dtype=np.int64)
        n = len(user_a)
        rating_a = (
            np.full(n, np.nan, np.float32) if rating is None else np.asarray(rating, np.float32)
        )
        text_l = [None] * n if text is None else list(text)
        order = np.lexsort((item_a, ts_a, user_a))
        ds = cls(
            name=name,
            catalog=catalog,
            user_ids=list(user_ids),
            user=user_a[order],
            item=item_a[order],
            timestamp=ts_a[order],
            rating=rating_a[order],
            text=[text_l[i] for i in order],
            **kw,
        )
        if not ds.n_text_pieces:
            ds.n_text_pieces = sum(t is not None for t in ds.text) + len(ds.notes)
        ds.validate()
        return ds

    def validate(self) -> None:
        n = len(self.user)
        for name in ("item", "timestamp", "rating"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"dataset {self.name}: column {name} has the wrong length")
        if len(self.text) != n:
            raise ValueError(f"dataset {self.name}: column text has the wrong length")
        if n and (self.item.min() < 0 or self.item.max() >= len(self.catalog)):
            raise ValueError(f"dataset {self.name}: item index outside the catalog")
        if n and (self.user.min() < 0 or self.user.max() >= len(self.user_ids)):
            raise ValueError(f"dataset {self.name}: user index outside user_ids")
        # splits.shuffle_ties orders same-second events at random and says so in extras
        by_item = not (isinstance(self.extras, dict) and "tie_order" in self.extras)
        key = np.lexsort(((self.item if by_item else np.arange(n)), self.timestamp, self.user))
        if not np.array_equal(key, np.arange(n)):
            raise ValueError(f"dataset {self.name}: events not in (user, timestamp"
                             f"{', item' if by_item else ''}) order")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def user_slices(self) -> Iterator[tuple[int, slice]]:
        """(user index, slice of that user's events), users in index order, empty users skipped."""
        if not len(self.user):
            return
        bounds = np.flatnonzero(np.diff(self.user)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(self.user)]])
        for s, e in zip(starts, ends):
            yield int(self.user[s]), slice(int(s), int(e))

    def subset(self, mask: np.ndarray, name: str | None = None) -> Dataset:
        """Events where mask is True, order kept (so still canonical)."""
        idx = np.flatnonzero(mask)
        return Dataset(
            name=name or self.name,
            catalog=self.catalog,
            user_ids=self.user_ids,
            user=self.user[idx],
            item=self.item[idx],
            timestamp=self.timestamp[idx],
            rating=self.rating[idx],
            text=[self.text[i] for i in idx],
            notes=self.notes,
            n_text_pieces=self.n_text_pieces,
            skipped=self.skipped,
            extras=self.extras,
        )

    def stats(self) -> dict:
        """Numbers `fedinterest data stats` prints."""
        n = len(self)
        same_ts = 0
        pairs = 0
        if n > 1:
            same_user = self.user[1:] == self.user[:-1]
            pairs = int(same_user.sum())
            same_ts = int((same_user & (self.timestamp[1:] == self.timestamp[:-1])).sum())
        return {
            "dataset": self.name,
            "users": self.n_users,
            "items": len(self.catalog),
            "items_with_events": len(np.unique(self.item)) if n else 0,
            "events": n,
            "texts": self.n_text_pieces,
            "events_with_text": sum(t is not None for t in self.text),
            "ratings": int((~np.isnan(self.rating)).sum()),
            "time_start": int(self.timestamp.min()) if n else None,
            "time_end": int(self.timestamp.max()) if n else None,
            "tie_share": same_ts / pairs if pairs else 0.0,
            "skipped": self.skipped.total,
        }

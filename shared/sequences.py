"""Turning event histories into model inputs: training windows and inference windows.

Two ways to cut a history into training examples (both many-to-many: every step of a window
predicts the next event of the same window):
- disjoint segments (`segment_bounds`, the device's DP training): each event sits in exactly
  one example, which is what event-level DP on the device counts; the first events of a
  segment see no history. A device cuts them from the start of its history, so appending an
  event changes only the last segment (the relation event-level DP states, docs/PRIVACY.md);
- overlapping windows (`window_bounds`, central training): windows of `length` events whose
  ends are `stride` apart; each window's loss counts only its last `stride` targets (marked by
  `target_mask`), so every event is predicted exactly once, with at least `length - stride`
  earlier events as context (all of them near the start of a history).
Central training cuts from the end of the history, so the most recent events form a full window.

Everything an example needs is computed from its own events: the time-gap of a segment's
first event is the "segment start" bucket rather than the gap to the previous segment's last
event, so changing one event can change only its own example. Inference windows follow the
same rule, so training and inference see the same input distribution.

The same code serves the central trainer (a whole `Dataset` plus a mask of usable events) and
a device (one user's events). Private text is given as `text_idx` (per event, -1 = none) into
a `text_table` of vectors, which is how both sides store sparse per-event text.

Batch layout (dict of tensors, batch dimension first, right-padded to `segment_len`):
  items [B, T] int64    catalog index of each event (0 at padding)
  gaps [B, T] int64     time-gap bucket (see `gap_buckets`)
  text [B, T, D] f32    private text vector of the event (zeros when it has none)
  has_text [B, T] f32   1.0 where the event has private text
  mask [B, T] f32       1.0 at real events
  rating [B, T] int64   rating bucket: 0 = no rating, else round(2 * stars) clipped to 1..10
  negatives [B, K] int64  catalog indices sampled for this example (training only)
  target_mask [B, T] f32  1.0 where the event is a counted target (overlapping windows only)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .schema import Dataset

# Gap since the previous event of the same segment, in seconds. Bucket 0 = segment start (no
# previous event), 1 = same second, then one bucket per edge: <=1 min, <=1 h, <=1 day,
# <=1 week, <=30 days, <=1 year, and > 1 year.
GAP_EDGES_SECONDS = (60, 3_600, 86_400, 7 * 86_400, 30 * 86_400, 365 * 86_400)
N_GAP_BUCKETS = len(GAP_EDGES_SECONDS) + 3

N_RATING_BUCKETS = 11
BATCH_KEYS = ("items", "gaps", "text", "has_text", "mask", "rating")


def gap_buckets(timestamps: np.ndarray) -> np.ndarray:
    """Log-spaced time-gap bucket of each event relative to the previous one in the array."""
    ts = np.asarray(timestamps, dtype=np.int64)
    out = np.zeros(len(ts), np.int64)
    if len(ts) > 1:
        gap = np.maximum(np.diff(ts), 0)
        b = np.where(gap == 0, 1, 2 + np.searchsorted(GAP_EDGES_SECONDS, gap, side="left"))
        out[1:] = b
    return out


def rating_buckets(ratings: np.ndarray | None, n: int) -> np.ndarray:
    """0 where there is no rating (None or NaN), else round(2 * stars) clipped to 1..10, so
    half-star (MovieLens) and whole-star (1..5) scales share buckets."""
    if ratings is None:
        return np.zeros(n, np.int64)
    r = np.asarray(ratings, np.float64)
    out = np.clip(np.round(2 * np.nan_to_num(r, nan=0.0)), 1, N_RATING_BUCKETS - 1)
    return np.where(np.isnan(r), 0, out).astype(np.int64)


def segment_bounds(n_events: int, segment_len: int, from_start: bool = False) -> np.ndarray:
    """[S, 2] (start, end) of disjoint segments covering range(n_events), cut from the end
    (or, `from_start`, from the start: then only the last segment can be short)."""
    if segment_len < 1:
        raise ValueError("segment_len must be >= 1")
    if from_start:
        starts = np.arange(0, n_events, segment_len)
        ends = np.minimum(starts + segment_len, n_events)
        return np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)
    ends = np.arange(n_events, 0, -segment_len)[::-1]
    starts = np.maximum(ends - segment_len, 0)
    return np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)


def window_bounds(n_events: int, length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping windows over range(n_events), cut from the end: ([S, 2] (start, end) of each
    window, [S] index of its first counted target relative to its start). Window ends are
    `stride` apart and each window counts the targets in [end - stride, end) that have an
    earlier event in the window: with stride < length every event but the first is a target
    exactly once; stride == length gives `segment_bounds`, whose first events are no target."""
    if not 1 <= stride <= length:
        raise ValueError(f"need 1 <= stride <= length, got stride {stride}, length {length}")
    ends = np.arange(n_events, 1, -stride)[::-1]  # a window ending at 1 would predict nothing
    starts = np.maximum(ends - length, 0)
    first = np.maximum(np.maximum(ends - stride, 1) - starts, 1)
    return np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2), first.astype(np.int64)


def text_index(texts: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Per-event index into a list of unique texts (-1 = no text); encode the list once."""
    uniq: dict[str, int] = {}
    idx = np.full(len(texts), -1, np.int64)
    for i, t in enumerate(texts):
        if t is not None and t.strip():
            idx[i] = uniq.setdefault(t, len(uniq))
    return idx, list(uniq)


def _window(items: np.ndarray, timestamps: np.ndarray, text_idx: np.ndarray,
            text_table: np.ndarray, length: int, rating: np.ndarray | None = None
            ) -> dict[str, torch.Tensor]:
    """One right-padded example from the events of one segment/window."""
    n = len(items)
    if n > length:
        raise ValueError(f"window of {n} events exceeds length {length}")
    dim = text_table.shape[1]
    it = np.zeros(length, np.int64)
    it[:n] = items
    gp = np.zeros(length, np.int64)
    gp[:n] = gap_buckets(timestamps)
    tx = np.zeros((length, dim), np.float32)
    has = np.zeros(length, np.float32)
    sel = np.flatnonzero(text_idx >= 0)
    if len(sel):
        tx[sel] = text_table[text_idx[sel]]
        has[sel] = 1.0
    mask = np.zeros(length, np.float32)
    mask[:n] = 1.0
    rb = np.zeros(length, np.int64)
    rb[:n] = rating_buckets(rating, n)
    return {"items": torch.from_numpy(it), "gaps": torch.from_numpy(gp),
            "text": torch.from_numpy(tx), "has_text": torch.from_numpy(has),
            "mask": torch.from_numpy(mask), "rating": torch.from_numpy(rb)}


def _check(items, timestamps, text_idx, text_table) -> tuple[np.ndarray, ...]:
    items = np.asarray(items, np.int64)
    timestamps = np.asarray(timestamps, np.int64)
    text_idx = np.full(len(items), -1, np.int64) if text_idx is None else np.asarray(
        text_idx, np.int64)
    text_table = np.asarray(text_table, np.float32)
    if text_table.ndim != 2:
        raise ValueError("text_table must be a 2-d array [n_texts, dim]")
    if not (len(items) == len(timestamps) == len(text_idx)):
        raise ValueError("items, timestamps and text_idx differ in length")
    if len(text_idx) and text_idx.max() >= len(text_table):
        raise ValueError("text_idx points outside text_table")
    return items, timestamps, text_idx, text_table


class SegmentDataset(torch.utils.data.Dataset):
    """Training examples: right-padded windows (disjoint segments, or overlapping windows when
    `first_target` is given) with per-example negatives.

    Negatives are drawn from the public catalog (uniformly, or by `neg_probs`), afresh on every
    access, from this dataset's own seeded generator, so a run is reproducible by seed.
    """

    def __init__(self, items, timestamps, text_idx, text_table, bounds: np.ndarray,
                 segment_len: int, n_items: int, n_negatives: int,
                 neg_probs: np.ndarray | None = None, seed: int = 0,
                 ratings: np.ndarray | None = None, first_target: np.ndarray | None = None):
        self.items, self.timestamps, self.text_idx, self.text_table = _check(
            items, timestamps, text_idx, text_table)
        self.ratings = None if ratings is None else np.asarray(ratings, np.float64)
        if self.ratings is not None and len(self.ratings) != len(self.items):
            raise ValueError("ratings and items differ in length")
        self.bounds = np.asarray(bounds, np.int64).reshape(-1, 2)
        if len(self.bounds) and (self.bounds[:, 1] - self.bounds[:, 0]).max() > segment_len:
            raise ValueError("a segment is longer than segment_len")
        self.first_target = None if first_target is None else np.asarray(first_target, np.int64)
        if self.first_target is not None and len(self.first_target) != len(self.bounds):
            raise ValueError("first_target must have one entry per window")
        self.segment_len = segment_len
        self.n_items = n_items
        self.n_negatives = n_negatives
        self.neg_probs = None if neg_probs is None else np.asarray(neg_probs, np.float64)
        if self.neg_probs is not None:
            if len(self.neg_probs) != n_items:
                raise ValueError("neg_probs must have one entry per catalog item")
            self.neg_probs = self.neg_probs / self.neg_probs.sum()
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_dataset(cls, ds: Dataset, event_mask: np.ndarray | None, segment_len: int,
                     n_negatives: int, text_idx: np.ndarray | None = None,
                     text_table: np.ndarray | None = None, neg_probs: np.ndarray | None = None,
                     seed: int = 0, text_dim: int = 384, stride: int | None = None
                     ) -> SegmentDataset:
        """Segments of every user's events where `event_mask` is True (all when None):
        disjoint (stride None) or overlapping windows whose ends are `stride` apart."""
        keep = np.ones(len(ds), bool) if event_mask is None else np.asarray(event_mask, bool)
        idx = np.flatnonzero(keep)
        users = ds.user[idx]
        bounds, firsts = [], []
        if len(idx):
            cuts = np.flatnonzero(np.diff(users)) + 1
            starts = np.concatenate([[0], cuts])
            ends = np.concatenate([cuts, [len(idx)]])
            for s, e in zip(starts, ends):
                if stride is None:
                    bounds.append(segment_bounds(int(e - s), segment_len) + s)
                else:
                    b, f = window_bounds(int(e - s), segment_len, stride)
                    bounds.append(b + s)
                    firsts.append(f)
        bounds = np.concatenate(bounds) if bounds else np.zeros((0, 2), np.int64)
        first = None if stride is None else (
            np.concatenate(firsts) if firsts else np.zeros(0, np.int64))
        if text_table is None:
            text_table = np.zeros((0, text_dim), np.float32)
        tidx = None if text_idx is None else np.asarray(text_idx)[idx]
        return cls(ds.item[idx], ds.timestamp[idx], tidx, text_table, bounds, segment_len,
                   len(ds.catalog), n_negatives, neg_probs, seed, ratings=ds.rating[idx],
                   first_target=first)

    @classmethod
    def from_events(cls, items, timestamps, text_vectors: np.ndarray | None, n_items: int,
                    segment_len: int, n_negatives: int, text_dim: int,
                    neg_probs: np.ndarray | None = None, seed: int = 0,
                    ratings: np.ndarray | None = None) -> SegmentDataset:
        """One user's history (the device case). `text_vectors`: [n, D] with all-zero rows
        (or NaN rows) where an event has no text, or None when no event has text;
        `ratings`: stars per event, NaN where there is none (None = no ratings at all)."""
        n = len(items)
        if text_vectors is None:
            tidx, table = None, np.zeros((0, text_dim), np.float32)
        else:
            tv = np.asarray(text_vectors, np.float32)
            has = np.isfinite(tv).all(1) & (np.abs(np.nan_to_num(tv)).sum(1) > 0)
            tidx = np.where(has, np.cumsum(has) - 1, -1)
            table = tv[has]
        return cls(items, timestamps, tidx, table,
                   segment_bounds(n, segment_len, from_start=True), segment_len,
                   n_items, n_negatives, neg_probs, seed, ratings=ratings)

    def __len__(self) -> int:
        return len(self.bounds)

    @property
    def n_events(self) -> int:
        return int((self.bounds[:, 1] - self.bounds[:, 0]).sum())

    @property
    def n_targets(self) -> int:
        """Predicted events (loss terms) per pass over the dataset."""
        lengths = self.bounds[:, 1] - self.bounds[:, 0]
        first = np.ones(len(lengths), np.int64) if self.first_target is None else self.first_target
        return int(np.maximum(lengths - first, 0).sum())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, e = self.bounds[i]
        ex = _window(self.items[s:e], self.timestamps[s:e], self.text_idx[s:e],
                     self.text_table, self.segment_len,
                     None if self.ratings is None else self.ratings[s:e])
        if self.first_target is not None:
            tm = torch.zeros(self.segment_len)
            tm[int(self.first_target[i]):int(e - s)] = 1.0
            ex["target_mask"] = tm
        if self.n_negatives:
            if self.neg_probs is None:
                neg = self.rng.integers(0, self.n_items, self.n_negatives)
            else:
                neg = self.rng.choice(self.n_items, self.n_negatives, p=self.neg_probs)
            ex["negatives"] = torch.from_numpy(neg.astype(np.int64))
        return ex


def inference_input(items, timestamps, text_idx=None, text_table=None,
                    context_len: int = 50, text_dim: int = 384,
                    ratings: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Input for `InterestModel.user_state` from one history: its last `context_len` events,
    right-padded to `context_len`. Unbatched ([T] tensors); stack with `collate`."""
    if text_table is None:
        text_table = np.zeros((0, text_dim), np.float32)
    items, timestamps, text_idx, text_table = _check(items, timestamps, text_idx, text_table)
    s = max(0, len(items) - context_len)
    r = None if ratings is None else np.asarray(ratings, np.float64)[s:]
    return _window(items[s:], timestamps[s:], text_idx[s:], text_table, context_len, r)


def inference_batch(histories: Sequence[tuple], context_len: int, text_dim: int
                    ) -> dict[str, torch.Tensor]:
    """The batch `InterestModel.user_state` reads from several histories, each a tuple
    (items, timestamps[, text_idx, text_table[, ratings]]) as `inference_input` takes them:
    the one builder of inference batches (central evaluation and the device)."""
    return collate([inference_input(*h[:4], context_len=context_len, text_dim=text_dim,
                                    ratings=h[4] if len(h) > 4 else None) for h in histories])


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks examples into a batch (what torch's default collate does for dicts)."""
    return {k: torch.stack([ex[k] for ex in examples]) for k in examples[0]}

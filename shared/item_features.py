"""The public item feature matrix the model's item tower reads: item text vector + popularity.

Titles and genres alone rank below popularity on MovieLens, so the text model needs a
popularity signal. It is an *input* here, never something the model computes from
interactions: centrally the counts come from the training split; in federation they are
DP-noised counts summed under secure aggregation and published with the catalog. Noised
counts can be negative or fractional, so the features accept any real count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .schema import Catalog, Dataset

N_POP_BUCKETS = 10  # one-hot of floor(log2(1 + count)), the last bucket open-ended
POP_DIM = 1 + N_POP_BUCKETS


def item_counts(ds: Dataset, event_mask: np.ndarray | None = None) -> np.ndarray:
    """Interactions per catalog item among the events where `event_mask` is True."""
    items = ds.item if event_mask is None else ds.item[np.asarray(event_mask, bool)]
    return np.bincount(items, minlength=len(ds.catalog)).astype(np.float64)


def popularity_features(counts: Sequence[float]) -> np.ndarray:
    """[N, POP_DIM] float32: log1p(count) scaled to [0, 1] by the largest, then a one-hot of
    the log2 bucket (so the tower can learn a non-linear popularity prior)."""
    c = np.maximum(np.asarray(counts, np.float64), 0.0)
    x = np.log1p(c)
    top = x.max() if len(x) and x.max() > 0 else 1.0
    out = np.zeros((len(c), POP_DIM), np.float32)
    out[:, 0] = x / top
    bucket = np.minimum(np.floor(np.log2(1.0 + c)).astype(np.int64), N_POP_BUCKETS - 1)
    out[np.arange(len(c)), 1 + bucket] = 1.0
    return out


def item_feature_matrix(text_vectors: np.ndarray, counts: Sequence[float] | None) -> np.ndarray:
    """[N, D + POP_DIM] float32: the text vectors next to the popularity features (all-zero
    popularity, i.e. the "unknown" row, when `counts` is None)."""
    tv = np.asarray(text_vectors, np.float32)
    if tv.ndim != 2:
        raise ValueError("text_vectors must be [n_items, dim]")
    if counts is None:
        pop = np.zeros((len(tv), POP_DIM), np.float32)
    else:
        if len(counts) != len(tv):
            raise ValueError(f"{len(counts)} counts for {len(tv)} item vectors")
        pop = popularity_features(counts)
    return np.concatenate([tv, pop], axis=1)


def topic_matrix(catalog: Catalog, vocab: Sequence[str] | None = None,
                 ignore: Sequence[str] = ("(no genres listed)",)) -> tuple[np.ndarray, list[str]]:
    """[N, n_topics] float32 rows = each item's topics as a distribution (uniform over its
    topics; an all-zero row when it has none), and the topic vocabulary (column order)."""
    vocab = [t for t in (vocab or catalog.topic_vocab()) if t not in set(ignore)]
    col = {t: j for j, t in enumerate(vocab)}
    m = np.zeros((len(catalog), len(vocab)), np.float32)
    for i, ts in enumerate(catalog.topics or [()] * len(catalog)):
        js = [col[t] for t in ts if t in col]
        if js:
            m[i, js] = 1.0 / len(js)
    return m, vocab

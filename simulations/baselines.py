"""Non-neural baselines with the scorer interface of `central.evaluate`:
`scores(histories) -> [B, N]` and `topics(histories) -> [B, n_topics] | None`, where a history
is a (start, end) slice of the dataset's events (the user's strictly earlier events)."""

from __future__ import annotations

import numpy as np
from fedinterest.shared.schema import Dataset


class PopScorer:
    """Most interactions in the training events first; the same list for everyone."""

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, np.float64)

    def scores(self, hists: list[tuple[int, int]]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(hists), len(self.counts)))

    def topics(self, hists: list[tuple[int, int]]) -> None:
        return None


class StaticScorer:
    """No evolution: the user is the mean of their history's item text vectors (of the last
    `window` events when set); items score by cosine. Its topic guess is the history's topic
    mix, i.e. "the future looks like the past"."""

    def __init__(self, ds: Dataset, item_vectors: np.ndarray, topic_dist: np.ndarray | None = None,
                 window: int | None = None):
        self.ds, self.window = ds, window
        v = np.asarray(item_vectors, np.float32)
        self.unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        self.topic_dist = topic_dist

    def _items(self, s: int, e: int) -> np.ndarray:
        items = self.ds.item[s:e]
        return items[-self.window:] if self.window else items

    def scores(self, hists: list[tuple[int, int]]) -> np.ndarray:
        prof = np.stack([self.unit[self._items(s, e)].mean(0) for s, e in hists])
        prof /= np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
        return prof @ self.unit.T

    def topics(self, hists: list[tuple[int, int]]) -> np.ndarray | None:
        if self.topic_dist is None or not self.topic_dist.shape[1]:
            return None
        t = np.stack([self.topic_dist[self._items(s, e)].mean(0) for s, e in hists])
        return t / np.maximum(t.sum(1, keepdims=True), 1e-12)

"""Full-ranking metrics: HR@K, NDCG@K, MRR@K, coverage@K, vectorised over users.

Every item in the catalog is ranked; the user's earlier items are excluded. Ties with the
target share the middle rank (half of the tied items count as ranked above), so a constant
scorer earns a random ranker's score rather than a perfect or a zero one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROTOCOL_LOO = "leave-last-out, full ranking, seen items excluded, ties by (timestamp, item id)"
PROTOCOL_LOO_RANDOM_TIES = ("leave-last-out, full ranking, seen items excluded, same-timestamp "
                            "events in a seeded random order")
PROTOCOL_TEMPORAL = "global temporal split, full ranking, seen items excluded"


def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """0-based rank of each target among non-excluded items.

    scores: [B, N] float; targets: [B] item indices; exclude: [B, N] bool (True = drop) or None.
    """
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(len(targets))
    t = scores[rows, targets][:, None]
    keep = np.ones_like(scores, dtype=bool) if exclude is None else ~np.asarray(exclude, bool)
    keep[rows, targets] = False  # the target never competes with itself
    greater = ((scores > t) & keep).sum(1)
    ties = ((scores == t) & keep).sum(1)
    return greater + ties // 2


def topk_items(scores: np.ndarray, exclude: np.ndarray | None, k: int) -> np.ndarray:
    """[B, k] indices of the k best non-excluded items, best first."""
    s = np.asarray(scores, dtype=np.float64).copy()
    if exclude is not None:
        s[np.asarray(exclude, bool)] = -np.inf
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


@dataclass
class RankingAccumulator:
    """Sums over batches of users; `result()` gives the means. Also what a device sends in
    federated evaluation: sums and counts only, never the ranked lists."""

    k: int = 10
    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0
    mrr: float = 0.0
    recommended: set = field(default_factory=set)

    def add(self, scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None,
            track_coverage: bool = True) -> np.ndarray:
        ranks = target_ranks(scores, targets, exclude)
        inside = ranks < self.k
        self.n += len(ranks)
        self.hits += float(inside.sum())
        self.ndcg += float((inside / np.log2(ranks + 2.0)).sum())
        self.mrr += float((inside / (ranks + 1.0)).sum())
        if track_coverage:
            self.recommended.update(np.unique(topk_items(scores, exclude, self.k)).tolist())
        return ranks

    def result(self, n_items: int | None = None) -> dict[str, float]:
        n = max(self.n, 1)
        out = {
            f"hr@{self.k}": self.hits / n,
            f"ndcg@{self.k}": self.ndcg / n,
            f"mrr@{self.k}": self.mrr / n,
            "users": self.n,
        }
        if n_items:
            out[f"coverage@{self.k}"] = len(self.recommended) / n_items
        return out


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None,
                    k: int = 10) -> dict[str, float]:
    """One-shot HR@k, NDCG@k, MRR@k and coverage@k for a [B, N] score matrix."""
    acc = RankingAccumulator(k)
    acc.add(scores, targets, exclude)
    return acc.result(n_items=np.asarray(scores).shape[1])

"""Inputs the benchmarks share: the dataset (ml-latest-small when it is there) and published
catalogs of a chosen size whose vectors are random unit vectors.

Random vectors are enough where only shapes decide the cost (training steps, scoring): the
model does the same arithmetic whatever the values, and no encoder has to run first.
"""

from __future__ import annotations

import numpy as np
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.schema import Dataset

TEXT_DIM = 384  # all-MiniLM-L6-v2, the default encoder


def bench_dataset(spec: str | None) -> tuple[Dataset, str]:
    """(dataset, name): `spec` as `load_dataset` takes it; None = ml-latest-small beside the
    repository, or the default synthetic world when that folder is absent."""
    from fedinterest.simulations.data import default_movielens_path, load_dataset

    if spec is None:
        path = default_movielens_path()
        spec = str(path) if path is not None else "synthetic"
    ds = load_dataset(spec)
    name = "ml-latest-small" if spec.rstrip("/").endswith("ml-latest-small") else spec
    return ds, name


def random_catalog(n_items: int, dim: int = TEXT_DIM, seed: int = 0,
                   n_topics: int = 12) -> PublishedCatalog:
    """A published catalog of `n_items` synthetic-world items (ids, topics, texts) with random
    unit vectors of width `dim` and Zipf-like popularity counts."""
    from fedinterest.simulations.data.synthetic import generate_world

    ds = generate_world(n_users=2, n_items=n_items, events_per_user=2, seed=seed,
                        n_topics=n_topics)
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n_items, dim)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    pop = (1000.0 / np.arange(1, n_items + 1)).astype(np.float32)
    return PublishedCatalog(list(ds.catalog.item_ids), vec, list(ds.catalog.topics), pop,
                            f"random-unit-vectors/{dim}", list(ds.catalog.texts))


def random_history(n_items: int, n_events: int, dim: int = TEXT_DIM, text_share: float = 0.3,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalog indices, timestamps, text vectors with zero rows) of one user's history."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n_items, n_events)
    ts = 1_600_000_000 + np.cumsum(rng.integers(0, 86_400, n_events))
    tv = rng.standard_normal((n_events, dim)).astype(np.float32)
    tv /= np.linalg.norm(tv, axis=1, keepdims=True)
    tv[rng.random(n_events) >= text_share] = 0.0
    return items.astype(np.int64), ts.astype(np.int64), tv

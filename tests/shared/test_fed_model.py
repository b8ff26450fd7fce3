"""The federated model's catalog inputs: popularity-sampled negatives and the per-catalog
cache of the item inputs (shared/fed_model.py)."""

from __future__ import annotations

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.fed_model import catalog_inputs, federated_model_config, negative_probs
from fedinterest.shared.published_catalog import PublishedCatalog


def _catalog(popularity) -> PublishedCatalog:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, 8)).astype(np.float32)
    return PublishedCatalog([f"i{k}" for k in range(4)], vecs, [("a",), ("b",), ("a", "b"), ()],
                            np.asarray(popularity, np.float32), "test-encoder")


def test_negatives_follow_the_published_noisy_counts_plus_one():
    cat = _catalog([5.0, -3.0, 0.0, 1.5])  # DP noise can make a count negative
    assert np.allclose(negative_probs(cat), [6.0, 1.0, 1.0, 2.5])
    assert federated_model_config(RunConfig(), cat).neg_sampling == "pop"
    # before the popularity release every item weighs the same: uniform sampling
    assert np.allclose(negative_probs(_catalog([0, 0, 0, 0])), 1.0)


def test_catalog_inputs_are_computed_once_per_catalog_object():
    a, b = _catalog([1, 2, 3, 4]), _catalog([4, 3, 2, 1])
    first = catalog_inputs(a)
    assert catalog_inputs(a) is first  # the cached tuple, not a recomputation
    other = catalog_inputs(b)
    assert other is not first and not np.array_equal(other[0], first[0])
    assert other[2] == first[2] == ["a", "b"]


def test_the_text_prior_is_on_by_default_and_off_under_on_device_dp_sgd():
    cat = _catalog([1, 2, 3, 4])
    assert federated_model_config(RunConfig(), cat).text_prior == RunConfig().text_prior > 0
    assert federated_model_config(RunConfig(dp="off"), cat).text_prior > 0
    for mode in ("event", "both"):  # Opacus hooks only module calls; the prior is not one
        assert federated_model_config(RunConfig(dp=mode), cat).text_prior == 0

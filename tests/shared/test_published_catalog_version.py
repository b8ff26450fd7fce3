"""PublishedCatalog.version is computed once per catalog object and still names its content:
a reassigned field gives the new content's hash, an in-place write is refused."""

from __future__ import annotations

import numpy as np
import pytest
from fedinterest.shared.published_catalog import PublishedCatalog


def _catalog(seed: int = 0) -> PublishedCatalog:
    rng = np.random.default_rng(seed)
    return PublishedCatalog(["1", "2", "3"], rng.normal(size=(3, 4)).astype(np.float32),
                            [("a",), (), ("b", "c")], np.zeros(3, np.float32), "enc",
                            ["One", "Two", "Three"])


def test_version_is_kept_and_equals_the_content_hash(tmp_path):
    cat = _catalog()
    v = cat.version
    assert cat.version == v == cat._content_hash()
    assert PublishedCatalog.load(cat.save(tmp_path), expected_version=v).version == v
    assert _catalog(seed=1).version != v


def test_reassigning_a_field_gives_the_new_contents_version():
    cat = _catalog()
    before = cat.version
    cat.popularity = np.arange(3, dtype=np.float32)
    assert cat.version != before and cat.version == cat._content_hash()
    cat.popularity = np.zeros(3, np.float32)
    assert cat.version == before


def test_hashed_arrays_cannot_change_in_place():
    cat = _catalog()
    _ = cat.version
    with pytest.raises(ValueError, match="read-only"):
        cat.vectors[0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        cat.popularity[0] = 5.0

"""Text encoder and embedding cache: pooling, ordering, dedup, cache hits and corruption,
model identity, errors, `fedinterest embed`, and one semantic check on the packaged MiniLM."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from fedinterest.shared.embedding_cache import DB_NAME, EmbeddingCache
from fedinterest.shared.encoder import TextEncoder, catalog_vectors
from fedinterest.shared.errors import ConfigError, FedinterestError
from fedinterest.shared.schema import Catalog

TEXTS = [
    "toy story (1995). genres: adventure, animation",
    "a",
    "how to cook vegetable soup with tomato and a lot of other things in the kitchen",
    "black holes",
    "",
    "jumanji (1995). genres: adventure, children, fantasy",
]


@contextlib.contextmanager
def rows_through_model(encoder: TextEncoder):
    """Counts the texts the (shared) model is run on while the block executes."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(int(kwargs["input_ids"].shape[0]))

    handle = encoder.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def test_shapes_dtype_unit_norm(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, batch_size=4)
    v = enc.encode(TEXTS)
    assert enc.dim == 32
    assert v.shape == (len(TEXTS), 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="not a single string"):
        enc.encode("one string")
    with pytest.raises(TypeError, match="text 1 is int"):
        enc.encode(["fine", 3])


def test_rows_in_input_order_and_padding_ignored(tiny_bert_dir):
    """Batched (length-sorted, padded) rows equal each text embedded alone, in input order."""
    enc = TextEncoder(tiny_bert_dir, batch_size=2)
    batched = enc.encode(TEXTS)
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # the texts differ, so a permutation of rows would not pass
    assert np.abs(alone[0] - alone[1]).max() > 1e-3


def test_duplicates_embedded_once(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, batch_size=64)
    texts = ["soup", "stars", "soup", "soup", "stars", "movie"]
    with rows_through_model(enc) as rows:
        v = enc.encode(texts)
    assert sum(rows) == 3
    np.testing.assert_array_equal(v[0], v[2])
    np.testing.assert_array_equal(v[1], v[4])
    assert not np.allclose(v[0], v[1])


def test_mean_pooling_matches_hand_computation(tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir, local_files_only=True)
    model = AutoModel.from_pretrained(tiny_bert_dir, local_files_only=True).eval()
    texts = ["the tomato soup recipe", "stars", "a movie about black holes and neutron stars"]
    expected = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")
            hidden = model(**ids).last_hidden_state[0]  # no padding: every token counts
            mean = hidden.mean(0)
            expected.append((mean / mean.norm()).numpy())
    got = TextEncoder(tiny_bert_dir, batch_size=3).encode(texts)
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)


def test_truncation_at_max_length(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, max_length=6)
    long = "the a of and to in is for on with"
    # [CLS] + 4 tokens + [SEP]: the words after "to" cannot change the vector
    np.testing.assert_allclose(enc.encode([long])[0], enc.encode(["the a of and"])[0], atol=1e-6)


def test_weights_loaded_once_per_process(tiny_bert_dir):
    a = TextEncoder(tiny_bert_dir)
    b = TextEncoder(tiny_bert_dir, batch_size=8)
    assert a.model is b.model


def test_identity_names_weights_not_folder(tiny_bert_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert_dir, copy)
    base = TextEncoder(tiny_bert_dir).identity
    assert TextEncoder(copy).identity.split("@")[1] == base.split("@")[1]
    assert TextEncoder(tiny_bert_dir, max_length=64).identity != base

    from transformers import AutoModel

    model = AutoModel.from_pretrained(copy, local_files_only=True)
    with torch.no_grad():
        model.pooler.dense.bias.add_(1.0)  # same shapes and file size, different bytes
    model.save_pretrained(copy)
    assert TextEncoder(copy).identity.split("@")[1] != base.split("@")[1]


def test_cache_hit_returns_same_vectors_without_model(tiny_bert_dir, tmp_path):
    first = TextEncoder(tiny_bert_dir, cache=EmbeddingCache(tmp_path))
    with rows_through_model(first) as rows:
        v1 = first.encode(TEXTS, public=True)
    assert sum(rows) == len(TEXTS)

    cache = EmbeddingCache(tmp_path)  # a new process would open it like this
    second = TextEncoder(tiny_bert_dir, cache=cache)
    with rows_through_model(second) as rows:
        v2 = second.encode(TEXTS[::-1] + TEXTS[:1], public=True)
    assert rows == []
    np.testing.assert_array_equal(v2[: len(TEXTS)], v1[::-1])
    assert (cache.hits, cache.misses) == (len(TEXTS), 0)


def test_cache_entries_belong_to_one_encoder(tiny_bert_dir, tmp_path):
    cache = EmbeddingCache(tmp_path)
    TextEncoder(tiny_bert_dir, max_length=8, cache=cache).encode(["soup"], public=True)
    other = TextEncoder(tiny_bert_dir, max_length=9, cache=cache)
    with rows_through_model(other) as rows:
        other.encode(["soup"], public=True)
    assert rows == [1]


def test_private_text_never_cached(tiny_bert_dir, tmp_path):
    cache = EmbeddingCache(tmp_path)
    enc = TextEncoder(tiny_bert_dir, cache=cache)
    enc.encode(["my private diary entry"])
    assert cache.count() == 0
    assert cache.hits + cache.misses == 0


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "nan"])
def test_corrupt_entry_recomputed(tiny_bert_dir, tmp_path, damage):
    enc = TextEncoder(tiny_bert_dir, cache=EmbeddingCache(tmp_path))
    good = enc.encode(["soup", "stars"], public=True)

    with sqlite3.connect(tmp_path / DB_NAME) as db:
        (sha, blob) = db.execute("SELECT text_sha, vec FROM vectors LIMIT 1").fetchone()
        blob = bytearray(blob)
        if damage == "flip_byte":
            blob[5] ^= 0xFF
        elif damage == "truncate":
            blob = blob[:-4]
        else:  # a NaN written with a matching checksum must still be refused
            from fedinterest.shared.embedding_cache import _checksum

            blob[:4] = np.float32(np.nan).tobytes()
            db.execute(
                "UPDATE vectors SET checksum = ? WHERE text_sha = ?", (_checksum(bytes(blob)), sha)
            )
        db.execute("UPDATE vectors SET vec = ? WHERE text_sha = ?", (bytes(blob), sha))

    cache = EmbeddingCache(tmp_path)
    enc2 = TextEncoder(tiny_bert_dir, cache=cache)
    with rows_through_model(enc2) as rows:
        again = enc2.encode(["soup", "stars"], public=True)
    assert rows == [1] and cache.corrupt == 1
    np.testing.assert_allclose(again, good, atol=1e-6)
    with rows_through_model(enc2) as rows:  # the entry was rewritten
        enc2.encode(["soup", "stars"], public=True)
    assert rows == []


def test_unreadable_cache_file_moved_aside(tiny_bert_dir, tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    cache = EmbeddingCache(tmp_path)
    v = TextEncoder(tiny_bert_dir, cache=cache).encode(["soup"], public=True)
    assert v.shape == (1, 32) and cache.count() == 1
    assert len(list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))) == 1


def test_default_cache_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDINTEREST_CACHE", str(tmp_path / "c"))
    assert EmbeddingCache().path == tmp_path / "c" / DB_NAME


def test_catalog_vectors_use_cache(tiny_bert_dir, tmp_path):
    catalog = Catalog.build({"1": ("toy story", ("animation",)), "2": ("heat", ("crime",))})
    cache = EmbeddingCache(tmp_path)
    enc = TextEncoder(tiny_bert_dir, cache=cache)
    v = catalog_vectors(catalog, enc)
    assert v.shape == (2, 32)
    np.testing.assert_array_equal(catalog_vectors(catalog, enc), v)
    assert cache.hits == 2 and cache.count(enc.identity) == 2


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FedinterestError, match="not found locally.*--model /path/to/model"):
        TextEncoder("no-such-org/no-such-model")
    with pytest.raises(FedinterestError, match="does not exist"):
        TextEncoder(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedinterestError, match="no model files"):
        _ = TextEncoder(tmp_path / "empty").identity
    with pytest.raises(ConfigError, match="batch_size"):
        TextEncoder(tmp_path / "empty", batch_size=0)


def test_embed_command(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    from fedinterest.simulations import data as datasets
    from fedinterest.simulations.cli import embed as embed_cmd

    catalog = Catalog.build({str(i): (f"movie {i} about soup", ("comedy",)) for i in range(1, 8)})
    fake = argparse.Namespace(name="fake", catalog=catalog)
    loaded = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda spec: loaded.append(spec) or fake, raising=False
    )
    parser = argparse.ArgumentParser()
    embed_cmd.register(parser.add_subparsers())
    base = ["embed", "--data", "some/path", "--model", str(tiny_bert_dir)]
    argv = base + ["--cache-dir", str(tmp_path), "--batch-size", "3"]

    for expected_hits in (0, 7):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "fake: 7 item texts -> 32-d vectors" in out and "texts/s" in out
        assert f"cache hits: {expected_hits} of 7 distinct texts" in out
        assert str(tmp_path / DB_NAME) in out
    assert loaded == ["some/path", "some/path"]

    args = parser.parse_args(base + ["--no-cache"])
    assert args.func(args) == 0
    assert "cache: off" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="exclude"):
        args = parser.parse_args(argv + ["--no-cache"])
        args.func(args)


def test_minilm_related_texts_closer(minilm_encoder):
    soup, cook, space = minilm_encoder.encode(
        ["a recipe for tomato soup", "how to cook vegetable soup", "black holes and neutron stars"]
    )
    assert minilm_encoder.dim == 384
    assert soup @ cook > 0.5
    assert soup @ cook > soup @ space + 0.3
    assert soup @ cook > cook @ space + 0.3

"""`fedinterest client ...` driven in-process through the top-level CLI: a tiny random catalog,
the tiny-BERT fixture as the text encoder (nothing loads MiniLM), and a store the CLI creates."""

from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pytest
import torch
from fedinterest.client.device import Device
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.simulations.cli import main

from tests.helpers.legacy_defaults import legacy_config

N_ITEMS, DIM = 30, 32  # DIM = the tiny BERT's hidden size, so note vectors match item vectors
NOTE = "tomato soup recipe with black beans"


class _Terminal(io.StringIO):
    """stdin of an interactive session: `isatty` is what the CLI asks before prompting."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _one_thread_no_terminal(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # non-interactive unless a test says so


def _catalog(folder, identity: str):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cat = PublishedCatalog([str(i) for i in range(N_ITEMS)], vecs,
                           [(f"topic{i % 3}",) for i in range(N_ITEMS)],
                           np.zeros(N_ITEMS, np.float32), identity,
                           [f"Item {i}" for i in range(N_ITEMS)])
    return cat, cat.save(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir):
    """A store created and filled through `client record`, then given a global model."""
    root = tmp_path_factory.mktemp("client-cli")
    cat, cat_path = _catalog(root / "catalog", TextEncoder(tiny_bert_dir).identity)
    store, key = root / "device.db", root / "device.key"
    base = ["--store", str(store), "--key-file", str(key)]
    for j, item in enumerate([3, 7, 11, 4, 15, 8]):
        args = ["client", "record", str(item), *base, "--catalog", str(cat_path),
                "--timestamp", str(1_000 + 60 * j), "--encoder", str(tiny_bert_dir)]
        args += ["--new-key"] if j == 0 else []
        args += ["--text", NOTE] if j in (1, 4) else []
        args += ["--rating", "4.5"] if j == 2 else []
        assert main(args) == 0
    cfg = legacy_config(hidden=8, segment_len=6, n_negatives=8, batch_size=2)
    from fedinterest.server.server_app import initial_weights

    with Device.open(store, key_file=key, catalog=cat) as dev:
        dev.load_global_model(initial_weights(cfg, cat), cfg)
    return {"cat": cat, "cat_path": str(cat_path), "store": store, "key": key, "base": base,
            "tiny": str(tiny_bert_dir)}


def _run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["client", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_record_created_store_key_and_note_vectors(world):
    key = world["key"]
    assert key.stat().st_size == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600
    with Device.open(world["store"], key_file=key, create=False) as dev:
        events = dev.store.events()
        vectors = dev.store.text_vectors()
    assert [e.item for e in events] == ["3", "7", "11", "4", "15", "8"]
    assert [e.text for e in events if e.text] == [NOTE, NOTE]
    assert events[2].rating == 4.5
    noted = {e.id for e in events if e.text}
    assert set(vectors) == noted and all(v.shape == (DIM,) for v in vectors.values())
    assert all(abs(float(np.linalg.norm(v)) - 1.0) < 1e-4 for v in vectors.values())


def test_record_prints_the_event_id(world, capsys, tmp_path):
    cat_path = world["cat_path"]
    key = tmp_path / "k"
    code, out, err = _run(capsys, "record", "2", "--store", str(tmp_path / "s.db"),
                          "--key-file", str(key), "--new-key", "--catalog", cat_path,
                          "--timestamp", "1970-01-01T00:20:00")
    assert code == 0 and out.strip() == "1" and "created store" in err
    code, out, _ = _run(capsys, "record", "5", "--store", str(tmp_path / "s.db"),
                        "--key-file", str(key), "--catalog", cat_path, "--timestamp", "1300")
    assert code == 0 and out.strip() == "2"
    with Device.open(tmp_path / "s.db", key_file=key, create=False) as dev:
        assert [e.timestamp for e in dev.store.events()] == [1200, 1300]


def test_recommend_table_and_json(world, capsys):
    args = ["recommend", *world["base"], "--catalog", world["cat_path"], "-k", "5"]
    code, out, _ = _run(capsys, *args, "--json")
    assert code == 0
    recs = json.loads(out)
    assert [r["rank"] for r in recs] == [1, 2, 3, 4, 5]
    assert not {r["item"] for r in recs} & {"3", "7", "11", "4", "15", "8"}  # seen excluded
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    assert all(r["text"] == f"Item {r['item']}" for r in recs)
    code, table, _ = _run(capsys, *args)
    lines = table.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "item", "score", "text"]
    assert lines[1].split()[:2] == ["1", recs[0]["item"]] and lines[1].endswith(recs[0]["text"])
    assert len(lines) == 6


def test_explain_reason_and_contributions(world, capsys):
    code, out, _ = _run(capsys, "explain", "20", *world["base"], "--catalog", world["cat_path"],
                        "--json", "--top", "6")
    assert code == 0
    exp = json.loads(out)
    assert exp["item"] == "20" and "Item 20" in exp["reason"]
    history = {"3", "7", "11", "4", "15", "8"}
    assert {c["item"] for c in exp["contributions"]} <= history
    if exp["contributions"]:
        assert abs(sum(c["share"] for c in exp["contributions"]) - 1.0) < 1e-6
    code, text, _ = _run(capsys, "explain", "20", *world["base"], "--catalog",
                         world["cat_path"])
    assert code == 0 and text.splitlines()[0] == exp["reason"]


def test_interests_png_and_json(world, capsys, tmp_path):
    png = tmp_path / "timeline.png"
    code, out, err = _run(capsys, "interests", *world["base"], "--catalog", world["cat_path"],
                          "--png", str(png), "--json")
    assert code == 0 and str(png) in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out)
    assert data["topics"] == ["topic0", "topic1", "topic2"]
    assert len(data["timeline"]) == 6 and data["predicted_next"] is not None
    first = data["timeline"][0]
    assert first["timestamp"] == 1_000 and first["topics"] == {"topic0": 1.0}  # item 3
    code, text, _ = _run(capsys, "interests", *world["base"], "--catalog", world["cat_path"])
    assert code == 0 and "1970-01-01 00:16  topic0 100%" in text and "predicted next:" in text


def test_export_to_file_is_private_json(world, capsys, tmp_path):
    out_file = tmp_path / "export.json"
    code, out, err = _run(capsys, "export", *world["base"], "--out", str(out_file))
    assert code == 0 and out == "" and "6 events" in err
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    data = json.loads(out_file.read_text())
    assert [e["item"] for e in data["events"]] == ["3", "7", "11", "4", "15", "8"]
    assert sum(e["text"] == NOTE for e in data["events"]) == 2
    assert "global-model" in data["blobs"]
    code, out, _ = _run(capsys, "export", *world["base"])
    assert code == 0 and json.loads(out)["events"] == data["events"]


def test_privacy_reports_ledger_and_budget(world, capsys, tmp_path):
    code, out, _ = _run(capsys, "privacy", *world["base"], "--json")
    assert code == 0 and json.loads(out)["epsilon"] == 0.0  # no training round yet
    # a device that trained: one ledger entry (noise 1.0, q 0.5, 4 steps)
    import shutil

    store = tmp_path / "trained.db"
    shutil.copy(world["store"], store)
    with Device.open(store, key_file=world["key"], create=False) as dev:
        dev.store.put_blob("privacy-ledger", b'{"delta": 1e-05, "history": [[1.0, 0.5, 4]], '
                           b'"rounds": [{"round": 1, "steps": 4}]}')
        eps = dev.privacy()["epsilon"]
    args = ["privacy", "--store", str(store), "--key-file", str(world["key"])]
    code, out, _ = _run(capsys, *args, "--budget", "50", "--json")
    info = json.loads(out)
    assert code == 0 and info["epsilon"] == pytest.approx(eps) and eps > 0
    assert info["budget_left"] == pytest.approx(50 - eps) and info["rounds_joined"] == 1
    code, text, _ = _run(capsys, *args, "--budget", str(eps / 2))
    assert code == 0 and "over budget" in text and "one segment of segment_len" in text


def _copy_store(world, tmp_path):
    import shutil

    store = tmp_path / "copy.db"
    shutil.copy(world["store"], store)
    return store, ["--store", str(store), "--key-file", str(world["key"])]


def _items(store, key):
    with Device.open(store, key_file=key, create=False) as dev:
        return [e.item for e in dev.store.events()]


def test_forget_with_yes_deletes_and_keeps_the_model(world, capsys, tmp_path):
    store, base = _copy_store(world, tmp_path)
    code, out, _ = _run(capsys, "forget", *base, "--item", "7", "--yes")
    assert code == 0 and "forgot 1 event;" in out
    assert _items(store, world["key"]) == ["3", "11", "4", "15", "8"]
    code, out, _ = _run(capsys, "recommend", *base, "--catalog", world["cat_path"], "--json")
    recs = {r["item"] for r in json.loads(out)}  # the 5 events left are excluded, 7 may be back
    assert code == 0 and len(recs) == 10 and not recs & {"3", "11", "4", "15", "8"}
    code, _, _ = _run(capsys, "forget", *base, "--before", "1970-01-01T00:19:00", "--yes")
    assert code == 0 and _items(store, world["key"]) == ["4", "15", "8"]
    code, out, _ = _run(capsys, "forget", *base, "--yes")
    assert code == 0 and "forgot 3 events;" in out and _items(store, world["key"]) == []


def test_forget_without_yes_non_interactive_deletes_nothing(world, capsys, tmp_path):
    store, base = _copy_store(world, tmp_path)
    code, _, err = _run(capsys, "forget", *base)
    assert code == 2 and "--yes" in err and "all 6 events" in err and "Traceback" not in err
    assert len(_items(store, world["key"])) == 6


def test_forget_asks_on_a_terminal(world, capsys, tmp_path, monkeypatch):
    store, base = _copy_store(world, tmp_path)
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    code, out, err = _run(capsys, "forget", *base, "--item", "3")
    assert code == 1 and "nothing deleted" in err and "Delete 1 event of item 3" in out
    assert len(_items(store, world["key"])) == 6
    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    code, _, _ = _run(capsys, "forget", *base, "--item", "3")
    assert code == 0 and "3" not in _items(store, world["key"])


def test_wrong_key_is_exit_2_with_a_clear_message(world, capsys, tmp_path):
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    code, _, err = _run(capsys, "export", "--store", str(world["store"]),
                        "--key-file", str(wrong))
    assert code == 2 and "wrong key file" in err and "Traceback" not in err
    code, _, err = _run(capsys, "privacy", "--store", str(world["store"]),
                        "--key-file", str(tmp_path / "absent.key"))
    assert code == 2 and "no such file" in err


def test_unknown_item_fails_and_a_first_record_leaves_nothing(world, capsys, tmp_path):
    code, _, err = _run(capsys, "record", "nope", *world["base"], "--catalog",
                        world["cat_path"], "--timestamp", "5000")
    assert code == 2 and "'nope' is not in the published catalog" in err
    assert len(_items(world["store"], world["key"])) == 6
    code, _, err = _run(capsys, "explain", "nope", *world["base"], "--catalog",
                        world["cat_path"])
    assert code == 2 and "not in the published catalog" in err
    store, key = tmp_path / "new.db", tmp_path / "new.key"
    code, _, err = _run(capsys, "record", "nope", "--store", str(store), "--key-file",
                        str(key), "--new-key", "--catalog", world["cat_path"])
    assert code == 2 and not store.exists() and not key.exists()


def test_store_must_exist_except_for_record(world, capsys, tmp_path):
    missing = ["--store", str(tmp_path / "none.db"), "--key-file", str(world["key"])]
    for cmd in (["export"], ["privacy"], ["forget", "--yes"],
                ["recommend", "--catalog", world["cat_path"]]):
        code, _, err = _run(capsys, *cmd, *missing)
        assert code == 2 and "no store here" in err, cmd
    assert not (tmp_path / "none.db").exists()
    code, _, err = _run(capsys, "record", "1", "--store", str(tmp_path / "n.db"), "--key-file",
                        str(tmp_path / "n.key"), "--catalog", world["cat_path"])
    assert code == 2 and "--new-key" in err


def test_passphrase_from_environment_never_argv(world, capsys, tmp_path, monkeypatch):
    store = str(tmp_path / "pw.db")
    monkeypatch.setenv("FI_PASS", "correct horse battery staple")
    rec = ["record", "1", "--store", store, "--catalog", world["cat_path"], "--timestamp", "10"]
    assert _run(capsys, *rec, "--passphrase-env", "FI_PASS")[0] == 0
    code, out, _ = _run(capsys, "export", "--store", store, "--passphrase-env", "FI_PASS")
    assert code == 0 and json.loads(out)["events"][0]["item"] == "1"
    monkeypatch.setenv("FI_PASS", "wrong")
    code, _, err = _run(capsys, "export", "--store", store, "--passphrase-env", "FI_PASS")
    assert code == 2 and "wrong passphrase" in err
    code, _, err = _run(capsys, "export", "--store", store, "--passphrase-env", "FI_UNSET_VAR")
    assert code == 2 and "FI_UNSET_VAR" in err
    code, _, err = _run(capsys, "export", "--store", store)  # no key, no terminal to ask
    assert code == 2 and "--passphrase-env" in err


def test_encoder_must_be_the_catalogs(world, capsys, tmp_path):
    cat, cat_path = _catalog(tmp_path / "other", "all-MiniLM-L6-v2@sha256:0123/max128/mean-l2")
    assert cat.encoder_identity != world["cat"].encoder_identity
    base = ["--store", str(tmp_path / "e.db"), "--key-file", str(tmp_path / "e.key")]
    code, _, err = _run(capsys, "record", "1", *base, "--new-key", "--catalog", str(cat_path),
                        "--text", NOTE, "--encoder", world["tiny"])
    assert code == 2 and "not the encoder that embedded the catalog" in err
    assert not (tmp_path / "e.key").exists()
    code, _, _ = _run(capsys, "record", "1", *base, "--new-key", "--catalog", str(cat_path),
                      "--text", NOTE, "--no-embed")
    assert code == 0
    with Device.open(tmp_path / "e.db", key_file=tmp_path / "e.key", create=False) as dev:
        assert dev.store.events()[0].text == NOTE and dev.store.text_vectors() == {}

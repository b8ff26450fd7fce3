"""The on-device encrypted store: round trip, keys, tampering, crash and disk-full safety,
damaged files, migration, forgetting (checked on the raw file bytes), export, validation."""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fedinterest.client import store as store_mod
from fedinterest.client.crypto import (
    ScryptParams,
    Sealer,
    master_key_from_passphrase,
    new_salt,
)
from fedinterest.client.store import (
    CURRENT_VERSION,
    DeviceStore,
    EventValidationError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreVersionError,
    TamperedError,
    WrongKeyError,
)
from fedinterest.shared.errors import ConfigError, FedinterestError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

FAST = ScryptParams(n=2**4, r=8, p=1)  # tests only: a phone uses the default 2**15
PW = "correct horse battery staple"


def open_store(path: Path, **kw) -> DeviceStore:
    if "key_file" not in kw:
        kw.setdefault("passphrase", PW)
    return DeviceStore.open(path, scrypt=FAST, **kw)


def raw_bytes(path: Path) -> bytes:
    """The db file plus whatever WAL/SHM files exist: everything a thief could copy."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            out += p.read_bytes()
    return out


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


# --------------------------------------------------------------------------- round trip


def test_round_trip_survives_reopen_in_canonical_order(tmp_path):
    db = tmp_path / "u.db"
    with open_store(db) as s:
        a = s.add_event("10", 100, 4.5, "liked the ending ✓")
        b = s.add_event(9, 100)  # int ids are stored as their decimal text
        c = s.add_event("2", 50, None, "")
        d = s.add_event("10", 100, 0.0, b"utf-8 bytes \xc3\xa9")
        s.set_text_vector(a, np.arange(4, dtype=np.float64))
        s.put_blob("accountant", b"\x00\x01state")
        s.put_blob("accountant", b"newer")  # replace
        s.put_blob("weights", b"w" * 1000)
        assert s.delete_blob("weights") and not s.delete_blob("weights")
    with open_store(db) as s:
        evs = s.events()
        # timestamp first, then item numerically (9 < 10, not "10" < "9"), then insertion
        assert [e.id for e in evs] == [c, b, a, d]
        assert evs[0].text == "" and evs[1].text is None and evs[1].item == "9"
        assert evs[2].rating == 4.5 and evs[2].text == "liked the ending ✓"
        assert evs[3].rating == 0.0 and evs[3].text == "utf-8 bytes é"
        assert [e.id for e in s.events(since=100)] == [b, a, d]
        vecs = s.text_vectors()
        assert list(vecs) == [a] and vecs[a].dtype == np.float32
        np.testing.assert_array_equal(vecs[a], [0, 1, 2, 3])
        assert s.get_blob("accountant") == b"newer"
        assert s.get_blob("weights") is None and s.blob_names() == ["accountant"]
        assert s.n_events() == 4 and s.schema_version == CURRENT_VERSION


def test_non_integer_item_ids_sort_as_text(tmp_path):
    with open_store(tmp_path / "u.db") as s:
        s.add_events([("b", 1), ("10", 1), ("a", 1), ("9", 1)])
        assert [e.item for e in s.events()] == ["10", "9", "a", "b"]


def test_private_values_never_appear_in_the_file(tmp_path):
    db = tmp_path / "u.db"
    secret, blob = "my very private diary entry", b"personal-weights-plaintext"
    vec = np.full(8, 1234.5678, np.float32)
    with open_store(db) as s:
        eid = s.add_event("item-visible", 1, 3.0, secret)
        s.set_text_vector(eid, vec)
        s.put_blob("w", blob)
        data = raw_bytes(db)
        assert b"item-visible" in data  # documented: item ids stay plaintext
        assert secret.encode() not in data and blob not in data and vec.tobytes() not in data
    data = raw_bytes(db)
    assert secret.encode() not in data and blob not in data and vec.tobytes() not in data


def test_store_settings_are_the_documented_ones(tmp_path):
    with open_store(tmp_path / "u.db") as s:
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1


# --------------------------------------------------------------------------- keys


def test_wrong_passphrase_is_detected_at_open(tmp_path):
    db = tmp_path / "u.db"
    open_store(db).close()
    with pytest.raises(WrongKeyError, match="wrong passphrase") as err:
        open_store(db, passphrase="not it")
    assert isinstance(err.value, FedinterestError) and str(db) in str(err.value)
    with pytest.raises(WrongKeyError, match="passphrase, not a key file"):
        key = tmp_path / "k"
        key.write_bytes(os.urandom(32))
        open_store(db, key_file=key)


def test_key_file_store(tmp_path):
    db, key, other = tmp_path / "u.db", tmp_path / "store.key", tmp_path / "other.key"
    key.write_bytes(os.urandom(32))
    other.write_bytes(os.urandom(32))
    with open_store(db, key_file=key) as s:
        s.add_event("1", 1, None, "hello")
    with open_store(db, key_file=key) as s:
        assert s.events()[0].text == "hello"
    with pytest.raises(WrongKeyError, match="other.key"):
        open_store(db, key_file=other)
    with pytest.raises(WrongKeyError, match="key file, not a passphrase"):
        open_store(db, passphrase=PW)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    with pytest.raises(ConfigError, match=r"short\.key.*exactly 32 raw bytes, found 31"):
        open_store(tmp_path / "v.db", key_file=short)
    with pytest.raises(ConfigError, match="cannot read"):
        open_store(tmp_path / "v.db", key_file=tmp_path / "missing.key")
    assert not (tmp_path / "v.db").exists()  # a failed create leaves nothing behind


def test_open_arguments_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        DeviceStore.open(tmp_path / "u.db")
    with pytest.raises(ConfigError, match="exactly one of"):
        DeviceStore.open(tmp_path / "u.db", passphrase=PW, key_file=tmp_path / "k")
    with pytest.raises(StoreError, match="no store here"):
        open_store(tmp_path / "u.db", create=False)
    with pytest.raises(ConfigError, match="rating_range"):
        open_store(tmp_path / "u.db", rating_range=(5, 1))
    with pytest.raises(ConfigError, match="scrypt: n must be a power of two"):
        DeviceStore.open(tmp_path / "u.db", passphrase=PW, scrypt=ScryptParams(n=1000))
    s = open_store(tmp_path / "u.db")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.events()


# --------------------------------------------------------------------------- tampering


def _two_text_events(db: Path) -> tuple[int, int]:
    with open_store(db) as s:
        a = s.add_event("1", 1, 1.0, "first text")
        b = s.add_event("2", 2, 2.0, "second text")
        s.set_text_vectors({a: [1.0, 2.0], b: [3.0, 4.0]})
        s.put_blob("x", b"blob x")
        s.put_blob("y", b"blob y")
    return a, b


def test_flipped_ciphertext_byte_names_table_and_row(tmp_path):
    db = tmp_path / "u.db"
    _a, b = _two_text_events(db)
    with raw(db) as c:
        text = bytearray(c.execute("SELECT text FROM events WHERE id=?", (b,)).fetchone()[0])
        text[-3] ^= 0x01
        c.execute("UPDATE events SET text=? WHERE id=?", (bytes(text), b))
    with open_store(db) as s:
        with pytest.raises(TamperedError, match=rf"table 'events', row {b}, column 'text'") as e:
            s.events()
        assert (e.value.table, e.value.row) == ("events", b)
        assert s.get_blob("x") == b"blob x"  # other tables unaffected


def test_ciphertext_swapped_between_rows_or_columns_fails(tmp_path):
    db = tmp_path / "u.db"
    a, b = _two_text_events(db)
    with raw(db) as c:
        ta, tb = (c.execute("SELECT text FROM events WHERE id=?", (i,)).fetchone()[0]
                  for i in (a, b))
        c.execute("UPDATE events SET text=? WHERE id=?", (tb, a))
        c.execute("UPDATE events SET text=? WHERE id=?", (ta, b))
        _va, vb = (c.execute("SELECT vec FROM text_vectors WHERE event_id=?", (i,)).fetchone()[0]
                  for i in (a, b))
        c.execute("UPDATE text_vectors SET vec=? WHERE event_id=?", (vb, a))
        xa = c.execute("SELECT value FROM blobs WHERE name='x'").fetchone()[0]
        c.execute("UPDATE blobs SET value=? WHERE name='y'", (xa,))
    with open_store(db) as s:
        with pytest.raises(TamperedError, match=rf"row {a}, column 'text'"):
            s.events()
        with pytest.raises(TamperedError, match=rf"'text_vectors', row {a}"):
            s.text_vectors()
        with pytest.raises(TamperedError, match="'blobs', row 'y'"):
            s.get_blob("y")
        assert s.get_blob("x") == b"blob x"
    with raw(db) as c:  # a text ciphertext moved into the vector column of the same row
        c.execute("UPDATE text_vectors SET vec=? WHERE event_id=?", (tb, b))
    with open_store(db) as s, pytest.raises(TamperedError, match="text_vectors"):
        s.text_vectors()


@pytest.mark.parametrize("edit", ["item='666'", "timestamp=timestamp+1", "rating=5.0",
                                  "text=NULL", "tag=NULL"])
def test_edited_plaintext_columns_are_detected(tmp_path, edit):
    db = tmp_path / "u.db"
    a, _b = _two_text_events(db)
    with raw(db) as c:
        c.execute(f"UPDATE events SET {edit} WHERE id=?", (a,))
    with open_store(db) as s, pytest.raises(TamperedError, match=rf"'events', row {a}"):
        s.events()


# --------------------------------------------------------------------------- crash / full disk

_CHILD = textwrap.dedent("""
    import sys
    from fedinterest.client.store import DeviceStore
    with DeviceStore.open(sys.argv[1], key_file=sys.argv[2], create=False) as s:
        n = 0
        while True:
            s.add_events([(f"i{n}-{j}", 1000 + n, 3.0, f"text {n} {j} " * 50) for j in range(5)])
            n += 1
            print(n, flush=True)  # printed only after the COMMIT returned
""")


def test_sigkill_mid_write_loses_nothing_committed(tmp_path):
    db, key = tmp_path / "u.db", tmp_path / "k"
    key.write_bytes(os.urandom(32))
    open_store(db, key_file=key).close()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(key)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reported = 0
    try:
        deadline = time.monotonic() + 10
        while reported < 60 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            reported = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    reported = max([reported] + [int(x) for x in rest.split()])
    assert reported >= 10, f"child committed too little before the kill: {err}"
    with open_store(db, key_file=key) as s:  # opens with quick_check
        s.integrity_check()
        evs = {e.item: e for e in s.events()}
    # every reported batch is there and readable; at most the one in flight beyond that,
    # and never a partial batch
    assert len(evs) in (5 * reported, 5 * (reported + 1))
    for n in range(reported):
        for j in range(5):
            e = evs[f"i{n}-{j}"]
            assert e.timestamp == 1000 + n and e.text == f"text {n} {j} " * 50


def test_full_disk_raises_and_keeps_everything_committed(tmp_path):
    db = tmp_path / "u.db"
    with open_store(db, max_bytes=256 * 1024) as s:
        committed = []
        with pytest.raises(StoreFullError, match="full") as err:
            for n in range(1000):
                # several rows per batch, so the limit is hit in the middle of a batch
                committed += s.add_events([(str(n), n, 1.0, "x" * 1500) for _ in range(8)])
        assert isinstance(err.value, FedinterestError) and str(db) in str(err.value)
        assert len(committed) >= 10
        assert [e.id for e in s.events()] == committed  # the failing batch left nothing
        s.integrity_check()
        with pytest.raises(StoreFullError):
            s.put_blob("weights", os.urandom(200_000))
        assert s.get_blob("weights") is None
        assert s.forget_before(2) == 16  # space comes back
        s.add_event("after", 10**6, None, "y" * 3000)
    with open_store(db) as s:
        assert s.events()[-1].item == "after"
        assert len(s.events()) == len(committed) - 16 + 1


# --------------------------------------------------------------------------- damaged files


def _store_with_data(db: Path) -> None:
    with open_store(db) as s:
        s.add_events([(str(i), i, 2.0, "some text " * 100) for i in range(200)])


def test_truncated_file_is_a_clear_error(tmp_path):
    db = tmp_path / "u.db"
    _store_with_data(db)
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreCorruptError, match="truncated") as err:
        open_store(db)
    assert str(db) in str(err.value)
    with db.open("r+b") as f:
        f.truncate(50)
    with pytest.raises(StoreCorruptError, match="no SQLite header"):
        open_store(db)
    db.write_bytes(b"")
    with pytest.raises(StoreCorruptError, match="empty"):
        open_store(db)


def test_garbage_and_foreign_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(10_000))
    with pytest.raises(StoreCorruptError, match=r"junk\.db: not a fedinterest store"):
        open_store(junk)
    other = tmp_path / "other.db"
    with raw(other) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreCorruptError, match=r"other\.db: a SQLite file but not a fedinterest"):
        open_store(other)
    db = tmp_path / "u.db"
    _store_with_data(db)
    page = 4096
    data = bytearray(db.read_bytes())
    data[page:] = os.urandom(len(data) - page)  # keep the header, scramble every other page
    db.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"u\.db"):
        open_store(db)


# --------------------------------------------------------------------------- migration

# What version 1 wrote, frozen here on purpose: a migration must keep working on real v1
# files even if someone edits the code's copy.
_V1_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, item TEXT NOT NULL,
                     timestamp INTEGER NOT NULL, rating REAL, text BLOB);
CREATE INDEX events_item ON events(item);
CREATE TABLE text_vectors (event_id INTEGER PRIMARY KEY REFERENCES events(id) ON DELETE CASCADE,
                           vec BLOB NOT NULL);
"""


def _build_v1_file(db: Path) -> None:
    salt = new_salt()
    sealer = Sealer(master_key_from_passphrase(PW, salt, FAST), salt)
    with raw(db) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(_V1_DDL)
        meta = {"format": "fedinterest.device-store", "schema_version": 1, "salt": salt,
                "kdf": "scrypt", "scrypt_n": FAST.n, "scrypt_r": FAST.r, "scrypt_p": FAST.p,
                "key_check": sealer.key_check()}
        c.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        for i, (item, ts, rating, text) in enumerate(
                [("5", 20, 3.5, "old note"), ("3", 10, None, None)], start=1):
            sealed = None if text is None else sealer.seal(text.encode(), "events", i, "text")
            c.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (i, item, ts, rating, sealed))
        c.execute("INSERT INTO text_vectors VALUES (1, ?)",
                  (sealer.seal(np.ones(3, "<f4").tobytes(), "text_vectors", 1, "vec"),))


def test_v1_file_migrates_to_current_version(tmp_path):
    db = tmp_path / "v1.db"
    _build_v1_file(db)
    with open_store(db) as s:
        assert s.schema_version == CURRENT_VERSION == 3
        assert [(e.id, e.item, e.timestamp, e.rating, e.text) for e in s.events()] == [
            (2, "3", 10, None, None), (1, "5", 20, 3.5, "old note")]
        np.testing.assert_array_equal(s.text_vectors()[1], [1, 1, 1])
        s.put_blob("model", b"v2 feature")  # the table v2 added
        s.add_event("7", 30)
        assert s.events()[-1].id == 3
    with raw(db) as c:
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
        assert {"blobs", "events_time"} <= names
        assert c.execute("SELECT COUNT(*) FROM events WHERE tag IS NULL").fetchone()[0] == 0
        c.execute("UPDATE events SET rating=1.0 WHERE id=1")  # migrated rows are now tagged
    with open_store(db) as s, pytest.raises(TamperedError, match="row 1"):
        s.events()


def test_failed_migration_leaves_the_v1_file_untouched(tmp_path, monkeypatch):
    db = tmp_path / "v1.db"
    _build_v1_file(db)
    real_step = store_mod._MIGRATIONS[1]

    def step_then_crash(conn, sealer):
        real_step(conn, sealer)
        raise RuntimeError("simulated crash after the v2 step")

    monkeypatch.setitem(store_mod._MIGRATIONS, 1, step_then_crash)
    with pytest.raises(RuntimeError, match="simulated"):
        open_store(db)
    with raw(db) as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == 1
        assert "blobs" not in {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
    monkeypatch.setitem(store_mod._MIGRATIONS, 1, real_step)
    with open_store(db) as s:
        assert s.schema_version == CURRENT_VERSION and len(s.events()) == 2


def test_file_from_a_newer_version_is_refused(tmp_path):
    db = tmp_path / "u.db"
    open_store(db).close()
    with raw(db) as c:
        c.execute("UPDATE meta SET value=99 WHERE key='schema_version'")
    with pytest.raises(StoreVersionError, match="newer fedinterest.*v99"):
        open_store(db)


# --------------------------------------------------------------------------- forgetting


def _forget_fixture(db: Path) -> dict:
    """Events whose item id, ciphertexts and vectors we look for in the raw bytes later."""
    with open_store(db) as s:
        ids = {
            "gone_item": s.add_event("SECRETITEM-4242", 10, 1.0, "text of the gone item"),
            "old": s.add_event("OLDITEM-777", 5, 2.0, "old text"),
            "kept": s.add_event("KEPTITEM-1", 50, 3.0, "kept text"),
        }
        s.set_text_vectors({i: np.full(16, 7.25 + i, np.float32) for i in ids.values()})
        s.add_event("SECRETITEM-4242", 60)  # a second event of the same item
        s.put_blob("accountant", b"state")
    with raw(db) as c:
        cipher = {k: c.execute("SELECT text FROM events WHERE id=?", (i,)).fetchone()[0]
                  for k, i in ids.items()}
        vec = {k: c.execute("SELECT vec FROM text_vectors WHERE event_id=?", (i,)).fetchone()[0]
               for k, i in ids.items()}
    return {"ids": ids, "cipher": cipher, "vec": vec}


def _assert_present(db: Path, needles: list[bytes], present: bool) -> None:
    data = raw_bytes(db)
    for n in needles:
        assert (n in data) == present, (n[:20], present)


def test_forget_item_removes_it_from_the_raw_file(tmp_path):
    db = tmp_path / "u.db"
    f = _forget_fixture(db)
    gone = [b"SECRETITEM-4242", f["cipher"]["gone_item"], f["vec"]["gone_item"]]
    with open_store(db) as s:
        _assert_present(db, gone, True)  # the check below could fail
        assert s.forget_item("SECRETITEM-4242") == 2
        _assert_present(db, gone, False)  # while open: db + WAL
        assert [e.item for e in s.events()] == ["OLDITEM-777", "KEPTITEM-1"]
        assert set(s.text_vectors()) == {f["ids"]["old"], f["ids"]["kept"]}
    _assert_present(db, gone, False)
    _assert_present(db, [b"KEPTITEM-1", f["cipher"]["kept"]], True)


def test_forget_before_removes_old_events_from_the_raw_file(tmp_path):
    db = tmp_path / "u.db"
    f = _forget_fixture(db)
    gone = [b"OLDITEM-777", f["cipher"]["old"], f["vec"]["old"],
            f["cipher"]["gone_item"], f["vec"]["gone_item"]]
    with open_store(db) as s:
        _assert_present(db, gone, True)
        assert s.forget_before(50) == 2  # timestamps 5 and 10; 50 itself stays
        _assert_present(db, gone, False)
        assert [e.timestamp for e in s.events()] == [50, 60]
    _assert_present(db, gone, False)


def test_forget_all_removes_everything_and_the_store_stays_usable(tmp_path):
    db = tmp_path / "u.db"
    f = _forget_fixture(db)
    gone = [b"SECRETITEM-4242", b"OLDITEM-777", b"KEPTITEM-1", b"accountant",
            *f["cipher"].values(), *f["vec"].values()]
    with open_store(db) as s:
        _assert_present(db, gone, True)
        assert s.forget_all() == 4
        _assert_present(db, gone, False)
        assert s.events() == [] and s.text_vectors() == {} and s.blob_names() == []
        new_id = s.add_event("fresh", 1)
        assert new_id > max(f["ids"].values()) + 1  # ids are never reused
        s.put_blob("ledger", b"epsilon spent so far")
        s.put_blob("weights", b"personal")
        s.forget_all(keep_blobs=["ledger"])
        assert s.blob_names() == ["ledger"] and s.events() == []


# --------------------------------------------------------------------------- export


def test_export_holds_everything_decrypted_and_is_json(tmp_path):
    with open_store(tmp_path / "u.db") as s:
        a = s.add_event("1", 1, 4.0, "note ✓")
        b = s.add_event("2", 2)
        s.set_text_vector(a, [0.5, -1.0])
        s.put_blob("weights", bytes(range(256)))
        exported = json.loads(json.dumps(s.export()))
    assert exported["format"] == "fedinterest.device-store.export/1"
    assert exported["schema_version"] == CURRENT_VERSION
    assert exported["events"] == [
        {"id": a, "item": "1", "timestamp": 1, "rating": 4.0, "text": "note ✓",
         "text_vector": [0.5, -1.0]},
        {"id": b, "item": "2", "timestamp": 2, "rating": None, "text": None,
         "text_vector": None},
    ]
    assert base64.b64decode(exported["blobs"]["weights"]["base64"]) == bytes(range(256))
    assert exported["blobs"]["weights"]["bytes"] == 256


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("event, field, message", [
    (("", 1), "item", "non-empty"),
    ((1.5, 1), "item", "expected a str"),
    (("x" * 257, 1), "item", "limit is 256"),
    (("a\ud800", 1), "item", "UTF-8"),
    (("a", float("nan")), "timestamp", "finite"),
    (("a", float("inf")), "timestamp", "finite"),
    (("a", 1.5), "timestamp", "whole"),
    (("a", "2024"), "timestamp", "integer unix seconds"),
    (("a", 2**63), "timestamp", "64-bit"),
    (("a", 1, float("nan")), "rating", "NaN"),
    (("a", 1, float("inf")), "rating", "outside"),
    (("a", 1, 5.5), "rating", r"outside \[0.0, 5.0\]"),
    (("a", 1, True), "rating", "expected a number"),
    (("a", 1, None, "x" * 10_001), "text", "10001 characters, limit is 10000"),
    (("a", 1, None, b"\xff\xfe"), "text", "not valid UTF-8"),
    (("a", 1, None, "bad \udc80"), "text", "not valid UTF-8"),
    (("a", 1, None, 42), "text", "expected str"),
])
def test_invalid_event_is_rejected_with_the_field_named(tmp_path, event, field, message):
    with open_store(tmp_path / "u.db") as s:
        s.add_event("ok", 0)
        with pytest.raises(EventValidationError, match=message) as err:
            s.add_events([("fine", 1), event])
        assert err.value.field == field and err.value.index == 1
        assert f"event 1: field '{field}'" in str(err.value)
        assert isinstance(err.value, FedinterestError)
        assert s.n_events() == 1


def test_configured_limits_and_batch_shapes(tmp_path):
    with open_store(tmp_path / "u.db", max_text_chars=5, rating_range=(1, 10)) as s:
        s.add_events([{"item": "a", "timestamp": 1, "rating": 10, "text": "12345"}])
        with pytest.raises(EventValidationError, match="limit is 5"):
            s.add_event("a", 1, None, "123456")
        with pytest.raises(EventValidationError, match="outside"):
            s.add_event("a", 1, 0.5)
        with pytest.raises(EventValidationError, match="field 'colour': unknown key"):
            s.add_events([{"item": "a", "timestamp": 1, "colour": "red"}])
        with pytest.raises(EventValidationError, match="field 'timestamp': missing"):
            s.add_events([{"item": "a"}])
        with pytest.raises(EventValidationError, match="field 'event'"):
            s.add_events(["a"])
        with pytest.raises(EventValidationError, match="no event with id 99"):
            s.set_text_vector(99, [1.0])
        with pytest.raises(EventValidationError, match="NaN"):
            s.set_text_vector(1, [1.0, math.nan])
        with pytest.raises(EventValidationError, match="1-D"):
            s.set_text_vector(1, [[1.0]])
        with pytest.raises(EventValidationError, match="name"):
            s.put_blob("", b"x")
        assert s.n_events() == 1 and s.text_vectors() == {}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    with open_store(tmp_path_factory.mktemp("hyp") / "u.db") as s:
        yield s


def _expected_problem(item, ts, rating, text) -> str | None:
    """An oracle written independently of the store: which field, if any, is invalid."""
    if not isinstance(item, str) or not item or len(item) > 256 or _has_surrogate(item):
        return "item"
    if isinstance(ts, float) and not (math.isfinite(ts) and ts.is_integer()):
        return "timestamp"
    if not -(2**63) <= int(ts) < 2**63:
        return "timestamp"
    if rating is not None and not (0.0 <= rating <= 5.0):  # False for NaN too
        return "rating"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return "text"
    if text is not None and (len(text) > 10_000 or _has_surrogate(text)):
        return "text"
    return None


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in s)


_texts = st.one_of(
    st.none(), st.text(max_size=50),
    st.builds(lambda n, ch: ch * n, st.integers(9_995, 10_005), st.sampled_from("aé✓")),
    st.binary(max_size=20), st.text(alphabet=st.characters(categories=("Cs", "Ll")), max_size=10),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    item=st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(["", "x" * 257, "a\udc00"])),
    ts=st.one_of(st.integers(-(2**62), 2**62), st.floats(allow_nan=True)),
    rating=st.one_of(st.none(), st.floats(0, 5), st.floats(allow_nan=True)),
    text=_texts,
)
def test_validation_property_never_partial(shared_store, item, ts, rating, text):
    s = shared_store
    before = s.n_events()
    problem = _expected_problem(item, ts, rating, text)
    event(f"invalid {problem}" if problem else "valid")  # --hypothesis-show-statistics
    if problem is None:
        (eid,) = s.add_events([(item, ts, rating, text)])
        stored = next(e for e in s.events(since=int(ts)) if e.id == eid)
        want_text = text.decode("utf-8") if isinstance(text, bytes) else text
        assert (stored.item, stored.timestamp, stored.rating, stored.text) == (
            item, int(ts), None if rating is None else float(rating), want_text)
        assert s.n_events() == before + 1
    else:
        with pytest.raises(EventValidationError) as err:
            s.add_events([("valid-first", 0, None, "ok"), (item, ts, rating, text)])
        assert err.value.field == problem and err.value.index == 1
        assert s.n_events() == before  # the valid first event was not written either


def test_sqlite_errors_map_to_store_errors_without_error_codes(tmp_path):
    """An sqlite3 error without sqlite_errorcode (one SQLite did not raise) is matched by SQLite's
    fixed messages."""
    for message, kind in [("database or disk is full", StoreFullError),
                          ("file is not a database", StoreCorruptError),
                          ("database disk image is malformed", StoreCorruptError)]:
        err = store_mod._translate(tmp_path / "u.db", sqlite3.OperationalError(message))
        assert isinstance(err, kind) and str(tmp_path / "u.db") in str(err)

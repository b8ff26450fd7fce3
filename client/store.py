"""The on-device encrypted store: the only place a user's raw text is ever persisted.

One SQLite file per user (stdlib sqlite3), WAL journal, every write in one transaction.

Threat model of the at-rest encryption: someone who copies the file (backup, lost phone,
forensic image) must not read the user's private text, text vectors or local model state
(personal weights, privacy-accountant state, caches): those are AES-256-GCM encrypted under a
key from a passphrase (scrypt) or a key file. Item ids, timestamps and ratings stay plaintext
so the store can sort, filter and delete without decrypting everything; a thief learns *which*
items were seen *when* (and rated how), not what the user wrote. Blob names are plaintext too.
Every events row carries an HMAC over its plaintext columns, and every ciphertext is bound to
its table, row and column, so edits and swaps are detected (TamperedError). Deleting whole rows
cannot be detected without a log of all rows ever written; that is out of scope.

Forgetting really removes data from the file: rows are deleted with `secure_delete` on, then
the WAL is checkpointed and truncated and the file is VACUUMed (temp files kept in memory).
What flash wear-levelling keeps below the file system is beyond any app's reach.

One process should use a store at a time (SQLite's locks keep concurrent use safe, but a
forget cannot purge pages another open connection still reads).
"""

from __future__ import annotations

import base64
import numbers
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import numpy as np
from fedinterest.shared.atomic_io import fsync_dir
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.schema import _id_sort_key  # the one tie-break rule; never re-implement

from .crypto import (
    InvalidTag,
    ScryptParams,
    Sealer,
    master_key_from_key_file,
    master_key_from_passphrase,
    new_salt,
)
from .store_schema import (  # noqa: F401  (errors and _MIGRATIONS re-exported: callers import them from here)
    _MIGRATIONS,
    _SCHEMA_V1,
    CURRENT_VERSION,
    STORE_FORMAT,
    VERSIONED_BLOBS,
    EventValidationError,
    RollbackError,
    StoreBusyError,
    StoreCorruptError,
    StoredEvent,
    StoreError,
    StoreFullError,
    StoreVersionError,
    TamperedError,
    WrongKeyError,
    _check_file_header,
    _connect,
    _run_migrations,
    _tag_fields,
    _translate,
    read_version,
    versioned_column,
    write_version,
)
from .store_validation import (  # noqa: F401
    MAX_BLOB_NAME_CHARS,
    MAX_ITEM_CHARS,
    MAX_VECTOR_DIM,
    _check_blob_name,
    _check_item,
    _check_timestamp,
    _Limits,
    _unpack_event,
    _vector_bytes,
)

EXPORT_FORMAT = "fedinterest.device-store.export/1"
DEFAULT_SCRYPT = ScryptParams()


# --------------------------------------------------------------------------- the store


class DeviceStore:
    """Encrypted per-user event store. Open with `DeviceStore.open(...)`; use as a context
    manager or call `close()`. Not thread-safe: one store object per thread."""

    def __init__(self, path: Path, conn: sqlite3.Connection, sealer: Sealer, limits: _Limits):
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._sealer = sealer
        self._limits = limits

    # ---------------------------------------------------------------- open / create

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        passphrase: str | bytes | None = None,
        key_file: str | os.PathLike | None = None,
        create: bool = True,
        *,
        scrypt: ScryptParams = DEFAULT_SCRYPT,
        max_text_chars: int = 10_000,
        rating_range: tuple[float, float] = (0.0, 5.0),
        max_bytes: int | None = None,
        verify: bool = True,
    ) -> DeviceStore:
        """Open (or, with create=True, create) the store at `path`.

        Exactly one of `passphrase` / `key_file` (32 raw bytes). `scrypt` sets the KDF cost for
        a new store (an existing store uses the parameters saved in it). `max_bytes` caps the
        file size (writes beyond raise StoreFullError). `verify` runs SQLite's quick_check at
        open (reads every page once; on by default because a damaged file should fail here,
        not in the middle of training).
        """
        path = Path(path)
        if (passphrase is None) == (key_file is None):
            raise ConfigError("DeviceStore.open: pass exactly one of passphrase= or key_file=")
        limits = _Limits(max_text_chars, rating_range)
        if max_bytes is not None and (isinstance(max_bytes, bool)
                                      or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ConfigError(f"max_bytes: expected a positive int or None, got {max_bytes!r}")
        if path.is_dir():
            raise StoreError(f"{path}: is a directory, expected a store file")
        if not path.exists():
            if not create:
                raise StoreError(f"{path}: no store here (create=False)")
            cls._create(path, passphrase, key_file, scrypt.validate("scrypt"))
        _check_file_header(path)
        try:
            conn = _connect(path, max_bytes)
        except sqlite3.Error as e:
            raise _translate(path, e) from e
        try:
            sealer = cls._unlock(path, conn, passphrase, key_file)
            cls._migrate(path, conn, sealer)
            store = cls(path, conn, sealer, limits)
            if verify:
                store.integrity_check(quick=True)
            return store
        except sqlite3.Error as e:
            conn.close()
            raise _translate(path, e) from e
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _create(path: Path, passphrase, key_file, scrypt: ScryptParams) -> None:
        """Build the new store beside the target and rename it into place, so a crash during
        creation never leaves a half-initialised file at `path`."""
        if not path.parent.is_dir():
            raise StoreError(f"{path}: folder {path.parent} does not exist")
        tmp = path.with_name(path.name + ".creating")
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        salt = new_salt()
        meta: dict[str, Any] = {"format": STORE_FORMAT, "schema_version": 1, "salt": salt}
        if passphrase is not None:
            master = master_key_from_passphrase(passphrase, salt, scrypt)
            meta.update(kdf="scrypt", scrypt_n=scrypt.n, scrypt_r=scrypt.r, scrypt_p=scrypt.p)
        else:
            master = master_key_from_key_file(key_file)
            meta.update(kdf="key_file")
        sealer = Sealer(master, salt)
        meta["key_check"] = sealer.key_check()
        try:
            conn = _connect(tmp, None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
                _run_migrations(conn, sealer, 1)
                conn.execute("COMMIT")
            finally:
                conn.close()  # last connection: SQLite checkpoints and removes the WAL
        except sqlite3.Error as e:
            raise _translate(tmp, e) from e
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @staticmethod
    def _read_meta(path: Path, conn: sqlite3.Connection) -> dict[str, Any]:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            raise StoreCorruptError(f"{path}: a SQLite file but not a fedinterest store (no meta)")
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        if meta.get("format") != STORE_FORMAT:
            raise StoreCorruptError(f"{path}: not a fedinterest store (meta.format is "
                                    f"{meta.get('format')!r}, expected {STORE_FORMAT!r})")
        for key in ("schema_version", "salt", "kdf", "key_check"):
            if key not in meta:
                raise StoreCorruptError(f"{path}: meta.{key} is missing")
        if not isinstance(meta["schema_version"], int) or meta["schema_version"] < 1:
            raise StoreCorruptError(f"{path}: meta.schema_version is {meta['schema_version']!r}")
        return meta

    @classmethod
    def _unlock(cls, path: Path, conn: sqlite3.Connection, passphrase, key_file) -> Sealer:
        meta = cls._read_meta(path, conn)
        if meta["schema_version"] > CURRENT_VERSION:
            raise StoreVersionError(
                f"{path}: written by a newer fedinterest (store schema v{meta['schema_version']},"
                f" this version reads up to v{CURRENT_VERSION}); upgrade fedinterest")
        kdf = meta["kdf"]
        if kdf == "scrypt":
            if passphrase is None:
                raise WrongKeyError(f"{path}: this store is protected by a passphrase, "
                                    "not a key file; pass passphrase=")
            try:
                params = ScryptParams(meta.get("scrypt_n"), meta.get("scrypt_r"),
                                      meta.get("scrypt_p")).validate(f"{path}: meta scrypt")
            except ConfigError as e:
                raise StoreCorruptError(str(e)) from None
            master = master_key_from_passphrase(passphrase, meta["salt"], params)
        elif kdf == "key_file":
            if key_file is None:
                raise WrongKeyError(f"{path}: this store is protected by a key file, "
                                    "not a passphrase; pass key_file=")
            master = master_key_from_key_file(key_file)
        else:
            raise StoreCorruptError(f"{path}: meta.kdf is {kdf!r}, expected scrypt or key_file")
        sealer = Sealer(master, meta["salt"])
        if not sealer.verify_key_check(meta["key_check"]):
            how = "passphrase" if kdf == "scrypt" else f"key file {key_file}"
            raise WrongKeyError(f"{path}: wrong {how} for this store (key check failed)")
        return sealer

    @classmethod
    def _migrate(cls, path: Path, conn: sqlite3.Connection, sealer: Sealer) -> None:
        """Bring an older file up to CURRENT_VERSION in one transaction: all steps or none."""
        version = cls._read_meta(path, conn)["schema_version"]
        if version == CURRENT_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = cls._read_meta(path, conn)["schema_version"]  # re-read under the lock
            _run_migrations(conn, sealer, version)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------- plumbing

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (idempotent). The last connection folds the WAL into the file."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: store is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._db()
        try:
            yield conn
        except sqlite3.Error as e:
            raise _translate(self.path, e) from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed entirely or rolled back entirely (also on SQLITE_FULL,
        which may already have rolled back inside SQLite)."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back; nothing of this write remains
            if isinstance(e, sqlite3.Error):
                raise _translate(self.path, e) from e
            raise

    def _open_value(self, sealed: bytes, table: str, row: int | str, column: str) -> bytes:
        try:
            return self._sealer.open(sealed, table, row, column)
        except InvalidTag:
            raise TamperedError(self.path, table, row, column) from None

    def integrity_check(self, quick: bool = False) -> None:
        """SQLite's structural check of every page; raises StoreCorruptError listing problems."""
        pragma = "quick_check" if quick else "integrity_check"
        with self._read() as conn:
            problems = [r[0] for r in conn.execute(f"PRAGMA {pragma}(20)")]
        if problems != ["ok"]:
            raise StoreCorruptError(f"{self.path}: damaged: " + "; ".join(problems[:5]))

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]

    # ---------------------------------------------------------------- events

    def add_event(self, item: str | int, timestamp: int, rating: float | None = None,
                  text: str | bytes | None = None) -> int:
        """Store one event; returns its id. Invalid input raises EventValidationError and
        writes nothing."""
        return self.add_events([(item, timestamp, rating, text)])[0]

    def check_event(self, item: Any, timestamp: Any, rating: Any = None,
                    text: Any = None) -> tuple[str, int, float | None, str | None]:
        """The event as add_event would store it (text decoded from UTF-8 bytes), or
        EventValidationError; writes nothing. Lets a caller validate before costly work that
        must not run on bad input, such as embedding the text."""
        return (_check_item(item), _check_timestamp(timestamp), self._limits.rating(rating),
                self._limits.text(text))

    def add_events(self, batch: Iterable[Mapping[str, Any] | Sequence[Any]]) -> list[int]:
        """Store many events in one transaction (all or none); returns their ids in order.
        Every element is validated before anything is written."""
        rows = []
        for i, ev in enumerate(batch):
            item, ts, rating, text = _unpack_event(ev, i)
            rows.append((_check_item(item, i), _check_timestamp(ts, i),
                         self._limits.rating(rating, i), self._limits.text(text, i)))
        ids = []
        with self._write() as conn:
            for item, ts, rating, text in rows:
                cur = conn.execute(
                    "INSERT INTO events(item, timestamp, rating) VALUES (?, ?, ?)",
                    (item, ts, rating))
                eid = cur.lastrowid
                sealed = (None if text is None else
                          self._sealer.seal(text.encode("utf-8"), "events", eid, "text"))
                tag = self._sealer.row_tag(
                    "events", _tag_fields(eid, item, ts, rating, text is not None))
                conn.execute("UPDATE events SET text = ?, tag = ? WHERE id = ?",
                              (sealed, tag, eid))
                ids.append(eid)
        return ids

    def events(self, since: int | None = None) -> list[StoredEvent]:
        """All events (or those with timestamp >= since), decrypted and authenticated, in
        canonical order: timestamp, then item id (numeric when every stored id is an integer,
        the rule of shared/schema.py), then insertion order."""
        where, args = "", ()
        if since is not None:
            where, args = " WHERE timestamp >= ?", (_check_timestamp(since, field="since"),)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, item, timestamp, rating, text, tag FROM events" + where, args
            ).fetchall()
            all_items = [r[0] for r in conn.execute("SELECT DISTINCT item FROM events")]
        out = []
        for eid, item, ts, rating, sealed, tag in rows:
            if not self._sealer.check_row_tag(
                    tag, "events", _tag_fields(eid, item, ts, rating, sealed is not None)):
                raise TamperedError(self.path, "events", eid)
            text = None
            if sealed is not None:
                text = self._open_value(sealed, "events", eid, "text").decode("utf-8")
            out.append(StoredEvent(eid, item, ts, rating, text))
        item_key = _id_sort_key(all_items)
        out.sort(key=lambda e: (e.timestamp, item_key(e.item), e.id))
        return out

    def n_events(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    # ---------------------------------------------------------------- text vectors

    def set_text_vector(self, event_id: int, vec: Any) -> None:
        """Store (or replace) the encoded vector of an event's private text."""
        self.set_text_vectors({event_id: vec})

    def set_text_vectors(self, vectors: Mapping[int, Any]) -> None:
        """Many vectors in one transaction (all or none)."""
        prepared = []
        for event_id, vec in vectors.items():
            if isinstance(event_id, bool) or not isinstance(event_id, numbers.Integral):
                raise EventValidationError("event_id", f"expected an int, got {event_id!r}")
            prepared.append((int(event_id), _vector_bytes(event_id, vec)))
        with self._write() as conn:
            for eid, data in prepared:
                if conn.execute("SELECT 1 FROM events WHERE id = ?", (eid,)).fetchone() is None:
                    raise EventValidationError("event_id", f"no event with id {eid}")
                conn.execute(
                    "INSERT INTO text_vectors(event_id, vec) VALUES (?, ?) "
                    "ON CONFLICT(event_id) DO UPDATE SET vec = excluded.vec",
                    (eid, self._sealer.seal(data, "text_vectors", eid, "vec")))

    def text_vectors(self) -> dict[int, np.ndarray]:
        """{event id: float32 vector}, decrypted and authenticated, by event id."""
        with self._read() as conn:
            rows = conn.execute("SELECT event_id, vec FROM text_vectors ORDER BY event_id")
            rows = rows.fetchall()
        return {eid: np.frombuffer(self._open_value(v, "text_vectors", eid, "vec"), "<f4")
                .astype(np.float32) for eid, v in rows}

    # ---------------------------------------------------------------- blobs (model state)

    def put_blob(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store (or replace) an encrypted value, e.g. accountant state or personal weights.
        A versioned blob (VERSIONED_BLOBS) gets the next version in the same transaction."""
        name = _check_blob_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise EventValidationError("data", f"expected bytes, got {type(data).__name__}")
        with self._write() as conn:
            column = "value"
            if name in VERSIONED_BLOBS:
                version = self._version(conn, name) + 1
                write_version(conn, self._sealer, name, version)
                column = versioned_column(version)
            sealed = self._sealer.seal(bytes(data), "blobs", name, column)
            conn.execute("INSERT INTO blobs(name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, sealed))

    def get_blob(self, name: str) -> bytes | None:
        """The stored bytes, or None if there is no blob of that name. A versioned blob that
        is older than its version record, or missing while one was written, raises
        RollbackError."""
        name = _check_blob_name(name)
        with self._read() as conn:
            row = conn.execute("SELECT value FROM blobs WHERE name = ?", (name,)).fetchone()
            if name not in VERSIONED_BLOBS:
                return None if row is None else self._open_value(row[0], "blobs", name, "value")
            version = self._version(conn, name)
        if row is None:
            if version:
                raise RollbackError(self.path, name, f"deleted (version {version} was written)")
            return None
        try:
            return self._sealer.open(row[0], "blobs", name, versioned_column(version))
        except InvalidTag:
            raise RollbackError(self.path, name, f"not the latest version ({version}): an "
                                "older copy was put back, or the row was edited") from None

    def _version(self, conn: sqlite3.Connection, name: str) -> int:
        try:
            version = read_version(conn, self._sealer, name)
        except InvalidTag:
            raise TamperedError(self.path, "meta", f"version:{name}", "value") from None
        if version is None:
            raise RollbackError(self.path, name, "its version record was deleted")
        return version

    def delete_blob(self, name: str) -> bool:
        """True if a blob was deleted. Versioned blobs (the privacy ledger) are never deleted:
        privacy already spent cannot be un-spent."""
        name = _check_blob_name(name)
        if name in VERSIONED_BLOBS:
            raise StoreError(f"{self.path}: blob '{name}' is versioned and cannot be deleted")
        with self._write() as conn:
            return conn.execute("DELETE FROM blobs WHERE name = ?", (name,)).rowcount > 0

    def blob_names(self) -> list[str]:
        with self._read() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM blobs ORDER BY name")]

    # ---------------------------------------------------------------- forgetting

    def forget_all(self, keep_blobs: Iterable[str] = ()) -> int:
        """Delete every event, vector and blob (model state derived from the user's data goes
        too) and purge them from the file. Returns the number of events deleted.

        `keep_blobs` names blobs to keep besides the versioned ones (VERSIONED_BLOBS: the
        privacy ledger, which keeps composing across rounds the device already took part in,
        is always kept)."""
        keep = [_check_blob_name(n) for n in keep_blobs] + sorted(VERSIONED_BLOBS)
        with self._write() as conn:
            conn.execute("DELETE FROM text_vectors")
            n = conn.execute("DELETE FROM events").rowcount
            conn.execute(f"DELETE FROM blobs WHERE name NOT IN ({','.join('?' * len(keep))})",
                         keep)
        self._purge()
        return n

    def forget_item(self, item: str | int) -> int:
        """Delete every event of `item` (and their vectors) and purge them from the file."""
        item = _check_item(item)
        with self._write() as conn:
            n = conn.execute("DELETE FROM events WHERE item = ?", (item,)).rowcount
        self._purge()
        return n

    def forget_before(self, timestamp: int) -> int:
        """Delete every event with timestamp < `timestamp` and purge them from the file."""
        ts = _check_timestamp(timestamp)
        with self._write() as conn:
            n = conn.execute("DELETE FROM events WHERE timestamp < ?", (ts,)).rowcount
        self._purge()
        return n

    def _purge(self) -> None:
        """Make deleted rows unrecoverable from the file: copy the WAL into the db and
        truncate it to zero bytes, then VACUUM (rewrites the db without free pages; the
        secure_delete pragma already zeroed the cells) and truncate the WAL again."""
        with self._read() as conn:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            conn.execute("VACUUM")
            busy |= conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise StoreBusyError(
                f"{self.path}: rows were deleted, but another open connection kept old pages "
                "in the WAL; close it and forget again to purge them from the file")

    # ---------------------------------------------------------------- export

    def export(self) -> dict:
        """Everything stored about the user, decrypted, JSON-serialisable (data portability).
        Blobs are base64 because model state is binary."""
        vectors = self.text_vectors()
        events = [
            {"id": e.id, "item": e.item, "timestamp": e.timestamp, "rating": e.rating,
             "text": e.text,
             "text_vector": vectors[e.id].tolist() if e.id in vectors else None}
            for e in self.events()
        ]
        blobs = {}
        for name in self.blob_names():
            data = self.get_blob(name)
            blobs[name] = {"bytes": len(data), "base64": base64.b64encode(data).decode("ascii")}
        return {"format": EXPORT_FORMAT, "store": str(self.path),
                "schema_version": self.schema_version, "events": events, "blobs": blobs}



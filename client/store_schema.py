"""The device store's errors, on-disk schema, migrations and SQLite connection settings
(client/store.py is the store itself)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fedinterest.shared.errors import FedinterestError

from .crypto import Sealer

CURRENT_VERSION = 3
STORE_FORMAT = "fedinterest.device-store"
# Blobs whose rollback or deletion must be detected (the privacy ledger: an older copy would
# lower the recorded epsilon, a deleted one reset it). Each write bumps a version kept in a
# sealed meta row and bound into the blob's associated data; such blobs are never deleted.
VERSIONED_BLOBS = frozenset({"privacy-ledger"})


# --------------------------------------------------------------------------- errors


class StoreError(FedinterestError):
    """Anything wrong with the store; the message names the file."""


class WrongKeyError(StoreError):
    """The passphrase / key file does not open this store."""


class TamperedError(StoreError):
    """A row failed authentication: it was edited, moved or corrupted on disk."""

    def __init__(self, path: Path | str, table: str, row: int | str, column: str | None = None):
        what = f"table '{table}', row {row!r}" + (f", column '{column}'" if column else "")
        super().__init__(
            f"{path}: {what} failed authentication: the file was modified outside fedinterest "
            "or is damaged; this row cannot be trusted"
        )
        self.table, self.row, self.column = table, row, column


class RollbackError(StoreError):
    """A versioned blob (the privacy ledger) is older than its version record, or was deleted:
    someone replayed or removed a row. The device refuses to train until this is resolved."""

    def __init__(self, path: Path | str, name: str, problem: str):
        super().__init__(f"{path}: blob '{name}': {problem}; the privacy ledger cannot be "
                         "trusted, so this device takes part in no round until it is restored")
        self.name = name


class StoreFullError(StoreError):
    """The disk (or the configured max_bytes) is full; nothing of the failed write was kept."""


class StoreCorruptError(StoreError):
    """The file is not a readable fedinterest store (truncated, garbage, damaged)."""


class StoreVersionError(StoreError):
    """The file was written by a newer fedinterest than this one."""


class StoreBusyError(StoreError):
    """Another connection holds the store and blocked the operation."""


class EventValidationError(StoreError, ValueError):
    """An input value is invalid; the message names the event (in a batch) and the field."""

    def __init__(self, field: str, problem: str, index: int | None = None):
        where = (f"event {index}: " if index is not None else "") + f"field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.field, self.problem, self.index = field, problem, index


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StoredEvent:
    id: int
    item: str
    timestamp: int
    rating: float | None
    text: str | None


# --------------------------------------------------------------------------- schema

# v1: what the first release wrote. Kept verbatim: new files are created as v1 and then
# migrated, so every migration step runs on every new store too, not only on old files.
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of forgotten rows are never
    item TEXT NOT NULL,                    -- reused, so an old ciphertext cannot be replayed
    timestamp INTEGER NOT NULL,            -- into a new row with the same id
    rating REAL,
    text BLOB                              -- AES-GCM(nonce || ct), AD = (events, id, text)
);
CREATE INDEX events_item ON events(item);
CREATE TABLE text_vectors (
    event_id INTEGER PRIMARY KEY REFERENCES events(id) ON DELETE CASCADE,
    vec BLOB NOT NULL                      -- AES-GCM of little-endian float32
);
"""


def _migrate_v1_to_v2(conn: sqlite3.Connection, sealer: Sealer) -> None:
    """v2: (a) a key-value table for local model state, (b) an HMAC tag per events row so
    edits to the plaintext columns (item, timestamp, rating, text present) are detected, which
    v1 could not do, backfilled here with the store key, (c) an index for `events(since=)`."""
    conn.execute("CREATE TABLE blobs (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
    conn.execute("ALTER TABLE events ADD COLUMN tag BLOB")
    rows = conn.execute("SELECT id, item, timestamp, rating, text FROM events").fetchall()
    conn.executemany(
        "UPDATE events SET tag = ? WHERE id = ?",
        [(sealer.row_tag("events", _tag_fields(i, it, ts, r, t is not None)), i)
         for i, it, ts, r, t in rows],
    )
    conn.execute("CREATE INDEX events_time ON events(timestamp, item)")


def version_key(name: str) -> str:
    """The meta row that records a versioned blob's latest version."""
    return f"version:{name}"


def versioned_column(version: int) -> str:
    """The associated-data column of a versioned blob at `version`: an older sealed copy
    fails authentication against the current version."""
    return f"value@v{version}"


def read_version(conn: sqlite3.Connection, sealer: Sealer, name: str) -> int | None:
    """The sealed version record of blob `name`, or None when the row is missing. Raises
    InvalidTag when the record was edited."""
    key = version_key(name)
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    return int(sealer.open(row[0], "meta", key, "value").decode())


def write_version(conn: sqlite3.Connection, sealer: Sealer, name: str, version: int) -> None:
    key = version_key(name)
    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                 "value = excluded.value", (key, sealer.seal(str(version).encode(), "meta",
                                                              key, "value")))


def _migrate_v2_to_v3(conn: sqlite3.Connection, sealer: Sealer) -> None:
    """v3: versioned blobs (VERSIONED_BLOBS). An existing ledger is re-sealed as version 1
    with the version in its associated data; a store without one records version 0, so
    from now on a ledger that disappears, or an older copy put back, is detected."""
    for name in sorted(VERSIONED_BLOBS):
        row = conn.execute("SELECT value FROM blobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            write_version(conn, sealer, name, 0)
            continue
        data = sealer.open(row[0], "blobs", name, "value")
        conn.execute("UPDATE blobs SET value = ? WHERE name = ?",
                     (sealer.seal(data, "blobs", name, versioned_column(1)), name))
        write_version(conn, sealer, name, 1)


# from-version -> step to from-version + 1; each runs inside the caller's transaction
_MIGRATIONS = {1: _migrate_v1_to_v2, 2: _migrate_v2_to_v3}


def _tag_fields(event_id: int, item: str, timestamp: int, rating: float | None,
                has_text: bool) -> list:
    return [event_id, item, timestamp, None if rating is None else float(rating).hex(), has_text]


# --------------------------------------------------------------------------- sqlite helpers


# SQLite's primary result codes. An sqlite3 error carries its code (sqlite_errorcode) only
# when SQLite itself raised it; one made elsewhere is matched by SQLite's fixed messages.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CORRUPT = (
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT)
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = (
    sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOTADB)
_CODE_BY_MESSAGE = {
    "database or disk is full": _SQLITE_FULL,
    "file is not a database": _SQLITE_NOTADB,
    "database disk image is malformed": _SQLITE_CORRUPT,
    "database is locked": _SQLITE_BUSY,
    "disk I/O error": _SQLITE_IOERR,
    "unable to open database file": _SQLITE_CANTOPEN,
}


def _translate(path: Path, exc: sqlite3.Error) -> StoreError:
    """sqlite3 errors -> errors a user can act on, naming the file."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        code = next((c for m, c in _CODE_BY_MESSAGE.items() if m in str(exc)), 0)
    code &= 0xFF
    if code == _SQLITE_FULL:
        return StoreFullError(
            f"{path}: store is full (disk full or max_bytes reached); the write was rolled "
            "back, everything committed before is intact")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorruptError(f"{path}: not a readable store file (damaged or truncated): {exc}")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreBusyError(f"{path}: store is in use by another connection: {exc}")
    if code == _SQLITE_IOERR:
        return StoreCorruptError(f"{path}: I/O error reading or writing the store "
                                 f"(truncated file or failing disk?): {exc}")
    if code == _SQLITE_CANTOPEN:
        return StoreError(f"{path}: cannot open the store file: {exc}")
    return StoreError(f"{path}: {exc}")


def _check_file_header(path: Path) -> None:
    """Cheap checks before SQLite touches the file, so garbage and truncation get a clear
    message instead of 'file is not a database' from somewhere later."""
    size = path.stat().st_size
    if size == 0:
        raise StoreCorruptError(
            f"{path}: file is empty (truncated?); not a store. Move it away to start a new one")
    with path.open("rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise StoreCorruptError(f"{path}: not a fedinterest store (no SQLite header; "
                                f"truncated to {size} bytes or not a store file)")
    wal = Path(str(path) + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return  # pages may legitimately still live in the WAL; SQLite recovers them
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    n_pages = int.from_bytes(header[28:32], "big")
    if header[24:28] == header[92:96] and n_pages * page_size > size:  # in-header size valid
        raise StoreCorruptError(
            f"{path}: truncated: the header says {n_pages * page_size} bytes, the file has {size}")


def _connect(path: Path, max_bytes: int | None) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; we BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot switch to WAL journal mode (got {mode!r})")
        # FULL: fsync the WAL on every commit. In WAL mode NORMAL only syncs at checkpoints, so
        # a power loss could drop transactions the app already reported as saved; with FULL a
        # committed row survives both a killed process and a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA secure_delete=ON")  # deleted cells are zeroed, not just unlinked
        conn.execute("PRAGMA temp_store=MEMORY")  # VACUUM/sort temp data never hits the disk
        conn.execute("PRAGMA foreign_keys=ON")  # vectors go with their event
        conn.execute("PRAGMA cell_size_check=ON")  # detect damaged pages early
        if max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(1, int(max_bytes) // page)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _run_migrations(conn: sqlite3.Connection, sealer: Sealer, from_version: int) -> None:
    for version in range(from_version, CURRENT_VERSION):
        _MIGRATIONS[version](conn, sealer)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version + 1,))

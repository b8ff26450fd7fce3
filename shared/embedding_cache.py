"""Disk cache of *public* text vectors, keyed by (encoder identity, sha256 of the text).

Why one SQLite file: a catalog of 10k-100k texts is a few hundred thousand small rows, which
SQLite handles with one indexed lookup per chunk of keys and one transaction per batch of
inserts; WAL mode lets many readers (e.g. simulation workers) read while one process writes,
and writes are atomic, so a crash cannot leave half a catalog behind. Per-identity .npy shards
would need their own index, locking and partial-write handling to get the same guarantees.

Rows store the vector as float32 bytes plus a BLAKE2b checksum of those bytes and the
dimension; a row whose length, checksum or values do not check out is treated as a miss (the
caller recomputes and overwrites it), never returned. A file that is not a database at all is
moved aside and a fresh one started.

Privacy: only public catalog text may go through this cache. It lives in a shared,
unencrypted location and the vectors of a text can reveal the text, so private user text is
never cached here (the device's encrypted store keeps its own vectors). The cache stores the
text's hash, not the text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DB_NAME = "embeddings.sqlite"
_CHUNK = 900  # keys per IN (...) query: below SQLite's oldest host-parameter limit (999)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS encoders (
    id INTEGER PRIMARY KEY,
    identity TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS vectors (
    encoder INTEGER NOT NULL REFERENCES encoders(id),
    text_sha BLOB NOT NULL,
    dim INTEGER NOT NULL,
    checksum BLOB NOT NULL,
    vec BLOB NOT NULL,
    PRIMARY KEY (encoder, text_sha)
) WITHOUT ROWID;
"""


def default_cache_dir() -> Path:
    """`$FEDINTEREST_CACHE` if set, else `~/.cache/fedinterest`."""
    env = os.environ.get("FEDINTEREST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedinterest"


def text_key(text: str) -> bytes:
    """The key a text is stored under: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    """SQLITE_NOTADB / SQLITE_CORRUPT: the file is not a usable database (truncated, overwritten)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is None:  # Python < 3.11: only the exact base class means "not a database"
        return type(e) is sqlite3.DatabaseError
    return code & 0xFF in (11, 26)


def _checksum(vec_bytes: bytes) -> bytes:
    return hashlib.blake2b(vec_bytes, digest_size=8).digest()


class EmbeddingCache:
    """Vectors of public texts on disk, shared by every process that points at the same folder.

    `hits` and `misses` count lookups since construction (the CLI reports them).
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.path = self.dir / DB_NAME
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self._local = threading.local()  # sqlite connections must stay in their thread
        self._encoder_ids: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r})"

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._open()
        except sqlite3.DatabaseError as e:
            if not _is_corrupt(e):  # e.g. "database is locked": not ours to throw away
                raise
            aside = self.path.with_name(f"{DB_NAME}.corrupt-{int(time.time())}")
            log.warning("embedding cache %s is unreadable (%s); moved to %s", self.path, e, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            conn = self._open()
        self._local.conn = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _encoder_id(self, identity: str) -> int:
        eid = self._encoder_ids.get(identity)
        if eid is None:
            conn = self._connect()
            with conn:
                conn.execute("INSERT OR IGNORE INTO encoders(identity) VALUES (?)", (identity,))
            (eid,) = conn.execute(
                "SELECT id FROM encoders WHERE identity = ?", (identity,)
            ).fetchone()
            self._encoder_ids[identity] = eid
        return eid

    # -- public API -------------------------------------------------------------------------
    def get_many(self, identity: str, keys: Sequence[bytes], dim: int) -> dict[bytes, np.ndarray]:
        """Vectors found for `keys` (see `text_key`); corrupt or mismatched rows are left out."""
        eid = self._encoder_id(identity)
        conn = self._connect()
        found: dict[bytes, np.ndarray] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT text_sha, dim, checksum, vec FROM vectors "
                f"WHERE encoder = ? AND text_sha IN ({marks})",
                (eid, *chunk),
            )
            for sha, row_dim, checksum, blob in rows:
                vec = self._decode(row_dim, checksum, blob, dim)
                if vec is None:
                    self.corrupt += 1
                    log.warning("embedding cache: corrupt entry for %s ignored", sha.hex()[:12])
                    continue
                found[bytes(sha)] = vec
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, identity: str, items: Iterable[tuple[bytes, np.ndarray]]) -> None:
        """Stores (key, vector) pairs in one transaction, replacing what was there."""
        eid = self._encoder_id(identity)
        rows = []
        for key, vec in items:
            blob = np.ascontiguousarray(vec, dtype="<f4").tobytes()
            rows.append((eid, key, int(np.size(vec)), _checksum(blob), blob))
        conn = self._connect()
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO vectors(encoder, text_sha, dim, checksum, vec) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def count(self, identity: str | None = None) -> int:
        """Number of cached vectors (of one encoder when `identity` is given)."""
        conn = self._connect()
        if identity is None:
            return conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        return conn.execute(
            "SELECT COUNT(*) FROM vectors WHERE encoder = ?", (self._encoder_id(identity),)
        ).fetchone()[0]

    @staticmethod
    def _decode(row_dim: int, checksum: bytes, blob: bytes, dim: int) -> np.ndarray | None:
        if row_dim != dim or len(blob) != 4 * dim or _checksum(bytes(blob)) != bytes(checksum):
            return None
        vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(vec)):
            return None
        return vec

"""The public catalog the server publishes once per version and devices cache.

Item vectors never travel with a round (9,742 x 384 floats is 15 MB); devices fetch this file
once, check its version hash and score locally. It holds only public data: item ids, their
public text vectors, topic names, and the popularity counts released under DP.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic_io import write_bytes
from .errors import FedinterestError


class CatalogVersionError(FedinterestError):
    """The cached catalog is not the version the server announced."""


@dataclass
class PublishedCatalog:
    item_ids: list[str]
    vectors: np.ndarray  # float32 [N, D], L2-normalised item text vectors
    topics: list[tuple[str, ...]]
    popularity: np.ndarray  # float32 [N], DP-released interaction counts (0 when not released)
    encoder_identity: str
    texts: list[str] | None = None  # public item text, for readable recommendations

    @property
    def version(self) -> str:
        """The content hash that names this catalog. Computed once per object (hashing 15 MB
        of vectors took ~10 ms, twice per evaluated device): a published catalog is not
        modified, so its arrays become read-only when hashed, and assigning a field drops
        the kept version."""
        kept = self.__dict__.get("_version")
        if kept is None:
            for a in (self.vectors, self.popularity):
                if isinstance(a, np.ndarray):
                    a.setflags(write=False)
            kept = self.__dict__["_version"] = self._content_hash()
        return kept

    def __setattr__(self, name: str, value) -> None:
        self.__dict__.pop("_version", None)
        super().__setattr__(name, value)

    def _content_hash(self) -> str:
        h = hashlib.sha256()
        h.update("\x1f".join(self.item_ids).encode())
        h.update(np.ascontiguousarray(self.vectors, np.float32).tobytes())
        h.update(repr(self.topics).encode())
        h.update(np.ascontiguousarray(self.popularity, np.float32).tobytes())
        h.update(self.encoder_identity.encode())
        h.update("\x1f".join(self.texts or []).encode())
        return h.hexdigest()[:20]

    def __len__(self) -> int:
        return len(self.item_ids)

    def save(self, directory: str | Path) -> Path:
        """Writes catalog-<version>.npz atomically; returns its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"catalog-{self.version}.npz"
        buf = io.BytesIO()
        np.savez(buf, item_ids=np.array(self.item_ids, dtype=object).astype(str),
                 vectors=self.vectors.astype(np.float32),
                 topics=np.array(["\x1f".join(t) for t in self.topics], dtype=str),
                 popularity=self.popularity.astype(np.float32),
                 encoder=np.array(self.encoder_identity),
                 texts=np.array(self.texts if self.texts is not None else [], dtype=str))
        write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path, expected_version: str | None = None) -> PublishedCatalog:
        try:
            with np.load(path, allow_pickle=False) as z:
                cat = cls(item_ids=[str(x) for x in z["item_ids"]],
                          vectors=z["vectors"].astype(np.float32),
                          topics=[tuple(t.split("\x1f")) if t else () for t in z["topics"]],
                          popularity=z["popularity"].astype(np.float32),
                          encoder_identity=str(z["encoder"]),
                          texts=[str(t) for t in z["texts"]] or None)
        except FileNotFoundError:
            raise CatalogVersionError(f"{path}: published catalog not found") from None
        except (OSError, ValueError, KeyError) as e:
            raise CatalogVersionError(f"{path}: not a readable published catalog ({e})") from None
        if expected_version is not None and cat.version != expected_version:
            raise CatalogVersionError(
                f"{path}: catalog version {cat.version} does not match the announced "
                f"{expected_version}; fetch the catalog again")
        return cat

    def topic_vocab(self) -> list[str]:
        return sorted({t for ts in self.topics for t in ts})

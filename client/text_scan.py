"""Find a device's raw text in bytes about to leave it (the egress guard, client/egress.py).

Each text is looked for in UTF-8, UTF-16 (LE and BE) and Latin-1, the encodings a bug or a
crafted model could put into float payloads: any WINDOW-byte quote of a longer text, a text of
MIN_WHOLE..WINDOW bytes whole, and a shorter one of at least MIN_TOKEN bytes whole as a token
(not next to an ASCII letter or digit, so "funny" does not match inside "funnyman"). Texts
under MIN_TOKEN bytes are not scanned: 1-3 bytes occur in float data by chance; the fixed
schema (only allow-listed numeric arrays and metrics leave) is what keeps them in.

The search is vectorised: every offset's first 8 (or 4) bytes as an integer, looked up among
the patterns' prefixes with numpy, candidates confirmed bytewise.
"""

from __future__ import annotations

import re
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

WINDOW = 12  # bytes: long enough that model floats never match by chance
MIN_WHOLE = 8  # a text of 8..12 bytes is matched whole
MIN_TOKEN = 4  # a text of 4..7 bytes is matched whole, as a token
ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "latin-1")
_ALNUM = re.compile(rb"[A-Za-z0-9]")


class TextPatterns:
    """The byte patterns of a device's texts, ready to scan blobs with."""

    def __init__(self, texts: Iterable[str]):
        windows: set[bytes] = set()
        tokens: set[bytes] = set()
        for t in texts:
            for enc in ENCODINGS:
                try:
                    b = t.encode(enc)
                except UnicodeEncodeError:  # Latin-1 has no such character: nothing to find
                    continue
                if len(b) > WINDOW:
                    windows.update(b[i:i + WINDOW] for i in range(len(b) - WINDOW + 1))
                elif len(b) >= MIN_WHOLE:
                    windows.add(b)
                elif len(b) >= MIN_TOKEN:
                    tokens.add(b)
        self._windows = _Prefixed(windows, 8)
        self._tokens = _Prefixed(tokens, 4)

    def __bool__(self) -> bool:
        return bool(self._windows.by_prefix or self._tokens.by_prefix)

    def found_in(self, blob: bytes, tokens: bool = True) -> bool:
        """True when any pattern occurs in `blob` (a token only with non-alphanumeric
        neighbours; `tokens=False` skips short texts, for bytes that hold record keys)."""
        if self._windows.search(blob, lambda _b, _p, _w: True):
            return True
        return tokens and self._tokens.search(blob, _is_token)


def _is_token(blob: bytes, pos: int, pattern: bytes) -> bool:
    before = blob[pos - 1:pos] if pos else b""
    after = blob[pos + len(pattern):pos + len(pattern) + 1]
    return not (_ALNUM.fullmatch(before or b"-") or _ALNUM.fullmatch(after or b"-"))


class _Prefixed:
    """Patterns grouped by their first `k` bytes (k = 8 or 4) as a little-endian integer."""

    def __init__(self, patterns: set[bytes], k: int):
        self.k, self.dtype = k, np.dtype("<u8" if k == 8 else "<u4")
        self.by_prefix: dict[int, list[bytes]] = defaultdict(list)
        for p in patterns:
            self.by_prefix[int.from_bytes(p[:k], "little")].append(p)
        self.prefixes = np.array(sorted(self.by_prefix), dtype=self.dtype)

    def search(self, blob: bytes, accept) -> bool:
        if not self.by_prefix or len(blob) < self.k:
            return False
        a = np.frombuffer(blob, np.uint8)
        for offset in range(self.k):  # offsets o, o + k, o + 2k, ... in one vectorised pass
            n = (len(a) - offset) // self.k
            if n <= 0:
                continue
            vals = a[offset:offset + n * self.k].view(self.dtype)
            for i in np.flatnonzero(np.isin(vals, self.prefixes)):
                pos = offset + int(i) * self.k
                for p in self.by_prefix[int(vals[i])]:
                    if blob.startswith(p, pos) and accept(blob, pos, p):
                        return True
        return False


def metric_bytes(records: Iterable[Mapping[str, float]]) -> list[bytes]:
    """The raw bytes of every metric value, in record order, as float64 in both byte orders
    (a text spread over consecutive values shows up in the concatenation)."""
    values = [float(v) for rec in records for v in rec.values()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [b"".join(struct.pack(f"{order}d", v) for v in values) for order in "<>"]

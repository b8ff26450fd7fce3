"""What one message's handling would otherwise compute several times: the request's arrays
decoded from Flower's records and the raw texts the egress guard scans for.

Flower's `Array.numpy()` parses the array's bytes again on every call, and the train
handler, the update packing mod and the egress guard each read the request's weights (about
80 parses per message, docs/BENCHMARKS.md, client-round profile). The egress guard needs the
device's raw texts, which the training round has just decrypted. Both are held for one
message only: the arrays by the identity of the record they came from, the texts until the
guard takes them (or the next message replaces them), so nothing decrypted outlives the
message that needed it.
"""

from __future__ import annotations

import numpy as np

_ARRAYS: list = []  # [record, {name: array}] of the record decoded last
_TEXTS: dict = {}  # {"key": (id(context), message id), "texts": [...]}


def decoded(record) -> dict[str, np.ndarray]:
    """{name: array} of a Flower ArrayRecord, parsed once while it is the latest record
    asked for (the record itself is kept, so its identity is not reused meanwhile). The
    arrays are shared by the callers of one message: they must not modify them."""
    if _ARRAYS and _ARRAYS[0] is record:
        return _ARRAYS[1]
    arrays = {name: record[name].numpy() for name in record}
    _ARRAYS[:] = [record, arrays]
    return arrays


def _key(msg, ctx) -> tuple[int, str]:
    return id(ctx), str(msg.metadata.message_id)


def hand_texts(msg, ctx, texts: list[str]) -> None:
    """The handler of `msg` read these raw texts of the device (every event's text and its
    notes): the egress guard of the same message takes them instead of reading the store."""
    _TEXTS.clear()
    _TEXTS.update(key=_key(msg, ctx), texts=list(texts))


def forget_texts() -> None:
    """Drop whatever was handed (a message that ends in an error never reaches the scan)."""
    _TEXTS.clear()


def take_texts(msg, ctx) -> list[str] | None:
    """The texts handed for this message, removed; None when none were (read the store)."""
    if _TEXTS.get("key") != _key(msg, ctx):
        _TEXTS.clear()
        return None
    texts = _TEXTS["texts"]
    _TEXTS.clear()
    return texts

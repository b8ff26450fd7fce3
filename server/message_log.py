"""A record of every message the server sent and received, for the privacy audit.

The audit must be able to show what left each device, byte for byte: `RecordingGrid` wraps
any Flower Grid and appends each outgoing instruction and incoming reply, serialised exactly
as Flower's protobuf wire format, to `<run>/messages/messages.log` (length-prefixed frames, a
JSON header then the message bytes). Reading it back needs nothing but this module.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from flwr.app import Message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.grid import Grid

from .delegating_grid import DelegatingGrid

_FRAME = struct.Struct("<II")  # header length, body length
log = logging.getLogger("fedinterest.server")


class RecordingGrid(DelegatingGrid):
    def __init__(self, inner: Grid, path: Path):
        super().__init__(inner)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        _drop_torn_tail(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self._inner.push_messages(messages))
        for m in messages:
            self._write("sent", m)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        for m in replies:
            self._write("received", m)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        for m in messages:
            self._write("sent", m)
        for m in replies:
            self._write("received", m)
        return replies

    # -- the log -------------------------------------------------------------------------
    def _write(self, direction: str, msg: Message) -> None:
        md = msg.metadata
        header = json.dumps({
            "direction": direction, "type": md.message_type, "src": md.src_node_id,
            "dst": md.dst_node_id, "reply_to": md.reply_to_message_id,
            "error": msg.error.reason if msg.has_error() else None}).encode()
        body = message_to_proto(msg).SerializeToString()
        with self._lock:
            self._file.write(_FRAME.pack(len(header), len(body)) + header + body)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _whole_frames_length(path: Path) -> int:
    """Bytes up to the end of the last complete frame (headers only are read: logs are big)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + _FRAME.size <= size:
            f.seek(pos)
            hl, bl = _FRAME.unpack(f.read(_FRAME.size))
            if pos + _FRAME.size + hl + bl > size:
                break
            pos += _FRAME.size + hl + bl
    return pos


def _drop_torn_tail(path: Path) -> None:
    """A server killed mid-append leaves part of a frame; a resumed run appending after it
    would misalign every later frame, so cut the log back to its last whole frame first."""
    if not path.exists():
        return
    whole = _whole_frames_length(path)
    if whole < path.stat().st_size:
        log.warning("%s: dropping %d bytes of a torn last frame (the server was killed while "
                    "writing it)", path, path.stat().st_size - whole)
        os.truncate(path, whole)


def read_log(path: Path) -> Iterator[tuple[dict, bytes]]:
    """(header, raw message bytes) for every frame; a torn last frame (crash) is ignored."""
    data = Path(path).read_bytes()
    pos = 0
    while pos + _FRAME.size <= len(data):
        hl, bl = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + hl + bl
        if end > len(data):
            break
        header = json.loads(data[pos + _FRAME.size:pos + _FRAME.size + hl])
        yield header, data[pos + _FRAME.size + hl:end]
        pos = end


def decode(raw: bytes) -> Message:
    from flwr.proto.message_pb2 import Message as ProtoMessage

    return message_from_proto(ProtoMessage.FromString(raw))

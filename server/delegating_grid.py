"""A Flower Grid that hands every call to the Grid it wraps.

The run loop stacks wrappers over the engine's Grid (windowed_grid.WindowedGrid bounds the
messages in flight, message_log.RecordingGrid records them); each overrides only what it
changes and inherits the rest from here.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.grid import Grid


class DelegatingGrid(Grid):
    def __init__(self, inner: Grid):
        self._inner = inner

    @property
    def delivers_on_push(self) -> bool:
        """Whether replies exist once push_messages returns (simulations/inprocess_grid.py)."""
        return getattr(self._inner, "delivers_on_push", False)

    def set_run(self, run) -> None:
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)

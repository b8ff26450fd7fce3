"""A Grid whose `send_and_receive` keeps at most `window` messages in flight.

Why: Flower 1.42's `InMemoryGrid.send_and_receive` pushes every message at once and then asks
the LinkState about every outstanding message id every 0.1 s (`get_message_res`: expiry,
federation and node checks, ~13 us per id). A query to every device (the hello, the
evaluation of all devices in the last round) has N messages in flight for ~N ticks, so its
driver CPU grows with N^2: at 10,000 in flight one pull costs ~127 ms of every 0.1 s tick
(docs/BENCHMARKS.md, "One tick of the engine"). With a window the pull costs O(window) and
the round O(N). The messages, their replies and the result are unchanged; only when each
instruction is handed to the engine differs. Messages still queued when `timeout` runs out
are never sent (the caller sees no reply for them, as for an unanswered one).

A grid that answers within `push_messages` (simulations/inprocess_grid.py, marked by
`delivers_on_push`) has no reply to wait for after its pull: a message it did not answer
then gets no reply, as its own `send_and_receive` returns, instead of waiting `timeout`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp.grid import Grid

from .delegating_grid import DelegatingGrid

# More than the client slots of any simulation we run (2-32 Ray actors), so the engine never
# waits for the window; small enough that a pull of every id in flight costs ~3 ms.
PUSH_WINDOW = 256


class WindowedGrid(DelegatingGrid):
    """Delegates everything to `inner`; `send_and_receive` pushes at most `window` messages
    ahead of their replies."""

    def __init__(self, inner: Grid, window: int | None = None, pull_interval: float = 0.1):
        window = PUSH_WINDOW if window is None else window
        if window < 1:
            raise ValueError(f"push window must be >= 1, got {window}")
        super().__init__(inner)
        self.window, self.pull_interval = window, pull_interval
        self.max_in_flight = 0  # the most messages that were in flight at once (tests, benches)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        queue, in_flight, replies = list(messages), set(), []
        sent = 0  # queue[:sent] were pushed
        end = None if timeout is None else time.time() + timeout
        while sent < len(queue) or in_flight:
            room = self.window - len(in_flight)
            if room > 0 and sent < len(queue):
                in_flight.update(self._inner.push_messages(queue[sent:sent + room]))
                sent += room
                self.max_in_flight = max(self.max_in_flight, len(in_flight))
            got = list(self._inner.pull_messages(in_flight)) if in_flight else []
            replies.extend(got)
            in_flight.difference_update(m.metadata.reply_to_message_id for m in got)
            if self.delivers_on_push:  # what it did not answer on the push, it never will
                in_flight.clear()
            if end is not None and time.time() >= end:
                break
            if not got and in_flight:
                time.sleep(self.pull_interval)
        return replies

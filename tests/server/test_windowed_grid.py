"""WindowedGrid: at most `window` messages in flight, every message sent once, every reply
returned, and what the wrapped grid costs per pull bounded by the window, not by N."""

from __future__ import annotations

import random

import pytest
from fedinterest.server.windowed_grid import WindowedGrid
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import ConfigRecord, Message, RecordDict


class SlowGrid:
    """A grid whose replies arrive a random number of pulls after the push (like Flower's
    engine), counting what each pull is asked about."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.pending: dict[str, tuple[Message, int]] = {}  # id -> (instruction, pulls left)
        self.pushed: list[int] = []  # destination of every push, in order
        self.ids_per_pull: list[int] = []
        self.n = 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.n += 1
            mid = f"m{self.n}"
            m.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = (m, self.rng.randint(0, 3))
            self.pushed.append(m.metadata.dst_node_id)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        self.ids_per_pull.append(len(ids))
        out = []
        for mid in ids:
            msg, left = self.pending[mid]
            if left == 0:
                del self.pending[mid]
                out.append(Message(RecordDict({"r": ConfigRecord({"dst": msg.metadata
                                                                  .dst_node_id})}),
                                   reply_to=msg))
            else:
                self.pending[mid] = (msg, left - 1)
        return out


def _messages(n: int) -> list[Message]:
    with server_task_identity():
        return [Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=100 + i,
                        message_type="query") for i in range(n)]


@pytest.mark.parametrize("window", [1, 7, 64])
def test_every_message_once_every_reply_and_the_window_holds(window):
    inner = SlowGrid()
    grid = WindowedGrid(inner, window=window, pull_interval=0.0)
    with server_task_identity():
        replies = list(grid.send_and_receive(_messages(150), timeout=None))
    assert sorted(inner.pushed) == [100 + i for i in range(150)]  # each sent exactly once
    assert sorted(r.content.config_records["r"]["dst"] for r in replies) == inner.pushed and \
        len(replies) == 150
    assert grid.max_in_flight == window
    assert max(inner.ids_per_pull) <= window  # a pull asks about O(window) ids, not O(N)


def test_without_a_window_every_pull_asks_about_every_message():
    """The cost the window removes: Flower's own loop keeps all N ids in each pull."""
    inner = SlowGrid()
    grid = WindowedGrid(inner, window=10_000, pull_interval=0.0)
    with server_task_identity():
        grid.send_and_receive(_messages(150), timeout=None)
    assert inner.ids_per_pull[0] == 150


def test_timeout_leaves_queued_messages_unsent():
    class Silent(SlowGrid):
        def pull_messages(self, message_ids):
            return []

    inner = Silent()
    grid = WindowedGrid(inner, window=5, pull_interval=0.01)
    with server_task_identity():
        assert list(grid.send_and_receive(_messages(20), timeout=0.05)) == []
    assert len(inner.pushed) == 5


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="push window"):
        WindowedGrid(SlowGrid(), window=0)


def test_a_grid_that_answers_on_push_is_not_waited_on_for_what_it_left_unanswered():
    """The in-process grid answers inside push_messages; a message it leaves unanswered (a
    node that timed out) gets no reply at once, as that grid's own send_and_receive gives,
    instead of the round waiting out its timeout (an hour in the run loop)."""
    import time

    class AnswersOnPush(SlowGrid):
        delivers_on_push = True

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for mid in ids:  # every message answered now, except the node 103's
                msg, _ = self.pending[mid]
                self.pending[mid] = (msg, 0 if msg.metadata.dst_node_id != 103 else 10**9)
            return ids

    inner = AnswersOnPush()
    grid = WindowedGrid(inner, window=4, pull_interval=0.05)
    t0 = time.time()
    replies = list(grid.send_and_receive(_messages(10), timeout=30))
    assert time.time() - t0 < 5
    assert sorted(m.metadata.src_node_id for m in replies) == [100 + i for i in range(10)
                                                              if i != 3]

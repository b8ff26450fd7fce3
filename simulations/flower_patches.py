"""Index Flower's in-memory LinkState by destination node, so the simulation engine is linear.

Flower 1.42's simulation engine (`vce_api.add_messages_to_queue`) asks the LinkState every
0.1 s, for every registered node, for that node's next instruction; `InMemoryLinkState.
get_message_ins` answers by scanning every stored instruction, delivered or not. With N
instructions in flight that is N x N checks per tick and a round of ~N ticks: the engine's
cost grows as N^2 (docs/BENCHMARKS.md, "Scaling"). `IndexedInMemoryLinkState` keeps the ids of
each node's undelivered instructions, so a poll costs O(1) for a node with nothing waiting and
O(its own instructions) otherwise. `apply()` makes Flower's `LinkStateFactory` build it; it is
written for one Flower version and refuses, with a warning, on any other. The same change as
an upstream patch: docs/flower-patch-linkstate-index.diff.
"""

from __future__ import annotations

import importlib.metadata
import logging

from flwr.app import Message
from flwr.server.superlink.linkstate import in_memory_linkstate, linkstate_factory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

log = logging.getLogger(__name__)

#: the Flower release whose InMemoryLinkState this subclass mirrors (read before changing it)
WRITTEN_FOR_FLWR = "1.42.0"


class IndexedInMemoryLinkState(InMemoryLinkState):
    """`InMemoryLinkState` plus an index of undelivered instructions by destination node.

    Differences a caller can see: none in what `get_message_ins` / `get_message_res` return.
    Upstream's `get_message_ins` also drops expired instructions of *other* nodes as a side
    effect of its scan; here those are dropped when their own node polls or their replies are
    pulled (both paths run `_check_stored_messages` first), so `num_message_ins()` may count
    an expired, never-deliverable instruction a little longer.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # node_id -> message ids in store order (dict as an ordered set); only undelivered ones
        self._pending_by_node: dict[int, dict[str, None]] = {}

    def store_message_ins(self, message: Message) -> str | None:
        """Store as upstream does, then index the stored instruction under its node."""
        with self.lock:
            message_id = super().store_message_ins(message)
            stored = self.message_ins_store.get(message_id) if message_id else None
            if stored is not None and stored.metadata.delivered_at == "":
                node = stored.metadata.dst_node_id
                self._pending_by_node.setdefault(node, {})[message_id] = None
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *,
                        run_id: int | None = None) -> list[Message]:
        """Upstream's answer (same messages, same order) from the node's own index."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        if not self._pending_by_node.get(node_id):  # the common case: nothing waiting
            return []
        found: list[Message] = []
        with self.lock:
            pending = self._pending_by_node.get(node_id, {})
            for msg_id in list(pending):
                self._check_stored_messages({msg_id})
                msg = self.message_ins_store.get(msg_id)
                if msg is None or msg.metadata.delivered_at != "":
                    pending.pop(msg_id, None)  # deleted, expired or delivered elsewhere
                    continue
                if run_id is None or msg.metadata.run_id == run_id:
                    found.append(msg)
                    if limit and len(found) == limit:
                        break
            delivered_at = in_memory_linkstate.now().isoformat()
            for msg in found:
                msg.metadata.delivered_at = delivered_at
                pending.pop(msg.metadata.message_id, None)
            if not pending:
                self._pending_by_node.pop(node_id, None)
        return found

    def delete_messages(self, message_ins_ids: set[str]) -> None:
        """Delete as upstream does and forget the deleted instructions in the index."""
        if not message_ins_ids:
            return
        with self.lock:
            nodes = {m.metadata.dst_node_id for i in message_ins_ids
                     if (m := self.message_ins_store.get(i)) is not None}
            super().delete_messages(message_ins_ids)
            for node in nodes:
                pending = self._pending_by_node.get(node)
                if pending is None:
                    continue
                for msg_id in message_ins_ids & pending.keys():
                    del pending[msg_id]
                if not pending:
                    del self._pending_by_node[node]


def flower_version() -> str:
    """The installed Flower release."""
    return importlib.metadata.version("flwr")


def apply() -> bool:
    """Make Flower's LinkStateFactory build `IndexedInMemoryLinkState` for in-memory state.

    Returns True when the index is in place (also when it already was). On a Flower release
    other than `WRITTEN_FOR_FLWR` it changes nothing, logs a warning and returns False: the
    subclass mirrors that release's private fields and would be wrong silently elsewhere.
    """
    installed = flower_version()
    if installed != WRITTEN_FOR_FLWR:
        log.warning("not indexing Flower's in-memory LinkState: written for flwr %s, found %s;"
                    " the simulation engine's cost grows as N^2 in the number of nodes "
                    "(docs/BENCHMARKS.md, 'Scaling')", WRITTEN_FOR_FLWR, installed)
        return False
    current = linkstate_factory.InMemoryLinkState
    if current is IndexedInMemoryLinkState:
        return True
    if current is not InMemoryLinkState:
        log.warning("not indexing Flower's in-memory LinkState: the factory already builds %s",
                    current.__qualname__)
        return False
    linkstate_factory.InMemoryLinkState = IndexedInMemoryLinkState
    return True


def revert() -> None:
    """Undo `apply()` (tests, and benchmarks that measure the unpatched engine)."""
    if linkstate_factory.InMemoryLinkState is IndexedInMemoryLinkState:
        linkstate_factory.InMemoryLinkState = InMemoryLinkState

"""The driver's cost of one tick of Flower's simulation engine, without Ray or clients.

Every 0.1 s `vce_api.add_messages_to_queue` asks the LinkState for each registered node's
next instruction, and the ServerApp's `InMemoryGrid.send_and_receive` pulls replies for every
message still in flight. This benchmark stores one instruction per node (a round with every
node sampled), delivers them all (the first tick), and times further ticks in the steady
state of a round (all delivered, no reply yet): the engine's poll over every node and the
grid's pull, each in CPU seconds, for Flower's own LinkState and the indexed one
(simulations/flower_patches.py). A round lasts a number of ticks that grows with N, so a
per-tick cost that grows with N makes the round super-linear.
"""

from __future__ import annotations

import secrets
import time

from fedinterest.simulations.bench.common import BenchResult
from fedinterest.simulations.inprocess_grid import server_task_identity


def _state(cls, n: int):
    """A LinkState of class `cls` with a run and `n` nodes, registered as Flower's
    run_simulation and vce_api._register_nodes do."""
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager

    state = cls(NoOpFederationManager(), ObjectStoreFactory().store())
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 2, NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[2] = Task(task_id=2, run_id=1)
    nodes = []
    for _ in range(n):
        node = state.create_node("aid", "name", secrets.token_bytes(32), heartbeat_interval=1e9)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=1e9)
        nodes.append(node)
    return state, nodes


def tick_seconds(cls, n: int, ticks: int = 3) -> dict[str, float]:
    """CPU seconds of one engine poll over `n` nodes and of one grid pull of `n` messages in
    flight, median over `ticks` ticks, after one tick has delivered every instruction."""
    import uuid

    from flwr.app import Message, RecordDict

    state, nodes = _state(cls, n)
    with server_task_identity():
        ids = []
        for node in nodes:
            msg = Message(RecordDict(), dst_node_id=node, message_type="train", ttl=3600)
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_run_id"] = 1
            ids.append(state.store_message_ins(msg))
    for node in nodes:  # the first tick hands every instruction out
        state.get_message_ins(node_id=node, limit=1)
    poll, pull = [], []
    for _ in range(ticks):
        t = time.process_time()
        for node in nodes:
            state.get_message_ins(node_id=node, limit=1)
        poll.append(time.process_time() - t)
        t = time.process_time()
        state.get_message_res(message_ids=set(ids), run_id=1)
        pull.append(time.process_time() - t)
    return {"engine_poll_s": sorted(poll)[len(poll) // 2],
            "grid_pull_s": sorted(pull)[len(pull) // 2]}


def run(sizes=(100, 500, 2000, 10000), unindexed_up_to: int = 2000, ticks: int = 3,
        command: str = "") -> BenchResult:
    """Per-tick CPU for each size, both LinkStates (Flower's own only up to
    `unindexed_up_to`: its tick grows as N^2 and takes minutes beyond)."""
    from fedinterest.simulations.flower_patches import IndexedInMemoryLinkState
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    result = BenchResult("engine-tick", "CPU of one tick of Flower 1.42's simulation engine in "
                         "a round's steady state (one delivered instruction per node, no reply "
                         "yet): the engine's poll over every node and the grid's pull of every "
                         "message in flight; Flower's own LinkState vs indexed by node",
                         command, "", "")
    rows: dict[str, dict[int, dict]] = {"unindexed": {}, "indexed": {}}
    for n in sizes:
        if n <= unindexed_up_to:
            rows["unindexed"][n] = tick_seconds(InMemoryLinkState, n, ticks)
        rows["indexed"][n] = tick_seconds(IndexedInMemoryLinkState, n, ticks)
    result.data = {"sizes": list(sizes), "ticks": ticks, "per_state": rows}
    result.summary = "; ".join(
        f"{arm}: " + ", ".join(f"N={n} poll {1e3 * r['engine_poll_s']:.1f} ms, pull "
                               f"{1e3 * r['grid_pull_s']:.1f} ms" for n, r in per.items())
        for arm, per in rows.items())
    both = [n for n in sizes if n in rows["unindexed"]]
    result.ratio = "engine poll unindexed/indexed " + ", ".join(
        f"N={n}: {rows['unindexed'][n]['engine_poll_s'] / max(rows['indexed'][n]['engine_poll_s'], 1e-9):.0f}x"
        for n in both)
    return result.finish()

"""The indexed LinkState answers exactly as Flower's own for random store/get/reply/delete runs."""

from __future__ import annotations

import importlib.util
import logging
import random
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fedinterest.simulations import flower_patches
from fedinterest.simulations.flower_patches import IndexedInMemoryLinkState
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import (
    LinkStateFactory,
    in_memory_linkstate,
    linkstate_factory,
)
from flwr.server.superlink.linkstate.in_memory_linkstate import (
    InMemoryLinkState,
    RunRecord,
)
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager

RUN_ID, TASK_ID, N_NODES = 7, 11, 6
CLOCK_USERS = ("flwr.app.message.message", "flwr.server.superlink.linkstate.utils",
               "flwr.server.superlink.linkstate.in_memory_linkstate",
               "flwr.server.utils.validator", "flwr.supercore.corestate.in_memory_corestate")


UPSTREAM_DIFF = Path(__file__).parents[2] / "docs" / "flower-patch-linkstate-index.diff"


def _upstream_patched_module(tmp_path: Path):
    """Flower's installed in_memory_linkstate.py with docs/flower-patch-linkstate-index.diff
    applied, imported as a sibling module (its relative imports resolve to the real package)."""
    if shutil.which("patch") is None:
        pytest.skip("the `patch` program is not installed")
    target = tmp_path / "in_memory_linkstate.py"
    shutil.copy(in_memory_linkstate.__file__, target)
    subprocess.run(["patch", "-s", str(target), str(UPSTREAM_DIFF)], check=True)
    name = "flwr.server.superlink.linkstate._in_memory_linkstate_upstream_patch"
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["subclass", "upstream-diff"])
def candidate(request, tmp_path, monkeypatch):
    """The class under test: our subclass, or Flower's class with the upstream diff applied."""
    if request.param == "subclass":
        return IndexedInMemoryLinkState
    module = _upstream_patched_module(tmp_path)
    monkeypatch.setattr(module, "now", lambda: in_memory_linkstate.now())  # the test clock
    return module.InMemoryLinkState


@pytest.fixture
def clock(monkeypatch):
    """A clock the test advances, so instructions expire when the sequence says so."""
    t = {"now": 1.8e9}
    for module in CLOCK_USERS:
        monkeypatch.setattr(f"{module}.now", lambda: datetime.fromtimestamp(t["now"], UTC))
    with server_task_identity():  # Flower stamps new Messages with the process's identity
        yield t


def _state(cls) -> tuple[InMemoryLinkState, list[int]]:
    """A state of class `cls` with one run and N_NODES nodes, registered as run_simulation does."""
    state = cls(NoOpFederationManager(), ObjectStoreFactory().store())
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id = TASK_ID
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    nodes = []
    for _ in range(N_NODES):
        node = state.create_node("aid", "name", uuid.uuid4().bytes * 2, heartbeat_interval=1e9)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=1e9)
        nodes.append(node)
    return state, nodes


def _instruction(node: int, msg_id: str, ttl: float) -> Message:
    msg = Message(RecordDict(), dst_node_id=node, message_type="train", ttl=ttl)
    msg.metadata.__dict__["_message_id"] = msg_id
    msg.metadata.__dict__["_run_id"] = RUN_ID
    msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    return msg


def _reply(ins: Message, msg_id: str) -> Message:
    reply = Message(RecordDict(), reply_to=ins)
    reply.metadata.__dict__["_message_id"] = msg_id
    return reply


def _answer(messages: list[Message]) -> list[tuple]:
    """What a caller sees of returned messages: ids, whom they answer, error codes."""
    return sorted((m.metadata.reply_to_message_id or m.metadata.message_id,
                   m.error.code if m.has_error() else None) for m in messages)


def _run_sequence(candidate, seed: int, clock: dict, steps: int = 400) -> None:
    rng = random.Random(seed)
    (ref, ref_nodes), (idx, idx_nodes) = _state(InMemoryLinkState), _state(candidate)
    ids: list[str] = []
    delivered: dict[str, tuple[Message, Message]] = {}  # id -> (ref copy, idx copy)
    for step in range(steps):
        op = rng.choice(["store"] * 4 + ["get"] * 4 + ["reply", "pull", "delete", "tick"])
        if op == "store":
            k, msg_id, ttl = rng.randrange(N_NODES), str(uuid.uuid4()), rng.choice([5, 50, 3600])
            a = ref.store_message_ins(_instruction(ref_nodes[k], msg_id, ttl))
            b = idx.store_message_ins(_instruction(idx_nodes[k], msg_id, ttl))
            assert a == b, step
            ids.append(msg_id)
        elif op == "get":
            k, limit = rng.randrange(N_NODES), rng.choice([1, 1, 2, None])
            run_id = rng.choice([None, None, RUN_ID, RUN_ID + 1])
            got_a = ref.get_message_ins(ref_nodes[k], limit=limit, run_id=run_id)
            got_b = idx.get_message_ins(idx_nodes[k], limit=limit, run_id=run_id)
            assert [m.metadata.message_id for m in got_a] == \
                [m.metadata.message_id for m in got_b], step
            for a, b in zip(got_a, got_b):
                delivered[a.metadata.message_id] = (a, b)
        elif op == "reply" and delivered:
            a, b = delivered.pop(rng.choice(sorted(delivered)))
            reply_id = str(uuid.uuid4())
            assert (ref.store_message_res(_reply(a, reply_id)) is None) == \
                (idx.store_message_res(_reply(b, reply_id)) is None), step
        elif op == "pull" and ids:
            asked = set(rng.sample(ids, min(len(ids), rng.randint(1, 4))))
            pulled_a = ref.get_message_res(set(asked), RUN_ID)
            pulled_b = idx.get_message_res(set(asked), RUN_ID)
            assert _answer(pulled_a) == _answer(pulled_b), step
            done = {m.metadata.reply_to_message_id for m in pulled_a}
            ref.delete_messages(set(done))
            idx.delete_messages(set(done))
        elif op == "delete" and ids:
            gone = set(rng.sample(ids, min(len(ids), 2)))
            ref.delete_messages(set(gone))
            idx.delete_messages(set(gone))
        elif op == "tick":
            clock["now"] += rng.choice([1, 10, 30])
    for k in range(N_NODES):  # whatever is left waiting comes out the same
        assert _answer(ref.get_message_ins(ref_nodes[k], limit=None)) == \
            _answer(idx.get_message_ins(idx_nodes[k], limit=None))


@pytest.mark.parametrize("seed", range(6))
def test_indexed_state_answers_as_flowers_own(clock, candidate, seed):
    _run_sequence(candidate, seed, clock)


def _factory_state():
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                            ObjectStoreFactory()).state()


def test_apply_makes_the_simulation_factory_build_the_indexed_state():
    try:
        assert flower_patches.apply() is True
        assert flower_patches.apply() is True  # idempotent
        assert type(_factory_state()) is IndexedInMemoryLinkState
    finally:
        flower_patches.revert()
    assert type(_factory_state()) is InMemoryLinkState


def test_apply_refuses_on_another_flower_version(monkeypatch, caplog):
    monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.43.0")
    with caplog.at_level(logging.WARNING, logger=flower_patches.__name__):
        assert flower_patches.apply() is False
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState
    assert "written for flwr 1.42.0, found 1.43.0" in caplog.text

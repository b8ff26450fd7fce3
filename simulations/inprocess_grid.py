"""A Flower Grid that delivers each message to a ClientApp in this thread, through the same
protobuf round trip as the wire, with per-node contexts. Runs the real ServerApp loop and the
real ClientApp without Ray: federation tests take seconds and are deterministic, and the
benchmarks measure our code without the simulation engine (fedinterest bench simulation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def server_task_identity() -> Iterator[None]:
    """Flower stamps new Messages with the process's task identity, which its ServerApp
    runtime sets (flwr/server/compat/app.py); set it the same way and put back what was there."""
    saved = {k: vars(TaskIdentity)[k] for k in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(TaskIdentity, key, value)


def wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
    # replies exist once push_messages returns: nothing later answers an unanswered message
    delivers_on_push = True

    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict],
                 fault: Callable[[Message], Exception | None] | None = None,
                 keep_replies: bool = True):
        self._app = client_app
        self._run = Run.create_empty(run_id=1)
        self._contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(cfg),
                                       state=RecordDict(), run_config={})
                          for nid, cfg in node_configs.items()}
        self._replies: dict[str, Message] = {}
        self.fault = fault  # returns an exception to raise instead of running the app
        self.keep_replies = keep_replies  # off in benchmarks: thousands of client-rounds
        self.received: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self._replies[msg.metadata.message_id] = self._deliver(wire(msg))
        return ids

    def _deliver(self, msg: Message) -> Message:
        ctx = self._contexts[msg.metadata.dst_node_id]
        err = self.fault(msg) if self.fault else None
        try:
            if err is not None:
                raise err
            reply = self._app(message=msg, context=ctx)
        except Exception as ex:  # Flower's runtime turns a raise into an error reply  # noqa: BLE001
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(ex).__name__}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        reply = wire(reply)
        if self.keep_replies:
            self.received.append(reply)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return list(self.pull_messages(self.push_messages(messages)))


def run_in_process(cfg, catalog_path, devices_dir, n_devices: int, client_app=None,
                   resume: bool = False, on_round=None):
    """The real ServerApp loop (server_app.run_server) over an InProcessGrid of `n_devices`
    nodes, partition i on node 1000 + 7919 (i + 1); returns the Federation. Evaluation
    metrics are read from the devices' own reports (client/evaluation_report.py)."""
    from fedinterest.server.server_app import run_server
    from fedinterest.simulations.simulate import evaluation_reader

    if client_app is None:
        from fedinterest.client.client_app import app as client_app
    nodes = {1000 + 7919 * (i + 1): {"partition-id": i} for i in range(n_devices)}
    with server_task_identity():
        return run_server(InProcessGrid(client_app, nodes, keep_replies=False), cfg,
                          catalog_path, devices_dir, resume, on_round,
                          evaluation_reader(devices_dir, n_devices))

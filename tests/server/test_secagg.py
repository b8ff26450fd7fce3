"""Hardened SecAgg+: the mask generator, the device mod and the server workflow.

Rounds run in this process through `LoopbackGrid`, a Grid that hands each message to the
ClientApp of its node after a protobuf round trip (as on the wire) and keeps each node's Context
serialized between calls (as a SuperNode does). The server side is Flower's own
LegacyContext + DefaultWorkflow(fit_workflow=HardenedSecAggPlusWorkflow(...)) with FedAvg; no Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from uuid import uuid4

import numpy as np
import pytest
from fedinterest.client.secagg import hardened_secaggplus_mod
from fedinterest.server.secagg import HardenedSecAggPlusWorkflow
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.secure_prg import (
    KNOWN_IMPORT_SITES,
    PRG_CONFIG_KEY,
    PRG_ID,
    flower_pseudo_rand_gen,
    mask_generator_is_hardened,
    pseudo_rand_gen,
)
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity, wire
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Parameters,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
)
from flwr.compat.common.recorddict_compat import (
    arrayrecord_to_parameters,
    parameters_to_arrayrecord,
)
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

SHAPES = [(4, 3), (5,), (1,)]  # a tiny "model"
CLIP = 8.0  # Flower's default clipping range, quantization range 2**22, modulus 2**32
QRANGE, MOD = 2**22, 2**32
MAX_WEIGHT = 1000.0


# --------------------------------------------------------------------------- in-process grid


@pytest.fixture(autouse=True)
def _server_task_identity():
    with server_task_identity():
        yield


class LoopbackGrid(InProcessGrid):
    """The in-process grid, with what these tests look at: each node's context survives a
    protobuf round trip between messages (as on a SuperNode), every instruction and reply is
    kept with its SecAgg+ stage, and an error reply keeps the exception's message."""

    def __init__(self, client_app: ClientApp, node_ids: list[int]) -> None:
        super().__init__(client_app, {nid: {} for nid in node_ids})
        self._contexts = {nid: context_to_proto(ctx).SerializeToString()
                          for nid, ctx in self._contexts.items()}
        self._stage_of: dict[str, str | None] = {}
        self.sent: list[Message] = []  # every instruction, as the node received it

    def _deliver(self, msg: Message) -> Message:
        self.sent.append(msg)
        # Read the stage now: Flower's mod pops it from the message it handles.
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        self._stage_of[msg.metadata.message_id] = configs.get(Key.STAGE) if configs else None
        nid = msg.metadata.dst_node_id
        context = context_from_proto(self._context_proto(nid))
        try:
            reply = self._app(message=msg, context=context)
            self._contexts[nid] = context_to_proto(context).SerializeToString()
        except Exception as ex:  # Flower's runtime turns a raise into an error reply  # noqa: BLE001
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        reply = wire(reply)
        self.received.append(reply)
        return reply

    def _context_proto(self, nid: int):
        empty = context_to_proto(Context(1, nid, {}, RecordDict(), {}))
        return type(empty).FromString(self._contexts[nid])

    def node_state(self, nid: int) -> RecordDict:
        return context_from_proto(self._context_proto(nid)).state

    def replies_at(self, stage: str) -> list[Message]:
        """Replies to instructions of one SecAgg+ stage, in order."""
        return [r for r in self.received if self._stage_of[r.metadata.reply_to_message_id] == stage]


# --------------------------------------------------------------------------- the federation


def _updates(node_ids: list[int], shapes: list[tuple[int, ...]], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {nid: [rng.uniform(-2, 2, size=s) for s in shapes] for nid in node_ids}


class _FixedClient(NumPyClient):
    def __init__(self, update: list[np.ndarray], num_examples: int) -> None:
        self.update, self.num_examples = update, num_examples

    def fit(self, parameters, config):
        return [a.copy() for a in self.update], self.num_examples, {}


def _dropout_mod(drops: dict[str, set[int]]):
    """A mod that makes chosen nodes fail at a chosen SecAgg+ stage (a device that drops)."""

    def mod(msg: Message, ctxt: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        stage = configs.get(Key.STAGE) if configs is not None else None
        if ctxt.node_id in drops.get(stage, set()):
            raise ConnectionError(f"node {ctxt.node_id} dropped at {stage}")
        return call_next(msg, ctxt)

    return mod


class _RecordingFedAvg(FedAvg):
    def __init__(self, initial: list[np.ndarray], n: int) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(initial),
        )
        self.aggregates: list[list[np.ndarray]] = []

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        if out[0] is not None:
            self.aggregates.append(parameters_to_ndarrays(out[0]))
        return out


class Federation:
    """n devices with fixed updates and weights, and a server running one hardened round."""

    def __init__(
        self,
        n: int = 5,
        shapes: list[tuple[int, ...]] = SHAPES,
        drops: dict[str, set[int]] | None = None,
        device_mod=hardened_secaggplus_mod,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.node_ids = [int(x) for x in rng.choice(2**62, size=n, replace=False)]
        self.updates = _updates(self.node_ids, shapes, seed)
        self.weights = {nid: int(w) for nid, w in zip(self.node_ids, rng.integers(5, 60, n))}
        self.drops = {stage: set(nids) for stage, nids in (drops or {}).items()}
        self.initial = [np.zeros(s) for s in shapes]

        def client_fn(context: Context):
            nid = context.node_id
            return _FixedClient(self.updates[nid], self.weights[nid]).to_client()

        self.app = ClientApp(client_fn=client_fn, mods=[_dropout_mod(self.drops), device_mod])
        self.grid = LoopbackGrid(self.app, self.node_ids)
        self.strategy = _RecordingFedAvg(self.initial, n)

    def legacy_context(self) -> LegacyContext:
        ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        return LegacyContext(ctx, config=ServerConfig(num_rounds=1), strategy=self.strategy)

    def run_round(self, workflow: HardenedSecAggPlusWorkflow) -> LegacyContext:
        context = self.legacy_context()
        DefaultWorkflow(fit_workflow=workflow)(self.grid, context)
        return context

    def prepared_context(self) -> LegacyContext:
        """A LegacyContext ready for a fit round, for driving the workflow stage by stage."""
        context = self.legacy_context()
        for nid in self.node_ids:
            context.client_manager.register(GridClientProxy(nid, self.grid, run_id=1))
        context.state.array_records[MAIN_PARAMS_RECORD] = ndarrays_to_arrayrecord(self.initial)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: 1}
        )
        return context

    def expected_mean(self, survivors: Iterable[int]) -> tuple[list[np.ndarray], float]:
        """Weighted mean of survivors' updates with Flower's quantised weights, and its bound.

        Flower rounds each weight to q_i = round(w_i / max_weight * Q) and stochastically
        rounds each weighted coordinate to a grid of step 2C/Q: per device the error is below
        one step, so the mean is off by less than n * (2C/Q) / (sum q_i / Q).
        """
        survivors = list(survivors)
        q = {nid: round(self.weights[nid] / MAX_WEIGHT * QRANGE) for nid in survivors}
        total = sum(q.values())
        mean = [
            sum(q[nid] * self.updates[nid][i] for nid in survivors) / total
            for i in range(len(self.initial))
        ]
        bound = len(survivors) * (2 * CLIP / QRANGE) / (total / QRANGE)
        return mean, bound


def ndarrays_to_arrayrecord(arrays: list[np.ndarray]) -> ArrayRecord:
    return parameters_to_arrayrecord(ndarrays_to_parameters(arrays), keep_input=True)


def _workflow(**kw) -> HardenedSecAggPlusWorkflow:
    return HardenedSecAggPlusWorkflow(
        num_shares=kw.pop("num_shares", 5),
        reconstruction_threshold=kw.pop("threshold", 3),
        max_weight=MAX_WEIGHT,
        **kw,
    )


# --------------------------------------------------------------------------- the generator


def test_prg_keeps_flowers_output_contract() -> None:
    shapes = [*SHAPES, (), (0,)]
    for num_range in (MOD, 1000003):
        ours = pseudo_rand_gen(bytes(range(32)), num_range, shapes)
        theirs = flower_pseudo_rand_gen(bytes(range(32)), num_range, shapes)
        assert [(a.shape, a.dtype) for a in ours] == [(a.shape, a.dtype) for a in theirs]
        assert all(a.dtype == np.int64 and np.all((a >= 0) & (a < num_range)) for a in ours)


def test_prg_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    seed = bytes(range(32))
    first, again = pseudo_rand_gen(seed, MOD, [(1000,)]), pseudo_rand_gen(seed, MOD, [(1000,)])
    np.testing.assert_array_equal(first[0], again[0])
    other = pseudo_rand_gen(seed[:-1] + b"\x00", MOD, [(1000,)])
    assert np.mean(first[0] == other[0]) < 0.01
    # Splitting one request into several arrays draws consecutive keystream, never a repeat.
    parts = pseudo_rand_gen(seed, MOD, [(500,), (500,)])
    np.testing.assert_array_equal(np.concatenate(parts), first[0])


def test_seeds_that_flower_folds_together_give_different_masks() -> None:
    """Flower XOR-folds a seed to 32 bits: swapping two 4-byte words changes nothing for it."""
    a = bytes(np.random.default_rng(1).integers(0, 256, 32, dtype=np.uint8))
    b = a[4:8] + a[0:4] + a[8:]
    c = bytes(x ^ 0xFF for x in a[:8]) + a[8:]  # flips the same bits in two words
    assert a != b and a != c
    for twin in (b, c):
        np.testing.assert_array_equal(  # the weakness: distinct secrets, identical masks
            flower_pseudo_rand_gen(a, MOD, [(64,)])[0],
            flower_pseudo_rand_gen(twin, MOD, [(64,)])[0],
        )
        assert (
            np.mean(pseudo_rand_gen(a, MOD, [(64,)])[0] == pseudo_rand_gen(twin, MOD, [(64,)])[0])
            < 0.1
        )


def test_prg_is_uniform_including_the_top_value() -> None:
    """Exact reduction: every residue equally likely, including num_range - 1, which Flower's
    randint(0, num_range - 1) never draws."""
    draws = pseudo_rand_gen(b"u" * 32, 3, [(30000,)])[0]
    counts = np.bincount(draws, minlength=3)
    assert counts.sum() == 30000 and np.all(np.abs(counts - 10000) < 600)  # ~7 sigma
    assert 2 not in flower_pseudo_rand_gen(b"u" * 32, 3, [(30000,)])[0]
    power_of_two = np.bincount(pseudo_rand_gen(b"w" * 32, 8, [(40000,)])[0], minlength=8)
    assert power_of_two.size == 8 and np.all(np.abs(power_of_two - 5000) < 500)
    big = pseudo_rand_gen(b"v" * 32, 10**9 + 7, [(40000,)])[0]
    counts = np.bincount((big * 8) // (10**9 + 7), minlength=8)
    assert np.all(np.abs(counts - 5000) < 500)


def test_prg_rejects_weak_input() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pseudo_rand_gen(b"short", MOD, [(3,)])
    with pytest.raises(ValueError, match="num_range"):
        pseudo_rand_gen(b"k" * 32, 1, [(3,)])


def test_every_flower_import_site_uses_ours_in_this_process() -> None:
    assert mask_generator_is_hardened()
    for name in KNOWN_IMPORT_SITES:
        assert vars(sys.modules[name])["pseudo_rand_gen"] is pseudo_rand_gen


def test_importing_the_device_mod_hardens_a_fresh_process_and_every_binding() -> None:
    script = textwrap.dedent(
        """
        import sys, types
        from flwr.common.secure_aggregation import secaggplus_utils as utils
        import flwr.client.mod.secure_aggregation.secaggplus_mod
        mod = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]  # not the function
        alias = types.ModuleType("someone_elses_module")
        alias.prg = utils.pseudo_rand_gen  # bound under another name before we load
        sys.modules[alias.__name__] = alias
        from fedinterest.shared.secure_prg import mask_generator_is_hardened, pseudo_rand_gen
        assert not mask_generator_is_hardened()
        import fedinterest.client.secagg  # noqa: F401  (installs at import)
        assert mask_generator_is_hardened()
        assert alias.prg is pseudo_rand_gen and mod.pseudo_rand_gen is pseudo_rand_gen
        import importlib
        importlib.reload(utils)  # a reload brings Flower's generator back ...
        assert not mask_generator_is_hardened()
        fedinterest.client.secagg.install()  # ... and the next install removes it again
        assert mask_generator_is_hardened()
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------- full rounds


@pytest.mark.parametrize(
    "drops",
    [
        {},
        {Stage.COLLECT_MASKED_VECTORS: 2},  # n - t devices never send a masked vector
        {Stage.COLLECT_MASKED_VECTORS: 1, Stage.UNMASK: 1},  # one more vanishes at unmask
        {Stage.SETUP: 1, Stage.SHARE_KEYS: 1},  # before sharing keys: fails Flower's workflow
        {Stage.SHARE_KEYS: 1, Stage.UNMASK: 1},
    ],
    ids=[
        "no-dropout",
        "2-before-upload",
        "1-before-upload-1-at-unmask",
        "1-at-setup-1-at-share-keys",
        "1-at-share-keys-1-at-unmask",
    ],
)
def test_aggregate_equals_plain_weighted_mean_with_dropouts(drops: dict[str, int]) -> None:
    fed = Federation(n=5, seed=3)
    order = iter(fed.node_ids)
    for stage, count in drops.items():
        fed.drops[stage] = {next(order) for _ in range(count)}
    fed.run_round(_workflow(num_shares=5, threshold=3))

    assert len(fed.strategy.aggregates) == 1, "the round must produce one aggregate"
    before_upload = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS)
    gone = set().union(*(fed.drops.get(stage, set()) for stage in before_upload))
    survivors = [n for n in fed.node_ids if n not in gone]
    expected, bound = fed.expected_mean(survivors)
    for got, want in zip(fed.strategy.aggregates[0], expected, strict=True):
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= bound, (np.max(np.abs(got - want)), bound)
    # The bound is tight enough to mean something: updates are spread over [-2, 2].
    assert bound < 1e-3


def test_more_dropouts_than_allowed_releases_nothing() -> None:
    fed = Federation(n=5, seed=4)
    fed.drops[Stage.COLLECT_MASKED_VECTORS] = set(fed.node_ids[:3])  # n - t + 1
    context = fed.run_round(_workflow(num_shares=5, threshold=3))

    assert fed.strategy.aggregates == []
    assert (
        len([r for r in fed.grid.replies_at(Stage.COLLECT_MASKED_VECTORS) if not r.has_error()])
        == 2
    )
    assert fed.grid.replies_at(Stage.UNMASK) == []  # no unmask request, so no share left a device
    final = parameters_to_ndarrays(ndarrays_params(context.state.array_records[MAIN_PARAMS_RECORD]))
    assert all(np.all(a == 0) for a in final)  # the global model did not move


def ndarrays_params(record: ArrayRecord) -> Parameters:
    return arrayrecord_to_parameters(record, keep_input=True)


def test_servers_view_of_one_update_is_uniform_and_uncorrelated_with_it() -> None:
    size = 20000
    fed = Federation(n=3, shapes=[(size,)], seed=5)
    target = fed.node_ids[0]
    fed.updates[target] = [np.linspace(-2.0, 2.0, size)]  # maximally structured
    fed.run_round(_workflow(num_shares=3, threshold=2))
    assert len(fed.strategy.aggregates) == 1

    (reply,) = [
        r
        for r in fed.grid.replies_at(Stage.COLLECT_MASKED_VECTORS)
        if r.metadata.src_node_id == target
    ]
    blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    masked = [bytes_to_ndarray(b) for b in blobs]
    assert [a.shape for a in masked] == [(1,), (size,)]  # weight factor + the update
    seen = masked[1].astype(np.float64)
    assert abs(np.corrcoef(seen, fed.updates[target][0])[0, 1]) < 0.05  # |r| sd ~ 0.007
    counts = np.bincount((masked[1] // (MOD // 16)).astype(np.int64), minlength=16)
    assert counts.size == 16 and np.all(np.abs(counts - size / 16) < 250)  # ~7 sigma
    # Without masks the same vector is the quantised update: perfectly correlated.
    quantised = np.clip(fed.updates[target][0], -CLIP, CLIP) + CLIP
    assert np.corrcoef(quantised, fed.updates[target][0])[0, 1] > 0.99


# --------------------------------------------------------------------------- refusals


def _run_to_unmask(
    fed: Federation,
) -> tuple[HardenedSecAggPlusWorkflow, LegacyContext, WorkflowState]:
    workflow, context, state = (
        _workflow(num_shares=5, threshold=3),
        fed.prepared_context(),
        WorkflowState(),
    )
    for stage in (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
    ):
        assert stage(fed.grid, context, state)
    return workflow, context, state


def _unmask_request(nid: int, active: list[int], dead: list[int]) -> Message:
    cfg = ConfigRecord(
        {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
    )
    return Message(
        RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=nid, message_type="train", group_id="1"
    )


def test_unmask_with_a_node_both_active_and_dropped_is_refused() -> None:
    fed = Federation(n=5, seed=6)
    _run_to_unmask(fed)
    victim = fed.node_ids[0]
    everyone = list(fed.node_ids)
    replies = fed.grid.send_and_receive(
        [_unmask_request(nid, everyone, [victim]) for nid in fed.node_ids[1:]]
    )
    assert len(replies) == 4
    for reply in replies:
        assert reply.has_error() and not reply.has_content()
        assert "both" in reply.error.reason and str(victim) in reply.error.reason
        # The round's secrets are gone, so asking again (honestly or not) gets nothing either.
        assert (
            dict(fed.grid.node_state(reply.metadata.src_node_id).config_records[RECORD_KEY_STATE])
            == {}
        )
    retry = fed.grid.send_and_receive(
        [_unmask_request(nid, everyone, []) for nid in fed.node_ids[1:]]
    )
    assert all(r.has_error() and "expect setup stage" in r.error.reason for r in retry)


def test_honest_unmask_request_to_the_same_devices_is_answered() -> None:
    """Control for the refusal test: the same harness, without the overlap, releases shares."""
    fed = Federation(n=5, seed=6)
    _run_to_unmask(fed)
    replies = fed.grid.send_and_receive(
        [_unmask_request(nid, list(fed.node_ids), []) for nid in fed.node_ids]
    )
    assert all(not r.has_error() for r in replies)
    assert all(
        len(r.content.config_records[RECORD_KEY_CONFIGS][Key.SHARE_LIST]) == 5 for r in replies
    )


def test_device_on_flowers_mod_is_caught_at_setup() -> None:
    fed = Federation(n=4, seed=7, device_mod=secaggplus_mod)  # no PRG echo
    fed.run_round(_workflow(num_shares=4, threshold=3))
    assert fed.strategy.aggregates == []
    assert len(fed.grid.replies_at(Stage.SETUP)) == 4  # they answered setup, without the echo
    assert fed.grid.replies_at(Stage.SHARE_KEYS) == []  # halted right after setup


def test_device_refuses_a_server_without_the_hardened_generator() -> None:
    fed = Federation(n=3, seed=8)
    setup = ConfigRecord(
        {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: 3,
            Key.SHARE_NUMBER: 3,
            Key.THRESHOLD: 2,
            Key.CLIPPING_RANGE: CLIP,
            Key.TARGET_RANGE: QRANGE,
            Key.MOD_RANGE: MOD,
            Key.MAX_WEIGHT: MAX_WEIGHT,
        }
    )
    msg = Message(
        RecordDict({RECORD_KEY_CONFIGS: setup}),
        dst_node_id=fed.node_ids[0],
        message_type="train",
        group_id="1",
    )
    (reply,) = fed.grid.send_and_receive([msg])
    assert reply.has_error() and "mask generator" in reply.error.reason
    # Announcing the generator is not enough with a threshold that is no strict majority.
    setup[PRG_CONFIG_KEY], setup[Key.THRESHOLD], setup[Key.SHARE_NUMBER] = PRG_ID, 2, 4
    (reply,) = fed.grid.send_and_receive([_fresh(msg)])
    assert reply.has_error() and "strict majority" in reply.error.reason
    setup[Key.THRESHOLD] = 3  # control: a majority threshold is accepted
    (reply,) = fed.grid.send_and_receive([_fresh(msg)])
    assert not reply.has_error()
    assert reply.content.config_records[RECORD_KEY_CONFIGS][PRG_CONFIG_KEY] == PRG_ID


def _fresh(msg: Message) -> Message:
    return Message(
        msg.content,
        dst_node_id=msg.metadata.dst_node_id,
        message_type=msg.metadata.message_type,
        group_id=msg.metadata.group_id,
    )


def test_minority_threshold_is_refused_on_both_sides() -> None:
    with pytest.raises(ConfigError, match="strict majority"):
        _workflow(num_shares=5, threshold=2)
    with pytest.raises(ConfigError, match="> 0.5"):
        HardenedSecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5)
    # A fraction that rounds to a minority for this round's sample size: halted before sending.
    fed = Federation(n=4, seed=9)
    fed.run_round(HardenedSecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.6))
    assert fed.strategy.aggregates == [] and fed.grid.sent == []  # not even SETUP went out


def test_scalar_model_arrays_are_refused_not_misaggregated() -> None:
    """Flower 1.42 loses the offset and weighting of 0-d arrays in its unmask stage."""
    fed = Federation(n=3, shapes=[(2,), ()], seed=10)
    with pytest.raises(ConfigError, match="0-d"):
        fed.run_round(_workflow(num_shares=3, threshold=2))
    assert fed.grid.sent == []


# --------------------------------------------------------------------------- Flower's simulation

_RAY_ROUND = """
import json

import numpy as np
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedinterest.client.secagg import hardened_secaggplus_mod, mask_generator_is_hardened
from fedinterest.server.secagg import HardenedSecAggPlusWorkflow


class Device(NumPyClient):
    def __init__(self, pid):
        self.pid = pid

    def fit(self, parameters, config):  # update = partition id, weight = 10 + partition id
        audit = int(mask_generator_is_hardened())  # evaluated inside the Ray actor process
        return [np.full((3,), float(self.pid))], 10 + self.pid, {"hardened": audit}


client_app = ClientApp(
    client_fn=lambda context: Device(int(context.node_config["partition-id"])).to_client(),
    mods=[hardened_secaggplus_mod],
)
seen = {}


class Recording(FedAvg):
    def aggregate_fit(self, server_round, results, failures):
        seen["hardened"] = [res.metrics["hardened"] for _, res in results]
        out = super().aggregate_fit(server_round, results, failures)
        seen["aggregate"] = parameters_to_ndarrays(out[0])[0]
        return out


server_app = ServerApp()


@server_app.main()
def main(grid, context):
    strategy = Recording(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=3, min_available_clients=3,
        initial_parameters=ndarrays_to_parameters([np.zeros(3)]),
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=HardenedSecAggPlusWorkflow(3, 2))(grid, legacy)


run_simulation(
    server_app, client_app, num_supernodes=3,
    backend_config={"client_resources": {"num_cpus": 1},
                    "init_args": {"num_cpus": 2, "include_dashboard": False}},
)
assert mask_generator_is_hardened()  # the server process
print("RESULT", json.dumps({"hardened": seen["hardened"],
                            "aggregate": [float(x) for x in seen["aggregate"]]}))
"""


@pytest.mark.slow
def test_round_under_flowers_ray_simulation_engine(tmp_path) -> None:
    """The same round through `flwr.simulation.run_simulation`: devices in Ray actor processes.

    Proves the generator is in force in every process (masks only cancel if devices and server
    agree) and that each actor's audit says so. Runs in its own process group, killed whole
    afterwards, so no Ray process outlives the test (~30 s, mostly Ray start-up).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _RAY_ROUND],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftover_group(proc.pid)
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, output[-3000:]
    result = json.loads(lines[0][len("RESULT") :])
    assert result["hardened"] == [1, 1, 1]
    # Weighted mean of 0, 1, 2 with weights 10, 11, 12.
    np.testing.assert_allclose(
        result["aggregate"], [(0 * 10 + 1 * 11 + 2 * 12) / 33] * 3, atol=1e-3
    )


def _kill_leftover_group(pgid: int) -> None:
    """Ray daemons started by the child share its process group; end any that linger."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def test_even_share_count_below_sample_size_is_halted_before_sending() -> None:
    """Flower 1.42 would tell devices 4 shares but give them 5 neighbours (IndexError)."""
    fed = Federation(n=6, seed=11)
    fed.run_round(_workflow(num_shares=4, threshold=3))
    assert fed.strategy.aggregates == [] and fed.grid.sent == []
    fed = Federation(n=4, seed=11)  # even but equal to the sample size: Flower runs it
    fed.run_round(_workflow(num_shares=4, threshold=3))
    assert len(fed.strategy.aggregates) == 1

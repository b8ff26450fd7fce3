"""One hardened SecAgg+ round driven from our own round loop.

Flower 1.42 runs SecAgg+ only inside its legacy workflow: a `LegacyContext` whose legacy
`Strategy.configure_fit` names the devices and their FitIns, and whose `aggregate_fit`
receives the unmasked aggregate. We call `HardenedSecAggPlusWorkflow` for exactly one round
with such a context: `_Instructions` hands it the devices and instructions our loop already
chose (sampling, config injection by our Message-API strategy) and keeps what it is given.
Nothing of `DefaultWorkflow` runs (no initial-parameter fetch, no evaluation, no thread).

What the server can still check, without ever seeing an individual update (`_ProtocolGrid`):
each masked vector has the expected number of arrays, shapes, integer dtype and range; the
scalar metrics beside it are allow-listed and finite; the claimed weight is in (0,
max_weight]. A reply failing any of that is dropped before the sum, which SecAgg+ treats as
a dropout; so is the upload of a device that declined the round (budget spent: its metrics
say `refused`), whose unchanged weights would otherwise dilute the mean as a zero update.
After unmasking: the aggregate is finite and (for model rounds) its norm is within the
per-update bound, which a mean of honest updates cannot exceed. What it cannot
check: schema, NaN and norm of one device's update, replay of an old update, and any
robust statistic (median, trimmed mean, Krum); honest devices run those checks themselves
before masking (client/secure_payload.py), and a malicious device can still shift the sum
by up to its clipping range per coordinate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.secure_protocol import (
    MAX_SECURE_CLIENTS,
    MAX_SHARES,
    MAX_WEIGHT_KEY,
    Quantisation,
    masked_shapes,
    train_quantisation,
)
from fedinterest.shared.wire import (
    TRAIN_METRICS,
    SchemaMismatch,
    WireSchema,
    check_metrics,
    update_norm,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.parameter import bytes_to_ndarray
from flwr.compat.common.recorddict_compat import (
    arrayrecord_to_parameters,
    parameters_to_arrayrecord,
)
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from .secagg import HardenedSecAggPlusWorkflow
from .validation import Rejection

log = logging.getLogger("fedinterest.server")

# Only mean-type strategies can run on a sum: robust ones need every individual update.
SECURE_STRATEGIES = ("fedavg", "fedprox", "fedadam")
TIMEOUT = 3600.0
MIN_DEVICES = 3
# A mean of updates within the norm bound is within it too, up to the quantisation error.
NORM_SLACK = 1e-3


def check_secure_config(cfg: RunConfig) -> None:
    """Fail early (ConfigError) on settings SecAgg+ cannot run."""
    if cfg.strategy not in SECURE_STRATEGIES:
        raise ConfigError(f"strategy: '{cfg.strategy}' needs every individual update, which "
                          f"secure aggregation hides; use one of {', '.join(SECURE_STRATEGIES)}"
                          " with secagg, or turn secagg off")
    if not MIN_DEVICES <= cfg.clients_per_round <= MAX_SECURE_CLIENTS:
        raise ConfigError(f"clients_per_round: secure aggregation needs {MIN_DEVICES} to "
                          f"{MAX_SECURE_CLIENTS} devices per round, got {cfg.clients_per_round}")


def share_parameters(n: int) -> tuple[int, int]:
    """(num_shares, reconstruction_threshold) for n devices: everyone (SecAgg) up to
    MAX_SHARES, a ring of MAX_SHARES above; the threshold is the smallest strict majority
    (the hardened devices refuse less), which tolerates the most dropouts."""
    k = min(n, MAX_SHARES)
    return k, k // 2 + 1


@dataclass
class SecureOutcome:
    """What one SecAgg+ round revealed: the weighted mean of the contributors' payloads and
    each contributor's (allow-listed, scalar) metrics; never an individual payload."""

    mean: list[np.ndarray] | None  # None: the round halted and released nothing
    contributors: list[int] = field(default_factory=list)  # whose masked vectors were summed
    weights: dict[int, float] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    bytes_up: dict[int, int] = field(default_factory=dict)  # all protocol stages
    num_shares: int = 0
    threshold: int = 0
    seconds: float = 0.0


def secure_mean(grid: Grid, instructions: dict[int, FitIns], server_round: int,
                quant: Quantisation, payload: WireSchema, allowed_metrics: frozenset[str],
                timeout: float = TIMEOUT) -> SecureOutcome:
    """Run one hardened SecAgg+ round over the devices in `instructions`.

    `payload` is the schema of what each device masks (the weight factor is added by
    Flower); the instructions' config must be in the legacy FitIns layout devices answer.
    """
    t0 = time.time()
    nodes = sorted(instructions)
    if len(nodes) < MIN_DEVICES:  # Flower needs 3; and with 2 the sum reveals the other one
        log.warning("round %d: %d device(s) cannot aggregate securely; nothing released",
                    server_round, len(nodes))
        return SecureOutcome(mean=None, failed=nodes)
    num_shares, threshold = share_parameters(len(nodes))
    proxies = [GridClientProxy(n, grid, grid.run.run_id) for n in nodes]
    strategy = _Instructions([(p, instructions[p.node_id]) for p in proxies])
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                    state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    for proxy in proxies:  # the workflow logs "sampled N clients (out of <registered>)"
        context.client_manager.register(proxy)
    first = next(iter(instructions.values())).parameters
    context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(first, True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round})
    # Devices on simulation find their store through the round config; SecAgg+ stages other
    # than the upload carry none, so the protocol grid attaches it (see _ProtocolGrid).
    wire = _ProtocolGrid(grid, ConfigRecord(dict(next(iter(instructions.values())).config)),
                         masked_shapes(payload), quant, allowed_metrics, server_round)
    workflow = HardenedSecAggPlusWorkflow(num_shares, threshold, timeout=timeout,
                                          **quant.workflow_kwargs())
    workflow(wire, context)

    out = SecureOutcome(mean=None, rejections=wire.rejections, bytes_up=wire.bytes_up,
                        num_shares=num_shares, threshold=threshold)
    if strategy.results is not None and strategy.results:
        out.contributors = [proxy.node_id for proxy, _ in strategy.results]
        out.weights = {proxy.node_id: float(res.num_examples)
                       for proxy, res in strategy.results}
        out.metrics = {proxy.node_id: dict(res.metrics) for proxy, res in strategy.results}
        mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
        if all(np.all(np.isfinite(a)) for a in mean):
            out.mean = mean
        else:  # a device outside the protocol can only produce this by sending garbage
            out.rejections.append(Rejection(server_round, -1, "unmasked aggregate not finite"))
    out.failed = [n for n in nodes if n not in set(out.contributors)]
    out.seconds = time.time() - t0
    return out


@dataclass
class SecureTrainRound:
    """A train round's outcome in the shape our loop consumes (see Federation._round)."""

    accepted: list[Message]  # one per contributor: the unmasked mean + its own metrics
    failed: list[int]
    bytes_up: list[int]
    outcome: SecureOutcome


def secure_train_round(grid: Grid, messages: list[Message], server_round: int,
                       weights: list[np.ndarray], schema: WireSchema, cfg: RunConfig,
                       timeout: float = TIMEOUT) -> SecureTrainRound:
    """Run the train instructions our strategy configured under SecAgg+.

    Devices mask their *update*; the server adds the unmasked mean update to the global
    weights and hands the strategy one reply per contributor carrying that same mean and the
    contributor's own metrics: averaging identical replies returns them unchanged, so the
    strategy's own steps after averaging (FedAdam's server optimiser, DP-FedAvg's noise with
    std z*C/n for n contributors) run exactly as on plain rounds.
    """
    quant = train_quantisation(cfg)
    instructions = {m.metadata.dst_node_id: _fit_ins(m, quant) for m in messages}
    outcome = secure_mean(grid, instructions, server_round, quant, schema, TRAIN_METRICS,
                          timeout)
    failed = list(outcome.failed)
    accepted: list[Message] = []
    if outcome.mean is not None:
        try:
            if [tuple(a.shape) for a in outcome.mean] != [s.shape for s in schema.arrays]:
                raise SchemaMismatch("unmasked aggregate does not match the schema")
            norm = update_norm(outcome.mean)
            if norm > cfg.max_update_norm * (1 + NORM_SLACK):
                raise SchemaMismatch(f"mean update norm {norm:.4g} exceeds the per-update "
                                     f"bound {cfg.max_update_norm:.4g}")
        except SchemaMismatch as e:  # no mean of honest updates can fail this
            outcome.rejections.append(Rejection(server_round, -1, f"aggregate rejected: {e}"))
            log.warning("round %d: secure aggregate rejected: %s", server_round, e)
            failed += outcome.contributors
        else:
            new = ArrayRecord({n: Array(np.ascontiguousarray(
                (w.astype(np.float64) + d).astype(w.dtype)))
                for n, w, d in zip(schema.names, weights, outcome.mean)})
            by_node = {m.metadata.dst_node_id: m for m in messages}
            for node in outcome.contributors:
                metrics = {k: float(v) for k, v in outcome.metrics[node].items()}
                metrics["num-examples"] = 1.0  # every device weighs the same
                accepted.append(Message(RecordDict({"arrays": new,
                                                    "metrics": MetricRecord(metrics)}),
                                        reply_to=by_node[node]))
    bytes_up = [outcome.bytes_up.get(n, 0) for n in outcome.contributors]
    return SecureTrainRound(accepted, failed, bytes_up, outcome)


def _fit_ins(msg: Message, quant: Quantisation) -> FitIns:
    """Our Message-API train instruction in Flower's legacy layout (arrays in schema order)."""
    params = arrayrecord_to_parameters(msg.content.array_records["arrays"], keep_input=True)
    config = dict(msg.content.config_records["config"])
    config[MAX_WEIGHT_KEY] = float(quant.max_weight)
    return FitIns(params, config)


class _Instructions(LegacyStrategy):
    """A legacy Strategy that only relays: the devices and FitIns our loop chose go out, and
    the workflow's aggregate comes back in `results` (the same unmasked mean in each)."""

    def __init__(self, instructions: list[tuple[GridClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list | None = None
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return list(self.instructions)

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _ProtocolGrid:
    """The Grid as the workflow sees it: attaches the round config to SecAgg+ stage messages
    that carry none, drops upload replies that cannot be honest (counted as dropouts), and
    tallies the bytes each device sends."""

    def __init__(self, grid: Grid, config: ConfigRecord, shapes: list[tuple[int, ...]],
                 quant: Quantisation, allowed_metrics: frozenset[str], server_round: int):
        self._grid = grid
        self._config = config
        self._shapes = shapes
        self._quant = quant
        self._allowed = allowed_metrics
        self._round = server_round
        self.rejections: list[Rejection] = []
        self.bytes_up: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = None
        for msg in messages:
            stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
            if "fitins.config" not in msg.content.config_records:
                msg.content.config_records["config"] = self._config
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_content():
                self.bytes_up[node] = self.bytes_up.get(node, 0) + content_bytes(reply.content)
            if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
                try:
                    self._check_upload(reply.content)
                except SchemaMismatch as e:
                    log.warning("round %d: dropped the masked upload of node %d: %s",
                                self._round, node, e)
                    self.rejections.append(Rejection(self._round, node, str(e)))
                    continue
                if _declined(reply.content):  # not an attack: leave it out of the sum
                    continue
            kept.append(reply)
        return kept

    def _check_upload(self, content: RecordDict) -> None:
        configs = content.config_records.get(RECORD_KEY_CONFIGS)
        blobs = configs.get(Key.MASKED_PARAMETERS) if configs is not None else None
        if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
            raise SchemaMismatch("upload carries no masked vector")
        if len(blobs) != len(self._shapes):
            raise SchemaMismatch(f"masked vector has {len(blobs)} arrays, expected "
                                 f"{len(self._shapes)}")
        for i, (blob, shape) in enumerate(zip(blobs, self._shapes)):
            try:
                arr = bytes_to_ndarray(blob)
            except ValueError as e:
                raise SchemaMismatch(f"masked array {i} is not a numpy array ({e})") from None
            if tuple(arr.shape) != shape or arr.dtype.kind not in "iu":
                raise SchemaMismatch(f"masked array {i}: {arr.dtype}{tuple(arr.shape)}, "
                                     f"expected integers of shape {shape}")
            if arr.size and (arr.min() < 0 or arr.max() >= self._quant.modulus_range):
                raise SchemaMismatch(f"masked array {i} has values outside the modulus")
        metrics = content.config_records.get("fitres.metrics")
        check_metrics(dict(metrics) if metrics is not None else {}, self._allowed)
        n_rec = content.metric_records.get("fitres.num_examples")
        weight = n_rec.get("num_examples") if n_rec is not None else None
        if (isinstance(weight, bool) or not isinstance(weight, int)
                or not 0 < weight <= self._quant.max_weight):
            raise SchemaMismatch(f"claimed weight {weight!r} is not in (0, "
                                 f"{self._quant.max_weight:g}]")


def _declined(content: RecordDict) -> bool:
    metrics = content.config_records.get("fitres.metrics")
    return metrics is not None and float(metrics.get("refused", 0.0)) >= 1.0


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a reply: arrays plus every bytes/str/number in config records."""
    total = sum(rec.count_bytes() for rec in content.array_records.values())
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        for value in rec.values():
            for v in value if isinstance(value, list) else [value]:
                total += len(v) if isinstance(v, (bytes, str)) else 8
    return total


def legacy_parameters(arrays: list[np.ndarray]) -> Parameters:
    """Arrays in Flower's legacy Parameters (for instructions built outside a strategy)."""
    from flwr.common import ndarrays_to_parameters

    return ndarrays_to_parameters([np.ascontiguousarray(a) for a in arrays])

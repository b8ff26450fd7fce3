"""Server side of distributed DP: run the round under hardened SecAgg+, decode only the sum,
and step the global model with a server optimizer on the noisy mean (post-processing).

The devices' payloads are integers (shared/distributed_dp.py); SecAgg+ reveals their sum
modulo 2**40 and nothing else. A round releases only when at least m = min_contributions
devices were summed (their noise shares were sized for m); with fewer, the server drops the
sum, and the honest devices refuse to unmask it anyway (client/ddp_mod.py). The decoded sum
is divided by a fixed normaliser (never the number of contributors, which would tell the
server how many examples were drawn) and fed to SGD, heavy-ball momentum or Adam; only the
parameters named by `ddp_train_only` move (the payload carries only their coordinates).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import (
    DDP_QUANTISATION,
    DDP_STAGE,
    ddp_budget,
    decode_sum,
    flatten,
    min_contributions,
    normaliser,
    params_from_config,
    payload_schema,
    trained_index,
    unflatten,
)
from fedinterest.shared.distributed_dp_accounting import (
    DDP_EVENT_RELATION,
    DDP_EVENT_UNIT,
    DDP_USER_RELATION,
    DDP_USER_UNIT,
    THREAT_MODEL,
    count_noise_multiplier,
    run_epsilon,
)
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.secure_protocol import MAX_WEIGHT_KEY, STAGE_KEY
from fedinterest.shared.wire import TRAIN_METRICS, WireSchema
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import FitIns
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.serverapp import Grid

from .secure_round import MAX_SHARES, TIMEOUT, SecureTrainRound, secure_mean
from .validation import Rejection

log = logging.getLogger("fedinterest.server")
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


@dataclass
class ServerOptimizer:
    """SGD, heavy-ball momentum or Adam on a flat pseudo-gradient (state kept across rounds)."""

    kind: str
    lr: float
    beta1: float
    mask: np.ndarray
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    t: int = 0

    def step(self, flat_weights: np.ndarray, grad: np.ndarray) -> np.ndarray:
        grad = grad * self.mask
        self.t += 1
        if self.kind == "sgd":
            return flat_weights - self.lr * grad
        if self.m is None:
            self.m, self.v = np.zeros_like(grad), np.zeros_like(grad)
        if self.kind == "momentum":
            self.m = self.beta1 * self.m + grad
            return flat_weights - self.lr * self.m
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = ADAM_BETA2 * self.v + (1 - ADAM_BETA2) * grad * grad
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - ADAM_BETA2**self.t)
        return flat_weights - self.lr * self.mask * m_hat / (np.sqrt(v_hat) + ADAM_EPS)


@dataclass
class DistributedDPServer:
    """Runs distributed-DP train rounds for the federation loop (server/federation.py)."""

    cfg: RunConfig
    schema: WireSchema
    optimizer: ServerOptimizer = field(init=False)

    def __post_init__(self) -> None:
        if self.cfg.clients_per_round > MAX_SHARES:
            raise ConfigError(
                f"clients_per_round: distributed DP runs a cohort of at most {MAX_SHARES} "
                f"devices (one SecAgg+ neighbourhood), so that each device can count the "
                f"contributors it unmasks (client/ddp_mod.py); got {self.cfg.clients_per_round}")
        self._epsilons: dict[tuple[int, bool], float] = {}
        named = [(n, tuple(a.shape), str(a.dtype)) for n, a in
                 zip(self.schema.names, self.schema.arrays)]
        self.params = params_from_config(self.cfg, named)
        self.trained = trained_index(self.cfg, named)  # the payload's coordinates
        self.payload = payload_schema(self.params)
        self.optimizer = ServerOptimizer(self.cfg.ddp_server_optimizer, self.cfg.ddp_server_lr,
                                         self.cfg.ddp_momentum, np.ones(self.params.dim))

    def train_round(self, grid: Grid, messages: list[Message], server_round: int,
                    weights: list[np.ndarray], timeout: float = TIMEOUT) -> SecureTrainRound:
        instructions = {m.metadata.dst_node_id: _fit_ins(m) for m in messages}
        outcome = secure_mean(grid, instructions, server_round, DDP_QUANTISATION, self.payload,
                              TRAIN_METRICS, timeout)
        m = min_contributions(self.cfg)
        n = len(outcome.contributors)
        if outcome.mean is None or n < m:
            if outcome.mean is not None:
                outcome.rejections.append(Rejection(server_round, -1, f"distributed DP: "
                                                    f"{n} contributions < {m}; sum dropped"))
                log.warning("round %d: %d contributions < m = %d; nothing released",
                            server_round, n, m)
            return SecureTrainRound([], sorted(instructions), [], outcome)
        noisy_sum = decode_sum(outcome.mean, n).astype(np.float64) / self.params.scale
        mean = noisy_sum / normaliser(self.cfg)
        grad = mean if self.cfg.dp == "ddp-event" else -mean  # user level: mean update
        new_flat = flatten(weights)
        new_flat[self.trained] = self.optimizer.step(new_flat[self.trained], grad)
        new = [a.astype(w.dtype) for a, w in
               zip(unflatten(new_flat, [w.shape for w in weights]), weights)]
        record = ArrayRecord({name: Array(np.ascontiguousarray(a))
                              for name, a in zip(self.schema.names, new)})
        by_node = {msg.metadata.dst_node_id: msg for msg in messages}
        accepted = [Message(RecordDict({"arrays": record, "metrics": MetricRecord(
            {**{k: float(v) for k, v in outcome.metrics[node].items()}, "num-examples": 1.0})}),
            reply_to=by_node[node]) for node in outcome.contributors]
        bytes_up = [outcome.bytes_up.get(node, 0) for node in outcome.contributors]
        return SecureTrainRound(accepted, list(outcome.failed), bytes_up, outcome)

    def epsilon_if_joined_every_round(self, rounds: int, counted: bool | None = None) -> float:
        """The epsilon of a device that joined each of `rounds` rounds and, when `counted`
        (default: the run has a popularity release), the count: an upper bound on every
        device's own ledger under this run's parameters."""
        counted = self.cfg.popularity if counted is None else counted
        if (rounds, counted) not in self._epsilons:
            self._epsilons[(rounds, counted)] = run_epsilon(self.cfg, self.params.dim, rounds,
                                                            counted)
        return self._epsilons[(rounds, counted)]

    def within_budget(self, nodes: list[int], rounds_joined: Callable[[int], int],
                      counted: Callable[[int], bool] = lambda node: True) -> list[int]:
        """The nodes whose device stays within its budget after one more round, its count
        included if it was counted: the server samples only those, so no device has to
        decline (its ledger composes the same releases, and still declines on its own if the
        server does not)."""
        return [n for n in nodes if self.epsilon_if_joined_every_round(
            rounds_joined(n) + 1, self.cfg.popularity and counted(n)) <= ddp_budget(self.cfg)]

    def statement(self) -> dict:
        event = self.cfg.dp == "ddp-event"
        return {"mechanism": "distributed Skellam under SecAgg+ (Agarwal et al. 2021)",
                "unit": DDP_EVENT_UNIT if event else DDP_USER_UNIT,
                "relation": DDP_EVENT_RELATION if event else DDP_USER_RELATION,
                "threat_model": THREAT_MODEL, "clip": self.params.clip,
                "noise_multiplier": self.params.noise_multiplier,
                "min_contributions": self.params.min_contributions,
                "scale": self.params.scale, "dim": self.params.dim,
                "sample_rate": self.cfg.ddp_sample_rate if event else None,
                "normaliser": normaliser(self.cfg), "delta": self.cfg.delta,
                # the popularity count, charged to the same ledger (its distributed Skellam RDP)
                "popularity_composed": self.cfg.popularity,
                "popularity_noise_multiplier": (count_noise_multiplier(self.cfg)
                                                if self.cfg.popularity else None)}


def _fit_ins(msg: Message) -> FitIns:
    """Our train instruction in Flower's legacy layout, marked as a distributed-DP round."""
    params = arrayrecord_to_parameters(msg.content.array_records["arrays"], keep_input=True)
    config = dict(msg.content.config_records["config"])
    config[STAGE_KEY] = DDP_STAGE
    config[MAX_WEIGHT_KEY] = float(DDP_QUANTISATION.max_weight)
    return FitIns(params, config)

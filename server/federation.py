"""The server's round loop on top of a Flower Grid and a Flower strategy.

We drive Flower's strategy methods (configure_train / aggregate_train) ourselves instead of
`Strategy.start` because every round must also: validate replies before aggregation, account
user-level privacy and stop before the budget is exceeded, ask devices to evaluate (they keep
the result; only a simulation runner reads it), count bytes, and checkpoint for `--resume`.
With `secagg`, train rounds run under hardened SecAgg+ (secure_round.py: the server sees only
the sum of masked updates), and before round 1 the DP popularity count runs under SecAgg+
whatever `secagg` says (popularity_round.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp_count import count_params
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.provenance import versions
from fedinterest.shared.wire import WireSchema
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from .checkpoint import FederationState, load_latest, save_checkpoint
from .ddp_aggregate import DistributedDPServer
from .popularity_round import federated_popularity
from .secure_round import check_secure_config, secure_train_round
from .strategies import build_strategy, make_messages, sample_round
from .user_accounting import ACCOUNTANT, USER_RELATION, USER_UNIT, device_user_epsilon
from .validation import ReplyValidator

log = logging.getLogger("fedinterest.server")
HELLO_TIMEOUT = 600  # s, the first hello: a deployment's devices may still be starting
LATE_HELLO_TIMEOUT = 60  # s, before later rounds: a node that is slower is asked again
HELLO_BACKOFF_MAX = 32  # rounds between hellos to a node that keeps missing them


@dataclass
class RoundRecord:
    round: int
    sampled: int
    accepted: int
    failed: int
    train_loss: float | None
    metrics: dict
    user_epsilon: float | None
    device_epsilon_max: float | None
    bytes_down_per_client: int
    bytes_up_per_client: float
    seconds: float
    population: int  # greeted devices user-level DP accounts with (Federation._population)
    ddp_epsilon: float | None = None  # distributed DP: a device that joined every round


def to_record(names: list[str], arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in zip(names, arrays)})


def from_record(record: ArrayRecord, names: list[str]) -> list[np.ndarray]:
    return [record[n].numpy() for n in names]


class Federation:
    def __init__(self, cfg: RunConfig, schema: WireSchema, initial: list[np.ndarray],
                 extra_config: dict, run_dir: Path,
                 on_round: Callable[[RoundRecord], None] | None = None,
                 evaluation_reader: Callable[[int], dict] | None = None):
        self.cfg = cfg
        # sums of the devices' own evaluation reports of a round, read where the stores are
        # (a simulation runner); never sent to the server (docs/PRIVACY.md, finding 3)
        self.evaluation_reader = evaluation_reader
        self.schema = schema
        self.names = schema.names
        self.extra_config = extra_config  # e.g. catalog path and version
        self.run_dir = Path(run_dir)
        self.on_round = on_round
        self.strategy = build_strategy(cfg)
        self.validator = ReplyValidator(schema, cfg.max_update_norm)
        self.state = FederationState(weights=[a.copy() for a in initial])
        self.popularity_release: dict | None = None  # see _publish_popularity
        self.initial_metrics: dict | None = None  # round 0's evaluation (cfg.eval_initial)
        self.popularity_charged: set[str] | None = set()  # pseudonyms; None = every device
        # the code's provenance as the run starts: read at the end, it named whatever commit
        # the work tree had moved to during a long run
        self.versions = versions()
        self.ddp = DistributedDPServer(cfg, schema) if cfg.distributed_dp else None
        if cfg.secagg or cfg.distributed_dp:
            check_secure_config(cfg)
            if cfg.update_format != "arrays":
                log.info("update_format=%s does not apply under secagg: SecAgg+ masks each "
                         "update as float64 deltas (secure_round.py)", cfg.update_format)

    # -- persistence -------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the last checkpoint in run_dir; False when there is none."""
        loaded = load_latest(self.run_dir / "checkpoints")
        if loaded is None:
            return False
        self.state = loaded
        self.validator.seen_digests = set(loaded.seen_digests)
        _restore_strategy(self.strategy, loaded.strategy_state)
        log.info("resumed after round %d", loaded.round)
        return True

    def checkpoint(self) -> None:
        self.state.strategy_state = _strategy_state(self.strategy)
        self.state.seen_digests = sorted(self.validator.seen_digests)
        self.state.rejections = [r.__dict__ for r in self.validator.rejections]
        save_checkpoint(self.run_dir / "checkpoints", self.state)

    # -- the loop ----------------------------------------------------------------------
    def run(self, grid: Grid) -> FederationState:
        cfg = self.cfg
        self.pseudonyms: dict[int, str] = {}
        self.superseded: set[int] = set()  # node ids whose device answered under a newer one
        self.hello_misses: dict[int, tuple[int, int]] = {}  # node -> (misses, ask again at)
        nodes = self._greet(grid, self._wait_for_nodes(grid), HELLO_TIMEOUT)
        if cfg.popularity:
            self._publish_popularity(grid, nodes)
        first = self.state.round + 1
        if first == 1 and cfg.eval_initial:  # the untrained model: what training must beat
            self.initial_metrics = self._evaluate(grid, nodes, 0)
        for rnd in range(first, cfg.rounds + 1):
            if rnd > first:  # devices that joined, or did not answer, since the last hello
                nodes = self._greet(grid, sorted(grid.get_node_ids()), LATE_HELLO_TIMEOUT)
            population = self._population(len(nodes))
            eligible = (self._within_user_budget(nodes) if cfg.user_dp else
                        self.ddp.within_budget(nodes, self._rounds_joined, self._counted)
                        if self.ddp else nodes)
            if cfg.user_dp and len(eligible) < min(cfg.min_clients, cfg.clients_per_round):
                log.warning("stopping before round %d: %d device(s) can join another round "
                            "within the user-level budget %.3f", rnd, len(eligible),
                            cfg.user_epsilon)
                break
            if self.ddp and len(eligible) < self.ddp.params.min_contributions:
                log.warning("stopping before round %d: %d device(s) can join another round "
                            "within the distributed-DP budget; a round needs %d", rnd,
                            len(eligible), self.ddp.params.min_contributions)
                break
            t0 = time.time()
            record = self._round(grid, nodes, rnd, population, eligible)
            record.seconds = time.time() - t0
            self.state.round = rnd
            self.state.history.append(record.__dict__)
            self.checkpoint()
            if self.on_round:
                self.on_round(record)
        return self.state

    def _population(self, greeted: int) -> int:
        """The population user-level DP accounts with: the fewest greeted devices in any
        round so far, this one included. Sampling k of n devices is amplified less when n is
        smaller, so the smallest n bounds every round's privacy loss (it grows when late
        devices join, and a smaller number is the conservative one). Read back from the
        history so a resumed run accounts as the uninterrupted one did."""
        return min([greeted, *(r.get("population", greeted) for r in self.state.history)])

    def _wait_for_nodes(self, grid: Grid, timeout: float = 600) -> list[int]:
        need = min(self.cfg.clients_per_round, self.cfg.min_clients)
        t0 = time.time()
        while len(nodes := sorted(grid.get_node_ids())) < need:
            if time.time() - t0 > timeout:
                raise TimeoutError(f"only {len(nodes)} nodes connected after {timeout:.0f}s "
                                   f"(need {need})")
            time.sleep(1)
        return nodes

    def _greet(self, grid: Grid, nodes: list[int], timeout: float) -> list[int]:
        """Ask the nodes in `nodes` that have no pseudonym yet for it (the hello query), and
        return those of `nodes` that have one: the devices a round may sample.

        Each device's pseudonym is a random id made once per store. Sampling and the order
        of aggregation use it instead of Flower's node ids, which are drawn afresh when a
        simulation restarts: so a resumed run samples the same devices and sums replies in the
        same order as an uninterrupted one, and reproduces its weights exactly. Nodes that
        connect late, or miss a hello, are asked again before the next round: greeted once
        at the start only, they would never be sampled. A node that keeps missing is asked
        after 1, 2, 4, ... up to 32 rounds (HELLO_BACKOFF_MAX): a hung node that stays listed
        would otherwise cost the whole hello timeout before every round."""
        clock = self.state.round  # rounds completed
        ask = [n for n in nodes if n not in self.pseudonyms and n not in self.superseded
               and self.hello_misses.get(n, (0, clock))[1] <= clock]
        if ask:
            record = RecordDict({"config": self._config(self.state.round, "hello")})
            replies = grid.send_and_receive(make_messages(record, ask, MessageType.QUERY),
                                            timeout=timeout)
            answered = 0
            for m in replies:
                if m.has_error() or "device" not in m.content.config_records:
                    continue
                pid = m.content.config_records["device"].get("pseudonym")
                node = m.metadata.src_node_id
                if isinstance(pid, str) and len(pid) == 32 and node in ask:
                    # a device that reconnected under a new node id: sample the new one
                    for old in [n for n, p in self.pseudonyms.items() if p == pid]:
                        log.warning("node %d answered with the pseudonym of node %d, which "
                                    "is no longer sampled", node, old)
                        del self.pseudonyms[old]
                        self.superseded.add(old)  # not asked again: no flip-flopping
                    self.pseudonyms[node] = pid
                    answered += 1
            for n in ask:
                if n in self.pseudonyms:
                    self.hello_misses.pop(n, None)
                else:
                    misses = self.hello_misses.get(n, (0, clock))[0] + 1
                    self.hello_misses[n] = (misses, clock + min(2 ** (misses - 1),
                                                                HELLO_BACKOFF_MAX))
            if answered < len(ask):
                log.warning("%d of %d nodes did not answer the hello query; they are asked "
                            "again after 1 round, or more after repeated misses",
                            len(ask) - answered, len(ask))
        return [n for n in nodes if n in self.pseudonyms]

    def _sample(self, nodes: list[int], k: int, rnd: int, purpose: str) -> list[int]:
        by_pid = {self.pseudonyms[n]: n for n in nodes}
        return [by_pid[p] for p in sample_round(by_pid, k, self.cfg.seed, rnd, purpose)]

    def _publish_popularity(self, grid: Grid, nodes: list[int]) -> None:
        """Item counts summed under SecAgg+ and noised, published as a new catalog version
        that every later round announces (released once per run; reused on resume)."""
        chosen = self._sample(nodes, self.cfg.popularity_devices, 0, "popularity")
        self.popularity_release = federated_popularity(
            grid, chosen, self.cfg, Path(self.extra_config["catalog-path"]),
            dict(self._config(0, "popularity")), self.run_dir, population=len(nodes))
        # who the release charges (user level): the devices queried; for a release copied
        # from another run (the same users' data, counted there), every device
        released = self.popularity_release.get("statement") is not None
        self.popularity_charged = (None if released and self.popularity_release.get(
            "reused_from") else {self.pseudonyms[n] for n in chosen} if released else set())
        self.extra_config["catalog-path"] = self.popularity_release["catalog_path"]
        self.extra_config["catalog-version"] = self.popularity_release["catalog_version"]

    def _config(self, rnd: int, stage: str) -> ConfigRecord:
        values = {**self.cfg.to_flower(), **self.extra_config, "server-round": rnd,
                  "stage": stage, "schema-digest": self.schema.digest(),
                  "lr": self.cfg.round_lr(rnd)}
        return ConfigRecord({k: v for k, v in values.items() if v is not None})

    def _round(self, grid: Grid, nodes: list[int], rnd: int, population: int,
               eligible: list[int]) -> RoundRecord:
        """One train round over a sample of `eligible`, then evaluation over `nodes`."""
        cfg = self.cfg
        arrays = to_record(self.names, self.state.weights)
        sampled = self._sample(eligible, cfg.clients_per_round, rnd, "train")
        msgs = list(self.strategy.configure_train(rnd, arrays, self._config(rnd, "train"),
                                                  _SampledGrid(sampled)))
        if cfg.secagg or self.ddp:  # replies: the new weights once per contributor
            secure = (self.ddp.train_round(grid, msgs, rnd, self.state.weights) if self.ddp
                      else secure_train_round(grid, msgs, rnd, self.state.weights, self.schema,
                                              cfg))
            accepted, failed, bytes_up = secure.accepted, secure.failed, secure.bytes_up
            self.validator.rejections += secure.outcome.rejections
        else:
            replies = list(grid.send_and_receive(msgs, timeout=3600))
            # counted as received: the validator unpacks accepted packed replies
            sent_bytes = {id(m): _record_bytes(m) for m in replies if not m.has_error()}
            accepted, failed = self.validator.filter(rnd, replies, self.state.weights, msgs)
            bytes_up = [sent_bytes[id(m)] for m in accepted]
        accepted.sort(key=lambda m: self.pseudonyms[m.metadata.src_node_id])  # fixed sum order
        self._count_contributions(accepted)
        if len(accepted) >= min(cfg.min_clients, len(sampled)) and accepted:
            new_arrays, _ = self.strategy.aggregate_train(rnd, [_weighted(m) for m in accepted])
            if new_arrays is not None:
                self.state.weights = from_record(new_arrays, self.names)
        else:
            log.warning("round %d: %d accepted replies < minimum %d; model unchanged", rnd,
                        len(accepted), cfg.min_clients)
        metrics = {}
        if cfg.eval_every and rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            metrics = self._evaluate(grid, nodes, rnd)
        eps_dev = max(self.state.device_epsilon.values()) if self.state.device_epsilon else None
        return RoundRecord(
            round=rnd, sampled=len(sampled), accepted=len(accepted), failed=len(failed),
            train_loss=None,  # stays on the device (docs/PRIVACY.md, finding 3)
            metrics=metrics,
            user_epsilon=self._max_user_epsilon(nodes) if cfg.user_dp else None,
            device_epsilon_max=eps_dev if cfg.event_dp or self.ddp else None,
            bytes_down_per_client=self.schema.nbytes,
            bytes_up_per_client=float(np.mean(bytes_up)) if bytes_up else 0.0,
            seconds=0.0, population=population,
            ddp_epsilon=self.ddp.epsilon_if_joined_every_round(rnd) if self.ddp else None)

    def _count_contributions(self, accepted: list[Message]) -> None:
        """One more round joined for each contributor (an accepted reply; declines are not
        accepted), and its event-level epsilon recomputed from the fixed per-round DP-SGD
        parameters: the same composition the device's own ledger makes."""
        for m in accepted:
            pid = self.pseudonyms[m.metadata.src_node_id]
            joined = self.state.device_rounds[pid] = self.state.device_rounds.get(pid, 0) + 1
            if self.cfg.event_dp:
                self.state.device_epsilon[pid] = event_epsilon(self.cfg, joined)
            elif self.ddp:
                self.state.device_epsilon[pid] = self.ddp.epsilon_if_joined_every_round(
                    joined, self.cfg.popularity and self._pid_counted(pid))

    def _evaluate(self, grid: Grid, nodes: list[int], rnd: int) -> dict:
        """Devices rank the full catalog for their own held-out events and keep the result
        in their store; their replies carry nothing. The round's metrics come from
        `evaluation_reader` (a simulation runner reading the devices' own reports) or are
        absent (a deployment: evaluation stays on the devices)."""
        # a fixed seeded sample every round (the same devices, so rounds compare), every
        # device in the last round; each mean comes with its standard error
        final = rnd == self.cfg.rounds
        k = len(nodes) if final else (self.cfg.eval_clients or len(nodes))
        chosen = self._sample(nodes, k, 0, "evaluate")
        record = RecordDict({"arrays": to_record(self.names, self.state.weights),
                             "config": self._config(rnd, "evaluate")})
        replies = grid.send_and_receive(make_messages(record, chosen, MessageType.EVALUATE),
                                        timeout=3600)
        failed = sum(1 for m in replies if m.has_error())
        if failed:
            log.warning("round %d: %d device(s) failed to evaluate", rnd, failed)
        if self.evaluation_reader is None:
            return {}
        return evaluation_means(self.evaluation_reader(rnd))

    def _device_user_epsilon(self, pid: str, more_rounds: int = 0) -> float:
        """The device's user-level epsilon against the server (server/user_accounting.py):
        every round it contributed to, plus `more_rounds`, and the popularity release."""
        charged = self._pid_counted(pid)
        return device_user_epsilon(self.state.device_rounds.get(pid, 0) + more_rounds,
                                   self.cfg.user_noise_multiplier, self.cfg.delta,
                                   count_params(self.cfg, replace=True) if charged else None)

    def _pid_counted(self, pid: str) -> bool:
        """Whether the popularity release charged this device (it was queried, or the
        release was copied from another run: every device)."""
        return self.popularity_charged is None or pid in self.popularity_charged

    def _counted(self, node: int) -> bool:
        return self._pid_counted(self.pseudonyms[node])

    def _rounds_joined(self, node: int) -> int:
        return self.state.device_rounds.get(self.pseudonyms[node], 0)

    def _within_user_budget(self, nodes: list[int]) -> list[int]:
        """The nodes whose device stays within the user-level budget after one more round."""
        return [n for n in nodes if self._device_user_epsilon(self.pseudonyms[n], 1)
                <= self.cfg.user_epsilon]

    def _max_user_epsilon(self, nodes: list[int]) -> float:
        pids = set(self.state.device_rounds) | {self.pseudonyms[n] for n in nodes}
        return max((self._device_user_epsilon(p) for p in pids), default=0.0)

    def privacy_statement(self, n_nodes: int) -> dict:
        per_device = {p: self._device_user_epsilon(p) for p in sorted(self.state.device_rounds)}
        return {"unit": USER_UNIT, "relation": USER_RELATION,
                "sampling": f"{min(self.cfg.clients_per_round, n_nodes)} of {n_nodes} devices "
                            "per round, drawn by the server from a seeded generator it knows: "
                            "no amplification by sampling is claimed",
                "accountant": ACCOUNTANT,
                "threat_model": "readers of the released model. Not the server: it adds the "
                "noise after seeing the exact sum, so no user-level epsilon holds against it "
                "until the devices add the noise (distributed DP); the accounting already "
                "claims no amplification, as it must against a server that draws the sample "
                "(docs/PRIVACY.md, finding 6)",
                "per_device_epsilon": per_device,
                "rounds_joined": dict(sorted(self.state.device_rounds.items())),
                "popularity_composed": self.cfg.popularity,
                "noise_multiplier": self.cfg.user_noise_multiplier,
                "clip": self.cfg.user_clip, "delta": self.cfg.delta}


def event_epsilon(cfg: RunConfig, rounds: int) -> float:
    """Event-level epsilon of a device after `rounds` DP-SGD rounds of the config's fixed
    (noise multiplier, sample rate, steps): the device's ledger composes the same events."""
    ledger = EventLedger(delta=cfg.delta)
    ledger.record(0, cfg.noise_multiplier, cfg.dp_sample_rate, cfg.dp_steps * rounds)
    return ledger.epsilon()


def evaluation_means(sums: dict[str, float]) -> dict:
    """Per-split HR/NDCG/MRR@10 from summed device reports (client/evaluation_report.py),
    and with the sums of squares (`KEY^2`) the standard error of each mean over the
    evaluated devices (`...-se`: sample standard deviation / sqrt(n); for a sample of the
    devices it is the sampling error of the estimate, without finite-population correction,
    so conservative)."""
    out = {}
    for split in ("val", "test"):
        n = sums.get(f"{split}-users", 0.0)
        if not n:
            continue
        for name, key in (("hr@10", "hits@10"), ("ndcg@10", "ndcg@10-sum"),
                          ("mrr@10", "mrr@10-sum")):
            mean = sums.get(f"{split}-{key}", 0.0) / n
            out[f"{split}-{name}"] = mean
            squares = sums.get(f"{split}-{key}^2")
            if squares is not None and n > 1:
                var = max(squares / n - mean * mean, 0.0) * n / (n - 1)
                out[f"{split}-{name}-se"] = math.sqrt(var / n)
        out[f"{split}-users"] = n
    return out


class _SampledGrid:
    """Exposes exactly our sampled nodes to Flower's `configure_train`, so the strategy's own
    logic (config injection such as proximal-mu or the clipping norm) runs unchanged."""

    def __init__(self, node_ids: list[int]):
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def _metrics(m: Message) -> dict:
    out: dict = {}
    for mr in m.content.metric_records.values():
        out.update(dict(mr))
    return out


def _weighted(m: Message) -> Message:
    """A reply as the strategy aggregates it: its arrays and the weight 1. Every device
    weighs the same (unweighted FedAvg): a per-device example count would leave the device
    in plaintext (docs/PRIVACY.md, finding 4)."""
    content = RecordDict({**dict(m.content.array_records),
                          "metrics": MetricRecord({"num-examples": 1.0})})
    return Message(content, dst_node_id=m.metadata.src_node_id,
                   message_type=MessageType.TRAIN)


def _record_bytes(m: Message) -> int:
    """Flower's count of a reply's array payload: values, .npy headers and names; for a
    packed reply the blob as sent (docs/BENCHMARKS.md, upload)."""
    return sum(rec.count_bytes() for rec in m.content.array_records.values())


def _strategy_state(strategy) -> dict:
    """FedOpt family keeps server moments; save them so a resumed run continues exactly."""
    inner = getattr(strategy, "strategy", strategy)
    state = {}
    for attr in ("m_t", "v_t", "current_arrays"):
        val = getattr(inner, attr, None)
        if isinstance(val, dict):
            state[attr] = {k: np.asarray(v) for k, v in val.items()}
    return state


def _restore_strategy(strategy, state: dict) -> None:
    inner = getattr(strategy, "strategy", strategy)
    for attr, val in state.items():
        setattr(inner, attr, val)

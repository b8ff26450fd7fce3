"""Reliability under faults, bad input and attacks: devices that crash, lie or vanish, a server
killed mid-round, and fuzzed configuration and SDK input. docs/RELIABILITY.md maps each fault
to the test here that shows what happens.

Federation tests run the real ServerApp loop and the real ClientApp over the in-process grid
on a 40-device synthetic world. Its texts are embedded with a hashed bag-of-words test encoder
instead of the tiny random BERT: the random BERT's vectors carry no topic signal (training loss
stays at ln(1 + negatives) and NDCG does not move), so "quality within 5% of a clean run" would
compare noise with noise. With topic words as features, four rounds lift validation NDCG@10
above the initial model on average over seeds.

Quality "within 5% of a clean run" is not decided by the suite's one seed: on 40 devices one
run's validation NDCG@10 moves by about 18% between seeds (paired with its clean run), and
even the untrained model's varies by 28%. The suite checks what one seed can show exactly
(who failed, what was recorded, bit-identity with the attackers' absence) and prints the
ratio; the 5% bound is asserted when FEDINTEREST_RELIABILITY_SEEDS lists at least
QUALITY_MIN_SEEDS seeds. The published numbers come from tests/helpers/reliability_quality.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from fedinterest.client import client_app as capp
from fedinterest.client.device import PSEUDONYM_BLOB, SEED_SECRET_BLOB, Device
from fedinterest.client.store import EventValidationError
from fedinterest.server.message_log import read_log
from fedinterest.server.server_app import initial_weights, run_server
from fedinterest.server.strategies import sample_round
from fedinterest.shared.config import (
    DP_MODES,
    MODELS,
    STRATEGIES,
    RunConfig,
    load_config,
    parse_overrides,
)
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity, wire
from fedinterest.simulations.simulate import evaluation_reader, prepare
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers.legacy_defaults import PRE_DDP_DEFAULTS

N_USERS = 40
NODE_STRIDE = 7919  # node ids look like Flower's: large, not the partition number
SEEDS = [int(s) for s in os.environ.get("FEDINTEREST_RELIABILITY_SEEDS", "0").split(",")]
QUALITY_TOLERANCE = 0.05  # relative, on validation NDCG@10
QUALITY_MIN_SEEDS = 10  # fewer seeds cannot resolve 5% here (module docstring)


@pytest.fixture(autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


class BagOfWordsEncoder:
    """Test double for TextEncoder: the sum of a fixed random vector per word (seeded by the
    word's hash), unit length. Instant, deterministic, and topic words make similar texts close."""

    identity = "test-bag-of-words/32"
    dim = 32

    def encode(self, texts, *, public: bool = False, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
                out[i] += np.random.default_rng(seed).standard_normal(self.dim)
            norm = np.linalg.norm(out[i])
            out[i] /= norm if norm else 1.0
        return out


def _cfg(out_dir, **kw) -> RunConfig:
    base = {"out_dir": str(out_dir), "rounds": 4, "clients_per_round": 10, "hidden": 16,
            "segment_len": 10, "n_negatives": 32, "batch_size": 2, "lr": 0.3, "dp": "off",
            "min_clients": 2, "popularity": False, "eval_every": 0}
    if "reproducible_seeds" in FIELDS:  # runs here are compared bit for bit (client/policy.py)
        base["reproducible_seeds"] = True
    if "update_format" in FIELDS:  # one Flower array per tensor: what Attackers rewrite, and
        base["update_format"] = "arrays"  # what the numbers in docs/RELIABILITY.md ran with
    return RunConfig(**{**PRE_DDP_DEFAULTS, **base, **kw})


def _node(p: int) -> int:
    return NODE_STRIDE * (p + 1)


def _pseudonym(p: int) -> str:
    return hashlib.sha256(f"reliability-device-{p}".encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def make_world(root: Path, n_users: int = N_USERS) -> tuple[Path, dict]:
    """A prepared run directory of n_users devices (40 in the suite). Pseudonyms and
    training-seed secrets are fixed (prepare draws them at random) so that sampling and local
    training, and with them every number in docs/RELIABILITY.md, are reproducible."""
    ds = generate_world(n_users=n_users, n_items=60, events_per_user=30, seed=3)
    info = prepare(_cfg(root), ds, encoder=BagOfWordsEncoder(), quiet=True)
    for p in range(n_users):
        with Device.open(root / "devices" / f"device-{p}.db",
                         key_file=root / "devices" / f"device-{p}.key") as dev:
            dev.store.put_blob(PSEUDONYM_BLOB, _pseudonym(p).encode())
            dev.store.put_blob(SEED_SECRET_BLOB, hashlib.sha256(_pseudonym(p).encode()).digest())
    return root, info


def _copy(world, dest: Path, cfg: RunConfig | None = None) -> tuple[Path, Path]:
    """A copy of the provisioned world; with `cfg`, its devices provisioned for that run's
    privacy settings (a device follows its own policy, not the server's round config)."""
    root, info = world
    shutil.copytree(root, dest)
    if cfg is not None and "reproducible_seeds" in FIELDS:
        from tests.helpers.device_world import provision_policies

        provision_policies(dest / "devices", cfg)
    return dest / "catalog" / f"catalog-{info['catalog_version']}.npz", dest / "devices"


def _nodes(n: int = N_USERS) -> dict[int, dict]:
    return {_node(p): {"partition-id": p} for p in range(n)}


def _sampled(seed: int, rnd: int, k: int, n: int = N_USERS) -> list[int]:
    """The node ids the server samples for training in round rnd (same rule, same inputs)."""
    by_pid = {_pseudonym(p): _node(p) for p in range(n)}
    return [by_pid[pid] for pid in sample_round(by_pid, k, seed, rnd, "train")]


def _run(world, dest: Path, grid: InProcessGrid, **kw):
    cat, devices = _copy(world, dest, _cfg(dest, **kw))
    return run_server(grid, _cfg(dest, **kw), cat, devices,
                      evaluation_reader=evaluation_reader(devices, N_USERS))


def _val_ndcg(fed) -> float:
    return fed.state.history[-1]["metrics"]["val-ndcg@10"]


@pytest.fixture(scope="module")
def clean(world, tmp_path_factory):
    """Fault-free reference runs, one per seed: {seed: final validation NDCG@10}."""
    out = {}
    torch.set_num_threads(1)
    with server_task_identity():  # module fixtures run before the autouse one
        for seed in SEEDS:
            fed = _run(world, tmp_path_factory.mktemp("clean") / "run",
                       InProcessGrid(capp.app, _nodes()), seed=seed)
            assert all(r["accepted"] == r["sampled"] for r in fed.state.history)
            out[seed] = _val_ndcg(fed)
    return out


def _initial_val_ndcg(world, seed: int, n: int = N_USERS) -> float:
    """Validation NDCG@10 of the untrained initial model, evaluated on every device."""
    root, info = world
    cfg = _cfg(root, seed=seed)
    cat = PublishedCatalog.load(root / "catalog" / f"catalog-{info['catalog_version']}.npz")
    weights = initial_weights(cfg, cat)
    sums = {"val-ndcg@10-sum": 0.0, "val-users": 0.0}
    for p in range(n):
        with Device.open(root / "devices" / f"device-{p}.db",
                         key_file=root / "devices" / f"device-{p}.key", catalog=cat) as dev:
            counts = dev.evaluate(weights, cfg)
            # evaluate() keeps the model on the device: leave the shared world as it was
            dev.store.delete_blob("global-model")
        for key in sums:
            sums[key] += counts[key]
    return sums["val-ndcg@10-sum"] / sums["val-users"]


def _compare(label: str, faulty: dict[int, float], clean: dict[int, float],
             assert_within: bool = True) -> None:
    """Mean validation NDCG@10 over the seeds run, faulty vs clean (-s shows the line); the
    5% bound only over QUALITY_MIN_SEEDS seeds or more."""
    f, c = float(np.mean(list(faulty.values()))), float(np.mean(list(clean.values())))
    print(f"{label}: val NDCG@10 mean over seeds {sorted(faulty)}: faulty {f:.4f}, clean {c:.4f},"
          f" ratio {f / c:.3f}; per seed faulty {faulty}, clean {clean}")
    if assert_within and len(faulty) >= QUALITY_MIN_SEEDS:
        assert f >= (1 - QUALITY_TOLERANCE) * c, f"{label}: {f:.4f} < 95% of clean {c:.4f}"


# ------------------------------------------------------------------ 1. devices crash mid-round


class CrashingGrid(InProcessGrid):
    """Raises inside the devices `doom(round, sampled)` picks in each train round, as a
    device that crashes mid-round would."""

    def __init__(self, doom, n: int = N_USERS):
        super().__init__(capp.app, _nodes(n), fault=self._fault)
        self.doom = doom
        self._doomed: set[int] = set()
        self.crashed: list[tuple[int, int]] = []  # (round, node)
        self.round = 0

    def push_messages(self, messages):
        messages = list(messages)
        train = [m.metadata.dst_node_id for m in messages if m.metadata.message_type == "train"]
        if train:
            self.round += 1
            self._doomed = set(self.doom(self.round, sorted(train)))
        return super().push_messages(messages)

    def _fault(self, msg: Message):
        node = msg.metadata.dst_node_id
        if msg.metadata.message_type == "train" and node in self._doomed:
            self.crashed.append((self.round, node))
            return RuntimeError("device crashed mid-round")
        return None


def crash_share(share: float, seed: int):
    """`share` of the sampled devices of every round, a seeded choice per round."""
    return lambda rnd, nodes: random.Random(f"{seed}:{rnd}").sample(
        nodes, round(share * len(nodes)))


def test_round_completes_without_crashed_devices_and_quality_holds(world, clean, tmp_path):
    faulty = {}
    for seed in SEEDS:
        grid = CrashingGrid(crash_share(0.3, seed))
        fed = _run(world, tmp_path / f"crash-{seed}", grid, seed=seed)
        hist = fed.state.history
        assert [r["round"] for r in hist] == [1, 2, 3, 4]
        # exactly 3 of the 10 sampled devices crashed in every round; the other 7 were averaged
        assert all((r["sampled"], r["accepted"], r["failed"]) == (10, 7, 3) for r in hist)
        # every crash is recorded with its round, node and reason
        recorded = [(r.round, r.node_id) for r in fed.validator.rejections]
        assert sorted(recorded) == sorted(grid.crashed) and len(recorded) == 12
        assert all(r.reason == "device error: RuntimeError"
                   for r in fed.validator.rejections)
        saved = json.loads((tmp_path / f"crash-{seed}" / "checkpoints" / "round-0004.json")
                           .read_text())["rejections"]
        assert saved == [r.__dict__ for r in fed.validator.rejections]
        faulty[seed] = _val_ndcg(fed)
    _compare("30% of sampled devices crash", faulty, clean)
    if len(SEEDS) >= QUALITY_MIN_SEEDS:  # the comparison means something only if training
        start = float(np.mean([_initial_val_ndcg(world, s) for s in SEEDS]))  # moved quality
        assert np.mean(list(clean.values())) > 1.2 * start


def _checkpoint_weights(run_dir: Path, rnd: int) -> list[np.ndarray]:
    with np.load(run_dir / "checkpoints" / f"round-{rnd:04d}.npz") as z:
        return [z[k] for k in sorted((k for k in z.files if k.startswith("w")),
                                     key=lambda k: int(k[1:]))]


def test_too_few_replies_leave_the_model_unchanged_and_the_run_goes_on(world, tmp_path,
                                                                        caplog):
    # round 2: three of the four sampled devices crash, one reply < min_clients = 2
    grid = CrashingGrid(lambda rnd, nodes: nodes[1:] if rnd == 2 else [])
    with caplog.at_level("WARNING", logger="fedinterest.server"):
        fed = _run(world, tmp_path / "run", grid, rounds=3, clients_per_round=4,
                   eval_clients=4)
    hist = fed.state.history
    assert [(r["round"], r["accepted"], r["failed"]) for r in hist] == [
        (1, 4, 0), (2, 1, 3), (3, 4, 0)]
    assert "round 2: 1 accepted replies < minimum 2; model unchanged" in caplog.messages
    w1, w2, w3 = (_checkpoint_weights(tmp_path / "run", r) for r in (1, 2, 3))
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))  # round 2 changed nothing
    assert any(not np.array_equal(a, b) for a, b in zip(w2, w3))  # round 3 trained again
    assert all(np.array_equal(a, b) for a, b in zip(w3, fed.state.weights))


# ------------------------------------------------------- 2. malformed and malicious updates

ATTACKS = ("nan", "shape", "scaled", "replay")
REASONS = {"nan": "contains NaN or Inf", "shape": "shape", "scaled": "exceeds the bound",
           "replay": "replayed update"}


class Attackers:
    """Compromised devices: a ClientApp mod, outermost (their own egress guard is bypassed),
    that rewrites the train replies of the nodes in `kinds`: a NaN, an array of the wrong
    shape, the honest update scaled by 1e6 (model poisoning by boosting), or an exact copy of
    an update sent in an earlier round (captured on the wire and replayed)."""

    def __init__(self, kinds: dict[int, str]):
        self.kinds = kinds
        self.wire: list[tuple[int, dict[str, np.ndarray]]] = []  # honest updates seen
        self.sent: list[tuple[int, int, str]] = []  # (round, node, attack)

    def __call__(self, message: Message, context) -> Message:  # the grid's ClientApp call
        return self.mod(message, context, lambda m, c: capp.app(message=m, context=c))

    def mod(self, msg: Message, ctx, call_next) -> Message:
        reply = call_next(msg, ctx)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        rnd = int(msg.content.config_records["config"]["server-round"])
        node = msg.metadata.dst_node_id
        arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
        kind = self.kinds.get(node)
        earlier = [a for r, a in self.wire if r < rnd]
        if kind is None or (kind == "replay" and not earlier):
            self.wire.append((rnd, arrays))
            return reply
        sent = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
        first = next(iter(arrays))
        if kind == "nan":
            arrays[first] = arrays[first].copy()
            arrays[first].reshape(-1)[0] = np.nan
        elif kind == "shape":
            arrays[first] = np.zeros((3, 3), arrays[first].dtype)
        elif kind == "scaled":
            arrays = {k: (sent[k] + 1e6 * (a - sent[k])).astype(a.dtype)
                      for k, a in arrays.items()}
        else:
            arrays = earlier[-1]
        self.sent.append((rnd, node, kind))
        record = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in arrays.items()})
        return Message(RecordDict({"arrays": record,
                                   "metrics": reply.content.metric_records["metrics"]}),
                       reply_to=msg)


def _attackers(seed: int, rounds: int, k: int, n: int = N_USERS) -> dict[int, str]:
    """10% of the n devices. Attack i's node is one sampled in round i + 1 (the replayer in
    round 4, when earlier updates exist), so every attack is tried; with more than 40
    devices the others are a seeded choice, the four attacks in turn."""
    chosen: dict[int, str] = {}
    for rnd, kind in zip(range(1, rounds + 1), ATTACKS):
        chosen[next(x for x in _sampled(seed, rnd, k, n) if x not in chosen)] = kind
    rest = sorted(set(_nodes(n)) - set(chosen))
    for i, node in enumerate(random.Random(f"attackers:{seed}").sample(
            rest, n // 10 - len(chosen))):
        chosen[node] = ATTACKS[i % len(ATTACKS)]
    assert len(chosen) == n // 10
    return chosen


def test_malicious_updates_are_rejected_logged_and_cost_only_their_absence(world, clean,
                                                                          tmp_path, caplog):
    attacked = {}
    for seed in SEEDS:
        attackers = Attackers(_attackers(seed, 4, 10))
        caplog.clear()
        with caplog.at_level("WARNING", logger="fedinterest.server"):
            fed = _run(world, tmp_path / f"attack-{seed}", InProcessGrid(attackers, _nodes()),
                       seed=seed)
        assert {kind for _, _, kind in attackers.sent} == set(ATTACKS)
        # every malicious reply, and only those, was rejected: round, node and reason
        rejections = sorted((r.round, r.node_id, r.reason) for r in fed.validator.rejections)
        assert [(r, n) for r, n, _ in rejections] == sorted((r, n) for r, n, _ in attackers.sent)
        for (rnd, node, kind), (_, _, reason) in zip(sorted(attackers.sent), rejections):
            assert REASONS[kind] in reason, (kind, reason)
            assert any(f"round {rnd}: rejected reply from node {node}: {reason}" in m
                       for m in caplog.messages)
        per_round = {r: sum(1 for rr, _, _ in attackers.sent if rr == r) for r in (1, 2, 3, 4)}
        assert [h["accepted"] for h in fed.state.history] == [10 - per_round[r]
                                                             for r in (1, 2, 3, 4)]
        # nothing of an attack reached the model: it is bit for bit the model of a run in
        # which the same replies never arrived
        lost = CrashingGrid(lambda rnd, nodes, sent=attackers.sent: [n for r, n, _ in sent
                                                                      if r == rnd])
        absent = _run(world, tmp_path / f"absent-{seed}", lost, seed=seed)
        for a, b in zip(fed.state.weights, absent.state.weights, strict=True):
            np.testing.assert_array_equal(a, b)
        attacked[seed] = _val_ndcg(fed)
    # Not asserted: losing 10% of the devices for good costs more than 5% on this small
    # world (docs/RELIABILITY.md has the numbers over 20 seeds); printed for the record.
    _compare("10% of devices malicious", attacked, clean, assert_within=False)


# --------------------------------------------------------- 3. the server is killed mid-run

REPO = Path(__file__).resolve().parents[2]


def _server_process(cfg: RunConfig, cat: Path, devices: Path, *extra: str) -> subprocess.Popen:
    """tests/helpers/reliability_server.py in a new Python process; its output goes to server*.log."""
    run_dir = Path(cfg.out_dir)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    with open(run_dir / f"server{'-resume' if '--resume' in extra else ''}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.reliability_server", str(run_dir / "config.json"),
             str(cat), str(devices), str(N_USERS), *extra],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _ledger_epsilons(cat: Path, devices: Path) -> list[float]:
    """Each device's event-level epsilon as its own ledger (in its store) has it."""
    out = []
    for p in range(N_USERS):
        with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                         catalog=PublishedCatalog.load(cat), create=False) as dev:
            out.append(dev.ledger().epsilon())
    return out


def test_server_killed_mid_round_resumes_to_the_weights_of_an_uninterrupted_run(world, tmp_path):
    kw = {"rounds": 3, "clients_per_round": 4, "eval_clients": 4, "dp": "event",
          "noise_multiplier": 1.0, "device_epsilon": 100.0}
    whole = _run(world, tmp_path / "whole", InProcessGrid(capp.app, _nodes()), **kw)

    run = tmp_path / "killed"
    cfg = _cfg(run, **kw)
    cat, devices = _copy(world, run, cfg)
    proc = _server_process(cfg, cat, devices, "--stop-in-round", "3")
    try:
        deadline = time.monotonic() + 300
        while not (run / "in-flight").exists():
            assert proc.poll() is None, (run / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 3 never started"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # mid round 3: three of its devices have trained
        proc.wait()
    ckpt = run / "checkpoints"
    assert (ckpt / "round-0002.json").exists() and not (ckpt / "round-0003.json").exists()
    # what a kill inside the next checkpoint write or log append leaves: a half-written .npz
    # (no .json marks it complete), temp files, half a message-log frame
    npz = (ckpt / "round-0002.npz").read_bytes()
    (ckpt / "round-0003.npz").write_bytes(npz[: len(npz) // 2])
    (ckpt / "round-0003.npz.tmp").write_bytes(npz[:100])
    (ckpt / "round-0003.json.tmp").write_text('{"round": 3, "n_wei')
    frames_before = len(list(read_log(run / "messages" / "messages.log")))
    with open(run / "messages" / "messages.log", "ab") as f:
        f.write(struct.pack("<II", 40, 4000) + b'{"direction": "received"')

    resumed = _server_process(cfg, cat, devices, "--resume")
    try:
        code = resumed.wait(timeout=300)
    finally:
        resumed.kill()  # only if it hangs: it has exited otherwise
        resumed.wait()
    assert code == 0, (run / "server-resume.log").read_text()[-3000:]
    with np.load(run / "final.npz") as z:
        final = [z[f"arr_{i}"] for i in range(len(z.files))]
    for a, b in zip(whole.state.weights, final, strict=True):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((ckpt / "round-0003.json").read_text())
    assert [h["round"] for h in meta["history"]] == [1, 2, 3]
    # the torn files were replaced by the resumed run's own, complete ones
    assert meta["chain"]["weights_sha256"] == hashlib.sha256(
        (ckpt / "round-0003.npz").read_bytes()).hexdigest()
    assert not list(ckpt.glob("*.tmp"))
    assert meta["chain"]["prev_sha256"] == hashlib.sha256(
        (ckpt / "round-0002.json").read_bytes()).hexdigest()
    # the three devices that trained in the killed round were asked the very same round again:
    # they sent back the answer they had kept (client/private_round.py), so none spent twice
    assert meta["device_epsilon"] == whole.state.device_epsilon
    # the message log reads to the end: the resumed run's frames follow the old ones
    frames = list(read_log(run / "messages" / "messages.log"))
    assert len(frames) > frames_before
    assert sum(h["type"] == "train" and h["direction"] == "received" for h, _ in frames) == \
        2 * 4 + 4


# ------------------------------------------------- 5. a node disconnects for a round, rejoins


class AbsentNodeGrid(InProcessGrid):
    """`node` is offline during train round `away` and back afterwards. mode "error": the
    SuperLink answers the instruction with Flower's own NODE_UNAVAILABLE error (its heartbeat
    stopped); mode "timeout": no reply arrives before the Grid's timeout."""

    def __init__(self, node: int, away: int, mode: str):
        super().__init__(capp.app, _nodes())
        self.node, self.away, self.mode = node, away, mode
        self.round = 0
        self.missed: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            self.round += 1
        return super().push_messages(messages)

    def _deliver(self, msg: Message):
        if msg.metadata.dst_node_id != self.node or self.round != self.away or \
                msg.metadata.message_type != "train":
            return super()._deliver(msg)
        self.missed.append(self.round)
        if self.mode == "timeout":
            return None
        return wire(create_message_error_unavailable_res_message(msg.metadata, "node_unavail"))

    def pull_messages(self, message_ids):
        return [m for m in super().pull_messages(message_ids) if m is not None]


@pytest.mark.parametrize("mode", ["error", "timeout"])
def test_node_absent_for_a_round_rejoins_and_its_updates_count(world, tmp_path, mode):
    seed, k = 0, 10
    node = next(n for n in _sampled(seed, 2, k) if n in _sampled(seed, 3, k))
    grid = AbsentNodeGrid(node, away=2, mode=mode)
    fed = _run(world, tmp_path / "run", grid, seed=seed, rounds=3, clients_per_round=k,
               eval_clients=k)
    assert grid.missed == [2]
    hist = fed.state.history
    assert [(r["round"], r["sampled"], r["accepted"], r["failed"]) for r in hist] == [
        (1, k, k, 0), (2, k, k - 1, 1), (3, k, k, 0)]
    # the miss is recorded against the absent node (not the SuperLink that reported it)
    [miss] = fed.validator.rejections
    assert (miss.round, miss.node_id) == (2, node)
    assert ("Node Unavailable" if mode == "error" else "no reply") in miss.reason
    # back in round 3, its update was accepted and averaged with the others
    assert node in _sampled(seed, 3, k) and hist[2]["accepted"] == k
    assert all(np.isfinite(w).all() for w in fed.state.weights)


# ------------------------------------------- 5b. devices that miss the hello, or connect late


class LateHelloGrid(InProcessGrid):
    """`late` nodes connect only after train round 1 (the grid does not list them before);
    `deaf` nodes are listed from the start but miss the first hello query (the SuperLink
    answers it with Flower's NODE_UNAVAILABLE error). `die_in_round`: the server process
    dies (an exception out of the grid) when it pushes that round's train instructions.
    `mute` nodes stay listed and miss every hello (a hung SuperNode)."""

    def __init__(self, late: set[int], deaf: set[int], die_in_round: int | None = None,
                 mute: frozenset[int] = frozenset()):
        super().__init__(capp.app, _nodes())
        self.late, self.deaf, self.die_in_round, self.mute = late, deaf, die_in_round, mute
        self.round = 0
        self.hellos: list[tuple[int, int]] = []  # (train rounds done, node)
        self.trained: list[tuple[int, int]] = []  # (round, node)

    def get_node_ids(self):
        return [n for n in super().get_node_ids() if self.round >= 1 or n not in self.late]

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            self.round += 1
            if self.round == self.die_in_round:
                raise SystemExit("server killed")
            self.trained += [(self.round, m.metadata.dst_node_id) for m in messages]
        return super().push_messages(messages)

    def _deliver(self, msg: Message):
        node = msg.metadata.dst_node_id
        assert self.round >= 1 or node not in self.late, "a node not yet connected was asked"
        if msg.metadata.message_type == "query" and "config" in msg.content.config_records \
                and msg.content.config_records["config"].get("stage") == "hello":
            self.hellos.append((self.round, node))
            if node in self.mute or (node in self.deaf
                                     and sum(n == node for _, n in self.hellos) == 1):
                return wire(create_message_error_unavailable_res_message(msg.metadata,
                                                                         "node_unavail"))
        return super()._deliver(msg)


def test_devices_that_miss_the_first_hello_are_greeted_and_sampled_later(world, tmp_path):
    seed, k = 0, 10
    # among the devices the full federation samples in round 2: two connect late, two miss
    # the first hello; without a later hello none of them would ever be sampled
    late, deaf = set(_sampled(seed, 2, k)[:2]), set(_sampled(seed, 2, k)[2:4])
    kw = {"seed": seed, "rounds": 3, "clients_per_round": k, "eval_clients": k}
    grid = LateHelloGrid(late, deaf)
    fed = _run(world, tmp_path / "run", grid, **kw)
    everyone = {_node(p) for p in range(N_USERS)}
    # the start hello asks the 36 listed nodes; the one before round 2 the 4 left; none after
    assert sorted(grid.hellos) == sorted([(0, n) for n in everyone - late]
                                         + [(1, n) for n in late | deaf])
    # round 1 samples among the 36 - 2 greeted devices, rounds 2 and 3 among all 40, by
    # pseudonym exactly as the full federation would
    greeted = {_pseudonym(p): _node(p) for p in range(N_USERS)
               if _node(p) not in late | deaf}
    assert sorted(n for r, n in grid.trained if r == 1) == sorted(
        greeted[pid] for pid in sample_round(greeted, k, seed, 1, "train"))
    for rnd in (2, 3):
        assert sorted(n for r, n in grid.trained if r == rnd) == sorted(_sampled(seed, rnd, k))
    assert late | deaf <= {n for r, n in grid.trained if r == 2}  # they trained in round 2
    hist = fed.state.history
    assert [(r["sampled"], r["accepted"], r["failed"]) for r in hist] == [(k, k, 0)] * 3
    # user-level DP would account with the smallest population any round sampled from
    assert [r["population"] for r in hist] == [N_USERS - 4] * 3

    # --resume still reproduces the run bit for bit: the server dies as round 3 starts, and
    # a new server (on a federation where everyone is connected) finishes it
    run = tmp_path / "killed"
    cat, devices = _copy(world, run)
    with pytest.raises(SystemExit):
        run_server(LateHelloGrid(late, deaf, die_in_round=3), _cfg(run, **kw), cat, devices)
    resumed = run_server(InProcessGrid(capp.app, _nodes()), _cfg(run, **kw), cat, devices,
                         resume=True)
    assert [r["population"] for r in resumed.state.history] == [N_USERS - 4] * 3
    for a, b in zip(fed.state.weights, resumed.state.weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_node_that_keeps_missing_the_hello_is_asked_less_often(world, tmp_path):
    # a hung node costs the hello timeout each time it is asked: after 1, 2, 4 ... rounds
    mute = frozenset(_sampled(0, 2, 10)[:1])
    grid = LateHelloGrid(set(), set(), mute=mute)
    fed = _run(world, tmp_path / "run", grid, seed=0, rounds=7, clients_per_round=10,
               eval_every=0)
    assert [r for r, n in grid.hellos if n in mute] == [0, 1, 3]  # not 0, 1, 2, ..., 6
    assert not {n for _, n in grid.trained} & mute
    assert [r["accepted"] for r in fed.state.history] == [10] * 7


class ReconnectGrid(InProcessGrid):
    """After train round 1, `node`'s SuperNode reconnects under a new node id (as a restarted
    SuperNode can): the grid lists `new` instead, with the same device behind it."""

    def __init__(self, node: int, new: int):
        super().__init__(capp.app, _nodes())
        self.node, self.new = node, new
        self._contexts[new] = self._contexts[node]
        self.round = 0
        self.trained: list[tuple[int, int]] = []

    def get_node_ids(self):
        return [n for n in super().get_node_ids() if n != (self.node if self.round else self.new)]

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            self.round += 1
            self.trained += [(self.round, m.metadata.dst_node_id) for m in messages]
        return super().push_messages(messages)


def test_device_reconnecting_under_a_new_node_id_is_sampled_under_it(world, tmp_path, caplog):
    seed, k = 0, 10
    node = next(n for n in _sampled(seed, 2, k) if n not in _sampled(seed, 1, k))
    new = 1 + max(_nodes())
    grid = ReconnectGrid(node, new)
    with caplog.at_level("WARNING", logger="fedinterest.server"):
        fed = _run(world, tmp_path / "run", grid, seed=seed, rounds=2, clients_per_round=k,
                   eval_clients=k)
    # greeted again under its new id, it keeps its pseudonym and so its place in the sample
    assert (2, new) in grid.trained and all(n != node for _, n in grid.trained)
    assert sorted(n for r, n in grid.trained if r == 2) == sorted(
        new if n == node else n for n in _sampled(seed, 2, k))
    assert [(r["sampled"], r["accepted"], r["failed"]) for r in fed.state.history] == [
        (k, k, 0)] * 2
    assert [m for m in caplog.messages if "answered with the pseudonym" in m] == [
        f"node {new} answered with the pseudonym of node {node}, which is no longer sampled"]


# ------------------------------------------------------------------------------ 6. fuzzing
# Each property: every input either works or raises the documented error, whose message names
# what was wrong, and nothing else ever escapes; rejected SDK input writes nothing. Generators
# mix plausible values (so many inputs get past the first check) with arbitrary ones.

FIELDS = {f.name: type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)  # no example database: the suite leaves nothing behind
CHOICES = {"dp": DP_MODES, "strategy": STRATEGIES, "model": MODELS}

_keys = st.one_of(st.sampled_from(sorted(FIELDS)),
                  st.sampled_from(sorted(k.replace("_", "-") for k in FIELDS)),
                  st.text(max_size=10))
_junk = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-1", "0", " 7 ", "1_000", "1e-5", "yes", ""]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2))


def _mostly(usual: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` four times in five (one_of would pick each branch equally often)."""
    return st.integers(0, 4).flatmap(lambda i: other if i == 4 else usual)


def _plausible(name: str) -> st.SearchStrategy:
    """Values of the field's type, mostly in range, sometimes as the strings a CLI passes."""
    typ = FIELDS.get(name)
    if name in CHOICES:
        return _mostly(st.sampled_from(CHOICES[name]), st.just("bogus"))
    if typ is bool:
        return st.one_of(st.booleans(), st.sampled_from(["true", "off", "1", "0", "maybe"]))
    if typ is int:
        ints = _mostly(st.integers(1, 120), st.integers(-2, 0))
        return st.one_of(ints, ints.map(str))
    if typ is float:
        floats = _mostly(st.floats(1e-3, 0.99), st.floats(-0.5, 60))
        return st.one_of(floats, floats.map(repr))
    return st.text(max_size=12)


@st.composite
def config_mappings(draw, junk=_junk) -> dict:
    out: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        key = draw(_keys)  # sometimes one setting in both spellings: a ConfigError
        plausible = _plausible(key.replace("-", "_"))
        out[key] = draw(_mostly(plausible, junk))
    return out


def _config_outcome(call, keys) -> RunConfig | None:
    """The config `call` builds, or None after checking it raised a ConfigError that names
    one of `keys` (the file's path for unreadable TOML). Any other exception fails the test."""
    try:
        cfg = call()
    except ConfigError as e:
        event("ConfigError")
        assert any(k in str(e) or k.replace("-", "_") in str(e) for k in keys), str(e)
        return None
    event("valid")
    cfg.validate()
    assert all(type(getattr(cfg, name)) is typ for name, typ in FIELDS.items())
    return cfg


@settings(FUZZ, max_examples=1500)
@given(values=config_mappings())
def test_fuzz_run_config_from_mapping(values):
    cfg = _config_outcome(lambda: RunConfig.from_mapping(values), list(values))
    if cfg is not None:  # a number given is the number used
        for key, value in values.items():
            name = key.replace("-", "_")
            if FIELDS[name] in (int, float) and isinstance(value, (int, float)):
                assert getattr(cfg, name) == FIELDS[name](value)  # 2**53 + 1 -> 2.0**53


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_toml_junk = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.text(max_size=12),
    st.datetimes(), st.dates(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_toml_docs = _mostly(st.one_of(
    config_mappings(_toml_junk).map(tomli_w.dumps),
    config_mappings(_toml_junk).map(lambda d: tomli_w.dumps({"fedinterest": d}))), st.one_of(
    config_mappings(_toml_junk).map(lambda d: tomli_w.dumps(d)[:-3]),  # cut off mid-value
    st.text(max_size=60),  # mostly not TOML at all
    st.builds(lambda k, v: f"{k} = {v}\n", _keys, st.text(max_size=12)),  # unquoted values
    st.binary(max_size=40)))


def _toml_keys(doc: str) -> list[str]:
    try:
        data = tomllib.loads(doc)
    except tomllib.TOMLDecodeError:
        return []
    return list(data.get("fedinterest", data))


@settings(FUZZ, max_examples=800)
@given(doc=_toml_docs,
       overrides=config_mappings(st.text(max_size=6)))
def test_fuzz_load_config_toml(fuzz_dir, doc, overrides):
    path = fuzz_dir / "run.toml"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
        keys = []
    else:
        path.write_text(doc, encoding="utf-8", errors="surrogatepass")
        keys = _toml_keys(doc)
    cfg = _config_outcome(lambda: load_config(path, overrides), [str(path), *overrides, *keys])
    if cfg is not None:  # the command line wins over the file
        alone = RunConfig.from_mapping(overrides)
        assert all(getattr(cfg, k.replace("-", "_")) == getattr(alone, k.replace("-", "_"))
                   for k in overrides)


@settings(FUZZ, max_examples=800)
@given(items=st.lists(_mostly(st.one_of(
    st.builds(lambda k, sp, v: f"{k}{sp}={sp}{v}", _keys, st.sampled_from(["", " "]),
              st.one_of(st.text(max_size=8), st.integers(-3, 99).map(str))),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(sorted(CHOICES)),
              st.sampled_from([c for cs in CHOICES.values() for c in cs]))),
    st.text(max_size=16)), max_size=4))
def test_fuzz_parse_overrides(items):
    if any("=" not in item for item in items):
        event("no '='")
        bad = next(item for item in items if "=" not in item)
        with pytest.raises(ConfigError, match=re.escape(f"--set '{bad}': expected KEY=VALUE")):
            parse_overrides(items)
        return
    parsed = parse_overrides(items)
    assert parsed == {i.split("=", 1)[0].strip(): i.split("=", 1)[1].strip() for i in items}
    _config_outcome(lambda: load_config(None, parsed), list(parsed))


# Inputs the fuzzers above found that shared/config.py once let through, or answered with
# another exception than ConfigError (TypeError, OverflowError, IsADirectoryError): each must
# now be a ConfigError that names the key and says what was expected.
CONFIG_GAPS = [
    pytest.param({"rounds": True}, "'rounds' expects an integer, got bool", id="bool-for-int"),
    pytest.param({"lr": True}, "'lr' expects a number, got bool", id="bool-for-float"),
    pytest.param({"secagg": 2}, "'secagg' expects true or false", id="int-for-bool"),
    pytest.param({"dataset": [1, 2]}, "'dataset' expects a string, got list", id="list-for-str"),
    pytest.param({"out_dir": None}, "'out_dir' expects a string, got NoneType",
                 id="none-for-str"),
    pytest.param({"out-dir": ""}, "'out-dir' expects a non-empty string", id="empty-str"),
    pytest.param({"user_noise_multiplier": float("nan")},
                 "'user_noise_multiplier' expects a finite number >= 0", id="nan-user-noise"),
    pytest.param({"user_noise_multiplier": -1.0},
                 "'user_noise_multiplier' expects a finite number >= 0",
                 id="negative-user-noise"),
    pytest.param({"popularity_noise": -2.0}, "'popularity_noise' expects a finite number >= 0",
                 id="negative-popularity-noise"),
    pytest.param({"proximal_mu": float("nan")}, "'proximal_mu' expects a finite number >= 0",
                 id="nan-proximal-mu"),
    pytest.param({"noise-multiplier": "inf"}, "'noise-multiplier' expects a positive finite",
                 id="inf-noise"),
    pytest.param({"max_grad_norm": -1.0}, "'max_grad_norm' expects a positive finite",
                 id="negative-clip"),
    pytest.param({"device_epsilon": float("inf")}, "'device_epsilon' expects a positive finite",
                 id="inf-epsilon"),
    pytest.param({"delta": 1.0}, "'delta' expects a number in (0, 1)", id="delta-1"),
    pytest.param({"lr": "nan"}, "'lr' expects a positive finite number, got float nan",
                 id="nan-lr-string"),
    pytest.param({"trim_beta": 0.5}, "'trim_beta' expects a number in [0, 0.5)",
                 id="trim-beta-half"),
    pytest.param({"eval_clients": -5}, "'eval_clients' expects an integer in [0, ",
                 id="negative-eval-clients"),
    pytest.param({"seed": 2**64}, "'seed' expects an integer in [0, 9223372036854775807]",
                 id="seed-beyond-int64"),
    pytest.param({"lr": 10**400}, "'lr' expects a number, got int 1000", id="overflow"),
    pytest.param({"device_epsilon": 0.0, "device-epsilon": 1.0},
                 "keys 'device_epsilon' and 'device-epsilon' are the same setting",
                 id="one-key-two-spellings"),
]


@pytest.mark.parametrize(("values", "message"), CONFIG_GAPS)
def test_config_gaps_found_by_fuzzing(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        RunConfig.from_mapping(values, source="gap.toml")
    assert str(e.value).startswith("gap.toml: ")  # the source is named


@pytest.mark.parametrize(("doc", "message"), [
    ("fedinterest = 5", "key 'fedinterest' expects a table of settings ([fedinterest]), got int"),
    ('fedinterest = "x"', "key 'fedinterest' expects a table of settings"),
    ("fedinterest = [1]", "key 'fedinterest' expects a table of settings"),
    ("[fedinterest]\nlr = true", "key 'lr' expects a number, got bool True"),
    ("rounds = 3\nrounds = 4", "not valid TOML"),
    (None, "is a directory, expected a TOML config file"),
    ("file-as-folder", "cannot read the config file"),
])
def test_config_file_gaps_found_by_fuzzing(fuzz_dir, doc, message):
    path = fuzz_dir / "gap.toml"
    if doc is None:
        path = fuzz_dir  # a directory where a file was expected
    elif doc == "file-as-folder":
        path.write_text("")
        path = path / "run.toml"  # NotADirectoryError: an OSError other than not-found
    else:
        path.write_text(doc)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        load_config(path)


def test_command_line_overrides_the_file_in_either_spelling(fuzz_dir):
    path = fuzz_dir / "spelled.toml"
    path.write_text("device-epsilon = 3.0\nrounds = 2\n")
    cfg = load_config(path, {"device_epsilon": "4"})
    assert (cfg.device_epsilon, cfg.rounds) == (4.0, 2)
    with pytest.raises(ConfigError, match=re.escape(f"{path}, overridden on the command line: "
                                                    "key 'rounds' expects an integer in [1")):
        load_config(path, {"rounds": "0"})


@pytest.fixture(scope="module")
def sdk_device(tmp_path_factory, tiny_bert_dir):
    """A device as an app holds it: published catalog, the (tiny) text encoder, a store."""
    folder = tmp_path_factory.mktemp("sdk")
    vecs = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    cat = PublishedCatalog([f"item{i}" for i in range(20)], vecs, [("t",)] * 20,
                           np.zeros(20, np.float32), "test", [f"Item {i}" for i in range(20)])
    (folder / "k").write_bytes(bytes(range(32)))
    dev = Device.open(folder / "u.db", key_file=folder / "k", catalog=cat,
                      encoder=TextEncoder(str(tiny_bert_dir), cache=None))
    yield dev
    dev.close()


NEXT = object()  # stands for "a valid timestamp": after the last event, not in the future
_catalog_items = st.sampled_from([f"item{i}" for i in range(20)])
_items = _mostly(_catalog_items, st.one_of(
    st.text(max_size=8), st.integers(), st.none(), st.binary(max_size=4), st.floats()))
_texts = _mostly(st.one_of(st.none(), st.text(max_size=40)), st.one_of(
    st.binary(max_size=12), st.text(alphabet=st.characters(categories=("Cs", "Ll")), max_size=6),
    st.builds(lambda n: "a" * n, st.integers(9_990, 10_010)), st.integers()))
_stamps = _mostly(st.just(NEXT), st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.floats(), st.booleans(), st.text(max_size=4),
    st.builds(lambda d: int(time.time()) + d, st.integers(250, 400))))
_ratings = _mostly(st.one_of(st.none(), st.floats(0, 5)), st.one_of(
    st.floats(), st.integers(-3, 8), st.booleans(), st.text(max_size=3)))


@settings(FUZZ, max_examples=300)
@given(item=_items, text=_texts, timestamp=_stamps, rating=_ratings)
def test_fuzz_device_record(sdk_device, item, text, timestamp, rating):
    events = sdk_device.store.events()
    before = len(events)
    if timestamp is NEXT:
        timestamp = max([e.timestamp for e in events], default=1_600_000_000) + 1
    t0 = int(time.time())
    try:
        event_id = sdk_device.record(item, text=text, timestamp=timestamp, rating=rating)
    except EventValidationError as e:
        event("rejected: " + e.field)
        assert e.field in ("item", "timestamp", "rating", "text") and e.field in str(e)
        assert sdk_device.store.n_events() == before  # nothing written
        return
    event("recorded")
    assert sdk_device.store.n_events() == before + 1
    [stored] = [e for e in sdk_device.store.events() if e.id == event_id]
    assert stored.item == str(item)
    assert (t0 <= stored.timestamp <= time.time()) if timestamp is None else (
        stored.timestamp == timestamp)
    assert stored.text == (text.decode() if isinstance(text, bytes) else text)

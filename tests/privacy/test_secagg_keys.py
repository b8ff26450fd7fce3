"""Finding 5 of issue 19: SecAgg+ keys relayed by the server unauthenticated, and releases of
2 contributors.

An active server that swaps a victim's neighbours' key-agreement keys for its own learns the
pairwise masks and the keys the shares are encrypted under, and unmasks the victim's input.
On main the victim
accepted the server's keys and went on to send its shares and its masked input. Now every relayed key
pair must be signed, for its node id, by a device certified by the provisioning authority,
or the device aborts at SHARE_KEYS, before any share or masked input leaves. And a release
summed over fewer than MIN_CONTRIBUTORS devices is refused: on main one dropout among 3
devices let the server unmask the sum of the other 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.server.secure_round import secure_mean
from fedinterest.shared.secure_protocol import (
    COUNT_QUANTISATION,
    MAX_WEIGHT_KEY,
    POPULARITY_STAGE,
    STAGE_KEY,
    count_schema,
)
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

from tests.helpers import wire_world as w

NODES = {1000 + 7919 * (i + 1): {"partition-id": i} for i in range(3)}
VICTIM = min(NODES)


@pytest.fixture(autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


class TamperingGrid(InProcessGrid):
    """The server's side of the wire: `tamper(msg)` edits each message before delivery."""

    def __init__(self, tamper=None, fault=None):
        super().__init__(capp.app, NODES, fault)
        self.tamper = tamper

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if self.tamper is not None:
                self.tamper(msg)
        return super().push_messages(messages)


def _stage(msg):
    cfgs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return cfgs.get(Key.STAGE) if cfgs is not None else None


def _fresh_keys() -> list[bytes]:
    return [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]


def _count_round(tmp_path, grid):
    """One SecAgg+ popularity count over the three devices, as the server runs it."""
    cat, cat_path = w.catalog(tmp_path)
    devices = tmp_path / "devices"
    authority = w.authority()
    for p in range(len(NODES)):
        w.provision(devices, p, cat, [1 + p, 5, 9, 13 + p, 20, 33], authority)
    cfg = w.config(tmp_path, popularity=True)
    config = {**cfg.to_flower(), "catalog-path": str(cat_path), "catalog-version": cat.version,
              "devices-dir": str(devices), "server-round": 0, STAGE_KEY: POPULARITY_STAGE,
              MAX_WEIGHT_KEY: 1.0}
    ins = FitIns(ndarrays_to_parameters([np.zeros(1, np.float32)]), config)
    return secure_mean(grid, dict.fromkeys(sorted(NODES), ins), 0, COUNT_QUANTISATION,
                       count_schema(len(cat)), frozenset(), timeout=60)


def _victim_replies(grid) -> dict:
    """The victim's reply per SecAgg+ stage (replies are matched to what was sent)."""
    out = {}
    for reply in grid.received:
        if reply.metadata.src_node_id != VICTIM:
            continue
        cfgs = None if reply.has_error() else reply.content.config_records.get(
            RECORD_KEY_CONFIGS)
        if cfgs is not None and Key.MASKED_PARAMETERS in cfgs:
            out[Stage.COLLECT_MASKED_VECTORS] = reply
        elif cfgs is not None and Key.CIPHERTEXT_LIST in cfgs:
            out[Stage.SHARE_KEYS] = reply
        elif reply.has_error():
            out.setdefault("error", reply)
    return out


def _substitute_a_neighbour(msg):
    if _stage(msg) == Stage.SHARE_KEYS and msg.metadata.dst_node_id == VICTIM:
        cfgs = msg.content.config_records[RECORD_KEY_CONFIGS]
        neighbour = next(k for k in cfgs if k.isdigit() and int(k) != VICTIM)
        cfgs[neighbour] = _fresh_keys()  # the server's own keys under the neighbour's id


def _substitute_and_sign(msg):
    """The substitution, with a certificate and signature the server made itself: from an
    authority of its own, which the devices do not trust."""
    if _stage(msg) == Stage.SHARE_KEYS and msg.metadata.dst_node_id == VICTIM:
        cfgs = msg.content.config_records[RECORD_KEY_CONFIGS]
        neighbour = next(k for k in cfgs if k.isdigit() and int(k) != VICTIM)
        cfgs[neighbour] = _fresh_keys()
        fake = w.authority()
        if fake is not None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from fedinterest.shared.secure_identity import AUTH_PREFIX, public_bytes, sign_keys

            key = Ed25519PrivateKey.generate()
            cfgs[AUTH_PREFIX + neighbour] = [fake.certify(public_bytes(key.public_key())),
                                             sign_keys(key, int(neighbour), *cfgs[neighbour])]


@pytest.mark.parametrize("attack", [_substitute_a_neighbour, _substitute_and_sign],
                         ids=["substituted-keys", "substituted-keys-signed-by-the-server"])
def test_the_victim_aborts_before_sending_shares_or_its_masked_input(tmp_path, attack):
    grid = TamperingGrid(attack)
    _count_round(tmp_path, grid)
    replies = _victim_replies(grid)
    assert Stage.SHARE_KEYS not in replies  # main: encrypted shares for the server's keys
    assert Stage.COLLECT_MASKED_VECTORS not in replies  # main: the masked input
    assert "error" in replies


def test_an_honest_round_with_authenticated_keys_releases_the_sum(tmp_path):
    grid = TamperingGrid()
    outcome = _count_round(tmp_path, grid)
    assert outcome.mean is not None and len(outcome.contributors) == 3
    assert Stage.COLLECT_MASKED_VECTORS in _victim_replies(grid)


def test_a_release_of_two_contributors_is_refused(tmp_path):
    """Three devices, one drops before uploading: 2 masked inputs, which threshold 2 of 3
    would unmask. The two refuse to release their shares; nothing is released."""
    dropped = max(NODES)

    def fault(msg):
        if msg.metadata.dst_node_id == dropped and _stage(msg) == Stage.COLLECT_MASKED_VECTORS:
            return ConnectionError("device went offline")
        return None

    grid = TamperingGrid(fault=fault)
    outcome = _count_round(tmp_path, grid)
    assert outcome.mean is None  # main: the sum of the 2 remaining devices
    unmask = [r for r in grid.received if r.has_error()
              and r.metadata.src_node_id != dropped]
    assert len(unmask) == 2


def test_the_server_cannot_lower_the_device_floor(tmp_path):
    """A round config asking for 1 contributor changes nothing: the device floor holds."""
    from fedinterest.client.secagg import _min_contributors
    from fedinterest.shared.secure_protocol import MIN_CONTRIBUTORS, MIN_CONTRIBUTORS_KEY

    assert _min_contributors({MIN_CONTRIBUTORS_KEY: 1}) == MIN_CONTRIBUTORS == 3
    assert _min_contributors({MIN_CONTRIBUTORS_KEY: 7}) == 7

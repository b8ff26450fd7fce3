"""Finding 4 of issue 19: the event-level relation (add/remove one segment) must be made
true by what leaves the device.

On main a train reply carried num-examples = n (the number of segments), dp-steps and
epsilon, and q = B / n and the step count depended on n: histories of 150/160/170 events
gave 15/16/17 examples, 2/2/3 steps and three different epsilons, telling neighbours apart
with certainty. Now a reply carries the update and `refused` only, and DP-SGD runs with a
fixed q, a fixed number of steps and a fixed divisor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.client import client_app as capp
from fedinterest.client.device import Device
from fedinterest.shared.privacy import EVENT
from fedinterest.shared.sequences import SegmentDataset
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import MessageType

from tests.helpers import wire_world as w
from tests.helpers.device_world import provision_policies

SIZES = (150, 160, 170)  # with segment_len 10 and 2 held out: 15, 16 and 17 segments


@pytest.fixture(autouse=True)
def _env():
    torch.set_num_threads(1)
    with server_task_identity():
        yield


def _replies(tmp_path, update_format: str):
    cat, cat_path = w.catalog(tmp_path)
    devices = tmp_path / "devices"
    rng = np.random.default_rng(1)
    for p, n in enumerate(SIZES):
        w.provision(devices, p, cat, [int(i) for i in rng.integers(0, w.N_ITEMS, n)])
    cfg = w.config(tmp_path, update_format=update_format)
    provision_policies(devices, cfg)  # the devices' owners allow this run's mechanism
    names, weights = w.initial(cfg, cat)
    out = []
    for p in range(len(SIZES)):
        msg = w.message(cfg, cat, cat_path, devices, names, weights, MessageType.TRAIN)
        reply = capp.app(message=msg, context=w.context(p))
        assert not reply.has_error(), reply.error
        out.append(reply)
    return out, devices, cat


def _visible(reply) -> tuple:
    """Everything of a reply but the noised values: records, keys, metric values, shapes."""
    c = reply.content
    arrays = {r: [(k, a.dtype, tuple(a.shape)) for k, a in rec.items()]
              for r, rec in c.array_records.items()}
    metrics = {r: dict(rec) for r, rec in c.metric_records.items()}
    return arrays, metrics, {r: dict(rec) for r, rec in c.config_records.items()}


def test_replies_for_150_160_170_events_differ_only_in_the_noised_arrays(tmp_path):
    replies, _, _ = _replies(tmp_path, "arrays")
    seen = [_visible(r) for r in replies]
    assert seen[0] == seen[1] == seen[2]  # main: num-examples 15/16/17, dp-steps, epsilon
    assert seen[0][1] == {"metrics": {"refused": 0.0, "decline-reason": 0.0}}


def test_dp_sgd_runs_the_same_mechanism_whatever_the_history_length(tmp_path):
    """The ledger (on the device) records one (noise, q, steps) per round: the same for all
    three histories, so the epsilon is the same too."""
    _, devices, cat = _replies(tmp_path, "arrays")
    entries = []
    for p in range(len(SIZES)):
        with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                         catalog=cat, create=False) as dev:
            led = dev.ledger()
            entries.append((led.charges[EVENT], led.epsilon(EVENT)))
    assert entries[0] == entries[1] == entries[2]


def test_appending_an_event_changes_only_the_last_segment():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 40, 31)
    ts = np.arange(31) * 60

    def segments(n):
        data = SegmentDataset.from_events(items[:n], ts[:n], None, 40, 10, 0, 4)
        return [tuple(data.items[s:e]) for s, e in data.bounds]

    for n in (20, 25, 29, 30):
        before, after = segments(n), segments(n + 1)
        assert after[:len(before) - 1] == before[:-1]  # all but the last are unchanged
        assert len(after) - len(before) in (0, 1)

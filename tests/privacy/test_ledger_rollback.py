"""Issue 19, finding 7 (ledger) and the one accountant: the ledger row had no version, so
putting back an older sealed copy lowered the recorded epsilon undetected (47.3 -> 7.4) and
deleting it reset it to 0. Now the ledger is a versioned blob (client/store.py): its version
is bound into its associated data and recorded in a sealed meta row, so a rollback or a
deletion is detected and the device declines every round until it is resolved. The ledger
composes every release per unit (event, user)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from fedinterest.client.device import LEDGER_BLOB, Device
from fedinterest.shared.privacy import EventLedger, gaussian_epsilon

from tests.helpers.device_world import initial_weights, train


def _open(world):
    devices = world[2]
    return Device.open(devices / "device-0.db", key_file=devices / "device-0.key",
                       create=False)


def _ledger_row(world) -> bytes:
    with sqlite3.connect(world[2] / "device-0.db") as c:
        return c.execute("SELECT value FROM blobs WHERE name = ?", (LEDGER_BLOB,)).fetchone()[0]


def _epsilon(world) -> float:
    with _open(world) as dev:
        return dev.privacy()["epsilon"]


def _three_rounds(world):
    cfg = world[3]
    names, w = initial_weights(cfg, world[0])
    train(cfg, world, w, names, rnd=1)
    old = _ledger_row(world)
    after_one = _epsilon(world)
    for rnd in (2, 3):
        train(cfg, world, w, names, rnd=rnd)
    assert _epsilon(world) > after_one > 0
    return cfg, names, w, old


def test_an_older_ledger_put_back_is_detected_and_the_device_declines(world):
    cfg, names, w, old = _three_rounds(world)
    with sqlite3.connect(world[2] / "device-0.db") as c:
        c.execute("UPDATE blobs SET value = ? WHERE name = ?", (old, LEDGER_BLOB))
    with pytest.raises(Exception, match="not the latest version"):
        _epsilon(world)  # on main: the older, lower epsilon is reported
    back, metrics = train(cfg, world, w, names, rnd=4)
    assert metrics["refused"] == 1.0 and metrics["decline-reason"] == 8  # LEDGER_UNTRUSTED
    assert all(np.array_equal(a, b) for a, b in zip(back, w))


def test_a_deleted_ledger_is_detected_and_the_device_declines(world):
    cfg, names, w, _ = _three_rounds(world)
    with sqlite3.connect(world[2] / "device-0.db") as c:
        c.execute("DELETE FROM blobs WHERE name = ?", (LEDGER_BLOB,))
    with pytest.raises(Exception, match="deleted"):
        _epsilon(world)  # on main: 0.0
    _, metrics = train(cfg, world, w, names, rnd=4)
    assert metrics["refused"] == 1.0 and metrics["decline-reason"] == 8
    with sqlite3.connect(world[2] / "device-0.db") as c:  # the version record too: still caught
        c.execute("DELETE FROM meta WHERE key LIKE 'version:%'")
    with pytest.raises(Exception, match="version record was deleted"):
        _epsilon(world)


def test_the_ledger_composes_every_release_per_unit():
    """DP-SGD at the event level gives EventLedger's epsilons exactly; the popularity count
    and user-level updates compose at the user level, without amplification."""
    from fedinterest.shared.privacy import EVENT, USER, DeviceLedger, dp_sgd_event, gaussian_event

    old, led = EventLedger(delta=1e-5), DeviceLedger(delta=1e-5)
    view = led.event_view()
    for rnd in range(1, 6):
        old.record(rnd, 0.8, 0.25, 2)
        view.record(rnd, 0.8, 0.25, 2)
    assert led.epsilon(EVENT) == pytest.approx(old.epsilon(), rel=1e-12)
    assert led.epsilon_after(EVENT, dp_sgd_event(0.8, 0.25, 2)) == pytest.approx(
        old.epsilon_after(0.8, 0.25, 2), rel=1e-12)
    assert led.epsilon(USER) == 0.0
    pop = led.charge(USER, gaussian_event(2.0), "popularity-count", 0)
    assert pop == pytest.approx(gaussian_epsilon(2.0, 1e-5), rel=1e-9)  # 2.17, as the server's
    both = led.charge(USER, gaussian_event(0.5), "dp-fedavg update", 1)
    assert both > pop + gaussian_epsilon(0.5, 1e-5) * 0.5  # composed, not the max
    again = DeviceLedger.from_json(led.to_json())
    assert again.epsilon(USER) == pytest.approx(both) and again.epsilon(EVENT) == pytest.approx(
        old.epsilon())
    # an EventLedger's JSON (what stores before this held) carries over
    assert DeviceLedger.from_json(old.to_json()).epsilon(EVENT) == pytest.approx(old.epsilon())
    assert EventLedger.from_json(led.to_json()).epsilon() == pytest.approx(old.epsilon())


def test_a_store_with_an_unversioned_ledger_migrates(tmp_path):
    """A v2 store's ledger (sealed without a version) becomes version 1 of a v3 store."""
    from fedinterest.client.store import DeviceStore
    from fedinterest.shared.privacy import EVENT

    key = tmp_path / "k"
    key.write_bytes(bytes(range(32)))
    led = EventLedger(delta=1e-5)
    led.record(1, 1.0, 0.5, 3)
    with DeviceStore.open(tmp_path / "s.db", key_file=key) as st:  # made as v2 wrote it
        sealed = st._sealer.seal(led.to_json().encode(), "blobs", LEDGER_BLOB, "value")
    with sqlite3.connect(tmp_path / "s.db") as c:
        c.execute("INSERT INTO blobs(name, value) VALUES (?, ?)", (LEDGER_BLOB, sealed))
        c.execute("DELETE FROM meta WHERE key LIKE 'version:%'")
        c.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
    with Device.open(tmp_path / "s.db", key_file=key, create=False) as dev:
        assert dev.store.schema_version == 3
        assert dev.ledger().epsilon(EVENT) == pytest.approx(led.epsilon())

"""One message's decoded arrays and raw texts (client/message_cache.py): the egress guard scans
a reply for the texts the round itself decrypted without opening the store again, still
blocks a leak, and nothing handed for one message serves another."""

from __future__ import annotations

import numpy as np
import pytest
from fedinterest.client import client_app as capp
from fedinterest.client import egress, message_cache
from fedinterest.client.device import Device
from fedinterest.client.store import DeviceStore
from fedinterest.simulations.inprocess_grid import server_task_identity
from flwr.app import Array, ArrayRecord

from tests.helpers.device_world import (
    CANARY,
    context,
    initial_weights,
    make_world,
    train_message,
)

pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


@pytest.fixture
def world(tmp_path):
    with server_task_identity():
        yield make_world(tmp_path, n_devices=2)


def _count_opens(monkeypatch) -> list[int]:
    opened = []
    real = DeviceStore.open.__func__

    def counting(cls, *a, **kw):
        opened.append(1)
        return real(cls, *a, **kw)

    monkeypatch.setattr(DeviceStore, "open", classmethod(counting))
    return opened


def _smuggle_canary(monkeypatch) -> None:
    """The round's update carries the device's text in its first floats."""
    real_fit = Device.fit

    def leaky_fit(self, *a, **kw):
        res = real_fit(self, *a, **kw)
        raw = np.frombuffer(CANARY.encode()[:24], np.float32)
        res.weights[0] = res.weights[0].copy()
        res.weights[0].reshape(-1)[:len(raw)] = raw
        return res

    monkeypatch.setattr(Device, "fit", leaky_fit)


def _send(world, p: int = 0):
    cat, cat_path, devices, cfg = world
    names, weights = initial_weights(cfg, cat)
    return capp.app(train_message(cfg, cat, cat_path, devices, weights, names), context(p))


def test_guard_uses_the_rounds_texts_and_does_not_reopen_the_store(world, monkeypatch):
    opened = _count_opens(monkeypatch)
    reply = _send(world)
    assert not reply.has_error(), reply.error.reason
    assert len(opened) == 1  # the handler's open; the guard took the texts it read


def test_guard_still_blocks_the_devices_text_from_the_handed_texts(world, monkeypatch):
    _smuggle_canary(monkeypatch)
    opened = _count_opens(monkeypatch)
    reply = _send(world)
    assert reply.has_error() and reply.error.code == egress.ERROR_BLOCKED
    assert "raw text" in reply.error.reason and len(opened) == 1
    # the same leak with nothing handed: the guard reads the store and blocks it too
    monkeypatch.setattr(message_cache, "take_texts", lambda msg, ctx: None)
    reply = _send(world)
    assert reply.has_error() and reply.error.code == egress.ERROR_BLOCKED and len(opened) == 3


def test_texts_handed_for_one_message_serve_no_other(world):
    cat, cat_path, devices, cfg = world
    names, weights = initial_weights(cfg, cat)
    a = train_message(cfg, cat, cat_path, devices, weights, names, rnd=1)
    b = train_message(cfg, cat, cat_path, devices, weights, names, rnd=2)
    ctx = context(0)
    message_cache.hand_texts(a, ctx, ["device 0's text"])
    assert message_cache.take_texts(b, ctx) is None  # another message: read the store
    assert message_cache.take_texts(a, ctx) is None  # and the handed texts are gone
    message_cache.hand_texts(a, ctx, ["device 0's text"])
    assert message_cache.take_texts(a, context(1)) is None  # another node's context
    message_cache.hand_texts(a, ctx, ["device 0's text"])
    assert message_cache.take_texts(a, ctx) == ["device 0's text"]
    assert message_cache.take_texts(a, ctx) is None  # taken once


def test_a_round_that_fails_after_handing_its_texts_leaves_none_behind(world, monkeypatch):
    real = capp._hand_texts

    def hand_then_fail(msg, ctx, device):
        real(msg, ctx, device)
        raise RuntimeError("failed after the history was read")

    monkeypatch.setattr(capp, "_hand_texts", hand_then_fail)
    reply = _send(world)
    assert reply.has_error() and reply.error.code == egress.ERROR_DEVICE
    assert not message_cache._TEXTS


def test_texts_read_are_dropped_when_the_device_records_or_closes(world):
    cat, _, devices, _ = world
    dev = Device.open(devices / "device-0.db", key_file=devices / "device-0.key", catalog=cat,
                      create=False)
    assert dev.raw_texts_read() is None
    dev._history()
    assert dev.raw_texts_read() and set(dev.raw_texts_read()) == {CANARY}
    dev.record("39", text="a new note", timestamp=10**6)
    assert dev.raw_texts_read() is None
    dev._history()
    assert "a new note" in dev.raw_texts_read()
    dev.close()
    assert dev.raw_texts_read() is None


def test_arrays_are_parsed_once_per_record(monkeypatch):
    calls = []
    real = Array.numpy

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Array, "numpy", counting)
    rec = ArrayRecord({"a": Array(np.arange(3.0)), "b": Array(np.ones((2, 2)))})
    first = message_cache.decoded(rec)
    again = message_cache.decoded(rec)
    assert again is first and len(calls) == 2
    assert np.array_equal(first["a"], np.arange(3.0)) and list(first) == ["a", "b"]
    other = ArrayRecord({"a": Array(np.zeros(3))})
    assert np.array_equal(message_cache.decoded(other)["a"], np.zeros(3)) and len(calls) == 3

"""The device SDK's process-level inference model (client/model_cache.py): devices that
evaluate the same global model share one built model and its item embeddings, get exactly
what a model built for them alone gives, and the caches keep two entries at most."""

from __future__ import annotations

import numpy as np
import pytest
from fedinterest.client import model_cache
from fedinterest.client.device import Device
from fedinterest.simulations.inprocess_grid import server_task_identity

from tests.helpers.device_world import initial_weights, make_world


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cache, "_MODELS", {})
    monkeypatch.setattr(model_cache, "_EMBEDDINGS", {})
    with server_task_identity():
        yield make_world(tmp_path, n_devices=3, events=20)


def _evaluate(world, p: int, weights) -> tuple[dict, object]:
    cat, _, devices, cfg = world
    with Device.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                     catalog=cat, create=False) as dev:
        return dev.evaluate(weights, cfg), dev._model


def test_devices_share_the_model_and_get_what_a_fresh_build_gives(world):
    cat, _, _, cfg = world
    _, weights = initial_weights(cfg, cat)
    shared = [_evaluate(world, p, weights) for p in range(3)]
    assert shared[0][1] is shared[1][1] is shared[2][1] and len(model_cache._MODELS) == 1
    for p in range(3):
        model_cache._MODELS.clear()
        model_cache._EMBEDDINGS.clear()
        alone, model = _evaluate(world, p, weights)
        assert model is not shared[p][1] and alone == shared[p][0]


def test_other_weights_get_their_own_model_and_two_are_kept(world):
    cat, _, _, cfg = world
    _, weights = initial_weights(cfg, cat)
    models = []
    for k in range(3):
        moved = [w + np.float32(0.01 * k) for w in weights]
        models.append(_evaluate(world, 0, moved)[1])
    assert len({id(m) for m in models}) == 3
    assert len(model_cache._MODELS) == len(model_cache._EMBEDDINGS) == 2
    assert models[0] not in model_cache._MODELS.values()

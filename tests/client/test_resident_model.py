"""The DP model and its Opacus wrapping kept per process between rounds
(client/dp_training.py, resident_dp_model): a round on the resident model gives exactly what
a freshly built one gives, whatever the previous device's round left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.client import dp_training
from fedinterest.client.dp_training import resident_dp_model, train_local
from fedinterest.shared.privacy import EventLedger

from tests.client.test_dp_training import (
    catalog,
    device_data,
    global_weights,
    model_config,
    run_config,
)

pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each test starts as a new worker process would: nothing resident."""
    torch.set_num_threads(1)
    monkeypatch.setattr(dp_training, "_RESIDENT", {})


def _round(seed: int, weights=None, **cfg):
    mcfg = model_config()
    feats, topics = catalog()
    w = global_weights(mcfg) if weights is None else weights
    return train_local(mcfg, w, device_data(seed=seed), feats, topics, run_config(**cfg),
                       EventLedger(), 1, seed=seed)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights))


def test_second_device_on_the_resident_model_equals_a_fresh_build():
    fresh_b = _round(seed=2)
    dp_training._RESIDENT.clear()
    first_a = _round(seed=1)  # builds and wraps the resident model
    assert len(dp_training._RESIDENT) == 1
    (model, wrapped), = dp_training._RESIDENT.values()
    assert wrapped is not None  # the GradSampleModule is kept with it
    resident_b = _round(seed=2)  # reuses both
    assert next(iter(dp_training._RESIDENT.values()))[0] is model
    assert _same(resident_b, fresh_b) and resident_b.loss == fresh_b.loss
    assert not _same(first_a, resident_b)


def test_adam_state_and_dropout_do_not_carry_over():
    fresh_b = _round(seed=2, client_optimizer="adam", lr=0.01)
    dp_training._RESIDENT.clear()
    _round(seed=1, client_optimizer="adam", lr=0.01)
    assert _same(_round(seed=2, client_optimizer="adam", lr=0.01), fresh_b)


def test_an_interrupted_round_leaves_nothing_for_the_next_device():
    """Device A's round stopped after a forward pass (Opacus' hooks captured its
    activations) with stale gradients and sums on the parameters: device B's round is still
    exactly B's round on a fresh model."""
    fresh_b = _round(seed=2)
    dp_training._RESIDENT.clear()
    _round(seed=1)
    (model, _wrapped), = dp_training._RESIDENT.values()
    batch = dp_training.SegmentTuples(device_data(seed=1))
    from fedinterest.shared.sequences import collate

    sample = collate([batch.data[i] for i in range(4)])
    model.example_losses(sample)  # forward only: activations stay on the hooked layers
    assert any("activations" in m.__dict__ for m in model.modules())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
        p.summed_grad = torch.ones_like(p)
    assert _same(_round(seed=2), fresh_b)


def test_resident_model_loads_the_new_weights_and_catalog():
    mcfg = model_config()
    feats, topics = catalog()
    w1, w2 = global_weights(mcfg, seed=1), global_weights(mcfg, seed=2)
    m1 = resident_dp_model(mcfg, w1, feats, topics, None)
    feats2, _ = catalog(seed=5)
    m2 = resident_dp_model(mcfg, w2, feats2, None, None)
    assert m2 is m1
    fresh = dp_training.build_local_model(mcfg, w2, feats2, None, None, dp=True)
    for (name, a), (_, b) in zip(m2.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(m2.item_feats, fresh.item_feats)
    assert m2.topic_dist.shape == fresh.topic_dist.shape == (0, mcfg.n_topics)


def test_another_model_config_gets_its_own_model():
    mcfg = model_config()
    feats, topics = catalog()
    m1 = resident_dp_model(mcfg, global_weights(mcfg), feats, topics, None)
    other = model_config(dropout=0.1)
    m2 = resident_dp_model(other, global_weights(other), feats, topics, None)
    assert m2 is not m1 and m2.cfg.dropout == 0.1 and len(dp_training._RESIDENT) == 2


def test_nothing_of_a_devices_round_stays_on_the_resident_model_but_its_weights():
    """Per-sample gradients, their sums and captured activations are functions of the
    device's examples before any noise: none is left once its round returns."""
    _round(seed=1)
    (model, _wrapped), = dp_training._RESIDENT.values()
    for p in model.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None
        assert not hasattr(p, "summed_grad") and not hasattr(p, "_current_grad_sample")
    assert not any("activations" in m.__dict__ for m in model.modules())

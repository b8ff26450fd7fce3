"""On-device training: Opacus' per-sample gradients, clipping and noise as configured, the
privacy budget, accounting across rounds, plain training, FedProx and the wire schema."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.client.dp_training import (
    SegmentTuples,
    build_local_model,
    dp_steps,
    sample_rate,
    train_local,
)
from fedinterest.shared.config import RunConfig
from fedinterest.shared.item_features import POP_DIM, item_feature_matrix
from fedinterest.shared.model import ModelConfig, build_model, get_weights, weight_schema
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.sequences import SegmentDataset, collate
from fedinterest.simulations.audit.attacks import PackedBatch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

from tests.helpers.legacy_defaults import legacy_config

N_ITEMS, TEXT_DIM, HIDDEN, N_TOPICS, T, K = 50, 8, 16, 3, 10, 8
pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def model_config(kind: str = "gru", **kw) -> ModelConfig:
    kw = {"n_topics": N_TOPICS, **kw}
    return ModelConfig(kind=kind, n_items=N_ITEMS, item_feat_dim=TEXT_DIM + POP_DIM,
                       text_dim=TEXT_DIM, hidden=HIDDEN, segment_len=T, context_len=T,
                       n_negatives=K, **kw)


def catalog(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = item_feature_matrix(rng.normal(size=(N_ITEMS, TEXT_DIM)),
                                rng.integers(0, 50, N_ITEMS))
    return feats, rng.dirichlet(np.ones(N_TOPICS), N_ITEMS).astype(np.float32)


def device_data(seed: int = 0, n_events: int = 235, items=None) -> SegmentDataset:
    """One user's random history (private text on every third event): 24 segments of <= 10."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, N_ITEMS, n_events) if items is None else np.asarray(items)
    ts = np.sort(rng.integers(0, 10**7, len(items)))
    tv = np.zeros((len(items), TEXT_DIM), np.float32)
    tv[::3] = rng.normal(size=(len(tv[::3]), TEXT_DIM))
    return SegmentDataset.from_events(items, ts, tv, N_ITEMS, T, K, TEXT_DIM, seed=seed)


def global_weights(mcfg: ModelConfig, seed: int = 0) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(build_model(mcfg))


def run_config(**kw) -> RunConfig:
    """Under event DP one round = 3 steps at q = 1/3 (one expected pass over the 24 segments
    of `device_data()` in batches of 8); q and steps are fixed, whatever the data."""
    return legacy_config(**{"local_epochs": 1, "batch_size": 8, "lr": 0.01, "noise_multiplier": 1.0,
                        "max_grad_norm": 1.0, "device_epsilon": 1000.0,
                        "dp_sample_rate": 1 / 3, "dp_steps": 3, **kw})


# -- Opacus mechanics through the exact path train_local uses --------------------------------


@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_per_sample_gradients_are_correct(kind):
    mcfg = model_config(kind, dropout=0.0)
    feats, topics = catalog()
    model = build_local_model(mcfg, global_weights(mcfg), feats, topics, None, dp=True)
    if kind == "gru":
        assert type(model.encoder.gru).__name__ == "HoistedGRU"  # the DP model (shared/model.py)
    tuples = SegmentTuples(device_data())
    loader = DPDataLoader(tuples, sample_rate=0.5, generator=torch.Generator().manual_seed(1))
    batch = next(b for b in map(tuples.as_batch, loader) if len(b["items"]) >= 4)
    x = torch.cat([batch[k].reshape(len(batch["items"]), -1).float() for k in tuples.keys], 1)
    packed = PackedBatch(model, tuples.keys, [batch[k].shape[1:] for k in tuples.keys],
                     [batch[k].dtype for k in tuples.keys])
    assert check_per_sample_gradients_are_correct(x, packed)


def _flat_grad_samples(opt) -> torch.Tensor:
    return torch.cat([g.reshape(len(g), -1) for g in opt.grad_samples], dim=1)


def test_clipped_per_sample_gradients_are_bounded_by_max_grad_norm():
    mcfg = model_config()
    feats, topics = catalog()
    clip = 0.05  # small enough that clipping is active
    seen = {"raw_max": 0.0, "steps": 0}

    def inspect(opt):
        flat = _flat_grad_samples(opt)
        if not len(flat):
            return  # an empty Poisson draw
        norms = flat.norm(dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping rule
        clipped = flat * factor[:, None]
        summed = torch.cat([p.summed_grad.reshape(-1) for p in opt.params])
        assert torch.allclose(clipped.sum(0), summed, atol=1e-6)  # what Opacus actually summed
        assert clipped.norm(dim=1).max() <= clip + 1e-6
        seen["raw_max"] = max(seen["raw_max"], float(norms.max()))
        seen["steps"] += 1

    res = train_local(mcfg, global_weights(mcfg), device_data(), feats, topics,
                      run_config(max_grad_norm=clip, dp_steps=6), EventLedger(), 1, seed=0,
                      step_callback=inspect)
    assert res.refused is None and res.steps == 6 and seen["steps"] >= 4
    assert seen["raw_max"] > 2 * clip  # clipping really cut something


def test_noise_std_is_noise_multiplier_times_clip_over_expected_batch():
    mcfg = model_config()
    feats, topics = catalog()
    nm, clip = 1.3, 0.5
    data = device_data()  # 24 segments, expected batch 8 -> q = 1/3
    noise = []

    def inspect(opt):
        assert opt.expected_batch_size == pytest.approx(8.0)
        assert opt.noise_multiplier == nm and opt.max_grad_norm == clip
        for p in opt.params:  # p.grad = (clipped sum + noise) / expected batch
            noise.append((p.grad - p.summed_grad / opt.expected_batch_size).reshape(-1))

    train_local(mcfg, global_weights(mcfg), data, feats, topics,
                run_config(noise_multiplier=nm, max_grad_norm=clip, dp_steps=9),
                EventLedger(), 1, seed=0, step_callback=inspect)
    noise = torch.cat(noise)
    assert len(noise) > 20_000
    assert float(noise.std()) == pytest.approx(nm * clip / 8.0, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * nm * clip / 8.0


def test_empty_poisson_draws_still_take_a_noisy_step():
    """q = 1/24: some draws are empty, the first one too (seed 1). Each still takes a step with
    pure noise, and the accountant counts it, as DP-SGD with Poisson sampling requires."""
    mcfg = model_config()
    feats, topics = catalog()
    w0 = global_weights(mcfg)
    sizes, noise_norms = [], []

    def inspect(opt):
        sizes.append(len(opt.grad_samples[0]))
        noise_norms.append(float(sum(p.grad.norm() ** 2 for p in opt.params) ** 0.5))

    engine = PrivacyEngine(accountant="rdp")
    res = train_local(mcfg, w0, device_data(), feats, topics, run_config(
                      batch_size=1, dp_sample_rate=1 / 24, dp_steps=24),
                      EventLedger(), 1, seed=1, step_callback=inspect, privacy_engine=engine)
    assert res.steps == len(sizes) == 24 and sizes[0] == 0 and sizes.count(0) >= 3
    assert all(n > 0 for n, size in zip(noise_norms, sizes) if size == 0)
    assert engine.accountant.history == [(1.0, 1 / 24, 24)]
    assert np.isfinite(res.loss) and all(np.isfinite(w).all() for w in res.weights)


# -- privacy budget and accounting -----------------------------------------------------------
def test_budget_refusal_leaves_weights_and_ledger_unchanged():
    mcfg = model_config()
    feats, topics = catalog()
    w0 = global_weights(mcfg)
    ledger = EventLedger(delta=1e-5)
    ledger.record(1, 1.0, 1.0, 3)
    history, spent = list(ledger.history), ledger.epsilon()
    cfg = run_config(device_epsilon=spent + 0.1)  # one more step would cross it
    res = train_local(mcfg, w0, device_data(), feats, topics, cfg, ledger, 2, seed=0)
    assert res.refused is not None and res.refused.startswith("privacy budget: epsilon would")
    assert res.steps == 0 and res.epsilon == spent and res.num_examples == 24
    assert all(np.array_equal(a, b) for a, b in zip(res.weights, w0))
    assert ledger.history == history
    # the same ledger with room left trains
    res = train_local(mcfg, w0, device_data(), feats, topics,
                      run_config(device_epsilon=spent + 50), ledger, 2, seed=0)
    assert res.refused is None and res.steps == 3 and res.epsilon > spent


def test_no_data_is_declined():
    mcfg = model_config()
    feats, topics = catalog()
    w0 = global_weights(mcfg)
    empty = device_data(items=[])
    res = train_local(mcfg, w0, empty, feats, topics, run_config(), EventLedger(), 1, seed=0)
    assert res.refused.startswith("no data") and res.steps == 0 and res.num_examples == 0
    assert all(np.array_equal(a, b) for a, b in zip(res.weights, w0))


def test_ledger_over_rounds_equals_one_accountant_over_all_steps():
    mcfg = model_config()
    feats, topics = catalog()
    cfg = run_config(noise_multiplier=1.1)
    ledger, all_steps, eps = EventLedger(delta=cfg.delta), RDPAccountant(), []
    w = global_weights(mcfg)
    # the device's data grows between rounds; q and the step count stay what the config says
    for rnd, n_events in enumerate((25, 60, 235), start=1):
        data = device_data(seed=rnd, n_events=n_events)
        engine = PrivacyEngine(accountant="rdp")
        res = train_local(mcfg, w, data, feats, topics, cfg, ledger, rnd, seed=rnd,
                          privacy_engine=engine)
        q = cfg.dp_sample_rate
        assert res.steps == cfg.dp_steps
        # Opacus' own engine counted exactly this round's steps at this q
        assert engine.accountant.history == [(cfg.noise_multiplier, q, res.steps)]
        if rnd == 1:  # a fresh ledger's first round = the engine's epsilon
            assert res.epsilon == pytest.approx(engine.accountant.get_epsilon(cfg.delta))
        for _ in range(res.steps):
            all_steps.step(noise_multiplier=cfg.noise_multiplier, sample_rate=q)
        assert res.epsilon == pytest.approx(all_steps.get_epsilon(cfg.delta), rel=1e-9)
        assert res.epsilon == ledger.epsilon()
        eps.append(res.epsilon)
        w = res.weights
    assert [r["round"] for r in ledger.rounds] == [1, 2, 3]
    assert eps[0] < eps[1] < eps[2]


def test_steps_and_rate():
    assert sample_rate(4, 8) == 1.0 and sample_rate(24, 8) == pytest.approx(1 / 3)
    assert dp_steps(2, 4, 8) == 2  # q = 1: one full-batch step per epoch
    assert dp_steps(1, 24, 8) == 3
    assert dp_steps(1, 98, 2) == 49  # not 50, though 1 / (2 / 98) > 49 in floating point
    assert dp_steps(1, 25, 8) == 4 and dp_steps(3, 20, 8) == 8


def test_config_and_ledger_must_agree():
    mcfg = model_config()
    feats, topics = catalog()
    w0, data = global_weights(mcfg), device_data()
    with pytest.raises(ValueError, match="ledger"):
        train_local(mcfg, w0, data, feats, topics, run_config(dp="off"), EventLedger(), 1, 0)
    with pytest.raises(ValueError, match="ledger"):
        train_local(mcfg, w0, data, feats, topics, run_config(dp="event"), None, 1, 0)
    with pytest.raises(ValueError, match="delta"):
        train_local(mcfg, w0, data, feats, topics, run_config(), EventLedger(delta=1e-6), 1, 0)


# -- training, FedProx, determinism, schema ---------------------------------------------------
def _pattern_history(rng, n_events: int) -> np.ndarray:
    """Five clusters of ten items; the next event is from the following cluster."""
    cluster = (rng.integers(0, 5) + np.arange(n_events)) % 5
    return cluster * 10 + rng.integers(0, 10, n_events)


def test_plain_training_learns_a_pattern_over_rounds():
    mcfg = model_config(dropout=0.0, n_topics=0)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, TEXT_DIM)) * 2
    feats = item_feature_matrix(np.repeat(centers, 10, 0) + 0.1 * rng.normal(
        size=(N_ITEMS, TEXT_DIM)), None)
    devices = [device_data(seed=s, items=_pattern_history(rng, 60)) for s in range(3)]
    held_out = device_data(seed=9, items=_pattern_history(rng, 60))
    batch = collate([held_out[i] for i in range(len(held_out))])

    def held_out_loss(weights) -> float:
        model = build_local_model(mcfg, weights, feats, None, None, dp=False).eval()
        with torch.no_grad():
            return float(model.loss(batch)[0])

    cfg = run_config(dp="off", lr=0.03, local_epochs=3)
    w = global_weights(mcfg)
    losses = [held_out_loss(w)]
    for rnd in range(8):
        results = [train_local(mcfg, w, d, feats, None, cfg, None, rnd, seed=rnd * 10 + i)
                   for i, d in enumerate(devices)]
        assert all(r.epsilon == 0.0 and r.refused is None and r.steps == 3 for r in results)
        w = [np.mean(ws, axis=0) for ws in zip(*(r.weights for r in results))]  # FedAvg
        losses.append(held_out_loss(w))
    # well below the start and below chance (log of the candidate count)
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < np.log(K + 1), losses


def _distance(a, b) -> float:
    return float(np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b))))


@pytest.mark.parametrize("dp", ["event", "off"])
def test_fedprox_pull_keeps_weights_closer_to_global(dp):
    mcfg = model_config()
    feats, topics = catalog()
    w0, data = global_weights(mcfg), device_data()
    cfg = run_config(dp=dp, lr=0.05, local_epochs=2)

    def train(mu):
        return train_local(mcfg, w0, data, feats, topics, cfg,
                           EventLedger() if dp == "event" else None, 1, seed=0, proximal_mu=mu)

    free, pulled = train(0.0), train(5.0)
    assert free.steps == pulled.steps
    assert _distance(pulled.weights, w0) < 0.8 * _distance(free.weights, w0)


def test_same_inputs_same_weights_and_caller_state_untouched():
    mcfg = model_config()
    feats, topics = catalog()
    w0, data = global_weights(mcfg), device_data()
    data_rng = data.rng.bit_generator.state
    torch.manual_seed(123)
    torch_rng = torch.get_rng_state()
    a = train_local(mcfg, w0, data, feats, topics, run_config(), EventLedger(), 1, seed=7)
    b = train_local(mcfg, w0, data, feats, topics, run_config(), EventLedger(), 1, seed=7)
    c = train_local(mcfg, w0, data, feats, topics, run_config(), EventLedger(), 1, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights))
    assert not all(np.array_equal(x, y) for x, y in zip(a.weights, c.weights))
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert data.rng.bit_generator.state == data_rng


def test_secure_mode_without_torchcsprng_fails_clearly():
    try:
        import torchcsprng  # noqa: F401
        pytest.skip("torchcsprng is installed: secure mode works")
    except ImportError:
        pass
    mcfg = model_config()
    feats, topics = catalog()
    with pytest.raises(RuntimeError, match="torchcsprng"):
        train_local(mcfg, global_weights(mcfg), device_data(), feats, topics, run_config(),
                    EventLedger(), 1, seed=0, secure_mode=True)


def test_dp_weights_have_the_wire_schema_of_the_plain_model():
    mcfg = model_config()
    feats, topics = catalog()
    wire = weight_schema(build_model(mcfg))  # the wire schema comes from the non-DP model
    dp_model = build_local_model(mcfg, global_weights(mcfg), feats, topics, None, dp=True)
    assert type(dp_model.encoder.gru).__name__ == "HoistedGRU"  # the DP model
    assert weight_schema(dp_model) == wire
    res = train_local(mcfg, global_weights(mcfg), device_data(), feats, topics, run_config(),
                      EventLedger(), 1, seed=0)
    assert [(tuple(a.shape), str(a.dtype)) for a in res.weights] == [(s, d) for _, s, d in wire]


def test_ghost_clipping_gives_the_same_update_as_hooks():
    """grad_sample_mode="ghost" (Opacus' fast clipping) must clip exactly like the hooks."""
    mcfg = model_config(dropout=0.0)
    feats, topics = catalog()
    w0, data = global_weights(mcfg), device_data()
    cfg = run_config(max_grad_norm=0.05, lr=0.05)
    hooks, ghost = (train_local(mcfg, w0, data, feats, topics, cfg, EventLedger(), 1, seed=0,
                                optimizer="sgd", grad_sample_mode=m) for m in ("hooks", "ghost"))
    assert hooks.steps == ghost.steps == 3
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(hooks.weights, ghost.weights))
    assert _distance(hooks.weights, w0) > 1e-3


def test_the_run_config_chooses_the_client_optimizer():
    """train_local uses RunConfig.client_optimizer unless the caller names one."""
    mcfg = model_config()
    feats, topics = catalog()
    w0 = global_weights(mcfg)

    def weights(cfg, **kw):
        return train_local(mcfg, w0, device_data(), feats, topics, cfg, None, 1, seed=0,
                           **kw).weights

    adam = weights(run_config(dp="off", client_optimizer="adam"))
    assert all(np.array_equal(a, b) for a, b in
               zip(adam, weights(run_config(dp="off"), optimizer="adam")))
    sgd = weights(run_config(dp="off"))
    assert not all(np.array_equal(a, b) for a, b in zip(adam, sgd))

"""The interest model: masking, causality, Opacus compatibility, weights, segments, features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.shared.item_features import (
    POP_DIM,
    item_feature_matrix,
    popularity_features,
    topic_matrix,
)
from fedinterest.shared.model import (
    HoistedGRU,
    ModelConfig,
    build_model,
    get_weights,
    load_checkpoint,
    n_parameters,
    save_checkpoint,
    set_weights,
    weight_schema,
)
from fedinterest.shared.schema import Catalog, Dataset
from fedinterest.shared.sequences import (
    SegmentDataset,
    collate,
    gap_buckets,
    inference_batch,
    inference_input,
    rating_buckets,
    segment_bounds,
    window_bounds,
)
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

N_ITEMS, TEXT_DIM, T, K = 30, 8, 6, 5
KINDS = ["gru", "transformer"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_model(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    rng = np.random.default_rng(0)  # the same public catalog for every model; weights vary
    cfg = ModelConfig(kind=kind, n_items=N_ITEMS, item_feat_dim=TEXT_DIM + POP_DIM,
                      text_dim=TEXT_DIM, hidden=8, n_topics=3, segment_len=T, context_len=T,
                      n_negatives=K, **{"dropout": 0.0, **kw})
    torch.manual_seed(seed)
    feats = item_feature_matrix(rng.normal(size=(N_ITEMS, TEXT_DIM)), rng.integers(0, 50, N_ITEMS))
    model = build_model(cfg).attach_catalog(feats, rng.dirichlet(np.ones(3), N_ITEMS))
    return model


def make_batch(seed: int = 0, n_events: int = 40) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, N_ITEMS, n_events)
    ts = np.sort(rng.integers(0, 10**7, n_events))
    tv = np.zeros((n_events, TEXT_DIM), np.float32)
    tv[::3] = rng.normal(size=(len(tv[::3]), TEXT_DIM))
    ratings = np.where(rng.random(n_events) < 0.3, np.nan, rng.integers(1, 11, n_events) / 2)
    sd = SegmentDataset.from_events(items, ts, tv, N_ITEMS, T, K, TEXT_DIM, seed=seed,
                                    ratings=ratings)
    return collate([sd[i] for i in range(len(sd))])


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_padding_does_not_change_real_steps(kind):
    model = make_model(kind).eval()
    rng = np.random.default_rng(1)
    items, ts = rng.integers(0, N_ITEMS, 4), np.sort(rng.integers(0, 10**6, 4))
    short = inference_input(items, ts, context_len=4, text_dim=TEXT_DIM)  # no padding
    padded = inference_input(items, ts, context_len=T, text_dim=TEXT_DIM)
    # garbage in the padding must not matter
    padded["items"][4:] = torch.randint(0, N_ITEMS, (T - 4,))
    padded["gaps"][4:] = 3
    padded["text"][4:] = 5.0
    padded["has_text"][4:] = 1.0
    padded["rating"][4:] = 7
    with torch.no_grad():
        a = model.encode(collate([short]))
        b = model.encode(collate([padded]))
        assert a.shape == (1, 4, 8) and b.shape == (1, T, 8)
        assert torch.allclose(a[0], b[0, :4], atol=1e-6)
        assert torch.allclose(model.user_state(short), model.user_state(padded), atol=1e-6)
        emb = model.item_embeddings()
        assert emb.shape == (N_ITEMS, 8)
        scores = model.score(model.user_state(collate([padded, padded])), emb)
        assert scores.shape == (2, N_ITEMS)
        assert model.topic_distribution(model.user_state(collate([short]))).sum().item() == (
            pytest.approx(1.0, abs=1e-5))


@pytest.mark.parametrize("kind", KINDS)
def test_causal_future_event_does_not_change_earlier_states(kind):
    model = make_model(kind).eval()
    batch = make_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["items"][:, 4] = (changed["items"][:, 4] + 1) % N_ITEMS
    changed["gaps"][:, 4] = (changed["gaps"][:, 4] + 1) % 5
    changed["rating"][:, 4] = (changed["rating"][:, 4] + 3) % 11
    with torch.no_grad():
        a, b = model.encode(batch), model.encode(changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4], b[:, 4])


@pytest.mark.parametrize("n_layers", [1, 2])
def test_dp_model_and_plain_model_share_keys_and_outputs(n_layers):
    plain = make_model("gru", seed=0, n_layers=n_layers)
    dp = make_model("gru", seed=1, dp=True, n_layers=n_layers)
    assert type(dp.encoder.gru) is HoistedGRU
    assert set(plain.state_dict()) == set(dp.state_dict())
    assert weight_schema(plain) == weight_schema(dp)
    plain.load_state_dict(dp.state_dict())  # strict both ways: same keys, same shapes
    dp = make_model("gru", seed=1, dp=True, n_layers=n_layers)
    dp.load_state_dict(plain.state_dict())
    batch = make_batch()
    plain.eval(), dp.eval()
    with torch.no_grad():
        torch.testing.assert_close(dp.encode(batch), plain.encode(batch))
        torch.testing.assert_close(dp.loss(batch)[0], plain.loss(batch)[0])


def test_hoisted_gru_equals_gru_and_dpgru_with_per_sample_gradients_of_microbatches():
    """The DP model's GRU against nn.GRU and opacus.layers.DPGRU (what devices ran before) on
    the same weights: outputs, Opacus' validation, and per-sample gradients of every parameter
    under Opacus' hooks equal to the gradients of microbatches of one example."""
    from opacus import GradSampleModule
    from opacus.layers import DPGRU
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 6, batch_first=True)
    ours, dpgru = HoistedGRU(5, 6), DPGRU(5, 6, batch_first=True)
    assert set(ours.state_dict()) == set(gru.state_dict())
    ours.load_state_dict(gru.state_dict())
    dpgru.load_state_dict(gru.state_dict())
    assert ModuleValidator.validate(ours, strict=False) == []
    x, w = torch.randn(4, 7, 5), torch.randn(4, 7, 6)
    torch.testing.assert_close(ours(x)[0], gru(x)[0])
    gs_ours = GradSampleModule(ours, loss_reduction="sum")
    gs_ref = GradSampleModule(dpgru, loss_reduction="sum")
    (gs_ours(x)[0] * w).sum().backward()
    (gs_ref(x)[0] * w).sum().backward()
    ref = dict(dpgru.named_parameters())
    names = {"ih_l0.weight": "weight_ih_l0", "ih_l0.bias": "bias_ih_l0",
             "hh_l0.weight": "weight_hh_l0", "hh_l0.bias": "bias_hh_l0"}
    params = dict(ours.named_parameters())
    assert set(params) == set(names) and all(p.requires_grad for p in params.values())
    for i in range(len(x)):  # microbatch of one: plain autograd, no Opacus
        single = HoistedGRU(5, 6)
        single.load_state_dict(gru.state_dict())
        (single(x[i:i + 1])[0] * w[i:i + 1]).sum().backward()
        for name, p in single.named_parameters():
            torch.testing.assert_close(params[name].grad_sample[i], p.grad)
    for name, p in params.items():
        assert p.grad_sample.shape == (len(x), *p.shape)
        torch.testing.assert_close(p.grad_sample, ref[names[name]].grad_sample)


def test_checkpoint_of_the_previous_dp_model_loads(tmp_path):
    """A state_dict saved from the DPGRU-based DP model (before HoistedGRU) has nn.GRU's keys
    and loads strictly into today's DP model, with the same outputs."""
    from opacus.layers import DPGRU

    old = make_model("gru", seed=2, dp=True)
    dpgru = DPGRU(8, 8, batch_first=True)
    dpgru.load_state_dict(old.encoder.gru.state_dict())
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("encoder.gru.")}
    state.update({f"encoder.gru.{k}": v for k, v in dpgru.state_dict().items()})
    new = make_model("gru", seed=3, dp=True)
    new.load_state_dict(state)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(new.eval().loss(batch)[0], old.eval().loss(batch)[0])


class _Packed(torch.nn.Module):
    """The per-sample-gradient checker feeds one tensor; unpack it into the model's batch."""

    def __init__(self, model, share_negatives: bool = False):
        super().__init__()
        self.model, self.share = model, share_negatives

    def forward(self, x):
        b = {"items": x[:, :T].long(), "gaps": x[:, T:2 * T].long(),
             "has_text": x[:, 2 * T:3 * T], "mask": x[:, 3 * T:4 * T],
             "negatives": x[:, 4 * T:4 * T + K].long(),
             "rating": x[:, 4 * T + K:5 * T + K].long(),
             "text": x[:, 5 * T + K:].reshape(len(x), T, TEXT_DIM)}
        if self.share:  # a bug DP must catch: examples borrowing each other's negatives
            b["negatives"] = b["negatives"].roll(1, 0)
        return self.model.example_losses(b)[0]


def _pack(batch):
    return torch.cat([batch["items"].float(), batch["gaps"].float(), batch["has_text"],
                      batch["mask"], batch["negatives"].float(), batch["rating"].float(),
                      batch["text"].reshape(len(batch["items"]), -1)], 1)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_are_correct(kind):
    model = make_model(kind, dp=(kind == "gru"), neg_sampling="pop")
    model.attach_catalog(neg_probs=np.arange(1, N_ITEMS + 1))
    x = _pack(make_batch())
    assert check_per_sample_gradients_are_correct(x, _Packed(model))
    # the check can fail: cross-example negatives make per-sample gradients wrong
    assert not check_per_sample_gradients_are_correct(x, _Packed(model, share_negatives=True))


def test_weights_round_trip_and_schema(tmp_path):
    a, b = make_model("gru", seed=0), make_model("gru", seed=1)
    batch = make_batch()
    a.eval(), b.eval()
    with torch.no_grad():
        assert not torch.allclose(a.loss(batch)[0], b.loss(batch)[0])
    weights = get_weights(a)
    schema = weight_schema(a)
    assert [n for n, _, _ in schema] == sorted(n for n, _, _ in schema)
    assert [(w.shape, str(w.dtype)) for w in weights] == [(s, d) for _, s, d in schema]
    assert n_parameters(a) == sum(w.size for w in weights)
    assert not any("item_feats" in n or "topic_dist" in n for n, _, _ in schema)
    set_weights(b, weights)
    with torch.no_grad():
        assert torch.equal(a.loss(batch)[0], b.loss(batch)[0])
    weights[0] = weights[0][:1]
    with pytest.raises(ValueError, match=schema[0][0]):
        set_weights(b, weights)
    with pytest.raises(ValueError, match="expected"):
        set_weights(b, get_weights(a)[:-1])
    save_checkpoint(a, tmp_path / "m.pt")
    c = load_checkpoint(tmp_path / "m.pt").attach_catalog(a.item_feats, a.topic_dist).eval()
    with torch.no_grad():
        assert torch.equal(a.loss(batch)[0], c.loss(batch)[0])


def test_model_and_negatives_are_reproducible_by_seed():
    assert all(np.array_equal(x, y) for x, y in
               zip(get_weights(make_model("transformer", 3)), get_weights(make_model("transformer", 3))))
    assert not np.array_equal(get_weights(make_model("gru", 3))[-1],
                              get_weights(make_model("gru", 4))[-1])
    for key in ("negatives", "items", "text"):
        assert torch.equal(make_batch(7)[key], make_batch(7)[key])
    assert not torch.equal(make_batch(7)["negatives"], make_batch(8)["negatives"])


def test_segments_are_disjoint_and_cover_every_event_once():
    for n in range(23):
        for length in (1, 3, 5, 50):
            b = segment_bounds(n, length)
            covered = np.concatenate([np.arange(s, e) for s, e in b]) if len(b) else []
            assert list(covered) == list(range(n))
            assert all(0 < e - s <= length for s, e in b)
            if n:
                assert b[-1, 1] - b[-1, 0] == min(n, length)  # most recent segment is full
    cat = Catalog([str(i) for i in range(5)], [f"t{i}" for i in range(5)])
    rng = np.random.default_rng(0)
    n = 57
    ds = Dataset.from_events("d", cat, ["a", "b", "c"], rng.integers(0, 3, n),
                             rng.integers(0, 5, n), rng.integers(0, 1000, n))
    mask = rng.random(n) < 0.8
    sd = SegmentDataset.from_dataset(ds, mask, segment_len=4, n_negatives=2, text_dim=3)
    seen = np.concatenate([np.arange(s, e) for s, e in sd.bounds])
    assert sorted(seen) == list(range(int(mask.sum())))  # each usable event exactly once
    users = ds.user[mask]
    assert all(len(set(users[s:e])) == 1 for s, e in sd.bounds)  # never across users
    assert sum(int(sd[i]["mask"].sum()) for i in range(len(sd))) == mask.sum()


def test_rating_buckets():
    assert rating_buckets(np.array([np.nan, 0.5, 1, 2.5, 5, 7]), 6).tolist() == [
        0, 1, 2, 5, 10, 10]
    assert rating_buckets(None, 3).tolist() == [0, 0, 0]


def test_gap_buckets():
    gaps = [0, 30, 600, 7_200, 2 * 86_400, 10 * 86_400, 100 * 86_400, 800 * 86_400]
    ts = 100 + np.concatenate([[0], np.cumsum(gaps)])
    assert gap_buckets(ts).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert gap_buckets(np.array([5])).tolist() == [0]


def test_item_features_by_hand():
    pop = popularity_features([0, 1, 3, 1023, -2.5])
    assert pop.shape == (5, POP_DIM)
    assert pop[:, 0].tolist() == pytest.approx(
        [0, np.log(2) / np.log(1024), np.log(4) / np.log(1024), 1.0, 0.0])
    assert pop[:, 1:].argmax(1).tolist() == [0, 1, 2, 9, 0]  # floor(log2(1 + count)), capped
    m = item_feature_matrix(np.ones((5, 2)), [0, 1, 3, 1023, 0])
    assert m.shape == (5, 2 + POP_DIM) and np.all(m[:, :2] == 1)
    cat = Catalog(["1", "2", "3"], ["a", "b", "c"], [("x", "y"), (), ("(no genres listed)",)])
    tm, vocab = topic_matrix(cat)
    assert vocab == ["x", "y"]
    assert tm.tolist() == [[0.5, 0.5], [0, 0], [0, 0]]


def test_bad_config_and_catalog_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="lstm")
    with pytest.raises(ValueError, match="n_items"):
        ModelConfig(item_repr="id")
    model = make_model("gru")
    with pytest.raises(ValueError, match="item features"):
        model.attach_catalog(np.zeros((N_ITEMS, 3)))


def test_windows_predict_every_event_once_with_the_promised_context():
    for n in range(30):
        for length, stride in ((2, 1), (4, 2), (6, 1), (7, 6), (50, 25)):
            bounds, first = window_bounds(n, length, stride)
            targets = np.concatenate([np.arange(s + f, e) for (s, e), f in zip(bounds, first)]
                                     ) if len(bounds) else np.zeros(0)
            assert sorted(targets.tolist()) == list(range(1, n))  # all but the first, once
            for (s, e), f in zip(bounds, first):
                assert 0 < e - s <= length and f >= 1
                assert f >= min(length - stride, s + f)  # context of the first target
        seg = segment_bounds(n, 4)
        bounds, first = window_bounds(n, 4, 4)  # stride == length: the disjoint segments
        assert np.array_equal(bounds, seg[seg[:, 1] - seg[:, 0] > 1] if n > 1 else bounds)
        assert set(first.tolist()) <= {1}
    with pytest.raises(ValueError, match="stride"):
        window_bounds(10, 4, 5)


def test_window_dataset_marks_only_its_targets_and_the_loss_counts_them():
    cat = Catalog([str(i) for i in range(N_ITEMS)], [f"t{i}" for i in range(N_ITEMS)])
    rng = np.random.default_rng(1)
    n = 80
    ds = Dataset.from_events("d", cat, ["a", "b"], rng.integers(0, 2, n),
                             rng.integers(0, N_ITEMS, n), rng.integers(0, 10**6, n))
    sd = SegmentDataset.from_dataset(ds, None, segment_len=T, n_negatives=0, text_dim=TEXT_DIM,
                                     stride=2)
    assert sd.n_targets == n - 2  # every event but each user's first
    batch = collate([sd[i] for i in range(len(sd))])
    assert float((batch["target_mask"] * batch["mask"]).sum()) == sd.n_targets + int(
        (sd.first_target == 0).sum())  # position 0 of a history start predicts nothing
    for item_repr in ("text", "id"):
        model = make_model("transformer", loss="full", item_repr=item_repr)
        _, stats = model.example_losses(batch)
        assert stats["steps"] == sd.n_targets
        # a window's context-only steps do not count: changing their targets' loss terms
        # (the items there are inputs too, so compare against a batch without the mask)
        _, all_steps = model.example_losses({k: v for k, v in batch.items()
                                             if k != "target_mask"})
        assert all_steps["steps"] > stats["steps"]


def test_full_softmax_text_model_learns_and_hybrid_starts_as_text_model():
    batch = make_batch(3)
    text = make_model("gru", seed=1, loss="full")
    hybrid = make_model("gru", seed=1, loss="full", item_repr="hybrid")
    hybrid.attach_catalog(counts=np.arange(N_ITEMS))  # items 0..4 cold
    assert hybrid.warm.tolist() == [0.0] * 5 + [1.0] * (N_ITEMS - 5)
    common = {k: v for k, v in hybrid.state_dict().items() if k in text.state_dict()}
    text.load_state_dict(common)
    assert torch.allclose(text.loss(batch)[0], hybrid.loss(batch)[0])
    with torch.no_grad():
        hybrid.item_emb.weight.fill_(1.0)
    emb_t, emb_h = text.item_embeddings(), hybrid.item_embeddings()
    assert torch.allclose(emb_t[:5], emb_h[:5])  # cold items: the text tower alone
    assert not torch.allclose(emb_t[5:], emb_h[5:])
    opt = torch.optim.Adam(text.parameters(), 1e-2)
    first = float(text.loss(batch)[0])
    for _ in range(30):
        loss, _ = text.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(text.loss(batch)[0]) < 0.8 * first


def test_residual_tower_and_width_change_only_the_tower():
    plain = make_model("gru")
    res = make_model("gru", tower_residual=True, tower_width=12)
    extra = set(res.state_dict()) - set(plain.state_dict())
    assert extra == {"item_tower.proj.weight", "item_tower.proj.bias"}
    assert res.item_tower.fc1.out_features == 12
    assert res.item_embeddings().shape == (N_ITEMS, 8)
    # the federated default is unchanged: the same weight schema as before these options
    assert [n for n, _, _ in weight_schema(plain)] == sorted(plain.state_dict())


def test_inference_batch_is_the_collated_inference_inputs():
    rng = np.random.default_rng(2)
    hists = []
    for n in (3, 9):
        items, ts = rng.integers(0, N_ITEMS, n), np.sort(rng.integers(0, 10**6, n))
        tidx = np.where(rng.random(n) < 0.5, -1, 0)
        hists.append((items, ts, tidx, rng.normal(size=(1, TEXT_DIM)), rng.integers(1, 6, n)))
    got = inference_batch(hists, T, TEXT_DIM)
    want = collate([inference_input(*h[:4], context_len=T, text_dim=TEXT_DIM, ratings=h[4])
                    for h in hists])
    assert all(torch.equal(got[k], want[k]) for k in want)
    no_text = inference_batch([h[:2] for h in hists], T, TEXT_DIM)
    assert float(no_text["has_text"].sum()) == 0 and float(no_text["rating"].sum()) == 0


@pytest.mark.parametrize("loss", ["full", "sampled"])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_positions_never_reach_the_loss_or_the_gradients(kind, loss):
    model = make_model(kind, loss=loss, item_repr="id")
    batch = make_batch(4, n_events=2 * T + 3)  # segments of 6, 6 and a right-padded 5
    pad = batch["mask"] == 0
    assert bool(pad.any())
    garbage = {k: v.clone() for k, v in batch.items()}
    garbage["items"][pad] = (garbage["items"][pad] + 7) % N_ITEMS
    garbage["gaps"][pad] = 4
    garbage["rating"][pad] = 9
    garbage["text"][pad] = 3.0
    garbage["has_text"][pad] = 1.0

    def loss_and_grads(b):
        model.zero_grad()
        per_example, stats = model.example_losses(b)
        per_example.sum().backward()
        return per_example.detach(), stats, [p.grad.clone() for p in model.parameters()
                                             if p.grad is not None]

    la, sa, ga = loss_and_grads(batch)
    lb, sb, gb = loss_and_grads(garbage)
    assert torch.allclose(la, lb, atol=1e-6) and sa["steps"] == sb["steps"]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))
    # the padded item's embedding row gets no gradient from the padding itself
    changed = set(garbage["items"][pad].tolist()) - set(batch["items"][batch["mask"] > 0]
                                                        .tolist())
    if loss == "sampled":
        changed -= set(batch["negatives"].flatten().tolist())
    else:
        changed = set()  # every row is a softmax class in the full loss
    grad = model.item_emb.weight.grad
    assert all(float(grad[i].abs().sum()) == 0.0 for i in changed)


def test_dot_score_is_the_raw_inner_product_and_needs_the_full_loss():
    cos = make_model("transformer", loss="full", item_repr="id")
    dot = make_model("transformer", loss="full", item_repr="id", score="dot").eval()
    dot.load_state_dict(cos.state_dict())
    batch = make_batch(5)
    with torch.no_grad():
        states = dot.user_state(batch)
        emb = dot.item_embeddings()
        assert torch.allclose(emb, dot.item_emb.weight)  # not normalised
        want = dot.query(states) @ dot.item_emb.weight.T
        assert torch.allclose(dot.score(states, emb), want, atol=1e-6)
        cos.eval()
        q = torch.nn.functional.normalize(cos.query(states), dim=-1)
        e = torch.nn.functional.normalize(cos.item_emb.weight, dim=-1)
        assert torch.allclose(cos.score(states, cos.item_embeddings()), cos.scale(q @ e.T),
                              atol=1e-5)
    # the training loss is the cross-entropy of the same logits at every counted step
    _, stats = dot.example_losses(batch)
    states = dot.encode(batch)[:, :-1]
    step = (batch["mask"][:, :-1] * batch["mask"][:, 1:]).bool()
    logits = dot.query(states[step]) @ dot.item_emb.weight.T
    ce = torch.nn.functional.cross_entropy(logits, batch["items"][:, 1:][step], reduction="sum")
    assert float(stats["rec_loss"]) == pytest.approx(float(ce) / int(step.sum()), rel=1e-5)
    with pytest.raises(ValueError, match="score='dot' needs loss='full'"):
        ModelConfig(score="dot", loss="sampled")

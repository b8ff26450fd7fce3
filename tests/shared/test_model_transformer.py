"""The transformer's SASRec options (positions, block layout, FFN width, initialisation, no
time gap) and the checks of issue 16's audit: causality, padding, and that the state
training predicts a target from is the state inference reads for the same history."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedinterest.shared.model import ModelConfig, build_model, weight_schema
from fedinterest.shared.schema import Catalog, Dataset
from fedinterest.shared.sequences import SegmentDataset, collate, inference_input

from tests.shared.test_model import N_ITEMS, TEXT_DIM, T, make_batch, make_model

SASREC = {"positions": "before_norm", "block": "post_ln", "ffn_inner": 12, "init_std": 0.02}
VARIANTS = {
    "default": {},
    "positions": {"positions": "before_norm"},
    "post_ln": {"block": "post_ln"},
    "sasrec": SASREC,
    "sasrec_no_gap": {**SASREC, "use_gap": False},
}


def transformer(seed: int = 0, **kw) -> torch.nn.Module:
    """make_model's transformer with an ID table, 2 blocks and the full loss; windows of
    T events and a context of T (or as given)."""
    cfg = {"segment_len": T, "context_len": T, **kw}
    model = make_model("transformer", seed=seed, loss="full", item_repr="id", n_layers=2,
                       **{k: v for k, v in cfg.items() if k not in ("segment_len", "context_len")})
    if (cfg["segment_len"], cfg["context_len"]) == (T, T):
        return model
    conf = ModelConfig.from_dict({**model.cfg.to_dict(), **cfg})
    torch.manual_seed(seed)
    return build_model(conf).attach_catalog(model.item_feats, model.topic_dist)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_causal_and_ignores_padding(variant):
    model = transformer(**VARIANTS[variant]).eval()
    batch = make_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["items"][:, 4] = (changed["items"][:, 4] + 1) % N_ITEMS
    with torch.no_grad():
        a, b = model.encode(batch), model.encode(changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4], b[:, 4])
    rng = np.random.default_rng(1)
    items, ts = rng.integers(0, N_ITEMS, 3), np.sort(rng.integers(0, 10**6, 3))
    short = inference_input(items, ts, context_len=3, text_dim=TEXT_DIM)
    padded = inference_input(items, ts, context_len=T, text_dim=TEXT_DIM)
    padded["items"][3:] = torch.randint(0, N_ITEMS, (T - 3,))
    padded["gaps"][3:] = 4
    with torch.no_grad():
        assert torch.allclose(model.user_state(short), model.user_state(padded), atol=1e-6)


def _manual_encode(model, batch) -> torch.Tensor:
    """The event vector, the input LayerNorm and the blocks, composed by hand (eval mode)."""
    x = model.item_emb(batch["items"]) + model.rating_emb(batch["rating"])
    has = batch["has_text"].unsqueeze(-1)
    x = x + model.text_in(torch.cat([batch["text"] * has, has], dim=-1))
    if model.cfg.use_gap:
        x = x + model.gap_emb(batch["gaps"])
    pos = model.encoder.pos.weight[: x.shape[1]]
    if model.cfg.positions == "before_norm":
        x = model.in_norm(x + pos)
    else:
        x = model.in_norm(x) + pos
    for block in model.encoder.blocks:
        x = block(x)
    return model.encoder.ln(x)


@pytest.mark.parametrize("positions", ["after_norm", "before_norm"])
def test_positions_join_the_input_where_the_option_says(positions):
    model = transformer(positions=positions).eval()
    batch = make_batch()
    with torch.no_grad():
        assert torch.allclose(model.encode(batch), _manual_encode(model, batch), atol=1e-5)
    std = float(model.encoder.pos.weight.detach().std())
    # SASRec's N(0, 0.02) against torch's N(0, 1): the legacy vector is as long as the
    # normalised item signal
    assert std < 0.05 if positions == "before_norm" else std > 0.5


def test_sasrec_blocks_are_post_ln_with_their_width_and_initialisation():
    default, sasrec = transformer(), transformer(**SASREC).eval()
    extra = set(default.state_dict()) - set(sasrec.state_dict())
    assert extra == {"encoder.ln.weight", "encoder.ln.bias"}  # post-LN: no final LayerNorm
    assert set(sasrec.state_dict()) - set(default.state_dict()) == set()
    block = sasrec.encoder.blocks[0]
    assert block.fc1.out_features == 12 and block.fc2.in_features == 12
    linears = [m for m in sasrec.encoder.blocks.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert 0.01 < float(weights.detach().std()) < 0.03
    assert all(float(m.bias.abs().sum()) == 0.0 for m in linears)
    with torch.no_grad():  # each block ends in a LayerNorm (weight 1, bias 0 at the start)
        out = sasrec.encode(make_batch())
    assert torch.allclose(out.mean(-1), torch.zeros(out.shape[:2]), atol=1e-4)
    assert torch.allclose(out.std(-1, unbiased=False), torch.ones(out.shape[:2]), atol=1e-2)
    # the federated default keeps its schema
    assert [n for n, _, _ in weight_schema(default)] == sorted(default.state_dict())


def test_without_the_time_gap_the_gaps_change_nothing():
    model = transformer(use_gap=False).eval()
    assert not any(k.startswith("gap_emb") for k in model.state_dict())
    batch = make_batch()
    other = {**batch, "gaps": (batch["gaps"] + 3) % 5}
    with torch.no_grad():
        assert torch.equal(model.encode(batch), model.encode(other))
    with_gap = transformer().eval()
    with torch.no_grad():
        assert not torch.allclose(with_gap.encode(batch), with_gap.encode(other))


@pytest.mark.parametrize("variant", ["default", "sasrec"])
def test_training_predicts_each_target_from_the_state_inference_reads(variant):
    """Windows of context + 1 events whose ends are 2 apart: for every counted target whose
    window holds its whole context (the last `context_len` events, or all earlier events of
    a short history), the state training scores it from equals the state inference computes
    from that history: same positions (counted from the window start = the history's cut),
    same first-event gap bucket, padding on the same side, the last real position read."""
    context = T - 1
    model = transformer(**VARIANTS[variant], segment_len=context + 1, context_len=context)
    model.eval()
    rng = np.random.default_rng(3)
    n = 3 * context + 2
    cat = Catalog([str(i) for i in range(N_ITEMS)], [f"t{i}" for i in range(N_ITEMS)])
    ds = Dataset.from_events("d", cat, ["a"], np.zeros(n, np.int64), rng.integers(0, N_ITEMS, n),
                             np.sort(rng.integers(0, 10**6, n)),
                             rating=rng.integers(1, 11, n) / 2)
    data = SegmentDataset.from_dataset(ds, None, context + 1, 0, text_dim=TEXT_DIM, stride=2)
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        states = model.encode(batch)
    checked = {"short": 0, "full": 0}
    seen = []
    for w, ((s, e), first) in enumerate(zip(data.bounds, data.first_target)):
        for p in range(int(first), int(e - s)):
            target = s + p
            seen.append(int(target))
            if s != max(0, target - context):
                continue  # a window cut inside a long history gives less than the context
            hist = inference_input(ds.item[:target], ds.timestamp[:target], context_len=context,
                                   text_dim=TEXT_DIM, ratings=ds.rating[:target])
            with torch.no_grad():
                want = model.user_state(hist)
            assert torch.allclose(states[w, p - 1], want, atol=1e-5), (w, p)
            checked["full" if target >= context else "short"] += 1
    assert checked["short"] > 0 and checked["full"] > 0
    assert sorted(seen) == list(range(1, n))  # each target counted once


@pytest.mark.parametrize("output_dropout", [None, 0.0])
def test_output_dropout_is_what_the_query_reads(output_dropout):
    """The state the loss scores targets from is dropped at `output_dropout` (None: at
    `dropout`, the federated default), independently of the blocks' dropout: at 0 the query
    reads exactly the encoder's output, as in SASRec/RecBole."""
    model = transformer(dropout=0.5, output_dropout=output_dropout).train()
    assert model.out_drop.p == (0.5 if output_dropout is None else 0.0)
    batch = make_batch()
    read = []
    hook = model.query.register_forward_pre_hook(lambda _m, args: read.append(args[0]))
    torch.manual_seed(7)
    with torch.no_grad():
        states = model.encode(batch)
        torch.manual_seed(7)  # the same dropout masks for the encoder in the loss
        model.example_losses(batch)
    hook.remove()
    step = (batch["mask"][:, :-1] * batch["mask"][:, 1:]).bool()
    same = torch.allclose(read[0], states[:, :-1][step])
    assert same == (output_dropout == 0.0)
    with pytest.raises(ValueError, match="output_dropout"):
        ModelConfig(output_dropout=1.0)


def _recbole_layer(block, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """RecBole's SASRec TransformerLayer (post-LN), written out from a block's weights:
    per-head softmax(QK^T / sqrt(d) + causal mask) V, output projection, residual +
    LayerNorm, GELU feed-forward, residual + LayerNorm (eval mode: no dropout)."""
    b, t, h = x.shape
    d = h // n_heads

    def split(z):
        return z.reshape(b, t, n_heads, d).permute(0, 2, 1, 3)

    q, k, v = (split(lin(x)) for lin in (block.attn.q, block.attn.k, block.attn.v))
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    att = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(future, -1e4).softmax(-1)
    ctx = (att @ v).permute(0, 2, 1, 3).reshape(b, t, h)
    x = block.ln1(block.attn.o(ctx) + x)
    ff = block.fc2(torch.nn.functional.gelu(block.fc1(x)))
    return block.ln2(ff + x)


def test_post_ln_dot_model_computes_recboles_sasrec():
    """Run RB's model (ID inputs only, post-LN, dot score) against SASRec's forward pass and
    score written out independently: item + position -> LayerNorm -> RecBole layers -> the
    state at the last real event -> query layer -> inner product with the item table. The
    query layer is the one piece RecBole does not have."""
    model = transformer(**SASREC, score="dot", use_gap=False, use_rating=False,
                        use_private_text=False).eval()
    batch = make_batch()
    x = model.item_emb(batch["items"]) + model.encoder.pos.weight[: batch["items"].shape[1]]
    x = model.in_norm(x)
    for block in model.encoder.blocks:
        x = _recbole_layer(block, x, model.cfg.n_heads)
    last = batch["mask"].sum(1).long() - 1
    want = model.query(x[torch.arange(len(x)), last]) @ model.item_emb.weight.T
    with torch.no_grad():
        got = model.score(model.user_state(batch), model.item_embeddings())
    assert torch.allclose(got, want.detach(), atol=1e-5)

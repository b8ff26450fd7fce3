"""The text prior (shared/text_prior.py): untrained, the model ranks exactly as the static
text baseline; its queries are causal; training reaches the zero-initialised correction."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import torch
from fedinterest.shared.item_features import POP_DIM
from fedinterest.shared.model import ModelConfig, build_model, get_weights, set_weights
from fedinterest.simulations.baselines import StaticScorer

N_ITEMS, TEXT_DIM, WINDOW, T = 40, 12, 5, 10


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=N_ITEMS, item_feat_dim=TEXT_DIM + POP_DIM, text_dim=TEXT_DIM,
                      hidden=8, text_prior=WINDOW, prior_rank=3, segment_len=T, context_len=T,
                      n_negatives=6)
    feats = torch.randn(N_ITEMS, TEXT_DIM + POP_DIM, generator=torch.Generator().manual_seed(1))
    return build_model(cfg).attach_catalog(item_feats=feats), feats


def _batch(items: list[list[int]], lengths: list[int]) -> dict[str, torch.Tensor]:
    it = torch.tensor(items)
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    return {"items": it * mask.long(), "gaps": torch.zeros_like(it),
            "text": torch.zeros(len(items), T, TEXT_DIM), "has_text": torch.zeros(len(items), T),
            "mask": mask, "rating": torch.zeros_like(it)}


def test_untrained_ranking_is_the_static_baseline_over_the_last_window_items():
    model, feats = _model()
    model.eval()
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, N_ITEMS, T).tolist() for _ in range(3)]
    lengths = [T, 7, 3]
    with torch.inference_mode():
        scores = model.score(model.user_state(_batch(histories, lengths)),
                             model.item_embeddings()).numpy()
    flat = [i for h, n in zip(histories, lengths) for i in h[:n]]
    ds = SimpleNamespace(item=np.array(flat))  # StaticScorer reads only the item column
    starts = np.cumsum([0] + lengths)
    static = StaticScorer(ds, feats[:, :TEXT_DIM].numpy(), window=WINDOW).scores(
        [(int(s), int(e)) for s, e in itertools.pairwise(starts)])
    for ours, ref in zip(scores, static):  # the same scores up to the (positive) scale
        assert np.allclose(ours / ours.std(), ref / ref.std(), atol=1e-4)
        assert np.array_equal(np.argsort(-ours, kind="stable")[:10],
                              np.argsort(-ref, kind="stable")[:10])


def test_prior_queries_read_only_earlier_events():
    model, feats = _model()
    items = list(range(T))
    changed = items[:6] + [30, 31, 32, 33]
    q = model.prior.queries(feats, _batch([items, changed], [T, T])["items"],
                            torch.ones(2, T))
    assert torch.allclose(q[0, :6], q[1, :6]) and not torch.allclose(q[0, 6:], q[1, 6:])


def test_training_reaches_the_zero_initialised_correction_and_the_gate_keeps_the_model_out():
    model, _ = _model()
    model.train()
    batch = _batch([list(range(T))], [T])
    batch["negatives"] = torch.arange(20, 26).unsqueeze(0)
    model.example_losses(batch)[0].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("prior.")}
    for name in ("prior.recency", "prior.pop", "prior.log_scale", "prior.adapter_up",
                 "prior.gate"):
        assert grads[name] is not None and float(grads[name].abs().sum()) > 0, name
    # with the gate at zero the neural part's weights cannot change any score
    model.eval()
    state = _batch([list(range(T))], [T])
    with torch.inference_mode():
        before = model.score(model.user_state(state), model.item_embeddings())
        weights = get_weights(model)
        names = [n for n, _ in sorted(model.state_dict().items())]
        set_weights(model, [w if n.startswith("prior.") else w + 0.5
                            for n, w in zip(names, weights)])
        after = model.score(model.user_state(state), model.item_embeddings())
    assert torch.allclose(before, after, atol=1e-5)


def test_prior_forward_is_the_models_sampled_loss_with_the_gate_at_zero():
    """The central DP reference trains TextPrior.forward; a device trains example_losses:
    with the gate at zero they must be the same loss, or the reference bounds another model."""
    model, feats = _model()
    model.cfg.n_topics = 0  # no topic term: the prior has none
    probs = torch.rand(N_ITEMS, generator=torch.Generator().manual_seed(2)) + 0.1
    model.attach_catalog(item_feats=feats, neg_probs=probs.numpy())
    model.cfg.neg_sampling = "pop"
    model.eval()
    batch = _batch([list(range(T)), list(range(5, 5 + T))], [T, 6])
    batch["negatives"] = torch.tensor([[20, 21, 3, 25, 26, 27], [1, 2, 7, 30, 31, 32]])
    with torch.no_grad():
        ref, _ = model.example_losses(batch)
        log_q = torch.log(probs / probs.sum())
        unit = model.prior.keys(model.item_feats)[:, :-1]
        ours = model.prior(model.item_feats, unit, batch["items"], batch["mask"],
                           batch["negatives"], log_q)
    assert torch.allclose(ours, ref, atol=1e-5)

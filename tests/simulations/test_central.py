"""Central training, evaluation and baselines on tiny worlds (tiny random BERT as encoder)."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.item_features import item_feature_matrix
from fedinterest.shared.metrics import PROTOCOL_LOO, PROTOCOL_LOO_RANDOM_TIES
from fedinterest.shared.model import get_weights, load_checkpoint
from fedinterest.shared.schema import Catalog, Dataset
from fedinterest.shared.sequences import inference_batch
from fedinterest.shared.splits import leave_last_out, shuffle_ties, tie_share
from fedinterest.simulations.baselines import PopScorer
from fedinterest.simulations.central import (
    CentralInputs,
    NeuralScorer,
    TrainConfig,
    evaluate,
    load_inputs,
    make_split,
    prepare_inputs,
    run,
)
from fedinterest.simulations.cli import main

WORLD = "synthetic:n_users=60,n_items=150,events_per_user=30,n_topics=6,seed=3"
FAST = ["--epochs", "3", "--hidden", "16", "--negatives", "32", "--context-len", "10",
        "--threads", "1", "--no-progress"]  # training windows of 11 (context + target)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _random_hr10(ds: Dataset, targets: np.ndarray) -> float:
    """Expected HR@10 of a uniformly random ranking of the non-excluded items."""
    split = leave_last_out(ds)
    left = [len(ds.catalog) - len(set(ds.item[slice(*split.history_end(ds, int(j)))]))
            for j in targets]
    return float(np.mean([min(10, n) / n for n in left]))


def test_train_central_writes_metrics_and_beats_random(tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "gru"
    rc = main(["train-central", "--data", WORLD, "--model", "gru-text", "--out", str(out),
               "--encoder", str(tiny_bert_dir), *FAST])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = json.loads((out / "metrics.json").read_text())
    assert printed["test"]["ndcg@10"] == m["test"]["ndcg@10"]
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert m["protocol"] == PROTOCOL_LOO and m["split"] == "leave-last-out" and m["seed"] == 0
    for part in ("validation", "test"):
        assert {"hr@10", "ndcg@10", "mrr@10", "coverage@10"} <= set(m[part])
        assert {"users_stable", "users_drift", "users_shift", "cold_items_lt5"} <= set(m[part])
        assert 0 <= m[part]["future_interest"]["topic_tv"] <= 1
    assert m["parameters"] > 0 and m["weight_bytes_fp32"] == 4 * m["parameters"]
    assert m["targets_per_second"] > 0 and m["peak_memory_mb"] > 0
    assert m["train_targets"] == 60 * 27 and m["stride"] == 5  # every training event but
    # each user's first, once; windows of 10 whose ends are 5 apart by default
    assert m["best_epoch"] == 1 + int(np.argmax(m["history"]["valid_ndcg@10"]))
    assert m["stopped_by"] == "epoch cap" and m["epochs_run"] == 3
    assert m["config"]["hidden"] == 16 and m["config"]["n_topics"] == 6
    # the code that produced the number: this checkout's commit (CI runs a git clone)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True, check=False).stdout.strip()
    assert m["versions"]["fedinterest"] == metadata.version("fedinterest")
    assert m["versions"]["fedinterest_commit"] == (head or None)
    from fedinterest.simulations.data import load_dataset

    ds = load_dataset(WORLD)
    assert m["test"]["hr@10"] > 2 * _random_hr10(ds, leave_last_out(ds).test)
    model = load_checkpoint(out / "model.pt")
    assert model.cfg.to_dict() == m["config"]


@pytest.mark.parametrize("name", ["pop", "static", "sasrec-id"])
def test_other_models_run_on_temporal_split(tmp_path, tiny_bert_dir, name):
    out = tmp_path / name
    assert main(["train-central", "--data", WORLD, "--model", name, "--out", str(out),
                 "--split", "temporal", "--encoder", str(tiny_bert_dir), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "global-temporal" and m["test"]["users"] > 0
    assert (out / "training_curve.png").exists() == (name == "sasrec-id")


def test_same_seed_same_model_other_seed_differs(tmp_path, tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.data import load_dataset

    ds = load_dataset(WORLD)
    enc = TextEncoder(tiny_bert_dir)
    kw = {"hidden": 16, "n_negatives": 16, "segment_len": 11, "context_len": 10}

    def fit(seed, sub):
        tcfg = TrainConfig(epochs=2, seed=seed, progress=False)
        info = run(ds, "transformer-text", tmp_path / sub, enc, "loo", tcfg, **kw)
        return info, get_weights(load_checkpoint(tmp_path / sub / "model.pt"))

    (a, wa), (b, wb), (_, wc) = fit(0, "a"), fit(0, "b"), fit(1, "c")
    assert a["test"] == b["test"] and a["history"]["train_loss"] == b["history"]["train_loss"]
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb))
    assert not all(np.array_equal(x, y) for x, y in zip(wa, wc))


def test_pop_baseline_by_hand():
    # u0: 0 1 2 3 | u1: 0 2 4 | u2: 1 0 3  -> train counts: item0 = 2, item1 = 2, others 0
    cat = Catalog([str(i) for i in range(5)], [f"item {i}" for i in range(5)])
    ds = Dataset.from_events("hand", cat, ["u0", "u1", "u2"], [0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
                             [0, 1, 2, 3, 0, 2, 4, 1, 0, 3], [1, 2, 3, 4, 1, 2, 3, 1, 2, 3])
    split = make_split(ds, "loo")
    counts = np.bincount(ds.item[split.train], minlength=5).astype(float)
    assert counts.tolist() == [2, 2, 0, 0, 0]
    inputs = CentralInputs(ds, split, np.eye(5, dtype=np.float32), np.full(len(ds), -1),
                           np.zeros((0, 5), np.float32), counts,
                           item_feature_matrix(np.eye(5), counts), np.zeros((5, 0), np.float32))
    # test u0: target 3, seen {0,1,2}: only item 4 competes, tied -> rank 0 (ties: half above)
    # test u1: target 4, seen {0,2}: item 1 is above, item 3 tied -> rank 1
    # test u2: target 3, seen {1,0}: items 2 and 4 tied -> rank 1
    res = evaluate(PopScorer(counts), inputs, split.test, k=10)
    assert res["hr@10"] == 1.0
    assert res["ndcg@10"] == pytest.approx((1 + 2 / np.log2(3)) / 3)
    assert res["mrr@10"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert evaluate(PopScorer(counts), inputs, split.test, k=1)["hr@1"] == pytest.approx(1 / 3)


def test_prepare_inputs_counts_only_training_events(tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.data import load_dataset

    ds = load_dataset(WORLD)
    split = make_split(ds, "loo")
    inp = prepare_inputs(ds, split, TextEncoder(tiny_bert_dir))
    assert inp.counts.sum() == split.train.sum()
    assert inp.item_feats.shape[0] == len(ds.catalog)
    assert inp.topic_vocab == list(ds.extras["truth"]["topics"])
    has = inp.text_idx >= 0
    assert has.sum() == sum(t is not None for t in ds.text) > 0


def test_several_models_and_seeds_write_a_summary(tmp_path, tiny_bert_dir):
    out = tmp_path / "bench"
    assert main(["train-central", "--data", WORLD, "--model", "pop,static,gru-id",
                 "--seeds", "0,1", "--out", str(out), "--encoder", str(tiny_bert_dir),
                 *FAST]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s["models"]) == {"pop", "static", "gru-id"}
    pop = s["models"]["pop"]
    assert pop["seeds"] == [0, 1] and pop["test/ndcg@10"]["std"] == 0.0  # pop has no seed
    one = json.loads((out / "pop" / "seed1" / "metrics.json").read_text())
    assert pop["test/ndcg@10"]["mean"] == pytest.approx(one["test"]["ndcg@10"])
    gru = s["models"]["gru-id"]["test/ndcg@10"]["values"]
    assert len(gru) == 2 and gru[0] != gru[1]  # seeds differ
    table = (out / "summary.md").read_text()
    assert "| gru-id |" in table and "NDCG@10 users_drift" in table


def _tied_dataset() -> Dataset:
    # u0 rates items 4, 3, 2, 1, 0 in one second, then item 5; u1 has no ties
    cat = Catalog([str(i) for i in range(8)], [f"item {i}" for i in range(8)])
    return Dataset.from_events("ties", cat, ["u0", "u1"], [0] * 6 + [1] * 4,
                               [4, 3, 2, 1, 0, 5, 0, 1, 2, 3], [7] * 5 + [9] + [1, 2, 3, 4],
                               rating=[1.0, 2, 3, 4, 5, 1, 2, 3, 4, 5])


def test_shuffle_ties_reorders_only_same_second_events_by_seed():
    ds = _tied_dataset()
    assert ds.item[:5].tolist() == [0, 1, 2, 3, 4]  # as loaded: ties by item id
    assert tie_share(ds) == pytest.approx(4 / 8)
    orders = {tuple(shuffle_ties(ds, seed).item[:5].tolist()) for seed in range(6)}
    assert len(orders) > 1 and all(sorted(o) == [0, 1, 2, 3, 4] for o in orders)
    a, b = shuffle_ties(ds, 3), shuffle_ties(ds, 3)
    assert np.array_equal(a.item, b.item)  # seeded
    assert a.item[5:].tolist() == ds.item[5:].tolist()  # untied events keep their place
    assert np.array_equal(a.user, ds.user) and np.array_equal(a.timestamp, ds.timestamp)
    rating_of = dict(zip(ds.item[:5].tolist(), ds.rating[:5].tolist()))
    assert [rating_of[i] for i in a.item[:5]] == a.rating[:5].tolist()  # columns move together
    a.validate()  # the random tie order is declared, so it is valid
    with pytest.raises(ValueError, match="order"):
        ds.__class__(**{**ds.__dict__, "item": a.item}).validate()  # undeclared: refused


def test_random_tie_order_is_named_in_the_protocol_and_refused_with_ground_truth(
        tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.shared.errors import ConfigError

    enc = TextEncoder(tiny_bert_dir)
    inp = load_inputs(_tied_dataset(), "loo", enc, tie_order="random")
    assert inp.protocol == PROTOCOL_LOO_RANDOM_TIES
    assert load_inputs(_tied_dataset(), "loo", enc).protocol == PROTOCOL_LOO
    ds = _tied_dataset()
    ds.extras["truth"] = {"kind": ["stable", "stable"]}
    with pytest.raises(ConfigError, match="ground truth"):
        load_inputs(ds, "loo", enc, tie_order="random")


def test_hybrid_model_and_disjoint_stride_run(tmp_path, tiny_bert_dir):
    out = tmp_path / "hybrid"
    assert main(["train-central", "--data", WORLD, "--model", "gru-hybrid", "--out", str(out),
                 "--encoder", str(tiny_bert_dir), "--stride", "10", "--tower-residual",
                 *FAST, "--segment-len", "10", "--max-minutes", "1e-6"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["stopped_by"] == "time budget" and m["epochs_run"] == 1
    assert m["config"]["item_repr"] == "hybrid" and m["config"]["tower_residual"]
    # disjoint segments of the 28 training events: 9 + 9 + 7 targets, segment starts predict
    assert m["stride"] == 10 and m["train_targets"] == 60 * 25  # nothing
    model = load_checkpoint(out / "model.pt")
    assert 0 < float(model.warm.sum()) < len(model.warm)  # the warm mask came with it


LONG_WORLD = "synthetic:n_users=6,n_items=80,events_per_user=70,n_topics=6,seed=2"


@pytest.mark.parametrize("name", ["sasrec-id", "transformer-text", "transformer-hybrid"])
def test_inference_reads_a_position_that_training_predicts_from(tiny_bert_dir, name):
    """The recipe's windows hold the 50 events of context and the target the last one
    predicts: with windows of 50, position 49 (where inference reads a long history) was
    never fitted and kept its random position embedding."""
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.shared.sequences import collate
    from fedinterest.simulations.central import build_for, model_config, training_windows
    from fedinterest.simulations.data import load_dataset

    ds = load_dataset(LONG_WORLD)
    inputs = prepare_inputs(ds, make_split(ds, "loo"), TextEncoder(tiny_bert_dir))
    cfg = model_config(name, inputs, hidden=16)
    assert (cfg.segment_len, cfg.context_len) == (51, 50)
    model = build_for(cfg, inputs)
    data, _ = training_windows(inputs, cfg, TrainConfig())
    loss, _ = model.example_losses(collate([data[i] for i in range(len(data))]))
    loss.sum().backward()
    trained = model.encoder.pos.weight.grad.abs().sum(1) > 0
    scorer = NeuralScorer(model, inputs)
    hists = [inputs.split.history_end(ds, int(j)) for j in inputs.split.valid]
    batch = inference_batch([(ds.item[s:e], ds.timestamp[s:e]) for s, e in hists],
                            cfg.context_len, cfg.text_dim)
    read = (batch["mask"].sum(1).long() - 1).unique()
    assert read.tolist() == [cfg.context_len - 1]  # every history here is longer than 50
    assert bool(trained[read].all())
    assert scorer.scores(hists[:1]).shape == (1, len(ds.catalog))
    # a shorter context brings a window of context + 1; a window no longer than the context
    # is refused rather than trained with a position it never fits
    assert model_config(name, inputs, context_len=20).segment_len == 21
    with pytest.raises(ConfigError, match="segment_len 20 must exceed context_len 20"):
        model_config(name, inputs, context_len=20, segment_len=20)


def test_dot_score_trains_from_the_cli_and_is_refused_with_sampled_negatives(
        tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "dot"
    assert main(["train-central", "--data", WORLD, "--model", "sasrec-id", "--out", str(out),
                 "--encoder", str(tiny_bert_dir), "--score", "dot", *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["score"] == "dot" and m["test"]["users"] > 0
    assert m["config"]["use_rating"] and m["config"]["use_private_text"]
    assert load_checkpoint(out / "model.pt").cfg.score == "dot"
    assert main(["train-central", "--data", WORLD, "--model", "sasrec-id", "--out",
                 str(tmp_path / "x"), "--encoder", str(tiny_bert_dir), "--score", "dot",
                 "--loss", "sampled", *FAST]) != 0
    assert "score='dot' needs loss='full'" in capsys.readouterr().err


def test_default_windows_give_every_target_nearly_its_whole_context(tiny_bert_dir):
    """Window ends 5 apart: a counted target sees at least 46 earlier events of its user (all
    of them when it has fewer), not the 25 of windows whose ends were 25 apart."""
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.central import model_config, training_windows
    from fedinterest.simulations.data import load_dataset

    ds = load_dataset(LONG_WORLD)
    inputs = prepare_inputs(ds, make_split(ds, "loo"), TextEncoder(tiny_bert_dir))
    cfg = model_config("sasrec-id", inputs)
    data, stride = training_windows(inputs, cfg, TrainConfig())
    assert stride == 5 and data.n_targets == int(inputs.split.train.sum()) - 6
    train_idx = np.flatnonzero(inputs.split.train)
    user_start = {}
    for pos, e in enumerate(train_idx):
        user_start.setdefault(int(ds.user[e]), pos)
    contexts = []
    for (s, e), first in zip(data.bounds, data.first_target):
        since_start = s - user_start[int(ds.user[train_idx[s]])]  # earlier events left out
        for t in range(s + int(first), e):
            contexts.append((t - s, t - s + since_start))  # (seen, available)
    seen, available = np.array(contexts).T
    assert (seen >= np.minimum(available, cfg.segment_len - stride)).all()
    assert seen.max() == cfg.context_len and (seen[available >= 50] >= 46).all()


def test_id_only_inputs_from_the_cli(tmp_path, tiny_bert_dir):
    out = tmp_path / "ids"
    assert main(["train-central", "--data", WORLD, "--model", "sasrec-id", "--out", str(out),
                 "--encoder", str(tiny_bert_dir), "--no-rating", "--no-private-text", *FAST,
                 "--epochs", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert not m["config"]["use_rating"] and not m["config"]["use_private_text"]
    assert m["config"]["positions"] == "before_norm"  # sasrec-id's default (issue 16)
    keys = set(load_checkpoint(out / "model.pt").state_dict())
    assert not any(k.startswith(("rating_emb", "text_in")) for k in keys)


def test_sasrec_options_from_the_cli(tmp_path, tiny_bert_dir):
    """--positions/--block/--ffn-inner/--init-std/--no-gap/--output-dropout reach the model
    and its checkpoint."""
    out = tmp_path / "sasrec"
    assert main(["train-central", "--data", WORLD, "--model", "sasrec-id", "--out", str(out),
                 "--encoder", str(tiny_bert_dir), "--positions", "before_norm", "--block",
                 "post_ln", "--ffn-inner", "24", "--init-std", "0.02", "--no-gap",
                 "--dropout", "0.5", "--output-dropout", "0", "--grad-clip", "0", *FAST,
                 "--epochs", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["config"]["positions"], m["config"]["block"], m["config"]["ffn_inner"],
            m["config"]["init_std"], m["config"]["use_gap"], m["config"]["dropout"],
            m["config"]["output_dropout"]) == ("before_norm", "post_ln", 24, 0.02, False, 0.5, 0.0)
    model = load_checkpoint(out / "model.pt")
    keys = set(model.state_dict())
    assert not any(k.startswith(("gap_emb", "encoder.ln.")) for k in keys)
    assert model.encoder.blocks[0].fc1.out_features == 24
    assert model.out_drop.p == 0.0 and model.drop.p == 0.5
    assert m["train_config"]["grad_clip"] == 0.0  # RecBole clips nothing


def test_negative_gradient_clip_is_refused(tmp_path, tiny_bert_dir, capsys):
    assert main(["train-central", "--data", WORLD, "--model", "sasrec-id", "--out",
                 str(tmp_path / "x"), "--encoder", str(tiny_bert_dir), "--grad-clip", "-1",
                 *FAST]) != 0
    assert "--grad-clip -1.0: expected >= 0" in capsys.readouterr().err

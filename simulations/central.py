"""Centralized (non-federated, non-private) training and evaluation: the quality reference.

Every neural model trains with a full-catalog softmax over overlapping causal windows (each
target once per epoch, with nearly its whole 50-event context: `training_windows`); the
device's DP training keeps disjoint segments and sampled negatives. Model selection uses
validation NDCG@10 only; the test split is evaluated once, with the selected weights.

Evaluation: every target event is ranked against the full catalog from the user's strictly
earlier events (fedinterest.shared.splits), the user's earlier items excluded, with
fedinterest.shared.metrics; users are scored in batches.
"""

from __future__ import annotations

import copy
import json
import random
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.item_features import item_counts, item_feature_matrix, topic_matrix
from fedinterest.shared.metrics import (
    PROTOCOL_LOO,
    PROTOCOL_LOO_RANDOM_TIES,
    PROTOCOL_TEMPORAL,
    RankingAccumulator,
)
from fedinterest.shared.model import (
    InterestModel,
    ModelConfig,
    build_model,
    n_parameters,
    save_checkpoint,
    weight_schema,
)
from fedinterest.shared.provenance import versions
from fedinterest.shared.schema import Dataset
from fedinterest.shared.sequences import SegmentDataset, collate, inference_batch, text_index
from fedinterest.shared.splits import (
    TIE_ORDERS,
    Split,
    global_temporal,
    leave_last_out,
    shuffle_ties,
)
from fedinterest.simulations.baselines import PopScorer, StaticScorer

# name -> ModelConfig fields that define it (the recipe and its choices: docs/RESULTS.md).
# Every model trains with a full-catalog softmax over overlapping causal windows of 51 events
# (TrainConfig.stride): 50 events of context and the target the 50th predicts, so the state
# inference reads (after the last of 50 events, position 49) is one training predicts from;
# the transformers have 2 blocks as SASRec. The device's DP training keeps disjoint segments
# and sampled negatives.
CONTEXT_LEN = 50
# window ends this far apart by default: each counted target sees at least 51 - 5 = 46 earlier
# events and each event is an input about ten times per epoch (RecBole's prefix augmentation:
# about fifty); chosen on validation (docs/RESULTS.md, issue 16 session 2)
DEFAULT_STRIDE = 5
_WINDOWS = {"segment_len": CONTEXT_LEN + 1, "context_len": CONTEXT_LEN, "loss": "full"}
NEURAL = {
    "gru-text": {"kind": "gru", "item_repr": "text", **_WINDOWS},
    "transformer-text": {"kind": "transformer", "item_repr": "text", "n_layers": 2, **_WINDOWS},
    "gru-id": {"kind": "gru", "item_repr": "id", **_WINDOWS},
    # SASRec's positions (N(0, 0.02), before the input LayerNorm): issue 16 session 3's screen
    "sasrec-id": {"kind": "transformer", "item_repr": "id", "n_layers": 2,
                  "positions": "before_norm", **_WINDOWS},
    # text tower + an ID row for warm items only: central only (an ID table cannot federate)
    "gru-hybrid": {"kind": "gru", "item_repr": "hybrid", **_WINDOWS},
    "transformer-hybrid": {"kind": "transformer", "item_repr": "hybrid", "n_layers": 2,
                           **_WINDOWS},
}
MODEL_NAMES = (*NEURAL, "static", "pop")
COLD_THRESHOLD = 5  # a test item with fewer training interactions is "cold"


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 64  # windows per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 15  # epochs without a better validation NDCG@10 before stopping
    grad_clip: float = 1.0
    max_minutes: float = 0.0  # stop after the epoch that passes this wall time (0 = no limit)
    stride: int | None = None  # window ends this far apart; None = DEFAULT_STRIDE (at most
    # the window length)
    seed: int = 0
    eval_batch_users: int = 256
    progress: bool = True  # progress bars
    log_epochs: bool = True  # one line per epoch on stdout


@dataclass
class CentralInputs:
    """Everything derived from the dataset and the split that models and scorers read."""

    ds: Dataset
    split: Split
    item_vectors: np.ndarray  # [N, D] public item text vectors
    text_idx: np.ndarray  # per event: index into text_table, -1 = no private text
    text_table: np.ndarray  # [m, D] private text vectors
    counts: np.ndarray  # [N] interactions per item in the training events
    item_feats: np.ndarray  # [N, D + POP_DIM]
    topic_dist: np.ndarray  # [N, n_topics]
    topic_vocab: list[str] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        random_ties = isinstance(self.ds.extras, dict) and "tie_order" in self.ds.extras
        if self.split.name == "leave-last-out":
            return PROTOCOL_LOO_RANDOM_TIES if random_ties else PROTOCOL_LOO
        return PROTOCOL_TEMPORAL + ("; same-timestamp events in a seeded random order"
                                    if random_ties else "")


def make_split(ds: Dataset, name: str) -> Split:
    if name == "loo":
        return leave_last_out(ds)
    if name == "temporal":
        return global_temporal(ds)
    raise ConfigError(f"split '{name}': expected 'loo' or 'temporal'")


def prepare_inputs(ds: Dataset, split: Split, encoder) -> CentralInputs:
    """Encodes item texts (through the encoder's cache) and private texts (never cached)."""
    from fedinterest.shared.encoder import catalog_vectors

    item_vectors = catalog_vectors(ds.catalog, encoder)
    tidx, texts = text_index(ds.text)
    table = encoder.encode(texts) if texts else np.zeros((0, item_vectors.shape[1]), np.float32)
    counts = item_counts(ds, split.train)
    truth = ds.extras.get("truth") if isinstance(ds.extras, dict) else None
    vocab = list(truth["topics"]) if truth else None  # align columns with the ground truth
    topics, vocab = topic_matrix(ds.catalog, vocab)
    return CentralInputs(ds, split, item_vectors, tidx, table.astype(np.float32), counts,
                         item_feature_matrix(item_vectors, counts), topics, vocab)


# -- scorers: `scores(histories) -> [B, N]`, `topics(histories) -> [B, n_topics] | None`,
# a history being a (start, end) event slice; baselines.py has the non-neural ones ----------
class NeuralScorer:
    def __init__(self, model: InterestModel, inputs: CentralInputs):
        self.model, self.inp = model, inputs
        model.eval()
        with torch.no_grad():
            self.emb = model.item_embeddings(torch.as_tensor(inputs.item_feats))

    def _states(self, hists: list[tuple[int, int]]) -> torch.Tensor:
        ds, inp, cfg = self.inp.ds, self.inp, self.model.cfg
        batch = inference_batch([(ds.item[s:e], ds.timestamp[s:e], inp.text_idx[s:e],
                                  inp.text_table, ds.rating[s:e]) for s, e in hists],
                                cfg.context_len, cfg.text_dim)
        return self.model.user_state(batch)

    @torch.no_grad()
    def scores(self, hists: list[tuple[int, int]]) -> np.ndarray:
        return self.model.score(self._states(hists), self.emb).numpy()

    @torch.no_grad()
    def topics(self, hists: list[tuple[int, int]]) -> np.ndarray | None:
        if not self.model.cfg.n_topics:
            return None
        return self.model.topic_distribution(self._states(hists)).numpy()


# -- evaluation -------------------------------------------------------------------------------
def _topic_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy, total variation and KL(truth || pred) against true distributions."""
    p = np.clip(pred, 1e-8, None)
    p /= p.sum(1, keepdims=True)
    kl = np.where(truth > 0, truth * np.log(np.clip(truth, 1e-12, None) / p), 0.0).sum(1)
    return {"topic_top1": float((p.argmax(1) == truth.argmax(1)).mean()),
            "topic_tv": float(0.5 * np.abs(p - truth).sum(1).mean()),
            "topic_kl": float(kl.mean()), "topic_users": len(truth)}


def evaluate(scorer, inputs: CentralInputs, targets: np.ndarray, k: int = 10,
             batch_users: int = 256, slices: dict[str, np.ndarray] | None = None,
             topic_horizon: int = 5) -> dict:
    """Full-ranking metrics over `targets` (event indices), overall and per named slice (bool
    masks over targets). On a synthetic world, also the topic head against the truth."""
    ds, n_items = inputs.ds, len(inputs.ds.catalog)
    accs = {"all": RankingAccumulator(k)}
    accs.update({name: RankingAccumulator(k) for name in (slices or {})})
    preds, truths = [], []
    truth_fn = _truth_fn(ds)
    for lo in range(0, len(targets), batch_users):
        tgt = np.asarray(targets[lo:lo + batch_users], np.int64)
        hists = [inputs.split.history_end(ds, int(j)) for j in tgt]
        scores = scorer.scores(hists)
        exclude = np.zeros((len(tgt), n_items), bool)
        for r, (s, e) in enumerate(hists):
            exclude[r, ds.item[s:e]] = True
        items = ds.item[tgt]
        accs["all"].add(scores, items, exclude)
        for name, mask in (slices or {}).items():
            m = np.asarray(mask[lo:lo + batch_users], bool)
            if m.any():
                accs[name].add(scores[m], items[m], exclude[m])
        if truth_fn is not None:
            p = scorer.topics(hists)
            if p is not None:
                preds.append(p)
                truths.append(truth_fn(tgt, topic_horizon))
    out = accs.pop("all").result(n_items)
    for name, acc in accs.items():
        out[name] = acc.result(n_items)
    if preds:
        out["future_interest"] = {**_topic_metrics(np.concatenate(preds), np.concatenate(truths)),
                                  "horizon": topic_horizon}
    return out


def _truth_fn(ds: Dataset):
    if not (isinstance(ds.extras, dict) and "truth" in ds.extras):
        return None
    from fedinterest.simulations.data.synthetic import future_topic_distribution

    return lambda idx, h: future_topic_distribution(ds, idx, horizon=h)


def target_slices(inputs: CentralInputs, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Cold items (< COLD_THRESHOLD training interactions); on a synthetic world, user kinds."""
    out = {f"cold_items_lt{COLD_THRESHOLD}": inputs.counts[inputs.ds.item[targets]]
           < COLD_THRESHOLD}
    truth = inputs.ds.extras.get("truth") if isinstance(inputs.ds.extras, dict) else None
    if truth is not None:
        kinds = np.asarray(truth["kind"])[inputs.ds.user[targets]]
        for kind in ("stable", "drift", "shift"):
            out[f"users_{kind}"] = kinds == kind
    return out


# -- training ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config(name: str, inputs: CentralInputs, **overrides) -> ModelConfig:
    if name not in NEURAL:
        raise ConfigError(f"model '{name}': expected one of {', '.join(NEURAL)}")
    d = inputs.item_vectors.shape[1]
    base = {"n_items": len(inputs.ds.catalog), "item_feat_dim": inputs.item_feats.shape[1],
            "text_dim": d, "n_topics": len(inputs.topic_vocab), **NEURAL[name]}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "context_len" in given and "segment_len" not in given:
        given["segment_len"] = given["context_len"] + 1  # the context plus its target
    base.update(given)
    try:
        cfg = ModelConfig(**base)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model configuration: {e}") from None
    if cfg.kind == "transformer" and cfg.segment_len <= cfg.context_len:
        # a window of T events predicts from positions 0..T-2 only: inference after
        # context_len events reads position context_len - 1, which training would never fit
        # (its position embedding would stay at its random initialisation)
        raise ConfigError(f"model {name}: segment_len {cfg.segment_len} must exceed "
                          f"context_len {cfg.context_len} (a window holds the context and the "
                          f"target its last event predicts): use --segment-len "
                          f"{cfg.context_len + 1}")
    return cfg


def build_for(cfg: ModelConfig, inputs: CentralInputs) -> InterestModel:
    model = build_model(cfg)
    neg_probs = inputs.counts + 1.0 if cfg.neg_sampling == "pop" else None
    return model.attach_catalog(inputs.item_feats if cfg.item_repr != "id" else None,
                                inputs.topic_dist if cfg.n_topics else None, neg_probs,
                                counts=inputs.counts if cfg.item_repr == "hybrid" else None)


def training_windows(inputs: CentralInputs, cfg: ModelConfig, tcfg: TrainConfig
                     ) -> tuple[SegmentDataset, int]:
    """The training examples and their stride: every user's training events cut into causal
    windows of cfg.segment_len events whose ends are tcfg.stride apart (default:
    DEFAULT_STRIDE, or the window length if that is shorter)."""
    neg_probs = inputs.counts + 1.0 if cfg.neg_sampling == "pop" else None
    stride = tcfg.stride or min(DEFAULT_STRIDE, cfg.segment_len)
    data = SegmentDataset.from_dataset(
        inputs.ds, inputs.split.train, cfg.segment_len,
        cfg.n_negatives if cfg.loss == "sampled" else 0, inputs.text_idx, inputs.text_table,
        neg_probs, seed=tcfg.seed, text_dim=cfg.text_dim, stride=stride)
    return data, stride


def train(model: InterestModel, inputs: CentralInputs, tcfg: TrainConfig) -> dict:
    """Trains on the split's training events with early stopping on validation NDCG@10.
    Leaves the best weights in `model`; returns the per-epoch history and timings."""
    from tqdm.auto import tqdm

    data, stride = training_windows(inputs, model.cfg, tcfg)
    if not len(data):
        raise ConfigError("no training events in this split")
    loader = torch.utils.data.DataLoader(
        data, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(tcfg.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    valid = inputs.split.valid
    hist = {"epoch": [], "train_loss": [], "valid_ndcg@10": [], "valid_hr@10": []}
    best, best_state, stale, train_seconds = -1.0, None, 0, 0.0
    stopped_by, t_start = "epoch cap", time.perf_counter()
    for epoch in range(1, tcfg.epochs + 1):
        model.train()
        start, total, n = time.perf_counter(), 0.0, 0
        for batch in tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not tcfg.progress):
            per_example, st = model.example_losses(batch, dedupe_items=True)
            # mean over counted targets (windows hold different numbers of them)
            loss = per_example.sum() * (batch["items"].shape[1] - 1) / max(st["steps"], 1.0)
            opt.zero_grad()
            loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            opt.step()
            total += loss.item() * st["steps"]
            n += st["steps"]
        train_seconds += time.perf_counter() - start
        res = evaluate(NeuralScorer(model, inputs), inputs, valid, batch_users=tcfg.eval_batch_users)
        hist["epoch"].append(epoch)
        hist["train_loss"].append(total / max(n, 1))
        hist["valid_ndcg@10"].append(res["ndcg@10"])
        hist["valid_hr@10"].append(res["hr@10"])
        if tcfg.log_epochs:
            print(f"epoch {epoch}: {time.perf_counter() - start:.0f}s loss "
                  f"{total / max(n, 1):.4f}  valid NDCG@10 {res['ndcg@10']:.4f}  "
                  f"HR@10 {res['hr@10']:.4f}", flush=True)
        if res["ndcg@10"] > best:
            best, best_state, stale = res["ndcg@10"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= tcfg.patience:
                stopped_by = "patience"
                break
        if tcfg.max_minutes and time.perf_counter() - t_start > 60 * tcfg.max_minutes:
            stopped_by = "time budget"
            break
    model.load_state_dict(best_state)
    epochs_run = len(hist["epoch"])
    return {"history": hist, "best_epoch": hist["epoch"][int(np.argmax(hist["valid_ndcg@10"]))],
            "epochs_run": epochs_run, "train_seconds": train_seconds,
            "targets_per_second": data.n_targets * epochs_run / max(train_seconds, 1e-9),
            "train_examples": len(data), "train_targets": data.n_targets, "stride": stride,
            "stopped_by": stopped_by}


def plot_curve(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(history["epoch"], history["train_loss"], marker=".")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    b.plot(history["epoch"], history["valid_ndcg@10"], marker=".", color="tab:orange")
    b.set_xlabel("epoch")
    b.set_ylabel("validation NDCG@10")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_inputs(ds: Dataset, split_name: str, encoder, tie_order: str = "item",
                tie_seed: int = 0) -> CentralInputs:
    """Orders same-timestamp events (by item id as loaded, or seeded random), cuts the split
    and prepares the model inputs."""
    if tie_order not in TIE_ORDERS:
        raise ConfigError(f"tie order '{tie_order}': expected one of {', '.join(TIE_ORDERS)}")
    if tie_order == "random":
        try:
            ds = shuffle_ties(ds, tie_seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    split = make_split(ds, split_name)
    if not len(split.test):
        raise ConfigError(f"dataset {ds.name}: no user has enough events for a {split.name} test")
    return prepare_inputs(ds, split, encoder)


def run_prepared(inputs: CentralInputs, name: str, out: Path, tcfg: TrainConfig | None = None,
                 static_window: int | None = None, **model_overrides) -> dict:
    """Trains/fits `name` on prepared inputs, evaluates validation and test once, writes
    OUT/metrics.json (+ training_curve.png and model.pt for neural models); returns the
    metrics."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"model '{name}': expected one of {', '.join(MODEL_NAMES)}")
    tcfg = tcfg or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(tcfg.seed)
    t0 = time.perf_counter()
    ds, split = inputs.ds, inputs.split
    info: dict = {"model": name, "dataset": ds.name, "split": split.name,
                  "protocol": inputs.protocol, "seed": tcfg.seed, "split_info": split.info,
                  "versions": versions()}  # when the run starts, not when it ends
    if name in NEURAL:
        cfg = model_config(name, inputs, **model_overrides)
        model = build_for(cfg, inputs)
        fit = train(model, inputs, tcfg)
        scorer = NeuralScorer(model, inputs)
        info.update(config=cfg.to_dict(), train_config=asdict(tcfg),
                    parameters=n_parameters(model),
                    weight_bytes_fp32=4 * n_parameters(model),
                    weight_arrays=len(weight_schema(model)),
                    **{k: v for k, v in fit.items() if k != "history"})
        save_checkpoint(model, out / "model.pt")
        plot_curve(fit["history"], out / "training_curve.png", f"{name} on {ds.name}, "
                   f"{split.name}, seed {tcfg.seed}")
        info["history"] = fit["history"]
    elif name == "pop":
        scorer = PopScorer(inputs.counts)
        info["parameters"] = 0
    else:
        scorer = StaticScorer(ds, inputs.item_vectors, inputs.topic_dist, static_window)
        info.update(parameters=0, static_window=static_window)
    info["validation"] = evaluate(scorer, inputs, split.valid, batch_users=tcfg.eval_batch_users,
                                  slices=target_slices(inputs, split.valid))
    info["test"] = evaluate(scorer, inputs, split.test, batch_users=tcfg.eval_batch_users,
                            slices=target_slices(inputs, split.test))
    info.update(seconds=time.perf_counter() - t0, peak_memory_mb=peak_memory_mb(),
                torch_threads=torch.get_num_threads())
    (out / "metrics.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def run(ds: Dataset, name: str, out: Path, encoder, split_name: str = "loo",
        tcfg: TrainConfig | None = None, static_window: int | None = None,
        tie_order: str = "item", **model_overrides) -> dict:
    """One model, one seed: prepare the inputs, then `run_prepared`."""
    t0 = time.perf_counter()
    inputs = load_inputs(ds, split_name, encoder, tie_order)
    prep = time.perf_counter() - t0
    info = run_prepared(inputs, name, out, tcfg, static_window, **model_overrides)
    info["prepare_seconds"] = prep
    (Path(out) / "metrics.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": a.tolist()}


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std over seeds, per model, of the numbers RESULTS.md reports."""
    by_model: dict[str, list[dict]] = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    out = {}
    for name, rs in by_model.items():
        row: dict = {"seeds": [r["seed"] for r in rs], "split": rs[0]["split"],
                     "protocol": rs[0]["protocol"], "parameters": rs[0]["parameters"]}
        for part in ("test", "validation"):
            for key in ("hr@10", "ndcg@10", "mrr@10", "coverage@10"):
                row[f"{part}/{key}"] = _mean_std([r[part][key] for r in rs])
            for sl in rs[0][part]:
                if isinstance(rs[0][part][sl], dict) and "ndcg@10" in rs[0][part][sl]:
                    row[f"{part}/{sl}/ndcg@10"] = _mean_std([r[part][sl]["ndcg@10"] for r in rs])
                    row[f"{part}/{sl}/users"] = rs[0][part][sl]["users"]
            fi = rs[0][part].get("future_interest")
            if fi:
                for key in ("topic_top1", "topic_tv", "topic_kl"):
                    row[f"{part}/future_interest/{key}"] = _mean_std(
                        [r[part]["future_interest"][key] for r in rs])
        for key in ("train_seconds", "targets_per_second", "epochs_run", "best_epoch", "seconds"):
            if key in rs[0]:
                row[key] = _mean_std([r[key] for r in rs])
        row["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rs)
        out[name] = row
    return out


def summary_markdown(summary: dict) -> str:
    """The benchmark table (test split; NDCG@10 of each slice; timings)."""
    def ms(d: dict, digits: int = 4) -> str:
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    slices = sorted({k.split("/")[1] for row in summary.values() for k in row
                     if k.startswith("test/") and k.endswith("/ndcg@10") and k.count("/") == 2})
    topic = any("test/future_interest/topic_top1" in row for row in summary.values())
    head = ["model", "HR@10", "NDCG@10", "MRR@10", "coverage@10"]
    head += [f"NDCG@10 {s}" for s in slices]
    head += ["topic top-1", "topic TV"] if topic else []
    head += ["valid NDCG@10", "epochs", "train s", "targets/s", "params"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in summary.items():
        cells = [name] + [ms(row[f"test/{k}"]) for k in ("hr@10", "ndcg@10", "mrr@10",
                                                          "coverage@10")]
        cells += [ms(row[f"test/{s}/ndcg@10"]) if f"test/{s}/ndcg@10" in row else "-"
                  for s in slices]
        if topic:
            fi = "test/future_interest/"
            cells += [ms(row[fi + "topic_top1"], 3) if fi + "topic_top1" in row else "-",
                      ms(row[fi + "topic_tv"], 3) if fi + "topic_tv" in row else "-"]
        cells.append(ms(row["validation/ndcg@10"]))
        cells.append(f"{row['epochs_run']['mean']:.0f}" if "epochs_run" in row else "-")
        cells.append(f"{row['train_seconds']['mean']:.0f}" if "train_seconds" in row else "-")
        cells.append(f"{row['targets_per_second']['mean']:.0f}"
                     if "targets_per_second" in row else "-")
        cells.append(str(row["parameters"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def benchmark(ds: Dataset, names: list[str], seeds: list[int], out: Path, encoder,
              split_name: str = "loo", tcfg: TrainConfig | None = None,
              static_window: int | None = None, tie_order: str = "item",
              **model_overrides) -> dict:
    """Every model x seed on inputs prepared once: OUT/MODEL/seedS/metrics.json, then
    OUT/summary.json and OUT/summary.md (mean ± std over seeds)."""
    tcfg = tcfg or TrainConfig()
    t0 = time.perf_counter()
    inputs = load_inputs(ds, split_name, encoder, tie_order)
    prep = time.perf_counter() - t0
    runs = []
    for name in names:
        for seed in seeds:
            info = run_prepared(inputs, name, Path(out) / name / f"seed{seed}",
                                replace(tcfg, seed=seed), static_window, **model_overrides)
            runs.append(info)
    summary = {"dataset": ds.name, "split": inputs.split.name, "protocol": inputs.protocol,
               "seeds": seeds, "prepare_seconds": prep,
               "total_seconds": time.perf_counter() - t0,
               "peak_memory_mb": peak_memory_mb(), "models": summarize(runs)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2,
                                                       default=_json_default))
    (Path(out) / "summary.md").write_text(summary_markdown(summary["models"]))
    return summary


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")

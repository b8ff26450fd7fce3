"""`fedinterest train-central`: train and evaluate models centrally (no federation, no DP).

One model and one seed writes OUT/metrics.json (validation and test HR/NDCG/MRR/coverage@10,
cold-item and, on the synthetic world, per-user-kind and future-interest metrics, protocol,
timings, events/s, peak memory, parameter count, config) and, for neural models,
OUT/training_curve.png and OUT/model.pt. Several models (--model a,b) or seeds (--seeds 0,1,2)
share one preparation (item/text encoding) and write OUT/MODEL/seedS/... plus OUT/summary.json
and OUT/summary.md (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedinterest.shared.errors import ConfigError
from fedinterest.simulations.central import MODEL_NAMES, TrainConfig, benchmark, run

# CLI flag -> ModelConfig field (None = keep the model's default)
_MODEL_FLAGS = {
    "hidden": "hidden", "layers": "n_layers", "heads": "n_heads", "dropout": "dropout",
    "segment_len": "segment_len", "context_len": "context_len", "negatives": "n_negatives",
    "neg_sampling": "neg_sampling", "temperature": "temperature", "topic_weight": "topic_weight",
    "loss": "loss", "tower_width": "tower_width", "warm_min_count": "warm_min_count",
    "score": "score", "text_prior": "text_prior", "prior_rank": "prior_rank",
    "positions": "positions", "block": "block", "ffn_inner": "ffn_inner", "init_std": "init_std",
    "output_dropout": "output_dropout",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-central", help="train and evaluate a model centrally (the quality reference)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="a dataset spec: MovieLens folder, 'synthetic[:KEY=VAL,...]', ...")
    p.add_argument("--model", required=True,
                   help=f"one or more (comma-separated) of: {', '.join(MODEL_NAMES)}")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--seeds", help="comma-separated seeds (overrides --seed), e.g. 0,1,2")
    p.add_argument("--split", choices=("loo", "temporal"), default="loo",
                   help="leave-last-out per user (default) or a global temporal split")
    _add_dp_flags(p)
    t = TrainConfig()
    p.add_argument("--epochs", type=int, default=t.epochs, help="maximum epochs")
    p.add_argument("--patience", type=int, default=t.patience,
                   help="stop after this many epochs without a better validation NDCG@10")
    p.add_argument("--max-minutes", type=float, default=t.max_minutes,
                   help="stop training after the epoch that passes this wall time (the best "
                        "validation epoch's weights are kept; metrics.json says why it stopped)")
    p.add_argument("--batch-size", type=int, default=t.batch_size,
                   help=f"training examples per step (default {t.batch_size})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"learning rate (default {t.lr})")
    p.add_argument("--weight-decay", type=float, default=t.weight_decay,
                   help=f"weight decay (default {t.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=t.grad_clip,
                   help=f"clip the gradient's norm at this value, 0 = no clipping (default "
                        f"{t.grad_clip}; RecBole's SASRec: none)")
    p.add_argument("--stride", type=int,
                   help="training windows end this many events apart and count only their "
                        "last STRIDE targets (default 5, or --segment-len if shorter; "
                        "= --segment-len gives the device's disjoint segments)")
    _add_model_flags(p)
    p.add_argument("--tie-order", choices=("item", "random"), default="item",
                   help="order of a user's same-timestamp events: by item id as loaded, or "
                        "a seeded random order (seed 0) cut before the split")
    p.add_argument("--static-window", type=int,
                   help="static baseline: average only the last N history items")
    p.add_argument("--encoder", help="text encoder model folder (default: packaged MiniLM)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cmd)


def _add_dp_flags(p: argparse.ArgumentParser) -> None:
    dp = p.add_argument_group("central DP-SGD reference (simulations/central_dp.py)")
    dp.add_argument("--dp-epsilon", type=float,
                    help="train with Opacus DP-SGD at this epsilon (unit: one segment)")
    dp.add_argument("--dp-delta", type=float, default=1e-5,
                    help="delta of --dp-epsilon (default 1e-5, as the federated runs)")
    dp.add_argument("--dp-batch-size", type=int, default=512,
                    help="expected Poisson batch of segments (default 512)")
    dp.add_argument("--dp-epochs", type=int, default=15,
                    help="passes over the training segments, in expectation (default 15)")
    dp.add_argument("--dp-lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    dp.add_argument("--dp-clip", type=float, default=1.0,
                    help="per-segment gradient clipping norm (default 1.0)")
    dp.add_argument("--dp-train-only", default="",
                    help="train only these text-prior parameters (comma-separated name "
                         "prefixes, e.g. prior.pop,prior.adapter); 'inf' as --dp-epsilon "
                         "then trains without noise (the screen)")
    dp.add_argument("--dp-count-noise", type=float, default=0.0,
                    help="Gaussian noise multiplier of the popularity count release the "
                         "prior reads (composed into --dp-epsilon; 0 = exact counts)")
    dp.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                    help="fix the DP-SGD noise multiplier instead of calibrating it to "
                         "--dp-epsilon (refused if it spends more; default 0 = calibrate)")
    dp.add_argument("--dp-ema", type=float, default=0.0,
                    help="validate and keep an exponential moving average of the trained "
                         "prior parameters with this decay per step (default 0 = the last "
                         "iterate; post-processing, free in epsilon)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (defaults: fedinterest.shared.model.ModelConfig)")
    m.add_argument("--hidden", type=int, help="width of the interest state")
    m.add_argument("--layers", type=int, help="recurrent or transformer layers")
    m.add_argument("--heads", type=int, help="attention heads (transformer models)")
    m.add_argument("--dropout", type=float, help="dropout probability")
    m.add_argument("--output-dropout", type=float,
                   help="dropout on the interest state before it scores items (default: "
                        "--dropout; SASRec/RecBole: 0)")
    m.add_argument("--segment-len", type=int,
                   help="events per training window (default: --context-len + 1, the context "
                        "and the target its last event predicts; transformers need more "
                        "than --context-len)")
    m.add_argument("--context-len", type=int,
                   help="most recent events read at inference (default 50)")
    m.add_argument("--negatives", type=int, help="sampled negatives per example")
    m.add_argument("--neg-sampling", choices=("uniform", "pop"),
                   help="how negatives are drawn: uniformly or by popularity")
    m.add_argument("--temperature", type=float, help="initial softmax temperature (learned)")
    m.add_argument("--topic-weight", type=float, help="weight of the next-topic loss")
    m.add_argument("--loss", choices=("sampled", "full"),
                   help="override the model's loss (default: full softmax over the catalog; "
                        "'sampled' = the device's per-example sampled negatives)")
    m.add_argument("--score", choices=("cosine", "dot"),
                   help="how a state scores an item: cosine with a learned temperature "
                        "(default; what devices use) or SASRec's inner product (full loss)")
    m.add_argument("--positions", choices=("after_norm", "before_norm"),
                   help="transformers: learned positions at N(0, 1) added after the input "
                        "LayerNorm (after_norm) or, as SASRec, at N(0, 0.02) summed with the "
                        "event vector before it (before_norm)")
    m.add_argument("--block", choices=("pre_ln", "post_ln"),
                   help="transformer blocks: pre-LN + final LayerNorm, or post-LN (SASRec)")
    m.add_argument("--ffn-inner", type=int,
                   help="width of a transformer block's feed-forward layer (default 2 x hidden)")
    m.add_argument("--init-std", type=float,
                   help="transformer blocks' Linear weights N(0, STD), biases 0 (SASRec: 0.02; "
                        "default: torch's initialisation)")
    m.add_argument("--no-gap", action="store_true",
                   help="no time-gap bucket as an event input")
    m.add_argument("--tower-width", type=int, help="hidden width of the text tower's MLP")
    m.add_argument("--text-prior", type=int,
                   help="> 0: the text-similarity prior over the last N items "
                        "(shared/text_prior.py)")
    m.add_argument("--prior-rank", type=int, help="rank of the text prior's query adapter")
    m.add_argument("--tower-residual", action="store_true",
                   help="text tower = linear projection of the item features + MLP correction")
    m.add_argument("--warm-min-count", type=int,
                   help="hybrid models: training interactions an item needs for an ID row")
    m.add_argument("--no-rating", action="store_true",
                   help="no rating bucket as an event input (RecBole's SASRec reads IDs only)")
    m.add_argument("--no-private-text", action="store_true",
                   help="ignore private text (e.g. MovieLens tags) as model input")


def run_cmd(args: argparse.Namespace) -> int:
    import torch
    from fedinterest.shared.embedding_cache import EmbeddingCache
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.data import load_dataset

    names = [n.strip() for n in args.model.split(",") if n.strip()]
    for n in names:
        if n not in MODEL_NAMES:
            raise ConfigError(f"--model {n}: expected one of {', '.join(MODEL_NAMES)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if args.grad_clip < 0:
        raise ConfigError(f"--grad-clip {args.grad_clip}: expected >= 0 (0 = no clipping)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    encoder = TextEncoder(args.encoder, cache=EmbeddingCache())
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, patience=args.patience,
                       grad_clip=args.grad_clip,
                       stride=args.stride, max_minutes=args.max_minutes, seed=args.seed,
                       progress=not args.no_progress)
    overrides = {field: getattr(args, flag) for flag, field in _MODEL_FLAGS.items()}
    if args.no_rating:
        overrides["use_rating"] = False
    if args.no_private_text:
        overrides["use_private_text"] = False
    if args.no_gap:
        overrides["use_gap"] = False
    if args.tower_residual:
        overrides["tower_residual"] = True
    if args.dp_epsilon is not None:  # before the multi-seed benchmark: DP runs its own seeds
        return _run_dp(args, ds, names, seeds, encoder, overrides)
    if len(names) > 1 or len(seeds) > 1:
        summary = benchmark(ds, names, seeds, args.out, encoder, args.split, tcfg,
                            args.static_window, args.tie_order, **overrides)
        print((args.out / "summary.md").read_text(), end="")
        print(json.dumps({"summary": str(args.out / "summary.json"),
                          "total_seconds": round(summary["total_seconds"], 1),
                          "peak_memory_mb": round(summary["peak_memory_mb"])}))
        return 0
    tcfg.seed = seeds[0]
    info = run(ds, names[0], args.out, encoder, args.split, tcfg, args.static_window,
               args.tie_order, **overrides)
    summary = {k: info["test"][k] for k in ("hr@10", "ndcg@10", "mrr@10", "coverage@10")}
    print(json.dumps({"model": names[0], "split": info["split"], "seed": tcfg.seed,
                      "test": summary, "valid_ndcg@10": info["validation"]["ndcg@10"],
                      "metrics": str(args.out / "metrics.json")}))
    return 0


def _run_dp(args, ds, names: list[str], seeds: list[int], encoder, overrides: dict) -> int:
    """--dp-epsilon: one central DP-SGD run per seed (OUT/seedS/metrics.json)."""
    from fedinterest.simulations.central_dp import DPTrainConfig, mean_test, run_dp

    if len(names) != 1:
        raise ConfigError("--dp-epsilon trains one model at a time")
    infos = []
    for seed in seeds:
        tcfg = DPTrainConfig(epsilon=args.dp_epsilon, delta=args.dp_delta, seed=seed,
                             epochs=args.dp_epochs, batch_size=args.dp_batch_size,
                             lr=args.dp_lr, clip=args.dp_clip,
                             train_only=args.dp_train_only, count_noise=args.dp_count_noise,
                             noise_multiplier=args.dp_noise_multiplier, ema=args.dp_ema)
        out = args.out / f"seed{seed}" if len(seeds) > 1 else args.out
        infos.append(run_dp(ds, names[0], out, encoder, tcfg, args.split, **overrides))
    print(json.dumps({"model": names[0], "epsilon": args.dp_epsilon, "seeds": seeds,
                      "test": mean_test(infos)}))
    return 0

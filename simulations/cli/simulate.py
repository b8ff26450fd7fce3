"""`fedinterest simulate`: the main job (see simulations/simulate.py)."""

from __future__ import annotations

import argparse
import logging

from fedinterest.shared.config import load_config, parse_overrides

from .run_flags import add_run_config_flags, run_config_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="run a federated simulation (default: synthetic world)",
                       description="Federated simulation on Flower's simulation engine, one "
                                   "node per user. Defaults: the synthetic world, event-level "
                                   "distributed DP under SecAgg+ (docs/PRIVACY.md). Every run "
                                   "setting is a flag below; a TOML file "
                                   "(--config) may hold them too, and flags override it.")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with run settings (top level or a [fedinterest] table)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting as KEY=VALUE, e.g. --set local-epochs=2 (or "
                        "local_epochs=2; repeatable; overrides the flags)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--popularity-from", metavar="RUN_DIR",
                   help="publish the DP popularity release of an earlier run on the same "
                        "dataset instead of counting again (no second privacy spend)")
    p.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                   help="ray (default): Flower's simulation engine, one node per user; "
                        "inprocess: the same ServerApp and ClientApp in one thread without "
                        "Ray, for fast tuning sweeps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_run_config_flags(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fedinterest.shared.flower_logging import drop_ray_accelerator_tip
    from fedinterest.simulations.data import load_dataset
    from fedinterest.simulations.simulate import run

    overrides = run_config_overrides(args)
    for key, value in parse_overrides(args.set).items():  # --set wins over a flag
        overrides.pop(key.replace("-", "_"), None)
        overrides[key] = value
    cfg = load_config(args.config, overrides)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    drop_ray_accelerator_tip()
    ds = load_dataset(cfg.dataset)
    print(f"dataset {cfg.dataset}: {ds.n_users} users, {len(ds)} events, "
          f"{len(ds.catalog)} items; run directory {cfg.out_dir}")
    res = run(cfg, ds, resume=args.resume, quiet=args.quiet,
              popularity_from=args.popularity_from, engine=args.engine)
    _print_table(res)
    print(f"results: {cfg.out_dir}/results.json\nreport:  {res['report']}")
    return 0


def _print_table(res: dict) -> None:
    print(f"{'round':>5} {'ok/sampled':>10} {'loss':>8} {'val NDCG@10':>11} {'test HR@10':>10} "
          f"{'test NDCG@10':>12} {'eps(dev max)':>12} {'eps(user)':>9} {'s':>6}")
    m = res.get("initial")
    if m:  # the untrained model, before round 1
        print(f"{0:>5} {'untrained':>10} {_f(None, 8)} {_f(m.get('val-ndcg@10'), 11)} "
              f"{_f(m.get('test-hr@10'), 10)} {_f(m.get('test-ndcg@10'), 12)}")
    for r in res["rounds"]:
        m = r["metrics"]
        print(f"{r['round']:>5} {r['accepted']:>4}/{r['sampled']:<5} "
              f"{_f(r['train_loss'], 8)} {_f(m.get('val-ndcg@10'), 11)} "
              f"{_f(m.get('test-hr@10'), 10)} {_f(m.get('test-ndcg@10'), 12)} "
              f"{_f(r['device_epsilon_max'], 12, 2)} {_f(r['user_epsilon'], 9, 2)} "
              f"{r['seconds']:>6.1f}")


def _f(v, width: int, digits: int = 4) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"

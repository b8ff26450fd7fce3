"""`fedinterest bench ...`: the performance benchmarks (see docs/BENCHMARKS.md).

Each benchmark writes its JSON to --out (default runs/bench/<name>.json); with --update-docs it
also replaces its row in the results table of docs/BENCHMARKS.md (--doc PATH: another file).
Nothing is written into the repository unless asked.
"""

from __future__ import annotations

import argparse
import shlex

from fedinterest.shared.errors import ConfigError

from .vocabulary import DATA_HELP, add_data, add_encoder

DOC = "docs/BENCHMARKS.md"
NAMES = ("encoder", "dp-step", "recommend", "simulation", "scaling", "engine-tick", "memory",
         "upload")


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def doc_flags(q: argparse.ArgumentParser) -> None:
    """Nothing is written into the repository unless asked: --update-docs (or --doc PATH)."""
    q.add_argument("--update-docs", action="store_true",
                   help=f"also replace this benchmark's row in {DOC} (default: JSON only)")
    q.add_argument("--doc", default=None, metavar="PATH",
                   help="replace the row in this markdown file instead (implies --update-docs)")
    q.add_argument("--no-doc", action="store_true", help=argparse.SUPPRESS)  # old default


def _output_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument("--out", default=None, metavar="PATH",
                   help="JSON result file (default runs/bench/<name>.json)")
    doc_flags(q)


def _ray_niceness(q: argparse.ArgumentParser) -> None:
    q.add_argument("--ray-worker-niceness", type=int, default=0, metavar="N",
                   help="niceness of Ray's workers (default 0, the same as the in-process "
                   "arm; Ray's own default is 15, which starves them on a busy machine)")


def _add_encoder(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench encoder` and its flags."""
    q = which.add_parser("encoder", help="TextEncoder vs a plain transformers loop; cached "
                         "re-run")
    add_data(q, help=DATA_HELP + " (default: ../shared/data/ml-latest-small beside the "
             "repository, else the synthetic world)")
    add_encoder(q, old_model_alias=True)
    q.add_argument("--batch-size", type=_positive, default=64,
                   help="texts per encoder batch (default 64)")
    q.add_argument("--max-length", type=_positive, default=128,
                   help="tokens per text at most (default 128)")
    q.add_argument("--reps", type=_positive, default=3,
                   help="timed repetitions per arm (default 3)")
    q.add_argument("--limit", type=_positive, default=None, help="first N catalog texts only")
    q.add_argument("--threads", type=_positive, default=1, help="torch threads (default 1)")
    _output_flags(q)


def _add_dp_step(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench dp-step` and its flags."""
    q = which.add_parser("dp-step", help="DP-SGD step vs plain step of the device model")
    q.add_argument("--steps", type=_positive, default=30, help="timed steps per arm (default 30)")
    q.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    q.add_argument("--batch-size", type=_positive, default=8,
                   help="expected segments per DP-SGD step (default 8)")
    q.add_argument("--items", type=_positive, default=9742, help="catalog size")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run setting that shapes the model, e.g. --set hidden=32 (repeatable)")
    q.add_argument("--kinds", type=_csv, default=("gru",), help="gru,transformer")
    q.add_argument("--modes", type=_csv, default=None,
                   help="arms (default all): plain,dp-hooks,dp-ghost,dp-functorch,dpgru-plain")
    q.add_argument("--round-reps", type=int, default=2,
                   help="whole train_local rounds per arm (0: skip)")
    q.add_argument("--round-segments", type=_positive, default=24,
                   help="segments of the device in a whole round (default 24)")
    q.add_argument("--profile", action="store_true", help="add a profile of a DP step")
    _output_flags(q)


def _add_recommend(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench recommend` and its flags."""
    q = which.add_parser("recommend", help="Device.recommend latency")
    q.add_argument("--items", type=_positive, default=10_000, help="catalog size (default 10000)")
    q.add_argument("--history", type=_positive, default=200,
                   help="events in the device's history (default 200)")
    q.add_argument("--calls", type=_positive, default=300,
                   help="recommend calls timed (default 300)")
    q.add_argument("--k", type=_positive, default=10, help="items per recommendation (default 10)")
    q.add_argument("--threads", type=_positive, default=1, help="torch threads (default 1)")
    q.add_argument("--profile", action="store_true", help="add a profile of one call")
    _output_flags(q)


def _add_simulation(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench simulation` and its flags."""
    q = which.add_parser("simulation", help="client-rounds/s: Flower vs a plain loop")
    q.add_argument("--devices", type=_positive, default=16, help="simulated devices (default 16)")
    q.add_argument("--rounds", type=_positive, default=3, help="rounds per repetition (default 3)")
    q.add_argument("--reps", type=_positive, default=3, help="repetitions per arm (default 3)")
    q.add_argument("--events-per-user", type=_positive, default=60,
                   help="events per synthetic user (default 60)")
    q.add_argument("--items", type=_positive, default=1000, help="catalog size (default 1000)")
    q.add_argument("--work-dir", default="runs/bench/simulation-work",
                   help="scratch folder for the runs (default runs/bench/simulation-work)")
    _ray_niceness(q)
    _output_flags(q)


def _add_upload(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench upload` and its flags."""
    q = which.add_parser("upload", help="bytes per client per round / fp32 model size")
    q.add_argument("--run", default=None, metavar="DIR",
                   help="a finished run directory (default: the newest bench run)")
    q.add_argument("--fp16-experiment", action="store_true",
                   help="instead: final NDCG@10 with train updates rounded as an fp16 delta "
                   "vs as today, in-process runs on a synthetic world (row upload-fp16)")
    q.add_argument("--seeds", type=_csv_ints, default=(1, 2, 3), help="fp16 experiment seeds")
    q.add_argument("--devices", type=_positive, default=60, help="fp16 experiment devices")
    q.add_argument("--rounds", type=_positive, default=4, help="fp16 experiment rounds")
    _output_flags(q)


def _add_scaling(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench scaling` and its flags."""
    q = which.add_parser("scaling", help="round time against sampled clients")
    q.add_argument("--sizes", type=_csv_ints, default=(100, 500, 2000),
                   help="sampled clients per round to time, comma-separated (default 100,500,2000)")
    q.add_argument("--rounds", type=_positive, default=3,
                   help="rounds per size; the first and last are not timed when there are 3+")
    q.add_argument("--events-per-user", type=_positive, default=12,
                   help="events per synthetic user (default 12)")
    q.add_argument("--items", type=_positive, default=500, help="catalog size (default 500)")
    q.add_argument("--engine", choices=("flower", "inprocess"), default="flower",
                   help="flower (Ray simulation engine, default) or inprocess")
    q.add_argument("--work-dir", default="runs/bench/scaling-work",
                   help="scratch folder for the runs (default runs/bench/scaling-work)")
    q.add_argument("--push-window", type=_positive, default=None, metavar="N",
                   help="the server keeps at most N messages in flight; default: the run's "
                   "own window of 256 (server/windowed_grid.py)")
    q.add_argument("--linkstate-index", choices=("on", "off", "both"), default="on",
                   help="Flower's in-memory LinkState indexed by node as in every run (on), "
                   "Flower's own (off), or both side by side on the same worlds")
    _ray_niceness(q)
    _output_flags(q)


def _add_engine_tick(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench engine-tick` and its flags."""
    q = which.add_parser("engine-tick", help="CPU of one tick of Flower's simulation engine")
    q.add_argument("--sizes", type=_csv_ints, default=(100, 500, 2000, 10000),
                   help="registered nodes to time, comma-separated (default 100,500,2000,10000)")
    q.add_argument("--unindexed-up-to", type=_positive, default=2000,
                   help="largest N measured with Flower's own LinkState (its tick is N^2)")
    q.add_argument("--ticks", type=_positive, default=3, help="timed ticks per size (default 3)")
    _output_flags(q)


def _add_client_round(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench client-round` and its flags (not part of `bench all`)."""
    q = which.add_parser("client-round", help="CPU of a train client-round by stage (cProfile)")
    add_data(q, help=DATA_HELP + " (default: ../shared/data/ml-latest-small)")
    q.add_argument("--rounds", type=_positive, default=3, help="round 1 is not profiled")
    q.add_argument("--clients-per-round", type=_positive, default=30,
                   help="devices per round (default 30)")
    q.add_argument("--secagg", action="store_true", help="train rounds under SecAgg+")
    q.add_argument("--run-dir", default="runs/bench/client-round-run",
                   help="the run directory (default runs/bench/client-round-run)")
    q.add_argument("--fresh", action="store_true", help="prepare again even if prepared")
    q.add_argument("--no-profile", action="store_true",
                   help="no cProfile: client-rounds per second and CPU per client-round only "
                   "(row client-round-rate)")
    q.add_argument("--versus", metavar="REV", default=None,
                   help="the rate (as --no-profile) of commit REV's code and of this tree side "
                   "by side, alternated in fresh processes (row client-round-speedup)")
    q.add_argument("--reps", type=_positive, default=2, help="--versus: runs per arm (default 2)")
    q.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess",
                   help="--versus: in process (default) or `fedinterest simulate` on Ray")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run setting, as in fedinterest simulate --set")
    _output_flags(q)


def _add_memory(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench memory` and its flags."""
    q = which.add_parser("memory", help="peak memory of a whole simulation (child process)")
    add_data(q, help=DATA_HELP + " (default: ../shared/data/ml-latest-small)")
    q.add_argument("--rounds", type=_positive, default=2,
                   help="federated rounds of the simulation (default 2)")
    q.add_argument("--nice", type=int, default=10, help="niceness of the child (0: none)")
    q.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    q.add_argument("--run-dir", default="runs/bench/memory-run",
                   help="the simulation's run directory (default runs/bench/memory-run)")
    q.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the simulation (and fail) after this long")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to fedinterest simulate --set")
    q.add_argument("--engine", choices=("ray", "inprocess"), default="ray",
                   help="passed to fedinterest simulate --engine (default ray)")
    _output_flags(q)


def _add_ddp_cost(which: argparse._SubParsersAction) -> None:
    """`fedinterest bench ddp-cost` and its flags (not part of `bench all`)."""
    q = which.add_parser("ddp-cost", help="CPU per round: distributed DP vs the same SecAgg+ "
                         "round without DP")
    add_data(q, help=DATA_HELP + " (default: synthetic, the default run's world)")
    q.add_argument("--rounds", type=_positive, default=6,
                   help="rounds per run; 2..R-1 are timed (default 6)")
    q.add_argument("--reps", type=_positive, default=2, help="runs per arm (default 2)")
    q.add_argument("--run-dir", default="runs/bench/ddp-cost-run",
                   help="the run directory (default runs/bench/ddp-cost-run)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run setting, as in fedinterest simulate --set")
    _output_flags(q)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="performance benchmarks (ratios measured side by side)",
                       description="Performance benchmarks. Each measures its arms side by side"
                       " (alternated) and reports medians and their ratio; results go to "
                       "runs/bench/<name>.json, and with --update-docs to a row of "
                       "docs/BENCHMARKS.md.")
    which = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    _add_encoder(which)
    _add_dp_step(which)
    _add_recommend(which)
    _add_simulation(which)
    _add_upload(which)
    _add_scaling(which)
    _add_engine_tick(which)
    _add_client_round(which)
    _add_memory(which)
    _add_ddp_cost(which)

    q = which.add_parser("all", help="every benchmark in turn with its defaults")
    q.add_argument("--skip", type=_csv, default=(), help=f"names to skip, from {NAMES}")
    doc_flags(q)
    p.set_defaults(func=main)


_NOT_OPTIONS = {"func", "command", "bench", "out", "doc", "no_doc", "update_docs"}


def command_line(name: str, args: argparse.Namespace) -> str:
    """The shortest `fedinterest bench NAME ...` that reproduces `args` (options left at
    their defaults are omitted)."""
    defaults = vars(_defaults(name))
    parts = ["fedinterest", "bench", name]
    for key, value in vars(args).items():
        if key in _NOT_OPTIONS or key not in defaults or value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            for v in value:
                parts += [flag, str(v)]
        elif isinstance(value, tuple):
            parts += [flag, ",".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run_one(name: str, args: argparse.Namespace, command: str):
    """Runs benchmark `name` with the options in `args`; returns its BenchResult."""
    import torch

    if name == "encoder":
        from fedinterest.simulations.bench.encoder import run

        saved = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return run(args.data, args.encoder, args.batch_size, args.max_length, args.reps,
                       args.limit, command)
        finally:
            torch.set_num_threads(saved)
    if name == "dp-step":
        from fedinterest.shared.config import parse_overrides
        from fedinterest.simulations.bench.training import ARMS, run

        return run(args.steps, args.warmup, args.batch_size, args.items, args.kinds,
                   args.modes or tuple(ARMS), args.round_reps, args.round_segments,
                   args.profile, parse_overrides(args.set), command)
    if name == "recommend":
        from fedinterest.simulations.bench.device import run_recommend

        return run_recommend(args.items, args.history, args.calls, args.k, args.threads,
                             args.profile, command)
    if name == "simulation":
        from fedinterest.simulations.bench.federation import run_throughput

        return run_throughput(args.devices, args.rounds, args.reps, args.events_per_user,
                              args.items, args.work_dir, command,
                              worker_niceness=args.ray_worker_niceness)
    if name == "upload":
        if args.fp16_experiment:
            from fedinterest.simulations.bench.compression import run as fp16_experiment

            return fp16_experiment(args.seeds, args.devices, args.rounds, command=command)
        from fedinterest.simulations.bench.device import run_upload

        return run_upload(args.run, command)
    if name == "scaling":
        from fedinterest.simulations.bench.scaling import run_scaling

        return run_scaling(args.sizes, args.rounds, args.events_per_user, args.items,
                           args.engine, args.work_dir, command,
                           worker_niceness=args.ray_worker_niceness,
                           push_window=args.push_window, linkstate_index=args.linkstate_index)
    if name == "engine-tick":
        from fedinterest.simulations.bench.engine_tick import run as engine_tick

        return engine_tick(args.sizes, args.unindexed_up_to, args.ticks, command)
    if name == "client-round":
        return _client_round(args, command)
    if name == "memory":
        from fedinterest.simulations.bench.memory import run

        extra = [x for kv in args.set for x in ("--set", kv)]
        return run(args.data, args.run_dir, args.rounds, args.nice, args.interval, extra,
                   args.timeout, command, engine=args.engine)
    if name == "ddp-cost":
        from fedinterest.shared.config import load_config, parse_overrides
        from fedinterest.simulations.bench.ddp_cost import run as ddp_cost

        overrides = {**parse_overrides(args.set), "dataset": args.data or "synthetic",
                     "rounds": args.rounds, "out_dir": args.run_dir}
        return ddp_cost(load_config(None, overrides), args.reps, command)
    raise ConfigError(f"unknown benchmark {name!r}; expected one of {', '.join(NAMES)}")


def _client_round(args: argparse.Namespace, command: str):
    from fedinterest.shared.config import load_config, parse_overrides
    from fedinterest.simulations.bench.client_round import run
    from fedinterest.simulations.data import default_movielens_path

    dataset = args.data or default_movielens_path()
    if dataset is None:
        raise ConfigError("bench client-round: no --dataset and ml-latest-small not found "
                          "(../shared/data/ml-latest-small)")
    overrides = {**parse_overrides(args.set), "dataset": str(dataset), "rounds": args.rounds,
                 "clients_per_round": args.clients_per_round, "secagg": args.secagg,
                 "out_dir": args.run_dir, "popularity": False, "eval_every": 0,
                 "eval_clients": min(20, args.clients_per_round),
                 "device_epsilon": 1e6}  # every device trains every round (no refusal)
    label = args.data or "../shared/data/ml-latest-small"
    if args.versus:
        from fedinterest.simulations.bench.versus import run_versus

        load_config(None, overrides)  # fail here on a bad setting, not in every arm
        return run_versus(args.versus, overrides, args.reps, f"{args.run_dir}-versus",
                          command, label, args.engine)
    return run(load_config(None, overrides), command, reuse=not args.fresh,
               dataset_label=label, profile=not args.no_profile)


def _defaults(name: str) -> argparse.Namespace:
    """The options `fedinterest bench NAME` would get with no flags."""
    from fedinterest.simulations.cli import build_parser

    return build_parser().parse_args(["bench", name])


def _report(result, args: argparse.Namespace) -> None:
    from fedinterest.simulations.bench.common import update_doc, write_result

    path = write_result(result, getattr(args, "out", None))
    print(f"{result.name}: {result.summary}\n  ratio: {result.ratio}\n  load average "
          f"{result.load_start[0]:.1f} -> {result.load_end[0]:.1f}\n  json: {path}")
    doc = args.doc or (DOC if args.update_docs else None)
    if doc is not None:
        print(f"  doc:  {update_doc(doc, result)}")


def main(args: argparse.Namespace) -> int:
    if args.bench != "all":
        _report(run_one(args.bench, args, command_line(args.bench, args)), args)
        return 0
    unknown = set(args.skip) - set(NAMES)
    if unknown:
        raise ConfigError(f"--skip: unknown benchmark(s) {', '.join(sorted(unknown))}; "
                          f"expected names from {', '.join(NAMES)}")
    for name in NAMES:
        if name in args.skip:
            continue
        sub_args = _defaults(name)
        sub_args.doc, sub_args.update_docs = args.doc, args.update_docs
        _report(run_one(name, sub_args, command_line(name, sub_args)), sub_args)
    return 0

"""Simulation throughput and round-time scaling.

Throughput: client-rounds per second through Flower's simulation engine (`run_simulation` on
Ray with one actor per core, as `simulate.run` calls it) against the same server loop and the
same ClientApp called in a plain loop in this process (`InProcessGrid` below: the ServerApp's
messages go through Flower's protobuf serialisation and straight into `client_app.app(msg,
ctx)`, one node after another). Both arms start from copies of one prepared run directory
(same catalog, same encrypted device stores, same config), alternated Flower, plain, Flower,
plain. The rate counts accepted train replies over the summed round times (the round loop's
own clock: sampling, sending, training, validation, aggregation, checkpoint) of every round
but the first; the CPU seconds the process tree spent per client-round (load-independent) and
the end-to-end rate including Ray's start-up are reported beside it. Ray runs its workers at
niceness 15 by default; both arms run at the same priority (niceness 0) unless told otherwise,
so that a busy machine does not starve one arm only.

Scaling: the time of one round with N sampled synthetic clients for several N, each N its own
run through Flower, with a small per-client model so that the cost of the machinery is
visible; the slope of log(time) against log(N) says whether it grows faster than linearly.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from fedinterest.server.windowed_grid import WindowedGrid
from fedinterest.shared.atomic_io import read_json, write_json
from fedinterest.simulations.bench.common import BenchResult, median, verdict
from fedinterest.simulations.inprocess_grid import run_in_process

TARGET_THROUGHPUT = 0.7


# -- prepared worlds -----------------------------------------------------------------------
def bench_config(out_dir: Path, n_clients: int, rounds: int, **overrides):
    """The run config of a benchmark run: every device trains every round (no budget refusal,
    no popularity stage), evaluation only after the last round on two devices. min_clients is
    every device: the server waits until all of them are online before it samples (in Flower's
    simulation the ServerApp starts while nodes are still being registered, and with a smaller
    minimum it samples from whatever part has registered by then)."""
    from fedinterest.shared.config import RunConfig

    base = {"out_dir": str(out_dir), "rounds": rounds, "clients_per_round": n_clients,
            "device_epsilon": 1e6, "popularity": False, "eval_every": 0, "eval_clients": 2,
            "min_clients": n_clients,
            # the loop these benchmarks time: on-device DP-SGD on the full model (the settings
            # before issue 15 made distributed DP over the text prior the run default)
            "dp": "event", "text_prior": 0, "eval_initial": False}
    return RunConfig(**{**base, **overrides})


def prepare_world(root: Path, cfg, n_users: int, events_per_user: int, n_items: int,
                  seed: int = 0, encoder=None):
    """A synthetic world of `n_users` devices, prepared (catalog published, stores
    provisioned) in `root`. Default encoder: all-MiniLM-L6-v2 with the shared embedding
    cache (the catalog is public text)."""
    from fedinterest.simulations.data.synthetic import generate_world
    from fedinterest.simulations.simulate import prepare

    if encoder is None:
        from fedinterest.shared.embedding_cache import EmbeddingCache
        from fedinterest.shared.encoder import TextEncoder

        encoder = TextEncoder(cache=EmbeddingCache())
    ds = generate_world(n_users=n_users, n_items=n_items, events_per_user=events_per_user,
                        seed=seed)
    prepare(cfg.replace(out_dir=str(root)), ds, encoder=encoder, quiet=True)
    return ds


def fresh_copy(prepared: Path, dest: Path) -> dict:
    """A copy of a prepared run directory whose prepared.json points into the copy."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("checkpoints", "messages",
                                                                   "results.json", "*.html"))
    info = read_json(dest / "prepared.json")
    info["catalog_path"] = str(dest / Path(info["catalog_path"]).relative_to(prepared))
    info["devices_dir"] = str(dest / "devices")
    write_json(dest / "prepared.json", info)
    return info


# -- the two arms ---------------------------------------------------------------------------
def plain_arm(run_dir: Path, cfg, client_app=None) -> dict:
    """The same server loop and ClientApp (or `client_app`, any callable(message=,
    context=)), every message delivered in this thread."""
    info = read_json(run_dir / "prepared.json")
    start = time.perf_counter()
    fed = run_in_process(cfg.replace(out_dir=str(run_dir)), Path(info["catalog_path"]),
                         Path(info["devices_dir"]), int(info["n_devices"]), client_app)
    total = time.perf_counter() - start
    return {"rounds": fed.state.history, "end_to_end_seconds": total, "wall_seconds": total,
            "weights": fed.state.weights}


def _rate(rounds: list[dict]) -> tuple[float, float, int]:
    """(client-rounds per second over the round loop, summed round seconds, client-rounds)."""
    n = sum(r["accepted"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    return n / seconds if seconds else float("nan"), seconds, n


def run_throughput(n_devices: int = 16, rounds: int = 3, reps: int = 3,
                   events_per_user: int = 60, n_items: int = 1000,
                   work_dir: str | Path = "runs/bench/simulation-work", command: str = "",
                   encoder=None, worker_niceness: int | None = 0,
                   flower_engine: str = "flower", **overrides) -> BenchResult:
    """Flower vs plain loop, alternated. Round 1 of each run (worker warm-up; for Flower it
    also holds Ray's start-up in its CPU count) is left out of the rates. `flower_engine`
    "inprocess" replaces Ray in the Flower arm (the harness's own tests)."""
    if rounds < 2:
        raise ValueError("rounds must be >= 2: round 1 (warm-up) is not counted")
    work = Path(work_dir)
    prepared = work / "prepared"
    if prepared.exists():
        shutil.rmtree(prepared)
    cfg = bench_config(prepared, n_devices, rounds, **overrides)
    t0 = time.perf_counter()
    prepare_world(prepared, cfg, n_devices, events_per_user, n_items, encoder=encoder)
    prepare_seconds = time.perf_counter() - t0
    nice = "Ray's default" if worker_niceness is None else str(worker_niceness)
    result = BenchResult(
        "simulation", f"client-rounds/s through Flower's simulation engine (Ray, {_cores()} "
        f"actors at niceness {nice}) vs the same ServerApp loop + ClientApp called in a loop "
        f"in one process; synthetic world, {n_devices} devices all sampled, rounds 2-{rounds} "
        f"of {rounds}, model {cfg.model} hidden {cfg.hidden}, dp={cfg.dp}", command, "", "")
    arms: dict[str, list[dict]] = {"flower": [], "plain": []}
    for rep in range(reps):
        for name, engine in (("flower", flower_engine), ("plain", "inprocess")):
            run_dir = work / f"{name}-{rep}"
            fresh_copy(prepared, run_dir)
            done, e2e = _timed_rounds(run_dir, cfg, engine, worker_niceness)
            arms[name].append({"rounds": done, "end_to_end_seconds": e2e,
                               "run_dir": str(run_dir)})
    rates = {k: [_rate(a["rounds"][1:])[0] for a in v] for k, v in arms.items()}
    cpu_per = {k: [sum(r["cpu_seconds"] for r in a["rounds"][1:]) / _rate(a["rounds"][1:])[2]
                   for a in v] for k, v in arms.items()}
    e2e = {k: [_rate(a["rounds"])[2] / a["end_to_end_seconds"] for a in v]
           for k, v in arms.items()}
    med = {k: median(v) for k, v in rates.items()}
    med_cpu = {k: median(v) for k, v in cpu_per.items()}
    ratio = med["flower"] / med["plain"]
    cpu_ratio = med_cpu["plain"] / med_cpu["flower"]  # throughput per CPU-second
    ratio_e2e = median(e2e["flower"]) / median(e2e["plain"])
    result.summary = (f"Flower {med['flower']:.2f}, plain loop {med['plain']:.2f} client-rounds"
                      f"/s over the round loop; CPU per client-round {med_cpu['flower']:.3f} s "
                      f"(Flower: driver + Ray daemons + workers) vs {med_cpu['plain']:.3f} s; "
                      f"end to end incl. Ray start {median(e2e['flower']):.2f} vs "
                      f"{median(e2e['plain']):.2f} (n={reps} each)")
    result.ratio = (f"Flower/plain {verdict(ratio, TARGET_THROUGHPUT, True)} with {_cores()} "
                    f"Ray actors; per CPU-second {cpu_ratio:.3g}; end to end {ratio_e2e:.3g}")
    result.data = {
        "n_devices": n_devices, "rounds": rounds, "reps": reps, "events_per_user":
            events_per_user, "n_items": n_items, "config": cfg.to_dict(),
        "ray_worker_niceness": worker_niceness, "prepare_seconds": prepare_seconds,
        "client_rounds_per_second": rates, "cpu_seconds_per_client_round": cpu_per,
        "end_to_end_client_rounds_per_second": e2e, "median": med, "median_cpu": med_cpu,
        "ratio_flower_over_plain": ratio, "ratio_per_cpu_second": cpu_ratio,
        "ratio_end_to_end": ratio_e2e,
        "round_seconds": {k: [[r["seconds"] for r in a["rounds"]] for a in v]
                          for k, v in arms.items()},
        "round_cpu_seconds": {k: [[r["cpu_seconds"] for r in a["rounds"]] for a in v]
                              for k, v in arms.items()},
        "end_to_end_seconds": {k: [a["end_to_end_seconds"] for a in v]
                               for k, v in arms.items()},
        "run_dirs": {k: [a["run_dir"] for a in v] for k, v in arms.items()},
        "target": TARGET_THROUGHPUT, "ray_actors": _cores(),
    }
    return result.finish()


def _cores() -> int:
    import os

    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _ray_worker_niceness(niceness: int | None) -> Iterator[None]:
    """Ray starts its workers at niceness 15 (its `worker_niceness` default), so on a busy
    machine Flower's clients yield the CPU to every other process while an in-process loop
    does not. `niceness` (e.g. 0) sets it for the Ray instance started inside; None leaves
    Ray's default."""
    import os

    key = "RAY_worker_niceness"
    saved = os.environ.get(key)
    if niceness is not None:
        os.environ[key] = str(niceness)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _timed_rounds(run_dir: Path, cfg, engine: str, worker_niceness: int | None = 0,
                  push_window: int | None = None, linkstate_index: bool = True
                  ) -> tuple[list[dict], float]:
    """(round records, each with the CPU seconds the process tree spent in it; end-to-end
    seconds) of one run through Flower's simulation engine or in process. CPU per round is
    read at each round's end (the round loop's on_round callback), so it counts the server
    and every client of the round whatever else runs on the machine. `linkstate_index`:
    Flower's in-memory LinkState indexed by node as in every `simulate.run`
    (simulations/flower_patches.py); False measures Flower's own."""
    import os

    from fedinterest.client.client_app import app as client_app
    from fedinterest.server.server_app import make_server_app, run_server
    from fedinterest.simulations import flower_patches
    from fedinterest.simulations.bench.memory import tree_cpu_seconds

    info = read_json(run_dir / "prepared.json")
    cfg = cfg.replace(out_dir=str(run_dir))
    rounds: list[dict] = []
    cpu_marks = [(tree_cpu_seconds(os.getpid()), time.process_time())]

    def on_round(rec) -> None:
        cpu_marks.append((tree_cpu_seconds(os.getpid()), time.process_time()))
        (tree0, own0), (tree1, own1) = cpu_marks[-2:]
        # own: this process (the ServerApp, and every client too when in process)
        rounds.append({**rec.__dict__, "cpu_seconds": tree1 - tree0,
                       "driver_cpu_seconds": own1 - own0})

    start = time.perf_counter()
    if engine == "inprocess":
        run_in_process(cfg, Path(info["catalog_path"]), Path(info["devices_dir"]),
                       int(info["n_devices"]), client_app, on_round=on_round)
    else:
        from flwr.simulation import run_simulation

        if linkstate_index and not flower_patches.apply():
            raise RuntimeError("the LinkState index does not apply to this Flower version")
        if not linkstate_index:
            flower_patches.revert()
        if push_window:
            from flwr.serverapp import ServerApp

            server_app = ServerApp()

            @server_app.main()
            def _main(grid, context) -> None:
                run_server(WindowedGrid(grid, push_window), cfg, Path(info["catalog_path"]),
                           Path(info["devices_dir"]), on_round=on_round)
        else:
            server_app = make_server_app(cfg, Path(info["catalog_path"]),
                                         Path(info["devices_dir"]), on_round=on_round)
        # the engine settings of simulations/simulate.run: one actor per core
        with _ray_worker_niceness(worker_niceness):
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=int(info["n_devices"]),
                           backend_config={"client_resources": {"num_cpus": 1,
                                                                "num_gpus": 0.0},
                                           "init_args": {"num_cpus": _cores(),
                                                         "include_dashboard": False,
                                                         "log_to_driver": False}},
                           verbose_logging=False)
    # round 1's CPU also holds everything before it (Ray start-up, hello): never timed
    return rounds, time.perf_counter() - start

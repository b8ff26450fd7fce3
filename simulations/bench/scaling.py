"""Round time against the number of sampled clients: is the engine linear?

Each size N is its own run of a synthetic world through Flower's simulation engine (or in
process) with a small per-client model, so that the machinery's cost is visible; the slope
of log(round CPU) against log(N) says whether it grows faster than linearly. Arms: Flower's
in-memory LinkState indexed by destination node (what every `simulate.run` uses, see
simulations/flower_patches.py) and Flower's own; `linkstate_index="both"` runs both on the
same prepared world, unindexed first, so their ratio at each N comes from one run.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from fedinterest.simulations.bench.common import BenchResult, load_average, median
from fedinterest.simulations.bench.federation import (
    _timed_rounds,
    bench_config,
    fresh_copy,
    prepare_world,
)

SMALL_MODEL = {"hidden": 16, "segment_len": 10, "n_negatives": 16, "batch_size": 4}
INDEX_ARMS = {"on": ("indexed",), "off": ("unindexed",), "both": ("unindexed", "indexed")}


def run_scaling(sizes: tuple[int, ...] = (100, 500, 2000), rounds: int = 3,
                events_per_user: int = 12, n_items: int = 500, engine: str = "flower",
                work_dir: str | Path = "runs/bench/scaling-work", command: str = "",
                encoder=None, worker_niceness: int | None = 0,
                push_window: int | None = None, linkstate_index: str = "on",
                **overrides) -> BenchResult:
    """Round time against the number of sampled clients (every device sampled).
    `push_window`: the server keeps at most this many messages in flight; None: the run's
    own window (server/windowed_grid.py PUSH_WINDOW, 256), as every `simulate.run`.
    `linkstate_index`: "on" (as every run), "off" (Flower's own LinkState) or "both"."""
    if engine not in ("flower", "inprocess"):
        raise ValueError(f"engine must be flower or inprocess, got {engine!r}")
    if linkstate_index not in INDEX_ARMS:
        raise ValueError(f"linkstate_index must be one of {sorted(INDEX_ARMS)}, "
                         f"got {linkstate_index!r}")
    arms = INDEX_ARMS[linkstate_index] if engine == "flower" else ("inprocess",)
    work, model = Path(work_dir), {**SMALL_MODEL, **overrides}
    result = BenchResult(_name(push_window, linkstate_index, engine), _measured(
        engine, push_window, arms, model, events_per_user), command, "", "")
    per_arm: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for n in sizes:
        prepared = work / f"prepared-{n}"
        if prepared.exists():
            shutil.rmtree(prepared)
        cfg = bench_config(prepared, n, rounds, **model)
        t0 = time.perf_counter()
        prepare_world(prepared, cfg, n, events_per_user, n_items, encoder=encoder)
        prep = time.perf_counter() - t0
        for arm in arms:
            per_arm[arm][n] = {**_one_size(work / f"run-{n}-{arm}", prepared, cfg, n, rounds,
                                           engine, worker_niceness, push_window, arm),
                               "prepare_seconds": prep}
        shutil.rmtree(prepared / "devices", ignore_errors=True)  # thousands of stores
    _summarise(result, sizes, per_arm)
    result.data.update({"sizes": list(sizes), "rounds": rounds, "engine": engine,
                        "push_window": push_window, "linkstate_index": linkstate_index,
                        "events_per_user": events_per_user, "n_items": n_items,
                        "model": model, "per_arm": per_arm,
                        "cpu_measured_as": "user+system CPU of this process and its "
                                           "descendants (Ray daemons and workers) from "
                                           "/proc, per round",
                        "target": "slope <= 1 (5% tolerance for noise)"})
    return result.finish()


def _name(push_window: int | None, linkstate_index: str, engine: str) -> str:
    suffix = {"on": "", "off": "-unindexed", "both": "-linkstate-index"}[linkstate_index]
    return ("scaling" + ("-push-window" if push_window else "")
            + (suffix if engine == "flower" else "-inprocess"))


def _measured(engine: str, push_window: int | None, arms: tuple[str, ...], model: dict,
              events_per_user: int) -> str:
    from fedinterest.server.windowed_grid import PUSH_WINDOW

    window = f", at most {push_window or PUSH_WINDOW} messages in flight"
    state = {"indexed": "LinkState indexed by node (every run)",
             "unindexed": "Flower 1.42's own LinkState", "inprocess": "in process"}
    return (f"seconds of one train round (not the first, not the last) with N sampled "
            f"synthetic clients (every device sampled; {engine}{window}; "
            f"{' vs '.join(state[a] for a in arms)}; small model hidden {model['hidden']}, "
            f"segment {model['segment_len']}, {model['n_negatives']} negatives, "
            f"{events_per_user} events per user, dp event)")


def _one_size(run_dir: Path, prepared: Path, cfg, n: int, rounds: int, engine: str,
              worker_niceness: int | None, push_window: int | None, arm: str) -> dict:
    """One run of `rounds` rounds with every one of the `n` devices sampled."""
    fresh_copy(prepared, run_dir)
    load_before = load_average()
    rounds_done, e2e = _timed_rounds(run_dir, cfg, engine, worker_niceness, push_window,
                                     linkstate_index=arm != "unindexed")
    if len(rounds_done) != rounds or not any(r["accepted"] for r in rounds_done):
        raise RuntimeError(f"the run with {n} clients finished {len(rounds_done)} of "
                           f"{rounds} rounds with {[r['accepted'] for r in rounds_done]} "
                           "accepted replies: no devices answered (did Ray start? see "
                           "the log above)")
    secs = [r["seconds"] for r in rounds_done]
    # round 1 warms every worker up (first DP fit imports Opacus, ...) and the last round
    # also evaluates two devices: time the rounds in between when there are any
    timed = rounds_done[1:-1] or rounds_done[:-1] or rounds_done
    shutil.rmtree(run_dir / "devices", ignore_errors=True)
    return {"round_seconds": secs,
            "train_round_seconds": median([r["seconds"] for r in timed]),
            "train_round_cpu_seconds": median([r["cpu_seconds"] for r in timed]),
            "train_round_driver_cpu_seconds": median([r["driver_cpu_seconds"] for r in timed]),
            "clients": int(median([r["accepted"] for r in timed])),
            "outside_rounds_seconds": e2e - sum(secs),
            "accepted": [r["accepted"] for r in rounds_done], "end_to_end_seconds": e2e,
            "load_average_before_after": [load_before, load_average()]}


def _summarise(result: BenchResult, sizes: tuple[int, ...],
               per_arm: dict[str, dict[int, dict]]) -> None:
    """Summary, ratio and slopes of every arm into `result` (the last arm's slopes decide)."""
    summaries, ratios = [], []
    for arm, per_size in per_arm.items():
        clients = [per_size[n]["clients"] for n in sizes]
        wall = _slopes(clients, [per_size[n]["train_round_seconds"] for n in sizes])
        cpu = _slopes(clients, [per_size[n]["train_round_cpu_seconds"] for n in sizes])
        result.data.setdefault("log_log_slopes_cpu", {})[arm] = cpu
        result.data.setdefault("log_log_slopes_wall", {})[arm] = wall
        result.data.setdefault("clients", {})[arm] = clients
        short = [f"{n} sampled, {c} took part" for n, c in zip(sizes, clients) if c != n]
        summaries.append(f"{arm}: " + ", ".join(
            f"{per_size[n]['clients']} clients {per_size[n]['train_round_seconds']:.1f} s wall"
            f" {per_size[n]['train_round_cpu_seconds']:.1f} s CPU ("
            f"{per_size[n]['train_round_cpu_seconds'] / per_size[n]['clients'] * 1e3:.0f} ms "
            f"CPU/client, driver {per_size[n]['train_round_driver_cpu_seconds']:.1f} s)"
            for n in sizes) + (" (fewer clients than asked: " + "; ".join(short) + ")"
                               if short else ""))
        worst = max(cpu) if cpu else float("nan")
        ratios.append(f"{arm}: log-log slope of CPU {', '.join(f'{s:.2f}' for s in cpu)} "
                      f"(wall {', '.join(f'{s:.2f}' for s in wall)}; <= 1.05: "
                      f"{'met' if worst <= 1.05 else 'missed'})")
    if set(per_arm) == {"unindexed", "indexed"}:
        cpu_of = {arm: [per_arm[arm][n]["train_round_cpu_seconds"] for n in sizes]
                  for arm in per_arm}
        result.data["cpu_unindexed_over_indexed"] = dict(zip(sizes, [
            a / b for a, b in zip(cpu_of["unindexed"], cpu_of["indexed"])]))
        ratios.append("round CPU unindexed/indexed " + ", ".join(
            f"{n}: {r:.2f}" for n, r in result.data["cpu_unindexed_over_indexed"].items()))
    result.summary, result.ratio = "; ".join(summaries), "; ".join(ratios)


def _slopes(sizes, seconds) -> list[float]:
    """d log(seconds) / d log(N) between consecutive sizes."""
    return [math.log(seconds[i + 1] / seconds[i]) / math.log(sizes[i + 1] / sizes[i])
            for i in range(len(sizes) - 1)]

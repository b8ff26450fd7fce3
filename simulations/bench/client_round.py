"""Where a client-round's CPU goes: cProfile over the in-process engine, by stage.

A client-round is one train message through the real ClientApp (mods included: egress guard,
update packing, SecAgg+ when on, clipping) plus its trip over the wire (Flower's protobuf
round trip in `InProcessGrid`). The run is `fedinterest simulate --engine inprocess` on a
prepared run directory; the profiler is switched on after round 1 (imports, first model
builds and caches warm up there) and covers every later round. Stages are a handful of
functions that do not call each other; their cumulative times are summed per stage and the
rest of the ClientApp's time is reported as "other", so the stages add up to the whole.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

from fedinterest.shared.atomic_io import read_json
from fedinterest.simulations.bench.common import BenchResult

#: stage -> (path suffix, function name) of functions whose cumulative time is that stage
STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "catalog load (PublishedCatalog.load)": (("shared/published_catalog.py", "load"),),
    "store open + key unlock": (("client/device.py", "open"),),
    "history read + decrypt": (("client/device.py", "_history"),),
    "segments (windows, negatives)": (("shared/sequences.py", "from_events"),),
    "model build + weights in": (("client/dp_training.py", "build_local_model"),),
    "Opacus wrap (make_private, engine)": (("opacus/privacy_engine.py", "make_private"),
                                           ("client/dp_training.py", "_new_engine")),
    "DP-SGD steps": (("client/dp_training.py", "_dp_sgd"),),  # minus make_private, below
    "ledger (load, encrypted write)": (("client/device.py", "ledger"),
                                       ("client/store.py", "put_blob")),
    "privacy accounting (one-step RDP per noise, rate)": (("shared/privacy.py", "epsilon_after"),
                                                          ("shared/privacy.py", "record")),
    "egress: store re-open + texts": (("client/client_app.py", "_guard_inputs"),),
    "egress: reply checks": (("client/egress.py", "check_reply"),),
    "update packing (encode_update)": (("shared/wire.py", "encode_update"),),
    "SecAgg+ masking": (("flwr/client/mod/secure_aggregation/secaggplus_mod.py",
                         "secaggplus_mod"),),
    "store close": (("client/device.py", "close"),),
}
WIRE = (("flwr/common/serde.py", "message_to_proto"), ("flwr/common/serde.py",
                                                        "message_from_proto"))
CLIENT_APP = ("flwr/clientapp/client_app.py", "__call__")
#: costs spread over several stages (reported beside them, not added to them)
CROSS_CUTTING = {"Flower Array -> numpy (np.load per call)": (("flwr/app/message/array.py",
                                                               "numpy"),),
                 "run config parsed from the message": (("client/client_app.py", "_run_config"),),
                 "one-step RDP curve computed (cache miss)": (("shared/privacy.py", "_step_rdp"),)}
EVALUATE = (("client/client_app.py", "evaluate"),)  # the evaluate handler, mods excluded


def _cumulative(stats: pstats.Stats, wanted: tuple[tuple[str, str], ...]) -> tuple[float, int]:
    """Summed cumulative seconds and primitive calls of the functions `wanted`."""
    total, calls = 0.0, 0
    for (path, _line, name), (cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if any(path.endswith(suffix) and name == fn for suffix, fn in wanted):
            total, calls = total + ct, calls + cc
    return total, calls


TRAIN = (("client/client_app.py", "train"),)  # the train handler: one call per client-round


def breakdown(stats: pstats.Stats) -> dict:
    """Milliseconds per client-round of every stage, "other" ClientApp time and the wire;
    the final evaluation's handler is reported per evaluated device, outside the rest."""
    app_s, _ = _cumulative(stats, (CLIENT_APP,))
    eval_s, eval_calls = _cumulative(stats, EVALUATE)
    app_s -= eval_s
    client_rounds = _cumulative(stats, TRAIN)[1]
    stages = {name: _cumulative(stats, fns) for name, fns in STAGES.items()}
    wrap = stages["Opacus wrap (make_private, engine)"][0]
    stages["DP-SGD steps"] = (stages["DP-SGD steps"][0] - _cumulative(
        stats, STAGES["Opacus wrap (make_private, engine)"][:1])[0],
        stages["DP-SGD steps"][1])
    named = sum(s for s, _ in stages.values())
    per = 1e3 / max(client_rounds, 1)
    rows = {name: {"ms": s * per, "share_of_client_app": s / app_s if app_s else 0.0,
                   "calls": c} for name, (s, c) in stages.items()}
    rows["other ClientApp code (mods, records, Flower)"] = {
        "ms": (app_s - named) * per, "share_of_client_app": (app_s - named) / app_s
        if app_s else 0.0, "calls": 0}
    wire_s, wire_calls = _cumulative(stats, WIRE)
    cross = {name: dict(zip(("ms", "calls"), _cumulative(stats, fns)))
             for name, fns in CROSS_CUTTING.items()}
    for row in cross.values():
        row["ms"] *= per
    return {"client_app_ms": app_s * per, "wire_ms": wire_s * per, "wire_calls": wire_calls,
            "stages": rows, "opacus_wrap_ms": wrap * per, "evaluated_devices": eval_calls,
            "evaluate_handler_ms_per_device": 1e3 * eval_s / max(eval_calls, 1),
            "client_rounds": client_rounds, "cross_cutting": cross}


def run(cfg, command: str = "", top: int = 40, reuse: bool = True,
        dataset_label: str | None = None, profile: bool = True) -> BenchResult:
    """Profile rounds 2..cfg.rounds of an in-process run of `cfg` (its dataset prepared in
    cfg.out_dir first, or reused when `reuse` and a prepared.json is there). Without
    `profile`: the rate only (client-rounds per second and CPU per client-round of the
    process, no cProfile overhead), see `rate`."""
    if not profile:
        return rate(cfg, command, reuse, dataset_label)
    from fedinterest.client.client_app import app as client_app
    from fedinterest.simulations.inprocess_grid import run_in_process

    cfg, info, prepare_s = _fresh_copy(cfg, reuse)
    run_dir = Path(cfg.out_dir)
    # CPU time, not wall: on a shared machine wall time measures the neighbours
    prof, seen, cpu0 = cProfile.Profile(time.process_time), {"rounds": 0, "accepted": 0}, {}

    def on_round(rec) -> None:
        seen["rounds"] += 1
        if seen["rounds"] == 1:
            cpu0["t"] = time.process_time()
            prof.enable()
        else:
            seen["accepted"] += rec.accepted

    run_in_process(cfg, Path(info["catalog_path"]), Path(info["devices_dir"]),
                   int(info["n_devices"]), client_app, on_round=on_round)
    prof.disable()
    prof.dump_stats(run_dir / "client-round.pstats")  # for a closer look (pstats, snakeviz)
    cpu_profiled = time.process_time() - cpu0.get("t", time.process_time())
    stats = pstats.Stats(prof)
    data = breakdown(stats)
    result = BenchResult(
        "client-round", f"CPU of one train client-round by stage (cProfile, in process, "
        f"rounds 2-{cfg.rounds}; {dataset_label or cfg.dataset}, model {cfg.model} hidden {cfg.hidden}, dp "
        f"{cfg.dp}, secagg {cfg.secagg}, update {cfg.update_format}, "
        f"{cfg.clients_per_round} per round)", command, "", "")
    result.summary = _summary(data)
    result.ratio = (f"{data['client_rounds']} client-rounds profiled ({seen['accepted']} "
                    "accepted); CPU of the profiled "
                    f"rounds {cpu_profiled:.1f} s incl. the server's share and cProfile's "
                    "overhead")
    result.data = {**data, "accepted": seen["accepted"], "rounds": cfg.rounds,
                   "profiled_cpu_seconds": cpu_profiled, "prepare_seconds": prepare_s,
                   "run_dir": str(run_dir), "top_cumulative": _top(stats, top)}
    return result.finish()


def from_profile(result_json: str | Path, profile: str | Path) -> BenchResult:
    """The result of an earlier `run` recomputed from its saved profile (after the stage
    list changed): same measurement, same command, same load record."""
    old = read_json(Path(result_json))
    result = BenchResult(old["name"], old["measured"], old["command"], "", old["ratio"])
    result.load_start, result.started = old["load_average_start"], old["started"]
    stats = pstats.Stats(str(profile))
    result.data = {**{k: old[k] for k in ("accepted", "rounds", "profiled_cpu_seconds",
                                          "prepare_seconds", "run_dir") if k in old},
                   **breakdown(stats), "top_cumulative": _top(stats, 40)}
    result.summary = _summary(result.data)
    result.load_end = old["load_average_end"]
    return result


def _summary(data: dict) -> str:
    stages = sorted(data["stages"].items(), key=lambda kv: -kv[1]["ms"])
    return (f"ClientApp {data['client_app_ms']:.0f} ms CPU per client-round + wire "
            f"{data['wire_ms']:.1f} ms: " + ", ".join(
                f"{k} {v['ms']:.1f} ms ({v['share_of_client_app']:.0%})"
                for k, v in stages if v["ms"] >= 0.5)
            + f"; evaluation {data['evaluate_handler_ms_per_device']:.0f} ms per device "
            f"({data['evaluated_devices']} devices)")


def _top(stats: pstats.Stats, n: int) -> list[dict]:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:n]
    return [{"function": f"{Path(path).name}:{line}:{name}", "cumulative_s": ct,
             "own_s": tt, "calls": cc} for (path, line, name), (cc, _nc, tt, ct, _c) in rows]


def _fresh_copy(cfg, reuse: bool) -> tuple[object, dict, float]:
    """A run of `cfg` on freshly provisioned devices: the dataset is prepared once in
    `<out_dir>/prepared` (again unless `reuse`) and its device stores are copied to
    `<out_dir>/run` for every measurement, since a device answers a (run, round) once: on
    reused stores every round would be a replay, declined at no cost."""
    import shutil

    from fedinterest.simulations.data import load_dataset
    from fedinterest.simulations.simulate import prepare

    base, t0 = Path(cfg.out_dir), time.perf_counter()
    template = cfg.replace(out_dir=str(base / "prepared"))
    info = (read_json(base / "prepared" / "prepared.json")
            if reuse and (base / "prepared" / "prepared.json").exists()
            else prepare(template, load_dataset(cfg.dataset), quiet=True))
    work = base / "run"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(info["devices_dir"], work / "devices")
    return (cfg.replace(out_dir=str(work)), {**info, "devices_dir": str(work / "devices")},
            time.perf_counter() - t0)


def rate(cfg, command: str = "", reuse: bool = True,
         dataset_label: str | None = None) -> BenchResult:
    """Client-rounds per second of rounds 2..cfg.rounds of an in-process run (round 1 warms
    imports and caches up): accepted train replies over the wall and the process CPU
    between the end of round 1 and the end of the last round, and per round. The rounds
    include the server's share and the evaluation of the last round (cfg.eval_clients)."""
    from fedinterest.client.client_app import app as client_app
    from fedinterest.simulations.inprocess_grid import run_in_process

    cfg, info, prepare_s = _fresh_copy(cfg, reuse)
    marks: list[tuple[float, float, int, int, bool]] = []

    def on_round(rec) -> None:
        marks.append((time.perf_counter(), time.process_time(), rec.accepted, rec.sampled,
                      bool(rec.metrics)))

    result = BenchResult(
        "client-round-rate", f"client-rounds per second, in process, rounds 2-{cfg.rounds} "
        f"({dataset_label or cfg.dataset}, model {cfg.model} hidden {cfg.hidden}, dp {cfg.dp},"
        f" secagg {cfg.secagg}, update {cfg.update_format}, {cfg.clients_per_round} per "
        f"round, evaluation of {cfg.eval_clients or 'every'} device(s) in the last round)",
        command, "", "")
    run_in_process(cfg, Path(info["catalog_path"]), Path(info["devices_dir"]),
                   int(info["n_devices"]), client_app, on_round=on_round)
    if len(marks) < 2:
        raise ValueError("bench client-round --no-profile needs --rounds >= 2")
    rounds = [{"round": i + 1, "accepted": a, "sampled": s, "evaluated": ev,
               "wall_s": w - marks[i - 1][0], "cpu_s": c - marks[i - 1][1]}
              for i, (w, c, a, s, ev) in enumerate(marks) if i > 0]
    result.data = {"rounds": rounds, **rate_of(rounds), "prepare_seconds": prepare_s,
                   "run_dir": str(cfg.out_dir)}
    d = result.data
    result.summary = (f"{d['client_rounds_per_second']:.2f} client-rounds/s wall, "
                      f"{1e3 / d['client_rounds_per_cpu_second']:.0f} ms CPU per client-round "
                      f"({d['accepted']} accepted in {d['rounds_timed']} train-only rounds: "
                      f"{d['wall_seconds']:.1f} s wall, {d['cpu_seconds']:.1f} s CPU, one "
                      "process)" + (f"; the last round with its evaluation: "
                                    f"{d['evaluated_round_cpu_seconds']:.1f} s CPU"
                                    if d.get("evaluated_round_cpu_seconds") else ""))
    result.ratio = f"{d['client_rounds_per_cpu_second']:.2f} client-rounds per CPU-second"
    return result.finish()


def rate_of(rounds: list[dict]) -> dict:
    """Client-rounds per second (wall and CPU) over the timed rounds without an evaluation
    (all of them when every one evaluated), and the CPU of the evaluated ones apart: the
    train rate must not change with how many devices the last round evaluates."""
    plain = [r for r in rounds if not r["evaluated"]] or rounds
    accepted = sum(r["accepted"] for r in plain)
    wall, cpu = sum(r["wall_s"] for r in plain), sum(r["cpu_s"] for r in plain)
    evaluated = [r for r in rounds if r["evaluated"] and r not in plain]
    return {"accepted": accepted, "rounds_timed": len(plain), "wall_seconds": wall,
            "cpu_seconds": cpu, "client_rounds_per_second": accepted / wall,
            "client_rounds_per_cpu_second": accepted / cpu,
            "evaluated_round_cpu_seconds": sum(r["cpu_s"] for r in evaluated)}


def _arm_main(argv: list[str]) -> None:
    """`python client_round.py OVERRIDES_JSON OUT_JSON`: one arm of `versus.run_versus`,
    `rate` of the RunConfig with these overrides, in whatever tree PYTHONPATH names."""
    import json

    from fedinterest.shared.atomic_io import write_json
    from fedinterest.shared.config import load_config

    overrides, out = json.loads(argv[0]), Path(argv[1])
    write_json(out, rate(load_config(None, overrides)).to_dict())


if __name__ == "__main__":
    import sys

    _arm_main(sys.argv[1:])

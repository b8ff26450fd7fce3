"""A speed-up against an earlier commit, measured side by side in one run.

The client-round rate (`client_round.rate`: client-rounds per CPU-second of the train-only
rounds of an in-process run) is measured on the code of commit REV and on this tree,
alternated B A B A, each arm a fresh process on a fresh copy of the same prepared devices.
Only the code under test differs: both arms run this tree's measurement (client_round.py as
a script) with PYTHONPATH naming the tree whose `fedinterest` they import. REV's tree is
extracted with `git archive` under the work folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fedinterest.shared.atomic_io import read_json
from fedinterest.simulations.bench import client_round
from fedinterest.simulations.bench.common import BenchResult, median

PACKAGES = ("client", "server", "shared", "simulations")


def extract(rev: str, dest: Path) -> str:
    """REV's tree in `dest/tree`, importable as `fedinterest.*` through `dest/shim`; returns
    the PYTHONPATH for it."""
    tree, shim = dest / "tree", dest / "shim" / "fedinterest"
    shutil.rmtree(dest, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shim.mkdir(parents=True)
    for name in PACKAGES:
        (shim / name).symlink_to((tree / name).resolve(), target_is_directory=True)
    return f"{(dest / 'shim').resolve()}{os.pathsep}{tree.resolve()}"


def _arm(pythonpath: str, overrides: dict, out: Path) -> dict:
    import json

    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, client_round.__file__, json.dumps(overrides), str(out)],
                   env=env, check=True)
    return read_json(out)


def run_versus(rev: str, overrides: dict, reps: int, work: str | Path,
               command: str = "", label: str = "", engine: str = "inprocess") -> BenchResult:
    """Median client-rounds per CPU-second of REV's code and this tree's, `reps` each,
    alternated; the ratio this / REV is the speed-up. `engine` "ray": `fedinterest simulate`
    through Flower's simulation engine, CPU of its whole process tree (`_ray_arm`)."""
    work = Path(work)
    commit = subprocess.run(["git", "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    paths = {commit: extract(rev, work / f"tree-{commit}"),
             "this tree": os.environ.get("PYTHONPATH", "")}
    result = BenchResult(
        f"client-round-speedup{'-ray' if engine == 'ray' else ''}", "client-rounds per "
        f"CPU-second of the train-only rounds, "
        f"{'on Ray (2 workers)' if engine == 'ray' else 'in process'} ({label}, {overrides.get('clients_per_round')} per round, rounds 2-"
        f"{int(overrides.get('rounds', 3)) - 1}, dp {overrides.get('dp', 'event')}): commit "
        f"{commit} vs this tree, {reps} fresh processes each, alternated", command, "", "")
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for rep in range(reps):
        for name, pythonpath in paths.items():
            tag = f"{engine}-{name.replace(' ', '-')}-{rep}"
            runs[name].append(_arm(pythonpath, overrides, work / f"arm-{tag}.json")
                              if engine == "inprocess" else
                              _ray_arm(pythonpath, overrides,
                                       Path(overrides["out_dir"]) / "prepared",
                                       work / f"ray-{tag}"))
    cpu = {n: median([1e3 / r["client_rounds_per_cpu_second"] for r in rs])
           for n, rs in runs.items()}
    wall = {n: median([r["client_rounds_per_second"] for r in rs]) for n, rs in runs.items()}
    result.summary = (f"CPU per client-round {commit} {cpu[commit]:.0f} ms, this tree "
                      f"{cpu['this tree']:.0f} ms (median of {reps}; per run "
                      + "; ".join(f"{n}: " + ", ".join(
                          f"{1e3 / r['client_rounds_per_cpu_second']:.0f}" for r in rs)
                          for n, rs in runs.items())
                      + f" ms); wall {wall[commit]:.2f} vs {wall['this tree']:.2f} "
                      "client-rounds/s")
    result.ratio = (f"speed-up per CPU-second {cpu[commit] / cpu['this tree']:.2f}x "
                    f"(wall {wall['this tree'] / wall[commit]:.2f}x, load-dependent)")
    result.data = {"commit": commit, "runs": runs, "cpu_ms_per_client_round": cpu,
                   "client_rounds_per_second": wall, "overrides": overrides}
    return result.finish()


def _ray_arm(pythonpath: str, overrides: dict, prepared: Path, run: Path) -> dict:
    """`fedinterest simulate` on Ray (the tree at `pythonpath`) on a copy of the prepared
    devices; CPU of its process tree (driver, Ray daemons, workers) read from /proc when each
    round's checkpoint appears. Rate over the rounds between the first and the last (the
    first holds Ray's start, the last the evaluation)."""
    import json
    import time

    from fedinterest.shared.atomic_io import write_json
    from fedinterest.simulations.bench.memory import stop_tree, tree_cpu_seconds

    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(prepared, run)
    info = read_json(run / "prepared.json")
    info["catalog_path"] = str(run / "catalog" / Path(info["catalog_path"]).name)
    info["devices_dir"] = str(run / "devices")
    write_json(run / "prepared.json", info)
    rounds = int(overrides["rounds"])
    args = ["simulate", "--data", str(overrides["dataset"]), "--rounds", str(rounds),
            "--clients-per-round", str(overrides["clients_per_round"]), "--resume",
            "--out-dir", str(run), "--no-popularity", "--device-epsilon", "1e6",
            "--set", "eval_every=0", "--set", f"eval_clients={overrides['eval_clients']}"]
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
           "RAY_worker_niceness": "0"}  # as `bench simulation`: Ray's 15 measures the load
    code = "from fedinterest.simulations.cli import main; raise SystemExit(main())"
    marks: list[tuple[int, float, float]] = []
    with open(run / "simulate.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                done = run / "checkpoints" / f"round-{len(marks) + 1:04d}.json"
                if len(marks) < rounds and done.exists():
                    marks.append((len(marks) + 1, time.perf_counter(),
                                  tree_cpu_seconds(proc.pid)))
                    continue
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                stop_tree(proc.pid)
    if proc.returncode != 0 or len(marks) < 3:
        raise RuntimeError(f"simulate failed or stopped early: see {run / 'simulate.log'}")
    history = json.loads((run / "checkpoints" / f"round-{rounds:04d}.json").read_text())
    accepted = {h["round"]: h["accepted"] for h in history["history"]}
    timed = [(r, w - marks[i - 1][1], c - marks[i - 1][2])
             for i, (r, w, c) in enumerate(marks) if 0 < i < len(marks) - 1]
    n = sum(accepted[r] for r, _, _ in timed)
    wall, cpu = sum(w for _, w, _ in timed), sum(c for _, _, c in timed)
    return {"rounds_timed": [r for r, _, _ in timed], "accepted": n, "wall_seconds": wall,
            "cpu_seconds": cpu, "client_rounds_per_second": n / wall,
            "client_rounds_per_cpu_second": n / cpu}

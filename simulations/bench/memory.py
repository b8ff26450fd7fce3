"""Peak memory of a whole simulation: `fedinterest simulate` as a child process, its process
tree (the driver, Ray's daemons it starts and the Ray workers under them) sampled from /proc.

Why /proc and not psutil: psutil is not a dependency of the project, and the two numbers we
need are one line each in /proc: VmRSS in /proc/PID/status and Pss in
/proc/PID/smaps_rollup. The sum of RSS over the tree counts pages shared between processes
(torch's libraries, Ray's object store in /dev/shm) once per process, so it overstates; the
sum of PSS splits shared pages among their users and is the better estimate of what the run
costs the machine. Both are reported; the target is checked on the RSS sum (the stricter one).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from fedinterest.simulations.bench.common import BenchResult, verdict

TARGET_GIB = 4.0
GIB = 1024 ** 3


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # the command name may contain spaces and ')': fields resume after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int) -> list[int]:
    """root and all its descendants (orphans re-parented to init are no longer counted)."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of root and its live descendants (from /proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def _kib(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tree_memory(root: int) -> dict:
    """{'rss': bytes, 'pss': bytes, 'processes': n, 'root_rss': bytes, 'by_process':
    [(name, rss bytes)]} of root's tree now."""
    rss = pss = 0
    pids = process_tree(root)
    by_process = []
    for pid in pids:
        r = (_kib(f"/proc/{pid}/status", "VmRSS:") or 0) * 1024
        rss += r
        pss += (_kib(f"/proc/{pid}/smaps_rollup", "Pss:") or 0) * 1024
        by_process.append((_comm(pid), r))
    root_rss = (_kib(f"/proc/{root}/status", "VmRSS:") or 0) * 1024
    return {"rss": rss, "pss": pss, "processes": len(pids), "root_rss": root_rss,
            "by_process": by_process}


class TreeSampler:
    """Samples a process tree's memory every `interval` seconds in a thread; keeps the peaks
    and a thinned time series."""

    def __init__(self, root: int, interval: float = 1.0):
        self.root, self.interval = root, interval
        self.peak = {"rss": 0, "pss": 0, "root_rss": 0, "processes": 0}
        self.series: list[tuple[float, int, int, int]] = []  # (t, rss, pss, processes)
        self.at_peak: list[tuple[str, int]] = []  # (process name, rss) when RSS peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            m = tree_memory(self.root)
            if m["rss"] > self.peak["rss"]:
                self.at_peak = sorted(m["by_process"], key=lambda x: -x[1])
            for k in self.peak:
                self.peak[k] = max(self.peak[k], m[k])
            self.series.append((round(time.monotonic() - self._t0, 1), m["rss"], m["pss"],
                                m["processes"]))
            self._stop.wait(self.interval)


# Flower logs this when Ray could not start (e.g. its 30 s start-up limit on a loaded
# machine); the ServerApp then waits for devices that will never answer, so stop the run
CRASH_MARKER = "Simulation Runtime crashed"


def _wait(proc: subprocess.Popen, log_path: Path, timeout: float | None
          ) -> tuple[int | None, str | None]:
    """(exit code, None) when the child ends; (None, why) after stopping its process tree
    because Flower's runtime crashed or `timeout` seconds passed."""
    start = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=5), None
        except subprocess.TimeoutExpired:
            pass
        why = None
        if CRASH_MARKER in log_path.read_text(errors="replace"):
            why = f"was stopped: Flower logged '{CRASH_MARKER}'"
        elif timeout is not None and time.monotonic() - start > timeout:
            why = f"was stopped after the {timeout:g} s timeout"
        if why:
            stop_tree(proc.pid)
            proc.wait()
            return None, why


def stop_tree(root: int, grace: float = 10.0) -> None:
    """SIGTERM to root and its descendants, SIGKILL to any still alive after `grace` s."""
    import signal

    pids = process_tree(root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"  # a zombie is dead, awaiting its parent


def run(dataset: str | None = None, out_dir: str | Path = "runs/bench/memory-run",
        rounds: int = 2, nice: int = 10, interval: float = 1.0, extra: list[str] | None = None,
        timeout: float | None = None, command: str = "", engine: str = "ray") -> BenchResult:
    """`fedinterest simulate` on `dataset` as a child process (`engine`: ray, the default
    run loop, or inprocess: one process) with its process tree's memory sampled."""
    from fedinterest.shared.errors import ConfigError
    from fedinterest.simulations.data import default_movielens_path

    if dataset is None:
        path = default_movielens_path()
        if path is None:
            raise ConfigError("ml-latest-small was not found beside the repository; pass "
                              "--data PATH")
        dataset = str(path)
    argv = [sys.executable, "-m", "fedinterest.simulations.cli", "simulate", "--data",
            dataset, "--out", str(out_dir), "--rounds", str(rounds), "--engine", engine,
            "--quiet", *(extra or [])]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    result = BenchResult(
        "memory", f"peak memory of the process tree of `fedinterest simulate` on {dataset} "
        f"({rounds} rounds, engine {engine}; driver + Ray daemons + workers, sampled "
        f"every {interval:g} s from /proc)", command, "", "")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(out_dir) / "bench-memory.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid, interval) as sampler:
            code, why = _wait(proc, log_path, timeout)
    seconds = time.perf_counter() - start
    if code != 0 or why:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"the simulation {why or f'exited with {code}'}; last lines of "
                           f"{log_path}:\n" + "\n".join(tail))
    peak = sampler.peak
    rss_gib, pss_gib = peak["rss"] / GIB, peak["pss"] / GIB
    result.summary = (f"peak {rss_gib:.2f} GiB RSS summed over the tree ({pss_gib:.2f} GiB "
                      f"PSS), driver alone {peak['root_rss'] / GIB:.2f} GiB, up to "
                      f"{peak['processes']} processes; run took {seconds / 60:.1f} min")
    result.ratio = f"{verdict(rss_gib, TARGET_GIB, False)} GiB"
    step = max(1, len(sampler.series) // 400)
    result.data = {"dataset": dataset, "rounds": rounds, "engine": engine, "argv": argv,
                   "nice": nice,
                   "interval_seconds": interval, "seconds": seconds,
                   "peak_rss_bytes": peak["rss"], "peak_pss_bytes": peak["pss"],
                   "peak_driver_rss_bytes": peak["root_rss"],
                   "peak_processes": peak["processes"], "run_dir": str(out_dir),
                   "processes_at_peak_rss": sampler.at_peak,
                   "sampled_with": "/proc/PID/status VmRSS and /proc/PID/smaps_rollup Pss, "
                                   "summed over the child's process tree",
                   "series_t_rss_pss_processes": sampler.series[::step],
                   "target_gib": TARGET_GIB}
    return result.finish()

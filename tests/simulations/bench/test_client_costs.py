"""The one-pass text scan gives the egress guard's verdict; the profiler's stages add up."""

from __future__ import annotations

import random

from fedinterest.simulations.bench.client_costs import find_any_window, time_compression


def _naive(blobs, windows) -> bool:
    return any(w in b for w in windows for b in blobs)


def test_one_pass_scan_agrees_with_the_guards_scan():
    rng = random.Random(0)
    alphabet = b"abcdefgh "  # small, so near-misses and key collisions are common
    for trial in range(300):
        texts = [bytes(rng.choice(alphabet) for _ in range(rng.randint(8, 40)))
                 for _ in range(rng.randint(1, 5))]
        windows = set()
        for t in texts:
            windows.update([t] if len(t) <= 12 else
                           (t[i:i + 12] for i in range(len(t) - 11)))
        blobs = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
                 for _ in range(rng.randint(1, 3))]
        if trial % 3 == 0 and blobs[0]:  # plant a window somewhere
            w, at = rng.choice(sorted(windows)), rng.randrange(len(blobs[0]))
            blobs[0] = blobs[0][:at] + w + blobs[0][at:]
        assert find_any_window(blobs, windows) == _naive(blobs, windows), trial


def test_one_pass_scan_finds_a_window_at_the_very_end_and_start():
    w = b"Toy Story (1"
    assert find_any_window([b"\x00" * 1000 + w], {w})
    assert find_any_window([w + b"\x00" * 1000], {w})
    assert not find_any_window([b"\x00" * 1000 + w[:-1]], {w})
    assert not find_any_window([b""], {w})


def test_compression_timing_reports_each_level():
    out = time_compression(bytes(10_000), levels=(6, 0), reps=1)
    assert out[0]["bytes"] > out[6]["bytes"] and out[0]["ratio_to_raw"] > 1.0


def test_client_round_stages_add_up_to_the_client_app():
    from types import SimpleNamespace

    from fedinterest.simulations.bench.client_round import breakdown

    site = "/venv/site-packages/"
    fake = {  # (path, line, name): (primitive calls, calls, own s, cumulative s, callers)
        (site + "flwr/clientapp/client_app.py", 1, "__call__"): (5, 5, 0.0, 10.0, {}),
        ("/repo/client/client_app.py", 2, "train"): (4, 4, 0.0, 7.0, {}),
        ("/repo/client/client_app.py", 3, "evaluate"): (1, 1, 0.0, 2.0, {}),
        ("/repo/client/dp_training.py", 4, "_dp_sgd"): (4, 4, 0.0, 4.0, {}),
        (site + "opacus/privacy_engine.py", 5, "make_private"): (4, 4, 0.0, 1.0, {}),
        ("/repo/client/egress.py", 6, "check_reply"): (5, 5, 0.0, 2.0, {}),
        (site + "flwr/common/serde.py", 7, "message_to_proto"): (10, 10, 0.0, 0.4, {}),
    }
    d = breakdown(SimpleNamespace(stats=fake))
    assert d["client_rounds"] == 4 and d["evaluated_devices"] == 1
    assert d["client_app_ms"] == 2000.0  # (10 - 2 evaluation) s over 4 client-rounds
    assert d["stages"]["DP-SGD steps"]["ms"] == 750.0  # 4 s minus make_private's 1 s
    assert d["stages"]["Opacus wrap (make_private, engine)"]["ms"] == 250.0
    assert sum(v["ms"] for v in d["stages"].values()) == d["client_app_ms"]
    assert d["wire_ms"] == 100.0 and d["evaluate_handler_ms_per_device"] == 2000.0


def test_engine_tick_measures_both_states_up_to_the_limit():
    from fedinterest.simulations.bench.engine_tick import run

    d = run(sizes=(10, 30), unindexed_up_to=10, ticks=1).to_dict()
    assert sorted(d["per_state"]["indexed"]) == [10, 30]
    assert sorted(d["per_state"]["unindexed"]) == [10]  # Flower's own only up to the limit
    for per in d["per_state"].values():
        assert all(r["engine_poll_s"] >= 0 and r["grid_pull_s"] >= 0 for r in per.values())
    assert d["ratio"].startswith("engine poll unindexed/indexed N=10:")

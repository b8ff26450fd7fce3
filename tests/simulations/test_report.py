"""The run report: self-contained, escaped, faithful to results.json, and able to read sample
users' interest timelines from their encrypted stores."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import numpy as np
import pytest
from fedinterest.client.device import LEDGER_BLOB, Device
from fedinterest.shared.errors import DataError, FedinterestError
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.simulations.cli import main as cli_main
from fedinterest.simulations.report import load_results, sample_users, write_report
from markupsafe import escape  # what Jinja2 autoescape produces

EVIL = "<script>alert('x')</script>"
PROTOCOL = ("leave-last-out on each device, full catalog ranking, seen items excluded, "
            "metrics summed over devices (federated evaluation)")


def _round(i: int, evaluated: bool = True) -> dict:
    metrics = {}
    if evaluated:
        metrics = {"val-hr@10": 0.1 + i / 100, "val-ndcg@10": 0.05 + i / 100,
                   "val-mrr@10": 0.04 + i / 100, "test-hr@10": 0.12 + i / 100,
                   "test-ndcg@10": 0.0612 + i / 100, "test-mrr@10": 0.05,
                   "val-users": 40.0, "test-users": 40.0}
    return {"round": i, "sampled": 10, "accepted": 9, "failed": 1, "train_loss": 5.4321 - i,
            "metrics": metrics, "user_epsilon": 0.5 * i, "device_epsilon_max": 1.25 * i,
            "bytes_down_per_client": 480_000, "bytes_up_per_client": 480_000.0 * 0.9,
            "seconds": 3.5}


def fake_results(**over) -> dict:
    """A results.json with the keys and shapes simulations/simulate.py `run()` writes."""
    rounds = [_round(1), _round(2, evaluated=False), _round(3)]
    res = {
        "config": {"dataset": EVIL, "out_dir": "runs/x", "seed": 7, "rounds": 3,
                   "clients_per_round": 10, "strategy": "fedavg", "secagg": False,
                   "model": "gru-text", "local_epochs": 1, "lr": 0.01, "dp": "both",
                   "noise_multiplier": 0.8, "max_grad_norm": 1.0, "device_epsilon": 8.0,
                   "delta": 1e-5, "user_noise_multiplier": 0.5, "user_clip": 1.0,
                   "user_epsilon": 6.0},
        "dataset": {"spec": EVIL, "dataset": EVIL, "users": 40, "items": 120,
                    "items_with_events": 100, "events": 900, "texts": 0,
                    "events_with_text": 0, "ratings": 900, "time_start": 946684800,
                    "time_end": 978220800, "tie_share": 0.1},
        "protocol": PROTOCOL,
        "rounds": rounds,
        "final": rounds[-1]["metrics"],
        "privacy": {
            "event_level": {"enabled": True, "unit": "one disjoint history segment",
                            "noise_multiplier": 0.8, "clip": 1.0, "delta": 1e-5,
                            "budget": 8.0,
                            "per_device_epsilon": dict(zip(map(str, range(101, 121)),
                                                           np.linspace(1, 3.75, 20).tolist(),
                                                           strict=True))},
            "user_level": {"unit": "all of one device's data in a round (one client update)",
                           "relation": "replace one device", "sampling": "10 of 40 devices",
                           "accountant": "dp-accounting RDP, SampledWithoutReplacement",
                           "noise_multiplier": 0.5, "clip": 1.0, "delta": 1e-5,
                           "epsilon": 1.5},
            "popularity_release": {"mechanism": "Gaussian, one release",
                                   "unit": "one user (all their items)",
                                   "l2_sensitivity": 5.66, "noise_std": 11.31,
                                   "noise_multiplier": 2.0, "delta": 1e-5, "epsilon": 2.91},
        },
        "rejections": [{"round": 2, "node_id": 4242, "reason": "update norm 99 > 50 <b>"}],
        "timings": {"prepare_seconds": 12.5, "federated_seconds": 60.0, "total_seconds": 72.5},
        "peak_rss_mb": 1234.0,
        "versions": {"python": "3.11.2", "torch": "2.13.0", "flwr": "1.42.0"},
        "seed": 7,
    }
    res.update(over)
    return res


def _write(run_dir: Path, results: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def _check_self_contained(text: str) -> None:
    assert 'src="http' not in text and "href=\"http" not in text
    assert "<script" not in text.lower()  # no JavaScript at all, not even from data
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert srcs, "expected plots"
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert len(re.findall(r"<img", text)) == len(srcs)


def test_report_is_self_contained_escaped_and_faithful(tmp_path):
    res = fake_results()
    path = write_report(_write(tmp_path / "run", res))
    assert path == tmp_path / "run" / "report.html"
    text = path.read_text(encoding="utf-8")
    _check_self_contained(text)
    # quality, participation, privacy, ε histogram and bytes plots (no device stores here)
    assert text.count("<img") == 5
    assert EVIL not in text and escape(EVIL) in text
    assert escape(PROTOCOL) in text
    # table values: round 3 numbers, the dash of the unevaluated round 2, accepted/sampled
    for v in ("9 / 10", "2.4321", "0.1300", "0.0800", "0.1500", "0.0912", "3.75", "1.50"):
        assert v in text, v
    assert "<td>–</td>" in text
    # participation: round 1's failed reply was a decline, round 2's the rejection
    rows = re.findall(r"<tr><td>(\d)</td><td>9 / 10</td><td>(\d)</td><td>(\d)</td>", text)
    assert rows == [("1", "1", "0"), ("2", "0", "1"), ("3", "1", "0")]
    # the popularity reference could not load this dataset: said so, escaped
    assert "Popularity reference not computed" in text and "Compared with references" in text
    # privacy prose: unit, noise, clip, budgets, and the per-device distribution
    eps = np.linspace(1, 3.75, 20)
    assert "one disjoint history segment" in text
    assert (f"max {eps.max():.2f}, p95 {np.percentile(eps, 95):.2f}, "
            f"median {np.median(eps):.2f}") in text
    assert "ε ≤ 8.00" in text and "(budget 6.00)" in text
    assert "ε = 2.91" in text and "multiplier 0.800" in text
    # rejected replies, escaped
    assert "4242" in text and escape("update norm 99 > 50 <b>") in text
    assert "1 reply was rejected" in text
    # header: seed, versions, wall time, memory
    assert "1234 MB" in text and "flwr 1.42.0" in text and "72.5 s" in text and "seed" in text
    assert "timelines" in text and "prepared.json" in text


def test_report_without_dp_or_rounds_still_renders(tmp_path):
    res = fake_results(rounds=[], final={}, rejections=[],
                       privacy={"event_level": {"enabled": False}, "user_level": None,
                                "popularity_release": None})
    text = write_report(_write(tmp_path, res), n_sample_users=0).read_text()
    assert "No round finished" in text and "Event-level differential privacy was off" in text
    assert "No popularity counts were released" in text and "every reply passed" in text
    assert "<img" not in text
    res["privacy"]["user_level"] = fake_results()["privacy"]["user_level"]
    text = write_report(_write(tmp_path, res), n_sample_users=0).read_text()
    assert "stopping before round" in text and "(6.00)" in text


def test_missing_and_malformed_results_name_the_file(tmp_path):
    with pytest.raises(FedinterestError, match=re.escape(str(tmp_path / "results.json"))):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text('{"config": {},\n "rounds": [,]}')
    with pytest.raises(DataError, match=r"results.json, line 2"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "rounds": []}))
    with pytest.raises(DataError, match="field 'dataset'"):
        load_results(tmp_path / "results.json")
    with pytest.raises(FedinterestError, match="n_sample_users"):
        write_report(tmp_path, n_sample_users=-1)


def test_sample_users_are_evenly_spaced_and_deterministic():
    assert sample_users(list(range(100)), 3) == [0, 50, 99]
    assert sample_users([3, 8], 3) == [3, 8]
    assert sample_users([], 3) == [] and sample_users([1, 2], 0) == []


def _provision(run_dir: Path, n_users: int = 2) -> None:
    """A tiny run directory like simulate.prepare() leaves: catalog + encrypted stores."""
    rng = np.random.default_rng(0)
    # an HTML-hostile topic and one that is broken TeX if matplotlib took '$' as mathtext
    n_items, topics = 12, ["Comedy", "cheap $x^{$ deals", "Sci-Fi", EVIL]
    vecs = rng.normal(size=(n_items, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    catalog = PublishedCatalog([f"i{j}" for j in range(n_items)], vecs,
                               [(topics[j % 4], topics[(j + 1) % 4]) for j in range(n_items)],
                               np.zeros(n_items, np.float32), "test-encoder",
                               [f"item {j}" for j in range(n_items)])
    catalog_path = catalog.save(run_dir / "catalog")
    devices = run_dir / "devices"
    devices.mkdir(parents=True)
    for u in range(n_users):
        key = devices / f"device-{u}.key"
        key.write_bytes(secrets.token_bytes(32))
        with Device.open(devices / f"device-{u}.db", key_file=key, catalog=catalog) as dev:
            dev.import_history([{"item": f"i{(u * 5 + t) % n_items}",
                                 "timestamp": 1_000_000_000 + 3600 * t, "rating": 4.0,
                                 "text": None} for t in range(15)])
            if u == 1:
                led = EventLedger(delta=1e-5)
                led.record(1, 1.0, 0.1, 20)
                dev.store.put_blob(LEDGER_BLOB, led.to_json().encode())
    (run_dir / "prepared.json").write_text(json.dumps({
        "catalog_path": str(catalog_path), "devices_dir": str(devices), "n_devices": n_users}))


def test_timelines_read_through_the_device_sdk(tmp_path):
    run_dir = _write(tmp_path / "run", fake_results())
    _provision(run_dir)
    text = write_report(run_dir, n_sample_users=3).read_text()
    _check_self_contained(text)
    assert text.count("<img") == 5 + 2  # five run plots + one timeline per device
    assert "<h3>user 0</h3>" in text and "<h3>user 1</h3>" in text
    assert "researcher's machine" in text and "encrypted store" in text
    assert "15 events from 2001-09-09" in text
    # the device's own ledger: device 1 trained once, device 0 never did
    assert "event-level ε spent on this device: 0.00 (it has not trained)" in text
    assert text.count("event-level ε spent on this device") == 2
    assert EVIL not in text


def test_timelines_survive_a_moved_run_dir_and_report_unreadable_devices(tmp_path):
    run_dir = _write(tmp_path / "run", fake_results())
    _provision(run_dir)
    moved = tmp_path / "moved"
    run_dir.rename(moved)  # prepared.json still points at the old paths
    (moved / "devices" / "device-1.key").write_bytes(secrets.token_bytes(32))  # wrong key
    text = write_report(moved, n_sample_users=2).read_text()
    assert text.count("<img") == 5 + 1
    assert "Could not read this device" in text


def test_cli_report_command(tmp_path, capsys):
    run_dir = _write(tmp_path, fake_results())
    assert cli_main(["report", str(run_dir), "--users", "0"]) == 0
    assert str(run_dir / "report.html") in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "results.json not found" in capsys.readouterr().err


def test_reference_lines_popularity_computed_and_central_read(tmp_path):
    from fedinterest.simulations.data import load_dataset
    from fedinterest.simulations.reference import popularity

    spec = "synthetic:n_users=30,n_items=50,events_per_user=12"
    res = fake_results(dataset={"spec": spec, "dataset": "synthetic", "users": 30})
    central = tmp_path / "central"
    central.mkdir()
    (central / "metrics.json").write_text(json.dumps({
        "model": "gru-text", "dataset": "synthetic", "split": "leave-last-out", "seed": 0,
        "test": {"hr@10": 0.4321, "ndcg@10": 0.2345}, "validation": {"hr@10": 0.4, "ndcg@10": 0.2}}))
    nodp = _write(tmp_path / "nodp", fake_results(config={"model": "gru-text", "dp": "off"},
                                                  final={"test-hr@10": 0.3141,
                                                         "test-ndcg@10": 0.2718}))
    text = write_report(_write(tmp_path / "run", res), n_sample_users=0,
                        references=[central, nodp]).read_text()
    assert "gru-text (federated, non-private)" in text and "0.2718" in text
    pop = popularity(load_dataset(spec))
    assert "popularity (central, non-private)" in text and "gru-text (central, non-private)" in text
    assert f"{pop['test-ndcg@10']:.4f}" in text and "0.2345" in text and "0.4321" in text
    assert 0 < pop["test-hr@10"] <= 1 and "No central model given" not in text
    # a spec that no longer loads the run's data (e.g. a changed file): no reference, a note
    res["dataset"]["users"] = 31
    text = write_report(_write(tmp_path / "run", res), n_sample_users=0).read_text()
    assert "loads 30 users" in text and "popularity (central" not in text
    with pytest.raises(FedinterestError, match="train-central"):
        write_report(tmp_path / "run", references=[tmp_path / "nowhere"])


def test_popularity_reference_ranks_like_the_protocol():
    """Hand-checked at k=1: counts over training events only, the user's earlier items
    excluded from the ranking, validation = second-to-last event, test = last."""
    from fedinterest.shared.schema import Catalog, Dataset
    from fedinterest.simulations.reference import popularity

    cat = Catalog.build({f"i{j}": (f"item {j}", ()) for j in range(4)})
    # training counts: item0 = 3, item1 = 2, item2 = 1, item3 = 0
    seq = {0: [0, 1, 0, 2], 1: [0, 1, 3, 1], 2: [0, 2, 1, 3]}
    users = [u for u, s in seq.items() for _ in s]
    items = [i for s in seq.values() for i in s]
    ds = Dataset.from_events("tiny", cat, ["u0", "u1", "u2"], users, items,
                             list(range(len(items))))
    pop = popularity(ds, k=1)
    # validation: user 1's target (item3, count 0) loses to the unseen item2; the others win
    assert pop["val-hr@1"] == pytest.approx(2 / 3)
    # test: every target wins once the earlier items (the popular ones) are excluded
    assert pop["test-hr@1"] == 1.0


def test_topic_colours_are_the_same_for_every_user():
    from fedinterest.simulations.report_plots import topic_colours

    a, b = topic_colours(["sci-fi", "comedy", "drama"]), topic_colours(["drama", "comedy", "sci-fi"])
    assert a == b and len(set(a.values())) == 3

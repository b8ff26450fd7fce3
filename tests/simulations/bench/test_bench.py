"""Smoke tests of the benchmark harness at tiny sizes. They check what the harness records and
writes (arms alternated, JSON fields, the doc row, the process-tree sampler), never timings."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fedinterest.simulations.bench import common as bench
from fedinterest.simulations.bench import federation as bench_federation
from fedinterest.simulations.bench import memory as bench_memory
from fedinterest.simulations.bench import scaling as bench_scaling
from fedinterest.simulations.cli import bench as bench_cmd
from fedinterest.simulations.cli import main as cli_main
from fedinterest.simulations.inprocess_grid import server_task_identity


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_alternate_runs_arms_in_turn_and_drops_warmup():
    order, cpu = [], {}
    times = bench.alternate([("a", lambda: order.append("a") or 1.5),
                             ("b", lambda: order.append("b"))], reps=2, warmup=1, cpu=cpu)
    assert order == ["a", "b"] * 3
    assert times["a"] == [1.5, 1.5] and len(times["b"]) == 2 and min(times["b"]) >= 0
    assert len(cpu["a"]) == len(cpu["b"]) == 2 and min(cpu["a"]) >= 0
    with pytest.raises(ValueError):
        bench.alternate([("a", lambda: None)], reps=0)


def test_verdict_says_met_or_by_how_much():
    assert bench.verdict(1.5, 1.3, True) == "1.5 (>= 1.3: met)"
    assert bench.verdict(1.0, 2.0, True) == "1 (>= 2: missed by 50%)"
    assert bench.verdict(2.5, 2.0, False) == "2.5 (<= 2: missed by 25%)"


def _result(name: str, summary: str) -> bench.BenchResult:
    return bench.BenchResult(name, "what", f"fedinterest bench {name}", summary, "1 (ok)",
                             {"x": np.float32(2.0), "arr": np.arange(2)}).finish()


def test_doc_rows_are_replaced_in_place_and_prose_is_kept(tmp_path):
    doc = tmp_path / "BENCH.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    bench.update_doc(doc, _result("encoder", "first | run"))
    bench.update_doc(doc, _result("upload", "u"))
    text = doc.read_text()
    doc.write_text(text + "\n## Analysis\nhand-written\n")
    bench.update_doc(doc, _result("encoder", "second"))
    text = doc.read_text()
    rows = [r for r in text.splitlines() if r.startswith("| encoder |")]
    assert len(rows) == 1 and "second" in rows[0]
    assert text.index("| encoder |") < text.index("| upload |")  # order kept
    assert "intro" in text and "hand-written" in text and "first" not in text
    assert text.count(bench.DOC_START) == 1


def test_json_has_load_averages_and_numpy_values(tmp_path):
    path = bench.write_result(_result("upload", "s"), tmp_path / "r" / "u.json")
    data = json.loads(path.read_text())
    assert data["x"] == 2.0 and data["arr"] == [0, 1]
    assert len(data["load_average_start"]) == 3 and len(data["load_average_end"]) == 3
    assert data["command"] == "fedinterest bench upload" and data["machine"]["torch_threads"]


def test_encoder_bench_arms_agree(tiny_bert_dir):
    from fedinterest.simulations.bench import encoder as bench_encoder

    r = bench_encoder.run("synthetic:n_users=3,n_items=40,events_per_user=3",
                          str(tiny_bert_dir), batch_size=8, reps=1, limit=30)
    d = r.to_dict()
    assert d["texts"] == 30 and set(d["seconds"]) == {"plain", "ours", "cached"}
    assert d["max_abs_diff_plain_vs_ours"] < 1e-4 and d["max_abs_diff_cached_vs_ours"] < 1e-6
    assert d["padding_share"]["ours"] <= d["padding_share"]["plain"]
    assert d["cached_fresh_process_seconds"] > 0 and "ours/plain" in d["ratio"]


def test_dp_step_bench_times_every_arm():
    from fedinterest.simulations.bench import training as bench_training

    r = bench_training.run(steps=2, warmup=0, batch_size=2, n_items=40,
                           kinds=("gru", "transformer"), round_reps=1, round_segments=2,
                           overrides={"hidden": 8, "segment_len": 5, "n_negatives": 4})
    d = r.to_dict()
    for arm in ("gru/plain", "gru/dp-hooks", "gru/dp-ghost", "gru/loopgru-plain",
                "gru/dp-hooks-dpgru", "transformer/plain", "transformer/dp-hooks",
                "transformer/dp-ghost"):
        assert len(d["seconds"][arm]) == 2, arm
    assert set(d["ratios_over_plain"]) == {k for k in d["median_seconds"]
                                           if not k.endswith("/plain")}
    assert d["train_local_round"]["steps"] == {"dp-hooks": 1, "plain": 1}


def test_recommend_bench_reports_percentiles():
    from fedinterest.simulations.bench.device import run_recommend

    d = run_recommend(n_items=60, history=12, calls=4, k=5).to_dict()
    assert d["returned"] == 5 and len(d["latencies_ms"]) == 3
    assert d["p50_ms"] <= d["p95_ms"] <= d["max_ms"] and d["store_read_median_ms"] > 0


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder

    root = tmp_path_factory.mktemp("bench-world") / "prepared"
    cfg = bench_federation.bench_config(root, 3, 2, hidden=8, segment_len=5, n_negatives=4,
                                        batch_size=2)
    bench_federation.prepare_world(root, cfg, 3, 12, 40,
                                   encoder=TextEncoder(str(tiny_bert_dir), cache=None))
    return root, cfg


def test_plain_arm_runs_the_server_loop_on_a_copy(small_world, tmp_path):
    root, cfg = small_world
    info = bench_federation.fresh_copy(root, tmp_path / "copy")
    assert info["devices_dir"].startswith(str(tmp_path))
    arm = bench_federation.plain_arm(tmp_path / "copy", cfg)
    rate, seconds, n = bench_federation._rate(arm["rounds"])
    assert seconds > 0
    assert [r["accepted"] for r in arm["rounds"]] == [3, 3] and n == 6 and rate > 0
    assert not (root / "checkpoints").exists()  # the prepared original is untouched

    # the upload benchmark reads a run's results.json + the wire schema
    (tmp_path / "copy" / "results.json").write_text(json.dumps(
        {"config": cfg.replace(out_dir=str(tmp_path / "copy")).to_dict(),
         "dataset": {"spec": "synthetic"}, "rounds": arm["rounds"]}))
    out, doc = tmp_path / "upload.json", tmp_path / "B.md"
    assert cli_main(["bench", "upload", "--run", str(tmp_path / "copy"), "--out", str(out),
                     "--doc", str(doc)]) == 0
    data = json.loads(out.read_text())
    assert data["fp32_bytes"] == 4 * data["parameters"]
    f = data["framing"]
    # the default update_format packs each reply losslessly (shared.wire.encode_update): fewer
    # bytes than the fp32 values, about what the same packing gives on the last global weights
    assert cfg.update_format == "fp32"
    assert data["median_bytes_up"] < data["fp32_bytes"]
    assert abs(data["median_bytes_up"] / f["packed_fp32_count_bytes"] - 1) < 0.1
    # per-tensor arrays: every array in full, plus a little per array (name, dtype and shape)
    assert f["values"] + f["npy_headers"] + f["names"] == f["today_count_bytes"]
    assert 0 <= f["today_count_bytes"] - data["fp32_bytes"] < 200 * data["arrays"]
    assert f["npy_headers"] == 128 * data["arrays"]
    assert f["packed_fp16_count_bytes"] < f["packed_fp32_count_bytes"]
    assert "| upload |" in doc.read_text()
    assert data["command"] == f"fedinterest bench upload --run {tmp_path / 'copy'}"


def test_throughput_harness_alternates_and_counts_rounds_after_the_first(tmp_path,
                                                                          tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder

    d = bench_federation.run_throughput(
        n_devices=3, rounds=2, reps=1, events_per_user=10, n_items=30, work_dir=tmp_path,
        encoder=TextEncoder(str(tiny_bert_dir), cache=None), flower_engine="inprocess",
        hidden=8, segment_len=4, n_negatives=4).to_dict()
    assert set(d["client_rounds_per_second"]) == {"flower", "plain"}
    assert all(len(v) == 1 and v[0] > 0 for v in d["cpu_seconds_per_client_round"].values())
    assert all(len(r[0]) == 2 for r in d["round_seconds"].values())


def test_scaling_in_process(small_world, tmp_path, tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder

    d = bench_scaling.run_scaling(
        (2, 4), rounds=2, events_per_user=8, n_items=30, engine="inprocess",
        work_dir=tmp_path, encoder=TextEncoder(str(tiny_bert_dir), cache=None),
        hidden=8, segment_len=4, n_negatives=4).to_dict()
    per_size = d["per_arm"]["inprocess"]
    assert per_size[4]["accepted"] == [4, 4] and d["clients"]["inprocess"] == [2, 4]
    assert len(d["log_log_slopes_cpu"]["inprocess"]) == 1
    assert len(d["log_log_slopes_wall"]["inprocess"]) == 1
    assert per_size[4]["train_round_cpu_seconds"] > 0
    assert d["name"] == "scaling-inprocess"
    assert bench_scaling._slopes((10, 100), [1.0, 10.0]) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="linkstate_index"):
        bench_scaling.run_scaling((2,), linkstate_index="maybe")


def test_memory_sampler_sums_the_process_tree():
    # a child that starts a grandchild holding ~150 MB: both must be in the sum
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'b = bytearray(150_000_000); import time; time.sleep(3)']); time.sleep(3.5); "
            "p.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code])
    with bench_memory.TreeSampler(proc.pid, interval=0.2) as sampler:
        deadline = time.time() + 3
        while len(bench_memory.process_tree(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert len(bench_memory.process_tree(proc.pid)) == 2
        proc.wait()
    assert sampler.peak["processes"] == 2
    assert sampler.peak["rss"] > 150_000_000 > sampler.peak["root_rss"]
    assert 0 < sampler.peak["pss"] <= sampler.peak["rss"]


def test_command_line_lists_only_changed_options():
    args = bench_cmd._defaults("scaling")
    assert bench_cmd.command_line("scaling", args) == "fedinterest bench scaling"
    args.sizes, args.engine = (10, 20), "inprocess"
    assert bench_cmd.command_line("scaling", args) == \
        "fedinterest bench scaling --sizes 10,20 --engine inprocess"


def test_all_rejects_unknown_names(capsys):
    assert cli_main(["bench", "all", "--skip", "encoder,nope", "--no-doc"]) == 2
    assert "nope" in capsys.readouterr().err


def test_fp16_experiment_rounds_only_the_update(small_world, tmp_path, tiny_bert_dir):
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.bench import compression as bench_compression

    d = bench_compression.run(
        (0,), n_devices=3, rounds=1, events_per_user=10, n_items=30, work_dir=tmp_path,
        encoder=TextEncoder(str(tiny_bert_dir), cache=None), hidden=8, segment_len=4,
        n_negatives=4).to_dict()
    assert set(d["final_test_ndcg10"]) == {"fp32", "fp16-delta"}
    assert all(0 <= v[0] <= 1 for v in d["final_test_ndcg10"].values())
    assert 0 < d["relative_weight_difference"][0] < 0.05  # rounding, not a different model
    sizes = d["reply_bytes"]
    assert len(sizes["fp32"]) == len(sizes["fp16-delta"]) == 3  # every reply counted
    for s in sizes["fp32"] + sizes["fp16-delta"]:
        # the packed record costs the blob plus one .npy header and one name
        assert s["packed_count_bytes"] == s["blob"] + 128 + len("update")
        assert s["today_count_bytes"] > s["values_fp32"]  # one header per tensor
    assert max(s["blob"] for s in sizes["fp16-delta"]) < min(s["blob"] for s in sizes["fp32"])


@pytest.mark.parametrize("fmt", ["fp32", "fp16-delta"])
def test_encoded_replies_carry_what_the_codec_delivers(fmt):
    from fedinterest.simulations.bench.compression import encoded
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    g = np.full(4, 1000.0, np.float32)
    local = g + np.array([1e-4, 0.1, -3.0, 0.0], np.float32)
    log: list[dict] = []
    with server_task_identity():
        msg = Message(RecordDict({"arrays": ArrayRecord({"w": Array(g)})}), 7, "train")
        msg.metadata.__dict__["_message_id"] = "m1"
        app = encoded(lambda message, context: Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(local)})}), reply_to=message), fmt, log)
        got = app(msg, None).content.array_records["arrays"]["w"].numpy()
    if fmt == "fp32":
        np.testing.assert_array_equal(got, local)
    else:
        want = g + (local - g).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, want)
        assert got[0] != g[0]  # a 1e-4 step survives: the delta is rounded, not the weight
    assert len(log) == 1 and log[0]["values_fp32"] == 16


def test_memoised_epsilon_equals_the_ledger():
    from fedinterest.shared.privacy import EventLedger
    from fedinterest.simulations.bench.training import memoised_epsilon

    history = [(0.8, 0.5, 2), (1.1, 0.25, 4), (0.8, 0.5, 2)]
    assert memoised_epsilon(history, 1e-5) == EventLedger(history=history).epsilon()


def test_memory_run_stops_the_tree_when_flower_reports_a_crash(tmp_path):
    log_path = tmp_path / "child.log"
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); time.sleep(0.5); "
            f"print({bench_memory.CRASH_MARKER!r}, flush=True); time.sleep(60)")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log)
    deadline = time.time() + 5
    while len(bench_memory.process_tree(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    tree = bench_memory.process_tree(proc.pid)
    assert len(tree) == 2
    exit_code, why = bench_memory._wait(proc, log_path, timeout=30)
    assert exit_code is None and bench_memory.CRASH_MARKER in why
    assert not any(bench_memory._alive(p) for p in tree)


class _SlowGrid:
    """Answers each pushed message on the second pull after its push; counts pushes."""

    def __init__(self):
        self.pushed, self.age, self.in_flight_seen = [], {}, 0

    def push_messages(self, messages):
        ids = [f"m{len(self.pushed) + i}" for i in range(len(messages))]
        self.pushed += ids
        self.age.update(dict.fromkeys(ids, 0))
        self.in_flight_seen = max(self.in_flight_seen, len(self.age))
        return ids

    def pull_messages(self, ids):
        from types import SimpleNamespace

        out = []
        for i in list(ids):
            self.age[i] += 1
            if self.age[i] >= 2:
                del self.age[i]
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)))
        return out

    def get_node_ids(self):
        return [1, 2]


def test_windowed_grid_keeps_at_most_window_messages_in_flight():
    inner = _SlowGrid()
    grid = bench_federation.WindowedGrid(inner, window=3, pull_interval=0.0)
    replies = grid.send_and_receive(list(range(10)), timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(inner.pushed)
    assert len(inner.pushed) == 10 and inner.in_flight_seen == grid.max_in_flight == 3
    assert grid.get_node_ids() == [1, 2]  # everything else is delegated
    late = bench_federation.WindowedGrid(_SlowGrid(), window=2, pull_interval=0.0)
    assert late.send_and_receive(list(range(10)), timeout=0) == []  # queued ones never sent
    with pytest.raises(ValueError, match="window"):
        bench_federation.WindowedGrid(inner, window=0)

"""On-device recommend latency, and upload size per client per round.

Recommend: `Device.recommend(k)` on a device with an encrypted store holding one user's
history, a 10,000-item published catalog and the server's model, called many times; p50 and
p95 of the warm calls, the first (cold) call apart (it runs the item tower over the whole
catalog once and caches the result).

Upload: bytes each client sent per round, as the server counted them in a run's results.json,
over the fp32 size of the model from the wire schema both sides build.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
from fedinterest.shared.atomic_io import read_json
from fedinterest.simulations.bench.common import BenchResult, median, percentile, verdict

TARGET_P95_MS = 20.0
TARGET_UPLOAD = 1.0


def run_recommend(n_items: int = 10_000, history: int = 200, calls: int = 200, k: int = 10,
                  threads: int = 1, profile: bool = False, command: str = "") -> BenchResult:
    import torch
    from fedinterest.client.device import Device
    from fedinterest.server.server_app import initial_weights
    from fedinterest.shared.config import RunConfig
    from fedinterest.simulations.bench.data import random_catalog, random_history

    if calls < 2:
        raise ValueError(f"calls must be >= 2 (one cold call, then warm ones), got {calls}")
    result = BenchResult(
        "recommend", f"Device.recommend(k={k}) latency, {n_items}-item catalog, {history}-event "
        f"history in the encrypted store, default model (gru-text), {threads} torch thread(s)",
        command, "", "")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = RunConfig()
    catalog = random_catalog(n_items)
    items, ts, tv = random_history(n_items, history)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-recommend-") as tmp:
            key = Path(tmp) / "device.key"
            key.write_bytes(secrets.token_bytes(32))
            with Device.open(Path(tmp) / "device.db", key_file=key, catalog=catalog) as dev:
                ids = dev.store.add_events([
                    {"item": catalog.item_ids[i], "timestamp": int(t), "rating": None,
                     "text": "a private note" if np.any(v) else None}
                    for i, t, v in zip(items, ts, tv)])
                dev.store.set_text_vectors({i: v for i, v in zip(ids, tv) if np.any(v)})
                # a freshly installed model has no item embeddings yet: the first call pays
                dev.load_global_model(initial_weights(cfg, catalog), cfg)
                start = time.perf_counter()
                dev.recommend(k)
                cold = time.perf_counter() - start
                lat, cpu = [], []
                for _ in range(calls - 1):
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    recs = dev.recommend(k)
                    lat.append(time.perf_counter() - start)
                    cpu.append(time.thread_time() - start_cpu)
                # the part of a call that reads and decrypts the history from the store
                store_reads = []
                for _ in range(min(calls, 50)):
                    start = time.perf_counter()
                    dev.store.events()
                    dev.store.text_vectors()
                    store_reads.append(time.perf_counter() - start)
                prof = _profile(lambda: dev.recommend(k), 20) if profile else None
    finally:
        torch.set_num_threads(saved_threads)
    ms, cpu_ms = np.array(lat) * 1e3, np.array(cpu) * 1e3
    p50, p95 = percentile(ms, 50), percentile(ms, 95)
    cpu50, cpu95 = percentile(cpu_ms, 50), percentile(cpu_ms, 95)
    result.summary = (f"wall p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {ms.max():.1f} ms over "
                      f"{len(ms)} warm calls (CPU time of the calling thread: p50 {cpu50:.1f} "
                      f"ms, p95 {cpu95:.1f} ms); first call {cold * 1e3:.0f} ms; reading the "
                      f"history from the encrypted store {median(store_reads) * 1e3:.1f} ms")
    result.ratio = (f"wall p95 {verdict(p95, TARGET_P95_MS, False)} ms; CPU p95 "
                    f"{verdict(cpu95, TARGET_P95_MS, False)} ms")
    result.data = {"n_items": n_items, "history": history, "k": k, "calls": calls,
                   "torch_threads": threads, "returned": len(recs), "cold_ms": cold * 1e3,
                   "p50_ms": p50, "p95_ms": p95, "p99_ms": percentile(ms, 99),
                   "cpu_p50_ms": cpu50, "cpu_p95_ms": cpu95,
                   "cpu_ms": cpu_ms.round(3).tolist(),
                   "max_ms": float(ms.max()), "latencies_ms": ms.round(3).tolist(),
                   "store_read_median_ms": median(store_reads) * 1e3,
                   "target_p95_ms": TARGET_P95_MS}
    if prof is not None:
        result.data["profile"] = prof
    return result.finish()


def _profile(fn, n: int) -> list[dict]:
    """Top functions by cumulative time per call (cProfile)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:20]
    return [{"function": f"{f.rsplit('site-packages/', 1)[-1]}:{line}({name})",
             "calls_per_call": nc / n, "cumulative_ms": ct / n * 1e3, "own_ms": tt / n * 1e3}
            for (f, line, name), (_, nc, tt, ct, _) in top]


# -- upload size ------------------------------------------------------------------------------
KNOWN_RUNS = ("runs/bench/memory-run",)


def find_run(run: str | Path | None) -> Path:
    """The run directory to read: `run`, or the newest results.json the other benchmarks left
    (the memory benchmark's ml-latest-small run)."""
    from fedinterest.shared.errors import ConfigError

    if run is not None:
        path = Path(run)
        if not (path / "results.json").is_file():
            raise ConfigError(f"{path}: no results.json there (pass the directory of a finished "
                              "`fedinterest simulate` run)")
        return path
    found = [p for base in KNOWN_RUNS for p in Path(base).glob("**/results.json")]
    if not found:
        raise ConfigError("no run to read: pass --run DIR (a finished `fedinterest simulate` "
                          "run), or run `fedinterest bench memory` first (its ml-latest-small "
                          "run is the default)")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def run_upload(run: str | Path | None = None, command: str = "") -> BenchResult:
    from fedinterest.shared.config import RunConfig
    from fedinterest.shared.fed_model import wire_schema
    from fedinterest.shared.published_catalog import PublishedCatalog

    run_dir = find_run(run)
    res = read_json(run_dir / "results.json")
    prepared = read_json(run_dir / "prepared.json")
    cfg = RunConfig.from_mapping(res["config"], source=str(run_dir / "results.json"))
    schema = wire_schema(cfg, PublishedCatalog.load(prepared["catalog_path"]))
    n_params = sum(int(np.prod(a.shape)) for a in schema.arrays)
    fp32 = 4 * n_params
    per_round = [r["bytes_up_per_client"] for r in res["rounds"] if r["accepted"]]
    if not per_round:
        from fedinterest.shared.errors import ConfigError

        raise ConfigError(f"{run_dir / 'results.json'}: no round with accepted replies")
    up = median(per_round)
    ratio = up / fp32
    result = BenchResult(
        "upload", f"bytes per client per round (server's count, results.json of {run_dir}: "
        f"{res['dataset'].get('spec', '?')}, secagg={cfg.secagg}, dp={cfg.dp}, "
        f"update_format={cfg.update_format}) / fp32 size "
        f"of the model from the wire schema ({n_params:,} parameters)", command, "", "")
    result.summary = (f"{up / 1024:.1f} KiB up per client per round (median of {len(per_round)}"
                      f" rounds), model {fp32 / 1024:.1f} KiB in fp32; down "
                      f"{schema.nbytes / 1024:.1f} KiB")
    result.ratio = f"{verdict(ratio, TARGET_UPLOAD, False)}"
    framing = upload_framing(schema, run_dir / "checkpoints")
    if framing:
        result.summary += (
            f"; update_format=arrays would count values {fp32:,} + {len(schema.arrays)} .npy headers "
            f"{framing['npy_headers']:,} + names {framing['names']:,} bytes; Flower's objects "
            f"on the wire (arrays, chunks, record) {framing['today_flower_objects']:,}; "
            f"the same weights packed (shared.wire.encode_update, round "
            f"{framing['round']} global weights): lossless fp32 count "
            f"{framing['packed_fp32_count_bytes']:,} / objects "
            f"{framing['packed_fp32_flower_objects']:,}, fp16 delta (round "
            f"{framing['round'] - 1} -> {framing['round']}) count "
            f"{framing['packed_fp16_count_bytes']:,}")
        result.ratio += (f"; packed lossless fp32 "
                         f"{framing['packed_fp32_count_bytes'] / fp32:.3f}, fp16 delta "
                         f"{framing['packed_fp16_count_bytes'] / fp32:.3f} (what update_format=fp32 / "
                         "fp16 send)")
    result.data = {"run_dir": str(run_dir), "secagg": cfg.secagg, "dp": cfg.dp,
                   "framing": framing,
                   "parameters": n_params, "arrays": len(schema.arrays), "fp32_bytes": fp32,
                   "schema_bytes": schema.nbytes,
                   "bytes_up_per_client_per_round": per_round, "median_bytes_up": up,
                   "ratio_up_over_fp32": ratio, "target": TARGET_UPLOAD,
                   "largest_arrays": sorted(([a.name, int(np.prod(a.shape))] for a in
                                             schema.arrays), key=lambda x: -x[1])[:5]}
    return result.finish()


def upload_framing(schema, checkpoints: Path) -> dict | None:
    """Where the bytes of an update go, on the run's last two global weights (checkpoints):
    the server's count (ArrayRecord.count_bytes) split into values, .npy headers and names;
    the bytes of every Flower object that would travel; and the same weights packed by
    shared.wire.encode_update (lossless fp32, and the fp16 delta between the two rounds).
    None when the run kept fewer than two checkpoints."""
    from fedinterest.shared.wire import PACKED_KEY, encode_update
    from fedinterest.simulations.bench.compression import flower_bytes
    from flwr.app import Array, ArrayRecord

    metas = sorted(checkpoints.glob("round-*.npz"))
    if len(metas) < 2:
        return None
    weights = []
    for path in metas[-2:]:
        with np.load(path, allow_pickle=False) as z:
            weights.append([z[f"w{i}"] for i in range(len(schema.arrays))])
    prev, last = weights
    today = ArrayRecord({n: Array(np.ascontiguousarray(w)) for n, w in zip(schema.names, last)})
    count, objects = flower_bytes(today)

    def packed(blob: bytes) -> tuple[int, int]:
        return flower_bytes(ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, np.uint8))}))

    fp32_count, fp32_objects = packed(encode_update(last, schema))
    fp16_count, fp16_objects = packed(encode_update(last, schema, "fp16-delta", prev))
    return {"round": int(metas[-1].stem.split("-")[1]), "today_count_bytes": count,
            "values": schema.nbytes,
            "npy_headers": sum(len(today[n].data) for n in schema.names) - schema.nbytes,
            "names": sum(len(n) for n in schema.names), "today_flower_objects": objects,
            "packed_fp32_count_bytes": fp32_count, "packed_fp32_flower_objects": fp32_objects,
            "packed_fp16_count_bytes": fp16_count, "packed_fp16_flower_objects": fp16_objects}

"""Is a compact update small and good enough? The experiment behind RunConfig.update_format
(real runs send what this measures since b6cb77c; the default is the lossless "fp32" packing):
the NDCG@10 cost of fp16 deltas, side by side with lossless packing, in one invocation.

What it does: the same federation twice per seed, in process (bench_federation.plain_arm's
grid). Every train reply goes through `shared.wire.encode_update` on the device side and
`decode_update` on the server side (the server then aggregates exactly what the blob
carried):
- arm "fp32": the lossless packed encoding; the decoded arrays must equal the device's
  bit for bit, so this arm is also today's federation;
- arm "fp16-delta": (local - global) rounded to float16 and added back to the float32 global
  weights by the server.
Both arms share the prepared world and the seed (same sampling, same DP noise draws); the
final round's test NDCG@10 over every device is compared. Bytes are counted per real reply:
Flower's ArrayRecord.count_bytes (what the server records as bytes up) of today's per-tensor
record and of a record holding the blob, and the bytes of the Flower objects that would
travel (every deflated object of the record: arrays, chunks, the record's name map).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from fedinterest.shared.atomic_io import read_json
from fedinterest.simulations.bench.common import BenchResult, median

TARGET_BYTES = 0.5
TARGET_NDCG_LOSS = 0.01


def flower_bytes(record) -> tuple[int, int]:
    """(ArrayRecord.count_bytes, bytes of every deflated Flower object of the record)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return record.count_bytes(), sum(len(o.deflate())
                                     for o in get_all_nested_objects(record).values())


def encoded(client_app, fmt: str, log: list[dict]):
    """Wraps a ClientApp callable: each train reply's arrays pass through encode_update /
    decode_update in `fmt`; `log` gets the byte counts of every reply."""
    from fedinterest.shared.wire import PACKED_KEY, WireSchema, decode_update, encode_update
    from flwr.app import Array, ArrayRecord

    def app(message, context):
        reply = client_app(message=message, context=context)
        if (message.metadata.message_type == "train" and not reply.has_error()
                and "arrays" in reply.content.array_records
                and "arrays" in message.content.array_records):
            sent = message.content.array_records["arrays"]
            local_rec = reply.content.array_records["arrays"]
            names = list(local_rec)
            glob = [sent[n].numpy() for n in names]
            local = [local_rec[n].numpy() for n in names]
            schema = WireSchema.from_named_arrays(list(zip(names, glob)))
            blob = encode_update(local, schema, fmt, glob)
            packed = ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, np.uint8))})
            out = decode_update(blob, schema, glob)
            if fmt == "fp32" and not all(np.array_equal(a, b) for a, b in zip(out, local)):
                raise AssertionError("the lossless encoding changed an update")
            today, today_wire = flower_bytes(local_rec)
            packed_count, packed_wire = flower_bytes(packed)
            log.append({"values_fp32": schema.nbytes, "blob": len(blob),
                        "today_count_bytes": today, "today_flower_objects": today_wire,
                        "packed_count_bytes": packed_count,
                        "packed_flower_objects": packed_wire})
            reply.content["arrays"] = ArrayRecord(
                {n: Array(np.ascontiguousarray(a)) for n, a in zip(names, out)})
        return reply

    return app


def _final(arm: dict, metric: str) -> float:
    return float(arm["rounds"][-1]["metrics"].get(metric, float("nan")))


def relative_difference(a: list[np.ndarray], b: list[np.ndarray], start: list[np.ndarray]
                        ) -> float:
    """||a - b|| / ||b - start||: how far rounding moved the final weights, relative to how
    far training moved them."""
    num = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum((y.astype(np.float64) - s) ** 2)) for y, s in zip(b, start))
    return float(np.sqrt(num / den)) if den else float("nan")


def _summarise(result: BenchResult, sizes: dict, ndcg: dict, seeds: tuple[int, ...],
               weight_diff: list[float]) -> tuple[dict, float, int]:
    """Fills the result's summary and target line; returns (median byte ratios over fp32,
    relative NDCG@10 loss, fp32 model bytes)."""
    fp32_bytes = sizes["fp32"][0]["values_fp32"]

    def ratio(arm: str, key: str) -> float:
        return median([s[key] for s in sizes[arm]]) / fp32_bytes

    ratios = {arm: {key: ratio(arm, key) for key in ("blob", "packed_count_bytes",
                                                      "packed_flower_objects")}
              for arm in ("fp32", "fp16-delta")}
    ratios["today"] = {key: ratio("fp32", key) for key in ("today_count_bytes",
                                                           "today_flower_objects")}
    base, comp = np.array(ndcg["fp32"]), np.array(ndcg["fp16-delta"])
    rel_loss = float((base.mean() - comp.mean()) / base.mean()) if base.mean() else float("nan")
    r32, r16 = ratios["fp32"]["packed_count_bytes"], ratios["fp16-delta"]["packed_count_bytes"]
    result.summary = (
        f"server's count per reply / fp32 values (median of {len(sizes['fp32'])} replies): "
        f"today {ratios['today']['today_count_bytes']:.4f}, packed lossless fp32 {r32:.4f}, "
        f"packed fp16 delta {r16:.4f}; Flower objects on the wire: today "
        f"{ratios['today']['today_flower_objects']:.4f}, packed fp32 "
        f"{ratios['fp32']['packed_flower_objects']:.4f}, fp16 delta "
        f"{ratios['fp16-delta']['packed_flower_objects']:.4f}; test NDCG@10 fp32 "
        f"{base.mean():.4f}, fp16 delta {comp.mean():.4f} (mean of {len(seeds)} seeds; per "
        f"seed {np.round(base, 4).tolist()} vs {np.round(comp, 4).tolist()}); final weights "
        f"differ by {max(weight_diff):.1e} of the distance training moved them")
    result.ratio = (f"lossless fp32 {r32:.3f} (<= 1: {'met' if r32 <= 1 else 'missed'}); "
                    f"fp16 delta {r16:.3f} (<= {TARGET_BYTES}: "
                    f"{'met' if r16 <= TARGET_BYTES else 'missed'}), NDCG@10 loss "
                    f"{rel_loss:+.2%} (<= {TARGET_NDCG_LOSS:.0%}: "
                    f"{'met' if rel_loss <= TARGET_NDCG_LOSS else 'missed'})")
    return ratios, rel_loss, fp32_bytes


def run(seeds: tuple[int, ...] = (1, 2, 3), n_devices: int = 60, rounds: int = 4,
        events_per_user: int = 60, n_items: int = 1000,
        work_dir: str | Path = "runs/bench/compression-work", encoder=None,
        command: str = "", **overrides) -> BenchResult:
    from fedinterest.client import client_app as capp
    from fedinterest.server.server_app import initial_weights
    from fedinterest.shared.published_catalog import PublishedCatalog
    from fedinterest.simulations.bench.federation import (
        bench_config,
        fresh_copy,
        plain_arm,
        prepare_world,
    )

    work = Path(work_dir)
    arms = ("fp32", "fp16-delta")
    result = BenchResult(
        "upload-fp16", f"compact update experiment: bytes of every train reply and final test "
        f"NDCG@10 (leave-last-out, full ranking, every device) with replies packed into one "
        f"compressed blob, lossless fp32 vs an fp16 delta; synthetic world, {n_devices} "
        f"devices all sampled, {rounds} rounds, seeds {list(seeds)}, in process", command,
        "", "")
    ndcg: dict[str, list[float]] = {a: [] for a in arms}
    val_ndcg: dict[str, list[float]] = {a: [] for a in arms}
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    sizes: dict[str, list[dict]] = {a: [] for a in arms}
    weight_diff: list[float] = []
    for seed in seeds:
        prepared = work / f"prepared-{seed}"
        if prepared.exists():
            shutil.rmtree(prepared)
        # devices reply with per-tensor arrays and `encoded` packs them itself, so that one
        # reply yields both counts (per-tensor and packed) and the lossless check; the arms
        # must draw the same DP noise to differ only by the rounding: reproducible seeds (an
        # experiment setting the devices' policy records; deployments draw from the CSPRNG)
        cfg = bench_config(prepared, n_devices, rounds, seed=seed, eval_clients=0,
                           **{"update_format": "arrays", "reproducible_seeds": True,
                              **overrides})
        prepare_world(prepared, cfg, n_devices, events_per_user, n_items, seed=seed,
                      encoder=encoder)
        info = read_json(prepared / "prepared.json")
        catalog = PublishedCatalog.load(info["catalog_path"])
        final = {}
        for name in arms:
            run_dir = work / f"{name}-{seed}"
            fresh_copy(prepared, run_dir)
            start = time.perf_counter()
            arm = plain_arm(run_dir, cfg, encoded(capp.app, name, sizes[name]))
            seconds[name].append(time.perf_counter() - start)
            ndcg[name].append(_final(arm, "test-ndcg@10"))
            val_ndcg[name].append(_final(arm, "val-ndcg@10"))
            final[name] = arm["weights"]
        weight_diff.append(relative_difference(final["fp16-delta"], final["fp32"],
                                               initial_weights(cfg, catalog)))
        shutil.rmtree(prepared, ignore_errors=True)
    ratios, rel_loss, fp32_bytes = _summarise(result, sizes, ndcg, seeds, weight_diff)
    result.data = {"seeds": list(seeds), "n_devices": n_devices, "rounds": rounds,
                   "events_per_user": events_per_user, "n_items": n_items,
                   "final_test_ndcg10": ndcg, "final_val_ndcg10": val_ndcg,
                   "relative_ndcg_loss": rel_loss,
                   "relative_weight_difference": weight_diff,
                   "fp32_model_bytes": fp32_bytes, "reply_bytes": sizes,
                   "median_ratios_over_fp32": ratios, "seconds": seconds,
                   "median_seconds": {k: median(v) for k, v in seconds.items()},
                   "targets": {"bytes_fp32": 1.0, "bytes_fp16": TARGET_BYTES,
                               "ndcg_loss": TARGET_NDCG_LOSS}}
    return result.finish()

"""Would an fp16 update be good enough? An experiment, not a feature: the run config has no
compression option (adding one is the config owner's call), so nothing here changes what a
device sends in a real run.

What it does: the same federation twice per seed, in process (bench_federation.plain_arm's
grid), once as today and once with every train reply passed through what an fp16 update
would do: the device sends (local - global) rounded to float16 and the server adds it to its
float32 global weights. Both arms share the prepared world and the seed (same sampling, same
DP noise draws); the final round's test NDCG@10 over every device is compared. The bytes an
fp16 update would take are counted with Flower's own ArrayRecord.count_bytes on float16
arrays of the wire schema.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .bench import BenchResult, median

TARGET_BYTES = 0.5
TARGET_NDCG_LOSS = 0.01


def fp16_delta(client_app):
    """Wraps a ClientApp callable: train replies carry global + float16(local - global)."""
    from flwr.app import Array, ArrayRecord

    def app(message, context):
        reply = client_app(message=message, context=context)
        if (message.metadata.message_type == "train" and not reply.has_error()
                and "arrays" in reply.content.array_records
                and "arrays" in message.content.array_records):
            sent = message.content.array_records["arrays"]
            local = reply.content.array_records["arrays"]
            rounded = {}
            for name in local:
                g = sent[name].numpy()
                delta = (local[name].numpy() - g).astype(np.float16).astype(np.float32)
                rounded[name] = Array(np.ascontiguousarray(g + delta, dtype=np.float32))
            reply.content["arrays"] = ArrayRecord(rounded)
        return reply

    return app


def update_bytes(schema, dtype) -> int:
    """Bytes Flower counts for an update of `dtype` arrays of the schema's shapes."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({a.name: Array(np.zeros(a.shape, dtype))
                        for a in schema.arrays}).count_bytes()


def _final(arm: dict, metric: str) -> float:
    return float(arm["rounds"][-1]["metrics"].get(metric, float("nan")))


def relative_difference(a: list[np.ndarray], b: list[np.ndarray], start: list[np.ndarray]
                        ) -> float:
    """||a - b|| / ||b - start||: how far rounding moved the final weights, relative to how
    far training moved them."""
    num = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum((y.astype(np.float64) - s) ** 2)) for y, s in zip(b, start))
    return float(np.sqrt(num / den)) if den else float("nan")


def run(seeds: tuple[int, ...] = (1, 2, 3), n_devices: int = 60, rounds: int = 4,
        events_per_user: int = 60, n_items: int = 1000,
        work_dir: str | Path = "runs/bench/compression-work", encoder=None,
        command: str = "", **overrides) -> BenchResult:
    from fedinterest.client import client_app as capp
    from fedinterest.server.server_app import initial_weights
    from fedinterest.shared.fed_model import wire_schema
    from fedinterest.shared.published_catalog import PublishedCatalog

    from .bench_federation import bench_config, fresh_copy, plain_arm, prepare_world

    work = Path(work_dir)
    result = BenchResult(
        "upload-fp16", f"fp16 update experiment: final test NDCG@10 (leave-last-out, full "
        f"ranking, every device) with train replies rounded as an fp16 delta vs as today; "
        f"synthetic world, {n_devices} devices all sampled, {rounds} rounds, seeds "
        f"{list(seeds)}, in process", command, "", "")
    ndcg: dict[str, list[float]] = {"fp32": [], "fp16-delta": []}
    val_ndcg: dict[str, list[float]] = {"fp32": [], "fp16-delta": []}
    seconds: dict[str, list[float]] = {"fp32": [], "fp16-delta": []}
    weight_diff: list[float] = []
    schema = None
    for seed in seeds:
        prepared = work / f"prepared-{seed}"
        if prepared.exists():
            shutil.rmtree(prepared)
        cfg = bench_config(prepared, n_devices, rounds, seed=seed, eval_clients=0,
                           **overrides)
        prepare_world(prepared, cfg, n_devices, events_per_user, n_items, seed=seed,
                      encoder=encoder)
        info = json.loads((prepared / "prepared.json").read_text())
        catalog = PublishedCatalog.load(info["catalog_path"])
        schema = schema or wire_schema(cfg, catalog)
        final = {}
        for name in ("fp32", "fp16-delta"):
            run_dir = work / f"{name}-{seed}"
            fresh_copy(prepared, run_dir)
            start = time.perf_counter()
            arm = plain_arm(run_dir, cfg, fp16_delta(capp.app) if name == "fp16-delta" else None)
            seconds[name].append(time.perf_counter() - start)
            ndcg[name].append(_final(arm, "test-ndcg@10"))
            val_ndcg[name].append(_final(arm, "val-ndcg@10"))
            final[name] = arm["weights"]
        weight_diff.append(relative_difference(final["fp16-delta"], final["fp32"],
                                               initial_weights(cfg, catalog)))
        shutil.rmtree(prepared, ignore_errors=True)
    n_params = sum(int(np.prod(a.shape)) for a in schema.arrays)
    fp16_bytes = update_bytes(schema, np.float16)
    byte_ratio = fp16_bytes / (4 * n_params)
    base, comp = np.array(ndcg["fp32"]), np.array(ndcg["fp16-delta"])
    rel_loss = float((base.mean() - comp.mean()) / base.mean()) if base.mean() else float("nan")
    result.summary = (f"test NDCG@10 fp32 {base.mean():.4f}, fp16 delta {comp.mean():.4f} "
                      f"(mean of {len(seeds)} seeds; per seed {np.round(base, 4).tolist()} vs "
                      f"{np.round(comp, 4).tolist()}); final weights differ by "
                      f"{max(weight_diff):.1e} of the distance training moved them; fp16 "
                      f"update {fp16_bytes / 1024:.1f} KiB")
    result.ratio = (f"bytes {byte_ratio:.3f} (<= {TARGET_BYTES}: "
                    f"{'met' if byte_ratio <= TARGET_BYTES else 'missed'}); NDCG@10 loss "
                    f"{rel_loss:+.2%} (<= {TARGET_NDCG_LOSS:.0%}: "
                    f"{'met' if rel_loss <= TARGET_NDCG_LOSS else 'missed'})")
    result.data = {"seeds": list(seeds), "n_devices": n_devices, "rounds": rounds,
                   "events_per_user": events_per_user, "n_items": n_items,
                   "final_test_ndcg10": ndcg, "final_val_ndcg10": val_ndcg,
                   "relative_ndcg_loss": rel_loss,
                   "relative_weight_difference": weight_diff,
                   "fp16_update_bytes": fp16_bytes, "fp32_model_bytes": 4 * n_params,
                   "fp32_update_bytes": update_bytes(schema, np.float32),
                   "parameters": n_params,
                   "byte_ratio": byte_ratio, "seconds": seconds,
                   "median_seconds": {k: median(v) for k, v in seconds.items()},
                   "targets": {"bytes": TARGET_BYTES, "ndcg_loss": TARGET_NDCG_LOSS}}
    return result.finish()

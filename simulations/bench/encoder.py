"""Encoder throughput: `TextEncoder.encode` against a plain transformers loop over the same
texts, the same loaded weights and the same batch size; and a re-run through the cache.

The plain arm is the loop on the model card (tokenise a batch in input order with
padding=True, run the model, mean-pool over the mask, L2-normalise). Ours tokenises once,
sorts by token length so each batch carries little padding, and embeds each distinct text once.
Both produce the same vectors (the max abs difference is recorded).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

import numpy as np
from fedinterest.simulations.bench.common import BenchResult, alternate, median, verdict

TARGET_RATIO = 1.3
TARGET_CACHED = 50.0


def plain_loop(tokenizer, model, texts: list[str], batch_size: int, max_length: int
               ) -> np.ndarray:
    """The textbook loop: batches in input order, padded to their longest text."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def _padding_share(tokenizer, texts: list[str], batch_size: int, max_length: int,
                   sort: bool) -> float:
    """Share of the token slots in all batches that are padding."""
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True,
                                                      max_length=max_length)["input_ids"]])
    if sort:
        lengths = np.sort(lengths, kind="stable")
    slots = sum(len(lengths[s:s + batch_size]) * lengths[s:s + batch_size].max()
                for s in range(0, len(lengths), batch_size))
    return float(1 - lengths.sum() / slots) if slots else 0.0


_COLD_CACHED = """
import json, sys, time
from fedinterest.shared.embedding_cache import EmbeddingCache
from fedinterest.shared.encoder import TextEncoder
texts = json.load(open(sys.argv[1]))
t0 = time.perf_counter()
enc = TextEncoder(None if sys.argv[3] == '-' else sys.argv[3], cache=EmbeddingCache(sys.argv[2]))
enc.encode(texts, public=True)
print(time.perf_counter() - t0)
"""


def run(dataset: str | None = None, model: str | None = None, batch_size: int = 64,
        max_length: int = 128, reps: int = 3, limit: int | None = None,
        command: str = "") -> BenchResult:
    from fedinterest.shared.embedding_cache import EmbeddingCache
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.bench.data import bench_dataset

    ds, ds_name = bench_dataset(dataset)
    texts = list(ds.catalog.texts)[:limit] if limit else list(ds.catalog.texts)
    import torch

    result = BenchResult(
        "encoder", f"catalog texts of {ds_name} ({len(texts)} texts, batch {batch_size}, "
        f"{torch.get_num_threads()} torch thread(s)): TextEncoder.encode vs a plain "
        "transformers loop, same weights; cached re-run", command, "", "")
    ours = TextEncoder(model, batch_size=batch_size, max_length=max_length, cache=None)
    ours.load()
    tokenizer, weights = ours.tokenizer, ours.model
    with tempfile.TemporaryDirectory(prefix="bench-encoder-cache-") as cache_dir:
        cached = TextEncoder(model, batch_size=batch_size, max_length=max_length,
                             cache=EmbeddingCache(cache_dir))
        fill_start = time.perf_counter()
        cached.encode(texts, public=True)  # fills the cache: the "first run" of a user
        fill_seconds = time.perf_counter() - fill_start
        vectors = {}

        def arm(name, fn):
            def go():
                vectors[name] = fn()
            return name, go

        cpu: dict[str, list[float]] = {}
        times = alternate([
            arm("plain", lambda: plain_loop(tokenizer, weights, texts, batch_size, max_length)),
            arm("ours", lambda: ours.encode(texts)),
            arm("cached", lambda: cached.encode(texts, public=True)),
        ], reps=reps, cpu=cpu)
        cold = _cold_cached_seconds(texts, cache_dir, model)
        cached.cache.close()
    diff = float(np.abs(vectors["plain"] - vectors["ours"]).max()) if texts else 0.0
    diff_cached = float(np.abs(vectors["cached"] - vectors["ours"]).max()) if texts else 0.0
    med = {k: median(v) for k, v in times.items()}
    med_cpu = {k: median(v) for k, v in cpu.items()}
    ratio = med["plain"] / med["ours"]
    ratio_cpu = med_cpu["plain"] / med_cpu["ours"]
    ratio_cached = med["plain"] / med["cached"]
    ratio_cold = med["plain"] / cold
    n = len(texts)
    result.summary = (f"plain {n / med['plain']:,.0f} texts/s, ours {n / med['ours']:,.0f} "
                      f"texts/s (CPU {med_cpu['plain']:.0f} s vs {med_cpu['ours']:.0f} s), "
                      f"cached re-run {med['cached'] * 1e3:.0f} ms in-process / "
                      f"{cold:.2f} s in a fresh process (n={reps})")
    result.ratio = (f"ours/plain {verdict(ratio, TARGET_RATIO, True)} (CPU {ratio_cpu:.3g}); "
                    f"cached/plain {verdict(ratio_cached, TARGET_CACHED, True)} in-process, "
                    f"{ratio_cold:.3g} fresh process")
    result.data = {
        "texts": n, "distinct_texts": len(set(texts)), "dataset": ds_name,
        "model": ours.name, "batch_size": batch_size, "max_length": max_length, "reps": reps,
        "seconds": times, "median_seconds": med, "cpu_seconds": cpu,
        "median_cpu_seconds": med_cpu, "ratio_cpu_ours_over_plain": ratio_cpu,
        "texts_per_second": {k: n / v for k, v in med.items()},
        "ratio_ours_over_plain": ratio, "ratio_cached_over_plain": ratio_cached,
        "cached_fresh_process_seconds": cold, "ratio_cached_fresh_process_over_plain":
            ratio_cold, "cache_fill_seconds": fill_seconds,
        "padding_share": {"plain": _padding_share(tokenizer, texts, batch_size, max_length,
                                                  False),
                          "ours": _padding_share(tokenizer, texts, batch_size, max_length,
                                                 True)},
        "max_abs_diff_plain_vs_ours": diff, "max_abs_diff_cached_vs_ours": diff_cached,
        "targets": {"ours_over_plain": TARGET_RATIO, "cached_over_plain": TARGET_CACHED},
    }
    return result.finish()


def _cold_cached_seconds(texts: list[str], cache_dir: str, model: str | None) -> float:
    """A user's cached re-run: a fresh process (model digest not yet memoised), timed from
    building the encoder to the vectors; interpreter start and imports are left out."""
    import json

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    try:
        out = subprocess.run([sys.executable, "-c", _COLD_CACHED, f.name, cache_dir,
                              str(model) if model else "-"],
                             capture_output=True, text=True, check=True)
    finally:
        import os

        os.unlink(f.name)
    return float(out.stdout.strip().splitlines()[-1])

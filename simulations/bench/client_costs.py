"""What two per-message costs of the ClientApp would be with a different algorithm, measured
on a real device's reply (proposals for the owners of client/egress.py and shared/wire.py).

1. The egress guard's raw-text scan (`client/egress.py: check_reply`) asks `window in blob`
   for every 12-byte window of the device's text: (windows x bytes) work, ~2,000 windows x
   ~1.3 MB of serialised + inflated reply on an ml-latest-small device. `find_any_window`
   gives the same verdict in one pass over the bytes: a 64-bit key of every 12-byte slice
   (numpy, no copy), looked up in the sorted keys of the text windows, candidates confirmed
   by an exact comparison; texts shorter than a window are still searched whole.
2. `shared/wire.encode_update` compresses the byte-shuffled fp32 update with zlib level 6;
   levels 1 and 0 show what the compression buys against its CPU.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _keys(data: bytes, width: int) -> np.ndarray:
    """A 64-bit key of every `width`-byte slice of `data` (8 < width <= 16), in order."""
    n = len(data) - width + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    buf = data + bytes(16)  # the unaligned views below read up to 16 bytes past an offset
    lo = np.ndarray((n,), "<u8", buffer=buf, offset=0, strides=(1,))
    hi = np.ndarray((n,), "<u8", buffer=buf, offset=width - 8, strides=(1,))
    return lo ^ (hi * _MIX)


def find_any_window(blobs: list[bytes], windows: set[bytes], width: int = 12) -> bool:
    """True when any of `windows` occurs in any blob: the verdict of `any(w in b ...)`."""
    full = [w for w in windows if len(w) == width]
    if any(w in b for w in windows if len(w) != width for b in blobs):
        return True
    if not full:
        return False
    table = np.sort(_keys(b"".join(full), width)[::width])  # one key per window
    wanted = set(full)
    for blob in blobs:
        keys = _keys(blob, width)
        at = np.searchsorted(table, keys)
        hit = table[np.minimum(at, len(table) - 1)] == keys
        if any(blob[o:o + width] in wanted for o in np.flatnonzero(hit)):
            return True
    return False


def time_scan(blobs: list[bytes], windows: set[bytes], reps: int = 3) -> dict:
    """CPU seconds of today's scan and of `find_any_window` on the same input (median)."""
    def naive() -> bool:
        return any(any(w in b for b in blobs) for w in windows)

    out = {}
    for name, fn in (("today", naive), ("one_pass", lambda: find_any_window(blobs, windows))):
        times, verdict = [], None
        for _ in range(reps):
            t = time.process_time()
            verdict = fn()
            times.append(time.process_time() - t)
        out[name] = {"cpu_s": sorted(times)[len(times) // 2], "found": verdict}
    return out


def time_compression(flat: bytes, levels: tuple[int, ...] = (6, 1, 0), reps: int = 3) -> dict:
    """CPU seconds and compressed size of `flat` (the shuffled update) per zlib level."""
    out = {}
    for level in levels:
        times, size = [], 0
        for _ in range(reps):
            t = time.process_time()
            size = len(zlib.compress(flat, level))
            times.append(time.process_time() - t)
        out[level] = {"cpu_s": sorted(times)[len(times) // 2], "bytes": size,
                      "ratio_to_raw": size / max(len(flat), 1)}
    return out


def measure_device(run_dir: str, reps: int = 3) -> dict:
    """Both measurements on devices of a prepared run: the raw-text windows of the device
    with the median number of texts among those with any, and of the one with the most, against the blobs the guard scans for a packed fp32 train reply
    (the reply's serialisation, the values as sent and as decoded, as `check_reply` does),
    and the compression of that update at zlib levels 6 (today), 1 and 0."""
    from pathlib import Path

    from fedinterest.client.egress import raw_text_windows
    from fedinterest.client.store import DeviceStore
    from fedinterest.shared.atomic_io import read_json
    from fedinterest.shared.config import RunConfig
    from fedinterest.shared.fed_model import wire_schema
    from fedinterest.shared.published_catalog import PublishedCatalog
    from fedinterest.shared.wire import decode_packed, encode_update
    from flwr.app import Array

    info = read_json(Path(run_dir) / "prepared.json")
    devices = Path(info["devices_dir"])
    counts = []
    for p in range(int(info["n_devices"])):
        with DeviceStore.open(devices / f"device-{p}.db", key_file=devices / f"device-{p}.key",
                              create=False, verify=False) as st:
            counts.append(([e.text for e in st.events() if e.text], p))
    counts.sort(key=lambda c: len(c[0]))
    with_text = [c for c in counts if c[0]] or counts
    picks = {"median_with_text": with_text[len(with_text) // 2], "most_text": counts[-1]}
    catalog = PublishedCatalog.load(info["catalog_path"])
    schema = wire_schema(RunConfig(), catalog)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(a.shape).astype(np.float32) * 0.05 for a in schema.arrays]
    blob = encode_update(arrays, schema)
    decoded, values = decode_packed(Array(np.frombuffer(blob, np.uint8)), schema, None)
    blobs = [b"arrays\x00update\x00" + blob, values.tobytes(),
             b"".join(a.tobytes() for a in decoded)]
    flat = np.concatenate([a.ravel() for a in arrays])
    shuffled = flat.view(np.uint8).reshape(-1, 4).T.tobytes()
    scans = {}
    for name, (texts, device) in picks.items():
        windows = raw_text_windows(texts)
        scans[name] = {"device": device, "texts": len(texts), "windows": len(windows),
                       **time_scan(blobs, windows, reps)}
    return {"devices": len(counts), "devices_with_text": sum(1 for c in counts if c[0]),
            "scanned_bytes": sum(map(len, blobs)), "model_values": int(flat.size),
            "scan": scans, "compression": time_compression(shuffled, reps=reps)}

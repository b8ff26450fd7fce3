"""Reference results a federated run is compared with in its report: popularity (computed
here, on the run's dataset), centrally trained models (read from `fedinterest
train-central` output) and other federated runs (e.g. the same setting without DP).

Same protocol as the run's federated evaluation: leave-last-out per user (validation =
second-to-last event, test = last), full ranking over the catalog, the user's earlier items
excluded, HR@10 and NDCG@10. Popularity counts every training event of every user
(central, non-private): an upper reference for what the DP popularity feature can carry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fedinterest.shared.errors import DataError, FedinterestError
from fedinterest.shared.metrics import RankingAccumulator
from fedinterest.shared.schema import Dataset
from fedinterest.shared.splits import leave_last_out

BATCH = 256  # users scored at once (a batch x catalog matrix)


def popularity(ds: Dataset, k: int = 10) -> dict:
    """{"name", "source", "val-hr@10", ..., "test-ndcg@10"} of most-popular-first."""
    split = leave_last_out(ds)
    n = len(ds.catalog)
    counts = np.bincount(ds.item[split.train], minlength=n).astype(np.float64)
    out = {"name": "popularity (central, non-private)",
           "source": f"computed on {ds.name}: training events of every user counted"}
    for name, targets in (("val", split.valid), ("test", split.test)):
        acc = RankingAccumulator(k)
        for s in range(0, len(targets), BATCH):
            batch = targets[s:s + BATCH]
            exclude = np.zeros((len(batch), n), bool)
            for j, t in enumerate(batch):
                start, end = split.history_end(ds, int(t))
                exclude[j, ds.item[start:end]] = True
            acc.add(np.broadcast_to(counts, (len(batch), n)), ds.item[batch], exclude,
                    track_coverage=False)
        res = acc.result()
        out.update({f"{name}-hr@{k}": res[f"hr@{k}"], f"{name}-ndcg@{k}": res[f"ndcg@{k}"]})
    return out


def central(path: str | Path) -> dict:
    """A reference's test metrics: a centrally trained model (`fedinterest train-central
    --out DIR`: DIR/metrics.json, or the file itself), or another federated run (a run
    directory with results.json, e.g. the same setting without DP)."""
    p = Path(path)
    if p.is_dir() and (p / "results.json").is_file():
        return _federated(p / "results.json")
    if p.is_dir():
        p = p / "metrics.json"
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedinterestError(f"{p}: not found; pass the --out folder of `fedinterest "
                               "train-central` or its metrics.json") from None
    except (OSError, ValueError) as e:
        raise DataError(str(p), None, None, f"not readable JSON ({e})") from None
    test, val = info.get("test"), info.get("validation")
    if not isinstance(test, dict) or "ndcg@10" not in test:
        raise DataError(str(p), None, "test", "expected train-central's metrics (test.ndcg@10)")
    out = {"name": f"{info.get('model', '?')} (central, non-private)",
           "source": f"{p} ({info.get('dataset', '?')}, {info.get('split', '?')}, "
                     f"seed {info.get('seed', '?')})"}
    for name, m in (("val", val or {}), ("test", test)):
        out.update({f"{name}-hr@10": m.get("hr@10"), f"{name}-ndcg@10": m.get("ndcg@10")})
    return out


def _federated(path: Path) -> dict:
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
        cfg, final = res["config"], res.get("final") or {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(str(path), None, None, f"not a run's results.json ({e})") from None
    privacy = "non-private" if cfg.get("dp") == "off" else f"DP {cfg.get('dp')}"
    out = {"name": f"{cfg.get('model', '?')} (federated, {privacy})",
           "source": f"{path} ({cfg.get('dataset', '?')}, {len(res.get('rounds') or [])} "
                     f"rounds, seed {cfg.get('seed', '?')})"}
    for name in ("val", "test"):
        out.update({f"{name}-hr@10": final.get(f"{name}-hr@10"),
                    f"{name}-ndcg@10": final.get(f"{name}-ndcg@10")})
    return out

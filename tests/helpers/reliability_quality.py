"""Quality under faults over many seeds: the measurement behind the quality tables in
docs/RELIABILITY.md. One seed decides nothing there (one run's validation NDCG@10 on a small
world moves by more than the 5% being tested), so this runs every arm for every seed and
compares each arm with the clean run of the same seed (paired).

    python -m tests.helpers.reliability_quality --devices 200 --per-round 20 --rounds 8 \\
        --seeds 0-19 --arms clean,crash30,drop10,attack,attack-oversampled --out runs.jsonl

Arms (the fault setups of tests/e2e/test_reliability.py, on a world of --devices devices):
  initial             the untrained model (no rounds): how much training moved quality
  clean               no faults
  crash30             30% of the sampled devices raise in every round
  drop10              10% of the sampled replies lost in every round, a seeded random choice
  attack              10% of the devices malicious (NaN, wrong shape, 1e6-scaled, replayed
                      updates in turn), every round they are sampled; all rejected
  attack-oversampled  the same attackers, but the server asks ceil(per_round / 0.9) devices
                      and averages what passes validation
Writes one JSON line per run to --out (appending; runs already there are not repeated) and
prints per arm: mean, the ratio of means to clean, the paired difference mean +- standard
error, a normal-approximation 95% interval for the ratio, and in how many seeds it was >=
clean. Runs single-threaded; about 3 s per run at 40 devices, 20-30 s at 200 (2 loaded cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from fedinterest.client import client_app as capp
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity

from tests.e2e import test_reliability as rel

ARMS = ("initial", "clean", "crash30", "drop10", "attack", "attack-oversampled")


def _grid(arm: str, seed: int, n: int, k: int) -> tuple[InProcessGrid, int]:
    """The grid for an arm and the number of devices the server asks per round."""
    if arm == "clean":
        return InProcessGrid(capp.app, rel._nodes(n)), k
    if arm in ("crash30", "drop10"):
        return rel.CrashingGrid(rel.crash_share(0.3 if arm == "crash30" else 0.1, seed), n), k
    attackers = rel.Attackers(rel._attackers(seed, 4, k, n))
    return InProcessGrid(attackers, rel._nodes(n)), (
        math.ceil(k / 0.9) if arm == "attack-oversampled" else k)


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def summarise(rows: list[dict]) -> list[str]:
    """One line per (world, arm): mean, ratio to clean, paired difference, interval."""
    lines = []
    worlds = sorted({(r["devices"], r["per_round"], r["rounds"]) for r in rows})
    for world in worlds:
        runs = {(r["arm"], r["seed"]): r["ndcg"] for r in rows
                if (r["devices"], r["per_round"], r["rounds"]) == world}
        lines.append(f"{world[0]} devices, {world[1]} per round, {world[2]} rounds:")
        for arm in ARMS:
            seeds = sorted(s for a, s in runs if a == arm and ("clean", s) in runs)
            if not seeds:
                continue
            f = np.array([runs[arm, s] for s in seeds])
            c = np.array([runs["clean", s] for s in seeds])
            sd = f"{f.std(ddof=1):.4f}" if len(seeds) > 1 else "-"
            line = f"  {arm:19s} {len(seeds):2d} seeds  mean {f.mean():.4f} (sd {sd})"
            if arm != "clean" and len(seeds) > 1:
                d = f - c
                se = d.std(ddof=1) / math.sqrt(len(seeds))
                lo, hi = (c.mean() + d.mean() - 1.96 * se) / c.mean(), (
                    c.mean() + d.mean() + 1.96 * se) / c.mean()
                line += (f"  ratio {f.mean() / c.mean():.3f} (95% {lo:.3f}-{hi:.3f})  paired "
                         f"diff {d.mean():+.4f} +- {se:.4f} (sd {d.std(ddof=1):.4f})  "
                         f">= clean in {(f >= c).sum()}/{len(seeds)}")
            lines.append(line)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=rel.N_USERS)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seeds", type=_seeds, default=list(range(20)), help="0-19 or 0,3,7")
    ap.add_argument("--arms", default="clean,crash30,attack",
                    help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        ap.error(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    torch.set_num_threads(1)
    n, k = args.devices, args.per_round
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] \
        if args.out.exists() else []
    done = {(r["devices"], r["per_round"], r["rounds"], r["arm"], r["seed"]) for r in rows}
    scratch = Path(tempfile.mkdtemp(prefix="reliability-quality-"))
    try:
        world = rel.make_world(scratch / "world", n)
        with server_task_identity(), open(args.out, "a") as out:
            for seed in args.seeds:
                for arm in arms:
                    if (n, k, args.rounds, arm, seed) in done:
                        continue
                    row = {"devices": n, "per_round": k, "rounds": args.rounds, "arm": arm,
                           "seed": seed}
                    if arm == "initial":
                        row |= {"asked": 0, "ndcg": rel._initial_val_ndcg(world, seed, n),
                                "accepted": []}
                    else:
                        grid, asked = _grid(arm, seed, n, k)
                        fed = rel._run(world, scratch / f"{arm}-{seed}", grid, seed=seed,
                                       rounds=args.rounds, clients_per_round=asked)
                        row |= {"asked": asked, "ndcg": rel._val_ndcg(fed),
                                "accepted": [r["accepted"] for r in fed.state.history]}
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    rows.append(row)
                    shutil.rmtree(scratch / f"{arm}-{seed}", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()

"""`fedinterest experiment privacy-utility`: one invocation, one dataset, every privacy regime.

Arms: popularity and a centralized non-private gru-text reference (simulations/central.py),
then federated runs through Flower's simulation engine (simulations/simulate.py): without DP,
event-level DP at each requested epsilon, user-level DP, and both. Each federated arm is a
full `simulate` run directory; this module only orchestrates and tabulates.

Event-level epsilon is a per-device *budget*: the noise multiplier is calibrated so that a
device with the median number of training segments can join its expected number of rounds
(rounds x clients_per_round / devices, rounded up) within the budget; devices with less data
(higher sampling rate) reach it sooner and then decline rounds, as they would in deployment.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from fedinterest.shared.atomic_io import write_json, write_text
from fedinterest.shared.config import RunConfig
from fedinterest.shared.noise_calibration import smallest_noise
from fedinterest.shared.privacy import EventLedger, user_level_epsilon
from fedinterest.shared.schema import Dataset
from fedinterest.shared.sequences import segment_bounds


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps_per_round: int,
                    rounds_joined: int, lo: float = 0.3, hi: float = 50.0) -> float:
    """Smallest noise multiplier (bisection, 1% precision) whose composed RDP epsilon over
    `rounds_joined` rounds of `steps_per_round` DP-SGD steps stays within `epsilon`."""
    def eps(nm: float) -> float:
        led = EventLedger(delta=delta)
        for r in range(rounds_joined):
            led.record(r, nm, sample_rate, steps_per_round)
        return led.epsilon()

    return smallest_noise(eps, epsilon, lo, hi, precision=1.01)


def calibrate_user_noise(epsilon: float, delta: float, n_devices: int, per_round: int,
                         rounds: int, lo: float = 0.3, hi: float = 100.0) -> float:
    """Smallest DP-FedAvg noise multiplier (bisection, 1% precision) with which `rounds` rounds
    of `per_round` of `n_devices` sampled devices stay within the user-level `epsilon`: so the
    user-level arm runs all its rounds instead of stopping at the budget."""
    def eps(nm: float) -> float:
        return user_level_epsilon(n_devices, per_round, nm, rounds, delta)

    try:
        return smallest_noise(eps, epsilon, lo, hi, precision=1.01)
    except ValueError:
        raise ValueError(f"user-level epsilon {epsilon} is out of reach in {rounds} rounds "
                         f"even with noise multiplier {hi}") from None


def device_plan(ds: Dataset, cfg: RunConfig) -> dict:
    """Median training segments per device and the resulting sampling rate and steps."""
    segs = []
    for _, sl in ds.user_slices():
        n_train = max(0, sl.stop - sl.start - cfg.holdout)
        segs.append(len(segment_bounds(n_train, cfg.segment_len)))
    median = max(1, int(np.median(segs)))
    q = min(1.0, cfg.batch_size / median)
    steps = max(1, math.ceil(cfg.local_epochs / q))
    joins = math.ceil(cfg.rounds * min(cfg.clients_per_round, len(segs)) / max(len(segs), 1))
    return {"median_segments": median, "sample_rate": q, "steps_per_round": steps,
            "expected_rounds_joined": max(1, joins), "devices": len(segs)}


def arms(base: RunConfig, epsilons: list[float], ds: Dataset) -> list[tuple[str, RunConfig]]:
    """The federated arms. Event-level noise is calibrated per budget (`calibrate_noise`), the
    user-level noise to `base.user_epsilon` over `base.rounds` (`calibrate_user_noise`)."""
    plan = device_plan(ds, base)
    out = [("federated, no DP", replace(base, dp="off"))]
    for e in epsilons:
        nm = calibrate_noise(e, base.delta, plan["sample_rate"], plan["steps_per_round"],
                             plan["expected_rounds_joined"])
        out.append((f"event-level DP, eps {e:g}",
                    replace(base, dp="event", device_epsilon=e, noise_multiplier=round(nm, 3))))
    unm = calibrate_user_noise(base.user_epsilon, base.delta, plan["devices"],
                               min(base.clients_per_round, plan["devices"]), base.rounds)
    unm = round(unm * 1.001, 3)  # rounded up: never below the calibrated value
    out.append((f"user-level DP, eps {base.user_epsilon:g}",
                replace(base, dp="user", user_noise_multiplier=unm)))
    nm = calibrate_noise(max(epsilons), base.delta, plan["sample_rate"],
                         plan["steps_per_round"], plan["expected_rounds_joined"])
    out.append((f"both (event eps {max(epsilons):g}, user eps {base.user_epsilon:g})",
                replace(base, dp="both", device_epsilon=max(epsilons),
                        noise_multiplier=round(nm, 3), user_noise_multiplier=unm)))
    return out


def privacy_utility(ds: Dataset, base: RunConfig, out_dir: Path, epsilons: list[float],
                    central_epochs: int = 40, quiet: bool = False,
                    popularity_from: Path | None = None, engine: str = "ray",
                    encoder=None) -> dict:
    """Every arm; the federated arms share one DP popularity release (the first arm's, or
    `popularity_from`'s), so they differ only in their privacy regime and the users' counts
    are released once, not once per arm. `engine` and `encoder` as in `simulate.run`."""
    from fedinterest.shared.embedding_cache import EmbeddingCache
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations import central
    from fedinterest.simulations.simulate import run as simulate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = encoder or TextEncoder(cache=EmbeddingCache())
    rows = []
    tcfg = central.TrainConfig(seed=base.seed, epochs=central_epochs, progress=not quiet)
    central_arms = (("pop", "popularity"), ("gru-text", "centralized gru-text, no DP"))
    for name, label in central_arms if central_epochs > 0 else ():  # 0: federated arms only
        t0 = time.time()
        m = central.run(ds, name, out_dir / f"central-{name}", encoder, "loo", tcfg,
                        hidden=base.hidden if name == "gru-text" else None,
                        segment_len=base.segment_len if name == "gru-text" else None,
                        n_negatives=base.n_negatives if name == "gru-text" else None,
                        context_len=base.segment_len if name == "gru-text" else None)
        rows.append({"arm": label, "event_epsilon": None, "user_epsilon": None,
                     "test_hr@10": m["test"]["hr@10"], "test_ndcg@10": m["test"]["ndcg@10"],
                     "valid_ndcg@10": m["validation"]["ndcg@10"],
                     "seconds": time.time() - t0, "peak_rss_mb": m["peak_memory_mb"],
                     "bytes_up_per_client_round": None, "run_dir": str(out_dir /
                                                                        f"central-{name}")})
    for i, (label, cfg) in enumerate(arms(base, epsilons, ds)):
        cfg = replace(cfg, out_dir=str(out_dir / f"fed-{i}-{cfg.dp}"))
        t0 = time.time()
        res = simulate(cfg, ds, encoder=encoder, quiet=quiet, popularity_from=popularity_from,
                       engine=engine)
        if popularity_from is None and res["privacy"]["popularity_release"]:
            popularity_from = Path(cfg.out_dir)
        last = res["rounds"][-1] if res["rounds"] else {}
        fin = res.get("final", {})
        eps_dev = res["privacy"]["event_level"]["per_device_epsilon"]
        rows.append({
            "arm": label, "event_epsilon": max(eps_dev.values()) if cfg.event_dp and eps_dev
            else None,
            "user_epsilon": last.get("user_epsilon"),
            "noise_multiplier": cfg.noise_multiplier if cfg.event_dp else None,
            "test_hr@10": fin.get("test-hr@10"), "test_ndcg@10": fin.get("test-ndcg@10"),
            "valid_ndcg@10": fin.get("val-ndcg@10"), "rounds_run": len(res["rounds"]),
            "seconds": time.time() - t0, "peak_rss_mb": res.get("peak_rss_mb"),
            "bytes_up_per_client_round": float(np.mean([r["bytes_up_per_client"]
                                                        for r in res["rounds"]]))
            if res["rounds"] else None,
            "run_dir": cfg.out_dir})
    central_ndcg = next((r["test_ndcg@10"] for r in rows if r["arm"].startswith("centralized")),
                        None)
    for r in rows:
        r["ndcg_vs_central"] = (r["test_ndcg@10"] / central_ndcg
                                if r["test_ndcg@10"] is not None and central_ndcg else None)
    result = {"dataset": ds.name, "config": base.to_dict(), "epsilons": epsilons,
              "plan": device_plan(ds, base), "rows": rows,
              "protocol": "leave-last-out, full ranking over the catalog, seen items excluded"}
    write_json(out_dir / "privacy_utility.json", result)
    write_text(out_dir / "privacy_utility.md", table_markdown(result))
    plot(result, out_dir / "privacy_utility.png")
    return result


def table_markdown(result: dict) -> str:
    def f(v, d=4):
        return "-" if v is None else f"{v:.{d}f}"

    lines = [f"Dataset {result['dataset']}; protocol: {result['protocol']}.", "",
             ("| arm | event eps (max device) | user eps | test HR@10 | test NDCG@10 | "
             "vs central | wall s | peak RSS MB | bytes up/client/round |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {f(r['event_epsilon'], 2)} | {f(r['user_epsilon'], 2)} | "
                     f"{f(r['test_hr@10'])} | {f(r['test_ndcg@10'])} | "
                     f"{f(r['ndcg_vs_central'], 2)} | {r['seconds']:.0f} | "
                     f"{f(r['peak_rss_mb'], 0)} | {f(r['bytes_up_per_client_round'], 0)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = result["rows"]
    for r in rows:
        if r["test_ndcg@10"] is None:
            continue
        if r["event_epsilon"] is None and r["user_epsilon"] is None:
            ax.axhline(r["test_ndcg@10"], ls="--", lw=1, label=r["arm"],
                       color={"popularity": "grey"}.get(r["arm"]))
    pts = [r for r in rows if r["event_epsilon"] is not None and r["user_epsilon"] is None]
    if pts:
        ax.plot([r["event_epsilon"] for r in pts], [r["test_ndcg@10"] for r in pts], "o-",
                label="event-level DP (per-device epsilon)")
    usr = [r for r in rows if r["user_epsilon"] is not None]
    for r in usr:
        ax.plot([r["user_epsilon"]], [r["test_ndcg@10"]], "s", label=f"{r['arm']} (user eps)")
    ax.set_xlabel("epsilon (delta = {:g})".format(result["config"]["delta"]))
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"privacy vs utility on {result['dataset']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

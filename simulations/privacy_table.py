"""The privacy-utility table's cells (docs/RESULTS.md, issue 15): for a privacy mode and a
per-device epsilon, the `fedinterest simulate` / `train-central` flags of that cell.

Every federated cell is the default run (`fedinterest simulate`: the synthetic world, 24
rounds of 10 devices, the popularity count) with only its mode and noise changed. Epsilon E is
per device at delta 1e-5 and covers both the popularity count and training, composed in RDP:
- the count keeps the default's share: popularity noise 2.0 x 8 / E (2.0 at E = 8);
- the training noise is the smallest with which a device that joins 2 rounds (the default's
  allowance: 300 devices x 2 cover the 240 contributions) stays within E with its count.
Distributed modes enforce E in the device's ledger (shared/distributed_dp_accounting.py,
`calibrate_noise`). On-device DP-SGD (`event`) charges the count at the user unit only, so
its event budget (`--device-epsilon`) is set to the training's share and the composed total
is computed here (`event_total`). Epsilon infinity is the same recipe without DP: noise
1e-3 (the config requires noise > 0) with an unreachable budget for the distributed modes, and
`--dp off` for on-device training (DP-SGD without clipping or noise is the same local SGD),
and for central DP-SGD epsilon 1e6 (Opacus calibrates noise 0.003: the same clipped recipe).
Central DP-SGD is `train-central --dp-epsilon E` (Opacus calibrates its own noise).

    python -m fedinterest.simulations.privacy_table ddp-event 4 --out runs/t-ddp-event-4
prints the command of one cell;
    python -m fedinterest.simulations.privacy_table table runs/table
tabulates the cells run into runs/table/MODE-E (results.json, or metrics.json for central).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp_accounting import calibrate_noise
from fedinterest.shared.distributed_dp_count import count_params
from fedinterest.shared.model import ModelConfig, build_model, weight_schema
from fedinterest.shared.noise_calibration import smallest_noise
from fedinterest.shared.privacy import EVENT, DeviceLedger, dp_sgd_event, skellam_count_event

MODES = ("event", "ddp-event", "ddp-user", "central")
ROUNDS_JOINED = 2  # the default run's allowance per device (docs/PRIVACY.md)
NO_DP_NOISE = 1e-3  # "infinity": the config requires noise > 0
NO_DP_BUDGET = 1e12
CENTRAL_NO_DP = 1e6  # Opacus calibrates noise 0.003 for it: the DP-SGD recipe, noise negligible


def popularity_noise(epsilon: float) -> float:
    """The count's noise at budget `epsilon`: the default's (at 8) scaled by 8 / epsilon."""
    return round(RunConfig().popularity_noise * 8.0 / epsilon, 4)


def trained_dim(cfg: RunConfig) -> int:
    """Coordinates a distributed-DP round sends under `cfg` (the text prior's trained ones;
    independent of the catalog's size)."""
    from fedinterest.shared.distributed_dp import trained_index
    from fedinterest.shared.fed_model import POP_DIM

    mcfg = ModelConfig(kind="gru", item_repr="text", n_items=4, item_feat_dim=4 + POP_DIM,
                       text_dim=4, hidden=4, n_topics=2, segment_len=4, context_len=4,
                       n_negatives=2, neg_sampling="pop", text_prior=cfg.text_prior,
                       prior_rank=cfg.prior_rank)
    return len(trained_index(cfg, weight_schema(build_model(mcfg))))


def event_total(cfg: RunConfig, rounds: int = ROUNDS_JOINED) -> tuple[float, float]:
    """On-device DP-SGD: (training-only epsilon, training composed with the count at the
    event unit) of a device that joins `rounds` rounds."""
    led = DeviceLedger(delta=cfg.delta)
    led.charge(EVENT, dp_sgd_event(cfg.noise_multiplier, cfg.dp_sample_rate,
                                   cfg.dp_steps * rounds), "dp-sgd", 0)
    training = led.epsilon(EVENT)
    # the devices' Skellam count at the event unit: replace-one (any change of one segment
    # can change the device's whole vector)
    led.charge(EVENT, skellam_count_event(count_params(cfg, replace=True)), "count", 0)
    return training, led.epsilon(EVENT)


def _calibrate_event(cfg: RunConfig, epsilon: float) -> float:
    nm = smallest_noise(lambda z: event_total(dataclasses.replace(cfg, noise_multiplier=z))[1],
                        epsilon)
    return math.ceil(nm * 1000) / 1000  # rounded up: rounding down could pass the budget


def cell_flags(mode: str, epsilon: float) -> list[str]:
    """The flags of one cell (after `fedinterest simulate` or `train-central`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    finite = math.isfinite(epsilon)
    if mode == "central":
        base = ["--data", "synthetic", "--model", "gru-text"]
        return base + ["--dp-epsilon", f"{epsilon:g}" if finite else f"{CENTRAL_NO_DP:g}"]
    if not finite:
        if mode == "event":
            return ["--dp", "off", "--text-prior", "0"]
        noise = "--noise-multiplier" if mode == "ddp-event" else "--user-noise-multiplier"
        budget = "--device-epsilon" if mode == "ddp-event" else "--user-epsilon"
        return ["--dp", mode, noise, f"{NO_DP_NOISE:g}", budget, f"{NO_DP_BUDGET:g}",
                "--popularity-noise", f"{NO_DP_NOISE:g}"]
    cfg = dataclasses.replace(RunConfig(), dp=mode, popularity_noise=popularity_noise(epsilon))
    pop = ["--popularity-noise", f"{cfg.popularity_noise:g}"]
    if mode == "event":
        nm = _calibrate_event(cfg, epsilon)
        training, _ = event_total(dataclasses.replace(cfg, noise_multiplier=nm))
        return ["--dp", "event", "--noise-multiplier", f"{nm:g}",
                "--device-epsilon", f"{math.ceil(training * 1000) / 1000:g}", *pop]
    nm = calibrate_noise(cfg, trained_dim(cfg), epsilon, ROUNDS_JOINED)
    if mode == "ddp-event":
        return ["--dp", mode, "--noise-multiplier", f"{nm:g}",
                "--device-epsilon", f"{epsilon:g}", *pop]
    return ["--dp", mode, "--user-noise-multiplier", f"{nm:g}", "--user-epsilon",
            f"{epsilon:g}", *pop]


EPSILONS = ("1", "2", "4", "8", "inf")


def cell_numbers(run_dir: Path, mode: str) -> dict | None:
    """Test / validation NDCG@10 and HR@10 of one cell's run, the largest per-device epsilon it
    spent (with the count; central: Opacus' epsilon), its participation and wall time."""
    if mode == "central":
        path = run_dir / "metrics.json"
        if not path.exists():
            return None
        m = json.loads(path.read_text())
        return {"test": m["test"]["ndcg@10"], "val": m["validation"]["ndcg@10"],
                "hr": m["test"]["hr@10"], "epsilon": m.get("epsilon"),
                "selected_test": m["test"]["ndcg@10"], "selected_val": m["validation"]["ndcg@10"],
                "selected_round": "best epoch",
                "wall": m.get("train_seconds") or m.get("timings", {}).get("train_seconds")}
    path = run_dir / "results.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    final, priv = r["final"], r["privacy"]
    if mode.startswith("ddp"):
        per = (priv.get("distributed") or {}).get("per_device_epsilon") or {}
        eps = max(per.values(), default=None)
    elif priv["event_level"]["enabled"]:
        cfg = RunConfig.from_mapping(r["config"], source=str(path))
        training = max(priv["event_level"]["per_device_epsilon"].values(), default=0.0)
        rounds = next(n for n in range(1, cfg.rounds + 1)
                      if event_total(cfg, n)[0] >= training - 1e-9)
        eps = event_total(cfg, rounds)[1]  # the most exposed device with the count
    else:
        eps = None
    evaluated = [(0, r["initial"])] if r.get("initial") else []
    evaluated += [(x["round"], x["metrics"]) for x in r["rounds"] if x.get("metrics")]
    best_round, best = max(evaluated, key=lambda rm: (rm[1]["val-ndcg@10"], rm[0]))
    return {"test": final["test-ndcg@10"], "val": final["val-ndcg@10"],
            "hr": final["test-hr@10"], "epsilon": eps, "selected_round": best_round,
            "selected_test": best["test-ndcg@10"], "selected_val": best["val-ndcg@10"],
            "accepted": sum(x["accepted"] for x in r["rounds"]),
            "sampled": sum(x["sampled"] for x in r["rounds"]),
            "wall": r.get("timings", {}).get("total_seconds")}


def table(root: Path) -> str:
    """The markdown table of test NDCG@10 per mode and epsilon (at the evaluation with the best
    validation NDCG@10 / at the last round; central: the best validation epoch), then one line
    per cell."""
    head = "| mode | " + " | ".join(f"eps {e}" for e in EPSILONS) + " |"
    rows, details = [head, "| --- " * (len(EPSILONS) + 1) + "|"], []
    for mode in MODES:
        cells = []
        for e in EPSILONS:
            got = cell_numbers(root / f"{mode}-{e}", mode)
            cells.append("not run" if got is None else
                         f"{got['selected_test']:.4f} / {got['test']:.4f}")
            if got is not None:
                details.append(f"| {mode} | {e} | {got['test']:.4f} | {got['val']:.4f} | "
                               f"{got['selected_test']:.4f} ({got['selected_round']}) | "
                               f"{got['hr']:.3f} | " + (f"{got['epsilon']:.3f}" if
                                                        got['epsilon'] is not None else "-")
                               + " | " + (f"{got['accepted']}/{got['sampled']}"
                                          if "accepted" in got else "-")
                               + " | " + (f"{got['wall']:.0f}" if got.get("wall") else "-")
                               + " |")
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    detail_head = ("| mode | epsilon | test NDCG@10 (last round) | val NDCG@10 (last round) | "
                   "test NDCG@10 at the best validation (round) | test HR@10 (last round) | "
                   "largest device epsilon spent | accepted/sampled | seconds |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    return "\n".join(rows) + "\n\n" + detail_head + "\n" + "\n".join(details)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        print(table(Path(argv[1] if len(argv) > 1 else "runs/table")))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("epsilon", type=float, help="per-device epsilon (inf: without DP)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    flags = cell_flags(a.mode, a.epsilon)
    if a.mode == "central":
        cmd = ["fedinterest", "train-central", *flags, "--seed", str(a.seed), "--out", a.out,
               "--threads", "1", "--no-progress"]
    else:
        cmd = ["fedinterest", "simulate", *flags, "--seed", str(a.seed), "--out", a.out,
               "--quiet"]
    print(" ".join(cmd))


if __name__ == "__main__":
    main()

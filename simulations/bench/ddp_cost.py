"""What distributed DP costs per round: CPU of a distributed-DP round against the same SecAgg+
round without DP, side by side in one run (issue 15 target: <= 1.5x).

Both arms are in-process runs (the real ServerApp loop and ClientApp over `InProcessGrid`) of
the same prepared world, cohort, model and payload: every sampled device sends its trained
coordinates (`ddp_train_only`) as integers under hardened SecAgg+, and the server decodes the
sum and steps its optimizer the same way. Only the device's work differs:
- "ddp": the default event-level round (client/ddp_mod.py): policy review, ledger check and
  encrypted write, per-segment gradients each clipped, conditional randomised rounding, a
  Skellam noise share;
- "secagg, no DP": one batched gradient of all the device's segments at the global weights
  (no per-example clipping), scaled by the same gamma and plainly rounded, no noise, no ledger
  (`plain_train_reply`, patched in for that arm only).
The measure is the process CPU per train round (rounds 2..R; round 1 warms caches), which a
busy machine inflates less than wall time; arms alternate (A B A B) on fresh copies of the
device stores.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fedinterest.simulations.bench.common import BenchResult, median, verdict

TARGET = 1.5  # the distributed-DP round costs at most this many plain SecAgg+ rounds


def plain_train_reply(msg, device, cfg, server_round: int, seed: int):
    """The no-DP twin of ddp_mod.train_reply: the same payload (the trained coordinates of the
    summed gradient, scaled by gamma, as integers mod Q) without clipping, noise or ledger."""
    from fedinterest.client import ddp_mod, secure_payload
    from fedinterest.client.dp_training import build_local_model
    from fedinterest.shared.distributed_dp import (
        encode_payload,
        flatten,
        params_from_config,
        trained_names,
    )
    from fedinterest.shared.fed_model import catalog_inputs, federated_model_config
    from fedinterest.shared.model import weight_schema
    from fedinterest.shared.sequences import collate

    mcfg = federated_model_config(cfg, device.catalog)
    data = ddp_mod._training_data(device, cfg, mcfg, seed)
    feats, topics, _ = catalog_inputs(device.catalog)
    weights = [np.asarray(w) for w in ddp_mod._global_weights(msg)]
    model = build_local_model(mcfg, weights, feats, topics if mcfg.n_topics else None,
                              data.neg_probs if data is not None else None, dp=False).train()
    schema = weight_schema(model)
    params = params_from_config(cfg, schema)
    trained = set(trained_names(cfg, schema))
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in trained)
    grads = np.zeros(params.dim)
    if data is not None and len(data):
        loss, _ = model.example_losses(collate([data[i] for i in range(len(data))]))
        loss.sum().backward()
        grads = flatten([named[n].grad.detach().double().numpy() if named[n].grad is not None
                         else np.zeros(s) for n, s, _ in schema if n in trained])
    integers = np.rint(grads * params.scale).astype(np.int64)
    return secure_payload.legacy_reply(msg, encode_payload(integers, [(params.dim,)]),
                                       {"refused": 0.0}, 1.0)


@contextmanager
def without_dp():
    """ddp_mod.train_reply replaced by `plain_train_reply` inside the block."""
    from fedinterest.client import ddp_mod

    saved = ddp_mod.train_reply
    ddp_mod.train_reply = plain_train_reply
    try:
        yield
    finally:
        ddp_mod.train_reply = saved


def _round_cpu(cfg, plain: bool) -> list[float]:
    """CPU seconds of each train round 2..R-1 of one in-process run on fresh device stores
    (round 1 warms caches up; round R also evaluates every device)."""
    from fedinterest.client.client_app import app as client_app
    from fedinterest.simulations.bench.client_round import _fresh_copy
    from fedinterest.simulations.inprocess_grid import run_in_process

    run_cfg, info, _ = _fresh_copy(cfg, reuse=True)
    marks: list[tuple[float, int]] = []

    def on_round(rec) -> None:
        marks.append((time.process_time(), rec.accepted))

    start = time.process_time()
    if plain:
        with without_dp():
            run_in_process(run_cfg, Path(info["catalog_path"]), Path(info["devices_dir"]),
                           int(info["n_devices"]), client_app, on_round=on_round)
    else:
        run_in_process(run_cfg, Path(info["catalog_path"]), Path(info["devices_dir"]),
                       int(info["n_devices"]), client_app, on_round=on_round)
    if len(marks) < 3 or any(a == 0 for _, a in marks):
        raise RuntimeError(f"bench ddp-cost: a round released nothing ({marks}); need "
                           "rounds >= 3 that all release")
    cpu = [marks[0][0] - start] + [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    return cpu[1:-1]


def run(cfg, reps: int = 2, command: str = "") -> BenchResult:
    """Median CPU per train round of the distributed-DP arm and the no-DP SecAgg+ arm, `reps`
    runs each, alternated; ratio ddp / no-DP against TARGET."""
    if not cfg.distributed_dp:
        raise ValueError("bench ddp-cost measures a distributed-DP run (dp = ddp-event)")
    cfg = cfg.replace(popularity=False, eval_initial=False, eval_every=0)
    result = BenchResult(  # created first: it records the load average at the start
        "ddp-round-cost", f"CPU per train round, in process (server + {cfg.clients_per_round} "
        f"devices, {cfg.dataset}, {cfg.dp} over the {cfg.ddp_train_only or 'all'} coordinates, "
        f"rounds 2-{cfg.rounds - 1} x {reps} runs per arm): "
        "distributed DP vs the same SecAgg+ round without DP", command, "", "")
    per: dict[str, list[float]] = {"ddp": [], "secagg, no DP": []}
    for _ in range(reps):
        per["ddp"] += _round_cpu(cfg, plain=False)
        per["secagg, no DP"] += _round_cpu(cfg, plain=True)
    ddp, plain = median(per["ddp"]), median(per["secagg, no DP"])
    result.summary = (f"ddp {ddp:.2f} s, SecAgg+ without DP {plain:.2f} s CPU per round "
                      f"(n={len(per['ddp'])}/{len(per['secagg, no DP'])})")
    result.ratio = verdict(ddp / plain, TARGET, higher_is_better=False)
    result.data = {"cpu_seconds_per_round": per, "median": {"ddp": ddp, "plain": plain},
                   "ddp_over_plain": ddp / plain, "target": TARGET, "rounds": cfg.rounds,
                   "reps": reps}
    return result.finish()

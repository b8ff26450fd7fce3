"""results.json: what a federated run did, built from the server's state alone, so the same
file comes out of `fedinterest simulate` and of `flwr run .` (the simulation runner adds
dataset statistics and timings it alone knows)."""

from __future__ import annotations

import resource
from pathlib import Path

from fedinterest.shared.atomic_io import write_json
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import ddp_budget
from fedinterest.shared.privacy import EVENT_RELATION, EVENT_UNIT

from .federation import Federation

PROTOCOL = ("leave-last-out on each device, full catalog ranking, seen items excluded, "
            "metrics summed over devices (federated evaluation: each device keeps its own "
            "report, which the simulation runner reads from the stores it provisioned; the "
            "server receives no metric)")


def build_results(fed: Federation, cfg: RunConfig, n_devices: int) -> dict:
    hist = fed.state.history
    return {
        "config": cfg.to_dict(),
        "protocol": PROTOCOL,
        "rounds": hist,
        "final": hist[-1]["metrics"] if hist else {},
        # the untrained model's evaluation before round 1 (None: not evaluated, or resumed)
        "initial": fed.initial_metrics,
        "privacy": {
            "event_level": {"enabled": cfg.event_dp, "unit": EVENT_UNIT,
                            "relation": EVENT_RELATION,
                            "noise_multiplier": cfg.noise_multiplier,
                            "clip": cfg.max_grad_norm, "delta": cfg.delta,
                            "sample_rate": cfg.dp_sample_rate, "steps_per_round": cfg.dp_steps,
                            "budget": cfg.device_epsilon,
                            # the server's count of rounds received; a device that trained in
                            # a round whose reply was lost spent more (its ledger says)
                            "per_device_epsilon": fed.state.device_epsilon},
            "user_level": ({**fed.privacy_statement(n_devices),
                            "epsilon": hist[-1]["user_epsilon"] if hist else 0.0}
                           if cfg.user_dp else None),
            "popularity_release": _popularity_statement(fed.popularity_release),
            "distributed": ({**fed.ddp.statement(), "budget": ddp_budget(cfg),
                "per_device_epsilon": fed.state.device_epsilon,
                # the most exposed device: its rounds composed with the count if counted
                "epsilon_max": max(fed.state.device_epsilon.values(), default=0.0),
                "rounds_joined": fed.state.device_rounds,
                "epsilon_if_joined_every_round": hist[-1]["ddp_epsilon"] if hist else 0.0}
                if fed.ddp else None),
        },
        # the catalog version the model was trained against (client/model_install.py)
        "catalog": {"version": fed.extra_config.get("catalog-version")},
        "rejections": [r.__dict__ for r in fed.validator.rejections],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": fed.versions,
        "seed": cfg.seed,
    }


def _popularity_statement(release: dict | None) -> dict | None:
    """The release's privacy statement; a release copied from another run says which (its
    spend is that run's, not a second one)."""
    statement = (release or {}).get("statement")
    if statement and release.get("reused_from"):
        statement = {**statement, "reused_from": release["reused_from"]}
    return statement


def write_results(run_dir: Path, results: dict) -> Path:
    path = Path(run_dir) / "results.json"
    write_json(path, results)
    return path

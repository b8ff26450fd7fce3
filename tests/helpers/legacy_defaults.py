"""The run settings the tests of other mechanisms were written for, before issue 15 made
event-level distributed DP over the text prior the default of `fedinterest simulate`
(shared/config.py). Those tests pin them, so a change of default does not change what they
test; tests/privacy/test_default_run.py tests the default itself. popularity_cohort was 150;
since the devices noise the count in every mode (shared/distributed_dp_count.py), a count
cohort is one SecAgg+ neighbourhood (at most 31 devices) that releases only with m =
ceil(ddp_min_fraction x popularity_cohort) contributors: 3 (m = 3) lets the tests' worlds of
5-10 devices count."""

from __future__ import annotations

from typing import Any

from fedinterest.shared.config import RunConfig

PRE_DDP_DEFAULTS: dict[str, Any] = {
    "dataset": "synthetic", "rounds": 5, "clients_per_round": 50, "dp": "event",
    "noise_multiplier": 0.8, "max_grad_norm": 1.0, "text_prior": 0, "prior_rank": 0,
    "ddp_sample_rate": 0.1, "ddp_server_lr": 0.01, "ddp_train_only": "",
    "popularity_devices": 150, "popularity_cohort": 3, "eval_every": 1,
    "eval_initial": False,
}


def legacy_config(**kw: Any) -> RunConfig:
    """RunConfig with the pre-issue-15 defaults, overridden by `kw`."""
    return RunConfig(**{**PRE_DDP_DEFAULTS, **kw})

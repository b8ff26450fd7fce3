"""The DP popularity count as a federated step, before round 1.

The server sends every device a count query; each device computes its bounded 0/1 item
vector on the device (`shared.secure_protocol.contribution`) and uploads it only inside a
hardened SecAgg+ round, so the server learns the sum and nothing else (a 0/1 vector in the
clear would tell the server every item the user touched; the device refuses that).

Who adds the noise, in every dp mode: every device adds its Skellam share before masking
(shared/distributed_dp_count.py, client/popularity_count.py), a cohort with fewer than m
contributors releases nothing, and the server publishes the unmasked noisy sum as it is
(`release_noisy_sum`: post-processing only), so the count's epsilon holds against the
server. The server draws no noise. The catalog with the counts is published as a new version; train and evaluate rounds
announce it, and devices check it when they load the catalog.

The count is released once per run: its record in the run directory is reused on resume, so
a restart never spends the privacy budget twice.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from fedinterest.shared.atomic_io import read_json, write_json
from fedinterest.shared.config import RunConfig
from fedinterest.shared.distributed_dp import DDP_QUANTISATION, decode_sum
from fedinterest.shared.distributed_dp_count import (
    MAX_COHORT,
    count_min_contributions,
    count_params,
    plausible_sum,
)
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.secure_protocol import (
    MAX_WEIGHT_KEY,
    POPULARITY_STAGE,
    STAGE_KEY,
    count_schema,
)
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.serverapp import Grid

from .popularity import release_noisy_sum
from .secure_round import MIN_DEVICES, TIMEOUT, secure_mean

log = logging.getLogger("fedinterest.server")

RECORD_NAME = "popularity-release.json"
AGGREGATION = ("hardened SecAgg+ (AES-256-CTR masks, strict-majority threshold): the "
                   "server saw only the sum of the devices' noisy integer vectors, each noised "
                   "by its device before masking")


def federated_popularity(grid: Grid, nodes: list[int], cfg: RunConfig, catalog_path: Path,
                         round_config: dict, run_dir: Path, timeout: float = TIMEOUT,
                         population: int | None = None) -> dict:
    """Count and publish (the devices add the noise). Returns {"catalog_path",
    "catalog_version", "statement"}; the statement is None when nothing was released (the
    catalog then keeps zeros).

    `round_config` is the config devices need to open their store and the current catalog
    (what every round sends). `population`: when `nodes` is a sample of a larger federation, the noised counts are
    scaled by population / contributors (post-processing: no privacy cost) so they estimate
    the whole federation's counts.
    """
    record_path = Path(run_dir) / RECORD_NAME
    if record_path.exists():  # released already (a resumed run): never count twice
        return _reusable(read_json(record_path), cfg, record_path)
    catalog = PublishedCatalog.load(catalog_path)
    config = {**round_config, STAGE_KEY: POPULARITY_STAGE,
              MAX_WEIGHT_KEY: float(DDP_QUANTISATION.max_weight)}
    # Nothing of the model travels: one placeholder element (SecAgg+ needs an array record).
    ins = FitIns(ndarrays_to_parameters([np.zeros(1, np.float32)]), config)
    summed, contributors, seconds, shares = None, 0, 0.0, []
    for cohort in ddp_cohorts(nodes, cfg):
        outcome = secure_mean(grid, dict.fromkeys(cohort, ins), 0, DDP_QUANTISATION,
                              count_schema(len(catalog)), frozenset(), timeout)
        seconds += outcome.seconds
        part = _noisy_sum_or_none(outcome, cfg)
        if part is None:
            log.error("popularity count: a cohort of %d devices released nothing (%d "
                      "contributed)", len(cohort), len(outcome.contributors))
            continue
        summed = part if summed is None else summed + part
        contributors += len(outcome.contributors)
        shares.append({"devices": len(cohort), "summed": len(outcome.contributors),
                       "num_shares": outcome.num_shares, "threshold": outcome.threshold})
    released = {"catalog_path": str(catalog_path), "catalog_version": catalog.version,
                "statement": None, "queried": len(nodes), "contributors": contributors,
                "seconds": seconds}
    if summed is None:
        log.error("popularity count: nothing released (%d of %d devices contributed); the "
                  "catalog keeps zero counts", contributors, len(nodes))
    else:
        counts, statement = release_noisy_sum(summed, cfg)
        if population and population > contributors:
            scale = population / contributors
            counts = (counts * scale).astype(np.float32)
            statement["scaled_to_population"] = {"population": population, "factor": scale}
        how = AGGREGATION
        statement.update({"aggregation": how if len(shares) == 1 else
                          f"{how}; in {len(shares)} SecAgg+ cohorts of at most "
                          f"{max(c['devices'] for c in shares)} devices, so the server saw "
                          "each cohort's sum", "devices_queried": len(nodes),
                          "devices_summed": contributors, "cohorts": shares,
                          "num_shares": max(c["num_shares"] for c in shares),
                          "threshold": min(c["threshold"] for c in shares)})
        published = dataclasses.replace(catalog, popularity=counts)
        path = published.save(Path(catalog_path).parent)
        released.update(catalog_path=str(path), catalog_version=published.version,
                        statement=statement)
    write_json(record_path, released)
    return released


def _reusable(record: dict, cfg: RunConfig, path: Path) -> dict:
    """A kept release, unless its counts were noised by the server (a release of a run from
    before the count's noise moved to the devices, copied with `popularity_from` or resumed):
    its epsilon does not hold against the server, and this run states that the devices added
    the noise. Refused in every mode."""
    stmt = record.get("statement")
    if stmt is not None and "noise_added_by" not in stmt:
        raise ConfigError(f"popularity_from / resume: {path} is a count the server noised "
                          f"({stmt.get('mechanism')}); a run (dp = {cfg.dp}) publishes only "
                          "counts whose noise the devices added. Count again (a new run "
                          "directory, without popularity_from).")
    return record


def ddp_cohorts(nodes: list[int], cfg: RunConfig) -> list[list[int]]:
    """Cohorts of the count: near-equal groups of at least `popularity_cohort`
    devices where there are that many (each must reach m = count_min_contributions), and of
    at most MAX_COHORT (one SecAgg+ neighbourhood, so each device counts the active devices
    it unmasks exactly). Fewer devices than `popularity_cohort` make one cohort. Why cohorts:
    one SecAgg+ round over all 610 ml-latest-small devices took 441-565 s on the simulation
    engine; and a failed round loses only its cohort. The price: the server learns each
    cohort's noisy sum, not only the total (each carries the count's full noise)."""
    if not 1 <= cfg.popularity_cohort <= MAX_COHORT:
        raise ConfigError(f"popularity_cohort: a count cohort is one SecAgg+ "
                          f"neighbourhood of at most {MAX_COHORT} devices (client/ddp_mod.py "
                          f"counts the devices it unmasks); got {cfg.popularity_cohort}")
    k = max(1, len(nodes) // cfg.popularity_cohort, -(-len(nodes) // MAX_COHORT))
    while k > 1 and len(nodes) // k < MIN_DEVICES:  # Flower's SecAgg+ needs 3 per round
        k -= 1
    return [list(c) for c in np.array_split(np.asarray(nodes, dtype=object), k)]


def _noisy_sum_or_none(outcome, cfg: RunConfig) -> np.ndarray | None:
    """A cohort's noisy integer sum, or None: fewer than m contributors (their
    shares carry less noise than the count is accounted for: dropped, and the honest devices
    refused to unmask it anyway), or a sum no honest cohort produces."""
    if outcome.mean is None:
        return None
    n, m = len(outcome.contributors), count_min_contributions(cfg)
    if n < m:
        log.error("popularity count: %d contributions < m = %d; the cohort's sum is dropped",
                  n, m)
        return None
    total = decode_sum(outcome.mean, n)
    if not plausible_sum(total, n, count_params(cfg)):
        log.error("popularity count: the unmasked sum is not a sum of %d noisy bounded 0/1 "
                  "vectors (range %d..%d); refused", n, total.min(), total.max())
        return None
    return total

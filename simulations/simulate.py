"""`fedinterest simulate`: one federated run over a whole dataset on Flower's simulation engine.

Steps: load the dataset; the server embeds the public catalog and publishes it (without
popularity counts); every user becomes a device with its own encrypted store holding only
that user's history (private text embedded at import); then Flower runs the ServerApp and one
ClientApp node per user. The ServerApp first counts item popularity under SecAgg+ on the
devices and publishes the noised counts as a new catalog version (server/popularity_round.py);
the runner never sees a user's items. results.json and report.html go to the run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fedinterest.client.device import Device
from fedinterest.client.device_identity import provision_identity
from fedinterest.client.policy import PrivacyPolicy
from fedinterest.server.federation import RoundRecord
from fedinterest.server.results import build_results, write_results
from fedinterest.server.server_app import make_server_app
from fedinterest.shared.atomic_io import read_json, write_json
from fedinterest.shared.config import RunConfig
from fedinterest.shared.embedding_cache import EmbeddingCache
from fedinterest.shared.encoder import TextEncoder, catalog_vectors
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.schema import Dataset
from fedinterest.shared.secure_identity import Authority
from tqdm import tqdm

log = logging.getLogger("fedinterest.simulate")


def prepare(cfg: RunConfig, ds: Dataset, encoder: TextEncoder | None = None,
            quiet: bool = False) -> dict:
    """Publish the catalog (popularity counts zero until the federated count) and provision
    one encrypted store per user. Returns the paths."""
    run_dir = Path(cfg.out_dir)
    devices_dir = run_dir / "devices"
    devices_dir.mkdir(parents=True, exist_ok=True)
    encoder = encoder or TextEncoder(cache=EmbeddingCache())  # public catalog text only
    t0 = time.time()
    vectors = catalog_vectors(ds.catalog, encoder)
    t_embed = time.time() - t0

    slices = list(ds.user_slices())
    # popularity counts come later, from the devices under SecAgg+ (see the module docstring)
    catalog = PublishedCatalog(list(ds.catalog.item_ids), vectors, list(ds.catalog.topics),
                               np.zeros(len(ds.catalog), np.float32), encoder.identity,
                               list(ds.catalog.texts))
    catalog_path = catalog.save(run_dir / "catalog")

    # private texts are embedded per device ("on the device"); batched here for speed only
    texts = sorted({t for t in ds.text if t})
    tvec = dict(zip(texts, encoder.encode(texts))) if texts else {}
    # The provisioning authority certifies each device's SecAgg+ signing key; its private key
    # lives only here, during provisioning, and is never written down: the server cannot
    # certify keys of its own (shared/secure_identity.py). Devices keep its public key.
    authority = Authority.generate()
    policy = PrivacyPolicy.for_run(cfg)
    # device p is Flower partition p (consecutive even when some user has no events)
    for p, (_, sl) in enumerate(tqdm(slices, desc="provisioning devices", unit="device",
                                     disable=quiet)):
        store = devices_dir / f"device-{p}.db"
        key = devices_dir / f"device-{p}.key"
        if store.exists():
            store.unlink()
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        with Device.open(store, key_file=key, catalog=catalog) as dev:
            events = [{"item": ds.catalog.item_ids[i], "timestamp": int(t),
                       "rating": None if np.isnan(r) else float(r), "text": x}
                      for i, t, r, x in zip(ds.item[sl], ds.timestamp[sl], ds.rating[sl],
                                            ds.text[sl])]
            ids = dev.store.add_events(events)
            vecs = {i: tvec[e["text"]] for i, e in zip(ids, events) if e["text"]}
            if vecs:
                dev.store.set_text_vectors(vecs)
            dev.ensure_identity()  # made once, at provisioning, like on a real device
            provision_identity(dev.store, authority)  # the SecAgg+ signing key, certified
            dev.set_policy(policy)  # the researcher is the device owner here (client/policy.py)
    prepared = {"catalog_path": str(catalog_path), "catalog_version": catalog.version,
                "devices_dir": str(devices_dir), "n_devices": len(slices),
                "device_users": [ds.user_ids[u] for u, _ in slices],
                "embed_seconds": t_embed,
                "catalog_items": len(catalog),
                "device_policy": dataclasses.asdict(policy),
                "reproducible_seeds": policy.reproducible_seeds}
    write_json(run_dir / "prepared.json", prepared)
    return prepared


def reuse_popularity(source_run: Path, run_dir: Path) -> dict:
    """Copy an earlier run's DP popularity release into `run_dir` (already prepared), so this
    run publishes the same counts instead of counting again: no second spend of the users'
    popularity budget, and arms of one experiment see the same catalog. The server reads the
    record as a resumed run would (server/popularity_round.py). Both runs must have prepared
    the same catalog (dataset and encoder)."""
    from fedinterest.server.popularity_round import RECORD_NAME

    source_run, run_dir = Path(source_run), Path(run_dir)
    if (run_dir / RECORD_NAME).exists():  # a resumed run keeps the release it started with
        return read_json(run_dir / RECORD_NAME)
    record_path = _release_record(source_run)
    ours = read_json(run_dir / "prepared.json")["catalog_version"]
    theirs = read_json(source_run / "prepared.json")["catalog_version"]
    if ours != theirs:
        raise ConfigError(f"popularity_from: {source_run} counted over catalog {theirs}, this "
                          f"run's catalog is {ours} (another dataset or encoder)")
    record = read_json(record_path)
    src = Path(record["catalog_path"])
    if not src.is_absolute() or not src.exists():
        src = source_run / "catalog" / src.name
    dest = run_dir / "catalog" / src.name
    if src.resolve() != dest.resolve():
        shutil.copyfile(src, dest)
    record.update(catalog_path=str(dest), reused_from=str(source_run))
    write_json(run_dir / RECORD_NAME, record)
    return record


def _release_record(source_run: Path) -> Path:
    """The popularity record of `source_run`, or a ConfigError saying why there is none."""
    from fedinterest.server.popularity_round import RECORD_NAME

    if not (Path(source_run) / "prepared.json").is_file():
        raise ConfigError(f"popularity_from: {source_run} is not a run directory (no "
                          "prepared.json)")
    record_path = Path(source_run) / RECORD_NAME
    if not record_path.exists():
        raise ConfigError(f"popularity_from: {record_path} does not exist (that run made no "
                          "popularity release)")
    return record_path


ENGINES = ("ray", "inprocess")


def evaluation_reader(devices_dir: Path, n_devices: int) -> Callable[[int], dict]:
    """What the runner gives the ServerApp loop instead of evaluation replies: the sums of
    the devices' own reports of a round, read from the stores the runner provisioned (it
    holds their keys). The devices send the server no metric (docs/PRIVACY.md)."""
    from fedinterest.client.evaluation_report import sum_reports

    return functools.partial(sum_reports, Path(devices_dir), n_devices)


def run(cfg: RunConfig, ds: Dataset, encoder: TextEncoder | None = None, resume: bool = False,
        quiet: bool = False, popularity_from: Path | None = None, engine: str = "ray") -> dict:
    """`engine`: "ray" is Flower's simulation engine (one node per user); "inprocess" runs
    the same ServerApp loop and ClientApp over `InProcessGrid` in this thread, without Ray
    and its per-message overhead: for tuning sweeps, not a different federation."""
    from fedinterest.client.client_app import app as client_app
    from flwr.simulation import run_simulation

    if engine not in ENGINES:
        raise ConfigError(f"engine '{engine}': expected one of {', '.join(ENGINES)}")
    if popularity_from is not None:  # fail before preparing, which can take minutes
        _release_record(popularity_from)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    prepared = (read_json(run_dir / "prepared.json")
                if resume and (run_dir / "prepared.json").exists()
                else prepare(cfg, ds, encoder, quiet))
    if popularity_from is not None and cfg.popularity:
        reuse_popularity(popularity_from, run_dir)
    t_prepared = time.time()
    bar = tqdm(total=cfg.rounds, desc="federated rounds", unit="round", disable=quiet)
    rows: list[dict] = []

    def on_round(rec: RoundRecord) -> None:
        rows.append(rec.__dict__)
        m = rec.metrics
        bar.set_postfix({"val-ndcg@10": f"{m.get('val-ndcg@10', float('nan')):.4f}",
                         "ok": f"{rec.accepted}/{rec.sampled}"})
        bar.update(1)

    holder: dict = {}
    n = int(prepared["n_devices"])
    if engine == "inprocess":
        from fedinterest.simulations.inprocess_grid import run_in_process

        holder["federation"] = run_in_process(cfg, Path(prepared["catalog_path"]),
                                              Path(prepared["devices_dir"]), n, client_app,
                                              resume, on_round)
    else:
        server_app = make_server_app(cfg, Path(prepared["catalog_path"]),
                                     Path(prepared["devices_dir"]), resume, on_round, holder,
                                     evaluation_reader(Path(prepared["devices_dir"]), n))
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        from fedinterest.simulations.flower_patches import apply as index_linkstate

        index_linkstate()  # Flower's engine is N^2 in nodes without it; warns if it can't
        # RAY_ADDRESS set: attach to that Ray cluster, which sizes itself (see README)
        init_args = ({} if os.environ.get("RAY_ADDRESS") else
                     {"num_cpus": max(1, os.cpu_count() or 1), "log_to_driver": False})
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": init_args},
                       verbose_logging=False)
    bar.close()
    fed = holder.get("federation")
    if fed is None:
        raise RuntimeError("the federated run did not finish; see the log above")
    results = build_results(fed, cfg, n)
    release = fed.popularity_release or {}
    results["dataset"] = {"spec": cfg.dataset, **ds.stats()}
    results["engine"] = engine
    results["timings"] = {
        "prepare_seconds": t_prepared - t_start,
        # a reused release (popularity_from) was counted, and timed, by its source run
        "popularity_count_seconds": None if release.get("reused_from") else release.get("seconds"),
        "federated_seconds": time.time() - t_prepared,
        "total_seconds": time.time() - t_start}
    write_results(run_dir, results)
    from fedinterest.simulations.report import write_report

    results["report"] = str(write_report(run_dir))
    return results


"""A trained model into a new device: `Device.install_model` and `fedinterest client
install-model`, bound to the catalog version the model was trained against, on a real
(tiny, in-process) federated run that published two catalogs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fedinterest.client import Device, ModelCatalogMismatchError, NotReadyError
from fedinterest.client.model_install import ModelSourceError, read_trained_model
from fedinterest.shared.encoder import TextEncoder
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.simulations.cli import main
from fedinterest.simulations.data.synthetic import generate_world
from fedinterest.simulations.inprocess_grid import server_task_identity

from tests.helpers.legacy_defaults import legacy_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert_dir):
    """A finished 1-round run whose popularity release published a second catalog."""
    from fedinterest.simulations.simulate import run as simulate

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("install-model") / "run"
    cfg = legacy_config(out_dir=str(root), rounds=1, clients_per_round=4, hidden=8, segment_len=6,
                    n_negatives=8, batch_size=2, noise_multiplier=1.0, device_epsilon=100.0,
                    min_clients=2, popularity_devices=5)
    ds = generate_world(n_users=8, n_items=60, events_per_user=16, seed=3)
    with server_task_identity():
        simulate(cfg, ds, encoder=TextEncoder(str(tiny_bert_dir), cache=None), quiet=True,
                 engine="inprocess")
    catalogs = sorted((root / "catalog").glob("catalog-*.npz"))
    assert len(catalogs) == 2  # before and after the popularity count
    bound = json.loads((root / "results.json").read_text())["catalog"]["version"]
    first = json.loads((root / "prepared.json").read_text())["catalog_version"]
    assert bound != first
    items = [str(i) for i in ds.catalog.item_ids[:5]]
    return {"dir": root, "bound": bound, "first": first, "items": items}


def _new_device(tmp_path, catalog=None) -> Device:
    key = tmp_path / "user.key"
    key.write_bytes(b"k" * 32)
    return Device.open(tmp_path / "user.db", key_file=key, catalog=catalog)


def test_install_from_a_run_dir_takes_the_bound_catalog_and_recommends(run, tmp_path):
    with _new_device(tmp_path) as dev:
        trained = dev.install_model(run["dir"])
        assert trained.catalog_version == run["bound"] == dev.catalog.version
        assert trained.checkpoint.name == "round-0001.npz"
        assert dev.model_catalog_version() == run["bound"]
        for t, item in enumerate(run["items"]):
            dev.record(item, timestamp=1_000 + t)
        recs = dev.recommend(3)
        assert len(recs) == 3 and not {r.item for r in recs} & set(run["items"])
        # forget keeps the model: recommend works on what is left
        assert dev.forget(item=run["items"][0]) == 1
        assert len(dev.recommend(3)) == 3 and dev.model_catalog_version() == run["bound"]


def test_a_checkpoint_file_installs_and_the_weights_are_the_checkpoints(run, tmp_path):
    ckpt = run["dir"] / "checkpoints" / "round-0001.npz"
    trained = read_trained_model(ckpt.with_suffix(".json"))
    assert trained.checkpoint == ckpt and trained.run_dir == run["dir"]
    with np.load(ckpt) as z:
        assert all(np.array_equal(w, z[f"w{i}"]) for i, w in enumerate(trained.weights))
    with _new_device(tmp_path) as dev:
        assert dev.install_model(ckpt).catalog_version == run["bound"]


def test_a_mismatched_catalog_is_refused_and_nothing_is_stored(run, tmp_path):
    old = PublishedCatalog.load(run["dir"] / "catalog" / f"catalog-{run['first']}.npz")
    with _new_device(tmp_path, old) as dev:
        with pytest.raises(ModelCatalogMismatchError, match=f"catalog-{run['bound']}.npz"):
            dev.install_model(run["dir"])
        assert dev.model_catalog_version() is None
        with pytest.raises(NotReadyError, match="no model"):
            dev.recommend()


def test_a_stored_model_refuses_an_older_catalog_later(run, tmp_path):
    with _new_device(tmp_path) as dev:
        dev.install_model(run["dir"])
        dev.record(run["items"][0], timestamp=1_000)
    old = PublishedCatalog.load(run["dir"] / "catalog" / f"catalog-{run['first']}.npz")
    with (Device.open(tmp_path / "user.db", key_file=tmp_path / "user.key", catalog=old) as dev,
          pytest.raises(ModelCatalogMismatchError, match=run["first"])):
        dev.recommend()


def test_sources_without_a_model_say_what_is_missing(run, tmp_path):
    with pytest.raises(ModelSourceError, match="no such run directory"):
        read_trained_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="no checkpoints/round-NNNN.npz"):
        read_trained_model(empty)
    copy = tmp_path / "copy"
    shutil.copytree(run["dir"], copy, ignore=shutil.ignore_patterns("devices", "messages"))
    for name in ("results.json", "prepared.json", "popularity-release.json"):
        (copy / name).unlink()
    with pytest.raises(ModelSourceError, match="holds the run's config"):
        read_trained_model(copy)


def _cli(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_install_model_then_recommend_with_the_run_s_catalog_folder(run, tmp_path, capsys):
    store, key = tmp_path / "me.db", tmp_path / "me.key"
    base = ["--store", str(store), "--key-file", str(key)]
    code, out, err = _cli(capsys, "client", "install-model", str(run["dir"]), *base, "--new-key")
    assert code == 0, err
    assert f"bound to catalog {run['bound']}" in out and key.stat().st_size == 32
    folder = str(run["dir"] / "catalog")  # two catalogs in it
    for t, item in enumerate(run["items"]):
        code, _, err = _cli(capsys, "client", "record", item, *base, "--catalog", folder,
                            "--timestamp", str(1_000 + t))
        assert code == 0, err
    assert f"using catalog-{run['bound']}.npz (the one the run's model is bound to)" in err
    code, out, err = _cli(capsys, "client", "recommend", *base, "--catalog", folder, "-k", "2",
                          "--json")
    assert code == 0 and len(json.loads(out)) == 2
    assert f"using catalog-{run['bound']}.npz (the one this device's model is bound to)" in err
    # the older catalog named as a file: refused, with the file to use instead
    old = str(run["dir"] / "catalog" / f"catalog-{run['first']}.npz")
    code, _, err = _cli(capsys, "client", "recommend", *base, "--catalog", old)
    assert code == 2 and f"catalog-{run['bound']}.npz" in err and "Traceback" not in err


def test_cli_install_model_refusal_leaves_no_store_or_key(run, tmp_path, capsys):
    store, key = tmp_path / "me.db", tmp_path / "me.key"
    old = str(run["dir"] / "catalog" / f"catalog-{run['first']}.npz")
    code, _, err = _cli(capsys, "client", "install-model", str(run["dir"]), "--store", str(store),
                        "--key-file", str(key), "--new-key", "--catalog", old)
    assert code == 2 and "was trained against catalog" in err
    assert not store.exists() and not key.exists()
    code, _, err = _cli(capsys, "client", "install-model", str(tmp_path / "nowhere"),
                        "--store", str(store), "--key-file", str(key), "--new-key")
    assert code == 2 and "no such run directory" in err and not key.exists()


def test_the_report_reads_device_timelines_with_the_catalog_their_model_is_bound_to(run):
    from fedinterest.simulations.report import write_report

    text = write_report(run["dir"], n_sample_users=2, popularity=False).read_text()
    assert "Could not read this device" not in text
    assert text.count("events from ") == 2 and "predicted next topics" in text

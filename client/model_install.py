"""A trained model for a device, read from a run directory or a checkpoint, bound to the
catalog version it was trained against.

A federated run publishes the catalog twice (once before the popularity count, once with
the DP counts); the model is trained against the second. Scoring with another version
(another item order, other vectors, other popularity) gives confident nonsense, so the
model carries its catalog version into the device store and the device refuses a mismatch.

Where the version comes from, first found: results.json's `catalog` (written by the
server), the run's popularity-release.json (the version the popularity round published),
prepared.json (a run without a popularity release).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedinterest.shared.config import RunConfig
from fedinterest.shared.errors import FedinterestError
from fedinterest.shared.published_catalog import PublishedCatalog

CHECKPOINTS = "checkpoints"
POPULARITY_RECORD = "popularity-release.json"  # server/popularity_round.py RECORD_NAME


class ModelSourceError(FedinterestError):
    """The path is not a run directory or checkpoint a model can be read from."""


class ModelCatalogMismatchError(FedinterestError):
    """The model was trained against another catalog version than the device's."""


@dataclass(frozen=True)
class TrainedModel:
    """Weights (wire-schema order), the run's config, and the catalog they are bound to."""

    weights: list[np.ndarray]
    config: RunConfig
    catalog_version: str
    run_dir: Path
    checkpoint: Path  # the round-NNNN.npz the weights come from

    @property
    def catalog_path(self) -> Path:
        return self.run_dir / "catalog" / f"catalog-{self.catalog_version}.npz"

    def load_catalog(self) -> PublishedCatalog:
        """The catalog the model is bound to, from the run's catalog folder."""
        return PublishedCatalog.load(self.catalog_path, expected_version=self.catalog_version)


def read_trained_model(path: str | Path) -> TrainedModel:
    """Read the model of a run.

    Args:
        path: a run directory (its newest checkpoint), its `checkpoints/` folder, or one
            checkpoint (`checkpoints/round-NNNN.npz` or `.json`).

    Raises:
        ModelSourceError: no checkpoint, no config or no catalog version found; the message
            names the file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelSourceError(f"{p}: no such run directory or checkpoint")
    if p.is_file():
        checkpoint = p.with_suffix(".npz")
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS else p.parent
    else:
        run_dir = p.parent if p.name == CHECKPOINTS else p
        found = sorted((run_dir / CHECKPOINTS).glob("round-*.npz"))
        if not found:
            raise ModelSourceError(f"{run_dir}: no checkpoints/round-NNNN.npz here (is it the "
                                   "run directory of `fedinterest simulate` or `flwr run`?)")
        checkpoint = found[-1]
    return TrainedModel(_weights(checkpoint), _config(run_dir), catalog_version(run_dir),
                        run_dir, checkpoint)


def _weights(checkpoint: Path) -> list[np.ndarray]:
    try:
        with np.load(checkpoint, allow_pickle=False) as z:
            n = sum(1 for k in z.files if k[:1] == "w" and k[1:].isdigit())
            weights = [z[f"w{i}"] for i in range(n)]
    except FileNotFoundError:
        raise ModelSourceError(f"{checkpoint}: checkpoint not found") from None
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"{checkpoint}: not a readable checkpoint ({e})") from None
    if not weights:
        raise ModelSourceError(f"{checkpoint}: holds no model weights (w0, w1, ...)")
    return weights


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object")
    return data


def _config(run_dir: Path) -> RunConfig:
    results = _json(run_dir / "results.json")
    if results is not None and isinstance(results.get("config"), dict):
        return RunConfig.from_mapping(results["config"], f"{run_dir}/results.json, config")
    prepared = _json(run_dir / "prepared.json")
    if prepared is not None and isinstance(prepared.get("run_config"), dict):
        return RunConfig.from_mapping(prepared["run_config"],
                                      f"{run_dir}/prepared.json, run_config")
    raise ModelSourceError(f"{run_dir}: neither results.json nor prepared.json holds the run's "
                           "config (the model's shape depends on it)")


def catalog_version(run_dir: str | Path) -> str:
    """The catalog version the run's model was trained against (see the module docstring)."""
    run_dir = Path(run_dir)
    results = _json(run_dir / "results.json") or {}
    version = (results.get("catalog") or {}).get("version")
    for name, key in ((POPULARITY_RECORD, "catalog_version"),
                      ("prepared.json", "catalog_version")):
        if version:
            break
        version = (_json(run_dir / name) or {}).get(key)
    if not isinstance(version, str) or not version:
        raise ModelSourceError(f"{run_dir}: no catalog version in results.json, "
                               f"{POPULARITY_RECORD} or prepared.json")
    return version


# -- the model as the device store keeps it ---------------------------------------------------
def encode_model_blob(weights: list[np.ndarray], cfg: RunConfig, version: str) -> bytes:
    """One JSON line ({"config", "catalog_version"}) then the weights as an .npz."""
    buf = io.BytesIO()
    np.savez(buf, *weights)
    head = {"config": cfg.to_dict(), "catalog_version": version}
    return json.dumps(head).encode() + b"\n" + buf.getvalue()


def decode_model_blob(blob: bytes) -> tuple[list[np.ndarray], RunConfig, str | None]:
    """(weights, config, catalog version); the version is None for a model stored before
    models recorded it (a bare config dict on the first line)."""
    head, _, body = blob.partition(b"\n")
    meta = json.loads(head)
    version = None
    if isinstance(meta.get("config"), dict):
        meta, version = meta["config"], meta.get("catalog_version")
    with np.load(io.BytesIO(body)) as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    return weights, RunConfig.from_mapping(meta, "the device's stored model"), version


def stored_catalog_version(blob: bytes) -> str | None:
    """The catalog version in a stored model's first line, without reading the weights."""
    meta = json.loads(blob.partition(b"\n")[0])
    return meta.get("catalog_version") if isinstance(meta.get("config"), dict) else None


def check_binding(model_version: str | None, catalog: PublishedCatalog, what: str) -> None:
    """Raise ModelCatalogMismatchError when `what` (a model) is bound to another catalog."""
    if model_version is not None and model_version != catalog.version:
        raise ModelCatalogMismatchError(
            f"{what} was trained against catalog {model_version}, but this device's catalog "
            f"is {catalog.version}: use catalog-{model_version}.npz (or install a model "
            "trained against this catalog)")

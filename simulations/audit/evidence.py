"""Everything the privacy audit reads from a run directory, loaded once and shared by the checks.

An auditor trusts the record, not the claims: the run configuration is taken from what the
server actually sent (the first instruction in messages/messages.log), every device is found
through its own encrypted store (devices/device-<i>.db + .key), and a Flower node id is tied
to a store only through the pseudonym the device itself sent in its hello reply. results.json
is read as the list of claims to check, never as evidence. Paths recorded inside the run are
ignored in favour of the run directory itself, so a copied run audits the same.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from fedinterest.client.device import LEDGER_BLOB, PSEUDONYM_BLOB, Device
from fedinterest.client.store import DeviceStore
from fedinterest.server.message_log import decode, read_log
from fedinterest.shared.config import RunConfig
from fedinterest.shared.errors import FedinterestError
from fedinterest.shared.privacy import EventLedger
from fedinterest.shared.published_catalog import PublishedCatalog
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

LOG_PATH = Path("messages") / "messages.log"
CANARIES_FILE = "canaries.json"  # optional: strings a run planted on devices (a JSON list)


@dataclass
class Frame:
    """One recorded message: its log header, its wire bytes and, for a reply, its request."""

    index: int
    header: dict
    raw: bytes
    request: Frame | None = None

    @cached_property
    def message(self) -> Message:
        return decode(self.raw)

    @property
    def received(self) -> bool:
        return self.header["direction"] == "received"

    @property
    def node(self) -> int:
        """The device's node id (the sender of a reply, the receiver of an instruction)."""
        return int(self.header["src"] if self.received else self.header["dst"])

    @property
    def kind(self) -> str:
        return str(self.header["type"])

    def config(self) -> dict:
        """The round config of an instruction (plain or Flower's legacy SecAgg+ layout)."""
        msg = self.message if not self.received else (self.request.message if self.request
                                                      else None)
        if msg is None or msg.has_error():
            return {}
        recs = msg.content.config_records
        for name in ("config", "fitins.config"):
            if name in recs:
                return dict(recs[name])
        return {}

    @property
    def secagg_stage(self) -> str | None:
        """The SecAgg+ stage of an instruction, or of the instruction a reply answers."""
        req = self.request if self.received else self
        if req is None or req.message.has_error():
            return None
        rec = req.message.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = rec.get(Key.STAGE) if rec is not None else None
        return stage if isinstance(stage, str) else None


@dataclass
class DeviceRecord:
    """One device as its own store describes it (opened read-only for the audit)."""

    index: int  # the store's file number (the simulation's partition id)
    path: Path
    key_path: Path
    pseudonym: str | None
    items: list[str]
    timestamps: list[int]
    texts: list[str]  # every private text the device holds: event texts and notes
    ledger: EventLedger | None
    node_ids: list[int] = field(default_factory=list)  # Flower node ids that answered as it


class AuditRun:
    """A run directory as the audit sees it. Raises FedinterestError naming what is missing."""

    def __init__(self, run_dir: str | Path, canaries: list[str] | None = None):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FedinterestError(f"{self.run_dir}: not a run directory")
        self.log_path = self.run_dir / LOG_PATH
        if not self.log_path.is_file():
            raise FedinterestError(f"{self.log_path}: message log not found; the audit needs "
                                   "the record of every message (server/message_log.py), which "
                                   "a run with message_log = false does not keep")
        self.extra_canaries = list(canaries or [])

    # -- the message log ---------------------------------------------------------------
    @cached_property
    def frames(self) -> list[Frame]:
        frames: list[Frame] = []
        by_id: dict[str, Frame] = {}
        for i, (header, raw) in enumerate(read_log(self.log_path)):
            frame = Frame(i, header, raw)
            if frame.received:
                frame.request = by_id.get(header.get("reply_to") or "")
            else:
                mid = frame.message.metadata.message_id
                if mid:
                    by_id[mid] = frame
            frames.append(frame)
        if not frames:
            raise FedinterestError(f"{self.log_path}: the message log is empty")
        return frames

    def replies(self, kind: str | None = None) -> Iterator[Frame]:
        return (f for f in self.frames if f.received and (kind is None or f.kind == kind))

    @cached_property
    def raw_config(self) -> dict:
        """The first round config the server sent (every instruction repeats the run config)."""
        for f in self.frames:
            if not f.received and f.config():
                return f.config()
        raise FedinterestError(f"{self.log_path}: no instruction carries a round config")

    @cached_property
    def config(self) -> RunConfig:
        known = set(RunConfig().to_flower())
        return RunConfig.from_mapping({k: v for k, v in self.raw_config.items() if k in known},
                                      source=f"{self.log_path} (round config)")

    @cached_property
    def logged_schema_digest(self) -> str | None:
        """The wire-schema digest the server announced (shared/wire.py: WireSchema.digest)."""
        digest = self.raw_config.get("schema-digest")
        return str(digest) if digest else None

    @cached_property
    def build_matches_run(self) -> bool:
        """Whether this build's model is the run's: the checks that rebuild the model or
        re-run a device need the code that made the run."""
        from fedinterest.shared.fed_model import wire_schema

        return wire_schema(self.config, self.catalog()).digest() == self.logged_schema_digest

    @cached_property
    def node_pseudonyms(self) -> dict[int, str]:
        """Node id -> the pseudonym the device sent in its hello reply."""
        out = {}
        for f in self.replies("query"):
            msg = f.message
            if msg.has_error() or "device" not in msg.content.config_records:
                continue
            pid = msg.content.config_records["device"].get("pseudonym")
            if isinstance(pid, str):
                out[f.node] = pid
        return out

    # -- results.json (claims) ---------------------------------------------------------
    @cached_property
    def results(self) -> dict | None:
        path = self.run_dir / "results.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FedinterestError(f"{path}: not readable JSON ({e})") from None

    # -- catalog -----------------------------------------------------------------------
    def catalog(self, version: str | None = None) -> PublishedCatalog:
        """A published catalog version from <run>/catalog (default: the last one announced)."""
        version = version or self.final_catalog_version
        return _load_catalog(self.run_dir / "catalog" / f"catalog-{version}.npz", version)

    @cached_property
    def final_catalog_version(self) -> str:
        version = None
        for f in self.frames:
            if not f.received and f.config().get("catalog-version"):
                version = str(f.config()["catalog-version"])
        if version is None:
            raise FedinterestError(f"{self.log_path}: no instruction announces a catalog")
        return version

    # -- devices -----------------------------------------------------------------------
    @cached_property
    def devices(self) -> list[DeviceRecord]:
        directory = self.run_dir / "devices"
        stores = sorted(directory.glob("device-*.db"), key=lambda p: _store_number(p))
        if not stores:
            raise FedinterestError(f"{directory}: no device stores (device-<i>.db) found")
        by_pid = {}
        out = []
        for path in stores:
            rec = _read_device(path)
            out.append(rec)
            if rec.pseudonym:
                by_pid[rec.pseudonym] = rec
        for node, pid in self.node_pseudonyms.items():
            if pid in by_pid:
                by_pid[pid].node_ids.append(node)
        return out

    def device_of_node(self, node: int) -> DeviceRecord | None:
        pid = self.node_pseudonyms.get(node)
        return next((d for d in self.devices if pid is not None and d.pseudonym == pid), None)

    @cached_property
    def canaries(self) -> list[str]:
        """Strings planted on devices that must never leave: <run>/canaries.json and any
        given on the command line."""
        path = self.run_dir / CANARIES_FILE
        planted: list[str] = []
        if path.is_file():
            try:
                planted = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise FedinterestError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(planted, list) or not all(isinstance(s, str) for s in planted):
                raise FedinterestError(f"{path}: expected a JSON list of strings")
        return planted + self.extra_canaries

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def final_weights(self) -> list[np.ndarray] | None:
        metas = sorted(self.checkpoints_dir.glob("round-*.json"))
        if not metas:
            return None
        meta = json.loads(metas[-1].read_text())
        with np.load(metas[-1].with_suffix(".npz"), allow_pickle=False) as z:
            return [z[f"w{i}"] for i in range(meta["n_weights"])]


def _store_number(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        raise FedinterestError(f"{path}: expected a store named device-<number>.db") from None


def _load_catalog(path: Path, version: str) -> PublishedCatalog:
    return PublishedCatalog.load(path, expected_version=version)


def _read_device(path: Path) -> DeviceRecord:
    key = path.with_suffix(".key")
    if not key.is_file():
        raise FedinterestError(f"{key}: key file of {path.name} not found")
    # read from a copy: opening a SQLite store may touch its WAL, and the audit must leave
    # the evidence exactly as it found it
    with tempfile.TemporaryDirectory(prefix="fedinterest-audit-") as tmp:
        copy = copy_store(path, Path(tmp))
        with DeviceStore.open(copy, key_file=key, create=False) as st:
            events = st.events()
            notes = st.get_blob("notes")
            ledger_blob = st.get_blob(LEDGER_BLOB)
            pid = st.get_blob(PSEUDONYM_BLOB)
    texts = [e.text for e in events if e.text]
    if notes:
        texts += [t for t in notes.decode("utf-8", "replace").split("\x1e") if t]
    return DeviceRecord(
        index=_store_number(path), path=path, key_path=key,
        pseudonym=pid.decode() if pid else None, items=[e.item for e in events],
        timestamps=[e.timestamp for e in events], texts=texts,
        ledger=EventLedger.from_json(ledger_blob.decode()) if ledger_blob else None)


def copy_store(path: Path, dest_dir: Path) -> Path:
    """Copy a store (and its WAL/SHM files) into dest_dir; returns the copy's path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            shutil.copy2(src, dest_dir / (path.name + suffix))
    return dest_dir / path.name


def open_device_copy(rec: DeviceRecord, catalog: PublishedCatalog, dest_dir: Path) -> Device:
    """The device SDK over a private copy of the store: re-runs write only to the copy."""
    return Device.open(copy_store(rec.path, dest_dir), key_file=rec.key_path, catalog=catalog,
                       create=False)


def device_seed(device: Device, cfg: RunConfig, server_round: int) -> int | None:
    """The training seed the device used in that round, from its own store (a CSPRNG draw,
    or with reproducible_seeds an HMAC under the device's secret; client/private_round.py),
    readable here only because the auditor of a simulation holds the device's key. None when
    the device recorded none (it did not train that round)."""
    return device.used_seed(cfg.seed, server_round)


def proximal_mu(cfg: RunConfig, round_config: dict) -> float:
    """The FedProx pull the device applied (only under FedProx, as client_app.train does)."""
    return float(round_config.get("proximal-mu", 0.0)) if cfg.strategy == "fedprox" else 0.0


def device_history(rec: DeviceRecord, catalog: PublishedCatalog
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalog indices, timestamps, text vectors [n, D], zero rows without text) of every
    event of the device whose item is in the catalog, in the store's order, as the device
    builds its training data (client/device.py: Device._history)."""
    index = {iid: i for i, iid in enumerate(catalog.item_ids)}
    dim = catalog.vectors.shape[1]
    with tempfile.TemporaryDirectory(prefix="fedinterest-audit-") as tmp, \
            DeviceStore.open(copy_store(rec.path, Path(tmp)), key_file=rec.key_path,
                             create=False) as st:
        events = [e for e in st.events() if e.item in index]
        vecs = st.text_vectors()
    tv = np.zeros((len(events), dim), np.float32)
    for j, e in enumerate(events):
        v = vecs.get(e.id)
        if v is not None and len(v) == dim:
            tv[j] = v
    return (np.array([index[e.item] for e in events], np.int64),
            np.array([e.timestamp for e in events], np.int64), tv)

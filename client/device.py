"""The on-device SDK an app embeds: record, recommend, explain, interests, forget, export,
privacy, and the two calls federation makes (fit, evaluate).

Raw text and its vectors live only in the encrypted store; the model, the public catalog and
the privacy ledger are the only other state. What `fit` and `evaluate` return is checked
against the wire schema by the ClientApp's egress guard before anything leaves.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import numpy as np
import torch
from fedinterest.shared.config import RunConfig
from fedinterest.shared.errors import FedinterestError
from fedinterest.shared.fed_model import catalog_inputs, federated_model_config
from fedinterest.shared.metrics import RankingAccumulator
from fedinterest.shared.model import build_model, set_weights
from fedinterest.shared.published_catalog import PublishedCatalog
from fedinterest.shared.sequences import inference_batch

from .explanation_text import explanation_sentence
from .model_cache import inference_model, item_embeddings, weights_digest
from .model_install import (
    TrainedModel,
    check_binding,
    decode_model_blob,
    encode_model_blob,
    read_trained_model,
    stored_catalog_version,
)
from .policy import POLICY_BLOB, PrivacyPolicy
from .private_round import (  # noqa: F401  (LEDGER_BLOB re-exported: the audit reads it)
    LEDGER_BLOB,
    ROUND_SEEDS_BLOB,
    SEED_SECRET_BLOB,
    load_ledger,
    load_policy,
    local_training,
    privacy_report,
    round_seed,
    train_round,
    used_seeds,
)
from .store import DeviceStore, EventValidationError
from .timeline_plot import plot_timeline

if TYPE_CHECKING:  # imported where used: the accountants take seconds to import
    from fedinterest.shared.privacy import DeviceLedger

MODEL_BLOB = "global-model"
PSEUDONYM_BLOB = "pseudonym"
DDP_LEDGER_BLOB = "ddp-ledger"  # distributed-DP ledger (client/ddp_mod.py)
FUTURE_SLACK_SECONDS = 300  # clocks drift; a timestamp this far ahead of now is still accepted


class NotReadyError(FedinterestError):
    """The device cannot do this yet (no catalog, no model or no data); the message says which."""


@dataclass
class Recommendation:
    """One recommended item: its catalog id, its score (higher is better) and its public text."""

    item: str
    score: float
    text: str


@dataclass
class Explanation:
    """Why an item is recommended: a sentence for the user and the past events behind it."""

    item: str
    reason: str
    contributions: list[dict]  # past events with their share of the score, strongest first


class Device:
    """One user's device. Open with `Device.open(store_path, passphrase=... | key_file=...)`.

    Args:
        store: the user's open encrypted store.
        catalog: the published catalog; without one, only recording (unchecked against a
            catalog) and export work until `set_catalog` is called.
        encoder: a `shared.encoder.TextEncoder` that embeds private text on the device; without
            one, text is stored but carries no vector.
        catalog_texts: display texts of the catalog items, in catalog order (default: the
            catalog's own texts, else the item ids).
    """

    def __init__(self, store: DeviceStore, catalog: PublishedCatalog | None = None,
                 encoder=None, catalog_texts: Sequence[str] | None = None):
        self.store = store
        self.encoder = encoder  # a shared.encoder.TextEncoder for private text, or None
        self.catalog: PublishedCatalog | None = None
        self.catalog_texts = list(catalog_texts) if catalog_texts is not None else None
        self._model = None
        self._model_cfg = None
        self._item_emb = None
        self._read_texts: list[str] | None = None  # see raw_texts_read
        if catalog is not None:
            self.set_catalog(catalog)

    @classmethod
    def open(cls, store_path: str | Path, *, passphrase: str | None = None,
             key_file: str | Path | None = None, catalog: PublishedCatalog | None = None,
             encoder=None, **store_kw) -> Device:
        """Open (or create) the store at `store_path` and wrap it; use as a context manager.

        Args:
            store_path: the store's SQLite file.
            passphrase, key_file: the user's passphrase (scrypt) or a key file; exactly one.
            catalog, encoder: see `Device`.
            **store_kw: passed to `DeviceStore.open` (e.g. `create=False`).

        Raises:
            StoreError: the store cannot be opened (wrong key, tampered, corrupt, busy).
        """
        store = DeviceStore.open(store_path, passphrase=passphrase, key_file=key_file,
                                 **store_kw)
        try:
            load_policy(store)  # a new store gets the strict default policy now
        except BaseException:
            store.close()
            raise
        return cls(store, catalog, encoder)

    def close(self) -> None:
        """Close the store."""
        self._read_texts = None
        self.store.close()

    def raw_texts_read(self) -> list[str] | None:
        """Every raw text of the events the last history read decrypted (all events, not
        only those in the catalog), or None when nothing was read since the store was opened
        or last written to by this Device. The egress guard of the same message scans the
        reply for them instead of decrypting the store again (client/message_cache.py)."""
        return None if self._read_texts is None else list(self._read_texts)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- catalog and model --------------------------------------------------------------
    def set_catalog(self, catalog: PublishedCatalog, expected_version: str | None = None) -> None:
        """Use `catalog` from now on (drops the loaded model, which depends on it).

        Raises:
            NotReadyError: `expected_version` (the announced one) is given and differs.
        """
        if expected_version is not None and catalog.version != expected_version:
            raise NotReadyError(f"catalog version {catalog.version} is not the announced "
                                f"{expected_version}")
        self.catalog = catalog
        self._index = {iid: i for i, iid in enumerate(catalog.item_ids)}
        self._feats, self._topics, self._vocab = catalog_inputs(catalog)
        self._item_emb = None
        self._model = None

    def _require_catalog(self) -> PublishedCatalog:
        if self.catalog is None:
            raise NotReadyError("no published catalog on this device yet: call set_catalog()")
        return self.catalog

    def load_global_model(self, weights: list[np.ndarray], cfg: RunConfig) -> None:
        """Adopt the server's model (arrays in wire-schema order, built from `cfg`) for local
        recommendation; kept in the store, bound to the current catalog's version.

        Raises:
            NotReadyError: no catalog, or the weights do not fit the catalog's model.
        """
        self._install_model(weights, cfg)
        self.store.put_blob(MODEL_BLOB, encode_model_blob(weights, cfg, self.catalog.version))

    def install_model(self, source: str | Path) -> TrainedModel:
        """Install the model of a run directory (newest checkpoint), its `checkpoints/` folder
        or one checkpoint, bound to the catalog version it was trained against. A device
        without a catalog takes the run's (`<run>/catalog/`); another version is refused.

        Returns:
            The `TrainedModel` installed (its `catalog_version`, `checkpoint`, `config`).

        Raises:
            ModelSourceError: no checkpoint, config or catalog version at `source`.
            ModelCatalogMismatchError: the device's catalog is not the model's.
            NotReadyError: the weights do not fit the catalog's model.
        """
        trained = read_trained_model(source)
        if self.catalog is None:
            self.set_catalog(trained.load_catalog())
        check_binding(trained.catalog_version, self.catalog, f"the model in {trained.checkpoint}")
        self.load_global_model(trained.weights, trained.config)
        return trained

    def _install_model(self, weights: list[np.ndarray], cfg: RunConfig) -> None:
        cat = self._require_catalog()
        mcfg = federated_model_config(cfg, cat)
        self._emb_key = (cat.version, repr(mcfg), weights_digest(weights))
        self._model = inference_model(self._emb_key, lambda: self._built(mcfg, weights, cat))
        self._model_cfg, self._item_emb = mcfg, None

    def _built(self, mcfg, weights: list[np.ndarray], cat: PublishedCatalog):
        model = build_model(mcfg)
        try:
            set_weights(model, weights)
        except ValueError as e:  # e.g. a stored model from another catalog's shape
            raise NotReadyError(f"the model does not fit catalog {cat.version}: {e}") from None
        model.attach_catalog(item_feats=self._feats, topic_dist=self._topics if mcfg.n_topics
                             else None)
        return model.eval()

    def model_catalog_version(self) -> str | None:
        """The stored model's catalog version (None: no model, or one stored before)."""
        blob = self.store.get_blob(MODEL_BLOB)
        return None if blob is None else stored_catalog_version(blob)

    def _require_model(self):
        if self._model is None:
            blob = self.store.get_blob(MODEL_BLOB)
            if blob is None:
                raise NotReadyError("no model on this device yet: it arrives with the first "
                                    "federated round, or install_model(RUN_DIR) installs one")
            weights, cfg, version = decode_model_blob(blob)
            check_binding(version, self._require_catalog(), "the model in this device's store")
            self._install_model(weights, cfg)
        return self._model

    @property
    def pseudonym(self) -> str:
        """A random id made once per store: lets the server sample and order devices stably
        across restarts. It says nothing about the user beyond what a Flower node id does."""
        blob = self.store.get_blob(PSEUDONYM_BLOB)
        if blob is None:
            blob = secrets.token_hex(16).encode()
            self.store.put_blob(PSEUDONYM_BLOB, blob)
        return blob.decode()

    def ensure_identity(self) -> str:
        """Make the pseudonym and the seed secret now (at provisioning); returns the first."""
        if self.store.get_blob(SEED_SECRET_BLOB) is None:
            self.store.put_blob(SEED_SECRET_BLOB, secrets.token_bytes(32))
        return self.pseudonym

    @property
    def policy(self) -> PrivacyPolicy:
        """The device owner's privacy policy (client/policy.py); never the server's."""
        return load_policy(self.store)

    def set_policy(self, policy: PrivacyPolicy) -> None:
        """Set the privacy policy: the device owner's call (at provisioning), never the
        server's. Stored encrypted in the store."""
        if not isinstance(policy, PrivacyPolicy):
            raise TypeError(f"expected a PrivacyPolicy, got {type(policy).__name__}")
        self.store.put_blob(POLICY_BLOB, policy.to_json().encode())

    def training_seed(self, run_seed: int, server_round: int) -> int:
        """A new 63-bit seed for this round's randomness (noise, sampling, negatives, dropout)
        from the OS CSPRNG, or HMAC(device secret, 'run_seed:round') only under the policy's
        `reproducible_seeds`; recorded (`used_seed`). See client/private_round.py."""
        return round_seed(self.store, self.policy, run_seed, server_round)

    def used_seed(self, run_seed: int, server_round: int) -> int | None:
        """The seed this device trained round `server_round` of the run seeded `run_seed`
        with, from its own store (for whoever holds the key: an auditor re-running it)."""
        return used_seeds(self.store).get(f"{run_seed}:{server_round}:train")

    # -- recording ----------------------------------------------------------------------
    def record(self, item: str, text: str | None = None, timestamp: int | None = None,
               rating: float | None = None) -> int:
        """Store one event (and the vector of its private text). Validates before writing.

        Args:
            item: the catalog item id.
            text: private text about the event (a review, a note); stays on the device.
            timestamp: unix seconds; default now. Not before the last recorded event, and at
                most FUTURE_SLACK_SECONDS ahead of now.
            rating: an optional rating.

        Returns:
            The new event's id in the store.

        Raises:
            EventValidationError: a field is invalid (the message names it), or the item is not
                in the catalog (when one is set). Nothing is stored then.
        """
        now = int(time.time())
        ts = now if timestamp is None else timestamp
        if isinstance(ts, bool) or not isinstance(ts, (int, np.integer)):
            raise EventValidationError("timestamp", f"expected unix seconds (int), got {ts!r}")
        # every field checked before the encoder sees the text (it raises its own errors on
        # e.g. bytes, and embedding what is then refused is wasted work)
        item, ts, rating, text = self.store.check_event(
            int(item) if isinstance(item, np.integer) else item, int(ts), rating, text)
        if self.catalog is not None and item not in self._index:
            raise EventValidationError("item", f"'{item}' is not in the published catalog")
        if ts > now + FUTURE_SLACK_SECONDS:
            raise EventValidationError("timestamp", f"{ts} is in the future (now is {now})")
        last = self.store.events()
        if last and ts < last[-1].timestamp:
            raise EventValidationError(
                "timestamp", f"{ts} is before the last recorded event ({last[-1].timestamp}); "
                "events must be recorded in order")
        # embed first: an encoder failure must not leave the event stored without its vector
        vec = self.encoder.encode([text])[0] if text and self.encoder is not None else None
        self._read_texts = None
        event_id = self.store.add_event(item, int(ts), rating=rating, text=text)
        if vec is not None:
            self.store.set_text_vector(event_id, vec)
        return event_id

    def import_history(self, events: Sequence[dict]) -> int:
        """Bulk-load a history (one transaction) and embed its texts in one batch.

        Unlike `record`, items are not checked against the catalog nor timestamps against
        the clock or the last event: this is for importing an existing history.

        Args:
            events: dicts with `item`, `timestamp` and optionally `rating` and `text`.

        Returns:
            The number of events stored.

        Raises:
            EventValidationError: an event is invalid (the message names its index and field);
                nothing of the batch is stored.
        """
        self._read_texts = None
        ids = self.store.add_events(events)
        texts = [(i, e.get("text")) for i, e in zip(ids, events) if e.get("text")]
        if texts and self.encoder is not None:
            vecs = self.encoder.encode([t for _, t in texts])
            self.store.set_text_vectors({i: v for (i, _), v in zip(texts, vecs)})
        return len(ids)

    # -- the user's history as model input ------------------------------------------------
    def _history(self):
        """(catalog indices, timestamps, text vectors [n, D] with zero rows, texts, item ids)
        of every event whose item is in the catalog, in canonical order."""
        cat = self._require_catalog()
        every = self.store.events()
        self._read_texts = [e.text for e in every if e.text]
        events = [e for e in every if e.item in self._index]
        vecs = self.store.text_vectors()
        dim = cat.vectors.shape[1]
        tv = np.zeros((len(events), dim), np.float32)
        for j, e in enumerate(events):
            v = vecs.get(e.id)
            if v is not None and len(v) == dim:
                tv[j] = v
        items = np.array([self._index[e.item] for e in events], np.int64)
        ts = np.array([e.timestamp for e in events], np.int64)
        return items, ts, tv, [e.text for e in events], [e.item for e in events]

    @staticmethod
    def _text_inputs(tv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        has = np.abs(tv).sum(1) > 0
        return np.where(has, np.cumsum(has) - 1, -1), tv[has]

    def _states(self, model, windows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                ) -> torch.Tensor:
        batch = inference_batch([(items, ts, *self._text_inputs(tv)) for items, ts, tv in windows],
                                self._model_cfg.context_len, self._model_cfg.text_dim)
        with torch.inference_mode():
            return model.user_state(batch)

    def _item_embeddings(self, model) -> torch.Tensor:
        """The catalog through the item tower; shared by every device in this process that
        holds the same model (a simulation evaluates hundreds of devices per round)."""
        if self._item_emb is None:
            self._item_emb = item_embeddings(self._emb_key, model)
        return self._item_emb

    # -- the user-facing calls --------------------------------------------------------------
    def recommend(self, k: int = 10) -> list[Recommendation]:
        """Top-k unseen catalog items for the current interest state, scored on the device.

        Returns:
            Up to `k` recommendations, best first; items already recorded are excluded.

        Raises:
            NotReadyError: no catalog, no model yet (it arrives with federated evaluation),
                or no recorded events.
        """
        model = self._require_model()
        items, ts, tv, _, _ = self._history()
        if not len(items):
            raise NotReadyError("no recorded events yet: record() something first")
        with torch.inference_mode():
            scores = model.score(self._states(model, [(items, ts, tv)]),
                                 self._item_embeddings(model))[0].numpy().copy()
        scores[np.unique(items)] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        return [Recommendation(self.catalog.item_ids[i], float(scores[i]), self._item_text(i))
                for i in top if np.isfinite(scores[i])]

    def _item_text(self, i: int) -> str:
        texts = self.catalog_texts or self.catalog.texts
        return texts[i] if texts else self.catalog.item_ids[i]

    def explain(self, item: str, top: int = 3) -> Explanation:
        """Occlusion over the recent history: drop each past event, re-score the item; the
        events whose removal costs the most score drove the recommendation.

        Args:
            item: the catalog item to explain.
            top: at most this many contributing events.

        Returns:
            An `Explanation`: a sentence and, strongest first, the past events whose removal
            lowers the item's score (item, text, timestamp, share, score_drop, note).

        Raises:
            EventValidationError: the item is not in the catalog.
            NotReadyError: no catalog, no model or no recorded events.
        """
        model = self._require_model()
        self._require_catalog()
        if str(item) not in self._index:
            raise EventValidationError("item", f"'{item}' is not in the published catalog")
        target = self._index[str(item)]
        items, ts, tv, texts, ids = self._history()
        if not len(items):
            raise NotReadyError("no recorded events yet: nothing to explain from")
        ctx = self._model_cfg.context_len
        s = max(0, len(items) - ctx)
        items, ts, tv, texts, ids = items[s:], ts[s:], tv[s:], texts[s:], ids[s:]
        windows = [(items, ts, tv)] + [
            (np.delete(items, j), np.delete(ts, j), np.delete(tv, j, axis=0))
            for j in range(len(items))] if len(items) > 1 else [(items, ts, tv)]
        emb = self._item_embeddings(model)[target:target + 1]
        with torch.inference_mode():
            sc = model.score(self._states(model, windows), emb)[:, 0].numpy()
        base, drops = float(sc[0]), sc[0] - sc[1:]
        order = np.argsort(-drops, kind="stable")[:top]
        total = float(np.clip(drops, 0, None).sum()) or 1.0
        contrib = [{"item": ids[j], "text": self._item_text(self._index[ids[j]]),
                    "timestamp": int(ts[j]), "share": float(max(drops[j], 0) / total),
                    "score_drop": float(drops[j]), "note": texts[j]} for j in order
                   if drops[j] > 0]
        return Explanation(str(item), explanation_sentence(self._item_text(target), contrib, base),
                           contrib)

    def interests(self, window: int = 10, png: str | Path | None = None) -> dict:
        """The user's interest timeline: topic shares over a sliding window of events, plus
        the model's predicted topics of the next events when a model is present.

        Args:
            window: events per sliding window.
            png: also plot the timeline to this PNG file (needs matplotlib).

        Returns:
            {"topics": vocabulary, "timeline": [{"timestamp", "topics": {name: share}}],
            "predicted_next": {name: probability} or None}.

        Raises:
            NotReadyError: no catalog (or, with `png`, no events to plot).
        """
        items, ts, _, _, _ = self._history()
        vocab = self._vocab
        rows = []
        for j in range(len(items)):
            lo = max(0, j - window + 1)
            share = self._topics[items[lo:j + 1]].sum(0)
            share = share / share.sum() if share.sum() > 0 else share
            rows.append({"timestamp": int(ts[j]),
                         "topics": {vocab[c]: float(share[c]) for c in np.flatnonzero(share)}})
        out = {"topics": vocab, "timeline": rows, "predicted_next": None}
        if self._model is not None or self.store.get_blob(MODEL_BLOB) is not None:
            model = self._require_model()
            if self._model_cfg.n_topics and len(items):
                with torch.inference_mode():
                    p = model.topic_distribution(self._states(model, [self._history()[:3]]))[0]
                out["predicted_next"] = {vocab[c]: float(p[c]) for c in range(len(vocab))}
        if png is not None:
            plot_timeline(out, png)
        return out

    def forget(self, *, item: str | None = None, before: int | None = None) -> int:
        """Delete everything (no arguments), one item, or everything before a time. The rows
        are purged from the file; with no data left the device stops contributing. Kept: the
        privacy ledger, pseudonym and seed secret (privacy already spent cannot be un-spent)
        and the global model (trained by the federation, it holds none of the deleted events;
        `recommend` keeps working on whatever history is left).

        Args:
            item: delete every event of this item; or
            before: delete every event with a timestamp before this (unix seconds).

        Returns:
            The number of events deleted.
        """
        if item is not None and before is not None:
            raise FedinterestError("forget: pass item= or before=, not both")
        self._read_texts = None
        if item is not None:
            n = self.store.forget_item(str(item))
        elif before is not None:
            n = self.store.forget_before(int(before))
        else:
            # the ledger survives: privacy already spent cannot be un-spent by deleting data
            n = self.store.forget_all(keep_blobs=[PSEUDONYM_BLOB, SEED_SECRET_BLOB, POLICY_BLOB,
                                                  ROUND_SEEDS_BLOB, DDP_LEDGER_BLOB])
        return n

    def export(self) -> dict:
        """Everything stored about the user, decrypted and JSON-serialisable (data portability;
        see `DeviceStore.export`)."""
        return self.store.export()

    def ledger(self) -> DeviceLedger:
        """The device's privacy ledger: every release it took part in, per unit (raises
        RollbackError when an older copy was put back or it was deleted)."""
        return load_ledger(self.store, self.policy.delta)

    def privacy(self, budget: float | None = None) -> dict:
        """The privacy spent so far, for the user (client/private_round.py, privacy_report);
        `budget`: an event-level epsilon to report what is left of."""
        return privacy_report(self.ledger(), self.policy, budget)

    # -- federation ---------------------------------------------------------------------------
    def fit(self, global_weights: list[np.ndarray], cfg: RunConfig, server_round: int,
            seed: int | None = None, proximal_mu: float = 0.0, run_id: int = 0):
        """One round of local training as the device's policy allows it, on all events but
        the last `cfg.holdout` (client/private_round.py).

        Args:
            global_weights: the global model's arrays, in wire-schema order.
            cfg: the round's request (the server's round config); the policy reviews it.
            server_round, run_id: the round and run; a round answered before is declined.
            seed: the round's seed; default: the device draws it (`training_seed`).
            proximal_mu: FedProx's proximal term; 0 = none.

        Returns:
            A `client.dp_training.TrainResult`; a declined round returns the global weights
            unchanged, `refused` a `client.policy.Decline` (`reason`: what the server sees).
        """
        return train_round(self, global_weights, cfg, server_round, run_id, seed, proximal_mu)

    def rerun(self, global_weights: list[np.ndarray], cfg: RunConfig, server_round: int,
              seed: int, proximal_mu: float = 0.0):
        """Re-run a round's training exactly (seed: `used_seed`) for the key holder (an
        auditor, on a copy of the store): no policy, no ledger, nothing recorded."""
        from fedinterest.shared.privacy import DeviceLedger

        ledger = DeviceLedger(delta=cfg.delta).event_view() if cfg.event_dp else None
        return local_training(self, global_weights, cfg, server_round, seed, proximal_mu, ledger)

    def evaluate(self, global_weights: list[np.ndarray], cfg: RunConfig) -> dict[str, float]:
        """Leave-last-out on the device: rank the full catalog for the held-out events (test =
        last, validation = second to last), earlier items excluded. Only sums and counts.
        Adopts the weights as the device's model (`load_global_model`).

        Returns:
            {"val-users", "test-users"} (0 or 1; 0 with fewer than 3 events) and, per split,
            "hits@10", "ndcg@10-sum", "mrr@10-sum".
        """
        self.load_global_model(global_weights, cfg)
        model = self._model
        items, ts, tv, _, _ = self._history()
        out: dict[str, float] = {}
        if len(items) < 3:
            return {"val-users": 0.0, "test-users": 0.0}
        emb = self._item_embeddings(model)
        for split, t in (("val", len(items) - 2), ("test", len(items) - 1)):
            with torch.inference_mode():
                scores = model.score(self._states(model, [(items[:t], ts[:t], tv[:t])]),
                                     emb).numpy()
            exclude = np.zeros_like(scores, dtype=bool)
            exclude[0, items[:t]] = True
            acc = RankingAccumulator(10)
            acc.add(scores, items[t:t + 1], exclude, track_coverage=False)
            out[f"{split}-users"] = float(acc.n)
            out[f"{split}-hits@10"] = acc.hits
            out[f"{split}-ndcg@10-sum"] = acc.ndcg
            out[f"{split}-mrr@10-sum"] = acc.mrr
        return out

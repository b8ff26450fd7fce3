"""`fedinterest embed`: embed a dataset's public catalog once, so later runs read it from cache."""

from __future__ import annotations

import argparse
import time

from fedinterest.shared.embedding_cache import EmbeddingCache, default_cache_dir
from fedinterest.shared.encoder import TextEncoder, catalog_vectors
from fedinterest.shared.errors import ConfigError

from .vocabulary import add_data, add_encoder, need


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed a dataset's catalog texts (cached on disk)",
        description="Embeds the public item texts of a dataset's catalog with the text encoder "
        "and stores the vectors in the embedding cache (private user text is never cached). "
        "Reports throughput, cache hits and where the vectors are.",
    )
    add_data(p, required=True)
    add_encoder(p, old_model_alias=True)
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per batch")
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="D",
        help=f"cache folder (default: $FEDINTEREST_CACHE or {default_cache_dir()})",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # imported here: the dataset dispatcher pulls in every loader, which `--help` does not need
    from fedinterest.simulations.data import load_dataset

    need(args, "data")
    if args.no_cache and args.cache_dir:
        raise ConfigError("--no-cache and --cache-dir exclude each other")
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir)
    encoder = TextEncoder(args.encoder, batch_size=args.batch_size, cache=cache)
    dataset = load_dataset(args.data)
    n = len(dataset.catalog)

    start = time.perf_counter()
    vectors = catalog_vectors(dataset.catalog, encoder, progress=True)
    seconds = time.perf_counter() - start
    embed_seconds = max(seconds - encoder.load_seconds, 1e-9)

    print(
        f"{dataset.name}: {n} item texts -> {vectors.shape[1]}-d vectors with {encoder.name} "
        f"in {seconds:.2f} s ({n / embed_seconds:,.0f} texts/s"
        + (f"; model load {encoder.load_seconds:.2f} s" if encoder.load_seconds > 1e-3 else "")
        + ")"
    )
    if cache is None:
        print("cache: off (--no-cache), nothing stored")
    else:
        looked_up = cache.hits + cache.misses
        print(f"cache hits: {cache.hits} of {looked_up} distinct texts")
        if cache.corrupt:
            print(f"cache: {cache.corrupt} corrupt entries found and recomputed")
        print(f"vectors cached in {cache.path} (encoder {encoder.identity})")
    return 0

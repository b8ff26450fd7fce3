"""`fedinterest data stats DATASET`: what a loader made of a dataset, before anyone trains on it.

Prints users, items, events, private texts, ratings, the time span, the tie share (how often a
user's consecutive events share a timestamp: there the (timestamp, item id) tie-break, not the
user, decides the order) and everything the loader skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from fedinterest.shared.errors import ConfigError
from fedinterest.simulations.data import load_dataset, parse_mapping

from .vocabulary import add_data, need


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="inspect datasets")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    stats = sub.add_parser(
        "stats",
        help="load a dataset and print its size, time span, tie share and skipped rows",
        description="Load a dataset and print what the loader made of it.",
    )
    add_data(stats, required=True,
             help="a MovieLens folder (e.g. ../shared/data/ml-latest-small), an Amazon "
                  "*.json[l][.gz], a *.csv (with --map) or 'synthetic[:KEY=VAL,...]'")
    # the dataset used to be positional: still accepted, hidden, with a note
    stats.add_argument("dataset_positional", nargs="?", help=argparse.SUPPRESS)
    stats.add_argument(
        "--map", action="append", metavar="KEY=COL,...",
        help="column mapping for a generic CSV, e.g. user=uid,item=iid,timestamp=ts,rating=r,"
             "text=review,item_text=title,items_path=items.csv,delimiter=tab",
    )
    stats.add_argument("--meta", metavar="PATH", help="Amazon metadata JSON-lines file")
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    stats.set_defaults(func=run_stats)


def _date(ts: int | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


def collect_stats(dataset: str, options: dict) -> dict:
    """Loads the dataset and returns the numbers `data stats` prints."""
    start = time.perf_counter()
    ds = load_dataset(dataset, **options)
    seconds = time.perf_counter() - start
    out = ds.stats()
    out.update(
        notes=len(ds.notes),
        date_start=_date(out["time_start"]),
        date_end=_date(out["time_end"]),
        skip_summary=ds.skipped.summary(),
        skip_counts=dict(ds.skipped.counts),
        load_info=list(ds.extras.get("load_info", [])),
        load_seconds=round(seconds, 3),
    )
    return out


def format_stats(s: dict) -> str:
    headline = (
        f"{s['dataset']}: {s['users']:,} users, {s['items']:,} items, {s['events']:,} events, "
        f"{s['texts']:,} texts"
    )
    texts = (
        f"{s['texts']:,} private text pieces ({s['events_with_text']:,} events with text, "
        f"{s['notes']:,} notes without an event)"
    )
    tie = f"{s['tie_share']:.3f} (share of a user's consecutive events that share a timestamp)"
    rows = [
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,} ({s['items_with_events']:,} with events)"),
        ("events", f"{s['events']:,}"),
        ("texts", texts),
        ("ratings", f"{s['ratings']:,}"),
        ("time span", f"{s['date_start']} .. {s['date_end']} (UTC)"),
        ("tie share", tie),
        ("skipped", s["skip_summary"]),
        *(("note", line) for line in s["load_info"]),
        ("loaded in", f"{s['load_seconds']:.2f} s"),
    ]
    return "\n".join([headline, *(f"  {label:<12} {value}" for label, value in rows)])


def run_stats(args: argparse.Namespace) -> int:
    if args.dataset_positional is not None:
        if args.data is not None:
            raise ConfigError("give the dataset once: --data SPEC")
        print("note: a positional dataset is deprecated, use --data", file=sys.stderr)
        args.data = args.dataset_positional
    need(args, "data")
    options: dict = parse_mapping(args.map)
    if args.meta:
        options["meta"] = args.meta
    stats = collect_stats(args.data, options)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0

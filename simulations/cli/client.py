"""`fedinterest client ...`: the device SDK (client/device.py) from the command line.

What an app developer runs on a device to try the SDK against a store: record events, see
recommendations and why, the interest timeline, forget, export and the privacy spent. The key
comes from a key file or a passphrase read from an environment variable (or a terminal
prompt), never from the command line, where it would land in shell history and `ps`.
Heavy imports (torch via the SDK, transformers via the encoder) happen inside the commands so
`fedinterest --help` stays fast.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedinterest.shared.atomic_io import write_text
from fedinterest.shared.errors import ConfigError, FedinterestError

if TYPE_CHECKING:
    from fedinterest.client.device import Device
    from fedinterest.shared.published_catalog import PublishedCatalog


# --------------------------------------------------------------------------- parser


def _parent_parsers() -> tuple[argparse.ArgumentParser, ...]:
    """The flags subcommands share: the store and its key, the catalog, --json."""
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", required=True, metavar="PATH", help="the device store file")
    key = store.add_mutually_exclusive_group()
    key.add_argument("--key-file", metavar="F", help="file holding the store's 32-byte key")
    key.add_argument("--passphrase-env", metavar="VAR",
                     help="read the passphrase from environment variable VAR")
    catalog = argparse.ArgumentParser(add_help=False)
    catalog.add_argument("--catalog", required=True, metavar="PATH",
                         help="published catalog: a catalog-<version>.npz, or a folder of "
                         "them (a run's catalog/: the one the model is bound to is used)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return store, catalog, as_json


def _add_record(sub, store: argparse.ArgumentParser, catalog: argparse.ArgumentParser) -> None:
    """`fedinterest client record` and its flags."""
    r = sub.add_parser("record", parents=[store, catalog], help="store one event",
                       description="Store one event (creating the store if it does not exist) "
                       "and print its id. The item must be in the published catalog; --text is "
                       "encrypted in the store and embedded on the device.")
    r.add_argument("item", metavar="ITEM", help="catalog item id")
    r.add_argument("--text", metavar="T", help="private note about the item (stays on device)")
    r.add_argument("--timestamp", metavar="TS",
                   help="unix seconds or ISO-8601 (UTC unless it names a zone); default now")
    r.add_argument("--rating", type=float, metavar="R", help="rating (0..5)")
    r.add_argument("--encoder", metavar="PATH",
                   help="text encoder folder; must be the one that embedded the catalog "
                   "(default: the packaged all-MiniLM-L6-v2)")
    r.add_argument("--no-embed", action="store_true",
                   help="store --text without embedding it (the model then ignores it)")
    r.add_argument("--new-key", action="store_true",
                   help="create --key-file (32 random bytes, mode 0600) for a new store")
    r.set_defaults(func=cmd_record)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "client",
        help="use the on-device SDK: install-model, record, recommend, explain, forget, "
        "export, privacy",
        description="The device SDK on one encrypted store. Every subcommand takes --store and "
        "a key (--key-file, or --passphrase-env VAR; with neither, a passphrase is asked for "
        "when stdin is a terminal). recommend/explain need a model: install-model puts a "
        "run's model into the store, or a device receives it in federated evaluation rounds.",
    )
    sub = p.add_subparsers(dest="client_command", metavar="SUBCOMMAND", required=True)

    store, catalog, as_json = _parent_parsers()
    _add_record(sub, store, catalog)

    rec = sub.add_parser("recommend", parents=[store, catalog, as_json],
                         help="top-k unseen items for the current interests")
    rec.add_argument("-k", type=int, default=10, metavar="K", help="how many (default 10)")
    rec.set_defaults(func=cmd_recommend)

    ex = sub.add_parser("explain", parents=[store, catalog, as_json],
                        help="why an item is recommended: the past events behind its score")
    ex.add_argument("item", metavar="ITEM", help="catalog item id")
    ex.add_argument("--top", type=int, default=3, metavar="N",
                    help="past events to show (default 3)")
    ex.set_defaults(func=cmd_explain)

    it = sub.add_parser("interests", parents=[store, catalog, as_json],
                        help="the interest timeline (topic shares over recent events)")
    it.add_argument("--png", metavar="FILE", help="also draw the timeline into a PNG file")
    it.add_argument("--window", type=int, default=10, metavar="N",
                    help="events per sliding window (default 10)")
    it.set_defaults(func=cmd_interests)

    fg = sub.add_parser("forget", parents=[store],
                        help="delete events (all, one item, or before a time) from the store",
                        description="Delete events and purge them from the file. With neither "
                        "--item nor --before, everything is deleted except the privacy ledger "
                        "(spent privacy cannot be un-spent). The model is kept.")
    which = fg.add_mutually_exclusive_group()
    which.add_argument("--item", metavar="I", help="forget every event of this item")
    which.add_argument("--before", metavar="TS",
                       help="forget every event before this time (unix seconds or ISO-8601)")
    fg.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    fg.set_defaults(func=cmd_forget)

    exp = sub.add_parser("export", parents=[store],
                         help="everything stored, decrypted, as JSON (data portability)")
    exp.add_argument("--out", metavar="FILE",
                     help="write to FILE (created with mode 0600) instead of stdout")
    exp.set_defaults(func=cmd_export)

    pv = sub.add_parser("privacy", parents=[store, as_json],
                        help="event-level epsilon this device has spent")
    pv.add_argument("--budget", type=float, metavar="EPS",
                    help="show how much of this epsilon budget is left")
    pv.set_defaults(func=cmd_privacy)

    _add_install_model(sub, store)


def _add_install_model(sub, store: argparse.ArgumentParser) -> None:
    """`fedinterest client install-model` and its flags."""
    im = sub.add_parser(
        "install-model", parents=[store],
        help="install a trained model from a run directory or checkpoint",
        description="Install the model of a run (its newest checkpoints/round-NNNN.npz, or the "
        "checkpoint given) into the store, bound to the catalog version it was trained against "
        "(creating the store if it does not exist). Without --catalog the run's own catalog "
        "is used; a catalog of another version is refused and nothing is stored.")
    im.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                    help="a run directory, its checkpoints/ folder or one round-NNNN.npz")
    im.add_argument("--catalog", metavar="PATH",
                    help="the device's published catalog (a file, or a folder of them); "
                    "default: the run's catalog the model is bound to")
    im.add_argument("--new-key", action="store_true",
                    help="create --key-file (32 random bytes, mode 0600) for a new store")
    im.set_defaults(func=cmd_install_model)


# --------------------------------------------------------------------------- helpers


def _passphrase(args: argparse.Namespace, creating: bool) -> str:
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            raise ConfigError(f"--passphrase-env {args.passphrase_env}: the environment "
                              "variable is not set or empty")
        return value
    if not sys.stdin.isatty():
        raise ConfigError("no key given: pass --key-file F or --passphrase-env VAR (stdin is "
                          "not a terminal, so the passphrase cannot be asked for)")
    value = getpass.getpass(f"passphrase for {args.store}: ")
    if not value:
        raise ConfigError("empty passphrase")
    if creating and getpass.getpass("repeat the passphrase: ") != value:
        raise ConfigError("the passphrases differ; nothing was created")
    return value


def _new_key_file(path: Path) -> None:
    """32 random bytes, readable by the owner only; an existing file is never overwritten."""
    from fedinterest.client.crypto import KEY_BYTES

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"--new-key: key file {path} already exists and is never "
                          "overwritten; drop --new-key to use it") from None
    except OSError as e:
        raise ConfigError(f"--new-key: cannot create key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(secrets.token_bytes(KEY_BYTES))
        f.flush()
        os.fsync(f.fileno())


def _open(args: argparse.Namespace, *, catalog: PublishedCatalog | None = None, encoder=None,
          create: bool = False) -> Device:
    from fedinterest.client.device import Device
    from fedinterest.client.store import StoreError

    store = Path(args.store)
    creating = not store.exists()
    if creating and not create:
        raise StoreError(f"{store}: no store here (`fedinterest client record` creates one)")
    if args.key_file is not None:
        if not Path(args.key_file).is_file():
            hint = " (add --new-key to create one)" if creating and create else ""
            raise ConfigError(f"--key-file {args.key_file}: no such file{hint}")
        key = {"key_file": args.key_file}
    else:
        key = {"passphrase": _passphrase(args, creating)}
    return Device.open(store, catalog=catalog, encoder=encoder, create=create, **key)


def _catalog(path: str, bound_to: str | None = None) -> PublishedCatalog:
    """The catalog at `path`: a catalog-<version>.npz, or a folder of them. A run writes two
    (before and after the popularity count); from a folder this takes the one `bound_to`
    names (the stored model's), else the one the run's model is bound to, else the newest,
    and says which on stderr."""
    from fedinterest.client.model_install import ModelSourceError, catalog_version
    from fedinterest.shared.published_catalog import PublishedCatalog

    p = Path(path)
    if p.is_dir():
        found = {f.stem.removeprefix("catalog-"): f for f in sorted(p.glob("catalog-*.npz"))}
        if not found:
            raise ConfigError(f"--catalog {p}: no catalog-<version>.npz in the folder")
        if len(found) == 1:
            return PublishedCatalog.load(next(iter(found.values())))
        why = "the one this device's model is bound to"
        if bound_to not in found:
            try:
                bound_to, why = catalog_version(p.parent), "the one the run's model is bound to"
            except ModelSourceError:
                bound_to = None
        if bound_to not in found:
            bound_to = max(found, key=lambda v: found[v].stat().st_mtime)
            why = "the newest"
        print(f"--catalog {p}: {len(found)} catalogs; using catalog-{bound_to}.npz ({why})",
              file=sys.stderr)
        p = found[bound_to]
    return PublishedCatalog.load(p)


def _open_with_catalog(args: argparse.Namespace) -> Device:
    """The device with --catalog set; from a folder of several, the stored model's."""
    dev = _open(args)
    try:
        dev.set_catalog(_catalog(args.catalog, dev.model_catalog_version()))
    except BaseException:
        dev.close()
        raise
    return dev


def _encoder(path: str | None, catalog: PublishedCatalog):
    """The encoder for private text; it must be the catalog's, or the vectors would live in
    another space than the item vectors the model was trained with."""
    from fedinterest.shared.encoder import TextEncoder

    enc = TextEncoder(path)
    # the part after '@' (weights digest, truncation, pooling) decides the vectors; the name
    # before it is only the folder's name
    if enc.identity.split("@", 1)[-1] != catalog.encoder_identity.split("@", 1)[-1]:
        raise ConfigError(
            f"--encoder: {enc.identity} is not the encoder that embedded the catalog "
            f"({catalog.encoder_identity}); pass that model's folder with --encoder, or "
            "--no-embed to store the text without a vector")
    return enc


def _timestamp(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected unix seconds or an ISO-8601 date/time "
                          "(e.g. 2024-05-01T12:00:00)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _events(n: int) -> str:
    return f"{n} event" + ("" if n == 1 else "s")


def _one_line(text: str | None, limit: int = 60) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= limit else t[:limit - 3] + "..."


# --------------------------------------------------------------------------- commands


def cmd_record(args: argparse.Namespace) -> int:
    """`fedinterest client record`. Stores one event (creating the store if needed) and prints its id.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    catalog = _catalog(args.catalog)
    ts = None if args.timestamp is None else _timestamp(args.timestamp, "--timestamp")
    encoder = (_encoder(args.encoder, catalog) if args.text and not args.no_embed else None)
    store = Path(args.store)
    created_key = False
    if args.new_key:
        if args.key_file is None:
            raise ConfigError("--new-key needs --key-file F (where to write the new key)")
        if store.exists():
            raise ConfigError(f"--new-key: {store} already exists; a new key cannot open it")
        _new_key_file(Path(args.key_file))
        created_key = True
    created_store = not store.exists()
    try:
        with _open(args, catalog=catalog, encoder=encoder, create=True) as dev:
            event_id = dev.record(args.item, text=args.text, timestamp=ts, rating=args.rating)
    except BaseException:
        # a failed first record leaves nothing behind: not an empty store, not an unused key
        if created_store:
            for f in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
                f.unlink(missing_ok=True)
        if created_key:
            Path(args.key_file).unlink(missing_ok=True)
        raise
    if created_store:
        print(f"created store {store}", file=sys.stderr)
    print(event_id)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """`fedinterest client recommend`. Prints the top -k unseen catalog items for the current interests.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    if args.k < 1:
        raise ConfigError(f"-k: expected a positive number of items, got {args.k}")
    with _open_with_catalog(args) as dev:
        recs = dev.recommend(args.k)
    rows = [{"rank": i, "item": r.item, "score": r.score, "text": r.text}
            for i, r in enumerate(recs, 1)]
    if args.json:
        _print_json(rows)
        return 0
    width = max([len("item")] + [len(r["item"]) for r in rows])
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>8}  text")
    for r in rows:
        print(f"{r['rank']:>4}  {r['item']:<{width}}  {r['score']:>8.3f}  {r['text']}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """`fedinterest client explain`. Prints why an item is recommended: the past events that weigh most.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    if args.top < 1:
        raise ConfigError(f"--top: expected a positive number of events, got {args.top}")
    with _open_with_catalog(args) as dev:
        exp = dev.explain(args.item, top=args.top)
    if args.json:
        _print_json({"item": exp.item, "reason": exp.reason,
                     "contributions": exp.contributions})
        return 0
    print(exp.reason)
    if exp.contributions:
        print("\npast events behind the score (share of the score lost without the event):")
    for c in exp.contributions:
        line = f"  {c['share']:6.1%}  {_when(c['timestamp'])}  {c['item']}  {c['text']}"
        if c.get("note"):
            line += f"  (your note: {_one_line(c['note'])})"
        print(line)
    return 0


def cmd_interests(args: argparse.Namespace) -> int:
    """`fedinterest client interests`. Prints (or plots) the interest timeline over recent events.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    if args.window < 1:
        raise ConfigError(f"--window: expected a positive number of events, got {args.window}")
    with _open_with_catalog(args) as dev:
        try:
            data = dev.interests(window=args.window, png=args.png)
        except OSError as e:
            raise FedinterestError(f"--png {args.png}: cannot write it ({e.strerror or e})"
                                   ) from None
    if args.json:
        _print_json(data)
    else:
        print(f"interest timeline ({len(data['timeline'])} events, topic shares over the last "
              f"{args.window}):")
        for row in data["timeline"]:
            top = sorted(row["topics"].items(), key=lambda kv: -kv[1])[:3]
            shares = "  ".join(f"{t} {s:.0%}" for t, s in top) or "(no topics)"
            print(f"  {_when(row['timestamp'])}  {shares}")
        if data["predicted_next"]:
            top = sorted(data["predicted_next"].items(), key=lambda kv: -kv[1])[:5]
            print("predicted next: " + "  ".join(f"{t} {p:.0%}" for t, p in top))
    if args.png:
        print(f"timeline plot: {args.png}", file=sys.stderr)
    return 0


def cmd_install_model(args: argparse.Namespace) -> int:
    """`fedinterest client install-model`. Puts a run's model into the store, bound to its catalog version.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    store = Path(args.store)
    if args.new_key:
        if args.key_file is None:
            raise ConfigError("--new-key needs --key-file F (where to write the new key)")
        if store.exists():
            raise ConfigError(f"--new-key: {store} already exists; a new key cannot open it")
    from fedinterest.client.model_install import read_trained_model

    trained = read_trained_model(args.source)  # fails before anything is created
    catalog = _catalog(args.catalog, trained.catalog_version) if args.catalog else None
    created_store = not store.exists()
    if args.new_key:
        _new_key_file(Path(args.key_file))
    try:
        with _open(args, catalog=catalog, create=True) as dev:
            dev.install_model(trained.checkpoint)
    except BaseException:
        if created_store:  # a refused install leaves nothing behind
            for f in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
                f.unlink(missing_ok=True)
        if args.new_key:
            Path(args.key_file).unlink(missing_ok=True)
        raise
    print(f"installed the model of {trained.checkpoint} into {store}, bound to catalog "
          f"{trained.catalog_version} ({trained.catalog_path})")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """`fedinterest client forget`. Deletes events (one item, everything before a time, or all); the ledger stays.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    before = None if args.before is None else _timestamp(args.before, "--before")
    with _open(args) as dev:
        events = dev.store.events()
        if args.item is not None:
            n = sum(e.item == args.item for e in events)
            what = f"{_events(n)} of item {args.item}"
        elif before is not None:
            n = sum(e.timestamp < before for e in events)
            what = f"{_events(n)} before {_when(before)} UTC"
        else:
            n, what = len(events), f"all {_events(len(events))}, their notes and vectors"
        if n == 0:
            print("nothing to forget: no event matches", file=sys.stderr)
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError(f"forget would delete {what} from {args.store}; confirm with "
                                  "--yes (stdin is not a terminal, so I cannot ask)")
            answer = input(f"Delete {what} from {args.store}? This cannot be undone [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=sys.stderr)
                return 1
        deleted = dev.forget(item=args.item, before=before)
    print(f"forgot {_events(deleted)}; the model stays (it holds none of them)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`fedinterest client export`. Prints everything stored about the user as JSON (data portability).

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    with _open(args) as dev:
        data = dev.export()
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    try:  # the export holds the user's text in the clear: owner-only, written atomically
        write_text(out, text, mode=0o600)
    except OSError as e:
        raise FedinterestError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    print(f"exported {_events(len(data['events']))} and {len(data['blobs'])} blobs to {out} "
          "(decrypted: it holds your private text in the clear)", file=sys.stderr)
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    """`fedinterest client privacy`. Prints the privacy spent per unit and the budget left.

    Args:
        args: the parsed command line (--store and a key source, plus the verb's flags).

    Returns:
        The exit code (0 on success).
    """
    if args.budget is not None and not args.budget > 0:
        raise ConfigError(f"--budget: expected a positive epsilon, got {args.budget}")
    with _open(args) as dev:
        info = dev.privacy(args.budget)
    if args.json:
        _print_json(info)
        return 0
    print(f"event-level epsilon spent: {info['epsilon']:.4g} (delta {info['delta']:g})")
    print(f"unit protected: {info['unit']}")
    print(f"accounting: {info['accountant']}; rounds with training: {info['rounds_joined']}")
    if info["budget"] is not None:
        state = ("over budget" if info["epsilon"] > info["budget"]
                 else f"{info['budget_left']:.4g} left")
        print(f"budget {info['budget']:g}: {state}")
    return 0

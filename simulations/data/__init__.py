"""Dataset loaders. Each returns a `fedinterest.shared.schema.Dataset` in canonical order, with
what it skipped in `Dataset.skipped` and informational lines in `Dataset.extras["load_info"]`.

`load_dataset(spec)` picks the loader from the spec:
- "synthetic" or "synthetic:KEY=VAL,..."      -> simulations.data.synthetic.generate_world
- a folder (or file) with ratings.csv          -> MovieLens CSV (ml-latest-small, ml-25m, ...)
- a folder (or file) with u.data               -> ml-100k
- a folder (or file) with ratings.dat          -> ml-1m / ml-10m
- *.json, *.jsonl (optionally .gz)             -> Amazon reviews (option meta=PATH)
- any other *.csv (optionally .gz)             -> generic CSV (options user=, item=, timestamp=)
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedinterest.shared.errors import ConfigError
from fedinterest.shared.schema import Dataset
from fedinterest.simulations.data.amazon import load_amazon
from fedinterest.simulations.data.generic_csv import load_generic_csv, parse_mapping
from fedinterest.simulations.data.movielens import load_ml1m, load_ml100k, load_movielens_csv

__all__ = [
    "ACCEPTED",
    "default_movielens_path",
    "load_amazon",
    "load_dataset",
    "load_generic_csv",
    "load_ml1m",
    "load_ml100k",
    "load_movielens_csv",
    "parse_mapping",
]

ACCEPTED = (
    "accepted datasets: 'synthetic' or 'synthetic:KEY=VAL,...'; a MovieLens folder with "
    "ratings.csv + movies.csv (tags.csv optional), u.data + u.item (ml-100k) or ratings.dat + "
    "movies.dat (ml-1m); Amazon reviews *.json / *.jsonl / *.json.gz (meta=PATH for item "
    "metadata); any other *.csv with a column mapping user=COL,item=COL,timestamp=COL"
)
_FOLDER_LOADERS = {"ratings.csv": load_movielens_csv, "u.data": load_ml100k,
                   "ratings.dat": load_ml1m}
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def default_movielens_path() -> Path | None:
    """../shared/data/ml-latest-small beside the repository checkout, if it is there."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            candidate = parent.parent / "shared" / "data" / "ml-latest-small"
            return candidate if (candidate / "ratings.csv").is_file() else None
    return None


def _literal(value: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return value.strip()


def _call(loader: Callable[..., Dataset], target: Path, options: dict) -> Dataset:
    """Calls a loader, turning unknown or missing options into a ConfigError that lists them."""
    params = list(inspect.signature(loader).parameters.values())[1:]
    accepted = [p.name for p in params]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{loader.__name__}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    missing = [p.name for p in params
               if p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        hint = " (a generic CSV needs a column mapping, e.g. --map user=uid,item=iid,timestamp=ts)"
        raise ConfigError(
            f"{target}: missing option(s) {', '.join(missing)}"
            + (hint if loader is load_generic_csv else "")
        )
    return loader(target, **options)


def load_dataset(spec: str | Path, **options: Any) -> Dataset:
    """Loads whatever `spec` names (see the module docstring); `options` go to the loader."""
    spec_s = str(spec)
    if spec_s == "synthetic" or spec_s.startswith("synthetic:"):
        overrides = {k: _literal(v) for k, v in parse_kv(spec_s.partition(":")[2]).items()}
        overrides.update(options)
        try:  # imported here: the generator is optional for every other dataset
            from fedinterest.simulations.data.synthetic import generate_world
        except ModuleNotFoundError as e:
            if e.name != "fedinterest.simulations.data.synthetic":
                raise
            raise ConfigError("synthetic: the world generator is not installed") from None
        return generate_world(**overrides)

    path = Path(spec_s).expanduser()
    if not path.exists():
        raise ConfigError(f"{spec_s}: no such file or folder; {ACCEPTED}")
    if path.is_dir():
        for marker, loader in _FOLDER_LOADERS.items():
            if (path / marker).is_file():
                return _call(loader, path, options)
        raise ConfigError(f"{spec_s}: no ratings.csv, u.data or ratings.dat in this folder; "
                          f"{ACCEPTED}")
    name = path.name.lower()
    # a ratings.csv given a column mapping is someone's own CSV, not MovieLens
    if name in _FOLDER_LOADERS and not (name == "ratings.csv" and options):
        return _call(_FOLDER_LOADERS[name], path.parent, options)
    if name.endswith(_JSON_SUFFIXES):
        return _call(load_amazon, path, options)
    if name.endswith((".csv", ".csv.gz")):
        return _call(load_generic_csv, path, options)
    raise ConfigError(f"{spec_s}: unrecognised file type; {ACCEPTED}")


def parse_kv(text: str) -> dict[str, str]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (values stay strings)."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, found {part!r}")
        out[key.strip()] = value.strip()
    return out

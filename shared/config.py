"""Run configuration shared by the simulation runner, the ServerApp and the devices.

One flat dataclass so the same keys work in a TOML file, on the command line
(`--set local-epochs=2`), in pyproject's [tool.flwr.app.config] and in Flower's
`--run-config` (dashes there, underscores here). Values are checked by the rules below, not
by pydantic: a pydantic version was barely shorter and slowed every device start, which
validates the stored model's config (docs/SDK.md, "Install").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

# "ddp-event" / "ddp-user": distributed DP under SecAgg+ (shared/distributed_dp.py): devices
# clip, add a Skellam share of the noise, and the server decodes only the noisy sum.
DP_MODES = ("off", "event", "user", "both", "ddp-event", "ddp-user")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
MODELS = ("gru-text", "transformer-text")
CLIENT_OPTIMIZERS = ("sgd", "adam")
# What a train reply carries (shared/wire.py): "arrays" one Flower array per tensor; "fp32" one
# lossless compressed blob (encode_update); "fp16" one blob of float16(update - global).
UPDATE_FORMATS = ("arrays", "fp32", "fp16")


@dataclass
class RunConfig:
    """Every run setting with its default; FIELD_HELP below says what each one means (the
    help of `fedinterest simulate` is generated from it)."""

    dataset: str = "synthetic"
    out_dir: str = "runs/latest"
    seed: int = 0
    # the default run (distributed DP, 24 rounds of 10 devices): docs/RESULTS.md, issue 15
    rounds: int = 24
    clients_per_round: int = 10
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trim_beta: float = 0.2
    min_clients: int = 2
    max_update_norm: float = 50.0
    secagg: bool = False
    update_format: str = "fp32"
    secagg_min_contributors: int = 3
    model: str = "gru-text"
    hidden: int = 64
    segment_len: int = 50
    n_negatives: int = 256
    local_epochs: int = 1
    batch_size: int = 8
    lr: float = 0.1
    client_optimizer: str = "sgd"
    lr_final_fraction: float = 1.0
    text_prior: int = 20
    prior_rank: int = 0
    dp: str = "ddp-event"
    noise_multiplier: float = 1.181  # two rounds and the count fit in 8 (PRIVACY.md, count)
    max_grad_norm: float = 0.5
    device_epsilon: float = 8.0
    dp_sample_rate: float = 0.25
    dp_steps: int = 2
    delta: float = 1e-5
    reproducible_seeds: bool = False
    user_noise_multiplier: float = 1.0
    user_clip: float = 1.0
    user_epsilon: float = 8.0
    ddp_sample_rate: float = 1.0
    ddp_min_fraction: float = 0.8
    ddp_normaliser: float = 0.0
    ddp_server_optimizer: str = "adam"
    ddp_server_lr: float = 0.05
    ddp_momentum: float = 0.9
    ddp_segments_per_device: float = 1.0
    ddp_train_only: str = "prior.recency,prior.pop"
    popularity: bool = True
    popularity_noise: float = 1.4  # device-noised in ddp runs: cohorts of 31 (PRIVACY.md)
    popularity_max_items: int = 32
    popularity_devices: int = 300
    popularity_cohort: int = 31
    holdout: int = 2
    eval_every: int = 12
    eval_initial: bool = True
    eval_clients: int = 0
    message_log: bool = True

    def __post_init__(self) -> None:
        for name, typ in _types().items():  # RunConfig(lr=1) means lr = 1.0, np.int64(3) is 3
            value = getattr(self, name)
            if typ in (int, float) and type(value) is not typ and _is_number(value):
                setattr(self, name, _number(name, value, typ, "config"))
        self.validate()

    def validate(self) -> None:
        for name in _types():
            problem = _field_problem(name, getattr(self, name))
            if problem:
                raise ConfigError(f"{name}: {problem}")

    @property
    def event_dp(self) -> bool:
        return self.dp in ("event", "both")

    @property
    def user_dp(self) -> bool:
        return self.dp in ("user", "both")

    @property
    def distributed_dp(self) -> bool:
        """Distributed DP under SecAgg+ (either unit); event_dp / user_dp are then False."""
        return self.dp.startswith("ddp-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flower(self) -> dict[str, Any]:
        """Flat dash-keyed dict for Flower ConfigRecords / run_config."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Keys with dashes or underscores; values converted to the field's type. Every
        problem is a ConfigError naming `source`, the key and what was expected."""
        return _build(_settings(values, source))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def round_lr(self, server_round: int) -> float:
        """The devices' lr in round `server_round` (1-based): cosine from lr at round 1 to
        lr * lr_final_fraction at round `rounds`, a pure function of the round so a resumed
        run continues the same schedule."""
        if self.lr_final_fraction == 1.0 or self.rounds <= 1:
            return self.lr
        t = min(max(server_round - 1, 0) / (self.rounds - 1), 1.0)
        scale = self.lr_final_fraction + (1 - self.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * t))
        return self.lr * scale


# What each setting means, by section: the one source of `fedinterest simulate --help`.
FIELD_HELP: dict[str, dict[str, str]] = {
    "data and output": {
        "dataset": "dataset: 'synthetic[:KEY=VAL,...]', a MovieLens folder (e.g. "
                   "../shared/data/ml-latest-small), an Amazon *.json[l][.gz] or a *.csv",
        "out_dir": "run directory (results.json, checkpoints/, report.html, devices/)",
        "seed": "seed of the server's sampling and of the run's own randomness",
    },
    "federation": {
        "rounds": "federated training rounds",
        "clients_per_round": "devices the server samples per round",
        "strategy": "server aggregation strategy",
        "proximal_mu": "FedProx: weight of the proximal term",
        "server_lr": "FedAdam: the server's learning rate",
        "trim_beta": "FedTrimmedAvg: share trimmed at each end",
        "min_clients": "a round proceeds with at least this many replies",
        "max_update_norm": "replies whose update has a larger L2 norm are rejected as malformed",
        "secagg": "train rounds under hardened SecAgg+ (the server sees only the sum)",
        "update_format": "what a train reply carries: arrays (one per tensor), fp32 (one "
                         "lossless compressed blob), fp16 (float16 of update - global); "
                         "ignored under secagg",
        "secagg_min_contributors": "fewest devices a SecAgg+ release may sum; devices never "
                                   "accept fewer than their own floor",
    },
    "model and local training": {
        "model": "the recommender on the devices",
        "hidden": "width of the interest state",
        "segment_len": "events per disjoint training segment (one DP-SGD example)",
        "n_negatives": "sampled negatives per training step",
        "local_epochs": "passes over the device's segments per round",
        "batch_size": "segments per step; under event DP the fixed divisor of the noisy sum",
        "lr": "the devices' learning rate (docs/DESIGN.md, tuning history)",
        "client_optimizer": "the devices' optimizer (client/dp_training.py)",
        "lr_final_fraction": "cosine from lr in round 1 to lr x this in the last round; "
                             "1 = constant",
        "text_prior": "> 0: score = cosine to the mean text vector of the last this many "
                      "items (a public prior, shared/text_prior.py) + a learned correction; "
                      "0 = the model alone",
        "prior_rank": "rank of the text prior's zero-initialised query adapter",
    },
    "differential privacy": {
        "dp": "off, event (DP-SGD on each device), user (DP-FedAvg on the server), both, or "
              "distributed DP under SecAgg+: ddp-event (DP-FedSGD), ddp-user (DP-FedAvg)",
        "noise_multiplier": "event level (DP-SGD): noise std / max_grad_norm",
        "max_grad_norm": "event level: per-segment L2 clip",
        "device_epsilon": "event level: each device's budget over every round it joins",
        "dp_sample_rate": "event level: each segment joins each DP-SGD step with this "
                          "probability (fixed, never a function of the history's length)",
        "dp_steps": "event level: DP-SGD steps per round, whatever the history's length",
        "delta": "delta of every epsilon the run reports",
        "reproducible_seeds": ("simulations only: provision the devices to seed their randomness "
                               "from a device secret and (seed, round), so a run repeats, "
                               "instead of the OS CSPRNG; the audit reports it, and a device "
                               "never takes it from the round config (client/policy.py)"),
        "user_noise_multiplier": "user level (DP-FedAvg): noise std / user_clip",
        "user_clip": "user level: L2 clip of one device's update",
        "user_epsilon": "user level: the run stops before exceeding it",
    },
    "distributed DP (dp = ddp-event / ddp-user; clip, noise and budget as above)": {
        "ddp_sample_rate": "ddp-event: each device keeps each segment with this chance",
        "ddp_min_fraction": "a round releases only if this share of the sampled devices joins",
        "ddp_normaliser": "the decoded sum is divided by this; 0 = expected examples",
        "ddp_server_optimizer": "the server's optimizer on the noisy mean",
        "ddp_server_lr": "the server optimizer's learning rate",
        "ddp_momentum": "momentum: heavy ball; adam: beta1 (beta2 = 0.999)",
        "ddp_segments_per_device": "public guess of segments per device (for the normaliser)",
        "ddp_train_only": "comma-separated parameter-name prefixes trained; empty = all",
    },
    "popularity feature (DP release of item counts summed under SecAgg+)": {
        "popularity": "count item popularity on the devices and publish it with DP noise",
        "popularity_noise": "noise multiplier (std / sqrt(popularity_max_items))",
        "popularity_max_items": "at most this many 1s in a device's 0/1 item vector",
        "popularity_devices": "devices sampled for the count (more than exist = all)",
        "popularity_cohort": "devices per SecAgg+ round of the count",
    },
    "evaluation": {
        "holdout": "leave-last-out: the last events held out (validation, test)",
        "eval_every": "evaluate every this many rounds (and the last); 0 = last only",
        "eval_initial": "also evaluate the untrained model before round 1 (results.json "
                        "'initial'), the baseline the rounds must beat",
        "eval_clients": "devices evaluated per evaluation round (one fixed seeded sample; "
                        "every device in the last round); 0 = every device",
        "message_log": "record every message for the audit (server/message_log.py)",
    },
}
# the settings that take one of a few values (the rules below check them)
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": STRATEGIES, "update_format": UPDATE_FORMATS, "model": MODELS,
    "client_optimizer": CLIENT_OPTIMIZERS, "dp": DP_MODES,
    "ddp_server_optimizer": SERVER_OPTIMIZERS,
}


INT64_MAX = 2**63 - 1  # Flower carries run settings in ConfigRecords as sint64

# Allowed values per field beyond its type: (test, what is expected). A field without an entry
# may take any value of its type. NaN fails every test (comparisons with NaN are false).
_finite = math.isfinite
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (bool, "a non-empty string"),
    "out_dir": (bool, "a non-empty string"),
    "seed": (lambda v: 0 <= v <= INT64_MAX, f"an integer in [0, {INT64_MAX}]"),
    **{name: (choices.__contains__, f"one of {', '.join(choices)}")
       for name, choices in CHOICES.items()},
    "ddp_sample_rate": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "ddp_min_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "ddp_momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "ddp_normaliser": (lambda v: 0 <= v and _finite(v), "a finite number >= 0"),
    **dict.fromkeys(
        ("rounds", "clients_per_round", "local_epochs", "batch_size", "hidden", "segment_len",
         "n_negatives", "min_clients", "popularity_max_items", "popularity_devices",
         "popularity_cohort", "secagg_min_contributors"),
        (lambda v: 1 <= v <= INT64_MAX, f"an integer in [1, {INT64_MAX}]")),
    # the last two events are validation and test: fewer would train on them
    "holdout": (lambda v: 2 <= v <= INT64_MAX, f"an integer in [2, {INT64_MAX}]"),
    "dp_sample_rate": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "dp_steps": (lambda v: 1 <= v <= 10_000, "an integer in [1, 10000]"),
    **dict.fromkeys(("eval_every", "eval_clients"),  # 0 = never / every device
                    (lambda v: 0 <= v <= INT64_MAX, f"an integer in [0, {INT64_MAX}]")),
    **dict.fromkeys(
        ("lr", "server_lr", "noise_multiplier", "max_grad_norm", "device_epsilon", "user_clip",
         "user_epsilon", "max_update_norm", "ddp_server_lr", "ddp_segments_per_device"),
        (lambda v: 0 < v and _finite(v), "a positive finite number")),
    # 0 = no noise (epsilon infinite, which the audit reports); negative noise is meaningless
    **dict.fromkeys(("proximal_mu", "user_noise_multiplier", "popularity_noise"),
                    (lambda v: 0 <= v and _finite(v), "a finite number >= 0")),
    "lr_final_fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "text_prior": (lambda v: 0 <= v <= 1000, "an integer in [0, 1000]"),
    "prior_rank": (lambda v: 0 <= v <= 1024, "an integer in [0, 1024]"),
    "trim_beta": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),  # as Flower's FedTrimmedAvg
    "delta": (lambda v: 0 < v < 1, "a number in (0, 1)"),
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _types() -> dict[str, type]:
    """Each field's type, read off its default (every field has a plain default)."""
    return {f.name: type(f.default) for f in fields(RunConfig)}


def _field_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for field `name`, or None. Types are exact: a bool is not
    an integer here, although Python says it is."""
    typ = _types()[name]
    if type(value) is not typ:
        return f"expects {_TYPE_NAMES.get(typ, typ.__name__)}, got {_show(value)}"
    test, expected = _RULES.get(name, (None, ""))
    if test is not None and not test(value):
        return f"expects {expected}, got {_show(value)}"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_number(value: Any) -> bool:
    """Python and numpy numbers, but not bools (True would silently mean 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _number(key: str, value: numbers.Real, typ: type, source: str) -> int | float:
    """`value` as an int (integral values only) or a float (ints too large for one are an
    error, not an OverflowError)."""
    try:
        if typ is float:
            return float(value)
        as_float = float(value) if not isinstance(value, numbers.Integral) else None
        if as_float is not None and not as_float.is_integer():
            raise ValueError
        return int(value)
    except (OverflowError, ValueError):
        raise ConfigError(f"{source}: key '{key}' expects {_TYPE_NAMES[typ]}, got "
                          f"{_show(value)}" + (", too large for a float" if typ is float
                                               else "")) from None


def _coerce(key: str, value: Any, typ: type, source: str) -> Any:
    """The value as `typ`: strings as a command line gives them, integral floats for ints,
    ints for floats; never a bool for a number or a number for a string."""
    bad = ConfigError(f"{source}: key '{key}' expects {_TYPE_NAMES.get(typ, typ.__name__)}, "
                      f"got {_show(value)}")
    if type(value) is typ:
        return value
    if typ is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, np.bool_) or _is_number(value) and value in (0, 1):
            return bool(value)
        raise bad
    if typ not in (int, float):
        raise bad
    if _is_number(value):
        return _number(key, value, typ, source)
    if isinstance(value, str):
        try:
            return typ(value)
        except ValueError:
            raise bad from None
    raise bad


def _settings(values: Any, source: str) -> dict[str, tuple[str, Any, str]]:
    """{field: (key as given, typed value, source)}; one setting spelled two ways (dash and
    underscore) is an error, since which one wins would depend on dict order."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a table of settings, got {_show(values)}")
    types = _types()
    out: dict[str, tuple[str, Any, str]] = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in types:
            shown = f"'{key}'" if isinstance(key, str) else f"{key!r} (not a string)"
            raise ConfigError(f"{source}: unknown key {shown} (known: "
                              f"{', '.join(sorted(types))})")
        if name in out:
            raise ConfigError(f"{source}: keys '{out[name][0]}' and '{key}' are the same "
                              "setting; give it once")
        out[name] = (key, _coerce(key, value, types[name], source), source)
    return out


def _build(settings: dict[str, tuple[str, Any, str]]) -> RunConfig:
    for name, (key, value, source) in settings.items():
        problem = _field_problem(name, value)
        if problem:
            raise ConfigError(f"{source}: key '{key}' {problem}")
    return RunConfig(**{name: value for name, (_, value, _) in settings.items()})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> RunConfig:
    """Defaults <- TOML file (top level or a [fedinterest] table) <- overrides."""
    settings: dict[str, tuple[str, Any, str]] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{p}: is a directory, expected a TOML config file") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
        table = data.get("fedinterest", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: key 'fedinterest' expects a table of settings "
                              f"([fedinterest]), got {_show(table)}")
        settings.update(_settings(table, str(p)))
        settings.update(_settings(overrides or {}, f"{p}, overridden on the command line"))
    else:
        settings.update(_settings(overrides or {}, "command line"))
    return _build(settings)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'} with a clear error for malformed items."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out

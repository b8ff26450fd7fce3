"""Run configuration shared by the simulation runner, the ServerApp and the devices.

One flat dataclass so the same keys work in a TOML file, on the command line
(`--set local-epochs=2`), in pyproject's [tool.flwr.app.config] and in Flower's
`--run-config` (dashes there, underscores here).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DP_MODES = ("off", "event", "user", "both")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
MODELS = ("gru-text", "transformer-text")


@dataclass
class RunConfig:
    # data and output
    dataset: str = "synthetic"
    out_dir: str = "runs/latest"
    seed: int = 0
    # federation
    rounds: int = 5
    clients_per_round: int = 50
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam
    trim_beta: float = 0.2  # FedTrimmedAvg
    min_clients: int = 2  # the round proceeds with at least this many replies
    max_update_norm: float = 50.0  # replies above this L2 norm are rejected as malformed
    secagg: bool = False
    # model and local training
    model: str = "gru-text"
    hidden: int = 64
    segment_len: int = 50
    n_negatives: int = 256
    local_epochs: int = 1
    batch_size: int = 8  # expected batch (Poisson sampling): segments per DP-SGD step
    # SGD step on the synthetic world (docs/RESULTS.md, issue 6): 0.1 beat 0.3 without DP
    # and 0.01 and 1.0 with event-level DP; clipped DP updates at lr >= ~0.2 carry noise of norm
    # lr * noise_multiplier * sqrt(#params) / batch, which max_update_norm rejects
    lr: float = 0.1
    # differential privacy
    dp: str = "event"
    noise_multiplier: float = 0.8  # event level (DP-SGD)
    max_grad_norm: float = 1.0  # event level per-example clip
    device_epsilon: float = 8.0  # per-device event-level budget
    delta: float = 1e-5
    user_noise_multiplier: float = 1.0  # user level (DP-FedAvg)
    user_clip: float = 1.0
    user_epsilon: float = 8.0  # stop the run before the user-level budget is exceeded
    # popularity feature: DP counts summed by the server (see server/popularity.py)
    popularity: bool = True
    popularity_noise: float = 2.0
    popularity_max_items: int = 32
    popularity_devices: int = 150  # devices sampled for the count (Shamir sharing is slow)
    # evaluation
    holdout: int = 2  # leave-last-out: the last two events are validation and test
    eval_every: int = 1
    eval_clients: int = 0  # 0 = every device

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.dp not in DP_MODES:
            raise ConfigError(f"dp: '{self.dp}' is not one of {', '.join(DP_MODES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: '{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        if self.model not in MODELS:
            raise ConfigError(f"model: '{self.model}' is not one of {', '.join(MODELS)}")
        for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "hidden",
                     "segment_len", "n_negatives", "min_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "noise_multiplier", "max_grad_norm", "device_epsilon", "user_clip",
                     "user_epsilon", "max_update_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta: must be in (0, 1), got {self.delta}")

    @property
    def event_dp(self) -> bool:
        return self.dp in ("event", "both")

    @property
    def user_dp(self) -> bool:
        return self.dp in ("user", "both")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flower(self) -> dict[str, Any]:
        """Flat dash-keyed dict for Flower ConfigRecords / run_config."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Keys with dashes or underscores; values converted to the field's type."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown key '{key}' (known: "
                                  f"{', '.join(sorted(known))})")
            kwargs[name] = _coerce(name, value, type(getattr(cls(), name)), source)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any, typ: type, source: str) -> Any:
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    try:
        if typ is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: key '{name}' expects {typ.__name__}, got {value!r}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> RunConfig:
    """Defaults <- TOML file (top level or a [fedinterest] table) <- overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
        values.update(data.get("fedinterest", data))
        return RunConfig.from_mapping({**values, **(overrides or {})}, source=str(p))
    return RunConfig.from_mapping(overrides or {}, source="command line")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x'] -> {'a': '1', 'b': 'x'} with a clear error for malformed items."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out

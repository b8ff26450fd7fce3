"""Command-line flags generated from RunConfig: one flag per setting, its help, choices and
default read from shared/config.py (FIELD_HELP, CHOICES, the dataclass defaults), so the
config is the one source of truth. Values are checked by RunConfig itself, with its wording.

Spelling: `--local-epochs` for `local_epochs`; the dataset is `--data` and the run directory
`--out`, as in every other command (simulations/cli/vocabulary.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fedinterest.shared.config import CHOICES, FIELD_HELP, RunConfig

from .vocabulary import deprecated

# settings whose flag follows the CLI's vocabulary rather than the setting's name
FLAG_NAMES = {"dataset": "--data", "out_dir": "--out"}
OLD_FLAGS = {"dataset": "--dataset", "out_dir": "--out-dir"}  # hidden, deprecated
METAVARS = {"dataset": "SPEC", "out_dir": "PATH"}


def flag(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def add_run_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One argument group per FIELD_HELP section, one flag per setting (dest: the setting's
    name, default None = not given, so a config file's value stands)."""
    defaults = RunConfig()
    for section, fields in FIELD_HELP.items():
        group = p.add_argument_group(f"run settings: {section}")
        for name, text in fields.items():
            if name in skip:
                continue
            default = getattr(defaults, name)
            if isinstance(default, bool):
                group.add_argument(flag(name), dest=name, default=None,
                                   action=argparse.BooleanOptionalAction,
                                   help=f"{text} (default: {'on' if default else 'off'})")
            else:
                choices = CHOICES.get(name)
                group.add_argument(flag(name), dest=name, default=None, choices=choices,
                                   metavar=None if choices else _metavar(name, default),
                                   help=f"{text} (default: {default})")
            if name in OLD_FLAGS:
                deprecated(group, OLD_FLAGS[name], flag(name), name)


def _metavar(name: str, default: Any) -> str:
    return METAVARS.get(name) or {int: "N", float: "X", str: "TEXT"}.get(type(default), "VALUE")


def run_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{setting: value as typed} for every setting given as a flag; RunConfig converts and
    checks them (errors name the key: "command line: key 'rounds' expects ...")."""
    return {f.name: value for f in dataclasses.fields(RunConfig)
            if (value := getattr(args, f.name, None)) is not None}

"""The words every `fedinterest` command uses for the same thing, in one place.

`--data` is a dataset, `--out` where output goes, `--encoder` the text encoder (a model
folder) and `--model` the recommender. Old spellings (`--dataset`, `--out-dir`, `embed
--model`, a positional dataset) still parse as hidden aliases that print a deprecation note;
tests/simulations/cli/test_vocabulary.py walks every command's options to keep it so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DATA_HELP = ("dataset: 'synthetic[:KEY=VAL,...]', a MovieLens folder (e.g. "
             "../shared/data/ml-latest-small), an Amazon *.json[l][.gz] or a *.csv")
ENCODER_HELP = ("text encoder: a saved model folder, or a hub name already in the local "
                "Hugging Face cache (nothing is downloaded); default: the packaged "
                "all-MiniLM-L6-v2")


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's dest and says so."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string or self.dest} is deprecated, use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated(p: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any
               ) -> None:
    """Accept `old` (hidden) as a deprecated spelling of `new`, storing into `dest`."""
    p.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, **kwargs)


def _suffix(default: str | None, required: bool) -> str:
    return " (required)" if required else f" (default: {default})" if default else ""


def add_data(p: argparse.ArgumentParser, *, default: str | None = None,
             required: bool = False, help: str | None = None) -> None:
    """`--data SPEC` (dest `data`), with `--dataset` as a deprecated alias. `required` is
    checked by `need` (argparse's own check would refuse the alias)."""
    p.add_argument("--data", dest="data", metavar="SPEC", default=default,
                   help=(help or DATA_HELP) + _suffix(default, required))
    deprecated(p, "--dataset", "--data", "data")


def add_out(p: argparse.ArgumentParser, what: str, *, default: str | None = None,
            required: bool = False) -> None:
    """`--out PATH` (dest `out`), with `--out-dir` as a deprecated alias."""
    p.add_argument("--out", dest="out", metavar="PATH", default=default,
                   help=what + _suffix(default, required))
    deprecated(p, "--out-dir", "--out", "out")


def need(args: argparse.Namespace, *names: str) -> None:
    """Raise ConfigError naming the first of `names` (dests) that was not given."""
    from fedinterest.shared.errors import ConfigError

    for name in names:
        if getattr(args, name, None) in (None, ""):
            raise ConfigError(f"--{name.replace('_', '-')} is required")


def add_encoder(p: argparse.ArgumentParser, *, old_model_alias: bool = False,
                help: str | None = None) -> None:
    """`--encoder PATH` (dest `encoder`); `old_model_alias`: where `--model` used to name
    the encoder, keep it as a deprecated alias."""
    p.add_argument("--encoder", dest="encoder", metavar="PATH", default=None,
                   help=help or ENCODER_HELP)
    if old_model_alias:
        deprecated(p, "--model", "--encoder", "encoder")

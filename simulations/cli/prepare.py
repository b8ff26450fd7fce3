"""`fedinterest prepare`: get a run directory ready for `flwr run .` (or a real deployment).

`fedinterest simulate` prepares and runs in one process. Under `flwr run` the ServerApp and
the ClientApps run in processes Flower starts, possibly in another working directory, so the
preparation is a step of its own: publish the catalog, provision one encrypted store per user,
and print the exact `flwr run` command. Paths are written absolute for that reason.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from fedinterest.shared.atomic_io import write_json
from fedinterest.shared.config import RunConfig, load_config, parse_overrides

from .vocabulary import DATA_HELP, add_data, add_encoder, add_out, need

# Flower's managed SuperLink would otherwise try to `uv sync` the app's dependencies from the
# network before every run; the package is already installed.
NO_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="prepare a run directory for `flwr run .` or a deployment",
        description="Publishes the catalog (item vectors; the DP popularity count follows in the "
                    "run, under SecAgg+) and provisions "
                    "one encrypted device store per user in --out, then prints the "
                    "`flwr run` command for a local simulation and the node config of each "
                    "device for a deployment.")
    add_out(p, "run directory (created)", required=True)
    add_data(p, help=DATA_HELP + " (default: --config's, else synthetic)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with run settings ([fedinterest] table)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run setting, e.g. --set seed=3 (repeatable)")
    add_encoder(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def prepare_run_dir(cfg: RunConfig, encoder_path: str | None = None,
                    quiet: bool = False) -> dict:
    """Prepare `cfg.out_dir` (made absolute) and record the settings it was prepared with,
    so a later `flwr run` can be checked against them. Returns prepared.json's content."""
    from fedinterest.shared.encoder import TextEncoder
    from fedinterest.simulations.data import load_dataset
    from fedinterest.simulations.simulate import prepare

    cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).expanduser().resolve()))
    ds = load_dataset(cfg.dataset)
    prepared = prepare(cfg, ds, TextEncoder(encoder_path), quiet=quiet)
    prepared["run_config"] = cfg.to_flower()
    path = Path(cfg.out_dir) / "prepared.json"
    write_json(path, prepared)
    return prepared


def run_config_arg(cfg: RunConfig, **extra) -> str:
    """`--run-config` value for a run over cfg's prepared directory: out-dir, every setting
    that differs from the defaults in pyproject's [tool.flwr.app.config], then `extra`."""
    defaults = RunConfig().to_flower()
    values = {"out-dir": cfg.out_dir}
    values.update({k: v for k, v in cfg.to_flower().items() if k != "out-dir"
                   and v != defaults[k]})
    values.update({k.replace("_", "-"): v for k, v in extra.items()})
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def flwr_run_command(cfg: RunConfig, n_devices: int) -> str:
    """The `flwr run .` command line for a local simulation of a prepared run directory."""
    return (f"{NO_INSTALL_ENV} flwr run . --run-config {shlex.quote(run_config_arg(cfg))} "
            f"--federation-config num-supernodes={n_devices}")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    return repr(v)


def main(args: argparse.Namespace) -> int:
    need(args, "out")
    overrides = parse_overrides(args.set)
    overrides["out_dir"] = args.out
    if args.data is not None:
        overrides["dataset"] = args.data
    cfg = load_config(args.config, overrides)
    cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).expanduser().resolve()))
    prepared = prepare_run_dir(cfg, args.encoder, quiet=args.quiet)
    n = int(prepared["n_devices"])
    devices = Path(prepared["devices_dir"])
    print(f"prepared {cfg.out_dir}: {n} device stores, published catalog of "
          f"{prepared['catalog_items']} items")
    print("local simulation (from the repository root):")
    print(f"  {flwr_run_command(cfg, n)}")
    print("deployment: SuperNode k runs with")
    print("  --node-config " + shlex.quote(
        f'store="{devices}/device-<k>.db" key-file="{devices}/device-<k>.key"'))
    return 0

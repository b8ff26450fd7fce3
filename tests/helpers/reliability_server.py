"""The server loop over the in-process grid in a process of its own, so that
tests/e2e/test_reliability.py can SIGKILL a real server mid-run and resume it in a new process.

    python -m tests.helpers.reliability_server CONFIG_JSON CATALOG DEVICES_DIR N_DEVICES
        [--resume] [--stop-in-round R]

--stop-in-round R: once R-1 rounds are checkpointed and R is in flight (the third device of
round R has trained), write <out_dir>/in-flight and wait to be killed. Without it the run
completes and its final weights are saved to <out_dir>/final.npz.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from fedinterest.client import client_app as capp
from fedinterest.server.server_app import run_server
from fedinterest.shared.config import RunConfig
from fedinterest.simulations.inprocess_grid import InProcessGrid, server_task_identity
from flwr.app import Message

NODE_STRIDE = 7919


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("catalog")
    ap.add_argument("devices")
    ap.add_argument("n_devices", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-in-round", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping(json.loads(Path(args.config).read_text()))
    out = Path(cfg.out_dir)
    trained: list[Message] = []

    def app(message: Message, context):
        reply = capp.app(message=message, context=context)
        rnd = int(message.content.config_records["config"].get("server-round", 0))
        if message.metadata.message_type == "train" and rnd == args.stop_in_round:
            trained.append(message)
            if len(trained) == 3:
                (out / "in-flight").write_text(str(rnd))
                time.sleep(600)  # the test kills us here
        return reply

    nodes = {NODE_STRIDE * (p + 1): {"partition-id": p} for p in range(args.n_devices)}
    with server_task_identity():
        fed = run_server(InProcessGrid(app, nodes), cfg, Path(args.catalog),
                         Path(args.devices), resume=args.resume)
    np.savez(out / "final.npz", *fed.state.weights)


if __name__ == "__main__":
    main()

"""Fixtures the device-side attack tests share."""

from __future__ import annotations

import pytest
import torch
from fedinterest.simulations.inprocess_grid import server_task_identity

from tests.helpers.device_world import make_world


@pytest.fixture
def world(tmp_path):
    """A provisioned device (tests/helpers/device_world.py), with one torch thread and the
    task identity Flower messages need, as a SuperLink would set it. New stores get the
    default policy: DP on the device, required."""
    torch.set_num_threads(1)
    with server_task_identity():
        yield make_world(tmp_path)

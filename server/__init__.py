"""Flower ServerApp: aggregation strategies, user-level DP, secure aggregation, checkpoints."""

from fedinterest.shared.optional import require

require("flwr", extra="flower", purpose="the Flower ServerApp")

"""Flower ServerApp: aggregation strategies, user-level DP, secure aggregation, checkpoints."""

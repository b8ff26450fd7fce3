"""Datasets, the synthetic world, the simulation runner, experiments, reports and the CLI."""

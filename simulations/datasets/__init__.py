"""Dataset loaders; each returns a fedinterest.shared.schema.Dataset."""

"""The contract both sides import: data schema, text encoder, model, metrics, wire schema,
privacy accounting, run configuration."""

"""What runs on a GPU node: model families, the resident (L1) pipeline, worker boot, the CLI."""

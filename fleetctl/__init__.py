"""Operator tools: the `warmfleet` CLI, the local fleet, the metrics exporter and the demo models."""

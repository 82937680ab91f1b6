"""`warmfleet`, the operator's CLI: `python -m fleetctl.cli` or the `warmfleet` script."""

from .main import main

__all__ = ["main"]

"""A real `warmfleet worker` process run under cProfile (every thread), for `bench_dispatch.py --profile`.

Run as `python -m bench._profiled_worker worker --release R …`; when the worker stops (SIGTERM, warm shutdown) the
merged stats are written to $WARMFLEET_BENCH_PROFILE (pstats' marshal format) for the bench to read."""

from __future__ import annotations

import os

PROFILE_ENV = "WARMFLEET_BENCH_PROFILE"

if __name__ == "__main__":
    from bench._profile import profiled
    from fleetctl.cli import main

    def run() -> None:
        try:
            main()
        except SystemExit:
            pass

    profiled(run).dump_stats(os.environ[PROFILE_ENV])

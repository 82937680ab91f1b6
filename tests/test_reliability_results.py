"""Where the reliability tests leave their numbers for `bench/reliability_report.py` (no tests in this module).

A test calls `record_result(...)` once per scenario; nothing is written unless WARMFLEET_RELIABILITY_RESULTS names
a folder, so an ordinary test run leaves no files behind. (Not FLEET_…: conftest clears those so tests never pick up
an operator's configuration.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RESULTS_ENV = "WARMFLEET_RELIABILITY_RESULTS"


def record_result(scenario: str, *, trials: int, sent: int, completed: int, lost: int, duplicated: int,
                  dead: int = 0, recovery_s: list[float] | None = None, bound_s: float | None = None,
                  notes: str = "") -> None:
    """One row of docs/reliability.md's table: sent = completed + dead (recorded as dead letters on purpose) + lost.
    `duplicated` counts jobs whose pipeline ran to completion twice; `recovery_s` is one measurement per trial,
    `bound_s` the bound the settings give."""
    assert sent == completed + dead + lost, (scenario, sent, completed, dead, lost)
    folder = os.environ.get(RESULTS_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    row = {"scenario": scenario, "trials": trials, "sent": sent, "completed": completed, "dead": dead, "lost": lost,
           "duplicated": duplicated, "recovery_s": [round(r, 2) for r in recovery_s or []], "bound_s": bound_s,
           "notes": notes, "at": time.time()}
    slug = "".join(c if c.isalnum() else "-" for c in scenario.lower()).strip("-")
    (Path(folder) / f"{slug}.json").write_text(json.dumps(row, indent=1))

"""`python -m bench.reliability_report`: run the fault-injection tests, collect what each scenario measured, and write
the table of docs/reliability.md (between its markers). Nothing in that table is typed by hand.

The tests write one JSON row per scenario when WARMFLEET_RELIABILITY_RESULTS names a folder
(tests/support.py: record_result); this script sets it, runs pytest on the reliability files (`--jobs N`: in N
pytest processes at once, each with its own servers), and renders the rows. `--no-run --results DIR` renders rows
collected earlier. It also writes the report's metrics into bench/results.json: reliability.min_trials_per_scenario,
reliability.lost, reliability.duplicated and reliability.kill9_recovery_s_p50 (kill -9 at the operator defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._results import entry, machine, merge_results, today

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"
RESULTS_ENV = "WARMFLEET_RELIABILITY_RESULTS"
TEST_FILES = ("tests/test_reliability.py", "tests/test_reliability_redis.py", "tests/test_reliability_cache.py",
              "tests/test_reliability_disk.py", "tests/test_reliability_boot.py", "tests/test_reliability_prod.py",
              "tests/test_time_limits.py", "tests/test_sentinel.py", "tests/test_reliability_outbox.py")
PROD_KILL9 = "kill -9 mid-generation (default settings)"
TRIALS_ENV = "WARMFLEET_RELIABILITY_TRIALS"
REPORT_TRIALS = "10"
"""Trials per scenario of the modules that read TRIALS_ENV (CI keeps their fast default); set it to override."""


def run_tests(results: Path, files: tuple[str, ...], jobs: int = 1) -> tuple[int, str]:
    """pytest on the reliability files with the results folder set, in `jobs` processes at once (the files dealt
    out in turn); returns the worst exit status and the summary lines."""
    env = {TRIALS_ENV: REPORT_TRIALS, **os.environ, RESULTS_ENV: str(results)}
    groups = [files[i::jobs] for i in range(max(1, jobs))]
    # each process its own --basetemp next to the results: a run lasts long, and pytest's default numbered folders
    # under the user's temp folder are pruned to the newest three by any other pytest session on the machine
    procs = [subprocess.Popen([sys.executable, "-m", "pytest", *group, "-q", "-p", "no:cacheprovider",
                               f"--basetemp={results.parent / f'{results.name}-tmp{i}'}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, group in enumerate(groups) if group]
    status, summaries = 0, []
    for proc in procs:
        out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        summaries.append(lines[-1].strip("= ") if lines else f"pytest exited {proc.returncode}")
        if proc.returncode:
            status = proc.returncode
            sys.stderr.write(out[-6000:])
    return status, "; ".join(summaries)


def load_rows(results: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    return sorted(rows, key=lambda r: r.get("at", 0))


def seconds(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{min(values):.1f}–{max(values):.1f} (median {statistics.median(values):.1f})"


def bound(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def render(rows: list[dict[str, Any]], summary: str) -> str:
    head = ("| scenario | trials | sent | completed | dead | lost | duplicated | recovery (s) | bound (s) | notes |\n"
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    body = [
        f"| {r['scenario']} | {r['trials']} | {r['sent']} | {r['completed']} | {r.get('dead', 0)} | {r['lost']} | "
        f"{r['duplicated']} | {seconds(r.get('recovery_s') or [])} | {bound(r.get('bound_s'))} | {r.get('notes', '')} |"
        for r in rows
    ]
    totals = {k: sum(r.get(k, 0) for r in rows) for k in ("trials", "sent", "completed", "dead", "lost", "duplicated")}
    foot = (f"\nTotals: {totals['trials']} trials, {totals['sent']} sent, {totals['completed']} completed, "
            f"{totals['dead']} dead on purpose (poison), **{totals['lost']} lost, {totals['duplicated']} duplicated**."
            "\n\n"
            f"Measured {today()} on {machine()} (shared with other test runs), by `python -m bench.reliability_report`; "
            f"tests: {summary}.")
    return "\n".join([head, *body]) + "\n" + foot


def metrics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's figures for bench/results.json."""
    out = [entry("reliability.min_trials_per_scenario", min(r["trials"] for r in rows), "trials", ">= 10"),
           entry("reliability.lost", sum(r["lost"] for r in rows), "jobs", "0"),
           entry("reliability.duplicated", sum(r["duplicated"] for r in rows), "jobs", "0")]
    prod = next((r for r in rows if r["scenario"] == PROD_KILL9), None)
    if prod and prod.get("recovery_s"):
        out.append(entry("reliability.kill9_recovery_s_p50", round(statistics.median(prod["recovery_s"]), 1), "s",
                         "<= 20"))
    return out


def write_table(table: str, doc: Path = DOC) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} … {END} markers to write the table between")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    doc.write_text(f"{before}{START}\n{table}\n{END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability_report", description=__doc__)
    parser.add_argument("--results", type=Path, help="folder for the rows (default: a fresh temporary folder)")
    parser.add_argument("--no-run", action="store_true", help="render rows already in --results, run nothing")
    parser.add_argument("--file", action="append", help="only these test files (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="pytest processes at once (default 1)")
    parser.add_argument("--summary", help="with --no-run: what produced the rows (the pytest summaries), for the footer")
    args = parser.parse_args(argv)
    results = args.results or Path(tempfile.mkdtemp(prefix="reliability-"))
    status, summary = 0, args.summary or "not run (rendered from earlier rows)"
    if not args.no_run:
        status, summary = run_tests(results, tuple(args.file or TEST_FILES), args.jobs)
    rows = load_rows(results)
    if not rows:
        print(f"no rows in {results}", file=sys.stderr)
        return 1
    table = render(rows, summary)
    write_table(table)
    merge_results(metrics(rows))
    print(table)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Run the whole benchmark suite: `.venv/bin/python -m bench [--only NAME ...] [--skip NAME ...] [--large]`.

Each script runs in its own process (each starts its own redis-server, workers or OSS server, and configures the
Celery app its own way), one after the other — never two at once, since every figure is a ratio of two things
measured in the same run on the same cores. Each script merges its entries into bench/results.json and its
section into bench/RESULTS.md; this runner then writes the summary at the top of RESULTS.md: machine, versions,
date, and every metric that has a target, met or not. One script: `python bench/bench_X.py`. `--large` also runs
the byte-bound scripts on a ~0.6 GB SDXL-shaped release (`--size large`, a few minutes more); off by default.
`python -m bench reference [--scale S] [--cache DIR] [--clean]` runs the reference deployment at real size (an 8 GB
SDXL single file + kohya LoRA): its transfers over an emulated line, then its worker rows on real worker processes.
`python -m bench chaos --minutes N` runs the chaos soak (bench/bench_chaos.py). `python -m bench netfleet` runs the
namespaced nodes (bench/bench_netfleet.py, as root): partitions as faults, and the reference rows over a kernel-shaped
line. `python -m bench upstream` runs, in one run, the three figures of loading and dispatch through the libraries'
public APIs: dispatch, live LoRA on the large release, and the full-size warm restart vs bare diffusers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _results import RESULTS_JSON, machine, today, versions, write_section  # noqa: E402

SCRIPTS = [  # cheapest first; (name, extra arguments)
    ("rollback", []),
    ("sentinel", []),
    ("dispatch", ["--profile"]),
    ("cold_start", []),
    ("adapter_switch", []),
    ("live_lora", []),
    ("throughput", []),
    ("batching", []),
    ("concurrency", []),
    ("memory", []),
    ("diff_sync", []),
    ("oss_download", []),
    ("peers", []),
    ("peer_faults", []),
    ("canary", []),
    ("scale", []),  # the control plane at 100, 300 and 1,000 simulated workers (about 7 minutes)
]
LARGE_SCRIPTS = [("cold_start", ["--size", "large", "--profile"])]
TIMEOUT_S = 1800


def ensure_matplotlib() -> None:
    """Plots need matplotlib (the `bench` extra); install it into this interpreter if it is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        print("installing matplotlib (the bench extra) …", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8"], check=False)


def met(value: float, target: str) -> str:
    """'meets'/'MISSES' for targets written as '<= 5', '>= 0.95', '< 0.02', '0'; '—' for prose targets."""
    match = re.match(r"^\s*(<=|>=|<|>|=)?\s*(-?[0-9.]+)", target)
    if not match:
        return "—"
    op, bound = match.group(1) or "=", float(match.group(2))
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound, "=": value == bound}[op]
    return "meets" if ok else "**MISSES**"


def summary(outcomes: dict[str, str]) -> str:
    entries = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    rows = [f"| `{e['name']}` | {e['value']} {e['unit']} | {e['target']} | {met(float(e['value']), e['target'])} | "
            f"{e['date']} |" for e in entries if e.get("target")]
    runs = ", ".join(f"{name}: {state}" for name, state in outcomes.items())
    return f"""
## Summary (`python -m bench`)

Last suite run: {today()} · {machine()} · {versions()}.
Scripts run by this invocation: {runs or 'none (summary only)'}.

Every figure is a ratio or a paired difference of two things measured in the same run on the same machine
(2 shared cores: absolute times are noisy, ratios much less so). **GPU figures are pending** a task that has a
GPU: everything here ran on CPU with the tiny demo models, except the `*_large` entries (`python -m bench --large`:
cold start of a ~0.6 GB SDXL-shaped release).

| metric | value | target | | measured |
|---|---|---|---|---|
{chr(10).join(rows)}

The seed's claims and our analogues (sections below):
- cold start 18.2 min → 47 s: `cold_start` (new node, empty L2: archive → L2 → L1 → first image vs curl + a
  plain diffusers load of the same files) and `oss_download` (the transfer path alone, at 256 MiB);
- P95 4.8 s → 1.3 s: `dispatch` (what the fleet adds to a job) and `concurrency` (p50/p95/p99 under 50 producers);
- failure rate at 10 concurrent users 23 % → 0.4 %: `concurrency` (failures of 1000 jobs from 50 producers);
- rollback 47 min → 3.2 s: `rollback` (a route flip reaching a producer's cache vs one Redis PING).

Dynamic batching (`workers/batching.py`): a Celery task strategy wraps Celery's default one and buffers
`generate` requests (up to `FLEET_BATCH_MAX`, waiting at most `FLEET_BATCH_WAIT_MS` for companions); compatible
jobs (same release and call shape) run as one pipeline call with one seeded generator per job, then every job
still goes through Celery's ordinary path (its own result, image key, events and late ack). Chosen over the
`celery-batches` task class, whose batch task gets stripped-down requests (no headers, no revocation check, no
per-job events or stored results unless the task writes them) and would make `generate` another task class on
batching workers. A worker that dies mid-batch loses nothing: every message of the batch is still unacked and
Redis redelivers it after the visibility timeout; a redelivered job writes the same key.
"""


UPSTREAM = [  # what loading and dispatch through the libraries' public APIs cost, at the reference size where it fits
    ("dispatch", ["bench_dispatch.py"]),
    ("live_lora_large", ["bench_live_lora.py", "--size", "large"]),
    ("reference_restart", ["bench_reference.py", "--workers-only", "--restart-only", "--worker-scale", "1",
                           "--worker-dtype", "bfloat16"]),
]


def upstream(extra: list[str]) -> int:
    """`python -m bench upstream`: dispatch (Celery writing its own records), a live LoRA warm on the large release,
    and the full-size warm restart vs bare diffusers, one after the other in one run; extra arguments go to the
    reference script (e.g. `--cache DIR` to keep its 8 GB release between runs)."""
    outcomes: dict[str, str] = {}
    for label, (script, *args) in UPSTREAM:
        argv = [sys.executable, str(HERE / script), *args, *(extra if label == "reference_restart" else [])]
        print(f"== {' '.join(argv[1:])}", flush=True)
        started = time.perf_counter()
        try:
            rc = subprocess.run(argv, timeout=2 * TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        outcomes[label] = "ok" if rc == 0 else f"failed ({rc})"
        print(f"== {label}: {outcomes[label]} in {time.perf_counter() - started:.0f} s", flush=True)
    write_section("suite", summary(outcomes), first=True)
    return 0 if all(v == "ok" for v in outcomes.values()) else 1


def main() -> int:
    if sys.argv[1:2] == ["chaos"]:  # the soak: `python -m bench chaos --minutes N`, never part of the suite
        return subprocess.run([sys.executable, str(HERE / "bench_chaos.py"), *sys.argv[2:]]).returncode
    if sys.argv[1:2] == ["netfleet"]:  # nodes in network namespaces: partitions, the kernel-shaped line (root)
        return subprocess.run([sys.executable, str(HERE / "bench_netfleet.py"), *sys.argv[2:]]).returncode
    if sys.argv[1:2] == ["reference"]:  # the full-size scenario: its own options, never part of the suite
        return subprocess.run([sys.executable, str(HERE / "bench_reference.py"), *sys.argv[2:]]).returncode

    if sys.argv[1:2] == ["upstream"]:  # the figures of "upstream first": one run of the three, never part of the suite
        return upstream(sys.argv[2:])

    if sys.argv[1:2] == ["gpu"]:  # the GPU run: its own script, never part of the CPU suite
        import bench_gpu

        return bench_gpu.main()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    names = [name for name, _ in SCRIPTS]
    parser.add_argument("--only", nargs="*", choices=names, default=None)
    parser.add_argument("--skip", nargs="*", choices=names, default=[])
    parser.add_argument("--large", action="store_true",
                        help="also run cold_start with --size large (a ~0.6 GB release)")
    args = parser.parse_args()
    ensure_matplotlib()
    outcomes: dict[str, str] = {}
    runs = [(name, name, extra) for name, extra in SCRIPTS]
    if args.large:
        runs += [(f"{name}_large", name, extra) for name, extra in LARGE_SCRIPTS]
    for label, name, extra in runs:
        if (args.only is not None and name not in args.only) or name in args.skip:
            continue
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            outcomes[label] = "missing"
            continue
        print(f"== {script.name} {' '.join(extra)}", flush=True)
        started = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, str(script), *extra], timeout=TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        outcomes[label] = "ok" if rc == 0 else f"failed ({rc})"
        print(f"== {script.name} {' '.join(extra)}: {outcomes[label]} in {time.perf_counter() - started:.0f} s",
              flush=True)
    write_section("suite", summary(outcomes), first=True)
    return 0 if all(v == "ok" for v in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The HTTP API's cost over `generate.delay`, the same jobs in one run.

    python bench/bench_api.py [--jobs 30]

Starts a local fleet (`warmfleet up`: every process on its own Redis role, the API among them) with the demo's
active release, and sends the same jobs (same prompt, same seed per pair) two ways, alternating which goes first:
- delay: `generate.delay(...)` then `.get()` in this process, logged in as the producer role, as a Python producer;
- http: `POST /v1/generations` then `GET /v1/generations/{id}?wait=30`, as a client in any language.
Each is timed from submit to result in hand. Metric `api.overhead_over_delay_p50` = p50(http) ÷ p50(delay);
target ≤ 1.2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from _results import entry, machine, merge_results, today, versions, write_section  # noqa: E402

TARGET = 1.2


def http(url: str, key: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=30)
    args = parser.parse_args()

    import tasks
    from fleetctl.apikeys import ApiKeys
    from fleetctl.demo.builders import DEMO_RELEASES
    from fleetctl.localfleet import LocalFleet
    from tasks.settings import FleetSettings

    cached = [p for p in sorted(Path.home().glob(".cache/warmfleet-tests/demo-archive-*"),
                                key=lambda p: p.stat().st_mtime) if p.is_dir()]
    home = Path(tempfile.mkdtemp(prefix="bench-api-"))
    extra = {"archive_url": cached[-1].as_uri()} if cached else {}
    settings = FleetSettings(home=home, torch_threads=1, node_name="benchapi", api_port=0, api_max_queued=64,
                             api_burst=1000, api_rate_per_minute=100000, **extra)
    fleet = LocalFleet(settings, log=lambda *_: None)
    state = fleet.up([DEMO_RELEASES[1]], None, flower=False, beat=False)
    try:
        key = ApiKeys(settings.resolved_api_keys_file).add("bench")
        tasks.configure(settings.model_copy(update={"broker_url": state.roles["producer"]}))
        tasks.generate.delay("warm up", seed=0).get(timeout=120)
        http(f"{state.api_url}/v1/generations", key, {"prompt": "warm up", "seed": 0})
        times: dict[str, list[float]] = {"delay": [], "http": []}

        def via_delay(seed: int) -> None:
            t0 = time.perf_counter()
            tasks.generate.delay("a red circle on the left", seed=seed).get(timeout=120)
            times["delay"].append(time.perf_counter() - t0)

        def via_http(seed: int) -> None:
            t0 = time.perf_counter()
            job = http(f"{state.api_url}/v1/generations", key, {"prompt": "a red circle on the left", "seed": seed})
            done = http(f"{state.api_url}/v1/generations/{job['id']}?wait=30", key)
            assert done["status"] == "succeeded", done
            times["http"].append(time.perf_counter() - t0)

        for i in range(args.jobs):
            for fn in ((via_delay, via_http) if i % 2 == 0 else (via_http, via_delay)):
                fn(1000 + i)
    finally:
        fleet.down(state)
    report(times)


def report(times: dict[str, list[float]]) -> None:
    d50, h50 = (statistics.median(times[k]) * 1000 for k in ("delay", "http"))
    ratio = h50 / d50
    merge_results([
        entry("api.overhead_over_delay_p50", round(ratio, 3), "x", f"<= {TARGET:g}"),
        entry("api.http_submit_to_result_p50_ms", round(h50, 1), "ms"),
        entry("api.delay_submit_to_result_p50_ms", round(d50, 1), "ms"),
    ])
    write_section("api", f"""
## The HTTP API vs `generate.delay` (`bench/bench_api.py`)

{today()} · {machine()} · {versions()}

The same {len(times['delay'])} jobs (same prompt and seed per pair, order alternating) on a local fleet with one warm
worker, every process on its own Redis role; timed from submit to the result in hand.

| path | p50 | p95 |
|---|---|---|
| `generate.delay` → `.get()` (producer role) | {d50:.1f} ms | {_p95(times['delay']):.1f} ms |
| `POST /v1/generations` → `GET …?wait=30` | {h50:.1f} ms | {_p95(times['http']):.1f} ms |
| http ÷ delay (`api.overhead_over_delay_p50`) | **{ratio:.3f}×** | |

Target ≤ {TARGET:g}: **{'meets' if ratio <= TARGET else 'MISSES'}**.
""")
    print(f"api.overhead_over_delay_p50 = {ratio:.3f} (delay p50 {d50:.1f} ms, http p50 {h50:.1f} ms)")


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000


if __name__ == "__main__":
    main()

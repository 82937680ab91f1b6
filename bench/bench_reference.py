"""The reference deployment's transfers at their real size, over an emulated OSS line, on 3 emulated nodes.

`python -m bench reference [--scale 1.0] [--cache DIR] [--clean] [--cold-rate 400mbit] [--rate 100mbit] [--rtt-ms 45]`

Builds the release once (bench/_reference_data.py, cached under --cache; `--clean` removes it and exits), publishes
it into the project's OSS dev server, then, each node a separate L2 and each sync a separate process whose peak RSS
it reads itself (VmHWM): first start of an empty node at --cold-rate, a night with nothing new and the nightly base
update at --rate with --rtt-ms per request, and the fleet's egress for that day (from the server's link counters:
body bytes only). Worker rows (warm restart, rollback under load, 10 users) are not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._reference_data import build, changed_bytes  # noqa: E402
from bench._results import entry, merge_results, stamp, write_section  # noqa: E402
from ossserver import Link, OssServer  # noqa: E402
from ossserver.link import parse_rate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "sdxl-ref"
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from cachemgr.archive.oss import OssArchive
    from cachemgr.names import ComponentRef
    from cachemgr.store import SnapshotStore
    from cachemgr.sync import sync_ref
    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    job = json.loads(sys.argv[1])
    archive = OssArchive("models", "ref", endpoint=job["endpoint"])
    before, started, out = kib("VmRSS"), time.monotonic(), {"fetched": 0}
    if job["op"] == "publish":
        m = archive.publish(ComponentRef(*job["ref"]), Path(job["source"]))
        out["bytes"] = m.total_size
    else:
        store = SnapshotStore(job["l2"])
        for model, component in job["components"]:  # what the nightly sync does: ask the archive for the newest
            version = job.get("version", {}).get(component) or archive.latest_version(model, component)
            out["fetched"] += sync_ref(archive, store, ComponentRef(model, component, version)).bytes_fetched
    out["seconds"] = time.monotonic() - started
    out["peak_mib"] = (kib("VmHWM") - before) / 1024
    print(json.dumps(out))
""")


def child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"{job['op']} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench reference", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes (1.0: 6.9 + 1.2 GB)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "warmfleet-reference")
    parser.add_argument("--clean", action="store_true", help="remove the cached release and exit")
    parser.add_argument("--cold-rate", default="400mbit", help="emulated line for first starts (8 GB at 100 Mbit "
                        "takes 11 min a node)")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--rtt-ms", type=float, default=45.0)
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(args.cache, ignore_errors=True)
        print(f"removed {args.cache}")
        return 0
    began = time.monotonic()
    folders = build(args.cache / "release", args.scale)
    changed = changed_bytes(args.cache / "release")
    built_s = time.monotonic() - began
    work = Path(tempfile.mkdtemp(prefix="reference-", dir=args.cache))
    cold_bps, night_bps = parse_rate(args.cold_rate), parse_rate(args.rate)
    components = [[MODEL, "base"], [MODEL, "lora"]]
    try:
        with OssServer(work / "oss", log_requests=False) as server:
            server.create_bucket("models")
            ep = server.endpoint
            publish = {}
            for component, version, folder in (("base", "v1", "base-v1"), ("lora", "v1", "lora-v1")):
                publish[component] = child({"op": "publish", "endpoint": ep, "ref": [MODEL, component, version],
                                            "source": str(folders[folder])})
            release_bytes = publish["base"]["bytes"] + publish["lora"]["bytes"]

            server.link = Link(cold_bps, args.rtt_ms)
            cold = []
            for node in range(3):
                cold.append(child({"op": "sync", "endpoint": ep, "l2": str(work / f"node{node}"),
                                   "components": components}))
            cold_ratio = max(c["seconds"] / (c["fetched"] * 8 / cold_bps) for c in cold)

            server.link = Link(night_bps, args.rtt_ms)
            noop = [child({"op": "sync", "endpoint": ep, "l2": str(work / f"node{n}"), "components": components})
                    for n in range(3)]
            noop_bytes = server.link.down.stats.bytes / 3

            server.link = Link()
            for component, folder in (("base", "base-v2"), ("lora", "lora-v2")):
                child({"op": "publish", "endpoint": ep, "ref": [MODEL, component, "v2"],
                       "source": str(folders[folder])})
            server.link = Link(night_bps, args.rtt_ms)
            update = [child({"op": "sync", "endpoint": ep, "l2": str(work / f"node{n}"),
                             "components": [[MODEL, "base"]]}) for n in range(3)]
            day_egress = server.link.down.stats.bytes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - began
    diff_ratio = max(u["fetched"] for u in update) / changed
    sync_peak = max(c["peak_mib"] for c in cold + noop + update)
    publish_peak = max(p["peak_mib"] for p in publish.values())
    link = f"cold {args.cold_rate}, nightly {args.rate}, +{args.rtt_ms:g} ms per request"
    merge_results([
        entry("reference.cold_start_over_link_limit", round(cold_ratio, 3), "x", "<= 1.10"),
        entry("reference.diff_update_fetched_over_changed", round(diff_ratio, 4), "x", "<= 1.05"),
        entry("reference.diff_update_seconds", round(max(u["seconds"] for u in update), 2), "s"),
        entry("reference.nightly_noop_bytes_per_node", int(noop_bytes), "B"),
        entry("reference.sync_peak_rss_mib", round(sync_peak, 1), "MiB", "<= 256"),
        entry("reference.publish_peak_rss_mib", round(publish_peak, 1), "MiB", "<= 256"),
        entry("reference.daily_egress_bytes", int(day_egress), "B"),
        entry("reference.scenario_seconds", round(took, 1), "s"),
    ])
    write_section("reference", f"""
## Reference deployment transfers (`python -m bench reference --scale {args.scale:g}`)

Release {release_bytes / 1e9:.2f} GB (base {publish['base']['bytes'] / 1e9:.2f} GB single file + LoRA
{publish['lora']['bytes'] / 1e9:.2f} GB), 3 nodes, link: {link}. Built in {built_s:.0f} s; whole run {took:.0f} s.

| what | value |
|---|---|
| first start, transfer ÷ (bytes ÷ link rate), worst of 3 nodes | {cold_ratio:.3f} (target ≤ 1.10) |
| first start seconds per node | {', '.join(f"{c['seconds']:.1f}" for c in cold)} |
| nightly base update: fetched ÷ changed ({changed / 1e6:.1f} MB changed) | {diff_ratio:.4f} (target ≤ 1.05) |
| nightly base update seconds per node | {', '.join(f"{u['seconds']:.2f}" for u in update)} |
| a night with nothing new, bytes per node | {noop_bytes:.0f} |
| fleet egress for the update day (3 nodes) | {day_egress / 1e6:.1f} MB |
| peak RSS above the interpreter: sync / publish | {sync_peak:.0f} / {publish_peak:.0f} MiB (target ≤ 256) |

{stamp()}
""")
    print(json.dumps({"cold_ratio": cold_ratio, "diff_ratio": diff_ratio, "noop_bytes": noop_bytes,
                      "sync_peak_mib": sync_peak, "publish_peak_mib": publish_peak, "day_egress": day_egress,
                      "seconds": took}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

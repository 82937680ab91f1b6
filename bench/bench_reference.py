"""The reference deployment at its real size: transfers over an emulated OSS line on 3 emulated nodes, and worker rows.

`python -m bench reference [--scale 1.0] [--cache DIR] [--clean] [--cold-rate 400mbit] [--rate 100mbit]
[--rtt-ms 45] [--worker-scale 0.02] [--worker-dtype float32] [--users-jobs 200] [--no-workers | --workers-only]`

Builds the release (bench/_reference_data.py: at scale 1 an SDXL single file with the real key layout and shapes and
a ~1.2 GB kohya LoRA; kept under --cache, else in a temporary folder removed at the end), publishes it with
`warmfleet publish` (no --config at scale 1; the single file is converted to a diffusers folder there, in memory)
into the project's OSS dev server, then, each node a separate L2 and
each sync a separate process whose peak RSS it reads itself (VmHWM): first start of an empty node at --cold-rate, a
night with nothing new and the nightly base update at --rate with --rtt-ms per request, and the fleet's egress for
that day (from the server's link counters: body bytes only). Then the worker rows (bench/_reference_workers.py:
warm restart vs bare from_single_file + LoRA, LoRA rollback under 10 producers, 10 users) on real worker processes
serving the release built at --worker-scale in --worker-dtype: a full-size SDXL in float32 needs ~21 GB while it
loads on CPU, more than this shared machine can give; float16 matmuls are ~60× slower than float32 on this CPU, but
bfloat16 ones (AVX-512 BF16) are faster than float32, so `--worker-scale 1 --worker-dtype bfloat16` serves the
full-size release (~7 GB resident). `--workers-only` runs just the worker rows (their own RESULTS.md section).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._reference_data import build, changed_bytes, config_dir, lora_rank  # noqa: E402
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
    if job["op"] == "publish":  # `warmfleet publish` itself, its modules imported before the baseline is read
        from click.testing import CliRunner
        from fleetctl.cli import main
        import workers.models.layouts, workers.models.skeleton, diffusers, torch  # noqa: E401, F401
        before, started = kib("VmRSS"), time.monotonic()
        argv = ["publish", *job["ref"], job["source"]] + (["--config", job["config"]] if job.get("config") else [])
        done = CliRunner().invoke(main, argv, env=job["env"])
        if done.exit_code != 0:
            sys.exit(f"publish failed: {done.output[-2000:]} {done.exception!r}")
        out["bytes"] = archive.read_manifest(ComponentRef(*job["ref"])).total_size
        out["said"] = done.output.strip().splitlines()[:1]
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


def publisher(ep: str, home: Path, root: Path, folders: dict[str, Path], consume: bool):
    """Publish one folder's file with `warmfleet publish` (the base with --config only below scale 1); `consume`
    removes the source once the archive holds it (a temporary cache: at full size the run needs ~45 GB less)."""
    env = {"FLEET_HOME": str(home), "FLEET_ARCHIVE_URL": "oss://models/ref", "FLEET_OSS_ENDPOINT": ep,
           "FLEET_BROKER_URL": "redis://127.0.0.1:1/0",
           "FLEET_OSS_TIMEOUT": "1800"}  # the dev server joins a 6.9 GB upload's parts (and CRCs them) before it answers

    def publish(model: str, component: str, version: str, folder: str) -> dict:
        config = config_dir(root) if component == "base" else None
        source = next(folders[folder].glob("*.safetensors"))
        out = child({"op": "publish", "endpoint": ep, "ref": [model, component, version], "source": str(source),
                     "config": str(config) if config else None, "env": env})
        if consume:
            shutil.rmtree(folders[folder])
        return out
    return publish


def worker_section(w: dict, args: argparse.Namespace) -> str:
    """The worker rows' entries (merged now) and their part of the section."""
    flip_p50 = statistics.median(w["flip_ms"])
    merge_results([
        entry("reference.warm_restart_over_bare", round(w["warm_restart_over_bare"], 3), "x", "<= 1.05"),
        entry("reference.warm_restart_seconds", round(statistics.median(w["ours_s"]), 2), "s"),
        entry("reference.bare_single_file_lora_seconds", round(statistics.median(w["bare_s"]), 2), "s"),
        entry("reference.rollback_flip_ms_p50", round(flip_p50, 2), "ms"),
        entry("reference.rollback_lost", w["rollback_lost"], "jobs", "0"),
        entry("reference.rollback_reloads", w["rollback_reloads"], "loads", "0"),
        entry("reference.failure_rate_10_users", round(w["users_failures"] / w["users_jobs"], 4), "ratio", "0"),
        entry("reference.users_p50_s", round(w["users_p50_s"], 3), "s"),
        entry("reference.users_p95_s", round(w["users_p95_s"], 3), "s"),
    ])
    return f"""Worker rows (real worker processes, one model process at a time, {w['dtype']} on CPU, one torch thread, 64×64
images, 1 step), on the release built at `--worker-scale {args.worker_scale:g}` ({w['release_a']}, LoRA v1 and v2), served
from the same OSS server with no link emulation (warm L2: no bytes move):

| what | value |
|---|---|
| restart with warm L2 → first image, ours ÷ bare `from_single_file` + `load_lora_weights` (median) | {w['warm_restart_over_bare']:.3f} (target ≤ 1.05): {', '.join(f'{x:.1f}' for x in w['ours_s'])} s vs {', '.join(f'{x:.1f}' for x in w['bare_s'])} s |
| LoRA rollback while 10 producers send: flip p50 / max | {flip_p50:.1f} / {max(w['flip_ms']):.1f} ms ({len(w['flip_ms'])} flips) |
| jobs sent during the flips / lost / base reloads | {w['rollback_jobs']} / {w['rollback_lost']} / {w['rollback_reloads']} (served: {', '.join(f'{k}: {v}' for k, v in sorted(w['served'].items()))}) |
| 10 concurrent users: failures / jobs | {w['users_failures']} / {w['users_jobs']} in {w['users_seconds']:.0f} s |
| 10 users: p50 / p95 send → result | {w['users_p50_s']:.2f} / {w['users_p95_s']:.2f} s (one CPU worker; not comparable to the A100 figures) |"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench reference", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes (1.0: 6.9 + 1.2 GB)")
    parser.add_argument("--cache", type=Path, help="keep the generated files here between runs (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--clean", action="store_true", help="remove the cached release and exit")
    parser.add_argument("--cold-rate", default="400mbit", help="emulated line for first starts (8 GB at 100 Mbit "
                        "takes 11 min a node)")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--rtt-ms", type=float, default=45.0)
    parser.add_argument("--worker-scale", type=float, default=0.02, help="the release the worker rows serve (a "
                        "full-size SDXL in float32 needs ~21 GB at load on CPU)")
    parser.add_argument("--users-jobs", type=int, default=200)
    parser.add_argument("--worker-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="what ours and bare compute in (bfloat16: the full-size release in ~7 GB)")
    parser.add_argument("--no-workers", action="store_true", help="transfer rows only")
    parser.add_argument("--workers-only", action="store_true", help="worker rows only")
    parser.add_argument("--restart-only", action="store_true", help="with --workers-only: the warm-restart row only")
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="warmfleet-reference-"))
    if args.clean:
        shutil.rmtree(cache, ignore_errors=True)
        print(f"removed {cache}")
        return 0
    began = time.monotonic()
    try:
        return workers_only(args, cache, began) if args.workers_only else scenario(args, cache, began)
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)


def serve_rows(args: argparse.Namespace, ep: str, work: Path, root: Path, folders: dict[str, Path]) -> dict:
    """Publish the worker release (base v1, LoRA v1 and v2) and run the worker rows on it."""
    from bench._reference_workers import run as run_workers

    wpublish = publisher(ep, work / "publish-home", root, folders, False)
    wmodel = MODEL + "-w"
    for component, version in (("base", "v1"), ("lora", "v1"), ("lora", "v2")):
        wpublish(wmodel, component, version, f"{component}-{version}")
    return run_workers(work / "workers", ep, wmodel, {"base": "v1", "lora_a": "v1", "lora_b": "v2"},
                       next(folders["base-v1"].glob("*.safetensors")), jobs=args.users_jobs, dtype=args.worker_dtype,
                       restart_only=args.restart_only)


def restart_section(w: dict, args: argparse.Namespace, took: float) -> int:
    merge_results([
        entry("reference.warm_restart_over_bare", round(w["warm_restart_over_bare"], 3), "x", "<= 1.05"),
        entry("reference.warm_restart_seconds", round(statistics.median(w["ours_s"]), 2), "s"),
        entry("reference.bare_single_file_lora_seconds", round(statistics.median(w["bare_s"]), 2), "s"),
    ])
    write_section("reference_restart", f"""
## Reference deployment: warm restart alone (`python -m bench reference --workers-only --restart-only`)

Release built at `--worker-scale {args.worker_scale:g}` ({w['release_a']}), {w['dtype']} on CPU, one torch thread,
64×64 image, 1 step; each start finds the files in the page cache (read once just before). Whole run {took:.0f} s.

| restart with warm L2 → first image | ours | bare `from_single_file` + `load_lora_weights` | ours ÷ bare (median) |
|---|---|---|---|
| seconds per round (round 1 ours first, the last round bare first) | {', '.join(f'{x:.1f}' for x in w['ours_s'])} | {', '.join(f'{x:.1f}' for x in w['bare_s'])} | **{w['warm_restart_over_bare']:.3f}** (target ≤ 1.05) |

{stamp()}
""")
    print(json.dumps(w, indent=1, default=str))
    return 0


def workers_only(args: argparse.Namespace, cache: Path, began: float) -> int:
    same = args.worker_scale == args.scale and args.cache is not None
    root = cache / "release" if same else cache / "worker-release"
    folders = build(root, args.worker_scale)
    work = Path(tempfile.mkdtemp(prefix="reference-workers-", dir=cache))
    try:
        with OssServer(work / "oss", log_requests=False) as server:
            server.create_bucket("models")
            workers = serve_rows(args, server.endpoint, work, root, folders)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - began
    if args.restart_only:
        return restart_section(workers, args, took)
    write_section("reference_workers", f"""
## Reference deployment: worker rows alone (`python -m bench reference --workers-only`)

Whole run {took:.0f} s (build or reuse of the release, publish, the rows).

{worker_section(workers, args)}

{stamp()}
""")
    print(json.dumps(workers, indent=1, default=str))
    return 0


def scenario(args: argparse.Namespace, cache: Path, began: float) -> int:
    folders = build(cache / "release", args.scale)
    changed = changed_bytes(cache / "release")
    same = args.worker_scale == args.scale and args.cache is not None  # a temporary cache gives its sources up
    worker_root = cache / "release" if same else cache / "worker-release"
    worker_folders = build(worker_root, args.worker_scale) if not args.no_workers else {}
    built_s = time.monotonic() - began
    print(f"built in {built_s:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="reference-", dir=cache))
    cold_bps, night_bps = parse_rate(args.cold_rate), parse_rate(args.rate)
    components = [[MODEL, "base"], [MODEL, "lora"]]
    workers = None
    try:
        with OssServer(work / "oss", log_requests=False) as server:
            server.create_bucket("models")
            ep = server.endpoint
            publish = publisher(ep, work / "publish-home", cache / "release", folders, args.cache is None)
            publish_rows = {"base": publish(MODEL, "base", "v1", "base-v1"),
                            "lora": publish(MODEL, "lora", "v1", "lora-v1")}
            release_bytes = publish_rows["base"]["bytes"] + publish_rows["lora"]["bytes"]
            print(f"published {release_bytes / 1e9:.2f} GB: {publish_rows['base']['said']}", flush=True)

            server.link = Link(cold_bps, args.rtt_ms)
            cold = []
            for node in range(3):
                cold.append(child({"op": "sync", "endpoint": ep, "l2": str(work / f"node{node}"),
                                   "components": components}))
                print(f"cold start node {node}: {cold[-1]['seconds']:.1f} s", flush=True)
            cold_ratio = max(c["seconds"] / (c["fetched"] * 8 / cold_bps) for c in cold)

            server.link = Link(night_bps, args.rtt_ms)
            noop = [child({"op": "sync", "endpoint": ep, "l2": str(work / f"node{n}"), "components": components})
                    for n in range(3)]
            noop_bytes = server.link.down.stats.bytes / 3

            server.link = Link()
            publish(MODEL, "base", "v2", "base-v2")
            publish(MODEL, "lora", "v2", "lora-v2")
            server.link = Link(night_bps, args.rtt_ms)
            update = []
            for n in range(3):  # each node's L2 goes once measured: at full size 3 new 6.9 GB files add up
                update.append(child({"op": "sync", "endpoint": ep, "l2": str(work / f"node{n}"),
                                     "components": [[MODEL, "base"]]}))
                shutil.rmtree(work / f"node{n}", ignore_errors=True)
            day_egress = server.link.down.stats.bytes

            if not args.no_workers:
                server.link = Link()
                workers = serve_rows(args, ep, work, worker_root, worker_folders)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - began
    diff_ratio = max(u["fetched"] for u in update) / changed
    sync_peak = max(c["peak_mib"] for c in cold + noop + update)
    publish_peak = publish_rows["lora"]["peak_mib"]  # streamed: files hashed and uploaded as they lie
    convert_peak = publish_rows["base"]["peak_mib"]  # the single file converted in memory first (convert.py)
    link = f"cold {args.cold_rate}, nightly {args.rate}, +{args.rtt_ms:g} ms per request"
    merge_results([
        entry("reference.cold_start_over_link_limit", round(cold_ratio, 3), "x", "<= 1.10"),
        entry("reference.diff_update_fetched_over_changed", round(diff_ratio, 4), "x", "<= 1.05"),
        entry("reference.diff_update_seconds", round(max(u["seconds"] for u in update), 2), "s"),
        entry("reference.nightly_noop_bytes_per_node", int(noop_bytes), "B"),
        entry("reference.sync_peak_rss_mib", round(sync_peak, 1), "MiB", "<= 256"),
        entry("reference.publish_peak_rss_mib", round(publish_peak, 1), "MiB", "<= 256"),
        entry("reference.publish_single_file_peak_rss_mib", round(convert_peak, 1), "MiB"),
        entry("reference.daily_egress_bytes", int(day_egress), "B"),
        entry("reference.scenario_seconds", round(took, 1), "s"),
    ])
    rows = worker_section(workers, args) if workers else "Worker rows: not run (`--no-workers`)."
    write_section("reference", f"""
## Reference deployment at scale {args.scale:g}: transfers and worker rows (`python -m bench reference`)

Release {release_bytes / 1e9:.2f} GB (base {publish_rows['base']['bytes'] / 1e9:.2f} GB single file + LoRA
{publish_rows['lora']['bytes'] / 1e9:.2f} GB), 3 nodes, link: {link}. Built in {built_s:.0f} s; whole run {took:.0f} s.

| what | value |
|---|---|
| first start, transfer ÷ (bytes ÷ link rate), worst of 3 nodes | {cold_ratio:.3f} (target ≤ 1.10) |
| first start seconds per node | {', '.join(f"{c['seconds']:.1f}" for c in cold)} |
| nightly base update: fetched ÷ changed ({changed / 1e6:.1f} MB changed) | {diff_ratio:.4f} (target ≤ 1.05) |
| nightly base update seconds per node | {', '.join(f"{u['seconds']:.2f}" for u in update)} |
| a night with nothing new, bytes per node | {noop_bytes:.0f} |
| fleet egress for the update day (3 nodes) | {day_egress / 1e6:.1f} MB |
| peak RSS above the interpreter: sync / publish of the LoRA | {sync_peak:.0f} / {publish_peak:.0f} MiB (target ≤ 256) |
| peak RSS above the interpreter: publish of the single-file base (converted in memory by diffusers, then uploaded) | {convert_peak:.0f} MiB |

Base: {'the real SDXL key layout and shapes, published with no --config (the packaged standard config)'
       if config_dir(cache / "release") is None else 'SDXL key layout at narrower widths, published with --config'};
LoRA: kohya, rank {lora_rank(cache / "release")}, every attention projection of the UNet and both text encoders.

{rows}

{stamp()}
""")
    print(json.dumps({"cold_ratio": cold_ratio, "diff_ratio": diff_ratio, "noop_bytes": noop_bytes,
                      "sync_peak_mib": sync_peak, "publish_peak_mib": publish_peak,
                      "publish_single_file_peak_mib": convert_peak, "day_egress": day_egress,
                      "seconds": took}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

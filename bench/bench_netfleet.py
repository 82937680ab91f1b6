"""Nodes in network namespaces: partitions as faults, and the reference site's transfers over a kernel-shaped line.

`python -m bench netfleet [--trials 10] [--only worker producers archive peer primary reference] [--mib 32]
[--ref-mib 256]`

Every part runs in its own network namespace with its own address on a private LAN (tests/netns.py: veth pairs on a
bridge in a namespace of its own, nothing added to the machine's namespace, all removed at exit): Redis (or a
primary, a replica and three sentinels), the OSS dev server, the producers (this process's main thread), each
node's workers. A partition is a link set down inside a namespace, for a few seconds, then up again. Scenarios
(tests/netfleet.py; what each promises: docs/reliability.md, "Partitions"), each `--trials` times:
- worker: a node's link down mid-job (past the warm TTL, within the execution lease): the job completes once;
- producers: the producers' link down while they send: every acknowledged send completes once;
- archive: the archive's link down while a node syncs a new version from it: the sync retries through or fails
  with its reason, the next one resumes, the snapshot verifies;
- peer: a holder's link down while it uploads to a new node: the node finishes from the others, verified;
- primary: behind Sentinel, the primary's link down (cut from its replica, the sentinels and every client): the
  replica is promoted; every acknowledged send completes once.
After each trial every node's L2 is re-hashed against its manifests (`corrupt_l2`).

`reference`: the peers and first-start rows of bench/REFERENCE.md again, with 6 namespaced nodes (each a
`warmfleet maintenance-worker` with its peer server on its own address, plus a 7th that joins later) and the
archive's line shaped in the kernel (tc htb at 100 Mbit both ways) with 45 ms per request in the OSS server. A
version of --ref-mib MiB (scaled down from the 8.1 GB release: at 100 Mbit that would be 11 min per cold start).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import entry, merge_results, stamp, write_section  # noqa: E402
from cachemgr.names import ComponentRef  # noqa: E402
from fleetstate.keys import PEER_QUARANTINE_KEY  # noqa: E402
from tests.netfleet import (  # noqa: E402
    Outcome,
    archive_cut_trial,
    job_fleet,
    peer_cut_trial,
    primary_cut_trial,
    producers_cut_trial,
    site_fleet,
    worker_cut_trial,
    write_version,
)
from tests.netns import reap_leftovers, unavailable  # noqa: E402
from tests.support import Calibration  # noqa: E402

SCENARIOS = ("worker", "producers", "archive", "peer", "primary")
LINE_MBIT = 100.0
RTT_MS = 45.0


def demo_archive(workdir: Path) -> Path:
    from bench._fleet import publish_release
    from cachemgr import LocalArchive

    archive = workdir / "archive"
    publish_release(LocalArchive(archive), workdir / "build")
    return archive


def run_jobs(workdir: Path, trials: int, only: set[str], log) -> list[Outcome]:  # noqa: ANN001
    outcomes: list[Outcome] = []
    archive = demo_archive(workdir)
    if only & {"worker", "producers"}:
        with job_fleet(workdir / "jobs", archive) as fleet:
            calibration = Calibration(fleet.tasks)
            for i in range(trials if "worker" in only else 0):
                outcomes.append(worker_cut_trial(fleet, calibration, cut_s=8.0, job_s=16.0, seed=100 + i))
                log(outcomes[-1])
            for i in range(trials if "producers" in only else 0):
                outcomes.append(producers_cut_trial(fleet, cut_s=5.0, seed=200 + i))
                log(outcomes[-1])
    if "primary" in only:
        with job_fleet(workdir / "sentinel", archive, sentinel=True) as fleet:
            for i in range(trials):
                outcomes.append(primary_cut_trial(fleet, cut_s=12.0, seed=300 + i))
                log(outcomes[-1])
    return outcomes


def run_site_faults(workdir: Path, trials: int, only: set[str], mib: int, log) -> list[Outcome]:  # noqa: ANN001
    outcomes: list[Outcome] = []
    # holders upload at 20 Mbit each, so a new node's fill from them lasts seconds and can be cut midway (the rate
    # floor lowered to match: a holder shared by several fetchers must not be dropped as slow)
    with site_fleet(workdir / "site", nodes=6, rate_mbit=LINE_MBIT, delay_ms=RTT_MS, peer_upload_mbps=20.0,
                    peer_min_mbps=1.0) as site:
        publisher = site.publisher()
        nodes = list(site.nodes)
        for i in range(trials if "archive" in only else 0):
            ref = ComponentRef("netfleet", "base", f"a{i}")
            manifest = publisher.publish(ref, write_version(workdir / "build" / ref.version, mib, seed=i))
            outcomes.append(archive_cut_trial(site, nodes[i % len(nodes)], ref, manifest.total_size))
            log(outcomes[-1])
        for i in range(trials if "peer" in only else 0):
            ref = ComponentRef("netfleet", "base", f"p{i}")
            manifest = publisher.publish(ref, write_version(workdir / "build" / ref.version, mib, seed=1000 + i))
            holders, fetcher = nodes[:-1], nodes[-1]
            site.client().delete(PEER_QUARANTINE_KEY)
            site.sync(holders[0], ref)  # the site's one origin pull, then the others from their peers
            pending = [site.send_sync(n, ref) for n in holders[1:]]
            for p in pending:
                p.get(timeout=600)
            outcomes.append(peer_cut_trial(site, holders, fetcher, ref, manifest.total_size))
            log(outcomes[-1])
        publisher.close()
    return outcomes


def run_reference(workdir: Path, mib: int, log) -> dict:  # noqa: ANN001
    """First start of an empty node over the shaped line; the rest of the site's first start, a nightly update
    and a new node, with peers."""
    with site_fleet(workdir / "reference", nodes=7, rate_mbit=LINE_MBIT, delay_ms=RTT_MS) as site:
        publisher = site.publisher()
        nodes = list(site.nodes)
        site_nodes, newcomer = nodes[:6], nodes[6]
        v1, v2 = ComponentRef("sdxl-ref", "base", "v1"), ComponentRef("sdxl-ref", "base", "v2")
        m1 = publisher.publish(v1, write_version(workdir / "build" / "v1", mib, seed=1, tensors=64))
        m2 = publisher.publish(v2, write_version(workdir / "build" / "v2", mib, seed=2, tensors=64, changed=3, base_seed=1))
        before = {p.sha256 for f in m1.files for p in f.pieces}
        changed = sum(p.size for f in m2.files for p in f.pieces if p.sha256 not in before)
        publisher.close()
        floor = m1.total_size * 8 / (LINE_MBIT * 1e6)

        def all_at_once(names: list[str], ref: ComponentRef) -> tuple[float, list[dict], int]:
            wire = site.lab.sent_bytes("oss")
            started = time.perf_counter()
            results = [p.get(timeout=3600) for p in [site.send_sync(n, ref) for n in names]]
            return time.perf_counter() - started, results, site.lab.sent_bytes("oss") - wire

        cold_s, (cold,), cold_wire = all_at_once(site_nodes[:1], v1)  # the first node: all of it over the line
        sync_s = sync_seconds(site.nodes[site_nodes[0]].event_log_path, v1)
        log(f"first start of an empty node: {sync_s:.1f} s (sync) / {cold_s:.1f} s (send → result) for "
            f"{m1.total_size / 1e6:.1f} MB (floor {floor:.1f} s)")
        rest_s, rest, rest_wire = all_at_once(site_nodes[1:], v1)
        night_s, night, night_wire = all_at_once(site_nodes, v2)
        fill_s, (fill,), fill_wire = all_at_once([newcomer], v2)
        return {"bytes": m1.total_size, "floor_s": floor, "cold_s": cold_s, "sync_s": sync_s, "cold_from_l3": cold["from_l3"],
                "cold_wire": cold_wire, "rest_s": rest_s, "rest_from_l3": sum(r["from_l3"] for r in rest),
                "rest_wire": rest_wire, "changed": changed, "night_s": night_s,
                "night_from_l3": sum(r["from_l3"] for r in night), "night_wire": night_wire, "fill_s": fill_s,
                "fill_from_l3": fill["from_l3"], "fill_from_peers": fill["from_peers"], "fill_wire": fill_wire,
                "v2_bytes": m2.total_size}


def sync_seconds(events: Path, ref: ComponentRef) -> float:
    """The node's own account of one version's sync (its L2_SYNC event): first request → verified snapshot."""
    import json

    for line in reversed(events.read_text().splitlines()):
        event = json.loads(line)
        if event.get("event") == "L2_SYNC" and event.get("version") == ref.version and event.get("model") == ref.model:
            return float(event["seconds"])
    raise AssertionError(f"no L2_SYNC event for {ref} in {events}")


def table(outcomes: list[Outcome]) -> tuple[str, dict[str, list[Outcome]]]:
    by: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by.setdefault(o.scenario, []).append(o)
    rows = []
    for scenario, runs in by.items():
        secs = [o.seconds for o in runs]
        notes = sorted({k for o in runs for k in o.notes.get("refused_kinds", [])})
        extra = ""
        if scenario.startswith("worker"):
            extra = (f"peer received the job while the holder was cut in {sum(o.notes.get('duplicates') == '1' for o in runs)}"
                     f" of {len(runs)}; the cut holder's result returned in "
                     f"{sum(o.notes.get('served_by') == o.notes.get('holder') for o in runs)}")
        elif scenario.startswith("node cut"):
            extra = (f"retried through in {sum(o.notes.get('tries') == 1 for o in runs)}, failed with its reason and "
                     f"resumed in {sum(o.notes.get('tries') == 2 for o in runs)}; fetched ÷ size "
                     f"{max((o.notes.get('fetched_over_size', 0) for o in runs), default=0):.3f} at most")
        elif scenario.startswith("peer"):
            extra = (f"bytes from the archive: {', '.join(str(o.notes.get('from_l3', '?')) for o in runs)}; "
                     f"a holder cut while uploading in {sum(bool(o.notes.get('cut')) for o in runs)}")
        elif notes:
            extra = f"sends refused (raised to the producer, never acknowledged): {sum(o.refused for o in runs)} ({', '.join(notes)})"
        rows.append(f"| {scenario} | {len(runs)} | {sum(o.sent for o in runs)} | {sum(o.completed for o in runs)} | "
                    f"{sum(o.lost for o in runs)} | {sum(o.duplicated for o in runs)} | "
                    f"{sum(len(o.corrupt_l2) for o in runs)} | {statistics.median(secs):.1f} | {extra} |")
    return "\n".join(rows), by


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per partition scenario")
    parser.add_argument("--only", nargs="*", choices=(*SCENARIOS, "reference"), default=None)
    parser.add_argument("--mib", type=int, default=32, help="size of each version the site scenarios sync")
    parser.add_argument("--ref-mib", type=int, default=256, help="size of the reference rows' version")
    parser.add_argument("--note", default="", help="a line for the section (what else loaded the machine)")
    args = parser.parse_args()
    if args.trials < 1 or args.mib < 1 or args.ref_mib < 1:
        print("--trials, --mib and --ref-mib must be at least 1", file=sys.stderr)
        return 1
    why = unavailable()
    if why:
        print(why, file=sys.stderr)
        return 1
    reap_leftovers()
    only = set(args.only if args.only is not None else (*SCENARIOS, "reference"))
    lock = threading.Lock()

    def log(item: object) -> None:
        with lock:
            print(item if isinstance(item, str) else
                  f"{item.scenario}: sent {item.sent} completed {item.completed} lost {item.lost} duplicated "
                  f"{item.duplicated} refused {item.refused} corrupt {len(item.corrupt_l2)} {item.seconds:.1f} s "
                  f"{item.notes}", flush=True)

    outcomes: list[Outcome] = []
    reference = None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-netfleet-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            if only & {"worker", "producers", "primary"}:
                outcomes += run_jobs(tmp, args.trials, only, log)
            if only & {"archive", "peer"}:
                outcomes += run_site_faults(tmp, args.trials, only, args.mib, log)
            if "reference" in only:
                reference = run_reference(tmp, args.ref_mib, log)
        except Exception:
            traceback.print_exc()
            print("netfleet: a scenario failed before its trials were done; nothing written", file=sys.stderr)
            return 1
    minutes = (time.monotonic() - started) / 60
    note = f"\n{args.note}\n" if args.note else ""
    entries, sections = [], []
    if outcomes:
        rows, by = table(outcomes)
        trials_min = min(len(runs) for runs in by.values())
        lost, duplicated = sum(o.lost for o in outcomes), sum(o.duplicated for o in outcomes)
        corrupt = sum(len(o.corrupt_l2) for o in outcomes)
        entries += [entry("netfleet.partition_trials_min", trials_min, "trials", ">= 10"),
                    entry("netfleet.lost", lost, "jobs or syncs", "0"),
                    entry("netfleet.duplicated", duplicated, "jobs", "0"),
                    entry("netfleet.corrupt_l2", corrupt, "blobs", "0")]
        sections.append(f"""
| scenario | trials | sent | completed | lost | duplicated | L2 blobs not verifying | median trial (s) | notes |
|---|---:|---:|---:|---:|---:|---:|---:|---|
{rows}

Partition trials per scenario (least): **{trials_min}**; lost **{lost}**, duplicated **{duplicated}**, L2 blobs
that did not verify after a trial **{corrupt}**. "Sent" is jobs whose send returned (fleet scenarios) or syncs
(archive, peer); a send that raised was never acknowledged and is counted apart in the notes.
""")
    if reference:
        r = reference
        ratio = r["sync_s"] / r["floor_s"]
        entries += [entry("netfleet.first_start_over_link_limit", round(ratio, 4), "ratio", "<= 1.10"),
                    entry("netfleet.first_start_send_to_result_over_link_limit", round(r["cold_s"] / r["floor_s"], 4),
                          "ratio", None),
                    entry("netfleet.site_first_start_origin_bytes_over_version",
                          round((r["cold_from_l3"] + r["rest_from_l3"]) / r["bytes"], 4), "ratio", "<= 1.05"),
                    entry("netfleet.nightly_origin_bytes_over_changed", round(r["night_from_l3"] / r["changed"], 4),
                          "ratio", "<= 1.05"),
                    entry("netfleet.new_node_origin_bytes", r["fill_from_l3"], "B", "0")]
        mb = 1e6
        reference_md = f"""
## The reference site's transfers over real addresses (bench/bench_netfleet.py --only reference)

{stamp()}.{note}

6 site nodes + 1 newcomer, each a `warmfleet maintenance-worker` in its own network namespace with its peer server
on its own address; the archive's link shaped by the kernel (tc htb {LINE_MBIT:g} Mbit both ways), +{RTT_MS:g} ms
per request in the OSS server; a {r['bytes'] / mb:.1f} MB version (**scaled** from the reference's 8.14 GB: at
100 Mbit that is 11 min per cold start), 64 tensors, v2 with 3 changed ({r['changed'] / mb:.2f} MB). The first
start is timed as bench/REFERENCE.md's row was (the sync's own time, first request → verified snapshot, from the
node's L2_SYNC event) and from the operator's send to the task's result (queueing, the catalog refresh after the
sync and the result's way back included).

| row | measured | wire bytes on the archive's link (kernel count) |
|---|---|---|
| first start of an empty node (nobody holds it) | sync {r['sync_s']:.1f} s ÷ floor {r['floor_s']:.1f} s = **{ratio:.3f}** (target ≤ 1.10); send → result {r['cold_s']:.1f} s = {r['cold_s'] / r['floor_s']:.3f} | {r['cold_wire'] / mb:.1f} MB |
| the other 5 nodes' first start, at once, with peers | {r['rest_s']:.1f} s; {r['rest_from_l3']} B from the archive | {r['rest_wire'] / mb:.2f} MB |
| nightly update, 6 nodes at once | archive bytes ÷ changed = **{r['night_from_l3'] / r['changed']:.3f}**; {r['night_s']:.1f} s | {r['night_wire'] / mb:.2f} MB |
| a new node filled from its peers | **{r['fill_from_l3']} B** from the archive; {r['fill_s']:.1f} s = {r['fill_s'] / r['floor_s']:.3f} × the line's floor | {r['fill_wire'] / mb:.2f} MB |
"""
    merge_results(entries)
    if sections:
        write_section("netfleet", f"""
## Nodes in network namespaces: partitions as faults (bench/bench_netfleet.py)

{stamp()}; {minutes:.0f} min.{note}
{''.join(sections)}""")
    if reference:
        write_section("netfleet_reference", reference_md)
    for e in entries:
        print(f"{e['name']} = {e['value']} {e['unit']} (target {e['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

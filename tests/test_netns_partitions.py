"""A partition, for real: two nodes, each its own network namespace and address with one warm worker, Redis and the
producers in theirs (tests/netns.py, tests/netfleet.py). The node running a job loses its link in the middle of the
job and gets it back: the job completes once. The other scenarios (the archive cut mid-sync, a peer cut
mid-transfer, the producers cut, a Sentinel primary cut from its replica) run ten times and more in
`python -m bench netfleet`; docs/reliability.md says what each promises.

Needs root and `ip netns` (as CI has): where a machine cannot make namespaces these tests fail with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .netfleet import job_fleet, worker_cut_trial
from .netns import Lab, owned_namespaces, unavailable
from .support import Calibration

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(demo_archive_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    why = unavailable()
    if why:
        pytest.fail(why)
    with job_fleet(tmp_path_factory.mktemp("netfleet"), demo_archive_dir) as running:
        yield running


def test_a_worker_cut_from_redis_mid_job_completes_it_once(fleet):
    """Given two nodes with a warm worker each, when the node running a job loses its link for longer than the warm
    TTL (its heartbeat lapses, so the peer node receives the job) and gets it back before the execution lease lapses,
    then the producer gets one result, the pipeline ran once, and the peer's copy was answered from the job record."""
    outcome = worker_cut_trial(fleet, Calibration(fleet.tasks), cut_s=8.0, job_s=16.0, seed=7)

    assert outcome.notes["cut_while_running"], f"precondition: the job had finished before the cut: {outcome}"
    assert (outcome.completed, outcome.lost, outcome.duplicated) == (1, 0, 0), outcome
    assert (outcome.notes["runs"], outcome.notes["completed"]) == ("1", "1"), outcome
    assert outcome.notes["served_by"] == outcome.notes["holder"], outcome  # the result is the cut holder's
    assert outcome.notes["duplicates"] == "1", f"the peer never received the job while its holder was cut: {outcome}"
    assert outcome.corrupt_l2 == []


def test_the_lab_lives_in_namespaces_of_its_own_and_leaves_none_behind(fleet):
    """The lab's addresses exist only inside its namespaces; the namespaces carry this run's prefix."""
    import subprocess

    with fleet.lab.outside():  # the machine's own namespace
        root_addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    inside = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout  # the producers'
    assert fleet.lab.address("prod") in inside
    assert all(m.address not in root_addresses for m in fleet.lab.members.values())
    mine = {n for n in owned_namespaces() if n.startswith(fleet.lab.prefix + "-")}
    assert mine == {m.ns for m in fleet.lab.members.values()} | {fleet.lab.bridge_ns}

    with Lab() as other:  # a second lab beside it: its own prefix and namespaces, gone at its exit
        other.add("probe")
        names = {other.members["probe"].ns, other.bridge_ns}
        assert names <= set(owned_namespaces()) and not names & mine
    assert not names & set(owned_namespaces())


def test_leftovers_of_a_crashed_run_are_removed_and_a_live_runs_kept():
    """A namespace whose owner pid is dead (a crashed run) is removed by the next lab; one of a live owner is not."""
    import os
    import subprocess

    from .netns import ip, reap_leftovers

    why = unavailable()
    if why:
        pytest.fail(why)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is dead now
    dead, live = f"wfn{gone.pid}x0000-left", f"wfn{os.getpid()}xfeed-kept"
    ip("netns", "add", dead)
    ip("netns", "add", live)
    try:
        removed = reap_leftovers()
        assert dead in removed and live not in removed
        assert live in owned_namespaces() and dead not in owned_namespaces()
    finally:
        for name in (dead, live):
            ip("netns", "del", name, check=False)

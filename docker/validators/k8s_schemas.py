"""Validate Kubernetes manifests against the schemas of a Kubernetes version, offline, strictly (an unknown field is an
error, as `kubectl apply --validate=strict` makes it).

Built-in kinds: kubernetes-validate's bundled OpenAPI schemas of that version. Custom resources: the CRDs' own
schemas shipped in docker/validators/crds/ (KEDA's ScaledObject and TriggerAuthentication, the Prometheus Operator's
ServiceMonitor, PodMonitor and PrometheusRule), made strict the same way. A kind with neither is an error: nothing is
skipped. Runs in the validators' venv (docker/validators/install.sh):

    .fleet/validators/bin/python docker/validators/k8s_schemas.py --kubernetes-version 1.37.0 rendered.yaml …

One line per document, `ok` or `FAILED` with every error; exit status 1 if any document failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

CRDS = Path(__file__).resolve().parent / "crds"


def strict(schema: Any) -> Any:
    """Every object schema that lists its properties rejects others (as the API server's strict field validation does),
    except where the CRD keeps unknown fields (x-kubernetes-preserve-unknown-fields) or types extra ones itself."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # the top level's metadata is an ObjectMeta the CRD leaves open: apiVersion, kind and metadata are always allowed
    schema.setdefault("properties", {}).update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                "metadata": {"type": "object"}})
    return schema


def crd_schemas() -> dict[tuple[str, str], Any]:
    out = {}
    for path in sorted(CRDS.glob("*.json")):
        group_version_kind = path.stem.split("_")
        group, version, kind = group_version_kind
        schema = json.loads(path.read_text())
        schema.pop("x-source", None)
        out[(f"{group}/{version}", kind)] = strict(schema)
    return out


def name_of(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')} ({doc.get('apiVersion')})"


def validate(doc: dict[str, Any], version: str, crds: dict[tuple[str, str], Any]) -> list[str]:
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in crds:
        validator = jsonschema.Draft7Validator(crds[key])
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[1]} {key[0]} in Kubernetes {version} nor in docker/validators/crds/"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--kubernetes-version", "-k", default=kubernetes_validate.latest_version())
    args = parser.parse_args(argv)
    crds = crd_schemas()
    failed = 0
    for path in args.files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            errors = validate(doc, args.kubernetes_version, crds)
            failed += bool(errors)
            print(f"{path.name}: {name_of(doc)}: " + ("ok" if not errors else "FAILED: " + "; ".join(errors)))
    print(f"{failed} failed, Kubernetes {args.kubernetes_version}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

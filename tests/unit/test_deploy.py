"""deploy/ and envoy/: the Kubernetes manifests, checked without a cluster.

Every YAML file parses; the CRDs are structural schemas a Kubernetes 1.20 apiserver accepts (no CEL) and accept
and reject what lambdagate's own validators (controlplane.model.parse) do; the RBAC is least privilege; the
workloads are consistent with each other, with the CLI and with the Dockerfile; the gateway's bootstrap is the
generated one. CRD patterns are evaluated with RE2 (google-re2), the engine family of the apiserver's Go regexp:
`$` is the end of the text, unlike Python's `re`.

`render_kustomization(kubectl)` is for tests that have a kubectl (tests/k8s): it is a helper, not a test.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import re2
import yaml

from controlplane.bootstrap import bootstrap_yaml
from controlplane.cli import build_parser
from controlplane.model import ConfigError, parse_document
from controlplane.model import parse as model_parse
from controlplane.model.discovered import FAILED, LISTED, TOO_LARGE, DiscoveryRecord, ListedFunction
from controlplane.model.resources import (
    ERROR_KINDS,
    HTTP_METHODS,
    IDENTITY_KINDS,
    INVOCATION_TYPES,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    PAYLOAD_FORMATS,
    DiscoverySettings,
    Upstream,
    VirtualService,
)
from controlplane.sources.kubernetes import KubernetesSource, KubeSettings
from discovery.service import LEASE_NAME as DISCOVERY_LEASE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENVOY = ROOT / "envoy"
NAMESPACE = "lambdagate-system"
XDS_SERVICE = "lambdagate-xds"
XDS_HOST = f"{XDS_SERVICE}.{NAMESPACE}.svc"
XDS_PORT = 18000
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
# Short names other CRDs commonly installed beside ours use (Istio, Gloo, Knative, core).
TAKEN_SHORT_NAMES = {"vs", "us", "gw", "svc", "ing", "rt", "dr", "se", "ksvc", "route", "upstream"}
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate"}


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for d in (DEPLOY, ENVOY) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def manifest(name: str) -> list[dict[str, Any]]:
    return load_docs(DEPLOY / name)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def crd(plural: str) -> dict[str, Any]:
    (doc,) = manifest(f"crds/{plural}.lambdagate.io.yaml")
    return doc


def schema(plural: str) -> dict[str, Any]:
    return crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def render_kustomization(kubectl: str) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/` with the given kubectl (1.20's kustomize is v2.0.3): the rendered objects.

    Checks that it renders and that every namespaced object lands in lambdagate-system.
    """
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    assert docs, "kustomize rendered nothing"
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{doc['kind']} {meta['name']} is cluster-scoped"
        else:
            assert meta.get("namespace") == NAMESPACE, (
                f"{doc['kind']} {meta['name']}: {meta.get('namespace')}"
            )
    return docs


# ---------------------------------------------------------------------------------------------------------------
# A small validator for the subset of OpenAPI v3 the CRDs use, with the apiserver's semantics: defaults applied
# first, unknown fields pruned (ignored) rather than refused, patterns searched with RE2, list-type set/map
# uniqueness. tests/k8s checks the same objects against a real apiserver.


# RFC 3339, as the apiserver's `format: date-time` takes it (roughly: it also takes a few other layouts).
DATE_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z")


def _has_type(value: Any, typ: str) -> bool:
    return {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[typ]


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """What the apiserver does before validating: a null where null is not allowed is dropped (or defaulted)."""
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if key in value and value[key] is None and not sub.get("nullable"):
                del value[key]
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], v) for v in value]
    return value


def crd_errors(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    typ = node.get("type")
    if typ and not _has_type(value, typ):
        return [f"{path}: must be of type {typ}"]
    if node.get("x-kubernetes-int-or-string") and not (_has_type(value, "integer") or isinstance(value, str)):
        return [f"{path}: must be an integer or a string"]
    errs: list[str] = []
    if "enum" in node and not any(value == e and type(value) is type(e) for e in node["enum"]):
        errs.append(f"{path}: {value!r} not in {node['enum']}")
    if _has_type(value, "number"):
        # Number validations apply to numbers only (so to the number form of an int-or-string node).
        if value < node.get("minimum", value) or value > node.get("maximum", value):
            errs.append(f"{path}: {value} out of range")
    if isinstance(value, str):
        if "pattern" in node and not re2.search(node["pattern"], value):
            errs.append(f"{path}: {value!r} does not match {node['pattern']}")
        if len(value) < node.get("minLength", 0) or len(value) > node.get("maxLength", len(value)):
            errs.append(f"{path}: length {len(value)}")
        if node.get("format") == "date-time" and not DATE_TIME_RE.match(value):
            errs.append(f"{path}: {value!r} is not a date-time")
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            errs.append(f"{path}: fewer than {node['minItems']} items")
        list_type = node.get("x-kubernetes-list-type")
        if list_type == "set" and len({yaml.safe_dump(v) for v in value}) != len(value):
            errs.append(f"{path}: duplicate items")
        if list_type == "map":
            keys = [tuple(v.get(k) for k in node["x-kubernetes-list-map-keys"]) for v in value]
            if len(set(keys)) != len(keys):
                errs.append(f"{path}: duplicate keys")
        for i, item in enumerate(value):
            errs += crd_errors(node.get("items", {}), item, f"{path}[{i}]")
    if isinstance(value, dict):
        errs += [f"{path}.{k}: required" for k in node.get("required", []) if k not in value]
        for key, sub in node.get("properties", {}).items():
            if key in value:
                errs += crd_errors(sub, value[key], f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            for key, item in value.items():
                errs += crd_errors(node["additionalProperties"], item, f"{path}.{key}")
    if "oneOf" in node:
        passing = sum(not crd_errors(alt, value, path) for alt in node["oneOf"])
        if passing != 1:
            errs.append(f"{path}: {passing} of oneOf match")
    if "anyOf" in node and not any(not crd_errors(alt, value, path) for alt in node["anyOf"]):
        errs.append(f"{path}: no anyOf matches")
    for alt in node.get("allOf", []):
        errs += crd_errors(alt, value, path)
    if "not" in node and not crd_errors(node["not"], value, path):
        errs.append(f"{path}: matches not")
    return errs


def crd_accepts(doc: dict[str, Any]) -> bool:
    plural = {"Upstream": "upstreams", "VirtualService": "virtualservices"}[doc["kind"]]
    s = schema(plural)
    return not crd_errors(s, apply_defaults(s, copy.deepcopy(doc)))


def python_accepts(doc: dict[str, Any]) -> bool:
    try:
        parse_document(doc)
    except ConfigError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    if path.parent == ENVOY and path.name.startswith("bootstrap"):
        (doc,) = docs  # an Envoy bootstrap
        assert {"node", "admin", "dynamic_resources", "static_resources"} <= set(doc)
    else:
        for doc in docs:  # Kubernetes objects and kustomizations
            assert doc.get("apiVersion") and doc.get("kind"), doc


def test_envoy_folder_stays_a_plain_folder() -> None:
    # xds-protos owns the Python package `envoy`; an __init__.py here would shadow it.
    assert not (ENVOY / "__init__.py").exists()


def test_kubernetes_bootstrap_is_the_generated_one() -> None:
    expected = bootstrap_yaml(xds_host=XDS_HOST, xds_port=XDS_PORT, admin_port=9901)
    assert (ENVOY / "bootstrap-kubernetes.yaml").read_text() == expected
    # Envoy's admin interface stays inside the pod.
    doc = yaml.safe_load(expected)
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_sidecar_bootstrap_is_the_generated_one() -> None:
    cm = one(manifest("examples/sidecar.yaml"), "ConfigMap", "lambdagate-sidecar-bootstrap")
    expected = bootstrap_yaml(
        xds_host=XDS_HOST, xds_port=XDS_PORT, node_id="lambdagate-sidecar", admin_port=9901
    )
    assert cm["data"]["bootstrap.yaml"] == expected


# ---------------------------------------------------------------------------------------------------------------
# CRDs: names, structure, Kubernetes 1.20


@pytest.mark.parametrize(
    ("plural", "kind", "short"),
    [("upstreams", "Upstream", "lgus"), ("virtualservices", "VirtualService", "lgvs")],
)
def test_crd_names_and_version(plural: str, kind: str, short: str) -> None:
    doc = crd(plural)
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["metadata"]["name"] == f"{plural}.lambdagate.io"
    spec = doc["spec"]
    assert spec["group"] == "lambdagate.io" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (kind, plural, kind.lower())
    assert names["shortNames"] == [short] and not set(names["shortNames"]) & TAKEN_SHORT_NAMES
    (version,) = spec["versions"]
    assert version["name"] == "v1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


STRUCTURAL_FORBIDDEN_IN_JUNCTORS = {
    "type",
    "description",
    "default",
    "nullable",
    "additionalProperties",
    "title",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
JUNCTORS = ("oneOf", "anyOf", "allOf")


def _structural_problems(node: dict[str, Any], path: str, field_level: bool) -> list[str]:
    problems: list[str] = []
    untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if field_level and "type" not in node and not untyped_ok:
        problems.append(f"{path}: no type")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties")
    if node.get("uniqueItems"):
        problems.append(f"{path}: uniqueItems is forbidden")
    if "pattern" in node:
        try:
            re2.compile(node["pattern"])
        except re2.error as err:
            problems.append(f"{path}: pattern {node['pattern']!r}: {err}")
    for key in node.get("x-kubernetes-list-map-keys", []):
        item = node["items"]
        if key not in item.get("properties", {}) or (
            key not in item.get("required", []) and "default" not in item
        ):
            problems.append(f"{path}: list-map key {key} must be a required item property")
    for key, sub in node.get("properties", {}).items():
        problems += _structural_problems(sub, f"{path}.{key}", True)
    if "items" in node:
        problems += _structural_problems(node["items"], f"{path}[]", True)
    for junctor in JUNCTORS:
        for i, alt in enumerate(node.get(junctor, [])):
            problems += _junctor_problems(alt, node, f"{path}.{junctor}[{i}]")
    if "not" in node:
        problems += _junctor_problems(node["not"], node, f"{path}.not")
    return problems


def _junctor_problems(alt: dict[str, Any], structural: dict[str, Any], path: str) -> list[str]:
    problems = [f"{path}: {k} not allowed in a junctor" for k in alt if k in STRUCTURAL_FORBIDDEN_IN_JUNCTORS]
    # Every field a junctor names must be specified in the structural part beside it.
    for name in list(alt.get("required", [])) + list(alt.get("properties", {})):
        if name not in structural.get("properties", {}):
            problems.append(f"{path}: {name} is not in the structural schema")
    for junctor in JUNCTORS:
        for i, sub in enumerate(alt.get(junctor, [])):
            problems += _junctor_problems(sub, structural, f"{path}.{junctor}[{i}]")
    return problems


@pytest.mark.parametrize("plural", ["upstreams", "virtualservices"])
def test_crd_schema_is_structural(plural: str) -> None:
    s = schema(plural)
    assert s["type"] == "object"
    # metadata may not be restricted beyond name/generateName; we leave it alone.
    assert s["properties"]["metadata"] == {"type": "object"}
    assert s["required"] == ["spec"]
    assert _structural_problems(s, plural, False) == []


def _walk(node: Any) -> list[Any]:
    out = [node]
    if isinstance(node, dict):
        for v in node.values():
            out += _walk(v)
    elif isinstance(node, list):
        for v in node:
            out += _walk(v)
    return out


@pytest.mark.parametrize("plural", ["upstreams", "virtualservices"])
def test_crd_uses_nothing_newer_than_kubernetes_1_20(plural: str) -> None:
    keys = {k for node in _walk(crd(plural)) if isinstance(node, dict) for k in node}
    assert "x-kubernetes-validations" not in keys  # CEL: 1.25+
    assert "selectableFields" not in keys  # 1.30+


def _resolve(s: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    if json_path == ".metadata.creationTimestamp":
        return {"type": "string"}
    node: dict[str, Any] | None = s
    for part in json_path.lstrip(".").split("."):
        name = part.split("[", 1)[0]
        node = (node or {}).get("properties", {}).get(name)
        if node is not None and part.endswith("[*]"):
            node = node.get("items")
    return node


@pytest.mark.parametrize(
    ("plural", "columns"),
    [
        (
            "upstreams",
            [
                ("Type", ".spec.type"),
                ("Region", ".spec.region"),
                ("Functions", ".status.functionCount"),
                ("State", ".status.state"),
                ("Discovery", ".status.discovery.state"),
                ("Age", ".metadata.creationTimestamp"),
            ],
        ),
        (
            "virtualservices",
            [
                ("Domains", ".spec.domains"),
                ("State", ".status.state"),
                ("Age", ".metadata.creationTimestamp"),
            ],
        ),
    ],
)
def test_printer_columns_name_fields_of_the_schema(plural: str, columns: list[tuple[str, str]]) -> None:
    version = crd(plural)["spec"]["versions"][0]
    got = version["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"]) for c in got] == columns
    for col in got:
        node = _resolve(version["schema"]["openAPIV3Schema"], col["jsonPath"])
        assert node is not None, col
        if col["type"] in ("string", "integer"):
            assert node["type"] in (col["type"], "array"), col
    assert got[-1]["type"] == "date"
    # Only -o wide shows the discovery state: the default table (and scripts reading it) keep their columns.
    assert [c["name"] for c in got if c.get("priority", 0) > 0] == (
        ["Discovery"] if plural == "upstreams" else []
    )


@pytest.mark.parametrize("plural", ["upstreams", "virtualservices"])
def test_status_schema(plural: str) -> None:
    status = schema(plural)["properties"]["status"]["properties"]
    assert status["state"]["enum"] == ["Accepted", "Rejected", "Warning"]
    assert status["reason"]["type"] == "string"
    assert status["observedGeneration"]["type"] == "integer"
    cond = status["conditions"]
    assert cond["x-kubernetes-list-map-keys"] == ["type"]
    assert set(cond["items"]["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    if plural == "upstreams":
        # What the discovery worker writes (DiscoveryRecord.to_status), typed rather than left open.
        assert status["discovery"]["properties"]["state"]["enum"] == [LISTED, FAILED, TOO_LARGE]
        assert set(status["discovery"]["properties"]) == {
            "state",
            "reason",
            "message",
            "functionCount",
            "names",
        }
        item = status["functions"]["items"]
        assert set(item["properties"]) == {"function_name", "versions", "aliases"}
        assert item["required"] == ["function_name"]
        assert "x-kubernetes-preserve-unknown-fields" not in item
        assert status["functionCount"]["type"] == "integer"


def test_status_written_by_the_control_plane_is_accepted() -> None:
    # What KubernetesSource.status_for writes, for each state, fits the status schema (an Accepted status has
    # reason "").
    api_meta = {"namespace": "team", "generation": 3}
    good = upstream_doc(secret_ref=None)
    empty = upstream_doc(secret_ref=None, functions=[])
    broken = vs_doc(upstream="nowhere")
    src = KubernetesSource(KubeSettings())
    for doc, name in ((good, "lambdas"), (empty, "empty"), (broken, "broken"), (vs_doc(), "pets")):
        src._store.put(doc["kind"], {**doc, "metadata": {**api_meta, "name": name}})
    result = src.load()
    states = {}
    for key, raw in src._store.objects.items():
        status = src.status_for(key, raw, result)
        states[key.name] = status["state"]
        assert crd_accepts({**raw, "status": status}), status
    assert states == {"lambdas": "Accepted", "empty": "Warning", "broken": "Rejected", "pets": "Accepted"}
    assert crd_accepts({**good, "status": {"state": "Accepted", "functionCount": 2}})
    assert not crd_accepts({**vs_doc(), "status": {"state": "Fine"}})
    assert not crd_accepts({**vs_doc(), "status": {"conditions": [{"type": "A", "status": "Yes"}]}})
    when = {"type": "A", "status": "True", "lastTransitionTime": "yesterday"}
    assert not crd_accepts({**vs_doc(), "status": {"conditions": [when]}})


LISTED_FUNCTIONS = (
    ListedFunction("hello", ("1", "2", "10"), (("live", "10"), ("prev", "2"))),
    ListedFunction("bye"),
)


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(DiscoveryRecord(LISTED, functions=LISTED_FUNCTIONS), id="Listed"),
        pytest.param(DiscoveryRecord(LISTED), id="Listed, no functions"),
        pytest.param(
            DiscoveryRecord(
                FAILED,
                "InvalidSignatureException",
                "ListFunctions was refused: the request signature does not match",
                LISTED_FUNCTIONS,
            ),
            id="Failed, last known kept",
        ),
        pytest.param(DiscoveryRecord(TOO_LARGE, "TooLarge", "narrow the listing"), id="TooLarge"),
    ],
)
def test_status_written_by_the_discovery_worker_is_accepted(record: DiscoveryRecord) -> None:
    # The worker merge-patches status.discovery and status.functions; the control plane then adds its own
    # fields and the Discovered condition. Both together must fit the schema.
    written = record.to_status()
    meta = {"name": "lambdas", "namespace": "team", "generation": 1}
    doc = {**upstream_doc(functions=[], secret_ref=None), "metadata": meta}
    assert crd_accepts({**doc, "status": written}), written
    src = KubernetesSource(KubeSettings())
    src._store.put("Upstream", {**doc, "status": written})
    result = src.load()
    ((key, raw),) = src._store.objects.items()
    status = {**written, **src.status_for(key, raw, result)}
    assert crd_accepts({**doc, "status": status}), status
    discovered = {c["type"]: c for c in status["conditions"]}["Discovered"]
    assert discovered["status"] == ("True" if record.state == LISTED else "False")
    assert status["functionCount"] == record.name_count()


def test_an_upstream_with_only_discovered_functions_is_accepted() -> None:
    # Routes may use discovered names (tests/integration/test_discovery_kubernetes.py routes them), so the
    # Upstream is not "without functions".
    meta = {"name": "lambdas", "namespace": "team", "generation": 1}
    doc = {**upstream_doc(functions=[], secret_ref=None), "metadata": meta}
    src = KubernetesSource(KubeSettings())
    src._store.put(
        "Upstream", {**doc, "status": DiscoveryRecord(LISTED, functions=LISTED_FUNCTIONS).to_status()}
    )
    result = src.load()
    ((key, raw),) = src._store.objects.items()
    status = src.status_for(key, raw, result)
    assert (status["state"], status["reason"]) == ("Accepted", None)


@pytest.mark.parametrize(
    "status",
    [
        pytest.param({"discovery": {"state": "Done"}}, id="unknown discovery state"),
        pytest.param({"discovery": {"state": "Listed", "functionCount": "2"}}, id="count as a string"),
        pytest.param({"functions": [{"versions": ["1"]}]}, id="function without function_name"),
        pytest.param({"functions": [{"function_name": "f", "versions": "1"}]}, id="versions not a list"),
        pytest.param({"functions": [{"function_name": "f", "versions": [1]}]}, id="version as a number"),
        pytest.param({"functions": [{"function_name": "f", "aliases": {"live": 1}}]}, id="alias to a number"),
        pytest.param({"functions": [{"function_name": "f", "aliases": ["live"]}]}, id="aliases as a list"),
    ],
)
def test_malformed_discovery_status_is_refused(status: dict[str, Any]) -> None:
    assert not crd_accepts({**upstream_doc(), "status": status})


def test_schema_defaults_are_the_python_defaults() -> None:
    up, vs = schema("upstreams"), schema("virtualservices")
    assert up["properties"]["spec"]["properties"]["type"]["default"] == "aws"
    assert vs["properties"]["spec"]["properties"]["domains"]["default"] == ["*"]
    doc = upstream_doc()
    del doc["spec"]["type"]
    assert python_accepts(doc) and crd_accepts(doc)
    assert apply_defaults(up, doc)["spec"]["type"] == "aws"
    doc = vs_doc()
    del doc["spec"]["domains"]
    assert getattr(parse_document(doc), "domains", None) == ("*",) and crd_accepts(doc)
    assert apply_defaults(vs, doc)["spec"]["domains"] == ["*"]
    # Discovery is on unless turned off, with or without a discovery mapping.
    enabled = up["properties"]["spec"]["properties"]["discovery"]["properties"]["enabled"]
    assert enabled["default"] is DiscoverySettings().enabled is True
    for spec_discovery in ({}, {"name_prefix": "shop-"}):
        doc = upstream_doc(discovery=spec_discovery)
        parsed = parse_document(doc)
        assert isinstance(parsed, Upstream) and parsed.discovery.enabled is True and crd_accepts(doc)
        assert apply_defaults(up, copy.deepcopy(doc))["spec"]["discovery"]["enabled"] is True


# ---------------------------------------------------------------------------------------------------------------
# The CRD accepts and rejects what parse_document does


def upstream_doc(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "aws",
        "region": "us-east-1",
        "secret_ref": "aws-creds",
        "functions": [{"name": "list-pets", "spec": {"function_name": "PetsGet"}}],
    }
    body.update(spec)
    return {
        "apiVersion": "lambdagate.io/v1",
        "kind": "Upstream",
        "metadata": {"name": "lambdas"},
        "spec": body,
    }


def function_doc(
    function_name: Any = "PetsGet", qualifier: Any = None, name: Any = "list-pets"
) -> dict[str, Any]:
    fspec: dict[str, Any] = {"function_name": function_name}
    if qualifier is not None:
        fspec["qualifier"] = qualifier
    return upstream_doc(functions=[{"name": name, "spec": fspec}])


def vs_doc(matcher: dict[str, Any] | None = None, upstream: Any = "lambdas", **spec: Any) -> dict[str, Any]:
    route = {
        "matcher": matcher or {"prefix": "/"},
        "destination": {"upstream": upstream, "function": "list-pets"},
    }
    body: dict[str, Any] = {"domains": ["*"], "routes": [route]}
    body.update(spec)
    return {
        "apiVersion": "lambdagate.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "pets"},
        "spec": body,
    }


REGIONS = {
    "us-east-1": True,
    "eu-west-3": True,
    "ap-southeast-2": True,
    "cn-north-1": True,
    "us-gov-west-1": True,
    "us-iso-east-1": True,
    "us-isob-east-1": True,
    "": False,
    "useast1": False,
    "US-EAST-1": False,
    "us-east-12": False,
    "us-east": False,
    "us-east-1a": False,
    "u-east-1": False,
    "us_east_1": False,
    " us-east-1": False,
    "us-east-1 ": False,
}
FUNCTION_NAMES = {
    "PetsGet": True,
    "my-function_v2.1": True,
    "fn:live": True,
    "fn:7": True,
    "fn:$LATEST": True,
    "123456789012:function:fn": True,
    "123456789012:function:fn:live": True,
    "arn:aws:lambda:us-east-1:123456789012:function:fn": True,
    "arn:aws:lambda:us-east-1:123456789012:function:fn:7": True,
    "arn:aws-cn:lambda:cn-north-1:123456789012:function:fn": True,
    "arn:aws-us-gov:lambda:us-gov-west-1:123456789012:function:fn": True,
    "f" * 170: True,
    "f" * 171: False,
    "": False,
    "my function": False,
    "fn:": False,
    "fn:a.b": False,
    "fn/x": False,
    "arn:aws:s3:::bucket": False,
    "arn:aws:lambda:us-east-1:12345:function:fn": False,
    "fn:live:extra": False,
}
QUALIFIERS = {
    "$LATEST": True,
    "live": True,
    "7": True,
    "v1_2-3": True,
    "a" * 128: True,
    "a" * 129: False,
    "a.b": False,
    "$latest": False,
    "live now": False,
    "al@s": False,
}
ENDPOINTS = {
    "local": True,
    "http://127.0.0.1:9001": True,
    "https://lambda.us-east-1.amazonaws.com": True,
    "https://lambda.us-east-1.amazonaws.com/": True,
    "http://localstack.default.svc.cluster.local:4566": True,
    "https://vpce-0123-abcd.lambda.us-east-1.vpce.amazonaws.com": True,
    "http://[::1]:9001": True,
    "HTTP://moto:5000": True,
    "http://h:65535": True,
    "Local": False,
    "local2": False,
    "ftp://h": False,
    "http://": False,
    "h:80": False,
    "lambda.us-east-1.amazonaws.com": False,
    "http://user:pw@h": False,
    "http://h/path": False,
    "http://h?x=1": False,
    "http://h#f": False,
    "http://h:65536": False,
    "http://h:abc": False,
    "http:/h": False,
}
LOGICAL_NAMES = {
    "list-pets": True,
    "GetPet_v2": True,
    "a.b:c": True,
    "x": True,
    "a" * 128: True,
    "a" * 129: False,
    "-x": False,
    "x-": False,
    "a b": False,
    "": False,
}
DOMAINS = {
    "*": True,
    "example.com": True,
    "Api.Example.com": True,
    "*.example.com": True,
    "*-api.example.com": True,
    "api.*": True,
    "api.example.*": True,
    "example.com:8080": True,
    "example.com:*": True,
    "a b": False,
    "": False,
    "example.com:": False,
    "exa_mple.com": False,
    "http://example.com": False,
}
PATHS = {
    "/": True,
    "/pets": True,
    "/pets/{petId}": True,
    "/files/{path+}": True,
    "pets": False,
    "/a?b": False,
}
PREFIXES = {"/": True, "/api/v1": True, "api": False, "/a#b": False, "/a/{x}": False, "/a?x": False}
METHODS = {m: True for m in HTTP_METHODS} | {"FETCH": False, "": False}
UPSTREAM_REFS = {"lambdas": True, "lambdas.v2": True, "": False}
ROLE_ARNS = {
    "arn:aws:iam::123456789012:role/lambdagate": True,
    "arn:aws:iam::123456789012:role/path/to/Role_1+=,.@-": True,
    "arn:aws-cn:iam::123456789012:role/r": True,
    "arn:aws-us-gov:iam::123456789012:role/r": True,
    "arn:aws:iam::123456789012:role/" + "r" * 512: True,
    "arn:aws:iam::123456789012:role/" + "r" * 513: False,
    "arn:aws:iam::123456789012:role/": False,
    "arn:aws:iam::12345678901:role/r": False,
    "arn:aws:iam::123456789012:user/r": False,
    "arn:aws:sts::123456789012:assumed-role/r/s": False,
    "arn:aws:iam::123456789012:role/r r": False,
    "arn:aws:iam::123456789012:role/r\n": False,
    "lambdagate": False,
}
NAME_PREFIXES = {
    "shop-": True,
    "a": True,
    "Team_A.v2-": True,
    "p" * 140: True,
    "p" * 141: False,
    "shop/": False,
    "shop:": False,
    "shop prefix": False,
    "shop-\n": False,
}


def _cases(table: dict[str, bool]) -> list[Any]:
    return [pytest.param(value, ok, id=repr(value)[:40]) for value, ok in table.items()]


def _agree(doc: dict[str, Any], expected: bool) -> None:
    assert (python_accepts(doc), crd_accepts(doc)) == (expected, expected)


@pytest.mark.parametrize(("value", "ok"), _cases(REGIONS))
def test_region(value: str, ok: bool) -> None:
    _agree(upstream_doc(region=value), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(FUNCTION_NAMES))
def test_function_name(value: str, ok: bool) -> None:
    _agree(function_doc(function_name=value), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(QUALIFIERS))
def test_qualifier(value: str, ok: bool) -> None:
    _agree(function_doc(qualifier=value), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(ENDPOINTS))
def test_endpoint(value: str, ok: bool) -> None:
    _agree(upstream_doc(endpoint=value), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(LOGICAL_NAMES))
def test_logical_function_name(value: str, ok: bool) -> None:
    _agree(function_doc(name=value), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(DOMAINS))
def test_domain(value: str, ok: bool) -> None:
    _agree(vs_doc(domains=[value]), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(PATHS))
def test_path_matcher(value: str, ok: bool) -> None:
    _agree(vs_doc({"path": value}), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(PREFIXES))
def test_prefix_matcher(value: str, ok: bool) -> None:
    _agree(vs_doc({"prefix": value}), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(METHODS))
def test_method(value: str, ok: bool) -> None:
    _agree(vs_doc({"prefix": "/", "methods": [value]}), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(ROLE_ARNS))
def test_role_arn(value: str, ok: bool) -> None:
    _agree(upstream_doc(role_arn=value), ok)


@pytest.mark.parametrize("name", ["r\u00f4le", "r\u0661"], ids=["accented letter", "Arabic-Indic digit"])
def test_both_reject_a_non_ascii_role_name(name: str) -> None:
    doc = upstream_doc(role_arn=f"arn:aws:iam::123456789012:role/{name}")
    if crd_accepts(doc):
        pytest.fail("the CRD must refuse it")  # not an AssertionError: fails even while the mark stands
    assert not python_accepts(doc)


@pytest.mark.parametrize(("value", "ok"), _cases(NAME_PREFIXES))
def test_discovery_name_prefix(value: str, ok: bool) -> None:
    _agree(upstream_doc(discovery={"name_prefix": value}), ok)


@pytest.mark.parametrize(
    ("discovery", "ok"),
    [
        pytest.param({"enabled": False}, True, id="enabled false"),
        pytest.param({"enabled": True, "name_prefix": "shop-", "tags": {"team": "shop"}}, True, id="all"),
        pytest.param(
            {"tags": {"team": "shop", "tier": "1", "aws:cloudformation:stack-name": "s"}}, True, id="tags"
        ),
        pytest.param({"tags": {"team": "t" * 256}}, True, id="tag value of 256"),
        pytest.param({"tags": {}}, True, id="no tags"),
        pytest.param({"enabled": "yes"}, False, id="enabled as a string"),
        pytest.param({"enabled": 1}, False, id="enabled as a number"),
        pytest.param({"name_prefix": 5}, False, id="name_prefix as a number"),
        pytest.param({"tags": {"team": "t" * 257}}, False, id="tag value of 257"),
        pytest.param({"tags": {"team": True}}, False, id="tag value true"),
        pytest.param({"tags": {"team": ["a"]}}, False, id="tag value a list"),
        pytest.param({"tags": ["team"]}, False, id="tags as a list"),
        pytest.param("on", False, id="discovery as a string"),
    ],
)
def test_discovery_settings(discovery: Any, ok: bool) -> None:
    _agree(upstream_doc(discovery=discovery), ok)


@pytest.mark.parametrize(("value", "ok"), _cases(UPSTREAM_REFS))
def test_destination_upstream(value: str, ok: bool) -> None:
    # A name, and the same name in Gloo's {name, namespace} form.
    _agree(vs_doc(upstream=value), ok)
    if value:
        _agree(vs_doc(upstream={"name": value, "namespace": "team-a"}), ok)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(upstream_doc(type="gcp"), id="type not aws"),
        pytest.param({**upstream_doc(), "spec": {"type": "aws", "functions": []}}, id="no region"),
        pytest.param(upstream_doc(functions=[{"name": "a"}]), id="function without spec"),
        pytest.param(upstream_doc(functions=[{"spec": {"function_name": "f"}}]), id="function without name"),
        pytest.param(
            upstream_doc(functions=[{"name": "a", "spec": {"function_name": "f"}}] * 2),
            id="duplicate function",
        ),
        pytest.param(vs_doc(routes=[]), id="no routes"),
        pytest.param(vs_doc(domains=[]), id="empty domains"),
        pytest.param(vs_doc(domains=["a.com", "a.com"]), id="duplicate domain"),
        pytest.param(vs_doc({"path": "/a", "prefix": "/a"}), id="path and prefix"),
        pytest.param(vs_doc({"methods": ["GET"]}), id="no path, prefix or regex"),
        pytest.param(vs_doc({"regex": ""}), id="empty regex"),
        pytest.param(vs_doc(upstream={"namespace": "team-a"}), id="upstream without name"),
        pytest.param(
            {"apiVersion": "lambdagate.io/v1", "kind": "VirtualService", "metadata": {"name": "x"}},
            id="no spec",
        ),
    ],
)
def test_both_reject(doc: dict[str, Any]) -> None:
    _agree(doc, False)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(upstream_doc(region="us-east-1\n"), id="region with a trailing newline"),
        pytest.param(upstream_doc(region="us-east-\u0661"), id="region with a non-ASCII digit"),
        pytest.param(function_doc(function_name="fn\n"), id="function_name with a trailing newline"),
        pytest.param(function_doc(qualifier="live\n"), id="qualifier with a trailing newline"),
    ],
)
def test_both_reject_what_python_once_let_through(doc: dict[str, Any]) -> None:
    _agree(doc, False)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(vs_doc({"regex": "^/pets/(?P<id>[0-9]+)$", "methods": ["GET", "POST"]}), id="regex"),
        pytest.param(
            vs_doc(stage="prod", domains=["a.example.com", "b.example.com"]), id="stage and domains"
        ),
        pytest.param(upstream_doc(functions=[]), id="no functions"),
        pytest.param({**upstream_doc(), "spec": {"region": "eu-west-1"}}, id="only a region"),
    ],
)
def test_both_accept(doc: dict[str, Any]) -> None:
    _agree(doc, True)


# The CRD is deliberately stricter than the folder's validator here: Kubernetes refuses these at apply time,
# lambdagate would accept them from a folder.
CRD_STRICTER = [
    pytest.param(
        vs_doc({"prefix": "/", "methods": ["get"]}), id="lower-case method (the folder upper-cases it)"
    ),
    pytest.param(upstream_doc(secret_ref="Not_A_Name"), id="secret_ref that cannot name a Secret"),
    pytest.param(vs_doc(upstream="Not_A_Name"), id="upstream that cannot name an Upstream"),
    pytest.param(vs_doc(upstream={"name": "a", "namespace": "Team_A"}), id="namespace that cannot be one"),
    pytest.param(upstream_doc(endpoint="http://h:0"), id="endpoint port 0"),
    pytest.param(upstream_doc(endpoint="http://my_host:80"), id="endpoint host that is not a DNS name"),
    pytest.param(upstream_doc(endpoint=""), id="empty endpoint (the folder reads it as absent)"),
    pytest.param(function_doc(qualifier=""), id="empty qualifier (the folder reads it as absent)"),
    pytest.param(upstream_doc(role_arn=""), id="empty role_arn (the folder reads it as absent)"),
    pytest.param(
        upstream_doc(discovery={"name_prefix": ""}), id="empty name_prefix (the folder reads it as absent)"
    ),
    pytest.param(
        upstream_doc(discovery={"tags": {"tier": 1}}), id="numeric tag value (the folder takes it as text)"
    ),
]


@pytest.mark.parametrize("doc", CRD_STRICTER)
def test_crd_is_stricter(doc: dict[str, Any]) -> None:
    assert (python_accepts(doc), crd_accepts(doc)) == (True, False)


def test_the_crd_cannot_see_type_errors_of_the_upstream_reference() -> None:
    # An untyped field (string or object) accepts a number; the control plane rejects it in status.
    doc = vs_doc(upstream=5)
    assert (python_accepts(doc), crd_accepts(doc)) == (False, True)


@pytest.mark.parametrize("key", ["", "k" * 129], ids=["empty", "129 characters"])
def test_the_crd_cannot_see_tag_keys(key: str) -> None:
    # Kubernetes 1.20's schemas cannot constrain property names; the control plane rejects these in status.
    doc = upstream_doc(discovery={"tags": {key: "v"}})
    assert (python_accepts(doc), crd_accepts(doc)) == (False, True)


@pytest.mark.parametrize(
    "path", [DEPLOY / "examples" / "petstore.yaml", ROOT / "examples" / "petstore" / "petstore.yaml"]
)
def test_examples_are_valid_for_both(path: Path) -> None:
    docs = load_docs(path)
    assert {d["kind"] for d in docs} == {"Secret", "Upstream", "VirtualService"}
    for doc in docs:
        assert python_accepts(doc), doc["metadata"]
        if doc["kind"] != "Secret":
            assert crd_accepts(doc), doc["metadata"]


def test_deploy_example_uses_real_aws() -> None:
    (up,) = [d for d in manifest("examples/petstore.yaml") if d["kind"] == "Upstream"]
    assert "endpoint" not in up["spec"]


# ---------------------------------------------------------------------------------------------------------------
# Options, destination forms, mock routes and keep_warm (issue 5)


def full_upstream() -> dict[str, Any]:
    """An Upstream with every object the schema declares (the probes below check that it has)."""
    return upstream_doc(
        role_arn="arn:aws:iam::123456789012:role/lambdagate",
        endpoint="local",
        discovery={"enabled": True, "name_prefix": "shop-", "tags": {"team": "shop"}},
        functions=[
            {
                "name": "list-pets",
                "spec": {"function_name": "PetsGet", "qualifier": "live"},
                "keep_warm": {"interval": "5m", "concurrency": 2},
            }
        ],
        options=FULL_OPTIONS,
    )


FULL_OPTIONS: dict[str, Any] = {
    "payload_format": "raw",
    "invocation_type": "RequestResponse",
    "timeout": "10s",
    "max_retries": 2,
    "errors": {"function_error": 500, "function_timeout": 504, "throttled": 503, "malformed_response": 502},
    "log_tail": True,
    "rate_limit": {"requests": 10, "per": "1s", "burst": 20},
    "cors": {
        "allow_origins": ["https://app.example.com"],
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["content-type"],
        "expose_headers": ["x-request-id"],
        "max_age": "10m",
        "allow_credentials": True,
    },
}


JWKS = {"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": "sXch", "e": "AQAB"}]}
# Issue 7: every authorizer form, spec.auth, api_keys; full_vs's routes use them.
FULL_AUTHORIZERS: dict[str, Any] = {
    "cognito": {
        "type": "jwt",
        "issuer": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbC",
        "audiences": ["app-client"],
        "jwks": {"inline": JWKS, "cache_duration": "10m"},
    },
    "auth0": {
        "type": "jwt",
        "issuer": "https://example.auth0.com/",
        "jwks": {
            "uri": "https://example.auth0.com/.well-known/jwks.json",
            "timeout": "2s",
            "cache_duration": 600,
        },
        "header": "x-token",
        "query": "access_token",
    },
    "pinned": {"type": "jwt", "issuer": "https://id.example.com", "jwks": {"inline": json.dumps(JWKS)}},
    "custom": {
        "type": "lambda",
        "upstream": {"name": "lambdas", "namespace": "team-a"},
        "function_name": "arn:aws:lambda:us-east-1:123456789012:function:Authorize",
        "identity_sources": ["header:Authorization", "query:token"],
        "ttl": "5m",
    },
    "uncached": {
        "type": "lambda",
        "upstream": "lambdas",
        "function": "list-pets",
        "identity_sources": ["header:x-session"],
        "ttl": 0,
    },
}
FULL_API_KEYS: dict[str, Any] = {
    # Named, not read: the Secret must exist when the configuration is resolved, not when it is parsed.
    "secret_ref": "pets-api-keys",
    "rate_limit": {"requests": 10, "per": "1s", "burst": 20},
    "limits": {"partner": {"requests": 100, "per": "1m", "burst": 200}, "intern": {"requests": 1}},
}
FULL_INTEGRATION: dict[str, Any] = {
    "request_template": '{"path": "{{ path }}", "method": "{{ method }}"}',
    "responses": [
        {
            "status": 200,
            "template": '{"stage": "{{ stage }}"}',
            "headers": {"x-integration": "yes"},
            "content_type": "application/json",
        },
        {
            "status": 404,
            "pattern": "^Not found",
            "template": '{"message": "not found"}',
            "headers": {"cache-control": "no-store"},
            "content_type": "application/problem+json",
        },
    ],
}


def full_vs() -> dict[str, Any]:
    """A VirtualService with every destination form, a mock route, full options, every authorizer form, auth
    (service-wide and per route), api_keys and a mapping-template integration."""
    routes = [
        {
            "matcher": {"path": "/pets/{id}", "methods": ["GET"]},
            "destination": {"upstream": {"name": "lambdas", "namespace": "team-a"}, "function": "list-pets"},
            "options": FULL_OPTIONS,
            "auth": {"authorizer": "auth0", "scopes": ["pets/read", "admin"], "api_key_required": True},
        },
        {
            "matcher": {"prefix": "/arn"},
            "destination": {
                "upstream": "lambdas",
                "function_name": "arn:aws:lambda:us-east-1:123456789012:function:PetsGet:live",
            },
            "integration": FULL_INTEGRATION,
            # scopes: [] drops spec.auth's, which need a JWT authorizer.
            "auth": {"authorizer": "custom", "scopes": [], "api_key_required": False},
        },
        {
            "matcher": {"path": "/fn/{name}/{rest+}"},
            "destination": {"upstream": "lambdas", "function_param": "name"},
        },
        {
            "matcher": {"regex": "^/canary/.*"},
            "destination": {
                "upstream": "lambdas",
                "functions": [
                    {"function": "list-pets", "weight": 90},
                    {"function_name": "PetsGet:next", "weight": 10},
                ],
            },
        },
        {
            "matcher": {"path": "/health"},
            "mock": {"status": 200, "headers": {"x-mock": "yes"}, "body": "ok"},
            "options": {"cors": {"allow_origins": ["*"]}},
            "auth": {"authorizer": "none", "scopes": []},
        },
    ]
    return vs_doc(
        routes=routes,
        stage="prod",
        stage_variables={"env": "prod"},
        authorizers=copy.deepcopy(FULL_AUTHORIZERS),
        auth={"authorizer": "cognito", "scopes": ["pets/all"]},
        api_keys=copy.deepcopy(FULL_API_KEYS),
    )


# Objects whose fields are not lambdagate's: an inline JWKS is kept as it is (the parser checks only keys and
# kty), so its schema declares what it requires and preserves the rest.
FOREIGN_OBJECTS = {("authorizers", "{}", "jwks", "inline")}


def _object_nodes(node: dict[str, Any], path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Schema paths (`[]` for items, `{}` for map values) of every object node that declares properties."""
    if path in FOREIGN_OBJECTS:
        return set()
    out = {path} if "properties" in node else set()
    for key, sub in node.get("properties", {}).items():
        out |= _object_nodes(sub, (*path, key))
    if "items" in node:
        out |= _object_nodes(node["items"], (*path, "[]"))
    if isinstance(node.get("additionalProperties"), dict):
        out |= _object_nodes(node["additionalProperties"], (*path, "{}"))
    return out


def _objects_in(
    value: Any, node: dict[str, Any], spath: tuple[str, ...] = (), vpath: tuple[Any, ...] = ()
) -> list[tuple[tuple[str, ...], tuple[Any, ...]]]:
    """(schema path, value path) of every mapping in `value` whose schema node declares properties."""
    out: list[tuple[tuple[str, ...], tuple[Any, ...]]] = []
    if spath in FOREIGN_OBJECTS:
        return out
    if isinstance(value, dict) and "properties" in node:
        out.append((spath, vpath))
        for key, sub in value.items():
            if key in node["properties"]:
                out += _objects_in(sub, node["properties"][key], (*spath, key), (*vpath, key))
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, sub in value.items():
            out += _objects_in(sub, node["additionalProperties"], (*spath, "{}"), (*vpath, key))
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            out += _objects_in(item, node["items"], (*spath, "[]"), (*vpath, i))
    return out


def _fields_for(node: dict[str, Any], value: dict[str, Any]) -> set[str]:
    """The fields the schema lets `value` have: its properties, less those the oneOf branch that `value` takes
    refuses with `not` (an authorizer's type decides its fields)."""
    fields = set(node["properties"])
    for alt in node.get("oneOf", []):
        if not crd_errors(alt, value):
            for refused in alt.get("not", {}).get("anyOf", []):
                fields -= set(refused.get("required", []))
    return fields


# "unknown field 'x'; valid fields are a, b" and "unknown error kind; expected one of a, b" (options.errors).
VALID_FIELDS_RE = re.compile(r"(?:valid fields are|expected one of) (.+)$")


@pytest.mark.parametrize(("plural", "make"), [("upstreams", full_upstream), ("virtualservices", full_vs)])
def test_the_crd_declares_every_field_the_parser_accepts(plural: str, make: Any) -> None:
    # For each object of a document that uses them all, an unknown key makes the parser list the fields it
    # accepts there: they must be exactly the schema's properties. (A field the parser accepts but the schema
    # lacks would be pruned by the apiserver without a word.)
    doc = make()
    assert python_accepts(doc) and crd_accepts(doc)
    spec_node = schema(plural)["properties"]["spec"]
    found = _objects_in(doc["spec"], spec_node)
    # The document reaches every object of the schema, so a new one cannot go unchecked.
    assert {spath for spath, _ in found} == _object_nodes(spec_node)
    for spath, vpath in found:
        probe = copy.deepcopy(doc)
        target = probe["spec"]
        for part in vpath:
            target = target[part]
        target["zz_unknown"] = 1
        with pytest.raises(ConfigError) as caught:
            parse_document(probe)
        assert (caught.value.field or "").endswith("zz_unknown"), caught.value
        m = VALID_FIELDS_RE.search(caught.value.message)
        assert m, caught.value
        node = spec_node
        value = doc["spec"]
        for part, vpart in zip(spath, vpath, strict=True):
            node = {"[]": node.get("items"), "{}": node.get("additionalProperties")}.get(part) or node[
                "properties"
            ][part]
            value = value[vpart]
        assert set(m.group(1).split(", ")) == _fields_for(node, value), ".".join(spath)


def test_the_sample_virtual_service_uses_every_authorizer_form() -> None:
    # full_vs reaches each schema object once; these forms share objects, so say that it has them all.
    vs = parse_document(full_vs())
    assert isinstance(vs, VirtualService)
    jwks = [a.jwt.jwks for a in vs.authorizers if a.jwt is not None]
    assert {"inline", "uri"} <= {k for j in jwks for k in ("inline", "file", "uri") if getattr(j, k)}
    spec = full_vs()["spec"]
    inline = [a["jwks"]["inline"] for a in spec["authorizers"].values() if "inline" in a.get("jwks", {})]
    assert {type(v) for v in inline} == {dict, str}
    lambdas = [a for a in spec["authorizers"].values() if a["type"] == "lambda"]
    assert {"function", "function_name"} <= {k for a in lambdas for k in a}
    assert {type(a["upstream"]) for a in lambdas} == {dict, str}
    auths = [r["auth"] for r in spec["routes"] if "auth" in r] + [spec["auth"]]
    assert {"authorizer", "scopes", "api_key_required"} <= {k for a in auths for k in a}
    (integration,) = [r.integration for r in vs.routes if r.integration is not None]
    assert len(integration.responses) == 2 and integration.request_template


def _options_nodes() -> list[dict[str, Any]]:
    up = schema("upstreams")["properties"]["spec"]["properties"]["options"]
    route = schema("virtualservices")["properties"]["spec"]["properties"]["routes"]["items"]["properties"]
    return [up, route["options"]]


def test_upstream_and_route_options_are_the_same_schema() -> None:
    up, route = _options_nodes()
    assert up["properties"] == route["properties"]
    # No defaults: an unset route option inherits the Upstream's, and an unset Upstream option lambdagate's.
    assert not [node for node in _walk(up) if isinstance(node, dict) and "default" in node]


def test_option_enums_and_limits_are_the_parsers() -> None:
    (opts, _) = _options_nodes()
    props = opts["properties"]
    assert props["payload_format"]["enum"] == list(PAYLOAD_FORMATS)
    assert props["invocation_type"]["enum"] == list(INVOCATION_TYPES)
    assert props["max_retries"]["maximum"] == MAX_RETRIES
    assert props["timeout"]["maximum"] == MAX_TIMEOUT_S
    assert list(props["errors"]["properties"]) == list(ERROR_KINDS)
    cors = props["cors"]["properties"]
    assert cors["allow_methods"]["items"]["enum"] == ["*", *HTTP_METHODS]
    durations = [props["timeout"], props["rate_limit"]["properties"]["per"], cors["max_age"]]
    fn = schema("upstreams")["properties"]["spec"]["properties"]["functions"]["items"]["properties"]
    durations.append(fn["keep_warm"]["properties"]["interval"])
    assert len({d["pattern"] for d in durations}) == 1
    for node in durations:
        assert node.get("x-kubernetes-int-or-string") and "type" not in node
        assert node["minimum"] == 1


def test_function_name_has_one_pattern_everywhere() -> None:
    up_fn = schema("upstreams")["properties"]["spec"]["properties"]["functions"]["items"]["properties"]
    dest = schema("virtualservices")["properties"]["spec"]["properties"]["routes"]["items"]["properties"][
        "destination"
    ]["properties"]
    nodes = [up_fn["spec"]["properties"]["function_name"], dest["function_name"]]
    nodes.append(dest["functions"]["items"]["properties"]["function_name"])
    nodes.append(_authorizer_props()["function_name"])
    assert len({(n["pattern"], n["maxLength"]) for n in nodes}) == 1


def test_schema_defaults_of_mock_and_keep_warm_are_the_parsers() -> None:
    doc = vs_doc(routes=[{"matcher": {"path": "/health"}, "mock": {}}])
    vs = parse_document(doc)
    assert isinstance(vs, VirtualService) and vs.routes[0].mock is not None
    defaulted = apply_defaults(schema("virtualservices"), copy.deepcopy(doc))
    assert defaulted["spec"]["routes"][0]["mock"]["status"] == vs.routes[0].mock.status == 200
    doc = upstream_doc(
        functions=[{"name": "f", "spec": {"function_name": "f"}, "keep_warm": {"interval": 60}}]
    )
    up = parse_document(doc)
    assert isinstance(up, Upstream) and up.functions[0].keep_warm is not None
    defaulted = apply_defaults(schema("upstreams"), copy.deepcopy(doc))
    assert (
        defaulted["spec"]["functions"][0]["keep_warm"]["concurrency"] == up.functions[0].keep_warm.concurrency
    )


# (value, the parser accepts it, the CRD accepts it). Where the two differ, the comment says why.
YES, NO = (True, True), (False, False)
# The CRD cannot check a text duration's range (no CEL); the control plane rejects it in status.
TEXT_OUT_OF_RANGE = (False, True)
# Refused at apply time, taken from a folder (each use says why).
CRD_STRICTER_VALUE = (True, False)

TIMEOUTS: list[tuple[Any, tuple[bool, bool]]] = [
    ("10s", YES),
    ("500ms", YES),
    ("2m", YES),
    ("1.5s", YES),
    ("0.25h", YES),
    ("15m", YES),
    (1, YES),
    (29, YES),
    (900, YES),
    (901, NO),
    (0, NO),
    (-1, NO),
    ("-1s", NO),
    ("10 s", NO),
    ("10sec", NO),
    ("1d", NO),
    ("s", NO),
    ("", NO),
    (True, NO),
    ([10], NO),
    ("16m", TEXT_OUT_OF_RANGE),
    ("0s", TEXT_OUT_OF_RANGE),
    ("1h", TEXT_OUT_OF_RANGE),
    # int-or-string takes no fractions, and the pattern no surrounding spaces; the folder's parser takes both.
    (0.5, CRD_STRICTER_VALUE),
    (" 10s", CRD_STRICTER_VALUE),
    ("10s\n", CRD_STRICTER_VALUE),
]
PERIODS = [
    ("1s", YES),
    ("50ms", YES),
    ("1m", YES),
    ("1h", YES),
    ("24h", YES),
    (1, YES),
    (86400, YES),
    (86401, NO),
    (0, NO),
    ("1 s", NO),
    ("49ms", TEXT_OUT_OF_RANGE),
    ("25h", TEXT_OUT_OF_RANGE),
    (0.5, CRD_STRICTER_VALUE),
]
MAX_AGES = [
    ("10m", YES),
    (600, YES),
    ("24h", YES),
    (0, NO),
    (86401, NO),
    ("forever", NO),
    ("0s", TEXT_OUT_OF_RANGE),
]
INTERVALS = [
    ("5m", YES),
    ("1s", YES),
    (1, YES),
    ("24h", YES),
    (86400, YES),
    (0, NO),
    (86401, NO),
    ("hourly", NO),
    ("500ms", TEXT_OUT_OF_RANGE),  # at least 1s
    ("2d", NO),
]


def _table(rows: list[tuple[Any, tuple[bool, bool]]]) -> list[Any]:
    return [pytest.param(value, want, id=repr(value)[:40]) for value, want in rows]


def _expect(doc: dict[str, Any], want: tuple[bool, bool]) -> None:
    assert (python_accepts(doc), crd_accepts(doc)) == want


def options_doc(where: str, **options: Any) -> dict[str, Any]:
    """A document with these options: an Upstream's spec.options or a route's options."""
    if where == "upstream":
        return upstream_doc(options=options)
    doc = vs_doc()
    doc["spec"]["routes"][0]["options"] = options
    return doc


WHERE = pytest.mark.parametrize("where", ["upstream", "route"])


@WHERE
@pytest.mark.parametrize(("value", "want"), _table(TIMEOUTS))
def test_option_timeout(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, timeout=value), want)


@WHERE
@pytest.mark.parametrize(
    ("value", "want"),
    # The folder reads "" as absent, as it does other empty strings.
    _table(
        [(f, YES) for f in PAYLOAD_FORMATS] + [("RAW", NO), ("json", NO), (1, NO), ("", CRD_STRICTER_VALUE)]
    ),
)
def test_option_payload_format(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, payload_format=value), want)


@WHERE
@pytest.mark.parametrize(
    ("value", "want"),
    _table(
        [(n, YES) for n in range(MAX_RETRIES + 1)] + [(-1, NO), (6, NO), ("1", NO), (True, NO), (1.0, NO)]
    ),
)
def test_option_max_retries(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, max_retries=value), want)


@WHERE
@pytest.mark.parametrize(
    ("value", "want"),
    _table(
        [
            ({}, YES),
            ({"throttled": 503}, YES),
            ({kind: 400 for kind in ERROR_KINDS}, YES),
            ({"function_error": 599}, YES),
            ({"function_error": 399}, NO),
            ({"function_error": 600}, NO),
            ({"function_timeout": "504"}, NO),
            ({"throttled": True}, NO),
            ("502", NO),
            ([502], NO),
            # An unknown kind: the apiserver prunes it (structural schema); the folder's parser refuses it.
            ({"throttle": 503}, (False, True)),
        ]
    ),
)
def test_option_errors(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, errors=value), want)


@WHERE
@pytest.mark.parametrize(("value", "want"), _table([(True, YES), (False, YES), ("yes", NO), (1, NO)]))
def test_option_log_tail(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, log_tail=value), want)


RATE_LIMITS = [
    ({"requests": 10}, YES),
    ({"requests": 1}, YES),
    ({"requests": 10, "per": "1m", "burst": 20}, YES),
    ({"requests": 1_000_000, "burst": 10_000_000}, YES),
    ({"requests": 10, "burst": 10}, YES),
    ({}, NO),
    ({"per": "1s"}, NO),
    ({"requests": 0}, NO),
    ({"requests": 1_000_001}, NO),
    ({"requests": "10"}, NO),
    ({"requests": 10, "burst": 0}, NO),
    ({"requests": 10, "burst": 10_000_001}, NO),
    ({"requests": 10, "burst": "20"}, NO),
    ("10/s", NO),
    # burst at least requests: two fields, so the control plane's.
    ({"requests": 10, "burst": 5}, (False, True)),
]


@WHERE
@pytest.mark.parametrize(("value", "want"), _table(RATE_LIMITS))
def test_option_rate_limit(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, rate_limit=value), want)


@WHERE
@pytest.mark.parametrize(("value", "want"), _table(PERIODS))
def test_option_rate_limit_period(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, rate_limit={"requests": 5, "per": value}), want)


ORIGIN = "https://app.example.com"
CORS = [
    ({"allow_origins": ["*"]}, YES),
    ({"allow_origins": [ORIGIN, "http://localhost:3000"]}, YES),
    ({"allow_origins": [ORIGIN], "allow_credentials": True}, YES),
    ({"allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"], "expose_headers": ["*"]}, YES),
    ({"allow_origins": [ORIGIN], "allow_methods": list(HTTP_METHODS)}, YES),
    (
        {
            "allow_origins": [ORIGIN],
            "allow_headers": ["Content-Type", "x-api-key"],
            "expose_headers": ["etag"],
        },
        YES,
    ),
    ({"allow_origins": [ORIGIN], "allow_headers": ["h" * 256]}, YES),
    ({"allow_origins": [ORIGIN], "allow_credentials": False}, YES),
    ({}, NO),
    ({"allow_origins": []}, NO),
    ({"allow_origins": "*"}, NO),
    ({"allow_origins": [""]}, NO),
    ({"allow_origins": ["app.example.com"]}, NO),
    ({"allow_origins": [ORIGIN + "/"]}, NO),
    ({"allow_origins": [ORIGIN + "/path"]}, NO),
    ({"allow_origins": ["ftp://example.com"]}, NO),
    ({"allow_origins": ["https://exa_mple.com"]}, NO),
    ({"allow_origins": [ORIGIN + "\n"]}, NO),
    ({"allow_origins": ["HTTPS://app.example.com"]}, NO),
    ({"allow_origins": [ORIGIN], "allow_methods": ["FETCH"]}, NO),
    ({"allow_origins": [ORIGIN], "allow_methods": "GET"}, NO),
    ({"allow_origins": [ORIGIN], "allow_headers": ["bad header"]}, NO),
    ({"allow_origins": [ORIGIN], "allow_headers": ["x:y"]}, NO),
    ({"allow_origins": [ORIGIN], "allow_headers": [""]}, NO),
    ({"allow_origins": [ORIGIN], "allow_headers": ["h" * 257]}, NO),
    ({"allow_origins": [ORIGIN], "expose_headers": ["a b"]}, NO),
    ({"allow_origins": [ORIGIN], "allow_credentials": "true"}, NO),
    # The folder upper-cases methods; Kubernetes refuses lower case at apply time (as in matchers).
    ({"allow_origins": [ORIGIN], "allow_methods": ["get"]}, CRD_STRICTER_VALUE),
    # Credentials with the '*' origin: two fields, so the control plane's.
    ({"allow_origins": ["*"], "allow_credentials": True}, (False, True)),
]


@WHERE
@pytest.mark.parametrize(("value", "want"), _table(CORS))
def test_option_cors(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, cors=value), want)


@WHERE
@pytest.mark.parametrize(("value", "want"), _table(MAX_AGES))
def test_option_cors_max_age(where: str, value: Any, want: tuple[bool, bool]) -> None:
    _expect(options_doc(where, cors={"allow_origins": ["*"], "max_age": value}), want)


def route_doc(route: dict[str, Any]) -> dict[str, Any]:
    return vs_doc(routes=[{"matcher": {"path": "/fn/{name}"}, **route}])


def dest(**fields: Any) -> dict[str, Any]:
    return {"destination": {"upstream": "lambdas", **fields}}


ARN = "arn:aws:lambda:us-east-1:123456789012:function:PetsGet"
DESTINATIONS = [
    (dest(function="list-pets"), YES),
    (dest(function_name="PetsGet"), YES),
    (dest(function_name=ARN + ":live"), YES),
    (dest(function_name="123456789012:function:PetsGet"), YES),
    (dest(function_param="name"), YES),
    (dest(functions=[{"function": "list-pets", "weight": 1}]), YES),
    (dest(functions=[{"function": "a", "weight": 90}, {"function_name": ARN, "weight": 10}]), YES),
    (dest(functions=[{"function": "a", "weight": 1_000_000}, {"function": "b", "weight": 0}]), YES),
    (dest(), NO),
    (dest(function=""), NO),
    (dest(function=5), NO),
    (dest(function="a", function_name="b"), NO),
    (dest(function="a", functions=[{"function": "b", "weight": 1}]), NO),
    (dest(function_param="name", function="a"), NO),
    (dest(function_name=""), NO),
    (dest(function_name="no spaces"), NO),
    (dest(function_name="f" * 171), NO),
    (dest(function_name="arn:aws:s3:::bucket"), NO),
    (dest(function_param=""), NO),
    (dest(functions=[]), NO),
    (dest(functions={"function": "a", "weight": 1}), NO),
    (dest(functions=[{"function": "a"}]), NO),
    (dest(functions=[{"weight": 1}]), NO),
    (dest(functions=[{"function": "a", "function_name": "b", "weight": 1}]), NO),
    (dest(functions=[{"function": "a", "weight": -1}]), NO),
    (dest(functions=[{"function": "a", "weight": 1_000_001}]), NO),
    (dest(functions=[{"function": "a", "weight": "1"}]), NO),
    (dest(functions=[{"function": "", "weight": 1}]), NO),
    (dest(functions=[{"function_name": "no spaces", "weight": 1}]), NO),
    ({"destination": {"function": "a"}}, NO),  # no upstream
    # Needs the matcher beside it: the control plane's.
    (dest(function_param="other"), (False, True)),
    # At least one weight above 0: across items, so the control plane's.
    (dest(functions=[{"function": "a", "weight": 0}]), (False, True)),
]


@pytest.mark.parametrize(("route", "want"), _table(DESTINATIONS))
def test_destination_forms(route: dict[str, Any], want: tuple[bool, bool]) -> None:
    _expect(route_doc(route), want)


MOCKS = [
    ({}, YES),
    ({"status": 204}, YES),
    ({"status": 200, "headers": {"content-type": "text/plain", "x-a": ""}, "body": "ok"}, YES),
    ({"status": 599}, YES),
    ({"body": {"ok": True, "items": [1, 2]}}, YES),
    ({"body": [1, "two"]}, YES),
    ({"body": ""}, YES),
    ({"body": "x" * 65536}, YES),
    ({"status": 199}, NO),
    ({"status": 600}, NO),
    ({"status": "200"}, NO),
    ({"headers": ["x-a"]}, NO),
    ({"headers": {"x-a": "a\r\nb"}}, NO),
    ({"headers": {"x-a": "a\nb"}}, NO),
    ({"headers": {"x-a": "a\0b"}}, NO),
    ({"headers": {"x-a": True}}, NO),
    ({"body": "x" * 65537}, NO),
    ("ok", NO),
    # The folder takes a number as the header's text, like a numeric tag value.
    ({"headers": {"x-a": 1}}, CRD_STRICTER_VALUE),
    # What the CRD cannot see: header names (1.20 schemas cannot constrain keys), the type of the untyped body
    # (string or JSON) and its size in UTF-8 bytes rather than characters. The control plane rejects them.
    ({"headers": {"bad name": "x"}}, (False, True)),
    ({"body": 5}, (False, True)),
    ({"body": True}, (False, True)),
    ({"body": "\u00e9" * 40000}, (False, True)),
]


@pytest.mark.parametrize(("mock", "want"), _table(MOCKS))
def test_mock_route(mock: Any, want: tuple[bool, bool]) -> None:
    _expect(route_doc({"mock": mock}), want)


@pytest.mark.parametrize(
    ("route", "want"),
    [
        pytest.param(
            {"mock": {"body": "ok"}, "options": {"cors": {"allow_origins": ["*"]}}}, YES, id="mock+options"
        ),
        pytest.param({**dest(function="a"), "mock": {}}, NO, id="destination and mock"),
        pytest.param({}, NO, id="neither destination nor mock"),
        pytest.param({"options": {"timeout": 5}}, NO, id="only options"),
    ],
)
def test_a_route_has_destination_or_mock(route: dict[str, Any], want: tuple[bool, bool]) -> None:
    _expect(route_doc(route), want)


KEEP_WARM = [
    ({"interval": "5m"}, YES),
    ({"interval": "5m", "concurrency": 1}, YES),
    ({"interval": 300, "concurrency": 50}, YES),
    ({}, NO),
    ({"concurrency": 2}, NO),
    ({"interval": "5m", "concurrency": 0}, NO),
    ({"interval": "5m", "concurrency": 51}, NO),
    ({"interval": "5m", "concurrency": "2"}, NO),
    ("5m", NO),
]


@pytest.mark.parametrize(("value", "want"), _table(KEEP_WARM))
def test_keep_warm(value: Any, want: tuple[bool, bool]) -> None:
    _expect(upstream_doc(functions=[{"name": "f", "spec": {"function_name": "f"}, "keep_warm": value}]), want)


@pytest.mark.parametrize(("value", "want"), _table(INTERVALS))
def test_keep_warm_interval(value: Any, want: tuple[bool, bool]) -> None:
    warm = {"interval": value}
    _expect(upstream_doc(functions=[{"name": "f", "spec": {"function_name": "f"}, "keep_warm": warm}]), want)


# ---------------------------------------------------------------------------------------------------------------
# Authorizers, auth, API keys and mapping-template integrations (issue 7)


def _vs_spec() -> dict[str, Any]:
    return schema("virtualservices")["properties"]["spec"]["properties"]


def _route_props() -> dict[str, Any]:
    return dict(_vs_spec()["routes"]["items"]["properties"])


def _authorizer_props() -> dict[str, Any]:
    return dict(_vs_spec()["authorizers"]["additionalProperties"]["properties"])


JWT: dict[str, Any] = {
    "type": "jwt",
    "issuer": "https://id.example.com",
    "jwks": {"uri": "https://id.example.com/.well-known/jwks.json"},
}
LAMBDA: dict[str, Any] = {
    "type": "lambda",
    "upstream": "lambdas",
    "function": "authorize",
    "identity_sources": ["header:authorization"],
}


def authorizer_doc(authorizer: Any) -> dict[str, Any]:
    return vs_doc(authorizers={"a": authorizer})


def jwks_doc(jwks: Any) -> dict[str, Any]:
    return authorizer_doc({**JWT, "jwks": jwks})


JWT_AUTHORIZERS = [
    (JWT, YES),
    ({**JWT, "audiences": ["app", "admin"]}, YES),
    ({**JWT, "audiences": []}, YES),
    ({**JWT, "header": "x-jwt", "query": "access_token"}, YES),
    ({**JWT, "header": "Authorization"}, YES),
    ({k: v for k, v in JWT.items() if k != "jwks"}, NO),
    ({k: v for k, v in JWT.items() if k != "issuer"}, NO),
    ({k: v for k, v in JWT.items() if k != "type"}, NO),
    ({**JWT, "issuer": ""}, NO),
    ({**JWT, "issuer": 5}, NO),
    ({**JWT, "type": "oauth"}, NO),
    ({**JWT, "type": "JWT"}, NO),
    ({**JWT, "audiences": "app"}, NO),
    ({**JWT, "audiences": [""]}, NO),
    ({**JWT, "header": "bad header"}, NO),
    ({**JWT, "header": "x:y"}, NO),
    ({**JWT, "query": 5}, NO),
    # A field of a Lambda authorizer: the parser refuses it, the CRD's `not` too.
    ({**JWT, "ttl": "5m"}, NO),
    ({**JWT, "identity_sources": ["header:authorization"]}, NO),
    ({**JWT, "upstream": "lambdas"}, NO),
    ("jwt", NO),
    # The folder reads "" as absent.
    ({**JWT, "header": ""}, CRD_STRICTER_VALUE),
    ({**JWT, "query": ""}, CRD_STRICTER_VALUE),
]


@pytest.mark.parametrize(("authorizer", "want"), _table(JWT_AUTHORIZERS))
def test_jwt_authorizer(authorizer: Any, want: tuple[bool, bool]) -> None:
    _expect(authorizer_doc(authorizer), want)


JWKS_FORMS = [
    ({"inline": JWKS}, YES),
    ({"inline": json.dumps(JWKS)}, YES),
    ({"inline": {"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}], "extra": 1}}, YES),
    ({"file": "/etc/lambdagate/jwks.json"}, YES),
    ({"uri": "http://127.0.0.1:8080/jwks"}, YES),
    ({"uri": "https://id.example.com/jwks?v=2", "timeout": 60, "cache_duration": "24h"}, YES),
    ({"uri": "https://id.example.com", "timeout": "500ms", "cache_duration": 1}, YES),
    ({}, NO),
    ({"timeout": "5s"}, NO),
    ({"inline": JWKS, "uri": "https://id.example.com/jwks"}, NO),
    ({"file": "/jwks.json", "uri": "https://id.example.com/jwks"}, NO),
    ({"inline": ""}, NO),
    ({"inline": {}}, NO),
    ({"inline": {"keys": []}}, NO),
    ({"inline": {"keys": [{"kid": "k1"}]}}, NO),
    ({"inline": {"keys": [{"kty": 1}]}}, NO),
    ({"inline": {"keys": {"kty": "RSA"}}}, NO),
    ({"file": ""}, NO),
    ({"uri": ""}, NO),
    ({"uri": "ftp://id.example.com/jwks"}, NO),
    ({"uri": "/jwks.json"}, NO),
    ({"uri": "https://"}, NO),
    ({"uri": "https://id.example.com", "timeout": 0}, NO),
    ({"uri": "https://id.example.com", "timeout": 61}, NO),
    ({"uri": "https://id.example.com", "timeout": "5 s"}, NO),
    ({"uri": "https://id.example.com", "cache_duration": 86401}, NO),
    ({"uri": "https://id.example.com", "cache_duration": "1d"}, NO),
    ("https://id.example.com/jwks", NO),
    ({"uri": "https://id.example.com", "timeout": "2m"}, TEXT_OUT_OF_RANGE),
    ({"uri": "https://id.example.com", "cache_duration": "25h"}, TEXT_OUT_OF_RANGE),
    # The folder's URL parser takes the scheme in any case; the CRD's pattern only in lower case.
    ({"uri": "HTTPS://id.example.com/jwks"}, CRD_STRICTER_VALUE),
    # What the CRD cannot see in an untyped field (a mapping or text): JSON inside text, and other types.
    ({"inline": "not json"}, (False, True)),
    ({"inline": '{"keys": []}'}, (False, True)),
    ({"inline": [JWKS]}, (False, True)),
    ({"inline": 5}, (False, True)),
]


@pytest.mark.parametrize(("jwks", "want"), _table(JWKS_FORMS))
def test_jwt_authorizer_jwks(jwks: Any, want: tuple[bool, bool]) -> None:
    _expect(jwks_doc(jwks), want)


LAMBDA_AUTHORIZERS = [
    (LAMBDA, YES),
    ({**LAMBDA, "upstream": {"name": "lambdas", "namespace": "team-a"}}, YES),
    ({**{k: v for k, v in LAMBDA.items() if k != "function"}, "function_name": ARN + ":live"}, YES),
    ({**LAMBDA, "identity_sources": ["header:x-a", "query:token", "query:a:b"]}, YES),
    ({**LAMBDA, "ttl": 0}, YES),
    ({**LAMBDA, "ttl": "0s"}, YES),
    ({**LAMBDA, "ttl": "0"}, YES),
    ({**LAMBDA, "ttl": 3600}, YES),
    ({**LAMBDA, "ttl": "1h"}, YES),
    ({**LAMBDA, "ttl": "500ms"}, YES),
    ({k: v for k, v in LAMBDA.items() if k != "function"}, NO),
    ({k: v for k, v in LAMBDA.items() if k != "upstream"}, NO),
    ({k: v for k, v in LAMBDA.items() if k != "identity_sources"}, NO),
    ({**LAMBDA, "function_name": "Authorize"}, NO),
    ({**LAMBDA, "function": ""}, NO),
    ({**{k: v for k, v in LAMBDA.items() if k != "function"}, "function_name": "no spaces"}, NO),
    ({**LAMBDA, "upstream": {"namespace": "team-a"}}, NO),
    ({**LAMBDA, "identity_sources": []}, NO),
    ({**LAMBDA, "identity_sources": "header:authorization"}, NO),
    ({**LAMBDA, "identity_sources": ["authorization"]}, NO),
    ({**LAMBDA, "identity_sources": ["cookie:session"]}, NO),
    ({**LAMBDA, "identity_sources": ["Header:authorization"]}, NO),
    ({**LAMBDA, "identity_sources": ["header:"]}, NO),
    ({**LAMBDA, "identity_sources": ["query:"]}, NO),
    ({**LAMBDA, "identity_sources": ["header:bad name"]}, NO),
    ({**LAMBDA, "identity_sources": ["header:x\n"]}, NO),
    ({**LAMBDA, "ttl": 3601}, NO),
    ({**LAMBDA, "ttl": -1}, NO),
    ({**LAMBDA, "ttl": "soon"}, NO),
    ({**LAMBDA, "ttl": True}, NO),
    # A field of a JWT authorizer: the parser refuses it, the CRD's `not` too.
    ({**LAMBDA, "issuer": "https://id.example.com"}, NO),
    ({**LAMBDA, "jwks": {"uri": "https://id.example.com"}}, NO),
    ({**LAMBDA, "header": "authorization"}, NO),
    ({**LAMBDA, "ttl": "2h"}, TEXT_OUT_OF_RANGE),
    ({**LAMBDA, "ttl": "0ms"}, TEXT_OUT_OF_RANGE),
    # As in destinations: an upstream that cannot name an Upstream is refused at apply time.
    ({**LAMBDA, "upstream": "Not_A_Name"}, CRD_STRICTER_VALUE),
    # A line break in a query parameter's name: the folder takes it, the CRD's `.` does not.
    ({**LAMBDA, "identity_sources": ["query:a\nb"]}, CRD_STRICTER_VALUE),
]


@pytest.mark.parametrize(("authorizer", "want"), _table(LAMBDA_AUTHORIZERS))
def test_lambda_authorizer(authorizer: Any, want: tuple[bool, bool]) -> None:
    _expect(authorizer_doc(authorizer), want)


@pytest.mark.parametrize("name", ["none", "a b", "-a", "a" * 65, "caf\u00e9"])
def test_the_crd_cannot_see_authorizer_names(name: str) -> None:
    # Map keys: Kubernetes 1.20's schemas cannot constrain them; the control plane rejects these in status.
    doc = authorizer_doc(JWT)
    doc["spec"]["authorizers"] = {name: JWT}
    assert (python_accepts(doc), crd_accepts(doc)) == (False, True)


def auth_doc(where: str, auth: Any) -> dict[str, Any]:
    """A document with two authorizers and API keys, and this auth on the service or on its route."""
    doc = vs_doc(authorizers={"jwt": JWT, "fn": LAMBDA}, api_keys={"secret_ref": "keys"})
    if where == "service":
        doc["spec"]["auth"] = auth
    else:
        doc["spec"]["routes"][0]["auth"] = auth
    return doc


AUTHS = [
    ({}, YES),
    ({"authorizer": "jwt"}, YES),
    ({"authorizer": "fn"}, YES),
    ({"authorizer": "none"}, YES),
    ({"authorizer": "jwt", "scopes": ["read", "pets/write", "https://api.example.com/pets.read"]}, YES),
    ({"authorizer": "jwt", "scopes": ["s" * 256]}, YES),
    ({"scopes": []}, YES),
    ({"api_key_required": True}, YES),
    ({"authorizer": "fn", "api_key_required": False}, YES),
    ({"authorizer": "bad name"}, NO),
    ({"authorizer": 5}, NO),
    ({"authorizer": "jwt", "scopes": "read"}, NO),
    ({"authorizer": "jwt", "scopes": ["a b"]}, NO),
    ({"authorizer": "jwt", "scopes": ['a"b']}, NO),
    ({"authorizer": "jwt", "scopes": ["a\\b"]}, NO),
    ({"authorizer": "jwt", "scopes": [""]}, NO),
    ({"authorizer": "jwt", "scopes": ["caf\u00e9"]}, NO),
    ({"authorizer": "jwt", "scopes": ["s" * 257]}, NO),
    ({"api_key_required": "yes"}, NO),
    ("jwt", NO),
    # The folder reads "" as absent.
    ({"authorizer": ""}, CRD_STRICTER_VALUE),
    # Across fields and objects, so the control plane's: the name must be an authorizer's, and scopes need JWT.
    ({"authorizer": "missing"}, (False, True)),
    ({"authorizer": "fn", "scopes": ["read"]}, (False, True)),
    ({"scopes": ["read"]}, (False, True)),
]


@pytest.mark.parametrize("where", ["service", "route"])
@pytest.mark.parametrize(("auth", "want"), _table(AUTHS))
def test_auth(where: str, auth: Any, want: tuple[bool, bool]) -> None:
    _expect(auth_doc(where, auth), want)


def test_api_key_required_needs_api_keys() -> None:
    doc = vs_doc()
    doc["spec"]["routes"][0]["auth"] = {"api_key_required": True}
    assert (python_accepts(doc), crd_accepts(doc)) == (False, True)
    doc["spec"]["api_keys"] = {"secret_ref": "keys"}
    # The Secret is looked up when the configuration is resolved, not when it is parsed.
    assert (python_accepts(doc), crd_accepts(doc)) == (True, True)


API_KEYS = [
    ({"secret_ref": "keys"}, YES),
    ({"secret_ref": "keys", "rate_limit": {"requests": 5}}, YES),
    ({"secret_ref": "keys", "limits": {"partner": {"requests": 100, "per": "1m", "burst": 150}}}, YES),
    ({"secret_ref": "keys", "rate_limit": {"requests": 5}, "limits": {}}, YES),
    ({}, NO),
    ({"secret_ref": ""}, NO),
    ({"secret_ref": 5}, NO),
    ({"rate_limit": {"requests": 5}}, NO),
    ({"secret_ref": "keys", "rate_limit": {}}, NO),
    ({"secret_ref": "keys", "rate_limit": {"requests": 0}}, NO),
    ({"secret_ref": "keys", "rate_limit": {"requests": 5, "per": 86401}}, NO),
    ({"secret_ref": "keys", "limits": {"p": {"per": "1s"}}}, NO),
    ({"secret_ref": "keys", "limits": {"p": {"requests": "10"}}}, NO),
    ({"secret_ref": "keys", "limits": {"p": {"requests": 10, "per": "1 s"}}}, NO),
    ({"secret_ref": "keys", "limits": {"p": 5}}, NO),
    ({"secret_ref": "keys", "limits": ["p"]}, NO),
    ("keys", NO),
    # As an Upstream's secret_ref: a name that cannot name a Secret is refused at apply time.
    ({"secret_ref": "Not_A_Name"}, CRD_STRICTER_VALUE),
    # burst at least requests, and the period's text range: the control plane's.
    ({"secret_ref": "keys", "limits": {"p": {"requests": 10, "burst": 5}}}, (False, True)),
    ({"secret_ref": "keys", "rate_limit": {"requests": 10, "per": "10ms"}}, TEXT_OUT_OF_RANGE),
]


@pytest.mark.parametrize(("api_keys", "want"), _table(API_KEYS))
def test_api_keys(api_keys: Any, want: tuple[bool, bool]) -> None:
    _expect(vs_doc(api_keys=api_keys), want)


INTEGRATIONS = [
    ({}, YES),
    ({"request_template": '{"id": "{{ path_params.id }}"}'}, YES),
    ({"responses": []}, YES),
    ({"responses": [{}]}, YES),
    ({"responses": [{"status": 599, "pattern": "x"}, {"status": 200}]}, YES),
    (
        {"responses": [{"headers": {"x-a": "1", "Cache-Control": "no-store"}, "content_type": "text/plain"}]},
        YES,
    ),
    (FULL_INTEGRATION, YES),
    ({"request_template": ""}, NO),
    ({"request_template": 5}, NO),
    ({"responses": {}}, NO),
    ({"responses": ["ok"]}, NO),
    ({"responses": [{"status": 199}]}, NO),
    ({"responses": [{"status": 600}]}, NO),
    ({"responses": [{"status": "200"}]}, NO),
    ({"responses": [{"pattern": ""}]}, NO),
    ({"responses": [{"pattern": 5}]}, NO),
    ({"responses": [{"template": ""}]}, NO),
    ({"responses": [{"headers": ["x-a"]}]}, NO),
    ({"responses": [{"headers": {"x-a": "a\nb"}}]}, NO),
    ({"responses": [{"headers": {"x-a": True}}]}, NO),
    ({"responses": [{"content_type": 5}]}, NO),
    ("template", NO),
    # The folder reads "" as absent, and takes a number as a header's text (as in mocks).
    ({"responses": [{"content_type": ""}]}, CRD_STRICTER_VALUE),
    ({"responses": [{"headers": {"x-a": 1}}]}, CRD_STRICTER_VALUE),
    # Across items, or inside text (regexes, templates) or keys (header names): the control plane's.
    ({"responses": [{"status": 200}, {"status": 500}]}, (False, True)),
    ({"responses": [{"pattern": "("}]}, (False, True)),
    ({"request_template": "{{ path"}, (False, True)),
    ({"responses": [{"headers": {"bad name": "x"}}]}, (False, True)),
    ({"responses": [{"headers": {"content-length": "1"}}]}, (False, True)),
]


@pytest.mark.parametrize(("integration", "want"), _table(INTEGRATIONS))
def test_integration(integration: Any, want: tuple[bool, bool]) -> None:
    _expect(route_doc({**dest(function="list-pets"), "integration": integration}), want)


@pytest.mark.parametrize(
    ("route", "want"),
    [
        pytest.param({**dest(function="a"), "integration": {}}, YES, id="destination+integration"),
        pytest.param(
            {**dest(function="a"), "integration": {}, "options": {"timeout": 5, "invocation_type": "Event"}},
            YES,
            id="integration+options",
        ),
        pytest.param({"mock": {}, "integration": {}}, NO, id="mock+integration"),
        pytest.param({**dest(function="a"), "mock": {}, "integration": {}}, NO, id="all three"),
        pytest.param({"integration": {}}, NO, id="only integration"),
        pytest.param(
            {**dest(function="a"), "integration": {}, "options": {"payload_format": "raw"}},
            NO,
            id="integration+payload_format",
        ),
    ],
)
def test_integration_only_with_a_destination(route: dict[str, Any], want: tuple[bool, bool]) -> None:
    _expect(route_doc(route), want)


@pytest.mark.parametrize(
    ("auth", "want"),
    [
        pytest.param({"authorizer": "jwt", "scopes": ["read"]}, YES, id="jwt"),
        pytest.param({"authorizer": "none"}, YES, id="none"),
        # Envoy answers a mock route: only its jwt_authn applies. Across objects, so the control plane's.
        pytest.param({"authorizer": "fn"}, (False, True), id="lambda authorizer"),
        pytest.param({"api_key_required": True}, (False, True), id="api key"),
    ],
)
def test_mock_route_auth(auth: dict[str, Any], want: tuple[bool, bool]) -> None:
    doc = auth_doc("route", auth)
    doc["spec"]["routes"][0] = {"matcher": {"path": "/health"}, "mock": {}, "auth": auth}
    _expect(doc, want)


def test_service_and_route_auth_are_the_same_schema() -> None:
    assert _vs_spec()["auth"]["properties"] == _route_props()["auth"]["properties"]


def test_every_rate_limit_is_the_same_schema() -> None:
    (opts, _) = _options_nodes()
    keys = _vs_spec()["api_keys"]["properties"]
    for node in (keys["rate_limit"], keys["limits"]["additionalProperties"]):
        assert node["properties"] == opts["properties"]["rate_limit"]["properties"]
        assert node["required"] == opts["properties"]["rate_limit"]["required"]


def test_issue_7_patterns_and_limits_are_the_parsers() -> None:
    auth = _vs_spec()["auth"]["properties"]
    assert auth["authorizer"]["pattern"] == model_parse.AUTHORIZER_NAME_RE.pattern
    assert auth["scopes"]["items"]["pattern"] == model_parse.SCOPE_RE.pattern
    authz = _authorizer_props()
    assert authz["type"]["enum"] == ["jwt", "lambda"]
    assert authz["header"]["pattern"] == model_parse.HEADER_NAME_RE.pattern
    header = model_parse.HEADER_NAME_RE.pattern.strip("^$")
    assert authz["identity_sources"]["items"]["pattern"] == f"^(header:{header}|query:.+)$"
    assert IDENTITY_KINDS == ("header", "query")  # the pattern's two alternatives
    # Every duration has one pattern; their ranges are the parser's.
    jwks = authz["jwks"]["properties"]
    (opts, _) = _options_nodes()
    for node, high, low in [
        (jwks["timeout"], 60, 1),
        (jwks["cache_duration"], model_parse.DAY_S, 1),
        (authz["ttl"], model_parse.MAX_TTL_S, 0),
    ]:
        assert node["pattern"] == opts["properties"]["timeout"]["pattern"]
        assert node.get("x-kubernetes-int-or-string") and "type" not in node
        assert (node["minimum"], node["maximum"]) == (low, high)
    # The authorizer's Upstream reference is destination.upstream's.
    dest_props = _route_props()["destination"]["properties"]
    assert {k: v for k, v in authz["upstream"].items() if k != "description"} == {
        k: v for k, v in dest_props["upstream"].items() if k != "description"
    }
    response = _route_props()["integration"]["properties"]["responses"]["items"]["properties"]
    low, high = model_parse.INTEGRATION_STATUS_RANGE
    assert (response["status"]["minimum"], response["status"]["maximum"]) == (low, high)
    assert response["headers"] == _route_props()["mock"]["properties"]["headers"]


def test_schema_default_of_an_integration_response_is_the_parsers() -> None:
    doc = route_doc({**dest(function="list-pets"), "integration": {"responses": [{}]}})
    vs = parse_document(doc)
    assert isinstance(vs, VirtualService) and vs.routes[0].integration is not None
    defaulted = apply_defaults(schema("virtualservices"), copy.deepcopy(doc))
    status = defaulted["spec"]["routes"][0]["integration"]["responses"][0]["status"]
    assert status == vs.routes[0].integration.responses[0].status == 200


# ---------------------------------------------------------------------------------------------------------------
# RBAC


READ = {"get", "list", "watch"}
# Per ServiceAccount: its ClusterRole, its leader-election Role and Lease, and exactly what the ClusterRole grants.
RBAC = {
    "lambdagate": (
        "lambdagate-controlplane",
        "lambdagate-leader-election",
        KubeSettings().lease_name,
        {
            ("lambdagate.io", "upstreams"): READ,
            ("lambdagate.io", "virtualservices"): READ,
            ("lambdagate.io", "upstreams/status"): {"patch", "update"},
            ("lambdagate.io", "virtualservices/status"): {"patch", "update"},
            ("", "secrets"): READ,
        },
    ),
    # The discovery worker reads what the control plane reads (the same KubernetesSource watches), and writes
    # only Upstreams' status, by merge patch.
    "lambdagate-discovery": (
        "lambdagate-discovery",
        "lambdagate-discovery-leader-election",
        DISCOVERY_LEASE,
        {
            ("lambdagate.io", "upstreams"): READ,
            ("lambdagate.io", "virtualservices"): READ,
            ("lambdagate.io", "upstreams/status"): {"patch"},
            ("", "secrets"): READ,
        },
    ),
}


def _granted(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize("account", sorted(RBAC))
def test_rbac_is_least_privilege(account: str) -> None:
    docs = manifest("rbac.yaml")
    cluster_role, ns_role, lease, expected = RBAC[account]
    cluster_rules = one(docs, "ClusterRole", cluster_role)["rules"]
    ns_rules = one(docs, "Role", ns_role)["rules"]
    for rule in cluster_rules + ns_rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert "nonResourceURLs" not in rule
    granted = _granted(cluster_rules)
    assert granted == expected
    # Writes only to status subresources, cluster-wide.
    for (_, res), verbs in granted.items():
        assert not verbs & WRITE_VERBS or res.endswith("/status"), res
    # Leader election: the one Lease, in our namespace only (create cannot be limited to a name).
    assert ns_rules == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
    ]


def test_rbac_has_no_other_roles() -> None:
    docs = manifest("rbac.yaml")
    roles = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("ClusterRole", "Role")}
    assert roles == {
        (kind, name)
        for cluster, ns, _, _ in RBAC.values()
        for kind, name in (("ClusterRole", cluster), ("Role", ns))
    }
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"} == set(RBAC)


@pytest.mark.parametrize("account", sorted(RBAC))
def test_rbac_bindings_name_the_service_account(account: str) -> None:
    docs = manifest("rbac.yaml")
    one(docs, "ServiceAccount", account)
    cluster_role, ns_role, _, _ = RBAC[account]
    for kind, name, role_kind in [
        ("ClusterRoleBinding", cluster_role, "ClusterRole"),
        ("RoleBinding", ns_role, "Role"),
    ]:
        binding = one(docs, kind, name)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": name,
        }
        # One account per role: the discovery worker never gets the control plane's grant, nor the reverse.
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]


# ---------------------------------------------------------------------------------------------------------------
# Kustomization (kubectl 1.20 embeds kustomize v2.0.3)

KUSTOMIZE_V2_0_3_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "commonLabels",
    "commonAnnotations",
    "resources",
    "bases",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "images",
    "patchesStrategicMerge",
    "patchesJson6902",
    "crds",
    "vars",
    "configurations",
}


@pytest.mark.parametrize("folder", [DEPLOY, ENVOY], ids=["deploy", "envoy"])
def test_kustomization_uses_kustomize_v2_0_3_fields_only(folder: Path) -> None:
    (k,) = load_docs(folder / "kustomization.yaml")
    assert set(k) <= KUSTOMIZE_V2_0_3_FIELDS, set(k) - KUSTOMIZE_V2_0_3_FIELDS
    # v2.0.3 takes folders only under `bases`, files only under `resources`.
    for res in k.get("resources", []):
        assert (folder / res).is_file(), res
    for base in k.get("bases", []):
        assert (folder / base / "kustomization.yaml").is_file(), base
    for gen in k.get("configMapGenerator", []):
        for entry in gen.get("files", []):
            assert (folder / entry.split("=", 1)[-1]).is_file(), entry


def test_kustomization_covers_the_manifests() -> None:
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert k["namespace"] == NAMESPACE
    assert k["bases"] == ["../envoy"]
    listed = {DEPLOY / r for r in k["resources"]}
    manifests = {
        p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml" and "examples" not in p.parts
    }
    assert listed == manifests
    ns = one(manifest("namespace.yaml"), "Namespace", NAMESPACE)
    assert ns["apiVersion"] == "v1"
    assert [i["name"] for i in k["images"]] == ["lambdagate"]


def test_envoy_configmap_is_what_the_gateway_mounts() -> None:
    (k,) = load_docs(ENVOY / "kustomization.yaml")
    (gen,) = k["configMapGenerator"]
    assert gen["files"] == ["bootstrap.yaml=bootstrap-kubernetes.yaml"]
    pod = one(manifest("gateway.yaml"), "Deployment", "lambdagate-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (envoy,) = pod["containers"]
    mount = next(m for m in envoy["volumeMounts"] if volumes[m["name"]].get("configMap"))
    assert volumes[mount["name"]]["configMap"]["name"] == gen["name"]
    args = envoy["args"]
    assert args[args.index("-c") + 1] == f"{mount['mountPath']}/bootstrap.yaml"
    assert "--disable-hot-restart" in args


# ---------------------------------------------------------------------------------------------------------------
# Workloads


WORKLOAD_FILES = ("controlplane.yaml", "discovery.yaml", "gateway.yaml")


def _workloads() -> list[dict[str, Any]]:
    return [d for f in WORKLOAD_FILES for d in manifest(f) if d["kind"] == "Deployment"]


@pytest.mark.parametrize("name", ["lambdagate-controlplane", "lambdagate-discovery", "lambdagate-gateway"])
def test_deployment_is_hardened(name: str) -> None:
    dep = one(_workloads(), "Deployment", name)
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        # A container that serves something says when it is ready; the discovery worker serves nothing.
        assert c.get("readinessProbe") or not c.get("ports")
    # Selectors select the pod template.
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_select_their_pods() -> None:
    for file, dep_name, svc_name in [
        ("controlplane.yaml", "lambdagate-controlplane", XDS_SERVICE),
        ("gateway.yaml", "lambdagate-gateway", "lambdagate-gateway"),
    ]:
        docs = manifest(file)
        pod = one(docs, "Deployment", dep_name)["spec"]["template"]
        svc = one(docs, "Service", svc_name)
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        port_names = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    (xds_port,) = one(manifest("controlplane.yaml"), "Service", XDS_SERVICE)["spec"]["ports"]
    assert (xds_port["name"], xds_port["port"], xds_port["appProtocol"]) == ("grpc", XDS_PORT, "grpc")
    (http,) = one(manifest("gateway.yaml"), "Service", "lambdagate-gateway")["spec"]["ports"]
    assert (http["port"], http["targetPort"]) == (80, "http")


def test_controlplane_command_line() -> None:
    dep = one(manifest("controlplane.yaml"), "Deployment", "lambdagate-controlplane")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "lambdagate"
    (c,) = pod["containers"]
    args = c["args"]
    ns = build_parser().parse_args(args)
    assert ns.command == "serve" and ns.kubernetes and ns.config_dir is None
    assert not ns.no_leader_election
    # The Lease goes in the pod's namespace (--lease-namespace defaults to $POD_NAMESPACE).
    (env,) = c["env"]
    assert (env["name"], env["valueFrom"]["fieldRef"]["fieldPath"]) == ("POD_NAMESPACE", "metadata.namespace")
    assert ns.grpc_address == ("0.0.0.0", XDS_PORT)
    assert ns.extproc_address == (XDS_HOST, XDS_PORT)
    assert (ns.listen_address, ns.listen_port) == ("0.0.0.0", 8080)
    gateway = one(manifest("gateway.yaml"), "Deployment", "lambdagate-gateway")
    (envoy,) = gateway["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in envoy["ports"]} == {ns.listen_port}
    assert c["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    assert c["readinessProbe"]["exec"]["command"] == ["lambdagate-grpc-health", f"127.0.0.1:{XDS_PORT}"]


def test_discovery_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the pod's environment holds (see env below).
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    dep = one(manifest("discovery.yaml"), "Deployment", "lambdagate-discovery")
    pod = dep["spec"]["template"]["spec"]
    # Its own identity, apart from the control plane's (IRSA gives each its own AWS role).
    assert pod["serviceAccountName"] == "lambdagate-discovery"
    one(manifest("rbac.yaml"), "ServiceAccount", pod["serviceAccountName"])
    (c,) = pod["containers"]
    assert c["image"] == "lambdagate" and "command" not in c  # the image's ENTRYPOINT, lambdagate
    ns = build_parser().parse_args(c["args"])
    assert ns.command == "discover" and ns.kubernetes and ns.config_dir is None
    # Every namespace (the ClusterRole's reach), replicas elected, a listing every five minutes, for good.
    assert ns.namespace is None and not ns.no_leader_election and not ns.once
    assert ns.interval == 300.0
    # Only what the pod names: no kubeconfig (in-cluster), no local endpoint.
    assert ns.kubeconfig is None and ns.local_lambda_url is None
    # The Lease goes in the pod's namespace (--lease-namespace defaults to $POD_NAMESPACE); the identity is
    # the pod's hostname.
    (env,) = c["env"]
    assert (env["name"], env["valueFrom"]["fieldRef"]["fieldPath"]) == ("POD_NAMESPACE", "metadata.namespace")
    assert ns.lease_namespace == NAMESPACE and ns.identity is None
    assert not c.get("ports") and "livenessProbe" not in c
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "lambdagate-discovery"
    # No Service selects it (it serves nothing).
    for file in WORKLOAD_FILES:
        for svc in (d for d in manifest(file) if d["kind"] == "Service"):
            assert not svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.fullmatch(r"RUN pip install --no-cache-dir \..*", line) for line in lines)
    assert "COPY deploy/grpc_health_probe.py /usr/local/bin/lambdagate-grpc-health" in lines
    (user,) = [line for line in lines if line.startswith("USER ")]
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    assert [line for line in lines if line.startswith("ENTRYPOINT")] == ['ENTRYPOINT ["lambdagate"]']
    # The build context (repo root) passes only what the COPY lines need.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for line in lines:
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert f"!{src}" in ignore or f"!{src}/" in ignore, src
    for path in ("pyproject.toml", "README.md", "controlplane", "discovery"):
        assert (ROOT / path).exists()


def test_sidecar_example_has_a_node_id_per_pod() -> None:
    docs = manifest("examples/sidecar.yaml")
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    envoy = containers["envoy"]
    args = envoy["args"]
    assert args[args.index("--service-node") + 1] == "$(POD_NAMESPACE)/$(POD_NAME)"
    assert {e["name"] for e in envoy["env"]} == {"POD_NAME", "POD_NAMESPACE"}
    assert all("namespace" not in d["metadata"] for d in docs)  # applied in the app's namespace


# ---------------------------------------------------------------------------------------------------------------
# The readiness probe script


def _load_probe() -> Any:
    spec = importlib.util.spec_from_file_location("grpc_health_probe", DEPLOY / "grpc_health_probe.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readiness_probe_follows_grpc_health() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    probe = _load_probe()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe.main(["probe", target]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe.main(["probe", target]) == 0
    finally:
        server.stop(None)
    assert probe.main(["probe", target]) == 1  # nothing listening

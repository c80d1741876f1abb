"""The Kubernetes source's own logic, on objects shaped as the API server returns them (no cluster needed).

The live behaviour (list, watch, 410, status patches) is tested against a real kube-apiserver elsewhere.
"""

from __future__ import annotations

import base64
import copy

from controlplane.model import ObjectKey
from controlplane.sources.kubernetes import KubernetesSource, KubeSettings, _as_document


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


SECRET = {
    "metadata": {"name": "aws", "namespace": "team", "resourceVersion": "5"},
    "data": {"access_key": b64("AKIDK8S"), "secret_key": b64("k8s-secret"), "unrelated": b64("x")},
    "type": "Opaque",
}
UPSTREAM = {
    "metadata": {"name": "lambdas", "namespace": "team", "generation": 3},
    "spec": {
        "type": "aws",
        "region": "us-east-1",
        "secret_ref": "aws",
        "functions": [{"name": "f", "spec": {"function_name": "fn"}}],
    },
    "status": {"state": "Accepted"},
}
VS = {
    "metadata": {"name": "api", "namespace": "team", "generation": 7},
    "spec": {
        "domains": ["*"],
        "routes": [{"matcher": {"prefix": "/"}, "destination": {"upstream": "lambdas", "function": "f"}}],
    },
}


def source_with(*objects: tuple[str, dict]) -> KubernetesSource:
    src = KubernetesSource(KubeSettings())
    for kind, obj in objects:
        src._store.put(kind, copy.deepcopy(obj))
    return src


def test_objects_from_the_api_become_a_config_with_accepted_status() -> None:
    src = source_with(("Secret", SECRET), ("Upstream", UPSTREAM), ("VirtualService", VS))
    result = src.load()
    assert not result.errors
    assert [u.name for u in result.config.upstreams] == ["lambdas"]
    key = ObjectKey("VirtualService", "team", "api")
    status = src.status_for(key, src._store.objects[key], result)
    assert status["state"] == "Accepted" and status["observedGeneration"] == 7
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Accepted": "True", "Serving": "True"}


def test_secret_documents_keep_only_the_aws_keys() -> None:
    doc = _as_document("Secret", SECRET)
    assert set(doc["data"]) == {"access_key", "secret_key"} and doc["kind"] == "Secret"


def test_rejections_name_the_field_and_keep_the_good_objects() -> None:
    bad_vs = copy.deepcopy(VS)
    bad_vs["metadata"]["name"] = "broken"
    bad_vs["spec"]["routes"][0]["destination"]["function"] = "nope"
    no_secret = copy.deepcopy(UPSTREAM)
    no_secret["metadata"]["name"] = "orphan"
    no_secret["spec"]["secret_ref"] = "missing"
    src = source_with(
        ("Secret", SECRET),
        ("Upstream", UPSTREAM),
        ("VirtualService", VS),
        ("VirtualService", bad_vs),
        ("Upstream", no_secret),
    )
    result = src.load()
    assert [v.name for v in result.config.virtual_services] == ["api"]
    broken = ObjectKey("VirtualService", "team", "broken")
    status = src.status_for(broken, src._store.objects[broken], result)
    assert status["state"] == "Rejected"
    assert "spec.routes[0].destination.function" in status["reason"] and "nope" in status["reason"]
    orphan = ObjectKey("Upstream", "team", "orphan")
    assert "spec.secret_ref" in src.status_for(orphan, src._store.objects[orphan], result)["reason"]


def test_a_bad_edit_keeps_serving_the_last_good_generation() -> None:
    src = source_with(("Secret", SECRET), ("Upstream", UPSTREAM), ("VirtualService", VS))
    src.load()
    edited = copy.deepcopy(VS)
    edited["metadata"]["generation"] = 8
    edited["spec"]["routes"][0]["destination"]["upstream"] = "ghost"
    src._store.put("VirtualService", edited)
    result = src.load()
    assert [v.name for v in result.config.virtual_services] == ["api"]  # generation 7 still routes
    key = ObjectKey("VirtualService", "team", "api")
    status = src.status_for(key, src._store.objects[key], result)
    assert status["state"] == "Rejected" and status["observedGeneration"] == 8
    serving = next(c for c in status["conditions"] if c["type"] == "Serving")
    assert serving["status"] == "True" and serving["reason"] == "LastGoodVersion"


def test_an_upstream_without_functions_is_a_warning() -> None:
    empty = copy.deepcopy(UPSTREAM)
    empty["spec"]["functions"] = []
    src = source_with(("Secret", SECRET), ("Upstream", empty))
    result = src.load()
    key = ObjectKey("Upstream", "team", "lambdas")
    assert src.status_for(key, src._store.objects[key], result)["state"] == "Warning"


def test_no_secret_value_in_status_or_errors() -> None:
    wrong = copy.deepcopy(SECRET)
    wrong["data"] = {"access_key": b64("AKIDK8S")}  # no secret_key
    src = source_with(("Secret", wrong), ("Upstream", UPSTREAM))
    result = src.load()
    key = ObjectKey("Upstream", "team", "lambdas")
    status = src.status_for(key, src._store.objects[key], result)
    assert status["state"] == "Rejected" and "lacks access_key and secret_key" in status["reason"]
    assert "AKIDK8S" not in str(status) and "k8s-secret" not in str(result.errors)

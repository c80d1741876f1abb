"""lambdagate on a real Kubernetes API server (1.20, built from Debian's source) with a real Envoy in front.

The control plane runs with the ServiceAccount identity that `deploy/` grants, never as an admin, so the
RBAC there is proven sufficient by every test here.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Envoy, LoopThread, control_plane, free_port, http, wait_until
from k8s.cluster import KubeCluster
from k8s.fixtures import install_deploy, kube_cluster  # noqa: F401 (a fixture)

from controlplane.locallambda import LocalLambda
from controlplane.model.resources import Endpoint
from controlplane.sources.kubernetes import KubeSettings

ROOT = Path(__file__).resolve().parents[2]
NS = "shop"
SECRET_KEY = "k8s-local-secret"

HANDLER = textwrap.dedent("""
    import json

    def handler(event, context):
        return {"statusCode": 200, "headers": {"content-type": "application/json"},
                "body": json.dumps({"fn": context.function_name, "path": event["path"],
                                    "stage": event["requestContext"]["stage"]})}
""")


def manifest(secret_key: str = SECRET_KEY, *, route_fn: str = "hello", prefix: str = "/hello") -> str:
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: aws, namespace: {NS}}}
        stringData: {{access_key: AKIDK8S, secret_key: {secret_key}}}
        ---
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: lambdas, namespace: {NS}}}
        spec:
          type: aws
          region: us-east-1
          secret_ref: aws
          endpoint: local
          functions:
          - {{name: hello, spec: {{function_name: hello}}}}
          - {{name: bye, spec: {{function_name: bye}}}}
        ---
        apiVersion: lambdagate.io/v1
        kind: VirtualService
        metadata: {{name: api, namespace: {NS}}}
        spec:
          domains: ["*"]
          stage: k8s
          routes:
          - matcher: {{prefix: {prefix}}}
            destination: {{upstream: lambdas, function: {route_fn}}}
    """)


def get(cluster: KubeCluster, kind: str, name: str) -> dict[str, Any]:
    out = cluster.kubectl("get", kind, name, "-n", NS, "-o", "json")
    return dict(json.loads(out.stdout))


class Stack:
    def __init__(self, cluster: KubeCluster, base: str, cp: Any) -> None:
        self.cluster, self.base, self.cp = cluster, base, cp


@pytest.fixture(scope="module")
def installed(kube_cluster: KubeCluster) -> KubeCluster:  # noqa: F811
    """The CRDs and deploy/'s namespace, ServiceAccount and RBAC, applied the way a user installs them."""
    install_deploy(kube_cluster, NS)
    return kube_cluster


@pytest.fixture
def stack(installed: KubeCluster, tmp_path: Path, loop_thread: LoopThread) -> Iterator[Stack]:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "hello.py").write_text(HANDLER)
    (functions / "bye.py").write_text(HANDLER)
    local = LocalLambda(functions, {"AKIDK8S": SECRET_KEY})
    lport = loop_thread.run(local.start())
    installed.kubectl("apply", "-f", "-", input=manifest())
    port = free_port()
    settings = KubeSettings(
        namespace=None,
        kubeconfig=str(installed.kubeconfig_sa),
        lease_namespace="lambdagate-system",
        identity="test-replica",
        watch_timeout_s=30,
    )
    try:
        with (
            control_plane(
                loop_thread,
                None,
                listen_port=port,
                local_endpoint=Endpoint("http", "127.0.0.1", lport),
                kubernetes=settings,
            ) as cp,
            Envoy(cp.port) as envoy,
        ):
            envoy.wait_listening(port)
            yield Stack(installed, f"http://127.0.0.1:{port}", cp)
    finally:
        installed.kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest(), check=False)
        loop_thread.run(local.stop())


def test_invalid_objects_are_rejected_at_apply_time(installed: KubeCluster) -> None:
    bad = manifest().split("---")[1].replace("region: us-east-1", "region: moon-1")
    out = installed.kubectl("apply", "-f", "-", input=bad, check=False)
    assert out.returncode != 0 and "spec.region" in out.stderr
    bad_fn = manifest().split("---")[1].replace("function_name: hello}", "function_name: 'no spaces'}")
    out = installed.kubectl("apply", "-f", "-", input=bad_fn, check=False)
    assert out.returncode != 0 and "function_name" in out.stderr


def test_applied_resources_are_routed_and_get_status(stack: Stack) -> None:
    r = wait_until(
        lambda: (x := http("GET", stack.base + "/hello/1")).status == 200 and x,
        10,
        what="the applied VirtualService to route",
    )
    assert r.json() == {"fn": "hello", "path": "/hello/1", "stage": "k8s"}
    wait_until(
        lambda: get(stack.cluster, "virtualservice", "api").get("status", {}).get("state") == "Accepted",
        30,
        what="VirtualService status",
    )
    up = get(stack.cluster, "upstream", "lambdas")
    assert up["status"]["state"] == "Accepted"
    assert up["status"]["observedGeneration"] == up["metadata"]["generation"]
    table = stack.cluster.kubectl("get", "upstreams", "-n", NS).stdout
    header = table.splitlines()[0].split()
    assert header[:1] == ["NAME"] and {"TYPE", "REGION", "FUNCTIONS", "STATE", "AGE"} <= set(header)
    row = table.splitlines()[1]
    assert "lambdas" in row and "us-east-1" in row and "Accepted" in row


def test_edits_bad_edits_and_deletes(stack: Stack) -> None:
    wait_until(lambda: http("GET", stack.base + "/hello").status == 200, 30, what="first route")
    stack.cluster.kubectl("apply", "-f", "-", input=manifest(route_fn="bye", prefix="/bye"))
    wait_until(lambda: http("GET", stack.base + "/bye").status == 200, 5, what="the edited route")
    assert http("GET", stack.base + "/bye").json()["fn"] == "bye"
    assert http("GET", stack.base + "/hello").status == 404

    # A route to a function the Upstream lacks: Rejected with the field, and the last good routes serve on.
    stack.cluster.kubectl("apply", "-f", "-", input=manifest(route_fn="nope", prefix="/nope"))
    wait_until(
        lambda: get(stack.cluster, "virtualservice", "api")["status"]["state"] == "Rejected",
        10,
        what="the Rejected status",
    )
    status = get(stack.cluster, "virtualservice", "api")["status"]
    assert "spec.routes[0].destination.function" in status["reason"] and "nope" in status["reason"]
    serving = {c["type"]: c for c in status["conditions"]}["Serving"]
    assert serving["status"] == "True" and serving["reason"] == "LastGoodVersion"
    assert http("GET", stack.base + "/bye").status == 200

    # Deleting the Upstream stops routing through it.
    stack.cluster.kubectl("delete", "upstream", "lambdas", "-n", NS)
    wait_until(
        lambda: http("GET", stack.base + "/bye").status == 404, 5, what="routes of a deleted Upstream to go"
    )


def test_rotated_secret_and_interrupted_watch(stack: Stack) -> None:
    wait_until(lambda: http("GET", stack.base + "/hello").status == 200, 30, what="first route")
    stack.cluster.kubectl("apply", "-f", "-", input=manifest(secret_key="rotated-wrong-key"))
    wait_until(lambda: http("GET", stack.base + "/hello").status == 502, 5, what="the rotated (wrong) key")
    assert "signature" in http("GET", stack.base + "/hello").json()["message"]

    # The API server goes away and comes back: watches reconnect and pick up what changed meanwhile.
    upstream_watch = stack.cp.source._watchers["Upstream"]
    lists_before = upstream_watch.relists
    stack.cluster.restart_apiserver()
    stack.cluster.kubectl("apply", "-f", "-", input=manifest())
    wait_until(
        lambda: http("GET", stack.base + "/hello").status == 200, 30, what="the change made after the restart"
    )
    # A fresh apiserver's watch cache starts at the current revision, so resuming from an older resourceVersion
    # is answered 410 Gone: the watcher had to list again rather than give up or loop.
    assert upstream_watch.relists > lists_before


def test_the_example_applies_and_earns_its_state(stack: Stack) -> None:
    ns = "petstore-example"
    # The example claims the domain "*", as the test VirtualService does: one domain, one VirtualService.
    stack.cluster.kubectl("delete", "virtualservice", "api", "-n", NS)
    stack.cluster.kubectl("create", "namespace", ns, check=False)
    stack.cluster.kubectl("apply", "-n", ns, "-f", str(ROOT / "deploy" / "examples" / "petstore.yaml"))

    def states() -> dict[str, str]:
        out = json.loads(
            stack.cluster.kubectl("get", "upstreams,virtualservices", "-n", ns, "-o", "json").stdout
        )
        return {i["metadata"]["name"]: (i.get("status") or {}).get("state", "") for i in out["items"]}

    wait_until(
        lambda: set(states().values()) == {"Accepted"}, 30, what="the example's objects to be Accepted"
    )
    table = stack.cluster.kubectl("get", "upstreams", "-n", ns).stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "TYPE", "REGION", "FUNCTIONS", "STATE", "AGE"]
    assert table[1].split()[:5] == ["petstore-lambdas", "aws", "us-east-1", "4", "Accepted"]


def test_route_options_and_stage_variables_survive_the_apiserver(installed: KubeCluster) -> None:
    """The CRDs declare options and stage_variables: a structural schema would silently prune them otherwise."""
    doc = textwrap.dedent(f"""
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: opts, namespace: {NS}}}
        spec:
          region: us-east-1
          options: {{payload_format: apigateway-v2, timeout: 20s}}
          functions: [{{name: f, spec: {{function_name: f}}}}]
        ---
        apiVersion: lambdagate.io/v1
        kind: VirtualService
        metadata: {{name: opts, namespace: {NS}}}
        spec:
          domains: [opts.test]
          stage_variables: {{env: prod, url: "https://x.example/a?b=c"}}
          routes:
          - matcher: {{prefix: /}}
            destination: {{upstream: opts, function: f}}
            options: {{invocation_type: Event, timeout: 5}}
    """)
    try:
        installed.kubectl("apply", "-f", "-", input=doc)
        up, vs = get(installed, "upstream", "opts"), get(installed, "virtualservice", "opts")
        assert up["spec"]["options"] == {"payload_format": "apigateway-v2", "timeout": "20s"}
        assert vs["spec"]["stage_variables"] == {"env": "prod", "url": "https://x.example/a?b=c"}
        assert vs["spec"]["routes"][0]["options"] == {"invocation_type": "Event", "timeout": 5}
        bad = doc.replace("invocation_type: Event", "invocation_type: Later")
        refused = installed.kubectl("apply", "-f", "-", input=bad, check=False)
        assert refused.returncode != 0 and "invocation_type" in refused.stderr
    finally:
        installed.kubectl("delete", "-f", "-", "--ignore-not-found", input=doc, check=False)

"""lambdagate on a real Kubernetes API server (1.20, built from Debian's source) with a real Envoy in front.

The control plane runs with the ServiceAccount identity that `deploy/` grants, never as an admin, so the
RBAC there is proven sufficient by every test here.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
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


# Issue 5's forms: weighted, function_name and function_param destinations, mock routes, every option, keep_warm.
FORMS = textwrap.dedent(f"""
    apiVersion: lambdagate.io/v1
    kind: Upstream
    metadata: {{name: warm, namespace: {NS}}}
    spec:
      region: us-east-1
      secret_ref: aws
      endpoint: local
      options:
        payload_format: raw
        max_retries: 1
        errors: {{throttled: 503}}
        rate_limit: {{requests: 50}}
      functions:
      - name: hello
        spec: {{function_name: hello}}
        keep_warm: {{interval: 5m, concurrency: 2}}
      - name: bye
        spec: {{function_name: bye}}
        keep_warm: {{interval: 600}}
    ---
    apiVersion: lambdagate.io/v1
    kind: VirtualService
    metadata: {{name: forms, namespace: {NS}}}
    spec:
      domains: [forms.test]
      routes:
      - matcher: {{prefix: /canary}}
        destination:
          upstream: warm
          functions:
          - {{function: hello, weight: 90}}
          - {{function_name: "bye:$LATEST", weight: 10}}
      - matcher: {{path: "/fn/{{name}}"}}
        destination: {{upstream: warm, function_param: name}}
      - matcher: {{prefix: /arn}}
        destination: {{upstream: warm, function_name: "123456789012:function:hello"}}
      - matcher: {{path: /health, methods: [GET]}}
        mock:
          headers: {{x-mock: "yes"}}
          body: {{ok: true, checks: [db, cache], detail: {{db: 1.5}}}}
      - matcher: {{path: /teapot}}
        mock: {{status: 418, body: short and stout}}
      - matcher: {{prefix: /api}}
        destination: {{upstream: warm, function: hello}}
        options:
          payload_format: apigateway-v2
          timeout: 10s
          max_retries: 2
          log_tail: true
          errors: {{function_error: 500, function_timeout: 504, throttled: 503, malformed_response: 502}}
          rate_limit: {{requests: 100, per: 1m, burst: 200}}
          cors:
            allow_origins: ["https://app.example.com", "http://localhost:3000"]
            allow_methods: [GET, POST]
            allow_headers: [content-type, x-api-key]
            expose_headers: [x-request-id]
            max_age: 600
            allow_credentials: true
""")


def _forms_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    up, vs = yaml.safe_load_all(FORMS)
    return up, vs


def test_issue_5_forms_survive_the_apiserver_and_are_accepted(stack: Stack) -> None:
    """Nothing the parser takes is pruned on the way through a structural schema, and the control plane,
    reading them back through its watches, accepts them."""
    cluster = stack.cluster
    try:
        cluster.kubectl("apply", "-f", "-", input=FORMS)
        up_sent, vs_sent = _forms_docs()
        up, vs = get(cluster, "upstream", "warm"), get(cluster, "virtualservice", "forms")
        # Read back unpruned: what was sent, plus the schema's defaults.
        up_sent["spec"]["type"] = "aws"
        up_sent["spec"]["functions"][1]["keep_warm"]["concurrency"] = 1
        vs_sent["spec"]["routes"][3]["mock"]["status"] = 200
        assert up["spec"] == up_sent["spec"]
        assert vs["spec"] == vs_sent["spec"]

        def states() -> tuple[Any, ...]:
            up, vs = get(cluster, "upstream", "warm"), get(cluster, "virtualservice", "forms")
            return tuple(
                ((o.get("status") or {}).get("state"), (o.get("status") or {}).get("reason"))
                for o in (up, vs)
            )

        wait_until(
            lambda: states() == (("Accepted", None), ("Accepted", None)),
            30,
            what="the Upstream and VirtualService to be Accepted",
        )
        for obj in (get(cluster, "upstream", "warm"), get(cluster, "virtualservice", "forms")):
            assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
            conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
            assert conditions["Accepted"] == conditions["Serving"] == "True"
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=FORMS, check=False)


def _edit_up(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    up, _ = _forms_docs()
    edit(up["spec"])
    return up


def _edit_vs(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    _, vs = _forms_docs()
    edit(vs["spec"])
    return vs


REFUSED = [
    pytest.param(
        _edit_vs(lambda s: s["routes"][3].update(destination={"upstream": "warm", "function": "hello"})),
        ("spec.routes", "one and only one", "Found 2 valid"),
        id="destination and mock",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][1].pop("destination")),
        ("spec.routes", "Found none valid", "destination: Required"),
        id="neither",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][2]["destination"].update(function="hello")),
        ("spec.routes.destination", "Found 2 valid"),
        id="function and function_name",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][0]["destination"]["functions"][0].update(weight=-1)),
        "weight",
        id="negative weight",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][0]["destination"]["functions"][1].pop("function_name")),
        ("spec.routes.destination.functions", "Found none valid"),
        id="choice without a function",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][2]["destination"].update(function_name="no spaces")),
        "function_name",
        id="bad function_name",
    ),
    pytest.param(_edit_vs(lambda s: s["routes"][4]["mock"].update(status=199)), "mock.status", id="mock 199"),
    pytest.param(
        _edit_vs(lambda s: s["routes"][3]["mock"]["headers"].update({"x-a": "a\nb"})),
        "mock.headers",
        id="header with a line break",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"].update(timeout=901)), "options.timeout", id="timeout 901"
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"].update(timeout="10 s")),
        "options.timeout",
        id="timeout text",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"].update(max_retries=6)), "max_retries", id="max_retries 6"
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"]["errors"].update(throttled=600)),
        "errors.throttled",
        id="error status 600",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"]["rate_limit"].pop("requests")),
        ("rate_limit", 'missing required field "requests"'),
        id="rate_limit without requests",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"]["cors"].update(allow_origins=[])),
        "cors.allow_origins",
        id="no origins",
    ),
    pytest.param(
        _edit_vs(lambda s: s["routes"][5]["options"]["cors"].update(max_age=0)),
        "cors.max_age",
        id="max_age 0",
    ),
    pytest.param(_edit_up(lambda s: s["options"].update(payload_format="RAW")), "payload_format", id="RAW"),
    pytest.param(
        _edit_up(lambda s: s["functions"][0]["keep_warm"].update(concurrency=51)),
        "keep_warm.concurrency",
        id="concurrency 51",
    ),
    pytest.param(
        _edit_up(lambda s: s["functions"][1]["keep_warm"].pop("interval")),
        ("keep_warm", 'missing required field "interval"'),
        id="keep_warm without interval",
    ),
]


@pytest.mark.parametrize(("doc", "said"), REFUSED)
def test_issue_5_forms_are_refused_at_apply_time(
    installed: KubeCluster, doc: dict[str, Any], said: str | tuple[str, ...]
) -> None:
    # The CRD's rules hold on the real apiserver as in tests/unit/test_deploy.py's validator. `said`: what the
    # refusal names (the apiserver's oneOf messages name the list, not the item; kubectl's own validation
    # catches missing required fields first).
    name = f"refused-{doc['kind'].lower()}"
    doc = {**doc, "metadata": {"name": name, "namespace": NS}}
    out = installed.kubectl("create", "-f", "-", input=json.dumps(doc), check=False)
    if out.returncode == 0:
        installed.kubectl("delete", doc["kind"].lower(), name, "-n", NS, check=False)
        pytest.fail(f"the apiserver took it: {out.stdout}")
    for part in (said,) if isinstance(said, str) else said:
        assert part in out.stderr, out.stderr

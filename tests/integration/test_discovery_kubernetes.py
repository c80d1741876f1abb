"""Function discovery on a real Kubernetes API server (1.20) with the control plane and a real Envoy in front.

The discovery worker runs the way deploy/discovery.yaml runs it: two `lambdagate discover --kubernetes`
processes with leader election, authenticated as the ServiceAccount deploy/ creates for it
(lambdagate-discovery) and limited to the RBAC deploy/ grants it. The control plane runs in-process as its own
ServiceAccount (lambdagate). The Upstream names no functions: every route here reaches a function the worker
found in the account (the local Lambda endpoint) and wrote into the Upstream's status.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Envoy, LoopThread, control_plane, free_port, http, wait_until
from k8s.cluster import KubeCluster
from k8s.fixtures import install_deploy, kube_cluster  # noqa: F401 (a fixture)

from controlplane.locallambda import LocalLambda
from controlplane.sources.kubernetes import KubeSettings
from discovery.service import LEASE_NAME

ROOT = Path(__file__).resolve().parents[2]
NS = "discovery-e2e"
SYSTEM_NS = "lambdagate-system"
DISCOVERY_SA = "lambdagate-discovery"
ACCESS_KEY = "AKIDDISCOVERY"
SECRET_KEY = "discovery-secret"
REPLICAS = ("discovery-a", "discovery-b")
# The account is an endpoint URL, not `local`, so the worker lists it on its ordinary interval (shortened).
INTERVAL = "2s"
ADDED_HOST = "added.example.com"

HANDLERS = textwrap.dedent("""
    import json

    def _answer(event, context, code):
        return {"statusCode": 200, "headers": {"content-type": "application/json"},
                "body": json.dumps({"fn": context.function_name, "version": context.function_version,
                                    "code": code, "path": event["path"]})}

    def latest(event, context):
        return _answer(event, context, "latest")

    def v1(event, context):
        return _answer(event, context, "v1")
""")

# The account's functions: hello with version 1 and the alias live -> 1, and bye.
FUNCTIONS: list[dict[str, Any]] = [
    {"name": "hello", "handler": "handlers.latest", "versions": {1: "handlers.v1"}, "aliases": {"live": "1"}},
    {"name": "bye", "handler": "handlers.latest"},
]
ADDED: dict[str, Any] = {"name": "added", "handler": "handlers.latest"}


def write_functions(folder: Path, functions: list[dict[str, Any]]) -> None:
    (folder / "functions.yaml").write_text(yaml.safe_dump({"functions": functions}))


def secret(secret_key: str) -> str:
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: aws, namespace: {NS}}}
        stringData: {{access_key: {ACCESS_KEY}, secret_key: {secret_key}}}
    """)


def manifest(lambda_port: int) -> str:
    return secret(SECRET_KEY) + textwrap.dedent(f"""
        ---
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: lambdas, namespace: {NS}}}
        spec:
          region: us-east-1
          secret_ref: aws
          endpoint: http://127.0.0.1:{lambda_port}
        ---
        apiVersion: lambdagate.io/v1
        kind: VirtualService
        metadata: {{name: api, namespace: {NS}}}
        spec:
          domains: ["*"]
          routes:
          - matcher: {{prefix: /live}}
            destination: {{upstream: lambdas, function: "hello:live"}}
          - matcher: {{prefix: /v1}}
            destination: {{upstream: lambdas, function: "hello:1"}}
          - matcher: {{prefix: /hello}}
            destination: {{upstream: lambdas, function: hello}}
          - matcher: {{prefix: /bye}}
            destination: {{upstream: lambdas, function: bye}}
        ---
        # A route to a function the account does not have yet: Rejected until discovery finds it.
        apiVersion: lambdagate.io/v1
        kind: VirtualService
        metadata: {{name: added, namespace: {NS}}}
        spec:
          domains: [{ADDED_HOST}]
          routes:
          - matcher: {{prefix: /}}
            destination: {{upstream: lambdas, function: added}}
    """)


# Looked up here, not in the forked child (where loading a library could deadlock on another thread's lock).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # The worker goes when pytest goes, even if pytest is killed before its fixtures can stop it.
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


class Worker:
    """One `lambdagate discover --kubernetes` replica, as a subprocess logging to a file."""

    def __init__(self, identity: str, kubeconfig: Path, log_dir: Path) -> None:
        self.identity = identity
        self.log_path = log_dir / f"{identity}.log"
        argv = [
            sys.executable,
            "-m",
            "controlplane.cli",
            "discover",
            "--kubernetes",
            "--namespace",
            NS,
            "--kubeconfig",
            str(kubeconfig),
            "--lease-namespace",
            SYSTEM_NS,
            "--identity",
            identity,
            "--interval",
            INTERVAL,
        ]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def writes(self) -> list[str]:
        """The worker's lines for the records it stored (the worker logs each write)."""
        return [line for line in self.log().splitlines() if f"Upstream {NS}/lambdas: discovery " in line]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean stop, as the kubelet does
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Stack:
    def __init__(
        self, cluster: KubeCluster, base: str, folder: Path, kubeconfig: Path, workers: list[Worker]
    ) -> None:
        self.cluster, self.base, self.folder, self.workers = cluster, base, folder, workers
        self.kubeconfig = kubeconfig  # the worker's: ServiceAccount lambdagate-discovery

    def upstream(self) -> dict[str, Any]:
        # As a user would look: kubectl's YAML.
        out = self.cluster.kubectl("get", "upstream", "lambdas", "-n", NS, "-o", "yaml")
        return dict(yaml.safe_load(out.stdout))

    def status(self, kind: str = "upstream", name: str = "lambdas") -> dict[str, Any]:
        out = self.cluster.kubectl("get", kind, name, "-n", NS, "-o", "json")
        return dict(json.loads(out.stdout).get("status") or {})

    def condition(self, ctype: str) -> dict[str, Any]:
        return {c["type"]: c for c in self.status().get("conditions") or []}.get(ctype) or {}

    def logs(self) -> str:
        return "\n".join(f"--- {w.identity}:\n{w.log()[-3000:]}" for w in self.workers)

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        try:
            return wait_until(check, timeout, interval=0.1, what=what)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs()}") from None


@pytest.fixture(scope="module")
def stack(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # noqa: F811
    cluster = kube_cluster
    install_deploy(cluster, NS)
    tmp = tmp_path_factory.mktemp("discovery")
    folder = tmp / "functions"
    folder.mkdir()
    (folder / "handlers.py").write_text(HANDLERS)
    write_functions(folder, FUNCTIONS)
    loop = LoopThread()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(loop.close)
        local = LocalLambda(folder, {ACCESS_KEY: SECRET_KEY})
        lambda_port = loop.run(local.start())
        cleanup.callback(lambda: loop.run(local.stop()))
        text = manifest(lambda_port)
        cluster.kubectl("apply", "-f", "-", input=text)
        cleanup.callback(
            lambda: cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=text, check=False)
        )
        port = free_port()
        settings = KubeSettings(
            namespace=NS,
            kubeconfig=str(cluster.kubeconfig_sa),
            lease_namespace=None,  # one control-plane replica here; the worker's election is under test
            watch_timeout_s=30,
        )
        # The workers first: forked before the control plane's gRPC threads exist.
        kubeconfig = cluster.service_account_kubeconfig(DISCOVERY_SA)
        workers: list[Worker] = []
        for identity in REPLICAS:
            worker = Worker(identity, kubeconfig, tmp)
            cleanup.callback(worker.stop)
            workers.append(worker)
        cp = cleanup.enter_context(control_plane(loop, None, listen_port=port, kubernetes=settings))
        envoy = cleanup.enter_context(Envoy(cp.port))
        envoy.wait_listening(port)
        s = Stack(cluster, f"http://127.0.0.1:{port}", folder, kubeconfig, workers)
        yield s
        # Both replicas stop cleanly on SIGTERM, as in a rollout (checked after the tests, whatever they did).
        codes = [w.stop() for w in workers]
        assert codes == [0] * len(workers), s.logs()


def names(functions: list[dict[str, Any]]) -> int:
    """Routable names of status.functions: fn, fn:VERSION, fn:ALIAS."""
    return sum(1 + len(f.get("versions") or []) + len(f.get("aliases") or {}) for f in functions)


def listed(stack: Stack) -> dict[str, Any]:
    return stack.wait(
        lambda: (s := stack.status()).get("discovery", {}).get("state") == "Listed" and s,
        30,
        "the discovery worker to list the account",
    )


def test_discovered_functions_fill_status_and_are_routed(stack: Stack) -> None:
    listed(stack)
    up = stack.upstream()
    assert "functions" not in up["spec"]  # the user named none; discovery never writes spec
    assert up["status"]["functions"] == [
        {"function_name": "bye"},
        {"function_name": "hello", "versions": ["1"], "aliases": {"live": "1"}},
    ]
    assert up["status"]["discovery"] == {"state": "Listed", "functionCount": 2, "names": 4}

    # The control plane reads it back: routes to fn, fn:VERSION and fn:ALIAS answer through Envoy.
    expect = {
        "/hello": {"fn": "hello", "version": "$LATEST", "code": "latest"},
        "/v1": {"fn": "hello", "version": "1", "code": "v1"},
        "/live": {"fn": "hello", "version": "1", "code": "v1"},
        "/bye": {"fn": "bye", "version": "$LATEST", "code": "latest"},
    }
    for path, answer in expect.items():
        r = stack.wait(
            lambda p=path: (x := http("GET", stack.base + p)).status == 200 and x, 15, f"{path} to route"
        )
        assert {k: r.json()[k] for k in answer} == answer, path
    # ...and reports it: the Discovered condition and the count of names under FUNCTIONS.
    stack.wait(lambda: stack.condition("Discovered").get("status") == "True", 15, "the Discovered condition")
    assert stack.condition("Discovered")["reason"] == "Listed"
    assert stack.status()["functionCount"] == 4
    assert stack.status("virtualservice", "api")["state"] == "Accepted"
    # `kubectl get -o wide` adds the discovery state to the usual columns.
    table = stack.cluster.kubectl("get", "upstreams", "-n", NS, "-o", "wide").stdout.splitlines()
    row = dict(zip(table[0].split(), table[1].split(), strict=True))
    assert (row["NAME"], row["FUNCTIONS"], row["DISCOVERY"]) == ("lambdas", "4", "Listed")


def test_a_function_added_to_the_account_becomes_routable(stack: Stack) -> None:
    listed(stack)
    before = stack.upstream()
    # Not there yet: the VirtualService that names it is Rejected, and its host is not routed.
    stack.wait(
        lambda: stack.status("virtualservice", "added").get("state") == "Rejected",
        15,
        "the VirtualService naming a missing function to be Rejected",
    )
    assert "added" in stack.status("virtualservice", "added")["reason"]
    assert http("GET", stack.base + "/", headers={"Host": ADDED_HOST}).status == 404

    write_functions(stack.folder, [*FUNCTIONS, ADDED])
    began = time.monotonic()
    r = stack.wait(
        lambda: (x := http("GET", stack.base + "/x", headers={"Host": ADDED_HOST})).status == 200 and x,
        20,
        "the added function to be routed",
    )
    took = time.monotonic() - began
    assert r.json()["fn"] == "added"
    print(f"added function routable after {took:.1f} s (listing interval {INTERVAL})")
    up = stack.upstream()
    assert {"function_name": "added"} in up["status"]["functions"]
    assert up["status"]["discovery"]["names"] == 5
    # Nobody touched the Upstream (or the VirtualService): only status moved.
    assert up["metadata"]["generation"] == before["metadata"]["generation"]
    assert up["spec"] == before["spec"]
    stack.wait(
        lambda: stack.status("virtualservice", "added").get("state") == "Accepted",
        15,
        "the VirtualService to be Accepted",
    )


def test_a_wrong_secret_fails_discovery_and_keeps_the_last_known_functions(stack: Stack) -> None:
    known = listed(stack)["functions"]
    stack.cluster.kubectl("apply", "-f", "-", input=secret("a-wrong-secret-key"))
    try:
        status = stack.wait(
            lambda: (s := stack.status()).get("discovery", {}).get("state") == "Failed" and s,
            20,
            "discovery to fail with the wrong key",
        )
        assert status["discovery"]["reason"] == "InvalidSignatureException"
        assert "signature does not match" in status["discovery"]["message"]
        assert "a-wrong-secret-key" not in json.dumps(status)
        assert status["functions"] == known
        # The control plane mirrors it in a condition, and still routes the last known functions (the key is
        # as wrong for invoking as for listing: the route is there, Lambda refuses the call).
        stack.wait(
            lambda: stack.condition("Discovered").get("status") == "False", 15, "the Discovered condition"
        )
        discovered = stack.condition("Discovered")
        assert discovered["reason"] == "InvalidSignatureException"
        assert "signature" in discovered["message"]
        assert stack.status()["functionCount"] == names(known)
        r = stack.wait(
            lambda: (x := http("GET", stack.base + "/hello")).status == 502 and x, 10, "the wrong key to show"
        )
        assert "signature" in r.json()["message"]
    finally:
        stack.cluster.kubectl("apply", "-f", "-", input=secret(SECRET_KEY))
    # The right key again: listed (at once: a new key is a new account to list), routed again.
    listed(stack)
    stack.wait(lambda: http("GET", stack.base + "/hello").status == 200, 15, "the route to work again")
    stack.wait(lambda: stack.condition("Discovered").get("status") == "True", 15, "the Discovered condition")


def test_only_the_leader_lists_and_writes(stack: Stack) -> None:
    listed(stack)
    out = stack.cluster.kubectl("get", "lease", LEASE_NAME, "-n", SYSTEM_NS, "-o", "json")
    lease = json.loads(out.stdout)["spec"]
    holder = lease["holderIdentity"]
    assert holder in REPLICAS
    leader = next(w for w in stack.workers if w.identity == holder)
    follower = next(w for w in stack.workers if w.identity != holder)
    # Both replicas run, watching the cluster; only the leader lists and stores.
    assert all(w.proc.poll() is None for w in stack.workers), stack.logs()
    assert leader.writes(), stack.logs()
    assert follower.writes() == [], stack.logs()
    assert "listing" not in follower.log(), stack.logs()
    # Nothing either replica did was refused: deploy/'s RBAC for the worker is enough.
    for w in stack.workers:
        assert "HTTP 403" not in w.log() and "Traceback" not in w.log(), stack.logs()


def test_deploy_renders_and_installs_the_worker(stack: Stack) -> None:
    # kubectl 1.20's own kustomize (v2.0.3) renders deploy/ with the worker, and `apply -k` (in the fixture)
    # made it: its Deployment runs `lambdagate discover --kubernetes` as its own ServiceAccount.
    out = stack.cluster.kubectl("kustomize", str(ROOT / "deploy"))
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    for kind, name in [("Deployment", "lambdagate-discovery"), ("ServiceAccount", DISCOVERY_SA)]:
        assert rendered[(kind, name)]["metadata"]["namespace"] == SYSTEM_NS
    out = stack.cluster.kubectl("get", "deployment", "lambdagate-discovery", "-n", SYSTEM_NS, "-o", "json")
    dep = json.loads(out.stdout)
    assert dep["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lambdagate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == DISCOVERY_SA
    assert pod["containers"][0]["args"][:2] == ["discover", "--kubernetes"]


@pytest.mark.parametrize(
    ("question", "allowed"),
    [
        (["patch", "upstreams.lambdagate.io", "--subresource=status", "-n", NS], True),
        (["watch", "virtualservices.lambdagate.io", "-n", NS], True),
        (["get", "secrets", "-n", NS], True),
        (["update", f"leases.coordination.k8s.io/{LEASE_NAME}", "-n", SYSTEM_NS], True),
        (["patch", "upstreams.lambdagate.io", "-n", NS], False),  # spec is the user's
        (["patch", "virtualservices.lambdagate.io", "--subresource=status", "-n", NS], False),
        (
            ["update", "upstreams.lambdagate.io", "--subresource=status", "-n", NS],
            False,
        ),  # merge patches only
        (["update", "leases.coordination.k8s.io/lambdagate-controlplane", "-n", SYSTEM_NS], False),
        (["get", f"leases.coordination.k8s.io/{LEASE_NAME}", "-n", NS], False),  # its namespace only
        (["create", "secrets", "-n", NS], False),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_the_worker_may_do_only_what_it_needs(stack: Stack, question: list[str], allowed: bool) -> None:
    # Asked of the API server as the worker's ServiceAccount (SelfSubjectAccessReview).
    out = stack.cluster.kubectl("auth", "can-i", *question, kubeconfig=stack.kubeconfig, check=False)
    assert out.stdout.strip() == ("yes" if allowed else "no"), out.stderr

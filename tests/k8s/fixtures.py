"""The session-scoped pytest fixture `kube_cluster`: one real kube-apiserver shared by every test that asks for it.
Use it with `from k8s.fixtures import kube_cluster` in a test module; tests should work in namespaces of their own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from k8s.cluster import KubeCluster, ensure_binaries

# Each module that imports the fixture gets its own fixture definition, hence its own session-scoped instance;
# the cluster is counted, not owned, so all of them share one apiserver and the last teardown stops it.
_shared: KubeCluster | None = None
_users = 0


@pytest.fixture(scope="session")
def kube_cluster(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    global _shared, _users
    if _shared is None:
        # The first run builds kube-apiserver for minutes; show its progress instead of a silent pause.
        capture = request.config.pluginmanager.getplugin("capturemanager")
        shown = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with shown:
            ensure_binaries()
        started = KubeCluster()
        started.start()
        _shared = started
    cluster = _shared
    _users += 1
    try:
        yield cluster
    finally:
        _users -= 1
        if _users == 0:
            cluster.stop()
            _shared = None


def install_deploy(cluster: KubeCluster, namespace: str) -> None:
    """deploy/ applied the way a user installs it (CRDs, ServiceAccounts, RBAC; the Deployments make no pods:
    no controller-manager runs), the lambdagate.io API served, and `namespace` created for a test's objects."""
    from pathlib import Path

    from harness import wait_until

    cluster.kubectl("apply", "-k", str(Path(__file__).resolve().parents[2] / "deploy"))
    for crd in ("upstreams.lambdagate.io", "virtualservices.lambdagate.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=30s")
    # Established can come a moment before the new API answers; wait for it, as a controller would.
    wait_until(
        lambda: cluster.kubectl("get", "upstreams,virtualservices", "-A", check=False).returncode == 0,
        30,
        what="the lambdagate.io API to be served",
    )
    cluster.kubectl("create", "namespace", namespace, check=False)

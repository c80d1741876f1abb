"""Smoke test of the real Kubernetes API server from tests/k8s: kubectl as admin and as lambdagate's ServiceAccount.
The first run on a machine builds kube-apiserver v1.20.2 from Debian's source (4 to 11 minutes), then it is cached."""

from __future__ import annotations

import json
import ssl
import uuid

from harness import wait_until
from k8s.cluster import SA_NAME, SA_NAMESPACE, SA_USERNAME, KubeCluster
from k8s.fixtures import kube_cluster  # noqa: F401  (pytest finds fixtures by name in this module)


def _namespace(cluster: KubeCluster) -> str:
    # The cluster is shared by the session and namespaces never finish deleting (no controller-manager): use fresh ones.
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    return name


def test_admin_reaches_the_apiserver(kube_cluster: KubeCluster) -> None:  # noqa: F811
    version = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"
    assert version["clientVersion"]["gitVersion"].startswith("v1.20.")

    # The apiserver creates its system namespaces just after it reports ready.
    wait_until(
        lambda: "namespace/default" in kube_cluster.kubectl("get", "ns", "-o", "name").stdout,
        timeout=60,
        what="namespace default",
    )


def test_service_account_is_forbidden_until_rbac_allows(kube_cluster: KubeCluster) -> None:  # noqa: F811
    # ConfigMaps cluster-wide: something no RBAC here (deploy/ included) grants the ServiceAccount.
    denied = kube_cluster.kubectl(
        "get", "configmaps", "-A", kubeconfig=kube_cluster.kubeconfig_sa, check=False
    )
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and SA_USERNAME in denied.stderr, denied.stderr

    # The token's identity is what RBAC calls a ServiceAccount subject, so a RoleBinding to it takes effect.
    ns = _namespace(kube_cluster)
    kube_cluster.kubectl("-n", ns, "create", "configmap", "visible", "--from-literal=key=value")
    kube_cluster.kubectl(
        *f"-n {ns} create role read-configmaps --verb=get,list --resource=configmaps".split()
    )
    kube_cluster.kubectl(
        *f"-n {ns} create rolebinding lambdagate-reads --role=read-configmaps".split(),
        f"--serviceaccount={SA_NAMESPACE}:{SA_NAME}",
    )
    as_sa = kube_cluster.kubeconfig_sa
    allowed = kube_cluster.kubectl(
        *f"-n {ns} get configmap visible -o jsonpath={{.data.key}}".split(), kubeconfig=as_sa
    )
    assert allowed.stdout == "value"
    still_denied = kube_cluster.kubectl("get", "configmaps", "-A", kubeconfig=as_sa, check=False)
    assert "Forbidden" in still_denied.stderr


def test_objects_and_certificate_survive_apiserver_restart(kube_cluster: KubeCluster) -> None:  # noqa: F811
    ns = _namespace(kube_cluster)
    kube_cluster.kubectl("-n", ns, "create", "configmap", "kept", "--from-literal=key=value")
    cert_before = ssl.get_server_certificate((kube_cluster.host, kube_cluster.port))
    port_before = kube_cluster.port

    kube_cluster.restart_apiserver()

    assert kube_cluster.port == port_before
    assert ssl.get_server_certificate((kube_cluster.host, kube_cluster.port)) == cert_before
    kept = kube_cluster.kubectl("-n", ns, "get", "configmap", "kept", "-o", "jsonpath={.data.key}")
    assert kept.stdout == "value"

    # A killed apiserver (no graceful shutdown) comes back just the same.
    kube_cluster.restart_apiserver(kill=True)
    kept = kube_cluster.kubectl("-n", ns, "get", "configmap", "kept", "-o", "jsonpath={.data.key}")
    assert kept.stdout == "value"

"""A real Kubernetes API server (kube-apiserver 1.20 on etcd) for tests, and the pytest fixture that starts it.
See cluster.py for KubeCluster and fixtures.py for the session-scoped `kube_cluster` fixture."""

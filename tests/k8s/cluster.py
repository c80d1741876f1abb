"""KubeCluster: etcd plus a real kube-apiserver v1.20.2 on free 127.0.0.1 ports, with TLS, token auth and RBAC.
The first use on a machine builds kube-apiserver with build-apiserver.sh (4 to 11 minutes); later uses reuse it."""

from __future__ import annotations

import atexit
import base64
import collections
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

K8S_VERSION = "v1.20.2"
BUILD_SCRIPT = Path(__file__).with_name("build-apiserver.sh")

SA_NAMESPACE = "lambdagate-system"
SA_NAME = "lambdagate"
SA_USERNAME = f"system:serviceaccount:{SA_NAMESPACE}:{SA_NAME}"
# Issuer and audience of the ServiceAccount tokens the apiserver signs (TokenRequest), as in a real cluster.
SA_ISSUER = "https://kubernetes.default.svc"
SA_GROUPS = ("system:serviceaccounts", f"system:serviceaccounts:{SA_NAMESPACE}", "system:authenticated")

# Ready in about 5 s on 2 idle cores; the margins are for loaded CI machines, not for expected behaviour.
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
START_ATTEMPTS = 3  # a free port can be taken by someone else between probing and binding it

# OpenSSL 3 adds its own extensions to -x509 requests unless the config names them; ours are what Python's
# strict X.509 checks and Go's TLS stack want (SANs, key identifiers, a CA marked critical).
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = lambdagate-test
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, IP:10.0.0.1
"""


class KubeClusterError(RuntimeError):
    """The cluster could not be built or started; the message carries the relevant log tail."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl call failed; unlike CalledProcessError's, the message shows what kubectl printed."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


@dataclass(frozen=True)
class Binaries:
    apiserver: Path
    kubectl: Path
    etcd: Path


def cache_dir() -> Path:
    return Path(os.environ.get("LAMBDAGATE_CACHE") or Path.home() / ".cache" / "lambdagate")


def cached_binaries() -> Binaries | None:
    """The binaries if everything the cluster needs is already on this machine, else None."""
    apiserver = cache_dir() / f"kube-apiserver-{K8S_VERSION}"
    kubectl = cache_dir() / f"kubectl-{K8S_VERSION}"
    etcd = shutil.which("etcd")
    if etcd and shutil.which("openssl") and os.access(apiserver, os.X_OK) and os.access(kubectl, os.X_OK):
        return Binaries(apiserver, kubectl, Path(etcd))
    return None


def ensure_binaries() -> Binaries:
    """Returns the binaries, running build-apiserver.sh first (progress on stderr) when any is missing."""
    found = cached_binaries()
    if found:
        return found
    print(
        f"k8s: kube-apiserver {K8S_VERSION} is not cached in {cache_dir()}; running {BUILD_SCRIPT}.\n"
        "k8s: the first run installs apt packages and builds it from source: 4 to 11 minutes on 2 cores.",
        file=sys.stderr,
        flush=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))
    if proc.wait() != 0:
        raise KubeClusterError(f"{BUILD_SCRIPT} failed with exit {proc.returncode}:\n" + "\n".join(tail))
    found = cached_binaries()
    if found is None:
        raise KubeClusterError(f"{BUILD_SCRIPT} succeeded but binaries are still missing in {cache_dir()}")
    return found


def _free_ports(n: int) -> list[int]:
    # All sockets stay open until every port is chosen, so the ports are distinct.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    # A session of its own: stopping kills the whole group, and Ctrl-C in a terminal reaches only pytest.
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _terminate(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(STOP_GRACE_S)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)


def _wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KubeClusterError(f"{what} exited with {proc.returncode} while starting:\n{_log_tail(log)}")
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError, ValueError):
            pass  # not listening yet, or not ready yet
        time.sleep(0.1)
    raise KubeClusterError(f"{what} not ready after {READY_TIMEOUT_S:.0f} s:\n{_log_tail(log)}")


class KubeCluster:
    """etcd and kube-apiserver on free 127.0.0.1 ports; use as a context manager or call start() and stop().

    Identities: `admin_token` is in group system:masters; `sa_token` authenticates as the ServiceAccount
    system:serviceaccount:lambdagate-system:lambdagate (groups system:serviceaccounts,
    system:serviceaccounts:lambdagate-system, system:authenticated) and has no permissions until a test binds some.
    `service_account_kubeconfig` makes a kubeconfig for any other ServiceAccount that exists.
    No controller-manager runs: deleted namespaces stay Terminating, and no ServiceAccount token Secrets are made.
    """

    def __init__(self) -> None:
        self.workdir: Path = Path()
        self.binaries: Binaries | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.server = ""
        self.etcd_endpoint = ""
        self.ca_file: Path = Path()
        self.kubeconfig_admin: Path = Path()
        self.kubeconfig_sa: Path = Path()
        self.sa_token_file: Path = Path()
        self.admin_token = ""
        self.sa_token = ""
        self.ready_seconds = 0.0  # how long the last apiserver (re)start took to answer /readyz
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._started = False

    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def kubectl_bin(self) -> Path:
        assert self.binaries is not None, "KubeCluster not started"
        return self.binaries.kubectl

    def start(self) -> None:
        if self._started:
            return
        self.binaries = ensure_binaries()
        self._started = True
        atexit.register(self.stop)
        self.workdir = Path(tempfile.mkdtemp(prefix="lambdagate-k8s-"))
        try:
            self._make_credentials()
            self._start_etcd()
            self._start_apiserver(first=True)
            self._write_kubeconfigs()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kills the apiserver and etcd and removes their files; safe to call more than once."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        try:
            _terminate(self._apiserver)
            _terminate(self._etcd)
        finally:
            self._apiserver = self._etcd = None
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_apiserver(self, *, kill: bool = False) -> None:
        """Stops kube-apiserver (SIGTERM, or SIGKILL with kill=True) and starts it on the same port, etcd and
        certificate; returns once /readyz is ok. Open watches and connections end; stored objects stay."""
        assert self._started, "KubeCluster not started"
        _terminate(self._apiserver, signal.SIGKILL if kill else signal.SIGTERM)
        self._apiserver = None
        self._start_apiserver(first=False)

    def kubectl(
        self,
        *args: str,
        kubeconfig: str | os.PathLike[str] | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl 1.20 against this cluster, as admin unless another kubeconfig (e.g. kubeconfig_sa) is given."""
        argv = [
            str(self.kubectl_bin),
            f"--kubeconfig={kubeconfig or self.kubeconfig_admin}",
            # Discovery cache per cluster instance, not in the developer's ~/.kube.
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def _openssl(self, *args: str) -> None:
        result = subprocess.run(["openssl", *args], cwd=self.workdir, capture_output=True, text=True)
        if result.returncode != 0:
            raise KubeClusterError(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    def _make_credentials(self) -> None:
        d = self.workdir
        (d / "openssl.cnf").write_text(_OPENSSL_CNF)
        serial = secrets.randbits(63)
        for command in (
            "req -x509 -config openssl.cnf -extensions ca_ext -newkey rsa:2048 -nodes -days 7"
            " -keyout ca.key -out ca.crt -subj /CN=lambdagate-test-ca",
            "req -new -config openssl.cnf -newkey rsa:2048 -nodes"
            " -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver",
            f"x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -set_serial {serial} -days 7 -sha256"
            " -extfile openssl.cnf -extensions server_ext -out apiserver.crt",
            "genrsa -out sa.key 2048",
            "rsa -in sa.key -pubout -out sa.pub",
        ):
            self._openssl(*command.split())
        self.ca_file = d / "ca.crt"
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))

        self.admin_token = secrets.token_hex(24)
        self.sa_token = secrets.token_hex(24)
        groups = ",".join(SA_GROUPS)
        (d / "tokens.csv").write_text(
            f'{self.admin_token},admin,uid-admin,"system:masters"\n'
            f'{self.sa_token},{SA_USERNAME},uid-{SA_NAMESPACE}-{SA_NAME},"{groups}"\n'
        )
        self.sa_token_file = d / "sa-token"
        self.sa_token_file.write_text(self.sa_token)
        for secret in ("ca.key", "apiserver.key", "sa.key", "tokens.csv", "sa-token"):
            (d / secret).chmod(0o600)

    def _start_etcd(self) -> None:
        assert self.binaries is not None
        log = self.workdir / "etcd.log"
        for attempt in range(START_ATTEMPTS):
            client, peer = _free_ports(2)
            self.etcd_endpoint = f"http://127.0.0.1:{client}"
            peer_url = f"http://127.0.0.1:{peer}"
            data = self.workdir / f"etcd-data-{attempt}"
            self._etcd = _spawn(
                [
                    str(self.binaries.etcd),
                    "--name=lambdagate-test",
                    f"--data-dir={data}",
                    f"--listen-client-urls={self.etcd_endpoint}",
                    f"--advertise-client-urls={self.etcd_endpoint}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=lambdagate-test={peer_url}",
                    "--initial-cluster-state=new",
                    # Tests never need durability; fsync is most of etcd's write latency on CI disks.
                    "--unsafe-no-fsync",
                    "--logger=zap",
                    "--log-level=warn",
                ],
                log,
            )
            try:
                _wait_ready(self._etcd, self._etcd_healthy, "etcd", log)
                return
            except KubeClusterError:
                _terminate(self._etcd, signal.SIGKILL)
                self._etcd = None
                if attempt == START_ATTEMPTS - 1:
                    raise

    def _etcd_healthy(self) -> bool:
        # No proxy: a CI machine's http_proxy must not see 127.0.0.1 traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.etcd_endpoint}/health", timeout=2) as resp:
            return bool(json.load(resp).get("health") == "true")

    def _apiserver_argv(self) -> list[str]:
        assert self.binaries is not None
        d = self.workdir
        issuer = SA_ISSUER
        return [
            str(self.binaries.apiserver),
            f"--etcd-servers={self.etcd_endpoint}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--insecure-port=0",
            f"--cert-dir={d / 'certs'}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-account-issuer={issuer}",
            f"--api-audiences={issuer}",
            "--service-cluster-ip-range=10.0.0.0/24",
            # The default reconciler would publish 127.0.0.1 as the `kubernetes` Endpoints, which validation
            # rejects (loopback) and logs every 10 s.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def _apiserver_ready(self) -> bool:
        req = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ssl)
        )
        with opener.open(req, timeout=5) as resp:
            return bool(resp.status == 200 and resp.read().strip() == b"ok")

    def _start_apiserver(self, *, first: bool) -> None:
        log = self.workdir / "apiserver.log"
        # A restart keeps its port (clients hold the URL); only the first start may move to another free one.
        for attempt in range(START_ATTEMPTS if first else 1):
            if first:
                self.port = _free_ports(1)[0]
                self.server = f"https://{self.host}:{self.port}"
            began = time.monotonic()
            self._apiserver = _spawn(self._apiserver_argv(), log)
            try:
                _wait_ready(self._apiserver, self._apiserver_ready, "kube-apiserver", log)
                self.ready_seconds = time.monotonic() - began
                return
            except KubeClusterError:
                _terminate(self._apiserver, signal.SIGKILL)
                self._apiserver = None
                if attempt == START_ATTEMPTS - 1 or not first:
                    raise

    def service_account_kubeconfig(self, name: str, namespace: str = SA_NAMESPACE) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount `namespace/name`, which must exist (e.g. from
        deploy/rbac.yaml). Its token comes from the TokenRequest API (what a pod's projected token is), signed
        with the apiserver's service-account key, for an hour; the user is
        system:serviceaccount:NAMESPACE:NAME in the usual ServiceAccount groups."""
        request = self.workdir / f"token-request-{namespace}-{name}.json"
        request.write_text(
            json.dumps(
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": [SA_ISSUER], "expirationSeconds": 3600},
                }
            )
        )
        out = self.kubectl(
            "create",
            "--raw",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            "-f",
            str(request),
        )
        token = str(json.loads(out.stdout)["status"]["token"])
        path = self.workdir / f"kubeconfig-sa-{namespace}-{name}"
        self._write_kubeconfig(path, name, token, namespace)
        return path

    def _write_kubeconfigs(self) -> None:
        self.kubeconfig_admin = self.workdir / "kubeconfig-admin"
        self.kubeconfig_sa = self.workdir / "kubeconfig-sa"
        self._write_kubeconfig(self.kubeconfig_admin, "admin", self.admin_token, "default")
        self._write_kubeconfig(self.kubeconfig_sa, SA_NAME, self.sa_token, SA_NAMESPACE)

    def _write_kubeconfig(self, path: Path, user: str, token: str, namespace: str) -> None:
        ca_data = base64.b64encode(self.ca_file.read_bytes()).decode()
        # JSON is YAML, so kubectl and client libraries read it without a YAML writer here.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lambdagate-test",
                    "cluster": {"server": self.server, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": user,
                    "context": {"cluster": "lambdagate-test", "user": user, "namespace": namespace},
                }
            ],
            "current-context": user,
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

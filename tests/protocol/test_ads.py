"""Our ADS server driven over real gRPC by generated stubs playing Envoy: versions, nonces, ACK and NACK."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from harness import MINIMAL_CONFIG, control_plane, wait_until

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

CONFIG = MINIMAL_CONFIG


class FakeEnvoy:
    """One ADS stream; send requests and read responses with timeouts."""

    def __init__(self, port: int, node_id: str = "fake-envoy") -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.node_id = node_id
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.responses = stub.StreamAggregatedResources(self._iter())
        self.first = True
        self.received: queue.Queue[object] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _iter(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while True:
            req = self.requests.get()
            if req is None:
                return
            yield req

    def send(
        self,
        type_url: str,
        *,
        version: str = "",
        nonce: str = "",
        names: list[str] | None = None,
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, version_info=version, response_nonce=nonce, resource_names=names or []
        )
        if self.first:
            req.node.id = self.node_id
            self.first = False
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put(req)

    def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        item = self.received.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        assert isinstance(item, discovery_pb2.DiscoveryResponse)
        return item

    def _read(self) -> None:
        # One reader for the stream's life: gRPC allows a single pending read per call.
        try:
            for resp in self.responses:
                self.received.put(resp)
        except Exception as err:  # surfaced by recv
            self.received.put(err)

    def expect_silence(self, seconds: float) -> None:
        with pytest.raises(queue.Empty):
            self.recv(timeout=seconds)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "c.yaml").write_text(CONFIG)
    return tmp_path


def test_sotw_handshake_ack_and_update(folder: Path, loop_thread) -> None:
    with control_plane(loop_thread, folder, listen_port=8080) as cp:
        envoy = FakeEnvoy(cp.port)
        try:
            envoy.send(CDS)
            cds = envoy.recv()
            assert cds.type_url == CDS and cds.version_info and cds.nonce
            names = set()
            for res in cds.resources:
                c = cluster_pb2.Cluster()
                res.Unpack(c)
                names.add(c.name)
            assert names == {"lambdagate_extproc", "lambda_http_127.0.0.1_9"}
            envoy.send(CDS, version=cds.version_info, nonce=cds.nonce)  # ACK
            envoy.send(LDS)
            lds = envoy.recv()
            assert lds.type_url == LDS and len(lds.resources) == 1
            envoy.send(LDS, version=lds.version_info, nonce=lds.nonce)
            envoy.send(RDS, names=["lambdagate_routes"])
            rds = envoy.recv()
            rc = route_pb2.RouteConfiguration()
            rds.resources[0].Unpack(rc)
            assert rc.name == "lambdagate_routes"
            assert rc.virtual_hosts[0].routes[0].match.prefix == "/a"
            envoy.send(RDS, version=rds.version_info, nonce=rds.nonce, names=["lambdagate_routes"])
            assert loop_thread.run(cp.ads.wait_acked({CDS: cds.version_info, RDS: rds.version_info}, 5))

            # A route change sends a new RDS version only: clusters and listener are unchanged.
            (folder / "c.yaml").write_text(CONFIG.replace("prefix: /a", "prefix: /b"))
            rds2 = envoy.recv(timeout=10)
            assert rds2.type_url == RDS and rds2.version_info != rds.version_info
            rds2.resources[0].Unpack(rc)
            assert rc.virtual_hosts[0].routes[0].match.prefix == "/b"
            envoy.send(RDS, version=rds2.version_info, nonce=rds2.nonce, names=["lambdagate_routes"])
            envoy.expect_silence(0.5)
        finally:
            envoy.close()


def test_nack_is_logged_and_not_resent(folder: Path, loop_thread, caplog: pytest.LogCaptureFixture) -> None:
    with control_plane(loop_thread, folder, listen_port=8080) as cp:
        envoy = FakeEnvoy(cp.port, node_id="nacker")
        try:
            envoy.send(CDS)
            cds = envoy.recv()
            envoy.send(CDS, version="", nonce=cds.nonce, error="cluster lambda_x: bad TLS config")
            # The rejected version is not sent again, however long we wait.
            envoy.expect_silence(1.0)
            assert "bad TLS config" in caplog.text
            node = cp.ads.nodes["nacker"]
            assert node.nacked[CDS] == (cds.version_info, "cluster lambda_x: bad TLS config")
            # The next snapshot that changes clusters is sent.
            (folder / "c.yaml").write_text(CONFIG.replace("127.0.0.1:9", "127.0.0.1:10"))
            cds2 = envoy.recv(timeout=10)
            assert cds2.version_info != cds.version_info
            envoy.send(CDS, version=cds2.version_info, nonce=cds2.nonce)
            assert loop_thread.run(cp.ads.wait_acked({CDS: cds2.version_info}, 5))
            assert CDS not in node.nacked
        finally:
            envoy.close()


def test_stale_nonce_is_ignored(folder: Path, loop_thread) -> None:
    with control_plane(loop_thread, folder, listen_port=8080) as cp:
        envoy = FakeEnvoy(cp.port)
        try:
            envoy.send(CDS)
            cds = envoy.recv()
            serial = cp.cache.serial
            (folder / "c.yaml").write_text(CONFIG.replace("127.0.0.1:9", "127.0.0.1:11"))
            # Not ACKed yet, so the new version waits; a reply with an old nonce must not trigger anything.
            wait_until(lambda: cp.cache.serial > serial, 10, what="the edit to be loaded")
            envoy.send(CDS, version="", nonce="not-a-nonce-we-sent", error="ignored")
            envoy.expect_silence(0.5)
            assert CDS not in cp.ads.nodes["fake-envoy"].nacked
            envoy.send(CDS, version=cds.version_info, nonce=cds.nonce)
            cds2 = envoy.recv(timeout=10)
            assert cds2.version_info != cds.version_info and cds2.nonce != cds.nonce
        finally:
            envoy.close()

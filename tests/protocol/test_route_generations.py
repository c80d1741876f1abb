"""ext_proc keeps resolving the routes an Envoy still holds: after NACKs, older route names stay served."""

from __future__ import annotations

from pathlib import Path

import grpc
from envoy.config.route.v3 import route_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from harness import control_plane, wait_until
from test_ads import CDS, CONFIG, LDS, RDS, FakeEnvoy
from test_extproc import attrs, headers

SIGNED = (
    "apiVersion: v1\nkind: Secret\nmetadata: {name: aws}\nstringData: {access_key: AKIDX, secret_key: sekrit}\n---"
    + CONFIG.replace("  region: us-east-1", "  region: us-east-1\n  secret_ref: aws")
)


def route_names(resp) -> list[str]:
    rc = route_pb2.RouteConfiguration()
    resp.resources[0].Unpack(rc)
    return [r.name for vh in rc.virtual_hosts for r in vh.routes]


def first_response(stub, route_name: str) -> str:
    req = pb.ProcessingRequest(
        request_headers=headers([(":method", "GET"), (":path", "/a/1")], eos=True),
        attributes=attrs(route_name),
    )
    out = list(stub.Process(iter([req]), timeout=5))
    return out[0].WhichOneof("response")


def test_routes_envoy_still_holds_survive_nacks_and_edits(tmp_path: Path, loop_thread) -> None:
    (tmp_path / "c.yaml").write_text(SIGNED)
    with control_plane(loop_thread, tmp_path, listen_port=8080) as cp:
        envoy = FakeEnvoy(cp.port, node_id="slow-envoy")
        channel = grpc.insecure_channel(f"127.0.0.1:{cp.port}")
        stub = pb_grpc.ExternalProcessorStub(channel)
        try:
            for t in (CDS, LDS):
                envoy.send(t)
                r = envoy.recv()
                envoy.send(t, version=r.version_info, nonce=r.nonce)
            envoy.send(RDS, names=["lambdagate_routes"])
            rds1 = envoy.recv()
            envoy.send(RDS, version=rds1.version_info, nonce=rds1.nonce, names=["lambdagate_routes"])
            (held,) = route_names(rds1)
            assert first_response(stub, held) == "request_headers"

            # Two more configurations, both rejected by this Envoy: it keeps routing with the first.
            for stage in ("s2", "s3"):
                (tmp_path / "c.yaml").write_text(
                    SIGNED.replace("spec:\n  routes:", f"spec:\n  stage: {stage}\n  routes:")
                )
                bad = envoy.recv(timeout=10)
                assert bad.type_url == RDS and route_names(bad) != [held]
                envoy.send(
                    RDS,
                    version=rds1.version_info,
                    nonce=bad.nonce,
                    names=["lambdagate_routes"],
                    error="rejected for the test",
                )
            assert first_response(stub, held) == "request_headers", "a route Envoy still uses went missing"

            # Once the Envoy is gone, nothing holds the first generation any more.
            envoy.close()
            wait_until(lambda: cp.routes.generations == 1, 10, what="old generations to be dropped")
            assert first_response(stub, held) == "immediate_response"
        finally:
            envoy.close()
            channel.close()

#!/usr/bin/env python3
"""Readiness probe for `lambdagate serve`: exit 0 only if its gRPC health service answers SERVING.

Kubernetes 1.20 has no gRPC probe, and a TCP probe passes as soon as the port is open, before the first
configuration is loaded. The image installs this as /usr/local/bin/lambdagate-grpc-health (deploy/Dockerfile);
usage: lambdagate-grpc-health [HOST:PORT] (default 127.0.0.1:18000).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = argv[1] if len(argv) > 1 else "127.0.0.1:18000"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError as err:
        print(f"{target}: {err.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

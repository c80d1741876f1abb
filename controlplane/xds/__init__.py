"""The xDS side: an immutable snapshot cache and an ADS (state of the world) gRPC server.

Knows nothing of Lambda or Kubernetes; it serves whatever protobuf resources it is given.
"""

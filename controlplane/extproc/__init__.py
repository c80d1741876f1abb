"""The ext_proc gRPC server: one Processor per Envoy stream, turning requests into signed Lambda invocations."""

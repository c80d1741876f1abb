"""A configuration real Envoy rejects: the NACK is logged with Envoy's error_detail and not resent in a loop."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
from harness import MINIMAL_CONFIG as CONFIG
from harness import Envoy, LoopThread, control_plane, wait_until

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


def test_listener_envoy_cannot_bind_is_nacked_once(
    tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    # Hold the port Envoy is told to listen on, so that Envoy itself rejects the listener.
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    caplog.set_level(logging.INFO, logger="lambdagate.xds")
    try:
        with control_plane(loop_thread, tmp_path, listen_port=port) as cp, Envoy(cp.port, node_id="nacker"):
            node = wait_until(lambda: cp.ads.nodes.get("nacker"), 20, what="Envoy to connect")
            version, detail = wait_until(lambda: node.nacked.get(LISTENER), 20, what="the listener NACK")
            assert version and ("bind" in detail.lower() or "address already in use" in detail.lower()), (
                detail
            )
            rejected = [r for r in caplog.records if "rejected Listener" in r.getMessage()]
            assert rejected and detail in rejected[0].getMessage()
            time.sleep(1.5)
            # Envoy would NACK every resend; one rejection line means the bad version was sent once.
            assert len([r for r in caplog.records if "rejected Listener" in r.getMessage()]) == 1
    finally:
        taken.close()

"""Shared fixtures: an asyncio loop thread for our servers, and an environment that never reaches real AWS."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# No test may fall back to instance metadata (a network call off this machine) or a developer's real keys.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    os.environ.pop(var, None)
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:  # noqa: F821
    from harness import LoopThread

    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()

"""Unit-test fixtures: one event-loop thread per module, so a module's servers outlive single tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import LoopThread


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    try:
        yield runner
    finally:
        runner.close()

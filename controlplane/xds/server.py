"""The ADS server (state of the world): versions, nonces, ACK and NACK, over grpc.aio.

A NACK is logged with Envoy's error_detail and the rejected version is never resent; the next snapshot is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.xds.cache import TYPE_ORDER, Snapshot, SnapshotCache

log = logging.getLogger("lambdagate.xds")


@dataclass
class TypeState:
    """One resource type on one stream."""

    names: frozenset[str] = frozenset()
    # Envoy has a request outstanding for this type (it waits for our response).
    open: bool = False
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nonce: str = ""
    acked_version: str | None = None
    nacked_version: str | None = None


@dataclass
class NodeStatus:
    """What one Envoy last did with each type, for logs, health and tests."""

    node_id: str
    acked: dict[str, str] = field(default_factory=dict)
    nacked: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (version, error_detail)
    connected: bool = True


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, on_state: Callable[[], None] | None = None) -> None:
        self.cache = cache
        # Called whenever what some Envoy holds may have changed (sent, ACKed, NACKed, disconnected).
        self.on_state = on_state
        self._streams: dict[int, dict[str, TypeState]] = {}
        self.nodes: dict[str, NodeStatus] = {}
        self._nonce = 0
        self._acked = asyncio.Event()

    def _next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    async def wait_acked(self, versions: dict[str, str], timeout: float) -> bool:
        """Wait until some connected Envoy has ACKed every given type at the given version."""

        def some_node() -> bool:
            return any(
                node.connected and all(node.acked.get(t) == v for t, v in versions.items())
                for node in self.nodes.values()
            )

        return await self._wait_for(some_node, timeout)

    async def wait_all_acked(self, type_url: str, timeout: float, version: str | None = None) -> bool:
        """Wait until every connected Envoy has ACKed `type_url` at `version` (None: whatever version the current
        snapshot has, followed as it changes). True at once when no Envoy is connected; False on timeout."""

        def every_stream() -> bool:
            want = version
            if want is None:
                snapshot = self.cache.snapshot
                want = snapshot.versions.get(type_url) if snapshot is not None else None
            # Per stream, not per node: a stream that has not ACKed the type yet (just connected) is waited for.
            return want is None or all(
                (st := states.get(type_url)) is not None and st.acked_version == want
                for states in self._streams.values()
            )

        return await self._wait_for(every_stream, timeout)

    async def _wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Re-check `done` after every ACK (and every disconnect) until it holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self._acked
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def versions_in_use(self, type_url: str) -> set[str]:
        """Versions of a type that some connected Envoy holds or is being sent: still routable there."""
        out: set[str] = set()
        for states in self._streams.values():
            st = states.get(type_url)
            if st is not None:
                out.update(v for v in (st.acked_version, st.sent_version) if v)
        return out

    def _state_changed(self) -> None:
        if self.on_state is not None:
            self.on_state()

    def _note_ack(self) -> None:
        event, self._acked = self._acked, asyncio.Event()
        event.set()

    async def StreamAggregatedResources(  # noqa: N802 (gRPC's name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        states: dict[str, TypeState] = {}
        requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        node: NodeStatus | None = None

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await requests.put(req)
            finally:
                await requests.put(None)

        reader = asyncio.create_task(read())
        serial = -1
        self._streams[id(states)] = states
        try:
            while True:
                snapshot = self.cache.snapshot
                serial = self.cache.serial
                if snapshot is not None:
                    responses = self._responses(snapshot, states)
                    for response in responses:
                        yield response
                        if log.isEnabledFor(logging.DEBUG):
                            log.debug(
                                "sent %s version %s to %s: %d resource(s), %d bytes",
                                response.type_url.rsplit(".", 1)[-1],
                                response.version_info,
                                node.node_id if node is not None else context.peer(),
                                len(response.resources),
                                response.ByteSize(),
                            )
                    if responses:
                        # After sending, not before: the callback (ext_proc forgetting route generations no Envoy
                        # holds) never delays a push, and the version just sent is the current one, always kept.
                        self._state_changed()
                get = asyncio.create_task(requests.get())
                newer = asyncio.create_task(self.cache.wait_newer(serial))
                waiters: set[asyncio.Task[Any]] = {get, newer}
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    continue
                newer.cancel()
                req = get.result()
                if req is None:
                    return
                if node is None:
                    node_id = req.node.id or context.peer()
                    node = self.nodes.setdefault(node_id, NodeStatus(node_id))
                    node.connected = True
                    log.info("Envoy %s connected", node_id)
                self._handle_request(req, states, node)
                self._state_changed()
        finally:
            reader.cancel()
            self._streams.pop(id(states), None)
            self._state_changed()
            self._note_ack()  # a waiter for "every connected Envoy ACKed" may be waiting on this one alone
            if node is not None:
                node.connected = False
                log.info("Envoy %s disconnected", node.node_id)

    def _handle_request(
        self, req: discovery_pb2.DiscoveryRequest, states: dict[str, TypeState], node: NodeStatus
    ) -> None:
        type_url = req.type_url
        if type_url not in TYPE_ORDER:
            log.warning("Envoy %s asked for unsupported type %s", node.node_id, type_url)
            return
        st = states.setdefault(type_url, TypeState())
        if req.response_nonce and req.response_nonce != st.nonce:
            # A reply to a response that a newer one has replaced: go-control-plane ignores it, and so do we.
            return
        short = type_url.rsplit(".", 1)[-1]
        if req.response_nonce:
            if req.HasField("error_detail"):
                st.nacked_version = st.sent_version
                node.nacked[type_url] = (st.sent_version or "", req.error_detail.message)
                log.error(
                    "Envoy %s rejected %s version %s: %s (keeping its version %s; waiting for the next config)",
                    node.node_id,
                    short,
                    st.sent_version,
                    req.error_detail.message,
                    req.version_info or "none",
                )
            else:
                st.acked_version = req.version_info
                node.acked[type_url] = req.version_info
                node.nacked.pop(type_url, None)
                current = self.cache.snapshot
                if current is not None and current.versions.get(type_url) == req.version_info:
                    log.debug(
                        "Envoy %s ACKed %s version %s, %.1f ms after that snapshot was set",
                        node.node_id,
                        short,
                        req.version_info,
                        1000 * (time.monotonic() - self.cache.set_at),
                    )
                else:
                    log.debug("Envoy %s ACKed %s version %s", node.node_id, short, req.version_info)
                self._note_ack()
        st.names = frozenset(req.resource_names)
        st.open = True

    def _responses(
        self, snapshot: Snapshot, states: dict[str, TypeState]
    ) -> list[discovery_pb2.DiscoveryResponse]:
        out = []
        for type_url in TYPE_ORDER:
            st = states.get(type_url)
            if st is None or not st.open:
                continue
            version = snapshot.versions.get(type_url)
            if version is None:
                continue
            if version == st.nacked_version and st.names == st.sent_names:
                continue  # Envoy rejected exactly this; resending it would loop (go-control-plane #582)
            if version == st.sent_version and st.names == st.sent_names:
                continue
            serialized = snapshot.serialized[type_url]
            wildcard = not st.names or "*" in st.names
            names = sorted(serialized) if wildcard else sorted(n for n in st.names if n in serialized)
            resp = discovery_pb2.DiscoveryResponse(
                version_info=version, type_url=type_url, nonce=self._next_nonce()
            )
            for name in names:
                resp.resources.add(type_url=type_url, value=serialized[name])  # one copy of each resource
            st.sent_version = version
            st.sent_names = st.names
            st.nonce = resp.nonce
            st.open = False
            out.append(resp)
        return out

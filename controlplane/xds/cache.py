"""An immutable xDS snapshot with a version per resource type, and a cache that streams wait on.

Knows nothing of Lambda: resources are protobuf messages keyed by type URL and name.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# ADS sends in this order so that nothing Envoy receives refers to something it has not got yet.
TYPE_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)


class InconsistentSnapshot(ValueError):
    pass


@dataclass(frozen=True)
class Snapshot:
    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str]
    # Serialized form, computed once per snapshot rather than once per stream.
    serialized: Mapping[str, Mapping[str, bytes]] = field(repr=False)
    # sha256 of each serialized resource, which the type's version hashes.
    digests: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        resources: Mapping[str, Mapping[str, Message]],
        *,
        serialized: Mapping[str, Mapping[str, bytes]] | None = None,
        previous: Snapshot | None = None,
    ) -> Snapshot:
        """A snapshot of these resources. `serialized` gives deterministic encodings already known (they must be
        exactly what SerializeToString(deterministic=True) gives). A resource that is the very same object as in
        `previous` reuses its encoding and digest: resources are treated as immutable once in a snapshot."""
        versions: dict[str, str] = {}
        encoded: dict[str, dict[str, bytes]] = {}
        digests: dict[str, dict[str, bytes]] = {}
        for type_url, by_name in resources.items():
            known = serialized.get(type_url, {}) if serialized is not None else {}
            before = previous.resources.get(type_url, {}) if previous is not None else {}
            digest = hashlib.sha256()
            ser: dict[str, bytes] = {}
            dig: dict[str, bytes] = {}
            for name in sorted(by_name):
                msg = by_name[name]
                data = known.get(name)
                one = None
                if data is None and previous is not None and before.get(name) is msg:
                    data = previous.serialized[type_url][name]
                    one = previous.digests.get(type_url, {}).get(name)
                if data is None:
                    data = msg.SerializeToString(deterministic=True)
                if one is None:
                    one = hashlib.sha256(data).digest()
                ser[name] = data
                dig[name] = one
                digest.update(name.encode())
                digest.update(b"\0")
                digest.update(one)
            encoded[type_url] = ser
            digests[type_url] = dig
            # A content hash: the same resources always get the same version, so an unchanged type is never resent.
            versions[type_url] = digest.hexdigest()[:16]
        snap = cls(
            MappingProxyType({k: MappingProxyType(dict(v)) for k, v in resources.items()}),
            MappingProxyType(versions),
            MappingProxyType({k: MappingProxyType(v) for k, v in encoded.items()}),
            MappingProxyType({k: MappingProxyType(v) for k, v in digests.items()}),
        )
        snap.check_consistency()
        return snap

    def check_consistency(self) -> None:
        """Every route configuration a listener names must be in the snapshot (go-control-plane's rule)."""
        from envoy.extensions.filters.network.http_connection_manager.v3 import (
            http_connection_manager_pb2 as hcm_pb2,
        )

        routes = self.resources.get(ROUTE_TYPE, {})
        for lname, listener in self.resources.get(LISTENER_TYPE, {}).items():
            for chain in getattr(listener, "filter_chains", []):
                for flt in chain.filters:
                    hcm = hcm_pb2.HttpConnectionManager()
                    if flt.typed_config.Is(hcm.DESCRIPTOR) and flt.typed_config.Unpack(hcm):
                        if hcm.HasField("rds") and hcm.rds.route_config_name not in routes:
                            raise InconsistentSnapshot(
                                f"listener {lname} names route configuration {hcm.rds.route_config_name!r}, "
                                "which the snapshot lacks"
                            )


class SnapshotCache:
    """Holds the current snapshot; streams wait for a newer one."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._serial = 0
        self._changed = asyncio.Event()
        # When the current snapshot was set (time.monotonic()), for the ACK's log line.
        self.set_at = 0.0

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def serial(self) -> int:
        return self._serial

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._serial += 1
        self.set_at = time.monotonic()
        # Wake every waiting stream at once; each then compares versions itself.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_newer(self, serial: int) -> int:
        while self._serial <= serial:
            await self._changed.wait()
        return self._serial

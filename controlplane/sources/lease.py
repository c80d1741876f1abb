"""Leader election on a coordination.k8s.io Lease, so that one control-plane replica writes status.

Every replica serves xDS and ext_proc; only writes to the API server need a single writer.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from controlplane.sources.kubernetes import KubeClient, KubeError

log = logging.getLogger("lambdagate.sources.lease")


def _now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str | None) -> float:
    if not ts:
        return 0.0
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(ts, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return 0.0


class LeaseElector:
    """Holds (or waits for) the Lease `name` in `namespace`; `is_leader()` is cheap and thread-safe."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: int = 15,
        renew_every_s: float = 5.0,
    ) -> None:
        self.client = client
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.name = name
        self.identity = identity
        self.duration = lease_duration_s
        self.renew_every = renew_every_s
        self._held_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def is_leader(self) -> bool:
        # Stop acting as leader a little before the lease could be taken over by someone else.
        return time.monotonic() < self._held_until

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as err:  # noqa: BLE001 - the API server may be away; try again next round
                log.warning("lease %s: %s", self.name, err)
            self._stop.wait(self.renew_every)

    def try_acquire_or_renew(self) -> bool:
        start = time.monotonic()
        try:
            lease = self.client.get_json(f"{self.path}/{self.name}")
        except KubeError as err:
            if err.status != 404:
                raise
            lease = None
        now = _now_micro()
        if lease is None:
            body: dict[str, Any] = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": self.duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            return self._claim("POST", self.path, body, start, took_over=True)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        expired = (
            _parse(spec.get("renewTime")) + int(spec.get("leaseDurationSeconds") or self.duration)
            < time.time()
        )
        if holder != self.identity and holder and not expired:
            self._held_until = 0.0
            return False
        took_over = holder != self.identity
        spec = dict(spec)
        spec.update(
            {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration, "renewTime": now}
        )
        if took_over:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        # resourceVersion in the body makes the update conditional: two replicas cannot both win.
        body = {**lease, "spec": spec}
        return self._claim("PUT", f"{self.path}/{self.name}", body, start, took_over=took_over)

    def _claim(self, method: str, path: str, body: dict[str, Any], start: float, *, took_over: bool) -> bool:
        try:
            self.client.send_json(method, path, body)
        except KubeError as err:
            if err.status in (409, 422):
                self._held_until = 0.0
                return False
            raise
        if took_over:
            log.info("lease %s: %s is now the leader (status writer)", self.name, self.identity)
        # Count from before the request: the lease's clock started no later than that.
        self._held_until = start + self.duration * 0.8
        return True

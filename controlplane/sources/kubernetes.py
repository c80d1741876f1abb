"""The Kubernetes source: Upstreams, VirtualServices and the Secrets they reference, listed and watched live.

Watches resume from their resourceVersion, list again on 410 Gone, and reconnect with backoff; the status of
every Upstream and VirtualService says whether it was accepted, and why not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from controlplane.model import ConfigError, ObjectKey
from controlplane.model.discovered import LISTED, DiscoveryRecord, parse_record, with_discovered
from controlplane.model.parse import Resource, object_key, parse_document
from controlplane.model.resources import KIND_SECRET, KIND_UPSTREAM, KIND_VIRTUAL_SERVICE, Endpoint, Upstream
from controlplane.sources.base import LastGood, LoadResult

log = logging.getLogger("lambdagate.sources.kubernetes")

GROUP = "lambdagate.io"
VERSION = "v1"
PLURALS = {KIND_UPSTREAM: "upstreams", KIND_VIRTUAL_SERVICE: "virtualservices"}
# How often the loop wakes without events: to write status as a new leader, or to stop waiting for a watch.
SYNC_RECHECK_S = 1.0
# A watch that has not listed within this long (forbidden, CRD missing) is not waited for any more.
SYNC_WAIT_S = 10.0


@dataclass(frozen=True)
class KubeSettings:
    """How to reach and read the cluster. Built by the CLI; nothing here reads the environment itself."""

    namespace: str | None = None  # None: all namespaces
    kubeconfig: str | None = None  # None: in-cluster config if in a pod, else $KUBECONFIG / ~/.kube/config
    context: str | None = None
    # Server-side watch timeout: a watch is renewed this often even when nothing happens.
    watch_timeout_s: int = 300
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    debounce_s: float = 0.05
    write_status: bool = True
    # Leader election for status writes among replicas: the Lease's namespace (None: every replica writes).
    lease_namespace: str | None = None
    lease_name: str = "lambdagate-controlplane"
    identity: str = "lambdagate"


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeClient:
    """The few API calls lambdagate makes, on the official client's config loading and HTTP stack (sync)."""

    def __init__(self, settings: KubeSettings) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        in_cluster = settings.kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=settings.kubeconfig, context=settings.context, client_configuration=configuration
            )
        self.api = client.ApiClient(configuration=configuration)
        self.server = configuration.host

    def _call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = 30,
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
                _request_timeout=timeout,
            )
        except ApiException as err:
            raise KubeError(err.status or 0, _api_message(err.body) or str(err.reason)) from None

    def get_json(self, path: str, query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        resp = self._call("GET", path, query)
        try:
            return dict(json.loads(resp.data))
        finally:
            resp.release_conn()

    def watch(
        self, path: str, query: list[tuple[str, Any]], timeout_s: int, on_response: Callable[[Any], None]
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events until the server ends the watch. `on_response` gets the response, to close it."""
        resp = self._call(
            "GET",
            path,
            [*query, ("watch", "true"), ("timeoutSeconds", timeout_s)],
            timeout=(10, timeout_s + 30),
        )
        on_response(resp)
        try:
            buffer = b""
            for chunk in resp.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            # The caller may stop early (a 410 in the stream): never pool a half-read connection.
            resp.close()
            resp.release_conn()

    def send_json(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._call(method, path, body=body)
        try:
            return dict(json.loads(resp.data))
        finally:
            resp.release_conn()

    def patch_status(self, path: str, status: dict[str, Any]) -> None:
        resp = self._call(
            "PATCH", path + "/status", body={"status": status}, content_type="application/merge-patch+json"
        )
        try:
            # Read the answer: a half-read connection back in the pool breaks the next (non-retried) PATCH.
            resp.drain_conn()
        finally:
            resp.release_conn()


def _api_message(body: Any) -> str:
    try:
        return str(json.loads(body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return str(body or "")[:300]


class Watcher:
    """List, then watch from that resourceVersion; on 410 list again; on errors back off with jitter.

    Runs in its own thread (the official client is synchronous); hands every change to `emit`.
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        emit: Callable[[str, list[dict[str, Any]] | dict[str, Any]], None],
        settings: KubeSettings,
        *,
        field_selector: str | None = None,
        name: str = "",
    ) -> None:
        self.client = client
        self.path = path
        self.emit = emit
        self.settings = settings
        self.field_selector = field_selector
        self.name = name or path
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch {self.name}", daemon=True)
        self.relists = 0
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def young(self) -> bool:
        return time.monotonic() - self._started < SYNC_WAIT_S

    def stop(self) -> None:
        self._stop.set()
        resp = self._response
        if resp is not None:
            # Unblocks the read the thread is waiting in.
            try:
                resp.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the thread also checks _stop
                pass

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _query(self) -> list[tuple[str, Any]]:
        return [("fieldSelector", self.field_selector)] if self.field_selector else []

    def _run(self) -> None:
        backoff = self.settings.backoff_initial_s
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = self.client.get_json(self.path, self._query())
                    rv = str(listing.get("metadata", {}).get("resourceVersion", "")) or None
                    self.relists += 1
                    self.emit("LIST", list(listing.get("items") or []))
                    backoff = self.settings.backoff_initial_s
                query = [*self._query(), ("resourceVersion", rv), ("allowWatchBookmarks", "true")]
                for event in self.client.watch(
                    self.path, query, self.settings.watch_timeout_s, lambda r: setattr(self, "_response", r)
                ):
                    if self._stop.is_set():
                        return
                    kind = event.get("type")
                    obj = event.get("object") or {}
                    if kind == "ERROR":
                        code = obj.get("code")
                        if code == 410:
                            log.info(
                                "watch %s: resourceVersion %s expired (410); listing again", self.name, rv
                            )
                            rv = None
                            break
                        raise KubeError(int(code or 0), str(obj.get("message", "watch error")))
                    new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_rv:
                        rv = str(new_rv)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.emit(kind, obj)
                    backoff = self.settings.backoff_initial_s
                # A watch that ended normally (timeout) resumes from rv without listing.
            except KubeError as err:
                if self._stop.is_set():
                    return
                if err.status == 410:
                    rv = None
                    continue
                log.warning("watch %s failed (%s); retrying in %.1f s", self.name, err, backoff)
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.settings.backoff_max_s)
            except Exception as err:  # noqa: BLE001 - connection resets, timeouts, decode errors: all retried
                if self._stop.is_set():
                    return
                log.warning(
                    "watch %s interrupted (%s); retrying in %.1f s", self.name, type(err).__name__, backoff
                )
                self._stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.settings.backoff_max_s)
            finally:
                self._response = None


@dataclass
class _Store:
    """Raw objects as the API server last showed them, keyed like the model."""

    objects: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)

    def replace(
        self, kind: str, namespace: str | None, items: list[dict[str, Any]], *, name: str | None = None
    ) -> None:
        for key in [
            k
            for k in self.objects
            if k.kind == kind
            and (namespace is None or k.namespace == namespace)
            and (name is None or k.name == name)
        ]:
            del self.objects[key]
        for item in items:
            self.put(kind, item)

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.objects[ObjectKey(kind, meta.get("namespace") or "default", meta.get("name", ""))] = obj

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.objects.pop(ObjectKey(kind, meta.get("namespace") or "default", meta.get("name", "")), None)


class KubernetesSource:
    """Feeds the control plane from the API server, and writes each object's status back."""

    def __init__(
        self,
        settings: KubeSettings,
        *,
        local_endpoint: Endpoint | None = None,
        client: KubeClient | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.local_endpoint = local_endpoint
        self._good: LastGood[None] = LastGood(local_endpoint=local_endpoint)
        self._store = _Store()
        self._watchers: dict[str, Watcher] = {}
        self._secret_watchers: dict[ObjectKey, Watcher] = {}
        self._written: dict[ObjectKey, dict[str, Any]] = {}
        self._record_problems: dict[ObjectKey, str] = {}
        self._records: dict[ObjectKey, tuple[Any, DiscoveryRecord | None]] = {}
        self._listed: set[str] = set()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Only the leader writes status when several replicas run; None means "always write".
        self.is_leader: Callable[[], bool] | None = None

    # --- paths ------------------------------------------------------------------------------------------

    def _collection(self, kind: str) -> str:
        plural = PLURALS[kind]
        if self.settings.namespace:
            return f"/apis/{GROUP}/{VERSION}/namespaces/{self.settings.namespace}/{plural}"
        return f"/apis/{GROUP}/{VERSION}/{plural}"

    @staticmethod
    def _object_path(key: ObjectKey) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{key.namespace}/{PLURALS[key.kind]}/{key.name}"

    # --- events from watcher threads ---------------------------------------------------------------------

    def _emitter(
        self, watch_name: str, kind: str, namespace: str | None, name: str | None = None
    ) -> Callable[..., None]:
        def emit(event: str, payload: Any) -> None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(
                self._apply_event, watch_name, kind, namespace, name, event, payload
            )

        return emit

    def _apply_event(
        self, watch_name: str, kind: str, namespace: str | None, name: str | None, event: str, payload: Any
    ) -> None:
        if event == "LIST":
            # Recorded here, on the loop, so "listed" never runs ahead of the store it filled.
            self._listed.add(watch_name)
            self._store.replace(kind, namespace, payload, name=name)
        elif event == "DELETED":
            self._store.delete(kind, payload)
        else:
            self._store.put(kind, payload)
        assert self._changed is not None
        self._changed.set()

    # --- the loop -----------------------------------------------------------------------------------------

    async def watch(self, on_change: Callable[[LoadResult], Awaitable[None]], *, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        if self.client is None:
            self.client = await asyncio.to_thread(KubeClient, self.settings)
        log.info(
            "watching Upstreams and VirtualServices in %s on %s",
            self.settings.namespace or "all namespaces",
            self.client.server,
        )
        for kind in PLURALS:
            w = Watcher(
                self.client,
                self._collection(kind),
                self._emitter(PLURALS[kind], kind, self.settings.namespace),
                self.settings,
                name=PLURALS[kind],
            )
            self._watchers[kind] = w
            w.start()
        elector = None
        if self.settings.write_status and self.settings.lease_namespace:
            from controlplane.sources.lease import LeaseElector

            elector = LeaseElector(
                self.client, self.settings.lease_namespace, self.settings.lease_name, self.settings.identity
            )
            self.is_leader = elector.is_leader
            elector.start()
        stopper = asyncio.create_task(stop.wait())
        applied: LoadResult | None = None
        dirty = False
        try:
            while not stop.is_set():
                changed = asyncio.create_task(self._changed.wait())
                done, _ = await asyncio.wait(
                    {changed, stopper}, timeout=SYNC_RECHECK_S, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in done:
                    changed.cancel()
                    break
                if changed in done:
                    # Let a burst of events (a relist, a kubectl apply of many objects) settle into one reload.
                    await asyncio.sleep(self.settings.debounce_s)
                    self._changed.clear()
                    dirty = True
                else:
                    changed.cancel()
                # Until every watch has listed once, a config would be partial: a Secret "missing" only because
                # its watch has not answered yet would reject its Upstream, in Envoy and in status.
                if dirty and not self._syncing():
                    try:
                        result = self.load()
                        if not self._follow_secrets(result):
                            await on_change(result)
                            applied, dirty = result, False
                    except Exception:  # a bug here must not end the watching; the next change retries
                        log.exception("applying the cluster's configuration failed")
                # Also on the timer: a replica that just became leader writes what the old one left undone.
                if (
                    applied is not None
                    and self.settings.write_status
                    and (self.is_leader is None or self.is_leader())
                ):
                    await asyncio.to_thread(self.write_status, applied)
        finally:
            stopper.cancel()
            if elector is not None:
                await asyncio.to_thread(elector.stop)
            watchers = [*self._watchers.values(), *self._secret_watchers.values()]
            for w in watchers:
                w.stop()
            for w in watchers:
                await asyncio.to_thread(w.join, 5)

    def _follow_secrets(self, result: LoadResult) -> bool:
        """Watch exactly the Secrets that Upstreams name, each by name: never every Secret in the cluster.

        Returns whether it started a watch, whose first listing the caller should wait for.
        """
        assert self.client is not None
        wanted = set()
        for key, raw in self._store.objects.items():
            if key.kind == KIND_UPSTREAM:
                ref = (raw.get("spec") or {}).get("secret_ref")
                if isinstance(ref, str) and ref:
                    wanted.add(ObjectKey(KIND_SECRET, key.namespace, ref))
        for key in list(self._secret_watchers):
            if key not in wanted:
                stopped = self._secret_watchers.pop(key)
                stopped.stop()
                self._listed.discard(stopped.name)
                self._store.replace(KIND_SECRET, key.namespace, [], name=key.name)
                assert self._changed is not None
                self._changed.set()
        new = wanted - set(self._secret_watchers)
        for key in new:
            w = Watcher(
                self.client,
                f"/api/v1/namespaces/{key.namespace}/secrets",
                self._emitter(f"secret {key.namespace}/{key.name}", KIND_SECRET, key.namespace, key.name),
                self.settings,
                field_selector=f"metadata.name={key.name}",
                name=f"secret {key.namespace}/{key.name}",
            )
            self._secret_watchers[key] = w
            w.start()
        return bool(new)

    def _syncing(self) -> bool:
        """Some watch has not listed yet, and is still young enough to wait for (a forbidden one is not)."""
        watchers = (*self._watchers.values(), *self._secret_watchers.values())
        return any(w.name not in self._listed and w.young() for w in watchers)

    def load(self) -> LoadResult:
        objects: dict[ObjectKey, tuple[Resource, None]] = {}
        failed: dict[ObjectKey, ConfigError] = {}
        parse_errors: list[ConfigError] = []
        for key, raw in sorted(self._store.objects.items()):
            doc = _as_document(key.kind, raw)
            try:
                obj = parse_document(doc, default_namespace=key.namespace)
            except ConfigError as err:
                error = err.with_context(obj=str(object_key(doc) or key))
                parse_errors.append(error)
                failed[key] = error
                previous = self._good.get(key)
                if previous is not None:
                    objects[key] = previous
                continue
            if isinstance(obj, Upstream):
                obj = with_discovered(obj, self._record(key, raw))
            if obj is not None:
                objects[obj.key] = (obj, None)
        for key, (obj, _) in list(objects.items()):
            if isinstance(obj, Upstream) and key in failed:
                # A last good version serves with what discovery found since, not what it found then.
                objects[key] = (with_discovered(obj, self._record(key, self._store.objects[key])), None)
        result = self._good.settle(objects, parse_errors, failed=failed)
        self._good.report(result, log, "the cluster")
        return result

    def _record(self, key: ObjectKey, raw: dict[str, Any]) -> DiscoveryRecord | None:
        """What the discovery worker wrote into this Upstream's status; bad entries are skipped and logged."""
        version = (raw.get("metadata") or {}).get("resourceVersion")
        cached = self._records.get(key)
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        record, problems = parse_record(raw.get("status"))
        self._records[key] = (version, record)
        text = "; ".join(problems)
        if text and self._record_problems.get(key) != text:
            log.error("%s: discovered functions in status: %s (those entries are ignored)", key, text)
        self._record_problems[key] = text
        return record

    def discovery_records(self) -> dict[ObjectKey, DiscoveryRecord | None]:
        """What the discovery worker last wrote into each Upstream's status, as the watch last saw it."""
        return {
            key: self._record(key, raw)
            for key, raw in list(self._store.objects.items())
            if key.kind == KIND_UPSTREAM
        }

    def patch_status(self, key: ObjectKey, status: dict[str, Any]) -> None:
        """Merge-patch some status fields of one object (the discovery worker's; blocking)."""
        assert self.client is not None
        try:
            self.client.patch_status(self._object_path(key), status)
        except KubeError as err:
            if err.status != 404:  # deleted meanwhile: nothing to write on
                raise

    # --- status -------------------------------------------------------------------------------------------

    def status_for(self, key: ObjectKey, raw: dict[str, Any], result: LoadResult) -> dict[str, Any]:
        generation = int((raw.get("metadata") or {}).get("generation") or 0)
        error = result.rejected.get(key)
        served_keys = {u.key for u in result.config.upstreams} | {
            v.key for v in result.config.virtual_services
        }
        served = key in served_keys
        if error is not None:
            state, reason, cond_reason = "Rejected", _message(error), "Invalid"
        else:
            state, reason, cond_reason = "Accepted", "", "Valid"
            if key.kind == KIND_UPSTREAM:
                up = next((u for u in result.config.upstreams if u.key == key), None)
                if isinstance(up, Upstream) and not up.function_names():
                    state, reason, cond_reason = (
                        "Warning",
                        "spec.functions: no functions (none in spec, none discovered), so no route can use it",
                        "NoFunctions",
                    )
        previous = {c.get("type"): c for c in ((raw.get("status") or {}).get("conditions") or [])}
        conditions = [
            _condition(
                previous, "Accepted", state != "Rejected", cond_reason, reason or "accepted", generation
            ),
            _condition(
                previous,
                "Serving",
                served,
                "LastGoodVersion"
                if served and error is not None
                else ("Serving" if served else "NotServing"),
                ("serving its last good version" if error is not None else "routes are served")
                if served
                else "not served",
                generation,
            ),
        ]
        status: dict[str, Any] = {
            "state": state,
            # null, never "": in a merge patch null removes the field, and some apiservers refuse empty strings.
            "reason": reason or None,
            "observedGeneration": generation,
            "conditions": conditions,
        }
        if key.kind == KIND_UPSTREAM:
            up = next((u for u in result.config.upstreams if u.key == key), None)
            if isinstance(up, Upstream):
                count = len(up.function_names())
            else:
                spec_functions = (raw.get("spec") or {}).get("functions")
                count = len(spec_functions) if isinstance(spec_functions, list) else 0
            # What `kubectl get upstreams` shows under FUNCTIONS (a CRD column cannot count a list itself).
            status["functionCount"] = count
            record = self._record(key, raw)
            if record is not None:
                # The worker writes status.discovery; the condition mirrors it where tools look for conditions.
                ok = record.state == LISTED
                conditions.append(
                    _condition(
                        previous,
                        "Discovered",
                        ok,
                        "Listed" if ok else (record.reason or record.state),
                        record.message or ("functions listed" if ok else record.state),
                        generation,
                    )
                )
        return status

    def write_status(self, result: LoadResult) -> None:
        """Patch status where it changed. Runs in a thread: the client is synchronous."""
        assert self.client is not None
        for key, raw in list(self._store.objects.items()):
            if key.kind not in PLURALS:
                continue
            status = self.status_for(key, raw, result)
            current = raw.get("status") or {}
            if _comparable(current) == _comparable(status) or self._written.get(key) == status:
                continue
            try:
                self.client.patch_status(self._object_path(key), status)
                self._written[key] = status
            except KubeError as err:
                if err.status != 404:  # deleted meanwhile: nothing to report on
                    log.warning("%s: writing status failed: %s", key, err)
            except Exception as err:  # noqa: BLE001 - a dropped connection: the timer tries again
                log.warning("%s: writing status failed: %s: %s", key, type(err).__name__, err)


def _as_document(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Objects from a list carry no kind/apiVersion; a Secret's values are base64 in `data`."""
    doc = dict(raw)
    doc["kind"] = kind
    doc.setdefault("apiVersion", "v1" if kind == KIND_SECRET else f"{GROUP}/{VERSION}")
    if kind == KIND_SECRET:
        # Only the keys we read; the rest of a Secret (annotations, other data) never enters the model.
        doc = {
            "apiVersion": "v1",
            "kind": KIND_SECRET,
            "metadata": raw.get("metadata") or {},
            "data": {
                k: v
                for k, v in (raw.get("data") or {}).items()
                if k in ("access_key", "secret_key", "session_token")
            },
        }
    else:
        doc.pop("status", None)
    return doc


def _message(err: ConfigError) -> str:
    # The object is the one the status is on; name the field and what is wrong.
    return f"field {err.field}: {err.message}" if err.field else err.message


def _condition(
    previous: dict[str, dict[str, Any]], ctype: str, ok: bool, reason: str, message: str, generation: int
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(ctype) or {}
    # lastTransitionTime moves only when the condition's status flips, as Kubernetes conventions say.
    when = before.get("lastTransitionTime") if before.get("status") == status else None
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": when or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _comparable(status: dict[str, Any]) -> Any:
    conditions = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    return (
        status.get("state"),
        status.get("reason") or None,
        status.get("observedGeneration"),
        status.get("functionCount"),
        conditions,
    )

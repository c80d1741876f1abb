"""The discovery worker: lists each account's functions on an interval and stores them in Upstream status.

It reads the same resources as the control plane (a folder or the cluster), and for every Upstream that has
not opted out (`spec.discovery.enabled: false`) lists its account with `Lister`. Upstreams with the same
account (endpoint, region, credentials and role) share one listing, each then taking the functions its own
`spec.discovery` filters let through.

What it found goes into a `DiscoveryRecord` per Upstream, stored by a `Store`: the status subresource on
Kubernetes, a state file beside the config for the file source. Never into spec: the user's own
`spec.functions` entries are merged in by the control plane, and win on a name conflict. A record is written
only when it changed, in sorted order. A failed listing keeps the last known functions and says why; a
listing too large to store keeps them too, and says how to narrow it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controlplane.model import ObjectKey
from controlplane.model.discovered import (
    FAILED,
    LISTED,
    TOO_LARGE,
    DiscoveryRecord,
    ListedFunction,
)
from controlplane.model.resources import LOCAL_ENDPOINT, Config, DiscoverySettings, Endpoint, Upstream
from controlplane.sources.files import DiscoveryState, state_path
from discovery.lister import Account, DiscoveredFunction, DiscoveryError, Filters, Lister, ListingStats

log = logging.getLogger("lambdagate.discovery")

DEFAULT_INTERVAL_S = 300.0
# Listing the local endpoint costs nothing, and `lambdagate up` users expect a new function to show at once.
LOCAL_INTERVAL_S = 1.0
# After a failure, try again sooner than the interval (a network blip should not leave status stale for long).
RETRY_AFTER_FAILURE_S = 60.0
# After a failed write (API server away), list and write again this soon.
RETRY_STORE_S = 5.0
# etcd refuses objects over 1.5 MiB; leave room for the spec and the rest of status.
MAX_RECORD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """One Upstream to discover: where to list, and which of the listing it keeps."""

    key: ObjectKey
    account: Account
    settings: DiscoverySettings


def targets(config: Config) -> list[Target]:
    out = []
    secrets = {(s.namespace, s.name): s for s in config.secrets}
    for up in config.upstreams:
        if not up.discovery.enabled:
            continue
        if up.endpoint == LOCAL_ENDPOINT and config.local_endpoint is None:
            continue  # `endpoint: local` with no local endpoint running: nothing to list
        endpoint = _endpoint_url(up, config.local_endpoint)
        secret = secrets.get((up.namespace, up.secret_ref)) if up.secret_ref else None
        creds = secret.credentials if secret is not None else None
        account = Account(up.region, endpoint or None, creds, up.role_arn)
        out.append(Target(up.key, account, up.discovery))
    return out


def _endpoint_url(up: Upstream, local: Endpoint | None) -> str | None:
    if up.endpoint == LOCAL_ENDPOINT:
        return str(local) if local is not None else None
    if isinstance(up.endpoint, Endpoint):
        return str(up.endpoint)
    return None


def keep(entry: DiscoveredFunction, settings: DiscoverySettings) -> bool:
    if settings.name_prefix and not entry.function_name.startswith(settings.name_prefix):
        return False
    tags = dict(entry.tags)
    return all(tags.get(key) == value for key, value in settings.tags)


def record_of(entries: Iterable[DiscoveredFunction]) -> DiscoveryRecord:
    versions: dict[str, list[str]] = {}
    aliases: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        versions.setdefault(entry.function_name, [])
        aliases.setdefault(entry.function_name, [])
        if entry.qualifier is None:
            continue
        if entry.qualifier == entry.version:
            versions[entry.function_name].append(entry.version)
        else:
            aliases[entry.function_name].append((entry.qualifier, entry.version))
    functions = tuple(
        ListedFunction(name, tuple(versions[name]), tuple(sorted(aliases[name]))) for name in sorted(versions)
    )
    return DiscoveryRecord(LISTED, functions=functions)


def record_bytes(record: DiscoveryRecord) -> int:
    return len(json.dumps(record.to_status(), separators=(",", ":")))


class Store(Protocol):
    """Where records live. `current` may read; `write` is given only what changed (None: remove)."""

    def current(self) -> Mapping[ObjectKey, DiscoveryRecord | None]: ...

    def write(
        self, changes: Mapping[ObjectKey, DiscoveryRecord | None], existing: set[ObjectKey]
    ) -> None: ...


class FileStore:
    """The state file `<config>/.lambdagate/discovery.json`, replaced atomically, sorted, only on change."""

    HEADER = "Written by `lambdagate discover`: the functions found for each Upstream. Do not edit."

    def __init__(self, config_dir: Path) -> None:
        self.path = state_path(config_dir)
        self._state = DiscoveryState(self.path)

    def current(self) -> Mapping[ObjectKey, DiscoveryRecord | None]:
        return {ObjectKey("Upstream", ns, name): rec for (ns, name), rec in self._state.read().items()}

    def write(self, changes: Mapping[ObjectKey, DiscoveryRecord | None], existing: set[ObjectKey]) -> None:
        records = {key: record for key, record in self.current().items() if record is not None}
        for key, record in changes.items():
            if record is None:
                records.pop(key, None)
            else:
                records[key] = record
        # Upstreams that no longer exist leave the file with the next write.
        doc = {
            "comment": self.HEADER,
            "upstreams": {f"{key.namespace}/{key.name}": records[key].to_status() for key in sorted(records)},
        }
        text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)


class StatusStore:
    """The status subresource of each Upstream, through the Kubernetes source's client and cache."""

    def __init__(self, source: Any) -> None:
        self.source = source  # controlplane.sources.kubernetes.KubernetesSource

    def current(self) -> Mapping[ObjectKey, DiscoveryRecord | None]:
        return self.source.discovery_records()

    def write(self, changes: Mapping[ObjectKey, DiscoveryRecord | None], existing: set[ObjectKey]) -> None:
        for key, record in sorted(changes.items()):
            status: dict[str, Any] = (
                record.to_status() if record is not None else {"discovery": None, "functions": None}
            )
            self.source.patch_status(key, status)


@dataclass
class AccountState:
    targets: list[Target]
    due: float = 0.0
    failures: int = 0
    last_stats: ListingStats | None = None


class DiscoveryWorker:
    def __init__(
        self,
        store: Store,
        lister: Lister | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        local_interval_s: float = LOCAL_INTERVAL_S,
        max_record_bytes: int = MAX_RECORD_BYTES,
        is_leader: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.lister = lister or Lister()
        self.interval_s = interval_s
        self.local_interval_s = local_interval_s
        self.max_record_bytes = max_record_bytes
        self.is_leader = is_leader
        self.clock = clock
        self.config: Config | None = None
        self.accounts: dict[Account, AccountState] = {}
        self.local_accounts: set[Account] = set()
        self.rounds = 0  # listings rounds run, for tests and logs
        self.failed: dict[ObjectKey, DiscoveryError] = {}
        self._wake = asyncio.Event()
        self._removed: set[ObjectKey] = set()

    # --- configuration --------------------------------------------------------------------------------

    def update(self, config: Config) -> None:
        """A new configuration: list new accounts (or changed filters) now, forget the ones gone."""
        self.config = config
        wanted: dict[Account, list[Target]] = {}
        for target in targets(config):
            wanted.setdefault(target.account, []).append(target)
        local = str(config.local_endpoint) if config.local_endpoint else None
        self.local_accounts = {a for a in wanted if local is not None and a.endpoint_url == local}
        for account in list(self.accounts):
            if account not in wanted:
                del self.accounts[account]
        changed = False
        for account, group in wanted.items():
            state = self.accounts.get(account)
            if state is None:
                self.accounts[account] = AccountState(group)
                changed = True
            elif state.targets != group:
                state.targets, state.due = group, 0.0
                changed = True
        # Upstreams that opted out lose what discovery wrote for them.
        enabled = {t.key for group in wanted.values() for t in group}
        self._removed = {u.key for u in config.upstreams if u.key not in enabled}
        if changed or self._removed:
            self._wake.set()

    # --- the loop -------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """List each account when due, until `stop` is set. Only the leader lists (and writes)."""
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if self.is_leader is None or self.is_leader():
                    try:
                        await self.run_once(only_due=True)
                    except Exception:  # noqa: BLE001 - a bug here must not end discovery
                        log.exception("discovery round failed")
                    delay = self._next_due() - self.clock()
                else:
                    # Followers wait; a new leader lists everything (due is 0 until it has listed).
                    delay = 1.0
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waker, stopper}, timeout=max(0.05, delay), return_when="FIRST_COMPLETED")
                waker.cancel()
        finally:
            stopper.cancel()

    def _next_due(self) -> float:
        return min((s.due for s in self.accounts.values()), default=self.clock() + 3600.0)

    async def run_once(self, *, only_due: bool = False) -> bool:
        """List every account (or the due ones), store what changed; whether every listing succeeded."""
        if self.config is None:
            return True
        now = self.clock()
        due = [(a, s) for a, s in self.accounts.items() if not only_due or s.due <= now]
        # Read once a round: the listings keep last known functions from it, and changes are judged by it.
        current = self.store.current()
        results = await asyncio.gather(*(self._list(account, state, current) for account, state in due))
        self.rounds += 1
        existing = {u.key for u in self.config.upstreams}
        changes: dict[ObjectKey, DiscoveryRecord | None] = {}
        for key, record in (item for result in results for item in result.items()):
            if record != current.get(key):
                changes[key] = record
        # Upstreams that opted out, or are gone (the state file outlives them), lose their records.
        for key in (self._removed | (set(current) - existing)) - set(changes):
            if current.get(key) is not None:
                changes[key] = None
        if changes:
            try:
                await asyncio.to_thread(self.store.write, changes, existing)
            except Exception as err:  # noqa: BLE001 - an unwritable file or API server: try again soon
                log.error("storing discovered functions failed: %s: %s", type(err).__name__, err)
                retry = self.clock() + RETRY_STORE_S
                for _, state in due:
                    state.due = min(state.due, retry)
                return False
            for key, change in sorted(changes.items()):
                if change is None:
                    log.info("%s: discovered functions removed (discovery off, or the Upstream is gone)", key)
                else:
                    log.info(
                        "%s: discovery %s: %d function(s), %d routable name(s)%s",
                        key,
                        change.state,
                        len(change.functions),
                        change.name_count(),
                        f" ({change.message})" if change.message else "",
                    )
        return all(s.failures == 0 for _, s in due)

    async def _list(
        self, account: Account, state: AccountState, current: Mapping[ObjectKey, DiscoveryRecord | None]
    ) -> dict[ObjectKey, DiscoveryRecord]:
        group = state.targets
        prefixes = [t.settings.name_prefix or "" for t in group]
        common = os.path.commonprefix(prefixes) if all(prefixes) else ""
        filters = Filters(name_prefix=common or None, tags=group[0].settings.tags if len(group) == 1 else ())
        with_tags = any(t.settings.tags for t in group)
        interval = self.local_interval_s if account in self.local_accounts else self.interval_s
        try:
            entries, stats = await self.lister.list_account(account, filters, with_tags=with_tags)
        except DiscoveryError as err:
            state.failures += 1
            state.due = self.clock() + min(interval, RETRY_AFTER_FAILURE_S)
            if state.failures == 1:
                log.error("listing %s failed: %s", account.describe(), err.message)
            out = {}
            for t in group:
                before = current.get(t.key)
                kept = before.functions if before is not None else ()
                self.failed[t.key] = err
                out[t.key] = DiscoveryRecord(FAILED, err.code, err.message, kept)
            return out
        if state.failures:
            log.info("listing %s works again", account.describe())
        state.failures, state.last_stats = 0, stats
        state.due = self.clock() + interval
        log.debug(
            "listed %s: %d functions, %d versions, %d aliases in %.2f s, %d calls (%d throttled)",
            account.describe(),
            stats.functions,
            stats.versions,
            stats.aliases,
            stats.seconds,
            stats.api_calls,
            stats.throttled,
        )
        out = {}
        for t in group:
            self.failed.pop(t.key, None)
            record = record_of(e for e in entries if keep(e, t.settings))
            size = record_bytes(record)
            if size > self.max_record_bytes:
                before = current.get(t.key)
                record = DiscoveryRecord(
                    TOO_LARGE,
                    "TooLarge",
                    f"{len(record.functions)} functions ({record.name_count()} names) would take {size} bytes "
                    f"of status, over the limit of {self.max_record_bytes}; narrow the listing with "
                    "spec.discovery.name_prefix or spec.discovery.tags. The last stored functions are kept.",
                    before.functions if before is not None else (),
                )
            out[t.key] = record
        return out

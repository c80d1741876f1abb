"""Keep-warm: invoke the functions that ask for it on a schedule, so their execution environments stay warm.

An Upstream function with `keep_warm: {interval: 5m, concurrency: 2}` gets, every interval (the first time
within a second of appearing, each time jittered by up to 10%), `concurrency` synchronous Invoke calls at the
same time — overlapping calls keep that many execution environments — with a warm-up event a handler can
recognise and return early on:

    if event.get("source") == "lambdagate.keep-warm": return

The calls are signed as the function's routes are (the Secret, the Upstream's role_arn, or the default
credential chain) and made from a thread pool, so the event loop never waits on them. Failures are counted
and logged with the function, the HTTP status and Lambda's error type (never a message, which may quote what
was signed); they never stop the control plane. With several replicas on Kubernetes, only the leader warms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from botocore.credentials import ReadOnlyCredentials

from controlplane.aws.invoke import invoke
from controlplane.aws.roles import RoleCache, RoleCredentials
from controlplane.aws.signing import CredentialsUnavailable, DefaultChain, frozen
from controlplane.model.resources import LOCAL_ENDPOINT, AwsCredentials, Config, Endpoint
from controlplane.model.routes import invoke_path
from controlplane.translate.envoy import upstream_endpoint

log = logging.getLogger("lambdagate.warm")

WARMUP_SOURCE = "lambdagate.keep-warm"
WARMUP_DETAIL_TYPE = "Scheduled Event"
# The first round comes within this of a function appearing (never later than its interval), spread at random
# so that many functions added at once do not fire together; later rounds are jittered by JITTER either way.
FIRST_ROUND_MAX_S = 1.0
JITTER = 0.1
# Threads for the calls. At least the model's limit on concurrency (50), so one round's calls all overlap.
MAX_THREADS = 64
INVOKE_TIMEOUT_S = 30.0
# A warm-up answer is only looked at for its error type; more than this is not read.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class WarmTarget:
    """One function to keep warm, with everything needed to sign and send its calls."""

    upstream: str  # namespace/name
    function: str  # the logical name
    function_name: str
    qualifier: str | None
    interval_s: float
    concurrency: int
    region: str
    endpoint: Endpoint
    credentials: AwsCredentials | None = field(repr=False)  # None: the default chain (or it assumes role_arn)
    role_arn: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.upstream, self.function)

    def __str__(self) -> str:
        return f"{self.upstream} function {self.function}"


def warm_targets(config: Config) -> dict[tuple[str, str], WarmTarget]:
    """Every Upstream function with `keep_warm` (the spec's own entries: discovered functions have none)."""
    out: dict[tuple[str, str], WarmTarget] = {}
    for up in config.upstreams:
        for fn in up.functions:
            if fn.keep_warm is None:
                continue
            secret = config.secret(up.namespace, up.secret_ref) if up.secret_ref else None
            if up.endpoint == LOCAL_ENDPOINT and config.local_endpoint is None:
                continue  # resolve() rejects such an Upstream; nothing to call
            target = WarmTarget(
                upstream=f"{up.namespace}/{up.name}",
                function=fn.name,
                function_name=fn.function_name,
                qualifier=fn.qualifier,
                interval_s=fn.keep_warm.interval_s,
                concurrency=fn.keep_warm.concurrency,
                region=up.region,
                endpoint=upstream_endpoint(up, config),
                credentials=secret.credentials if secret is not None else None,
                role_arn=up.role_arn,
            )
            out[target.key] = target
    return out


def needs_default_chain(config: Config) -> bool:
    """Whether some function to keep warm signs with the default chain (directly or to assume its role)."""
    return any(t.credentials is None for t in warm_targets(config).values())


def warmup_event(target: WarmTarget, index: int) -> dict[str, Any]:
    return {
        "source": WARMUP_SOURCE,
        "detail-type": WARMUP_DETAIL_TYPE,
        "lambdagate": {
            "warmup": True,
            "function": target.function,
            "upstream": target.upstream,
            "index": index,
            "concurrency": target.concurrency,
        },
    }


@dataclass(frozen=True)
class Outcome:
    """One warm-up call: Lambda's HTTP status (0: no answer) and error type, if any."""

    status: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error is None

    def __str__(self) -> str:
        if self.status == 0:
            return f"no answer ({self.error})"
        return f"{self.status} {self.error}" if self.error else str(self.status)


def invoke_once(
    target: WarmTarget,
    creds: ReadOnlyCredentials,
    index: int,
    ssl_context: Callable[[], ssl.SSLContext],
    timeout_s: float = INVOKE_TIMEOUT_S,
) -> Outcome:
    """Blocking: one signed synchronous Invoke with the warm-up event."""
    body = json.dumps(warmup_event(target, index), separators=(",", ":")).encode()
    path = invoke_path(target.function_name, target.qualifier)
    ep = target.endpoint
    answer = invoke(creds, target.region, ep.scheme, ep.authority, path, body, ssl_context, timeout_s)
    if answer.status == 0:
        return Outcome(0, answer.error)
    if answer.function_error:
        return Outcome(answer.status, _error_type(answer.body) or answer.function_error)
    if answer.status >= 300:
        # Lambda names its API errors in x-amzn-ErrorType ("ResourceNotFoundException:http://...").
        kind = answer.headers.get("x-amzn-errortype", "").split(":", 1)[0]
        return Outcome(answer.status, kind or _error_type(answer.body) or "error")
    return Outcome(answer.status)


def _error_type(answer: bytes) -> str | None:
    try:
        doc = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    kind = doc.get("errorType") or doc.get("__type") or doc.get("Type")
    return str(kind)[:100] if kind else None


@dataclass
class WarmStats:
    rounds: int = 0
    warmed: int = 0  # calls answered without an error
    failed: int = 0  # calls that failed, or could not be signed
    # Per "namespace/upstream function": calls answered without an error.
    by_function: Counter[str] = field(default_factory=Counter)


class KeepWarm:
    """Schedules the warm-up rounds of the current Config's keep_warm functions; `update` with each new one."""

    def __init__(
        self,
        chain: DefaultChain,
        roles: RoleCache,
        *,
        ca_bundle: str | None = None,
        active: Callable[[], bool] | None = None,
        max_threads: int = MAX_THREADS,
        timeout_s: float = INVOKE_TIMEOUT_S,
    ) -> None:
        self.chain = chain
        self.roles = roles
        self.stats = WarmStats()
        self._ca_bundle = ca_bundle
        self._active = active
        self._max_threads = max_threads
        self._timeout_s = timeout_s
        self._targets: dict[tuple[str, str], WarmTarget] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        # The roles warm-ups sign as, held here too: the RoleCache forgets roles no route uses.
        self._roles: dict[tuple[AwsCredentials | None, str, str], RoleCredentials] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._ssl: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()
        self._closed = False

    @property
    def targets(self) -> dict[tuple[str, str], WarmTarget]:
        return dict(self._targets)

    def update(self, config: Config) -> None:
        """Follow a new Config (on the event loop): start new functions, stop removed ones, restart a function
        whose interval changed; any other change (keys, endpoint, concurrency) applies from its next round."""
        if self._closed:
            return
        targets = warm_targets(config)
        for key, task in list(self._tasks.items()):
            new, old = targets.get(key), self._targets.get(key)
            if new is None or old is None or new.interval_s != old.interval_s:
                task.cancel()
                del self._tasks[key]
        added = sorted(set(targets) - set(self._targets))
        removed = sorted(set(self._targets) - set(targets))
        self._targets = targets
        for key in targets:
            if key not in self._tasks:
                self._tasks[key] = asyncio.create_task(self._run(key), name=f"keep-warm {key[0]} {key[1]}")
        in_use = {(t.credentials, t.role_arn, t.region) for t in targets.values() if t.role_arn}
        self._roles = {k: r for k, r in self._roles.items() if k in in_use}
        if added or removed:
            log.info(
                "keep-warm: %d function(s)%s%s",
                len(targets),
                "; added " + ", ".join(f"{u} {f}" for u, f in added) if added else "",
                "; removed " + ", ".join(f"{u} {f}" for u, f in removed) if removed else "",
            )

    async def stop(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            # Calls in flight finish in their threads (bounded by the timeout); nothing waits for them.
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, key: tuple[str, str]) -> None:
        first = True
        while True:
            target = self._targets.get(key)
            if target is None:
                return
            if first:
                delay = random.uniform(0, min(FIRST_ROUND_MAX_S, target.interval_s))
                first = False
            else:
                delay = target.interval_s * random.uniform(1 - JITTER, 1 + JITTER)
            await asyncio.sleep(delay)
            target = self._targets.get(key)
            if target is None:
                return
            if self._active is not None and not self._active():
                continue  # another replica leads and warms
            try:
                await self.warm_once(target)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a warm-up must never take the control plane down
                self.stats.failed += target.concurrency
                log.error("keep-warm %s: the round failed: %s", target, type(err).__name__)

    async def warm_once(self, target: WarmTarget) -> list[Outcome]:
        """One round: `concurrency` calls at once. Returns their outcomes (none if nothing could be signed)."""
        self.stats.rounds += 1
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            creds = await self._credentials(target, loop, pool)
        except CredentialsUnavailable as err:
            self.stats.failed += target.concurrency
            log.warning("keep-warm %s: no AWS credentials: %s", target, err)
            return []
        calls = [
            loop.run_in_executor(pool, invoke_once, target, creds, i, self._ssl_context, self._timeout_s)
            for i in range(target.concurrency)
        ]
        outcomes = await asyncio.gather(*calls)
        ok = sum(1 for o in outcomes if o.ok)
        self.stats.warmed += ok
        self.stats.failed += len(outcomes) - ok
        self.stats.by_function[f"{target.upstream} {target.function}"] += ok
        if ok == len(outcomes):
            log.debug("keep-warm %s: %d call(s) answered", target, ok)
        else:
            failures = Counter(str(o) for o in outcomes if not o.ok)
            log.warning(
                "keep-warm %s (%s): %d of %d call(s) failed: %s",
                target,
                target.function_name,
                len(outcomes) - ok,
                len(outcomes),
                ", ".join(f"{n} x {what}" for what, n in sorted(failures.items())),
            )
        return list(outcomes)

    async def _credentials(
        self, target: WarmTarget, loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor
    ) -> ReadOnlyCredentials:
        if target.role_arn:
            key = (target.credentials, target.role_arn, target.region)
            role = self._roles.get(key)
            if role is None:
                role = self._roles[key] = self.roles.get(*key)
            # Cheap unless the role is new, near expiry or its source changed: then STS, in a thread.
            await loop.run_in_executor(pool, role.refresh)
            return role.current()
        if target.credentials is not None:
            return frozen(target.credentials)
        return self.chain.current()

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_threads, thread_name_prefix="keep-warm")
        return self._pool

    def _ssl_context(self) -> ssl.SSLContext:
        # Built on first use, in a worker thread (reading the CA file is blocking).
        with self._ssl_lock:
            if self._ssl is None:
                cafile = self._ca_bundle
                if not cafile or not os.path.exists(cafile):
                    import certifi

                    cafile = certifi.where()
                self._ssl = ssl.create_default_context(cafile=cafile)
            return self._ssl

"""The listing core of function discovery: one account's Lambda functions, versions and aliases.

`Lister.list_account` pages ListFunctions with FunctionVersion=ALL, which answers $LATEST and every published
version in the same pages, and for each function (after the filters) pages ListAliases (and ListTags when
tags are filtered on). It turns the answers into logical names: `fn` for $LATEST, `fn:3` for each published
version, `fn:live` for each alias. A catalogue of 10,000 functions with 3 versions each takes 800 pages plus
10,000 ListAliases calls, about half of what ListVersionsByFunction per function would cost.

botocore clients are synchronous, so every call runs in one of the Lister's own `max_concurrency` threads
(asyncio's default executor has only CPUs + 4), never on the loop. Calls are bounded twice: at most `max_concurrency` in flight per Lister, and a token bucket
shared by every call of the Lister keeps the rate at `rate_per_s`, so a catalogue of 10,000 functions is
walked steadily rather than in a burst. Throttling answers are retried with exponential backoff and full
jitter. Credential and access errors become a `DiscoveryError` whose message names the problem and never
carries a secret; the caller keeps its last known functions and reports the message in status.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from controlplane.aws.roles import assumed_role_session
from controlplane.model.parse import LOGICAL_NAME_RE
from controlplane.model.resources import AwsCredentials, mask

LATEST = "$LATEST"
PAGE_SIZE = 50

THROTTLE_CODES = frozenset(
    {
        "TooManyRequestsException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "SlowDown",
    }
)
# Errors of the server side that are worth another try, like throttling (not counted as throttled).
TRANSIENT_CODES = frozenset({"ServiceException", "InternalFailure", "ServiceUnavailable", "InternalError"})
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})

# What each credential or access error means, in words the status of an Upstream can carry.
_CREDENTIAL_HINTS: Mapping[str, str] = {
    "InvalidSignatureException": "the request signature does not match: the secret access key is wrong "
    "(or the clock is skewed)",
    "SignatureDoesNotMatch": "the request signature does not match: the secret access key is wrong "
    "(or the clock is skewed)",
    "UnrecognizedClientException": "the access key id is not recognised (invalid security token)",
    "InvalidClientTokenId": "the access key id is not recognised (invalid security token)",
    "ExpiredTokenException": "the session token has expired",
    "ExpiredToken": "the session token has expired",
    "MissingAuthenticationTokenException": "the request was not signed",
    "AccessDeniedException": "access denied: the credentials lack a lambda:List* permission",
    "AccessDenied": "access denied: the credentials lack a lambda:List* permission",
}
_MAX_MESSAGE = 300

ClientFactory = Callable[["Account"], Any]


class DiscoveryError(Exception):
    """Listing an account failed. `code` is the AWS error code (or our own); `message` is safe to show."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Account:
    """Where and as whom to list. Upstreams with the same account share one listing."""

    region: str
    endpoint_url: str | None = None
    credentials: AwsCredentials | None = None  # None: botocore's default credential chain
    role_arn: str | None = None  # assumed with STS AssumeRole, with the credentials above

    def describe(self) -> str:
        where = self.endpoint_url or f"lambda.{self.region}"
        who = f"access key {mask(self.credentials.access_key)}" if self.credentials else "default credentials"
        if self.role_arn:
            who += f" as {self.role_arn}"
        return f"{where} ({self.region}, {who})"


@dataclass(frozen=True)
class DiscoveredFunction:
    name: str  # the logical name: fn, fn:3 or fn:alias
    function_name: str
    qualifier: str | None  # None for $LATEST; the version number or the alias name
    version: str  # the resolved version: "$LATEST" or a number
    arn: str
    description: str
    # The function's tags, sorted. Only filled when tag filters are set (ListTags is one call per function).
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Filters:
    name_prefix: str | None = None
    tags: tuple[tuple[str, str], ...] = ()  # every tag given must be on the function with that value


@dataclass
class ListingStats:
    api_calls: int = 0  # HTTP calls made, retries included
    throttled: int = 0  # answers that were throttling errors
    seconds: float = 0.0
    functions: int = 0  # functions listed after the filters (and not deleted mid-listing)
    versions: int = 0  # published versions
    aliases: int = 0
    max_in_flight: int = 0  # most calls of this listing in flight at once
    skipped_invalid: int = 0  # entries whose logical name is not valid for routes
    skipped_deleted: int = 0  # functions that went away while they were being listed
    retried: int = 0  # retries of transient server errors (not throttling)
    in_flight: int = field(default=0, repr=False)


class TokenBucket:
    """A token bucket without locks on the loop: each caller reserves a slot and sleeps until it comes.

    Reservations may run the bucket into debt, so waiters are served in order at exactly `rate` per
    second once the burst is spent. A threading lock keeps the arithmetic safe if a Lister is shared by
    loops of several threads.
    """

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self._rate = rate_per_s
        self._burst = max(1.0, burst)
        self._tokens = self._burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take one token; the seconds to wait before using it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    async def take(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


def default_client_factory(max_pool_connections: int) -> ClientFactory:
    """botocore Lambda clients without botocore's own retries (we retry, and count every call)."""

    def make(account: Account) -> Any:
        import botocore.session
        from botocore.config import Config

        config = Config(
            retries={"total_max_attempts": 1},
            max_pool_connections=max_pool_connections,
            connect_timeout=5,
            read_timeout=30,
        )
        options: dict[str, Any] = {"region_name": account.region, "config": config}
        if account.endpoint_url:
            options["endpoint_url"] = account.endpoint_url
        if account.role_arn:
            session = assumed_role_session(account.credentials, account.role_arn, account.region)
            return session.create_client("lambda", **options)
        if account.credentials is not None:
            options["aws_access_key_id"] = account.credentials.access_key
            options["aws_secret_access_key"] = account.credentials.secret_key
            if account.credentials.session_token:
                options["aws_session_token"] = account.credentials.session_token
        return botocore.session.Session().create_client("lambda", **options)

    return make


class Lister:
    def __init__(
        self,
        *,
        max_concurrency: int = 8,
        rate_per_s: float = 10.0,
        max_retries: int = 8,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 20.0,
        client_factory: ClientFactory | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        # A burst of one second's worth at most, and never more than the calls that may be in flight.
        self._bucket = TokenBucket(rate_per_s, min(rate_per_s, float(max_concurrency)))
        self._client_factory = client_factory or default_client_factory(max(10, max_concurrency))
        self._clients: dict[Account, Any] = {}
        self._clients_lock = threading.Lock()
        # Threads for the calls: as many as may be in flight, so the bound is max_concurrency, not the CPUs.
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="lambdagate-list")
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._random = random.Random()

    # --- the listing -----------------------------------------------------------------------------------

    async def list_account(
        self, account: Account, filters: Filters = Filters(), *, with_tags: bool = False
    ) -> tuple[list[DiscoveredFunction], ListingStats]:
        """Every function of the account (after the filters), each version and alias as its own entry.

        ListFunctions with FunctionVersion=ALL answers $LATEST and every published version in the same pages
        (50 entries each), so versions cost no call of their own; aliases take one ListAliases per function
        (more for over 50 aliases), run by `max_concurrency` workers while the pages still come in.
        `with_tags` fetches every function's tags (ListTags) even without a tag filter, for callers that
        filter one listing several ways.
        """
        started = time.monotonic()
        stats = ListingStats()
        client = await asyncio.to_thread(self._client, account)
        call = _Caller(self, client, account, stats)
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.max_concurrency * 4)
        configs: dict[str, dict[str, Any]] = {}  # function name -> its $LATEST entry (or the first seen)
        versions: dict[str, list[dict[str, Any]]] = {}  # function name -> its published versions' entries
        extras: dict[str, tuple[tuple[tuple[str, str], ...], list[dict[str, Any]]]] = {}  # tags, aliases

        async def produce() -> None:
            marker: str | None = None
            while True:
                params: dict[str, Any] = {"MaxItems": PAGE_SIZE, "FunctionVersion": "ALL"}
                if marker:
                    params["Marker"] = marker
                page = await call("list_functions", params)
                for config in page.get("Functions", ()):
                    name = config.get("FunctionName", "")
                    if not name or (filters.name_prefix and not name.startswith(filters.name_prefix)):
                        continue
                    version = config.get("Version") or LATEST
                    first = name not in configs
                    if version == LATEST or first:
                        configs[name] = config
                    if version != LATEST:
                        versions.setdefault(name, []).append(config)
                    if first:
                        await queue.put(name)
                marker = page.get("NextMarker")
                if not marker:
                    break
            # Only on success: after a failure the workers are cancelled, and nobody would take these.
            for _ in range(workers):
                await queue.put(None)

        async def work() -> None:
            while True:
                name = await queue.get()
                if name is None:
                    return
                try:
                    extra = await self._extras(call, name, configs[name], filters, with_tags)
                except _Gone:
                    stats.skipped_deleted += 1
                    continue
                if extra is not None:
                    extras[name] = extra

        workers = self.max_concurrency
        tasks = [asyncio.ensure_future(produce())] + [asyncio.ensure_future(work()) for _ in range(workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        result: dict[str, DiscoveredFunction] = {}
        for name in sorted(extras):
            tags, aliases = extras[name]
            for entry in self._entries(name, configs[name], versions.get(name, []), aliases, tags, stats):
                if LOGICAL_NAME_RE.fullmatch(entry.name) is None or entry.name in result:
                    stats.skipped_invalid += 1
                    continue
                result[entry.name] = entry
        stats.seconds = time.monotonic() - started
        return [result[name] for name in sorted(result)], stats

    async def _extras(
        self, call: _Caller, name: str, config: dict[str, Any], filters: Filters, with_tags: bool
    ) -> tuple[tuple[tuple[str, str], ...], list[dict[str, Any]]] | None:
        """A function's tags (when asked for) and aliases; None if it fails the tag filter."""
        tags: tuple[tuple[str, str], ...] = ()
        if filters.tags or with_tags:
            arn = _unqualified(config.get("FunctionArn", "")) or name
            answer = await call("list_tags", {"Resource": arn}, missing_is_gone=True)
            tag_map: dict[str, str] = answer.get("Tags") or {}
            if any(tag_map.get(key) != value for key, value in filters.tags):
                return None
            tags = tuple(sorted(tag_map.items()))
        return tags, await self._pages(call, "list_aliases", name, "Aliases")

    @staticmethod
    def _entries(
        name: str,
        config: dict[str, Any],
        versions: list[dict[str, Any]],
        aliases: list[dict[str, Any]],
        tags: tuple[tuple[str, str], ...],
        stats: ListingStats,
    ) -> list[DiscoveredFunction]:
        stats.functions += 1
        arn = _unqualified(config.get("FunctionArn", ""))
        latest_description = (
            config.get("Description", "") if (config.get("Version") or LATEST) == LATEST else ""
        )
        entries = [DiscoveredFunction(name, name, None, LATEST, arn, latest_description, tags)]
        descriptions: dict[str, str] = {LATEST: latest_description}
        for version in sorted(versions, key=lambda v: _version_order(v.get("Version", ""))):
            number = str(version.get("Version", ""))
            if number in descriptions:
                continue
            stats.versions += 1
            descriptions[number] = version.get("Description", "")
            qualified = version.get("FunctionArn") or ""
            entries.append(
                DiscoveredFunction(
                    f"{name}:{number}",
                    name,
                    number,
                    number,
                    qualified if qualified.endswith(f":{number}") else f"{arn}:{number}",
                    descriptions[number],
                    tags,
                )
            )
        for alias in aliases:
            stats.aliases += 1
            alias_name = alias.get("Name", "")
            target = alias.get("FunctionVersion", "")
            entries.append(
                DiscoveredFunction(
                    f"{name}:{alias_name}",
                    name,
                    alias_name,
                    target,
                    alias.get("AliasArn") or f"{arn}:{alias_name}",
                    # The alias's own description, else that of the version it points at.
                    alias.get("Description") or descriptions.get(target, ""),
                    tags,
                )
            )
        return entries

    async def _pages(self, call: _Caller, operation: str, name: str, key: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        marker: str | None = None
        while True:
            params: dict[str, Any] = {"FunctionName": name, "MaxItems": PAGE_SIZE}
            if marker:
                params["Marker"] = marker
            page = await call(operation, params, missing_is_gone=True)
            items.extend(page.get(key, ()))
            marker = page.get("NextMarker")
            if not marker:
                return items

    # --- plumbing --------------------------------------------------------------------------------------

    def _client(self, account: Account) -> Any:
        with self._clients_lock:
            client = self._clients.get(account)
            if client is None:
                try:
                    client = self._client_factory(account)
                except Exception as err:  # noqa: BLE001 - a bad region or endpoint; report, don't crash
                    raise DiscoveryError(
                        "InvalidConfiguration",
                        f"cannot create a Lambda client for {account.describe()}: {type(err).__name__}",
                    ) from None
                self._clients[account] = client
            return client

    def semaphore(self) -> asyncio.Semaphore:
        """The Lister's concurrency bound on the running loop (semaphores belong to one loop)."""
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            for old in [old for old in self._semaphores if old.is_closed()]:
                del self._semaphores[old]
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return semaphore

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return self._random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * (2**attempt)))


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


class _Gone(Exception):
    """The function went away while it was being listed."""


class _Caller:
    """Runs one API call of a listing: bounded, rate-limited, off the loop, retried and counted."""

    def __init__(self, lister: Lister, client: Any, account: Account, stats: ListingStats) -> None:
        self._lister = lister
        self._client = client
        self._account = account
        self._stats = stats

    async def __call__(
        self, operation: str, params: dict[str, Any], *, missing_is_gone: bool = False
    ) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        from botocore.parsers import ResponseParserError

        lister, stats = self._lister, self._stats
        method = getattr(self._client, operation)
        attempt = 0
        while True:
            async with lister.semaphore():
                await lister._bucket.take()
                stats.in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
                stats.api_calls += 1
                try:
                    answer: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(
                        lister.executor, functools.partial(method, **params)
                    )
                    return answer
                except ClientError as err:
                    error = err.response.get("Error", {})
                    code = str(error.get("Code") or "Unknown")
                    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    message = str(error.get("Message") or "")
                    code, message = _from_xml(code, message)
                except NoCredentialsError:
                    stats.api_calls -= 1  # refused before any request was sent
                    raise DiscoveryError(
                        "NoCredentials",
                        f"no AWS credentials found for {self._account.describe()}: set a secret on the "
                        "Upstream or give the worker credentials",
                    ) from None
                except (BotoCoreError, ResponseParserError) as err:
                    # Connection refused, timeouts, bad endpoint URLs, an answer that is not AWS's (a
                    # proxy's HTML page, a crashed STS): nothing a retry here would fix.
                    raise DiscoveryError(
                        type(err).__name__, f"{_operation(operation)} failed for {self._account.describe()}"
                    ) from None
                finally:
                    stats.in_flight -= 1

            throttled = code in THROTTLE_CODES or status == 429
            transient = code in TRANSIENT_CODES or status in TRANSIENT_STATUSES
            if throttled or transient:
                if throttled:
                    stats.throttled += 1
                else:
                    stats.retried += 1
                if attempt >= lister.max_retries:
                    raise DiscoveryError(
                        code,
                        f"{_operation(operation)} still {'throttled' if throttled else 'failing'} after "
                        f"{attempt + 1} attempts against {self._account.describe()}",
                    )
                await asyncio.sleep(lister.backoff(attempt))
                attempt += 1
                continue
            if missing_is_gone and code == "ResourceNotFoundException":
                raise _Gone(params.get("FunctionName"))
            raise self._error(operation, code, message)

    def _error(self, operation: str, code: str, message: str) -> DiscoveryError:
        hint = _CREDENTIAL_HINTS.get(code)
        text = f"{_operation(operation)} against {self._account.describe()} was refused"
        if hint:
            text += f": {hint}"
        detail = _scrub(message, self._secrets())
        if detail:
            text += f" ({detail[:_MAX_MESSAGE]})"
        return DiscoveryError(code, text)

    def _secrets(self) -> Iterable[str]:
        creds = self._account.credentials
        if creds is None:
            return ()
        return [value for value in (creds.secret_key, creds.session_token) if value]


_XML_CODE_RE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE_RE = re.compile(r"<Message>([^<]{0,2000})</Message>")


def _from_xml(code: str, message: str) -> tuple[str, str]:
    """An XML error body (IAM-style, as some endpoints answer) that botocore's JSON parser left unparsed."""
    if not code.isdigit() or "<Code>" not in message:
        return code, message
    found = _XML_CODE_RE.search(message)
    text = _XML_MESSAGE_RE.search(message)
    return (found.group(1) if found else code), (text.group(1) if text else "")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return " ".join(text.split())


def _operation(method: str) -> str:
    return "lambda:" + "".join(part.capitalize() for part in method.split("_"))


def _unqualified(arn: str) -> str:
    """A function ARN without its qualifier (ListFunctions answers unqualified ones already)."""
    parts = arn.split(":")
    return ":".join(parts[:7]) if len(parts) > 7 else arn

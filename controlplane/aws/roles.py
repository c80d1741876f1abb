"""Credentials for an Upstream's `role_arn`: STS AssumeRole with the Secret's keys or the default chain.

botocore does the assuming and refreshing (`AssumeRoleCredentialFetcher`, `DeferredRefreshableCredentials`),
as the AWS CLI does for a profile's role_arn. `RoleCredentials` keeps one role's current keys for the request
path: they are refreshed in a thread ahead of expiry, so no request ever waits on STS.

Without a Secret, the role is assumed with the control plane's `DefaultChain` when one is given: when the chain
loads new credentials (a web identity token that changed, say), the role is assumed again with them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from botocore.credentials import ReadOnlyCredentials

from controlplane.aws.signing import CredentialsUnavailable, DefaultChain
from controlplane.model import AwsCredentials
from controlplane.model.routes import AuthorizerTarget, RouteTarget

log = logging.getLogger("lambdagate.aws")

SESSION_NAME = "lambdagate"


class _ChainSource:
    """The DefaultChain's current keys, in the shape botocore's AssumeRoleCredentialFetcher reads its source."""

    def __init__(self, chain: DefaultChain) -> None:
        self._chain = chain

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        return self._chain.current()


def assume_role_credentials(
    base: AwsCredentials | None, role_arn: str, region: str, chain: DefaultChain | None = None
) -> Any:
    """Refreshable credentials of `role_arn`, assumed (lazily, on first use) with `base`, else `chain`'s
    current keys, else a botocore session's own default chain."""
    import botocore.session
    from botocore.credentials import (
        AssumeRoleCredentialFetcher,
        Credentials,
        DeferredRefreshableCredentials,
    )

    source_session = botocore.session.Session()
    source: Any
    if base is not None:
        source = Credentials(base.access_key, base.secret_key, base.session_token)
    elif chain is not None:
        source = _ChainSource(chain)
    else:
        source = source_session.get_credentials()
        if source is None:
            raise CredentialsUnavailable(f"no credentials to assume {role_arn} with")

    def sts_client(service: str, **kwargs: Any) -> Any:
        return source_session.create_client(service, region_name=region, **kwargs)

    fetcher = AssumeRoleCredentialFetcher(
        sts_client, source, role_arn, extra_args={"RoleSessionName": SESSION_NAME}
    )
    return DeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials, method="assume-role")


def assumed_role_session(base: AwsCredentials | None, role_arn: str, region: str) -> Any:
    """A botocore session whose clients sign as `role_arn` (refreshing the role's keys as they expire)."""
    import botocore.session
    from botocore.credentials import CredentialProvider, CredentialResolver

    credentials = assume_role_credentials(base, role_arn, region)

    class Assumed(CredentialProvider):  # type: ignore[misc]
        METHOD = "assume-role"

        def load(self) -> Any:
            return credentials

    session = botocore.session.Session()
    session.register_component("credential_provider", CredentialResolver([Assumed()]))
    return session


class RoleCredentials:
    """One role's keys for ext_proc: `current()` never blocks; `refresh()` (in a thread) renews them."""

    def __init__(
        self, base: AwsCredentials | None, role_arn: str, region: str, chain: DefaultChain | None = None
    ) -> None:
        self.role_arn = role_arn
        self._base = base
        self._region = region
        # The source when there is no Secret; its generation at the last assuming says when to assume again.
        self._chain = chain if base is None else None
        self._source_generation: int | None = None
        self._credentials: Any = None
        self._frozen: ReadOnlyCredentials | None = None
        self._error: str | None = "not assumed yet"
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._frozen is not None

    @property
    def source_changed(self) -> bool:
        """Whether the default chain loaded new credentials since this role was assumed with it."""
        return self._chain is not None and self._chain.generation != self._source_generation

    def current(self) -> ReadOnlyCredentials:
        frozen = self._frozen
        if frozen is None:
            raise CredentialsUnavailable(f"role {self.role_arn}: {self._error}")
        return frozen

    def refresh(self) -> None:
        """Blocking: assume the role if needed (botocore renews it 15 minutes before it expires), and again at
        once when the default chain's credentials changed (a new web identity token)."""
        with self._lock:
            try:
                generation = self._chain.generation if self._chain is not None else None
                if self._credentials is None or generation != self._source_generation:
                    if self._credentials is not None:
                        log.info(
                            "role %s: the source credentials changed; assuming the role again", self.role_arn
                        )
                    fresh = assume_role_credentials(self._base, self.role_arn, self._region, self._chain)
                    # Only a successful assuming replaces the role's keys (and its source generation).
                    self._frozen = fresh.get_frozen_credentials()
                    self._credentials, self._source_generation = fresh, generation
                else:
                    self._frozen = self._credentials.get_frozen_credentials()
                self._error = None
            except Exception as err:  # noqa: BLE001 - botocore raises many kinds (parser errors too)
                # Keep the last keys while they last: STS being away must not stop requests.
                message = str(err)
                if self._base is not None:
                    message = message.replace(self._base.secret_key, "***")
                self._error = f"assuming the role failed: {type(err).__name__}: {message}"
                if self._frozen is None:
                    log.error("role %s: %s", self.role_arn, self._error)
                else:
                    log.warning("role %s: %s; keeping the current keys", self.role_arn, self._error)


class RoleCache:
    """The roles routes sign as, one `RoleCredentials` per (keys, role, region), shared by every route."""

    def __init__(self, chain: DefaultChain | None = None) -> None:
        self._roles: dict[tuple[AwsCredentials | None, str, str], RoleCredentials] = {}
        # The source of roles without a Secret (None: each role resolves botocore's chain by itself).
        self.chain = chain
        self._fresh_task: asyncio.Task[None] | None = None

    def get(self, base: AwsCredentials | None, role_arn: str, region: str) -> RoleCredentials:
        key = (base, role_arn, region)
        role = self._roles.get(key)
        if role is None:
            role = self._roles[key] = RoleCredentials(base, role_arn, region, self.chain)
        return role

    def retain(self, in_use: set[RoleCredentials]) -> None:
        self._roles = {k: r for k, r in self._roles.items() if r in in_use}

    def __len__(self) -> int:
        return len(self._roles)

    async def prepare(
        self, targets: Iterable[RouteTarget], stop: asyncio.Event | None
    ) -> asyncio.Task[None] | None:
        """Register the roles of `targets` and assume the new ones, so their first requests find keys; the first
        time there are roles, also start keeping them fresh (the task is returned for the caller to own)."""
        # A route's Lambda authorizer signs with its own Upstream's role, if it has one.
        roles: list[RouteTarget | AuthorizerTarget] = [
            x for t in targets for x in (t, t.authorizer) if x is not None and x.role_arn
        ]
        for t in roles:
            self.get(t.credentials, t.role_arn or "", t.region)
        if not roles:
            return None
        await self.assume_new()
        if self._fresh_task is None and stop is not None:
            self._fresh_task = asyncio.create_task(self.keep_fresh(stop))
            return self._fresh_task
        return None

    async def assume_new(self, timeout_s: float = 10.0) -> None:
        """Assume the roles that have no keys yet, so a new route's first request finds them ready."""
        new = [r for r in self._roles.values() if not r.ready]
        if new:
            pending = [asyncio.to_thread(r.refresh) for r in new]
            try:
                await asyncio.wait_for(asyncio.gather(*pending), timeout_s)
            except asyncio.TimeoutError:
                log.warning(
                    "assuming %d role(s) takes longer than %.0f s; requests fail until then",
                    len(new),
                    timeout_s,
                )

    async def keep_fresh(self, stop: asyncio.Event, check_every_s: float = 30.0) -> None:
        """Renew every role ahead of expiry (botocore refreshes within 15 minutes of it), off the loop; a role
        whose source (the default chain) has new credentials is assumed again within the chain's token check."""
        wake_s = min(check_every_s, self.chain.token_check_s) if self.chain is not None else check_every_s
        last_full = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), wake_s)
            except asyncio.TimeoutError:
                pass
            full = time.monotonic() - last_full >= check_every_s
            if full:
                last_full = time.monotonic()
            for role in list(self._roles.values()):
                if full or role.source_changed:
                    await asyncio.to_thread(role.refresh)

"""Who may call a route, in Envoy's terms: JWT authorizers become jwt_authn providers (with RBAC for scopes),
and the route table entries learn their Lambda authorizer and API keys, which ext_proc enforces.

Pure: model in, protos and route-table parts out. JWTs are never checked in Python.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, http_uri_pb2, substitution_format_string_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2, struct_pb2

from controlplane.model.resources import (
    Authorizer,
    Config,
    Endpoint,
    JwtAuthorizer,
    RouteAuth,
    Secret,
    VirtualService,
)
from controlplane.model.routes import ApiKeyTable
from controlplane.translate.protos import any_of as _any
from controlplane.translate.protos import duration

JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"
# Where jwt_authn leaves a verified token's claims (dynamic metadata of JWT_FILTER), for ext_proc and RBAC.
CLAIMS_KEY = "lambdagate_jwt"
CEL_FILTER = "envoy.access_loggers.extension_filters.cel"
JWKS_CLUSTER_PREFIX = "lambdagate_jwks_"


def provider_name(vs: VirtualService, authorizer: Authorizer) -> str:
    return f"{vs.namespace}/{vs.name}/{authorizer.name}"


def jwks_endpoint(uri: str) -> Endpoint:
    parts = urlsplit(uri)
    scheme = parts.scheme
    host = parts.hostname or ""
    return Endpoint(scheme, host, parts.port or (443 if scheme == "https" else 80))


def jwks_cluster_name(ep: Endpoint) -> str:
    return f"{JWKS_CLUSTER_PREFIX}{ep.scheme}_{ep.host}_{ep.port}"


def jwt_provider(jwt: JwtAuthorizer) -> jwt_pb2.JwtProvider:
    provider = jwt_pb2.JwtProvider(
        issuer=jwt.issuer,
        audiences=list(jwt.audiences),
        # The function sees the token too (API Gateway passes Authorization on).
        forward=True,
        payload_in_metadata=CLAIMS_KEY,
    )
    prefix = "Bearer " if jwt.header == "authorization" else ""
    provider.from_headers.append(jwt_pb2.JwtHeader(name=jwt.header, value_prefix=prefix))
    if jwt.query:
        provider.from_params.append(jwt.query)
    if jwt.jwks.uri is not None:
        provider.remote_jwks.CopyFrom(
            jwt_pb2.RemoteJwks(
                http_uri=http_uri_pb2.HttpUri(
                    uri=jwt.jwks.uri,
                    cluster=jwks_cluster_name(jwks_endpoint(jwt.jwks.uri)),
                    timeout=duration(jwt.jwks.timeout_s),
                ),
                cache_duration=duration(jwt.jwks.cache_s),
                # Fetched when the listener starts, not on the first request; the listener does not wait for it.
                async_fetch=jwt_pb2.JwksAsyncFetch(fast_listener=True),
            )
        )
    else:
        # A file was read into `inline` by the source: Envoy may run where the file is not.
        provider.local_jwks.CopyFrom(base_pb2.DataSource(inline_string=jwt.jwks.inline or ""))
    return provider


@dataclass(frozen=True)
class JwtSetup:
    """Every JWT authorizer of a configuration: the HCM filters they need and the remote JWKS hosts."""

    providers: tuple[tuple[str, JwtAuthorizer], ...]
    scopes: bool  # some route requires scopes: the RBAC filter is listed

    @property
    def jwks_endpoints(self) -> tuple[Endpoint, ...]:
        seen: dict[Endpoint, None] = {}
        for _, jwt in self.providers:
            if jwt.jwks.uri is not None:
                seen.setdefault(jwks_endpoint(jwt.jwks.uri))
        return tuple(seen)


def jwt_setup(config: Config) -> JwtSetup | None:
    providers: list[tuple[str, JwtAuthorizer]] = []
    scopes = False
    for vs in config.virtual_services:
        for a in vs.authorizers:
            if a.jwt is not None:
                providers.append((provider_name(vs, a), a.jwt))
        if any(r.auth.over(vs.auth).scopes for r in vs.routes):
            scopes = True
    if not providers:
        return None
    return JwtSetup(tuple(providers), scopes)


def http_filters(setup: JwtSetup) -> list[hcm_pb2.HttpFilter]:
    """jwt_authn (each route names its provider; a route naming none is not checked), then RBAC for scopes."""
    config = jwt_pb2.JwtAuthentication(
        providers={name: jwt_provider(jwt) for name, jwt in setup.providers},
        requirement_map={name: jwt_pb2.JwtRequirement(provider_name=name) for name, _ in setup.providers},
    )
    filters = [hcm_pb2.HttpFilter(name=JWT_FILTER, typed_config=_any(config))]
    if setup.scopes:
        # No rules here: only routes with scopes set a policy (per route).
        filters.append(hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=_any(rbac_pb2.RBAC())))
    return filters


def _cel_reply(expression: str, message: str, status: int | None) -> hcm_pb2.ResponseMapper:
    body = struct_pb2.Struct()
    body.update({"message": message, "requestId": "%REQ(X-REQUEST-ID)%"})
    mapper = hcm_pb2.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(
            extension_filter=accesslog_pb2.ExtensionFilter(
                name=CEL_FILTER, typed_config=_any(cel_pb2.ExpressionFilter(expression=expression))
            )
        ),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(json_format=body),
    )
    if status is not None:
        mapper.status_code.value = status
    return mapper


def reply_mappers() -> list[hcm_pb2.ResponseMapper]:
    """API Gateway's answers for a refused token: 401 `Unauthorized` (jwt_authn answers 403 for a wrong audience;
    API Gateway says 401), and 403 `Forbidden` for missing scopes. Selected by the reply's details, so a mock
    route's own 401 or 403 is left alone."""
    return [
        _cel_reply("response.code_details.startsWith('jwt_authn')", "Unauthorized", 401),
        _cel_reply("response.code_details.startsWith('rbac_access_denied')", "Forbidden", None),
    ]


def _scope_principals(scope: str) -> list[rbac_config_pb2.Principal]:
    """The token has `scope` among its space-separated `scope` claim (Cognito, RFC 8693) or its `scp` list."""

    def claim(name: str, value: value_pb2.ValueMatcher) -> rbac_config_pb2.Principal:
        return rbac_config_pb2.Principal(
            metadata=metadata_pb2.MetadataMatcher(
                filter=JWT_FILTER,
                path=[
                    metadata_pb2.MetadataMatcher.PathSegment(key=CLAIMS_KEY),
                    metadata_pb2.MetadataMatcher.PathSegment(key=name),
                ],
                value=value,
            )
        )

    words = value_pb2.ValueMatcher(
        string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=f"(.* )?{re.escape(scope)}( .*)?")
        )
    )
    listed = value_pb2.ValueMatcher(
        list_match=value_pb2.ListMatcher(
            one_of=value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=scope))
        )
    )
    return [claim("scope", words), claim("scope", listed), claim("scp", listed), claim("scp", words)]


def route_filters(vs: VirtualService, auth: RouteAuth) -> dict[str, any_pb2.Any]:
    """Per-route configs: which provider checks the token, and which scopes (any one of them) it needs."""
    name = auth.effective_authorizer
    authorizer = vs.authorizer(name) if name is not None else None
    if authorizer is None or authorizer.jwt is None:
        return {}
    out = {JWT_FILTER: _any(jwt_pb2.PerRouteConfig(requirement_name=provider_name(vs, authorizer)))}
    if auth.scopes:
        principals = [p for s in auth.scopes for p in _scope_principals(s)]
        policy = rbac_config_pb2.Policy(
            permissions=[rbac_config_pb2.Permission(any=True)],
            principals=[rbac_config_pb2.Principal(or_ids=rbac_config_pb2.Principal.Set(ids=principals))],
        )
        rules = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW, policies={"scopes": policy})
        out[RBAC_FILTER] = _any(rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(rules=rules)))
    return out


def api_key_table(vs: VirtualService, secret: Secret | None) -> ApiKeyTable | None:
    """The VirtualService's keys as SHA-256 digests: ext_proc compares digests and never holds a key."""
    if vs.api_keys is None or secret is None:
        return None
    digests = tuple(
        sorted((hashlib.sha256(value.encode()).hexdigest(), name) for name, value in secret.data if value)
    )
    return ApiKeyTable(f"{vs.namespace}/{vs.name}", digests, vs.api_keys.rate_limit, vs.api_keys.limits)

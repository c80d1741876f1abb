"""Issue 7's access control, layer by layer: the VirtualService fields and their errors, the Envoy config they
translate to (jwt_authn, RBAC, local replies), and ext_proc's gate (IAM policies, cache, API-key buckets)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from controlplane.aws.events import HttpRequest, Identity, RouteInfo, build_v1_event, build_v2_event
from controlplane.extproc.gate import Gate, PolicyError, parse_answer
from controlplane.model import ConfigError
from controlplane.model.parse import parse_document
from controlplane.model.resources import RateLimit
from controlplane.model.routes import ApiKeyTable
from controlplane.sources.files import FileSource
from controlplane.translate.envoy import TranslateOptions, translate

JWKS = json.dumps({"keys": [{"kty": "RSA", "kid": "k", "n": "AQAB", "e": "AQAB"}]})

BASE = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDUNIT, secret_key: unit-secret-value}
---
apiVersion: v1
kind: Secret
metadata: {name: keys}
stringData: {acme: the-acme-api-key-value}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: fns}
spec:
  region: us-east-1
  secret_ref: aws
  functions: [{name: echo, spec: {function_name: echo}}, {name: auth, spec: {function_name: auth}}]
"""


def vs_doc(spec: str) -> dict:
    return yaml.safe_load(
        "apiVersion: lambdagate.io/v1\nkind: VirtualService\nmetadata: {name: api}\nspec:\n" + spec
    )


def error_of(spec: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_document(vs_doc(spec))
    return info.value


ROUTE = "  routes: [{matcher: {path: /a}, destination: {upstream: fns, function: echo}}]\n"


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ("  auth: {authorizer: nope}\n" + ROUTE, "spec.auth.authorizer", "not in spec.authorizers"),
        (
            "  authorizers: {a: {type: saml}}\n" + ROUTE,
            "spec.authorizers.a.type",
            "not jwt or lambda",
        ),
        (
            "  authorizers: {a: {type: jwt, issuer: x, jwks: {inline: '{}'}}}\n" + ROUTE,
            "spec.authorizers.a.jwks.inline",
            "JWKS",
        ),
        (
            "  authorizers: {a: {type: jwt, issuer: x, jwks: {inline: 'x', uri: 'https://x'}}}\n" + ROUTE,
            "spec.authorizers.a.jwks",
            "exactly one",
        ),
        (
            "  authorizers: {a: {type: jwt, issuer: x, jwks: {uri: 'ftp://x'}}}\n" + ROUTE,
            "spec.authorizers.a.jwks.uri",
            "http(s)",
        ),
        (
            "  authorizers: {a: {type: lambda, upstream: fns, function: auth, identity_sources: [cookie:x]}}\n"
            + ROUTE,
            "spec.authorizers.a.identity_sources[0]",
            "header:NAME",
        ),
        (
            "  authorizers: {a: {type: lambda, upstream: fns, function: auth, identity_sources: [header:x], "
            "ttl: 2h}}\n" + ROUTE,
            "spec.authorizers.a.ttl",
            "3600",
        ),
        (
            "  routes: [{matcher: {path: /a}, destination: {upstream: fns, function: echo}, "
            "auth: {api_key_required: true}}]\n",
            "spec.routes[0].auth",
            "spec.api_keys",
        ),
        (
            "  routes: [{matcher: {path: /a}, destination: {upstream: fns, function: echo}, "
            "auth: {scopes: [read]}}]\n",
            "spec.routes[0].auth.scopes",
            "JWT authorizer",
        ),
        (
            "  authorizers: {a: {type: lambda, upstream: fns, function: auth, identity_sources: [header:x]}}\n"
            "  routes: [{matcher: {path: /a}, mock: {status: 200}, auth: {authorizer: a}}]\n",
            "spec.routes[0].auth",
            "mock route",
        ),
    ],
)
def test_bad_auth_fields_name_the_field(spec: str, field: str, words: str) -> None:
    err = error_of(spec)
    assert err.field == field, str(err)
    assert words in str(err)


def load(tmp_path: Path, vs: str) -> FileSource:
    folder = tmp_path / "config"
    folder.mkdir(exist_ok=True)
    (folder / "api.yaml").write_text(BASE + "---\napiVersion: lambdagate.io/v1\nkind: VirtualService\n" + vs)
    return FileSource(folder)


def test_api_keys_need_their_secret_and_keys_never_reach_envoy(tmp_path: Path) -> None:
    source = load(
        tmp_path,
        "metadata: {name: api}\nspec:\n  api_keys: {secret_ref: missing}\n"
        "  routes: [{matcher: {path: /a}, destination: {upstream: fns, function: echo}, "
        "auth: {api_key_required: true}}]\n",
    )
    result = source.load()
    assert [e.field for e in result.errors] == ["spec.api_keys.secret_ref"]
    source = load(
        tmp_path,
        "metadata: {name: api}\nspec:\n  api_keys: {secret_ref: keys}\n"
        "  routes: [{matcher: {path: /a}, destination: {upstream: fns, function: echo}, "
        "auth: {api_key_required: true}}]\n",
    )
    result = source.load()
    assert not result.errors
    out = translate(result.config, TranslateOptions())
    (target,) = out.route_table.values()
    assert target.api_keys is not None and [n for _, n in target.api_keys.digests] == ["acme"]
    dumped = "".join(str(m) for group in out.resources().values() for m in group.values()) + repr(target)
    assert "the-acme-api-key-value" not in dumped and "unit-secret-value" not in dumped
    assert "the-acme-api-key-value" not in repr(result.config)


def test_jwt_filters_exist_only_with_jwt_authorizers(tmp_path: Path) -> None:
    plain = load(tmp_path, "metadata: {name: api}\nspec:\n" + ROUTE).load()
    listener = translate(plain.config, TranslateOptions()).listeners[0]
    assert "jwt_authn" not in str(listener) and "rbac" not in str(listener)
    jwt_vs = (
        "metadata: {name: api}\nspec:\n"
        f"  authorizers: {{cognito: {{type: jwt, issuer: https://issuer, audiences: [app], jwks: {{inline: '{JWKS}'}}}}}}\n"
        "  auth: {authorizer: cognito}\n"
        "  routes:\n"
        "  - {matcher: {path: /a}, destination: {upstream: fns, function: echo}, auth: {scopes: [read]}}\n"
        "  - {matcher: {path: /b}, destination: {upstream: fns, function: echo}, auth: {authorizer: none}}\n"
    )
    result = load(tmp_path, jwt_vs).load()
    assert not result.errors
    out = translate(result.config, TranslateOptions())
    text = str(out.listeners[0])
    assert "envoy.filters.http.jwt_authn" in text and "envoy.filters.http.rbac" in text
    assert "default/api/cognito" in text and "lambdagate_jwt" in text
    routes = {r.name.split("/")[2]: r for r in out.routes[0].virtual_hosts[0].routes}
    assert set(routes["0"].typed_per_filter_config) >= {
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.rbac",
    }
    assert "envoy.filters.http.jwt_authn" not in routes["1"].typed_per_filter_config
    table = {t.route_name.split("/")[2]: t for t in out.route_table.values()}
    assert table["0"].jwt and not table["1"].jwt


def test_a_jwks_file_is_read_at_every_load_and_a_bad_one_keeps_the_last_good(tmp_path: Path) -> None:
    keys = tmp_path / "jwks.json"
    keys.write_text(JWKS)
    vs = (
        "metadata: {name: api}\nspec:\n"
        "  authorizers: {f: {type: jwt, issuer: https://issuer, jwks: {file: ../jwks.json}}}\n"
        "  auth: {authorizer: f}\n" + ROUTE
    )
    source = load(tmp_path, vs)
    first = source.load()
    assert not first.errors
    (served,) = first.config.virtual_services
    assert served.authorizers[0].jwt is not None and served.authorizers[0].jwt.jwks.inline == JWKS
    assert source.load().config.virtual_services[0] is served  # unchanged: the same object
    keys.write_text("{not json")
    broken = source.load()
    assert [e.field for e in broken.errors] == ["spec.authorizers.f.jwks.file"]
    assert broken.config.virtual_services[0].authorizers[0].jwt.jwks.inline == JWKS  # type: ignore[union-attr]
    keys.unlink()
    gone = source.load()
    assert "cannot read" in str(gone.errors[0])


# ---------------------------------------------------------------------------------------------------------------
# The gate


def policy(effect: str, resource: object, action: object = "execute-api:Invoke", **extra: object) -> bytes:
    doc = {
        "principalId": "me",
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [{"Effect": effect, "Action": action, "Resource": resource}],
        },
        **extra,
    }
    return json.dumps(doc).encode()


ARN = "arn:aws:execute-api:us-east-1:000000000000:api/prod/GET/pets/1"


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (policy("Allow", ARN), True),
        (policy("Allow", "arn:aws:execute-api:*:*:api/prod/GET/*"), True),
        (policy("Allow", "arn:aws:execute-api:us-east-1:000000000000:api/prod/*/pets/?"), True),
        (policy("Allow", "arn:aws:execute-api:us-east-1:000000000000:api/prod/POST/*"), None),
        (policy("Allow", [ARN], action=["execute-api:*"]), True),
        (policy("Allow", ARN, action="s3:GetObject"), None),
        (policy("Deny", "*"), False),
        (policy("Allow", "arn:aws:execute-api:us-east-1:000000000000:api/prod/GET/pets/[1]"), None),
    ],
)
def test_policies_are_evaluated_like_iam(answer: bytes, verdict: bool | None) -> None:
    assert parse_answer(answer, 60).verdict(ARN) is verdict


def test_an_explicit_deny_wins() -> None:
    doc = json.loads(policy("Allow", "*"))
    doc["policyDocument"]["Statement"].append({"Effect": "Deny", "Action": "*", "Resource": ARN})
    assert parse_answer(json.dumps(doc).encode(), 60).verdict(ARN) is False


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"[]",
        json.dumps({"principalId": "x"}).encode(),
        policy("Maybe", "*"),
        policy("Allow", 5),
        policy("Allow", "*", context={"nested": {"a": 1}}),
        policy("Allow", "*", principalId=7),
    ],
)
def test_malformed_answers_are_refused(answer: bytes) -> None:
    with pytest.raises(PolicyError):
        parse_answer(answer, 60)


def test_api_key_buckets_are_per_key() -> None:
    import hashlib

    digests = tuple(
        sorted((hashlib.sha256(k.encode()).hexdigest(), n) for n, k in (("a", "key-a"), ("b", "key-b")))
    )
    table = ApiKeyTable("ns/vs", digests, RateLimit(1, 3600, 1), (("b", RateLimit(2, 3600, 2)),))
    gate = Gate()
    assert gate.api_key(table, "key-a", "r") == ("key-a", "a")
    limited = gate.api_key(table, "key-a", "r")
    assert not isinstance(limited, tuple) and limited.status == 429
    assert gate.api_key(table, "key-b", "r") == ("key-b", "b")
    assert gate.api_key(table, "key-b", "r") == ("key-b", "b")
    assert not isinstance(gate.api_key(table, "key-b", "r"), tuple)
    for presented in (None, "", "key-c"):
        refused = gate.api_key(table, presented, "r")
        assert not isinstance(refused, tuple) and refused.status == 403


def test_the_event_carries_the_identity() -> None:
    route = RouteInfo("/me", "prod", None)
    req = HttpRequest("GET", "/me", [], b"", "1.2.3.4", "HTTP/1.1", "rid", "api.example.com")
    req.identity = Identity(
        claims={"sub": "u", "exp": 1700000000, "groups": ["a", "b"], "ok": True},
        scopes=["read"],
        api_key="k",
        api_key_id="acme",
    )
    v1 = build_v1_event(req, route, now=time.time())
    assert v1["requestContext"]["authorizer"]["claims"] == {
        "sub": "u",
        "exp": "1700000000",
        "groups": "[a b]",
        "ok": "true",
    }
    assert v1["requestContext"]["identity"]["apiKeyId"] == "acme"
    v2 = build_v2_event(req, route, now=time.time())
    assert v2["requestContext"]["authorizer"]["jwt"]["scopes"] == ["read"]
    req.identity = Identity(principal_id="p", context={"tier": "gold"})
    assert build_v1_event(req, route)["requestContext"]["authorizer"] == {"principalId": "p", "tier": "gold"}
    assert build_v2_event(req, route)["requestContext"]["authorizer"] == {
        "lambda": {"principalId": "p", "tier": "gold"}
    }

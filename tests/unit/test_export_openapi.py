"""`lambdagate export-openapi` through the real CLI entry: what each route kind, option, authorizer and VirtualService
setting becomes in the OpenAPI document; that `import-openapi` reads an export back as the same routes (a config
folder -> export -> import, and an OpenAPI document -> import -> export -> import); and that no secret reaches the
output."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_import_openapi import CORS_SPEC, MOCKS, OPENAPI3, SWAGGER2

from controlplane.cli import main
from controlplane.model import Config, Destination, Upstream, VirtualService
from controlplane.model.resources import Endpoint
from controlplane.sources.files import FileSource

ARN = "arn:aws:lambda:us-east-1:123456789012:function"
INVOKE = "arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions"
ACCESS_KEY = "AKIAEXPORTTESTACCESS"
SECRET_KEY = "export-test-aws-secret-key-value"
API_KEYS = ("alice-api-key-value-0123456789", "bob-api-key-value-9876543210")
PRIVATE_EXPONENT = "private-exponent-that-must-never-be-exported"
SHARED_SECRET = "c2hhcmVkLXNlY3JldC1uZXZlci1leHBvcnRlZA"

SECRETS = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{access_key: {ACCESS_KEY}, secret_key: {SECRET_KEY}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{alice: {API_KEYS[0]}, bob: {API_KEYS[1]}}}
"""

UPSTREAM = f"""
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: aws}}
spec:
  region: us-east-1
  secret_ref: aws
  options: {{payload_format: apigateway-v2, timeout: 10s}}
  functions:
  - {{name: pets, spec: {{function_name: "{ARN}:pets", qualifier: live}}}}
  - {{name: hello, spec: {{function_name: hello}}}}
  - {{name: authorize, spec: {{function_name: "{ARN}:authz"}}}}
"""

# Every route kind: a template with GET (and HEAD), two methods with their own options and auth, a prefix, a
# regex, weighted functions, a function parameter, mapping templates, mocks.
SHOP = f"""
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  domains: [api.example.com, "*.example.org"]
  stage: prod
  stage_variables: {{env: prod, table: pets-prod}}
  authorizers:
    jwt:
      type: jwt
      issuer: https://issuer.example.com
      audiences: [shop]
      jwks: {{uri: "https://issuer.example.com/keys", cache_duration: 10m}}
      query: access_token
    custom:
      type: lambda
      upstream: aws
      function: authorize
      identity_sources: ["header:Authorization", "query:token"]
      ttl: 60s
  auth: {{authorizer: jwt, scopes: [pets.read]}}
  api_keys: {{secret_ref: keys, rate_limit: {{requests: 10, per: 1s}}, limits: {{alice: {{requests: 100, per: 1m}}}}}}
  routes:
  - matcher: {{path: "/pets/{{id}}", methods: [GET, HEAD]}}
    destination: {{upstream: aws, function: pets}}
  - matcher: {{path: /pets, methods: [POST, GET]}}
    destination: {{upstream: aws, function: pets}}
    options: {{payload_format: apigateway-v1, timeout: 1500ms, max_retries: 2, invocation_type: Event}}
    auth: {{authorizer: custom, scopes: [], api_key_required: true}}
  - matcher: {{prefix: /files}}
    destination: {{upstream: aws, function_name: "{ARN}:files:3"}}
    options: {{payload_format: raw, errors: {{throttled: 503}}, log_tail: true, timeout: 2.5s}}
  - matcher: {{regex: "^/v[0-9]+/status$", methods: [GET]}}
    mock: {{status: 200, body: ok}}
    auth: {{authorizer: none, scopes: []}}
  - matcher: {{path: /canary, methods: [GET]}}
    destination: {{upstream: aws, functions: [{{function: pets, weight: 90}}, {{function_name: hello, weight: 10}}]}}
    options: {{rate_limit: {{requests: 5, per: 2s, burst: 8}}}}
  - matcher: {{path: "/fn/{{name}}"}}
    destination: {{upstream: aws, function_param: name}}
    auth: {{scopes: [admin]}}
  - matcher: {{path: /templated, methods: [POST]}}
    destination: {{upstream: aws, function: hello}}
    integration:
      request_template: |
        {{"name": {{{{ json.name | tojson }}}}}}
      responses:
      - {{status: 200, template: '{{"ok": true}}', headers: {{x-served-by: lambdagate}}}}
      - {{status: 400, pattern: ".*invalid.*", template: bad request, content_type: text/plain}}
  - matcher: {{path: /health, methods: [GET, CONNECT]}}
    mock: {{status: 503, headers: {{retry-after: "120", content-type: application/json}}, body: '{{"down": true}}'}}
    auth: {{authorizer: none, scopes: []}}
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def folder(path: Path, *documents: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for n, text in enumerate(documents):
        (path / f"{n}.yaml").write_text(textwrap.dedent(text))
    return path


def load(config_dir: Path) -> Config:
    """The folder as the control plane reads it (`endpoint: local` stands for any local endpoint)."""
    result = FileSource(config_dir, local_endpoint=Endpoint("http", "127.0.0.1", 9)).load()
    assert result.errors == [], [str(e) for e in result.errors]
    return result.config


def export(config_dir: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    """Export with the real CLI to standard output: the document, and what was said on stderr."""
    assert main(["export-openapi", "--config-dir", str(config_dir), *args]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    return yaml.safe_load(captured.out), captured.err


def reimport(doc: dict[str, Any], into: Path, *args: str) -> Config:
    """Import an exported document into a folder of its own (beside the Secrets) and load that folder."""
    folder(into, SECRETS)
    spec = into.parent / f"{into.name}.openapi.json"
    spec.write_text(json.dumps(doc))
    assert main(["import-openapi", str(spec), "-o", str(into / "imported.yaml"), *args]) == 0
    return load(into)


def only_vs(config: Config) -> VirtualService:
    assert len(config.virtual_services) == 1
    return config.virtual_services[0]


def semantics(config: Config, vs: VirtualService) -> dict[str, Any]:
    """What a round trip keeps: the whole VirtualService, with each Upstream reference replaced by the Lambda
    functions it stands for, and each route's options merged over its Upstream's defaults. (Import writes one
    Upstream of its own, named after the VirtualService, whose routes carry the options themselves; with no
    Upstream default left, payload format 1.0 is the same as none, and a mapping-template route has none.)"""

    def upstream(dest: Destination) -> Upstream:
        up = config.upstream(dest.upstream_namespace, dest.upstream)
        assert up is not None
        return up

    def function(up: Upstream, name: str) -> tuple[str, str, str | None]:
        fn = up.function(name)
        assert fn is not None
        return name, fn.function_name, fn.qualifier

    def destination(dest: Destination | None) -> Any:
        if dest is None:
            return None
        up = upstream(dest)
        names = up.function_names() if dest.function_param else []
        return (
            up.region,
            function(up, dest.function) if dest.function else None,
            dest.function_name,
            dest.function_param,
            [function(up, n) for n in names],
            [
                (function(up, c.function) if c.function else None, c.function_name, c.weight)
                for c in dest.functions
            ],
        )

    routes = []
    for r in vs.routes:
        options = r.options
        if r.destination is not None:
            options = r.options.over(upstream(r.destination).options)
            fmt = None if r.integration is not None else options.payload_format or "apigateway-v1"
            options = replace(options, payload_format=fmt)
        routes.append((r.matcher, destination(r.destination), options, r.mock, r.auth, r.integration))
    authorizers = [
        (
            a.name,
            a.jwt,
            a.function
            and (destination(a.function.destination), a.function.identity_sources, a.function.ttl_s),
        )
        for a in vs.authorizers
    ]
    return {
        "key": vs.key,
        "domains": vs.domains,
        "stage": (vs.stage, vs.stage_variables),
        "authorizers": authorizers,
        "auth": vs.auth,
        "api_keys": vs.api_keys,
        "routes": routes,
    }


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path or matcher, method key, operation) for paths and x-lambdagate-paths alike."""
    out = []
    items = list(doc["paths"].items())
    for entry in doc.get("x-lambdagate-paths", []):
        kind = next(k for k in ("path", "prefix", "regex") if k in entry)
        items.append((f"{kind}:{entry[kind]}", entry))
    for path, item in items:
        for key, op in item.items():
            if key in ("get", "put", "post", "delete", "options", "head", "patch", "trace") or key.endswith(
                "any-method"
            ):
                out.append((path, key, op))
    return out


# --- the document ----------------------------------------------------------------------------------------------


def test_every_route_kind_becomes_openapi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = folder(tmp_path / "config", SECRETS, UPSTREAM, SHOP)
    doc, err = export(config, capsys=capsys)
    assert doc["openapi"].startswith("3.0.")
    assert doc["info"]["title"] == "shop" and doc["info"]["version"]
    # Servers from the domains a client can name; the wildcard one is lambdagate's only.
    assert doc["servers"] == [{"url": "https://api.example.com"}]
    assert doc["x-lambdagate-domains"] == ["api.example.com", "*.example.org"]
    assert doc["x-lambdagate-stage"] == {"name": "prod", "variables": {"env": "prod", "table": "pets-prod"}}
    assert doc["x-lambdagate-virtual-service"] == {"name": "shop", "namespace": "default"}
    # Templates as they are; a prefix as API Gateway's greedy path; the regex route where OpenAPI has no place.
    assert list(doc["paths"]) == [
        "/pets/{id}",
        "/pets",
        "/files/{proxy+}",
        "/canary",
        "/fn/{name}",
        "/templated",
        "/health",
    ]
    assert [(p, k) for p, k, _ in operations(doc)] == [
        ("/pets/{id}", "get"),  # GET admits HEAD: no head operation of its own
        ("/pets", "post"),
        ("/pets", "get"),
        ("/files/{proxy+}", "x-amazon-apigateway-any-method"),
        ("/canary", "get"),
        ("/fn/{name}", "x-amazon-apigateway-any-method"),
        ("/templated", "post"),
        ("/health", "get"),
        ("regex:^/v[0-9]+/status$", "get"),
    ]
    ops = {(p, k): op for p, k, op in operations(doc)}
    assert doc["paths"]["/pets/{id}"]["parameters"] == [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    assert doc["paths"]["/files/{proxy+}"]["parameters"][0]["name"] == "proxy"
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(set(ids)) == len(ids) and ids[:3] == ["getPetsId", "postPets", "getPets"]

    # A Lambda proxy route: the function ARN with its qualifier, the payload format and the timeout (the
    # Upstream's defaults applied).
    pet = ops[("/pets/{id}", "get")]
    assert pet["x-amazon-apigateway-integration"] == {
        "type": "aws_proxy",
        "httpMethod": "POST",
        "uri": f"{INVOKE}/{ARN}:pets:live/invocations",
        "payloadFormatVersion": "2.0",
        "timeoutInMillis": 10000,
    }
    assert pet["x-lambdagate-route"] == 0 and pet["x-lambdagate-methods"] == ["GET", "HEAD"]
    assert pet["x-lambdagate-destination"] == {"function": "pets"}
    assert "security" not in pet  # the document's own applies
    # One route, two operations: the same index, no methods extension (the operations say them in order).
    post, get = ops[("/pets", "post")], ops[("/pets", "get")]
    assert post["x-lambdagate-route"] == get["x-lambdagate-route"] == 1 and "x-lambdagate-methods" not in post
    assert post["x-amazon-apigateway-integration"]["payloadFormatVersion"] == "1.0"
    assert post["x-amazon-apigateway-integration"]["timeoutInMillis"] == 1500
    assert post["x-lambdagate-options"] == {"invocation_type": "Event", "max_retries": 2}
    assert post["security"] == [{"custom": [], "api_key": []}]
    # Raw payloads and lambdagate's own options are extensions; a prefix says so.
    files = ops[("/files/{proxy+}", "x-amazon-apigateway-any-method")]
    assert files["x-lambdagate-prefix"] == "/files"
    assert "payloadFormatVersion" not in files["x-amazon-apigateway-integration"]
    assert files["x-amazon-apigateway-integration"]["uri"] == f"{INVOKE}/{ARN}:files:3/invocations"
    assert files["x-amazon-apigateway-integration"]["timeoutInMillis"] == 2500
    assert files["x-lambdagate-options"] == {
        "payload_format": "raw",
        "errors": {"throttled": 503},
        "log_tail": True,
    }
    assert files["x-lambdagate-destination"] == {"function_name": f"{ARN}:files:3"}
    # Weighted functions: API Gateway invokes the heaviest; the choices are an extension.
    canary = ops[("/canary", "get")]
    assert canary["x-amazon-apigateway-integration"]["uri"] == f"{INVOKE}/{ARN}:pets:live/invocations"
    assert canary["x-lambdagate-destination"] == {
        "functions": [{"function": "pets", "weight": 90}, {"function_name": "hello", "weight": 10}]
    }
    assert canary["x-lambdagate-options"] == {"rate_limit": {"requests": 5, "per": "2s", "burst": 8}}
    # A function named per request: no uri at all; the names it may take are in x-lambdagate-functions.
    fn = ops[("/fn/{name}", "x-amazon-apigateway-any-method")]
    assert "uri" not in fn["x-amazon-apigateway-integration"]
    assert fn["x-lambdagate-destination"] == {"function_param": "name"}
    assert fn["security"] == [{"jwt": ["admin"]}]
    assert doc["x-lambdagate-functions"] == {
        "pets": {"function_name": f"{ARN}:pets", "qualifier": "live"},
        "hello": {"function_name": "hello"},
        "authorize": {"function_name": f"{ARN}:authz"},
    }
    assert doc["x-lambdagate-region"] == "us-east-1"
    # Mapping templates: a non-proxy integration, responses keyed by selection pattern.
    templated = ops[("/templated", "post")]
    assert templated["x-amazon-apigateway-integration"] == {
        "type": "aws",
        "httpMethod": "POST",
        "uri": f"{INVOKE}/hello/invocations",  # no account to make an ARN of (see --account-id)
        "passthroughBehavior": "when_no_match",
        "requestTemplates": {"application/json": '{"name": {{ json.name | tojson }}}\n'},
        "responses": {
            "default": {
                "statusCode": "200",
                "responseParameters": {"method.response.header.x-served-by": "'lambdagate'"},
                "responseTemplates": {"application/json": '{"ok": true}'},
            },
            ".*invalid.*": {"statusCode": "400", "responseTemplates": {"text/plain": "bad request"}},
        },
        "timeoutInMillis": 10000,
    }
    assert templated["responses"]["200"]["headers"] == {"x-served-by": {"schema": {"type": "string"}}}
    assert "x-lambdagate-integration" not in templated  # the standard fields say it all
    assert doc["x-lambdagate-templates"] == "jinja2"
    # Mocks: their status, headers and body; open routes say so against the document's security.
    health = ops[("/health", "get")]
    assert health["security"] == []
    assert health["x-lambdagate-methods"] == ["GET", "CONNECT"]  # OpenAPI has no CONNECT operation
    assert health["x-amazon-apigateway-integration"] == {
        "type": "mock",
        "requestTemplates": {"application/json": '{"statusCode": 200}'},
        "responses": {
            "default": {
                "statusCode": "503",
                "responseParameters": {
                    "method.response.header.retry-after": "'120'",
                    "method.response.header.content-type": "'application/json'",
                },
                "responseTemplates": {"application/json": '{"down": true}'},
            }
        },
    }
    assert "x-lambdagate-mock" not in health
    # A body with no content-type header: import would add one, so the mock is also said exactly.
    status = ops[("regex:^/v[0-9]+/status$", "get")]
    assert status["x-lambdagate-mock"] == {"status": 200, "body": "ok"}

    # Security: the VirtualService's default, the schemes for the authorizers and the API keys.
    assert doc["security"] == [{"jwt": ["pets.read"]}]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["jwt"] == {
        "type": "oauth2",
        "flows": {},
        "x-amazon-apigateway-authorizer": {
            "type": "jwt",
            "identitySource": "$request.header.Authorization",
            "jwtConfiguration": {"issuer": "https://issuer.example.com", "audience": ["shop"]},
        },
        "x-lambdagate-authorizer": {
            "jwks": {"uri": "https://issuer.example.com/keys", "cache_duration": "600s"},
            "query": "access_token",
        },
    }
    assert schemes["custom"] == {
        "type": "apiKey",
        "name": "Authorization",
        "in": "header",
        "x-amazon-apigateway-authtype": "custom",
        "x-amazon-apigateway-authorizer": {
            "type": "request",
            "authorizerUri": f"{INVOKE}/{ARN}:authz/invocations",
            "identitySource": "method.request.header.Authorization, method.request.querystring.token",
            "authorizerResultTtlInSeconds": 60,
        },
        "x-lambdagate-authorizer": {"function": "authorize"},
    }
    assert schemes["api_key"] == {
        "type": "apiKey",
        "name": "x-api-key",
        "in": "header",
        "x-lambdagate-api-keys": {
            "secret_ref": "keys",
            "rate_limit": {"requests": 10, "per": "1s", "burst": 10},
            "limits": {"alice": {"requests": 100, "per": "60s", "burst": 100}},
        },
    }
    # No CORS anywhere: no CORS settings.
    assert "x-amazon-apigateway-cors" not in doc
    assert "warning: VirtualService default/shop: spec.routes[3]: a regex matcher" in err
    assert "spec.routes[5]: function_param 'name': API Gateway has no function chosen per request" in err
    assert "functions named without an AWS account (hello)" in err and "--account-id" in err


def test_account_id_completes_function_names_into_arns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = folder(tmp_path / "config", SECRETS, UPSTREAM, SHOP)
    doc, err = export(config, "--account-id", "210987654321", capsys=capsys)
    templated = doc["paths"]["/templated"]["post"]["x-amazon-apigateway-integration"]
    assert templated["uri"] == (
        "arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/"
        "arn:aws:lambda:us-east-1:210987654321:function:hello/invocations"
    )
    assert "without an AWS account" not in err
    # The account of a function's own ARN stays its own.
    assert (
        doc["paths"]["/pets"]["get"]["x-amazon-apigateway-integration"]["uri"]
        == f"{INVOKE}/{ARN}:pets:live/invocations"
    )


@pytest.mark.parametrize("name", ["shop", "cors"])
def test_exports_are_valid_openapi(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """What SDK generators and API Gateway read: the OpenAPI 3.0 schema holds (extensions and all). (A greedy
    `{proxy+}` with a method of its own is not checked: its parameter is `proxy`, as API Gateway writes it, which
    strict validators refuse.)"""
    validator = pytest.importorskip("openapi_spec_validator")
    documents = {"shop": (SECRETS, UPSTREAM, SHOP), "cors": (CORS_FOR_ALL,)}[name]
    doc, _ = export(folder(tmp_path / "config", *documents), capsys=capsys)
    validator.validate(doc)


# --- round trips -----------------------------------------------------------------------------------------------


def test_config_round_trips_through_openapi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Folder -> export -> import: the same routes, authorizers, auth, API keys, integration and options; and the
    import exports to the very same document."""
    config = folder(tmp_path / "config", SECRETS, UPSTREAM, SHOP)
    original = load(config)
    doc, _ = export(config, capsys=capsys)
    back = reimport(doc, tmp_path / "back", "--secret-ref", "aws")
    capsys.readouterr()
    assert semantics(back, only_vs(back)) == semantics(original, only_vs(original))
    # Only the Upstream differs: import's own, named after the VirtualService.
    assert [u.name for u in back.upstreams] == ["shop-lambdas"]
    again, _ = export(tmp_path / "back", capsys=capsys)
    assert again == doc


CORS_FOR_ALL = """
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: aws, namespace: web}
spec:
  region: eu-west-1
  options:
    cors: {allow_origins: ["https://app.example.com"], allow_methods: [GET, POST], max_age: 600, allow_credentials: true}
  functions: [{name: a, spec: {function_name: "arn:aws:lambda:eu-west-1:123456789012:function:a"}}]
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: cors, namespace: web}
spec:
  routes:
  - matcher: {path: /a}
    destination: {upstream: aws, function: a}
  - matcher: {path: /b, methods: [GET]}
    destination: {upstream: aws, function: a}
"""


def test_cors_is_the_documents_or_the_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = folder(tmp_path / "same", CORS_FOR_ALL)
    doc, _ = export(config, "--virtual-service", "web/cors", capsys=capsys)
    # Every route has the same policy (the Upstream's default): HTTP APIs' one CORS configuration.
    assert doc["x-amazon-apigateway-cors"] == {
        "allowOrigins": ["https://app.example.com"],
        "allowMethods": ["GET", "POST"],
        "maxAge": 600,
        "allowCredentials": True,
    }
    assert all("x-lambdagate-options" not in op for _, _, op in operations(doc))
    back = reimport(doc, tmp_path / "same-back")
    assert semantics(back, only_vs(back)) == semantics(load(config), only_vs(load(config)))
    assert only_vs(back).namespace == "web"

    # One route with a policy of its own: no common policy, so each route says its own.
    differs = CORS_FOR_ALL + "    options: {cors: {allow_origins: ['*']}}\n"
    config = folder(tmp_path / "differs", differs)
    doc, _ = export(config, capsys=capsys)
    assert "x-amazon-apigateway-cors" not in doc
    cors = [op["x-lambdagate-options"]["cors"]["allow_origins"] for _, _, op in operations(doc)]
    assert cors == [["https://app.example.com"], ["*"]]
    back = reimport(doc, tmp_path / "differs-back")
    assert semantics(back, only_vs(back)) == semantics(load(config), only_vs(load(config)))


CLASHES = """
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: aws}
spec:
  region: us-east-1
  functions:
  - {name: a, spec: {function_name: "arn:aws:lambda:us-east-1:123456789012:function:a"}}
  - {name: b, spec: {function_name: "arn:aws:lambda:us-east-1:123456789012:function:b"}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: clashes}
spec:
  auth: {authorizer: none}
  routes:
  - matcher: {path: "/api/{proxy+}", methods: [GET]}
    destination: {upstream: aws, function: a}
  - matcher: {prefix: /api, methods: [GET, POST]}
    destination: {upstream: aws, function: b}
  - matcher: {path: "/api/{rest+}", methods: [GET]}
    destination: {upstream: aws, function: b}
  - matcher: {path: /b}
    destination: {upstream: aws, function: b}
    auth: {api_key_required: false}
"""


def test_routes_openapi_cannot_hold_round_trip_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prefix whose greedy path is another route's, a shadowed route, auth that says what is the default anyway:
    extensions keep them, in the routes' order (API Gateway would put the most specific first)."""
    config = folder(tmp_path / "config", CLASHES)
    doc, err = export(config, capsys=capsys)
    assert list(doc["paths"]) == ["/api/{proxy+}", "/b"]
    # A route's operations stay together: the prefix route's GET has no place, so its POST goes along.
    assert list(doc["paths"]["/api/{proxy+}"]) == ["parameters", "get"]
    assert [k for k in doc["x-lambdagate-paths"][0] if k in ("get", "post")] == ["get", "post"]
    assert [{k: v for k, v in e.items() if k in ("path", "prefix")} for e in doc["x-lambdagate-paths"]] == [
        {"prefix": "/api"},
        {"path": "/api/{rest+}"},
    ]
    assert "spec.routes[1]: /api/{proxy+}: its get operation is route 0's" in err
    assert doc["x-lambdagate-auth"] == {"authorizer": "none"}
    assert doc["paths"]["/b"]["x-amazon-apigateway-any-method"]["x-lambdagate-auth"] == {
        "api_key_required": False
    }
    back = reimport(doc, tmp_path / "back")
    original = load(config)
    assert semantics(back, only_vs(back)) == semantics(original, only_vs(original))
    assert only_vs(back).routes == tuple(
        replace(r, destination=replace(r.destination, upstream="clashes-lambdas")) if r.destination else r
        for r in only_vs(original).routes
    )


SECURED = f"""
openapi: 3.0.1
info: {{title: Secured pets, version: "2"}}
security: [{{cognito: [pets/read]}}]
paths:
  /pets/{{petId}}:
    get:
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:pets", payloadFormatVersion: "2.0"}}
    put:
      security: [{{custom: [], keys: []}}]
      x-amazon-apigateway-integration:
        type: aws
        uri: "{INVOKE}/{ARN}:pets/invocations"
        requestTemplates: {{application/json: '{{"id": {{{{ path_params.petId | tojson }}}}}}'}}
        responses:
          default: {{statusCode: "200"}}
          ".*not found.*":
            statusCode: "404"
            responseTemplates: {{application/json: '{{"error": "no such pet"}}'}}
            responseParameters: {{method.response.header.x-reason: "'missing'"}}
  /open:
    get:
      security: []
      x-amazon-apigateway-integration: {{type: mock, responses: {{default: {{statusCode: 204}}}}}}
components:
  securitySchemes:
    cognito:
      type: oauth2
      flows: {{}}
      x-amazon-apigateway-authorizer:
        type: jwt
        identitySource: $request.header.Authorization
        jwtConfiguration: {{issuer: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_pool", audience: [client]}}
    custom:
      type: apiKey
      name: Authorization
      in: header
      x-amazon-apigateway-authtype: custom
      x-amazon-apigateway-authorizer:
        type: request
        authorizerUri: "{INVOKE}/{ARN}:authz/invocations"
        identitySource: method.request.header.Authorization, method.request.querystring.session
        authorizerResultTtlInSeconds: 0
    keys: {{type: apiKey, name: x-api-key, in: header}}
"""


@pytest.mark.parametrize(
    ("name", "spec", "args"),
    [
        ("openapi3", OPENAPI3, []),
        ("swagger2", json.dumps(SWAGGER2), ["--region", "eu-west-1"]),
        ("mocks", MOCKS, []),
        ("cors", CORS_SPEC, []),
        ("secured", SECURED, []),
    ],
)
def test_openapi_round_trips_through_lambdagate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, spec: str, args: list[str]
) -> None:
    """OpenAPI -> import -> export -> import: the second import writes exactly what the first did."""
    first_dir = folder(tmp_path / "first", SECRETS)
    source = tmp_path / f"{name}.yaml"
    source.write_text(textwrap.dedent(spec))
    assert main(["import-openapi", str(source), "-o", str(first_dir / "api.yaml"), *args]) == 0
    # The API keys' Secret, which the import names but cannot write.
    keys = "apiVersion: v1\nkind: Secret\nmetadata: {name: secured-pets-api-keys}\nstringData: {k: v}\n"
    folder(first_dir / "keys", keys)
    first = load(first_dir)
    capsys.readouterr()
    doc, _ = export(first_dir, capsys=capsys)
    folder(tmp_path / "second" / "keys", keys)
    second = reimport(doc, tmp_path / "second")
    assert second.virtual_services == first.virtual_services
    assert second.upstreams == first.upstreams


def test_secured_document_imports_authorizers_and_templates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "secured.yaml"
    source.write_text(textwrap.dedent(SECURED))
    out = tmp_path / "secured-out.yaml"
    assert main(["import-openapi", str(source), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    docs = list(yaml.safe_load_all(out.read_text()))
    vs = docs[1]["spec"]
    assert vs["authorizers"] == {
        "cognito": {
            "type": "jwt",
            "issuer": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_pool",
            "audiences": ["client"],
            "jwks": {
                "uri": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_pool/.well-known/jwks.json"
            },
        },
        "custom": {
            "type": "lambda",
            "upstream": "secured-pets-lambdas",
            "function": "authz",
            "identity_sources": ["header:Authorization", "query:session"],
            "ttl": 0,
        },
    }
    assert vs["auth"] == {"authorizer": "cognito", "scopes": ["pets/read"]}
    assert vs["api_keys"] == {"secret_ref": "secured-pets-api-keys"}
    routes = {(r["matcher"]["path"], r["matcher"]["methods"][0]): r for r in vs["routes"]}
    assert "auth" not in routes[("/pets/{petId}", "GET")]
    assert routes[("/pets/{petId}", "PUT")]["auth"] == {
        "authorizer": "custom",
        "scopes": [],
        "api_key_required": True,
    }
    assert routes[("/pets/{petId}", "PUT")]["integration"] == {
        "request_template": '{"id": {{ path_params.petId | tojson }}}',
        "responses": [
            {"status": 200},
            {
                "status": 404,
                "pattern": ".*not found.*",
                "template": '{"error": "no such pet"}',
                "headers": {"x-reason": "missing"},
            },
        ],
    }
    assert routes[("/open", "GET")]["auth"] == {"authorizer": "none", "scopes": []}
    assert (
        "the keys are fetched from https://cognito-idp.us-east-1.amazonaws.com/us-east-1_pool/.well-known/jwks.json"
        in err
    )
    assert "create that Secret with one entry per key" in err
    assert "routes are open" not in err


# --- secrets ---------------------------------------------------------------------------------------------------

JWKS_WITH_PRIVATE_KEYS = json.dumps(
    {
        "keys": [
            {
                "kty": "RSA",
                "kid": "signing",
                "n": "public-modulus",
                "e": "AQAB",
                "d": PRIVATE_EXPONENT,
                "p": "x1",
            },
            {"kty": "oct", "kid": "shared", "k": SHARED_SECRET},
        ]
    }
)

WITH_SECRETS = f"""
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: vault}}
spec:
  authorizers:
    jwt: {{type: jwt, issuer: "https://issuer.example.com", audiences: [], jwks: {{inline: '{JWKS_WITH_PRIVATE_KEYS}'}}}}
    hs: {{type: jwt, issuer: "https://hs.example.com", audiences: [], jwks: {{inline: '{{"keys": [{{"kty": "oct", "k": "{SHARED_SECRET}"}}]}}'}}}}
  auth: {{authorizer: jwt, api_key_required: true}}
  api_keys: {{secret_ref: keys}}
  routes:
  - matcher: {{path: /vault}}
    destination: {{upstream: aws, function: pets}}
"""


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_no_secret_reaches_the_output(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    config = folder(tmp_path / "config", SECRETS, UPSTREAM, WITH_SECRETS, SHOP)
    out_dir = tmp_path / "out"
    assert main(["export-openapi", "--config-dir", str(config), "--format", fmt, "-o", f"{out_dir}/"]) == 0
    captured = capsys.readouterr()
    texts = [p.read_text() for p in sorted(out_dir.iterdir())]
    assert [p.name for p in sorted(out_dir.iterdir())] == [
        f"default.shop.openapi.{fmt}",
        f"default.vault.openapi.{fmt}",
    ]
    for text in [*texts, captured.out, captured.err]:
        for secret in (ACCESS_KEY, SECRET_KEY, *API_KEYS, PRIVATE_EXPONENT, SHARED_SECRET):
            assert secret not in text
    vault = json.loads(texts[1]) if fmt == "json" else yaml.safe_load(texts[1])
    # The public key stays: the export still verifies tokens once imported.
    jwks = json.loads(
        vault["components"]["securitySchemes"]["jwt"]["x-lambdagate-authorizer"]["jwks"]["inline"]
    )
    assert jwks == {"keys": [{"kty": "RSA", "kid": "signing", "n": "public-modulus", "e": "AQAB"}]}
    assert "jwks" not in vault["components"]["securitySchemes"]["hs"]["x-lambdagate-authorizer"]
    assert "authorizer jwt: private and shared-secret keys of its inline JWKS are left out" in captured.err
    assert "authorizer hs: its inline JWKS holds only secret keys, which are never exported" in captured.err
    assert (
        f"wrote {out_dir}/default.vault.openapi.{fmt}: VirtualService default/vault (1 route)" in captured.err
    )


# --- the command -----------------------------------------------------------------------------------------------


def test_several_virtual_services_need_a_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = folder(tmp_path / "config", SECRETS, UPSTREAM, SHOP, CORS_FOR_ALL)
    assert main(["export-openapi", "--config-dir", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 VirtualServices (default/shop, web/cors): pick one with --virtual-service" in err
    assert (
        main(["export-openapi", "--config-dir", str(config), "--virtual-service", "shop", "--format", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["info"]["title"] == "shop"
    assert main(["export-openapi", "--config-dir", str(config), "--virtual-service", "web/nope"]) == 2
    assert "no VirtualService web/nope (there are: default/shop, web/cors)" in capsys.readouterr().err
    out = tmp_path / "one.yaml"
    assert (
        main(
            ["export-openapi", "--config-dir", str(config), "--virtual-service", "web/cors", "-o", "one.yaml"]
        )
        == 0
    )
    assert out.read_text().startswith(
        "# Generated by `lambdagate export-openapi` from VirtualService web/cors.\n"
    )
    assert "wrote one.yaml: VirtualService web/cors (2 routes)" in capsys.readouterr().err


def test_a_broken_folder_is_not_exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = SHOP.replace("function: hello}", "function: missing}")
    config = folder(tmp_path / "config", SECRETS, UPSTREAM, broken)
    out = tmp_path / "shop.yaml"
    assert main(["export-openapi", "--config-dir", str(config), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "has no function 'missing'" in err and "fix them first" in err
    assert not out.exists()
    assert main(["export-openapi", "--config-dir", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["export-openapi", "--config-dir", str(folder(tmp_path / "empty"))]) == 2
    assert "no VirtualService to export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export-openapi", "--config-dir", str(config), "--account-id", "12345"])

"""`lambdagate import-openapi` through the real CLI entry: what each OpenAPI/Swagger construct becomes, that the
output parses and resolves exactly as the control plane reads it, and that bad input is one line and exit 2."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.cli import main
from controlplane.model import Route, Secret, Upstream, VirtualService, parse_document, resolve
from controlplane.model.parse import LOGICAL_NAME_RE
from controlplane.model.resources import NO_AUTHORIZER, CorsPolicy, Endpoint, MockResponse, RouteAuth

ARN = "arn:aws:lambda:us-east-1:123456789012:function"


def invoke_uri(function_arn: str, region: str = "us-east-1") -> str:
    return f"arn:aws:apigateway:{region}:lambda:path/2015-03-31/functions/{function_arn}/invocations"


OPENAPI3 = f"""
openapi: 3.0.1
info: {{title: Swagger Petstore, version: "1.0"}}
servers:
- url: https://api.example.com/v1
paths:
  /pets:
    get:
      operationId: listPets
      x-amazon-apigateway-integration:
        type: aws_proxy
        httpMethod: POST
        uri: {invoke_uri(ARN + ":list-pets")}
        payloadFormatVersion: "2.0"
    post:
      x-amazon-apigateway-integration:
        type: AWS_PROXY
        httpMethod: POST
        uri: {invoke_uri(ARN + ":create-pet:live")}
        payloadFormatVersion: "1.0"
        timeoutInMillis: 5000
  /pets/{{petId}}:
    get:
      x-amazon-apigateway-integration:
        type: aws_proxy
        uri: {invoke_uri(ARN + ":get-pet:3")}
        payloadFormatVersion: 2.0
    delete:
      x-amazon-apigateway-integration:
        type: aws_proxy
        uri: {ARN}:get-pet:3
"""

SWAGGER2 = {
    "swagger": "2.0",
    "info": {"title": "Shop", "version": "1"},
    "basePath": "/prod",
    "paths": {
        "/orders": {"get": {"operationId": "listOrders"}, "post": {"operationId": "createOrder"}},
        "/orders/{orderId}": {
            "parameters": [{"name": "orderId", "in": "path", "required": True, "type": "string"}],
            "get": {"operationId": "getOrder"},
        },
    },
}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in the test's folder, so that messages name `spec.yaml` as a user would type it."""
    monkeypatch.chdir(tmp_path)


def run(tmp_path: Path, spec: str | dict[str, Any], *args: str, name: str = "spec.yaml") -> tuple[int, Path]:
    """Write spec (text, or a mapping written as JSON, which is YAML too) and import it with the real CLI."""
    (tmp_path / name).write_text(json.dumps(spec) if isinstance(spec, dict) else textwrap.dedent(spec))
    out = tmp_path / "out.yaml"
    return main(["import-openapi", name, "-o", str(out), *args]), out


def load(out: Path) -> tuple[Upstream, VirtualService, list[dict[str, Any]]]:
    """Parse and resolve the output as the control plane does (with the Secret the user would add)."""
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["Upstream", "VirtualService"]
    up, vs = (parse_document(d) for d in docs)
    assert isinstance(up, Upstream) and isinstance(vs, VirtualService)
    check_resolves(up, vs)
    return up, vs, docs


def load_mocks_only(out: Path) -> tuple[VirtualService, dict[str, Any]]:
    """The output of a document whose every operation is a mock: a VirtualService alone, which resolves."""
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["VirtualService"]
    vs = parse_document(docs[0])
    assert isinstance(vs, VirtualService)
    check_resolves(None, vs)
    return vs, docs[0]


def check_resolves(up: Upstream | None, vs: VirtualService) -> None:
    objects: list[Secret | Upstream | VirtualService] = [vs] if up is None else [up, vs]
    if up is not None and up.secret_ref:
        meta = {"name": up.secret_ref, "namespace": up.namespace}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta}
        secret["stringData"] = {"access_key": "AKID", "secret_key": "s"}
        parsed = parse_document(secret)
        assert isinstance(parsed, Secret)
        objects.append(parsed)
    resolved = resolve(objects, local_endpoint=Endpoint("http", "127.0.0.1", 9001))
    assert resolved.errors == {}
    assert resolved.config.virtual_services == (vs,)
    for fn in up.functions if up is not None else ():
        assert LOGICAL_NAME_RE.fullmatch(fn.name)


def function_of(route: Route) -> str:
    assert route.destination is not None and route.mock is None
    return route.destination.function


def routes_of(vs: VirtualService) -> list[tuple[str, str, tuple[str, ...], str]]:
    return [(r.matcher.kind, r.matcher.value, r.matcher.methods, function_of(r)) for r in vs.routes]


def test_openapi3_integrations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(tmp_path, OPENAPI3)
    assert rc == 0, capsys.readouterr().err
    up, vs, docs = load(out)
    assert (up.name, vs.name) == ("swagger-petstore-lambdas", "swagger-petstore")
    assert up.region == "us-east-1" and up.endpoint is None and up.secret_ref is None
    # One entry per distinct function (the ARN and the invocation URI of get-pet:3 are the same function).
    assert [(f.name, f.function_name, f.qualifier) for f in up.functions] == [
        ("list-pets", f"{ARN}:list-pets", None),
        ("create-pet:live", f"{ARN}:create-pet", "live"),
        ("get-pet:3", f"{ARN}:get-pet", "3"),
    ]
    assert docs[0]["spec"]["functions"][1] == {
        "name": "create-pet:live",
        "spec": {"function_name": f"{ARN}:create-pet", "qualifier": "live"},
    }
    # servers[0].url's path is the base path; the integration wins over operationId.
    assert routes_of(vs) == [
        ("path", "/v1/pets", ("GET",), "list-pets"),
        ("path", "/v1/pets", ("POST",), "create-pet:live"),
        ("path", "/v1/pets/{petId}", ("GET",), "get-pet:3"),
        ("path", "/v1/pets/{petId}", ("DELETE",), "get-pet:3"),
    ]
    options = [(r.options.payload_format, r.options.timeout_s) for r in vs.routes]
    assert options == [("apigateway-v2", None), (None, 5.0), ("apigateway-v2", None), (None, None)]
    # payloadFormatVersion 1.0 is the default and is not written.
    assert docs[1]["spec"]["routes"][1]["options"] == {"timeout": "5000ms"}
    assert "options" not in docs[1]["spec"]["routes"][3]
    assert vs.routes[2].matcher.params == ("petId",)
    assert capsys.readouterr().err.startswith("wrote ")


def test_swagger2_base_path_and_operation_ids(tmp_path: Path) -> None:
    rc, out = run(
        tmp_path,
        SWAGGER2,
        "--region",
        "eu-west-1",
        "--endpoint",
        "local",
        "--secret-ref",
        "aws",
        "--namespace",
        "shop",
        "--name",
        "orders",
        "--domain",
        "shop.example.com",
        name="swagger.json",
    )
    assert rc == 0
    up, vs, _ = load(out)
    assert (up.name, up.namespace, vs.name, vs.namespace) == ("orders-lambdas", "shop", "orders", "shop")
    assert up.region == "eu-west-1" and up.endpoint == "local" and up.secret_ref == "aws"
    assert vs.domains == ("shop.example.com",)
    assert [(f.name, f.function_name, f.qualifier) for f in up.functions] == [
        ("listOrders", "listOrders", None),
        ("createOrder", "createOrder", None),
        ("getOrder", "getOrder", None),
    ]
    assert routes_of(vs) == [
        ("path", "/prod/orders", ("GET",), "listOrders"),
        ("path", "/prod/orders", ("POST",), "createOrder"),
        ("path", "/prod/orders/{orderId}", ("GET",), "getOrder"),
    ]


@pytest.mark.parametrize(
    ("flag", "prefix"), [("/", ""), ("", ""), ("/api/v2/", "/api/v2"), ("beta", "/beta")]
)
def test_base_path_override(tmp_path: Path, flag: str, prefix: str) -> None:
    rc, out = run(tmp_path, SWAGGER2, "--region", "us-east-1", "--base-path", flag)
    assert rc == 0
    _, vs, _ = load(out)
    assert [r.matcher.value for r in vs.routes][0] == prefix + "/orders"


def test_openapi3_base_path_server_variable(tmp_path: Path) -> None:
    spec = """
    openapi: 3.0.0
    servers:
    - url: "https://{host}/{basePath}"
      variables: {host: {default: api.example.com}, basePath: {default: stage}}
    - url: https://other.example.com/ignored
    paths:
      /:
        get: {operationId: root}
    """
    rc, out = run(tmp_path, spec, "--region", "us-east-1")
    assert rc == 0
    _, vs, _ = load(out)
    assert routes_of(vs) == [("path", "/stage", ("GET",), "root")]
    spec2 = """
    openapi: "3.1.0"
    servers: [{url: "/{version}/", variables: {version: {default: v3}}}]
    paths: {/a: {get: {operationId: a}}}
    """
    rc, out = run(tmp_path, spec2, "--region", "us-east-1")
    assert rc == 0
    assert routes_of(load(out)[1]) == [("path", "/v3/a", ("GET",), "a")]


def test_greedy_path_and_any_method(tmp_path: Path) -> None:
    spec = f"""
    openapi: 3.0.0
    paths:
      /files/{{proxy+}}:
        x-amazon-apigateway-any-method:
          x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:files"}}
        get: {{operationId: readFile}}
      /{{proxy+}}:
        x-amazon-apigateway-any-method: {{operationId: everything}}
    """
    rc, out = run(tmp_path, spec)
    assert rc == 0
    up, vs, docs = load(out)
    # A method's own route comes before the any-method route of the same path; no methods means any.
    assert routes_of(vs) == [
        ("path", "/files/{proxy+}", ("GET",), "readFile"),
        ("path", "/files/{proxy+}", (), "files"),
        ("path", "/{proxy+}", (), "everything"),
    ]
    assert "methods" not in docs[1]["spec"]["routes"][1]["matcher"]
    regex = vs.routes[1].matcher.template_regex
    assert regex is not None
    m = re.fullmatch(regex, "/files/a/b.txt")
    assert m is not None and m.group("proxy") == "a/b.txt"
    assert up.region == "us-east-1"


def test_literal_paths_go_before_templates_that_would_shadow_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = """
    openapi: 3.0.0
    paths:
      /pets/{proxy+}: {get: {operationId: anything}}
      /pets/{id}: {get: {operationId: getPet}, head: {operationId: headPet}}
      /users: {get: {operationId: users}}
      /pets/mine: {get: {operationId: myPets}}
      /pets/{id}/toys: {get: {operationId: toys}}
      /pets: {get: {operationId: listPets}}
      $default: {x-amazon-apigateway-any-method: {operationId: fallback}}
    """
    rc, out = run(tmp_path, spec, "--region", "us-east-1")
    assert rc == 0
    _, vs, _ = load(out)
    # Envoy takes the first match: more specific paths that overlap go first, the rest keeps document order;
    # HEAD before GET (a GET route also takes HEAD); HTTP APIs' $default is a prefix route, last.
    assert routes_of(vs) == [
        ("path", "/pets/mine", ("GET",), "myPets"),
        ("path", "/pets/{id}", ("HEAD",), "headPet"),
        ("path", "/pets/{id}", ("GET",), "getPet"),
        ("path", "/pets/{id}/toys", ("GET",), "toys"),
        ("path", "/pets/{proxy+}", ("GET",), "anything"),
        ("path", "/users", ("GET",), "users"),
        ("path", "/pets", ("GET",), "listPets"),
        ("prefix", "/", (), "fallback"),
    ]
    err = capsys.readouterr().err
    assert "note: " in err and "paths./pets/mine goes before paths./pets/{proxy+}" in err


def test_translate_routes_mine_to_the_literal(tmp_path: Path) -> None:
    """The order holds in what Envoy gets: the literal route is the first to match /pets/mine."""
    from controlplane.translate.envoy import TranslateOptions, translate

    spec = """
    openapi: 3.0.0
    paths:
      /pets/{id}: {get: {operationId: getPet}}
      /pets/mine: {get: {operationId: myPets}}
    """
    rc, out = run(tmp_path, spec, "--region", "us-east-1", "--endpoint", "http://127.0.0.1:9001")
    assert rc == 0
    up, vs, _ = load(out)
    config = resolve([up, vs]).config
    t = translate(config, TranslateOptions(extproc_port=1))
    routes = t.routes[0].virtual_hosts[0].routes
    assert routes[0].match.path == "/pets/mine"
    assert routes[1].match.safe_regex.regex == "^/pets/(?P<id>[^/]+)$"
    assert t.route_table[routes[0].name].function == "myPets"


def test_logical_names_are_valid_and_deduplicated(tmp_path: Path) -> None:
    spec = f"""
    openapi: 3.0.0
    paths:
      /a: {{get: {{x-amazon-apigateway-integration: {{uri: "{ARN}:hello"}}}}}}
      /b: {{get: {{x-amazon-apigateway-integration: {{uri: "arn:aws:lambda:us-east-1:210987654321:function:hello"}}}}}}
      /c: {{get: {{operationId: hello}}}}
      /d: {{get: {{x-amazon-apigateway-integration: {{uri: "{ARN}:hello:$LATEST"}}}}}}
      /e: {{get: {{operationId: _private_}}}}
    """
    rc, out = run(tmp_path, spec)
    assert rc == 0
    up, vs, _ = load(out)
    assert [(f.name, f.function_name) for f in up.functions] == [
        ("hello", f"{ARN}:hello"),
        ("hello-2", "arn:aws:lambda:us-east-1:210987654321:function:hello"),
        ("hello-3", "hello"),
        ("private", "_private_"),
    ]
    # hello:$LATEST is the unqualified function.
    assert [function_of(r) for r in vs.routes] == ["hello", "hello-2", "hello-3", "hello", "private"]


def test_stage_variables_resolved_with_the_flag(tmp_path: Path) -> None:
    spec = f"""
    openapi: 3.0.0
    paths:
      /a:
        get:
          x-amazon-apigateway-integration:
            type: aws_proxy
            uri: {invoke_uri(ARN + ":${stageVariables.fn}:${stageVariables.alias}")}
    """
    rc, out = run(tmp_path, spec, "--stage-variable", "fn=hello", "--stage-variable", "alias=live")
    assert rc == 0
    up, vs, _ = load(out)
    assert (up.functions[0].function_name, up.functions[0].qualifier) == (f"{ARN}:hello", "live")
    assert vs.stage_variables == (("alias", "live"), ("fn", "hello"))


def test_skipped_operations_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = """
    openapi: 3.0.0
    security: [{cognito: []}]
    paths:
      /pets:
        get: {operationId: listPets}
        post: {summary: no function named}
        put:
          x-amazon-apigateway-integration: {type: http_proxy, uri: "https://example.com/pets"}
    """
    rc, out = run(tmp_path, spec, "--region", "us-east-1", "--skip-unnamed", "--skip-unsupported")
    assert rc == 0
    _, vs, _ = load(out)
    assert routes_of(vs) == [("path", "/pets", ("GET",), "listPets")]
    err = capsys.readouterr().err
    assert "warning: spec.yaml: paths./pets.post: skipped: names no function" in err
    assert (
        "warning: spec.yaml: paths./pets.put: skipped: an http_proxy integration does not invoke Lambda"
        in err
    )
    assert "1 operation requires authorization" in err and "routes are open" in err


def test_output_is_deterministic_and_goes_to_stdout_without_o(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "pets.yaml"
    spec.write_text(textwrap.dedent(OPENAPI3))
    assert main(["import-openapi", str(spec)]) == 0
    first = capsys.readouterr().out
    assert main(["import-openapi", str(spec)]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("# Generated by `lambdagate import-openapi` from pets.yaml (OpenAPI 3.0.1)")
    assert [d["kind"] for d in yaml.safe_load_all(first)] == ["Upstream", "VirtualService"]


MOCKS = f"""
openapi: 3.0.1
info: {{title: Shop, version: "1"}}
servers: [{{url: "https://shop.example.com/v1"}}]
paths:
  /orders:
    get:
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:orders"}}
    options:
      x-amazon-apigateway-integration:
        type: mock
        requestTemplates: {{application/json: '{{"statusCode": 200}}'}}
        responses:
          default:
            statusCode: "204"
            responseParameters:
              method.response.header.Access-Control-Allow-Origin: "'https://app.example.com'"
              method.response.header.Access-Control-Allow-Methods: "'GET,OPTIONS'"
              method.response.header.X-Request-Id: context.requestId
              method.response.header.X-Upstream: integration.response.header.X-Upstream
  /health:
    get:
      x-amazon-apigateway-integration:
        type: MOCK
        responses:
          "200":
            statusCode: 200
            responseTemplates:
              text/plain: plain
              application/json: '{{"status": "ok"}}'
  /teapot:
    get:
      x-amazon-apigateway-integration:
        type: mock
        requestTemplates: {{application/json: '{{"statusCode": 418}}'}}
        responses:
          default: {{statusCode: "200"}}
          "4\\\\d{{2}}":
            statusCode: "418"
            responseTemplates:
              text/plain: "#set($tea = 'earl grey')I am a teapot: $tea"
  /empty:
    delete:
      x-amazon-apigateway-integration: {{type: mock}}
"""


def test_mock_integrations_become_mock_routes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(tmp_path, MOCKS)
    err = capsys.readouterr().err
    assert rc == 0, err
    up, vs, docs = load(out)
    # Mock routes need no function: the Upstream holds the Lambda integration's only.
    assert [(f.name, f.function_name) for f in up.functions] == [("orders", f"{ARN}:orders")]
    assert function_of(vs.routes[0]) == "orders"
    mocks = [(r.matcher.value, r.matcher.methods, r.destination, r.mock) for r in vs.routes[1:]]
    assert mocks == [
        # responses.default: its statusCode, and the quoted literals of responseParameters as headers.
        (
            "/v1/orders",
            ("OPTIONS",),
            None,
            MockResponse(
                204,
                (
                    ("access-control-allow-origin", "https://app.example.com"),
                    ("access-control-allow-methods", "GET,OPTIONS"),
                ),
                "",
            ),
        ),
        # The only response; the application/json template wins over the first one, and sets content-type.
        (
            "/v1/health",
            ("GET",),
            None,
            MockResponse(200, (("content-type", "application/json"),), '{"status": "ok"}'),
        ),
        # The response whose selection pattern matches the request template's statusCode, not default; a
        # Velocity template is answered as written.
        (
            "/v1/teapot",
            ("GET",),
            None,
            MockResponse(
                418, (("content-type", "text/plain"),), "#set($tea = 'earl grey')I am a teapot: $tea"
            ),
        ),
        # No responses at all: an empty 200.
        ("/v1/empty", ("DELETE",), None, MockResponse(200, (), "")),
    ]
    assert docs[1]["spec"]["routes"][1] == {
        "matcher": {"path": "/v1/orders", "methods": ["OPTIONS"]},
        "mock": {
            "status": 204,
            "headers": {
                "Access-Control-Allow-Origin": "https://app.example.com",
                "Access-Control-Allow-Methods": "GET,OPTIONS",
            },
        },
    }
    assert docs[1]["spec"]["routes"][4] == {
        "matcher": {"path": "/v1/empty", "methods": ["DELETE"]},
        "mock": {"status": 200},
    }
    responses = "paths./orders.options.x-amazon-apigateway-integration.responses.default.responseParameters."
    assert (
        f"warning: spec.yaml: {responses}method.response.header.X-Request-Id: 'context.requestId' is not a "
        "quoted literal" in err
    )
    assert f"warning: spec.yaml: {responses}method.response.header.X-Upstream: " in err
    assert (
        "warning: spec.yaml: paths./teapot.get.x-amazon-apigateway-integration.responses.4\\d{2}."
        "responseTemplates.text/plain: a Velocity template ($ references or # directives); lambdagate does not "
        "evaluate templates" in err
    )
    # A plain JSON template is no template to warn about; nothing says mocks are skipped any more.
    assert "/health" not in err and "skipped" not in err
    assert err.count("warning: ") == 3, err


@pytest.mark.parametrize(
    ("template", "evaluated"),
    [
        ('{"price": "$5", "color": "#fff", "tag": "#1"}', False),
        ("costs 5$ # more or less", False),
        ('{"id": "$context.requestId"}', True),
        ('{"id": "${context.requestId}"}', True),
        ("$!input.body", True),
        ("#if($x)yes#{else}no#end", True),
        ("## a comment", True),
        ("#* a comment *#", True),
    ],
)
def test_velocity_templates_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, evaluated: bool
) -> None:
    response = {"default": {"responseTemplates": {"application/json": template}}}
    rc, out = run(tmp_path, spec3("/a", "get", mock(responses=response)))
    err = capsys.readouterr().err
    assert rc == 0, err
    vs, _ = load_mocks_only(out)
    assert vs.routes[0].mock == MockResponse(200, (("content-type", "application/json"),), template)
    assert ("a Velocity template" in err) is evaluated, err


def test_only_mocks_write_a_virtual_service_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No function is needed, so no Upstream (nor a region) is: the VirtualService alone loads and translates."""
    from controlplane.translate.envoy import TranslateOptions, translate

    spec = """
    openapi: 3.0.0
    info: {title: Status page}
    paths:
      /status:
        get:
          x-amazon-apigateway-integration:
            type: mock
            responses:
              default:
                statusCode: 503
                responseParameters: {method.response.header.Retry-After: "'120'"}
                responseTemplates: {application/json: '{"status": "maintenance"}'}
    """
    rc, out = run(tmp_path, spec)
    err = capsys.readouterr().err
    assert rc == 0, err
    vs, doc = load_mocks_only(out)
    assert vs.name == "status-page"
    assert doc["spec"]["routes"] == [
        {
            "matcher": {"path": "/status", "methods": ["GET"]},
            "mock": {
                "status": 503,
                "headers": {"Retry-After": "120", "content-type": "application/json"},
                "body": '{"status": "maintenance"}',
            },
        }
    ]
    assert "VirtualService status-page (1 route, all mocks; no Upstream)" in err
    assert out.read_text().startswith(
        "# Generated by `lambdagate import-openapi` from spec.yaml (OpenAPI 3.0.0): 0 functions, 1 route.\n"
    )
    t = translate(resolve([vs]).config, TranslateOptions(extproc_port=1))
    routes = [r for r in t.routes[0].virtual_hosts[0].routes if r.HasField("direct_response")]
    assert [(r.direct_response.status, r.direct_response.body.inline_string) for r in routes] == [
        (503, '{"status": "maintenance"}')
    ]

    # Upstream options have nothing to apply to: a warning says so, and still no Upstream.
    rc, out = run(tmp_path, spec, "--region", "us-east-1", "--secret-ref", "aws")
    assert rc == 0
    load_mocks_only(out)
    assert (
        "warning: spec.yaml: --region, --secret-ref: not used: every route is a mock, so no Upstream is written"
        in capsys.readouterr().err
    )


CORS_SPEC = f"""
openapi: 3.0.1
info: {{title: Pets}}
x-amazon-apigateway-cors:
  allowOrigins: [https://app.example.com, "http://localhost:3000"]
  allowMethods: [GET, post]
  allowHeaders: [content-type, x-api-key]
  exposeHeaders: [x-request-id]
  maxAge: 600
  allowCredentials: true
paths:
  /pets:
    get:
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:pets", payloadFormatVersion: "2.0"}}
  /ping:
    get:
      x-amazon-apigateway-integration: {{type: mock, responses: {{default: {{statusCode: 200}}}}}}
"""


def test_cors_becomes_every_routes_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(tmp_path, CORS_SPEC)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning" not in err
    _, vs, docs = load(out)
    expected = CorsPolicy(
        ("https://app.example.com", "http://localhost:3000"),
        ("GET", "POST"),
        ("content-type", "x-api-key"),
        ("x-request-id",),
        600,
        True,
    )
    # Lambda and mock routes alike, beside the route's own options.
    assert [r.options.cors for r in vs.routes] == [expected, expected]
    assert vs.routes[0].options.payload_format == "apigateway-v2"
    assert vs.routes[1].mock == MockResponse(200)
    assert docs[1]["spec"]["routes"][0]["options"] == {
        "payload_format": "apigateway-v2",
        "cors": {
            "allow_origins": ["https://app.example.com", "http://localhost:3000"],
            "allow_methods": ["GET", "post"],
            "allow_headers": ["content-type", "x-api-key"],
            "expose_headers": ["x-request-id"],
            "max_age": 600,
            "allow_credentials": True,
        },
    }
    # Each route has its own copy: no YAML anchors or aliases in the file.
    text = out.read_text()
    assert "&id" not in text and "*id" not in text


def test_cors_setting_names_any_case_and_ignored_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec3(
        "/a",
        "get",
        {"operationId": "a"},
        **{"x-amazon-apigateway-cors": {"AllowOrigins": ["*"], "maxAge": -1, "allowPrivateNetwork": True}},
    )
    rc, out = run(tmp_path, spec, "--region", "us-east-1")
    err = capsys.readouterr().err
    assert rc == 0, err
    _, vs, _ = load(out)
    assert vs.routes[0].options.cors == CorsPolicy(("*",))
    assert (
        "warning: spec.yaml: x-amazon-apigateway-cors.maxAge: -1 is not written: browsers then use their "
        "default (5 seconds)" in err
    )
    assert "warning: spec.yaml: x-amazon-apigateway-cors.allowPrivateNetwork: not a CORS setting" in err


PET = "paths: {/pets: {get: {operationId: listPets}}}"


def spec3(path: str, method: str, operation: Any, **top: Any) -> dict[str, Any]:
    return {"openapi": "3.0.0", **top, "paths": {path: {method: operation}}}


def integration(**fields: Any) -> dict[str, Any]:
    return {"x-amazon-apigateway-integration": fields}


def mock(**fields: Any) -> dict[str, Any]:
    return integration(type="mock", **fields)


def cors(**fields: Any) -> dict[str, Any]:
    return {"x-amazon-apigateway-cors": fields}


MOCK = "spec.yaml: paths./a.get.x-amazon-apigateway-integration.responses"
TWO_REGIONS = {
    "openapi": "3.0.0",
    "paths": {
        "/a": {"get": integration(uri=f"{ARN}:f")},
        "/b": {"get": integration(uri="arn:aws:lambda:eu-west-1:123456789012:function:g")},
    },
}
IN_US_EAST_1 = spec3("/a", "get", integration(uri=f"{ARN}:f"))
URI = "spec.yaml: paths./a.get.x-amazon-apigateway-integration.uri"


@pytest.mark.parametrize(
    ("spec", "args", "expected"),
    [
        ("- a\n- b\n", [], "spec.yaml: the document must be a mapping (an OpenAPI object), got a list"),
        ("openapi: 3.0.0\ninfo: {title: x}\n", [], "spec.yaml: paths: missing"),
        ("openapi: 3.0.0\npaths: [a]\n", [], "spec.yaml: paths: must be a mapping"),
        (f"swagger: '1.2'\n{PET}\n", [], "spec.yaml: swagger: unsupported version '1.2'"),
        (f"openapi: 2.0.0\n{PET}\n", [], "spec.yaml: openapi: unsupported version '2.0.0'"),
        (f"info: {{title: x}}\n{PET}\n", [], "spec.yaml: not an OpenAPI document"),
        ("openapi: 3.0.0\npaths: [\n", [], "spec.yaml: line 3, column 1: invalid YAML"),
        (
            spec3("/pets/{pet-id}", "get", {"operationId": "getPet"}),
            ["--region", "us-east-1"],
            "spec.yaml: paths./pets/{pet-id}.get: bad path template '/pets/{pet-id}'",
        ),
        (spec3("pets", "get", {"operationId": "x"}), [], "spec.yaml: paths.pets: a path must start with '/'"),
        (spec3("/pets", "get", []), [], "spec.yaml: paths./pets.get: an operation must be a mapping"),
        (
            spec3("/pets", "get", {"summary": "x"}),
            ["--region", "us-east-1"],
            "spec.yaml: paths./pets.get: names no function",
        ),
        (
            spec3("/pets", "get", {"summary": "x"}),
            ["--region", "us-east-1", "--skip-unnamed"],
            "spec.yaml: paths: no operation to import",
        ),
        (
            spec3("/pets", "get", {"operationId": "list pets"}),
            ["--region", "us-east-1"],
            "spec.yaml: paths./pets.get.operationId: 'list pets' cannot name a Lambda function",
        ),
        (f"openapi: 3.0.0\n{PET}\n", [], "spec.yaml: --region: no function ARN says which AWS region"),
        (
            spec3("/a", "get", integration(uri=invoke_uri(ARN + ":f:${stageVariables.alias}"))),
            [],
            URI + ": uses ${stageVariables.alias}, which API Gateway resolves per stage",
        ),
        (
            spec3(
                "/a", "get", integration(uri={"Fn::Sub": "arn:aws:apigateway:${AWS::Region}:lambda:path/x"})
            ),
            [],
            URI + ": is a CloudFormation expression (Fn::Sub)",
        ),
        (
            spec3("/a", "get", integration(uri=invoke_uri(ARN + ":${MyFunction}"))),
            [],
            URI + ": holds ${MyFunction}, which lambdagate cannot resolve",
        ),
        (
            spec3("/a", "get", integration(uri=invoke_uri("hello"))),
            [],
            URI
            + ": 'arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/hello/invocations' is not a",
        ),
        (spec3("/a", "get", integration(type="aws_proxy")), [], URI + ": missing"),
        (
            spec3("/a", "get", integration(type="http_proxy", uri="https://example.com")),
            [],
            "spec.yaml: paths./a.get: an http_proxy integration does not invoke Lambda",
        ),
        (
            spec3("/a", "get", integration(type="aws_proxy", uri="arn:aws:apigateway:us-east-1:sqs:path/q")),
            [],
            "spec.yaml: paths./a.get: the integration uri 'arn:aws:apigateway:us-east-1:sqs:path/q' does not",
        ),
        (
            spec3("/a", "get", integration(type="aws", uri=invoke_uri(ARN + ":f"))),
            [],
            "spec.yaml: paths./a.get: a non-proxy Lambda integration (type aws) needs mapping templates",
        ),
        (
            spec3("/a", "get", integration(type="lambda", uri=f"{ARN}:f")),
            [],
            "spec.yaml: paths./a.get.x-amazon-apigateway-integration.type: unknown integration type 'lambda'",
        ),
        (
            spec3("/a", "get", integration(uri=f"{ARN}:f", payloadFormatVersion="3.0")),
            [],
            "spec.yaml: paths./a.get.x-amazon-apigateway-integration.payloadFormatVersion: must be 1.0 or 2.0",
        ),
        (
            spec3("/a", "get", integration(uri=f"{ARN}:f", timeoutInMillis=0)),
            [],
            "spec.yaml: paths./a.get.x-amazon-apigateway-integration.timeoutInMillis: must be 1 to 900000",
        ),
        (
            spec3("/a", "get", {"x-amazon-apigateway-integration": {"$ref": "#/components/nothing"}}),
            [],
            "spec.yaml: paths./a.get.x-amazon-apigateway-integration.$ref: '#/components/nothing' points at",
        ),
        (
            {"openapi": "3.0.0", "paths": {"/a": {"$ref": "other.yaml#/a"}}},
            [],
            "spec.yaml: paths./a.$ref: a $ref path item is not supported",
        ),
        (
            TWO_REGIONS,
            [],
            "spec.yaml: the functions are in several regions: us-east-1 (paths./a.get.x-amazon-apigateway-"
            "integration.uri), eu-west-1 (paths./b.get.x-amazon-apigateway-integration.uri)",
        ),
        (
            IN_US_EAST_1,
            ["--region", "eu-west-1"],
            "spec.yaml: --region: 'eu-west-1' disagrees with the functions' ARNs, which are in us-east-1",
        ),
        (
            f"openapi: 3.0.0\n{PET}\n",
            ["--region", "mars"],
            "spec.yaml: --region: 'mars' is not an AWS region",
        ),
        (
            f"openapi: 3.0.0\n{PET}\n",
            ["--region", "us-east-1", "--name", "Pets"],
            "spec.yaml: --name: 'Pets'",
        ),
        (
            f"openapi: 3.0.0\n{PET}\n",
            ["--region", "us-east-1", "--endpoint", "ftp://x"],
            "spec.yaml: --endpoint: 'ftp://x' is not a URL",
        ),
        (
            f"openapi: 3.0.0\n{PET}\n",
            ["--region", "us-east-1", "--domain", "bad domain"],
            "spec.yaml: --domain: 'bad domain' is not a host name",
        ),
        (
            f"openapi: 3.0.0\n{PET}\n",
            ["--region", "us-east-1", "--base-path", "/{stage}"],
            "spec.yaml: --base-path: '/{stage}' is not a plain path",
        ),
        (
            f"swagger: '2.0'\nbasePath: 7\n{PET}\n",
            ["--region", "us-east-1"],
            "spec.yaml: basePath: must be a string, got a number",
        ),
        (
            spec3("/pets", "get", {"operationId": "x"}, servers=[{"url": "https://{host}/v1"}]),
            ["--region", "us-east-1"],
            "spec.yaml: servers[0].variables.host: servers[0].url uses {host}, which has no default",
        ),
        (
            spec3("/a", "get", mock(responses={"default": {"statusCode": "2xx"}})),
            [],
            MOCK + ".default.statusCode: must be an HTTP status code such as 200, got '2xx'",
        ),
        (
            spec3("/a", "get", mock(responses={"default": {"statusCode": 700}})),
            [],
            MOCK + ".default.statusCode: must be from 200 to 599, got 700",
        ),
        (
            spec3("/a", "get", mock(responses=["default"])),
            [],
            MOCK + ": must be a mapping, got a list",
        ),
        (
            spec3(
                "/a",
                "get",
                mock(responses={"default": {"responseParameters": {"method.response.header.X Y": "'1'"}}}),
            ),
            [],
            MOCK + ".default.responseParameters.method.response.header.X Y: not a header name",
        ),
        (
            spec3(
                "/a",
                "get",
                mock(responses={"default": {"responseTemplates": {"application/json": "x" * 70000}}}),
            ),
            [],
            MOCK + ".default.responseTemplates.application/json: at most 64 KiB",
        ),
        (
            spec3("/a", "get", mock(responses={"default": {"responseTemplates": {"application/json": {}}}})),
            [],
            MOCK + ".default.responseTemplates.application/json: must be a string (a mapping template)",
        ),
        (
            spec3("/a", "get", mock(), **{"x-amazon-apigateway-cors": ["*"]}),
            [],
            "spec.yaml: x-amazon-apigateway-cors: must be a mapping of CORS settings, got a list",
        ),
        (
            spec3("/a", "get", mock(), **{"x-amazon-apigateway-cors": {"allowMethods": ["GET"]}}),
            [],
            "spec.yaml: x-amazon-apigateway-cors.allowOrigins: must be a non-empty list",
        ),
        (
            spec3("/a", "get", mock(), **cors(allowOrigins="*")),
            [],
            "spec.yaml: x-amazon-apigateway-cors.allowOrigins: must be a non-empty list",
        ),
        (
            spec3("/a", "get", mock(), **cors(allowOrigins=["https://app.example.com/"])),
            [],
            "spec.yaml: x-amazon-apigateway-cors.allowOrigins[0]: 'https://app.example.com/' is not an origin",
        ),
        (
            spec3("/a", "get", mock(), **cors(allowOrigins=["*"], allowMethods=["GET", "FETCH"])),
            [],
            "spec.yaml: x-amazon-apigateway-cors.allowMethods[1]: 'FETCH' is not an HTTP method",
        ),
        (
            spec3("/a", "get", mock(), **cors(allowOrigins=["*"], exposeHeaders=["x y"])),
            [],
            "spec.yaml: x-amazon-apigateway-cors.exposeHeaders[0]: 'x y' is not a header name",
        ),
        (
            spec3("/a", "get", mock(), **cors(allowOrigins=["*"], maxAge=86401)),
            [],
            "spec.yaml: x-amazon-apigateway-cors.maxAge: must be more than 0 and at most 86400s",
        ),
        (
            spec3("/a", "get", mock(), **cors(allowOrigins=["*"], allowCredentials=True)),
            [],
            "spec.yaml: x-amazon-apigateway-cors.allowCredentials: browsers refuse credentials with the '*' origin",
        ),
        (
            spec3("/a", "get", {"operationId": "a"}, **cors(allowOrigins=["*"], allowCredentials="yes")),
            ["--region", "us-east-1"],
            "spec.yaml: x-amazon-apigateway-cors.allowCredentials: must be true or false",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spec: str | dict[str, Any],
    args: list[str],
    expected: str,
) -> None:
    rc, out = run(tmp_path, spec, *args)
    err = capsys.readouterr().err
    assert rc == 2
    assert not out.exists()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: " + expected), err
    assert "Traceback" not in err


def test_unreadable_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-openapi", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot be read: No such file or directory" in capsys.readouterr().err
    bad_json = tmp_path / "spec.json"
    bad_json.write_text('{"openapi": "3.0.0", "paths": {}')
    assert main(["import-openapi", str(bad_json)]) == 2
    assert "spec.json: line 1, column 33: invalid JSON" in capsys.readouterr().err
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["import-openapi", str(binary)]) == 2
    assert "spec.yaml: is not UTF-8 text" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(f"openapi: 3.0.0\n{PET}\n")
    assert (
        main(["import-openapi", str(good), "--region", "us-east-1", "-o", str(tmp_path / "no/such/out.yaml")])
        == 2
    )
    assert "cannot be written" in capsys.readouterr().err


def test_duplicate_templates_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = """
    openapi: 3.0.0
    paths:
      /pets/{id}: {get: {operationId: a}}
      /pets/{petId}: {get: {operationId: b}, delete: {operationId: c}}
    """
    rc, out = run(tmp_path, spec, "--region", "us-east-1")
    assert rc == 0
    load(out)
    err = capsys.readouterr().err
    assert "warning: spec.yaml: paths./pets/{petId}.get: never reached: paths./pets/{id}.get" in err
    assert "paths./pets/{petId}.delete" not in err


def test_integration_ref_and_ignored_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"""
    openapi: 3.0.1
    paths:
      /a:
        get:
          x-amazon-apigateway-integration: {{$ref: "#/components/x-amazon-apigateway-integrations/fn"}}
    components:
      x-amazon-apigateway-integrations:
        fn:
          type: AWS_PROXY
          uri: {ARN}:fn:live
          payloadFormatVersion: "2.0"
          credentials: arn:aws:iam::123456789012:role/apigw
    """
    rc, out = run(tmp_path, spec)
    assert rc == 0
    up, vs, _ = load(out)
    assert up.functions[0].qualifier == "live"
    assert vs.routes[0].options.payload_format == "apigateway-v2"
    assert "x-amazon-apigateway-integration.credentials: not applied by lambdagate" in capsys.readouterr().err


def test_order_is_transitive(tmp_path: Path) -> None:
    """/a/b must precede /a/{y}, which must precede /{x}/c: /a/b moves up although it cannot shadow /{x}/c."""
    spec = """
    openapi: 3.0.0
    paths:
      /{x}/c: {get: {operationId: xc}}
      /a/b: {get: {operationId: ab}}
      /a/{y}: {get: {operationId: ay}}
    """
    rc, out = run(tmp_path, spec, "--region", "us-east-1")
    assert rc == 0
    assert [r.matcher.value for r in load(out)[1].routes] == ["/a/b", "/a/{y}", "/{x}/c"]


def test_spec_from_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(SWAGGER2)))
    assert main(["import-openapi", "-", "--region", "us-east-1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Generated by `lambdagate import-openapi` from <stdin> (Swagger 2.0)")


# --- security schemes, non-proxy integrations and lambdagate's own extensions (export-openapi) -------------------

AUTHORIZERS = f"""
openapi: 3.0.1
info: {{title: Guarded}}
security: [{{lambda: []}}]
paths:
  /a:
    get:
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:a"}}
    post:
      security: [{{http-jwt: [write]}}, {{lambda: []}}]
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:a"}}
    put:
      security: [{{iam: [], api_key: []}}]
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:a"}}
    delete:
      security: [{{iam: []}}]
      x-amazon-apigateway-integration: {{type: aws_proxy, uri: "{ARN}:a"}}
    options:
      x-amazon-apigateway-integration: {{type: mock, responses: {{default: {{statusCode: 204}}}}}}
  /b:
    get:
      x-amazon-apigateway-integration:
        type: aws
        uri: {invoke_uri(ARN + ":b")}
        requestTemplates: {{application/json: '{{"id": {{{{ path_params.id | tojson }}}}}}', text/plain: x}}
components:
  securitySchemes:
    lambda:
      type: apiKey
      name: Authorization
      in: header
      x-amazon-apigateway-authtype: custom
      x-amazon-apigateway-authorizer:
        type: token
        authorizerUri: {invoke_uri(ARN + ":authorizer")}
        authorizerResultTtlInSeconds: 300
    http-jwt:
      type: oauth2
      x-amazon-apigateway-authorizer:
        type: jwt
        identitySource: [$request.header.X-Token]
        jwtConfiguration: {{issuer: "https://issuer.example.com/", audience: api}}
      x-lambdagate-authorizer: {{jwks: {{uri: "https://issuer.example.com/jwks"}}}}
    iam: {{type: apiKey, name: Authorization, in: header, x-amazon-apigateway-authtype: awsSigv4}}
    api_key: {{type: apiKey, name: x-api-key, in: header, x-lambdagate-api-keys: {{secret_ref: guarded-keys}}}}
"""


def test_security_schemes_become_authorizers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(tmp_path, AUTHORIZERS)
    err = capsys.readouterr().err
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out.read_text()))
    up, vs = (parse_document(d) for d in docs)
    keys = parse_document({"kind": "Secret", "metadata": {"name": "guarded-keys"}, "stringData": {"k": "v"}})
    assert isinstance(up, Upstream) and isinstance(vs, VirtualService) and isinstance(keys, Secret)
    assert resolve([up, vs, keys]).errors == {}
    spec = docs[1]["spec"]
    # A TOKEN authorizer is a lambda authorizer whose identity source is the scheme's header.
    assert spec["authorizers"] == {
        "lambda": {
            "type": "lambda",
            "upstream": "guarded-lambdas",
            "function": "authorizer",
            "identity_sources": ["header:Authorization"],
            "ttl": "300s",
        },
        "http-jwt": {
            "type": "jwt",
            "issuer": "https://issuer.example.com/",
            "audiences": ["api"],
            "jwks": {"uri": "https://issuer.example.com/jwks"},
            "header": "X-Token",
        },
    }
    assert spec["auth"] == {"authorizer": "lambda"}
    assert spec["api_keys"] == {"secret_ref": "guarded-keys"}
    auth = {r.matcher.methods: r.auth for r in vs.routes}
    assert auth[("GET",)] == RouteAuth()  # the document's security
    # The first of two alternatives; what lambdagate cannot enforce (IAM) is dropped with a warning.
    assert auth[("POST",)] == RouteAuth("http-jwt", ("write",), None)
    assert auth[("PUT",)] == RouteAuth(NO_AUTHORIZER, None, True)
    assert auth[("DELETE",)] == RouteAuth(NO_AUTHORIZER, None, None)
    # Envoy answers a mock itself: a Lambda authorizer cannot apply to it.
    assert auth[("OPTIONS",)] == RouteAuth(NO_AUTHORIZER, None, None)
    assert vs.authorizer("http-jwt") is not None and vs.authorizer("http-jwt").jwt.header == "x-token"  # type: ignore[union-attr]
    assert "paths./a.get" not in err
    assert (
        "security.type: a TOKEN authorizer" not in err
        and "x-amazon-apigateway-authorizer.type: a TOKEN" in err
    )
    assert "paths./a.post.security: 2 alternative requirements; lambdagate enforces the first only" in err
    assert "paths./a.put.security[0]: not imported, so not enforced: iam (IAM (SigV4) authorization)" in err
    assert "1 operation requires authorization (security or x-amazon-apigateway-auth) by schemes" in err
    assert "paths./a.options: a mock route is answered by Envoy itself: its Lambda authorizer" in err
    # A non-proxy integration: its mapping template, with warnings for what lambdagate reads differently.
    b = next(r for r in vs.routes if r.matcher.value == "/b")
    assert (
        b.integration is not None
        and b.integration.request_template == '{"id": {{ path_params.id | tojson }}}'
    )
    assert "requestTemplates: lambdagate has one request template; application/json's is used" in err


def test_lambdagate_extensions_yield_to_what_the_document_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edited export: a uri that names another function than x-lambdagate-destination wins; operations without
    x-lambdagate-route make the order API Gateway's; x-lambdagate-auth that contradicts security is ignored."""
    spec = {
        "openapi": "3.0.0",
        "x-lambdagate-functions": {"first": {"function_name": f"{ARN}:first"}},
        "paths": {
            "/pets/{id}": {
                "get": {
                    **integration(type="aws_proxy", uri=invoke_uri(f"{ARN}:edited")),
                    "x-lambdagate-destination": {"function": "first"},
                    "x-lambdagate-route": 0,
                    "security": [],
                    "x-lambdagate-auth": {"api_key_required": True},
                }
            },
            "/pets/mine": {"get": integration(type="aws_proxy", uri=f"{ARN}:mine")},
        },
    }
    rc, out = run(tmp_path, spec)
    err = capsys.readouterr().err
    assert rc == 0, err
    up, vs, _ = load(out)
    assert routes_of(vs) == [
        ("path", "/pets/mine", ("GET",), "mine"),
        ("path", "/pets/{id}", ("GET",), "edited"),
    ]
    assert [f.name for f in up.functions] == ["first", "edited", "mine"]
    assert vs.routes[1].auth == RouteAuth()
    assert (
        "x-lambdagate-destination names another function than the integration's uri; the uri is used" in err
    )
    assert "x-lambdagate-route is on some operations only" in err
    assert "paths./pets/{id}.get.x-lambdagate-auth: says other than the operation's security" in err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            spec3("/a", "get", {**integration(uri=f"{ARN}:f"), "x-lambdagate-route": -1}),
            "spec.yaml: paths./a.get.x-lambdagate-route: must be a route's index (0, 1, ...), got -1",
        ),
        (
            spec3("/a", "get", {**integration(uri=f"{ARN}:f"), "x-lambdagate-destination": "f"}),
            "spec.yaml: paths./a.get.x-lambdagate-destination: must be a mapping, got str",
        ),
        (
            {**spec3("/a", "get", integration(uri=f"{ARN}:f")), "x-lambdagate-paths": {"/b": {}}},
            "spec.yaml: x-lambdagate-paths: must be a list of path items, got a mapping",
        ),
        (
            {**spec3("/a", "get", integration(uri=f"{ARN}:f")), "x-lambdagate-paths": [{"get": {}}]},
            "spec.yaml: x-lambdagate-paths[0]: needs exactly one of path, prefix or regex",
        ),
        (
            {**spec3("/a", "get", integration(uri=f"{ARN}:f")), "x-lambdagate-functions": {"f": "arn"}},
            "spec.yaml: x-lambdagate-functions.f: must be a mapping {function_name, qualifier}",
        ),
        (
            spec3(
                "/a",
                "get",
                {**integration(uri=f"{ARN}:f"), "x-lambdagate-options": {"max_retries": 9}},
            ),
            "spec.yaml: paths./a.get.x-lambdagate-options.max_retries: must be from 0 to 5, got 9",
        ),
        (
            spec3(
                "/a",
                "get",
                integration(uri=f"{ARN}:f"),
                security=[{"jwt": []}],
                components={
                    "securitySchemes": {
                        "jwt": {
                            "type": "oauth2",
                            "x-amazon-apigateway-authorizer": {"type": "jwt", "jwtConfiguration": {}},
                        }
                    }
                },
            ),
            "spec.yaml: components.securitySchemes.jwt.x-amazon-apigateway-authorizer.jwtConfiguration.issuer: "
            "missing: the JWT issuer",
        ),
        (
            spec3(
                "/a", "get", integration(type="aws", uri=f"{ARN}:f", requestTemplates={"application/json": 1})
            ),
            "spec.yaml: paths./a.get.x-amazon-apigateway-integration.requestTemplates.application/json: must be a "
            "string",
        ),
        (
            spec3(
                "/a",
                "get",
                integration(
                    type="aws", uri=f"{ARN}:f", requestTemplates={"application/json": "$input.json('$')"}
                ),
            ),
            "spec.yaml: paths./a.get: paths./a.get.x-amazon-apigateway-integration.requestTemplates.application/json "
            "is a Velocity template; lambdagate's mapping templates are Jinja2, so rewrite it (--skip-unsupported",
        ),
    ],
)
def test_bad_extensions_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, Any], expected: str
) -> None:
    rc, out = run(tmp_path, spec)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: " + expected), err

"""Black-box tests of the resource model: parse_document (every valid form, every rejection) and resolve()."""

from __future__ import annotations

import base64
import copy

import pytest
import yaml

from controlplane.model import (
    Config,
    ConfigError,
    ObjectKey,
    Secret,
    Upstream,
    VirtualService,
    parse_document,
    resolve,
)
from controlplane.model.resources import LOCAL_ENDPOINT, Endpoint

SECRET_VALUE = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzz-test-secret"
TOKEN_VALUE = "FwoGZXIvYXdzEXAMPLE-session-token-value"


# ---------------------------------------------------------------------------------------------------------------
# Document builders


def secret_doc(name="aws-creds", namespace=None, **body):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    doc = {"apiVersion": "v1", "kind": "Secret", "metadata": meta}
    if not body:
        body = {"stringData": {"access_key": "AKIDEXAMPLE", "secret_key": SECRET_VALUE}}
    doc.update(body)
    return doc


def upstream_doc(name="lambdas", namespace=None, **spec):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    full = {
        "type": "aws",
        "region": "us-east-1",
        "secret_ref": "aws-creds",
        "functions": [
            {"name": "list-pets", "spec": {"function_name": "PetsGet"}},
            {"name": "get-pet", "spec": {"function_name": "PetsPetIdGet", "qualifier": "live"}},
        ],
    }
    full.update(spec)
    full = {k: v for k, v in full.items() if v is not _DROP}
    return {"apiVersion": "lambdagate.io/v1", "kind": "Upstream", "metadata": meta, "spec": full}


def vs_doc(name="petstore", namespace=None, **spec):
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    full = {
        "domains": ["*"],
        "routes": [
            {
                "matcher": {"path": "/pets", "methods": ["GET"]},
                "destination": {"upstream": "lambdas", "function": "list-pets"},
            },
            {
                "matcher": {"path": "/pets/{petId}", "methods": ["GET"]},
                "destination": {"upstream": "lambdas", "function": "get-pet"},
            },
        ],
    }
    full.update(spec)
    full = {k: v for k, v in full.items() if v is not _DROP}
    return {"apiVersion": "lambdagate.io/v1", "kind": "VirtualService", "metadata": meta, "spec": full}


_DROP = object()


def with_fn(*fns):
    return [{"name": n, "spec": s} for n, s in fns]


def route(matcher, upstream="lambdas", function="list-pets"):
    return {"matcher": matcher, "destination": {"upstream": upstream, "function": function}}


def rejected(doc) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_document(doc)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Valid forms


MULTI_DOC = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws-creds}}
stringData:
  access_key: AKIDEXAMPLE
  secret_key: {SECRET_VALUE}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: lambdas, namespace: shop}}
spec:
  type: aws
  region: eu-west-3
  secret_ref: aws-creds
  endpoint: https://lambda.eu-west-3.amazonaws.com
  functions:
  - name: list-pets
    spec: {{function_name: PetsGet}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: petstore, namespace: shop}}
spec:
  domains: [api.example.com, "*.example.org"]
  stage: prod
  routes:
  - matcher: {{prefix: /pets, methods: [get, post, GET]}}
    destination:
      upstream: {{name: lambdas, namespace: shop}}
      function: list-pets
"""


def test_multi_document_yaml_parses_into_three_objects():
    objs = [parse_document(d) for d in yaml.safe_load_all(MULTI_DOC)]
    sec, up, vs = objs
    assert isinstance(sec, Secret) and isinstance(up, Upstream) and isinstance(vs, VirtualService)
    assert sec.key == ObjectKey("Secret", "default", "aws-creds")
    assert sec.credentials.access_key == "AKIDEXAMPLE"
    assert sec.credentials.secret_key == SECRET_VALUE
    assert up.key == ObjectKey("Upstream", "shop", "lambdas")
    assert up.region == "eu-west-3"
    assert up.endpoint == Endpoint("https", "lambda.eu-west-3.amazonaws.com", 443)
    assert vs.domains == ("api.example.com", "*.example.org")
    assert vs.stage == "prod"
    (r,) = vs.routes
    assert r.matcher.kind == "prefix" and r.matcher.value == "/pets"
    # Methods are upper-cased and de-duplicated, in order.
    assert r.matcher.methods == ("GET", "POST")
    assert r.matcher.resource == "/pets/{proxy+}"
    assert (r.destination.upstream, r.destination.upstream_namespace, r.destination.function) == (
        "lambdas",
        "shop",
        "list-pets",
    )


def test_secret_data_is_base64_decoded_and_stripped():
    def b64(s):
        return base64.b64encode(s.encode()).decode()

    sec = parse_document(secret_doc(data={"access_key": b64("AKIDDATA\n"), "secret_key": b64(SECRET_VALUE)}))
    assert sec.credentials.access_key == "AKIDDATA"
    assert sec.credentials.secret_key == SECRET_VALUE
    assert sec.credentials.session_token is None
    assert sec.keys == ("access_key", "secret_key")


def test_secret_string_data_wins_over_data_like_kubernetes():
    doc = secret_doc(
        data={
            "access_key": base64.b64encode(b"FROMDATA").decode(),
            "secret_key": base64.b64encode(b"s1").decode(),
        },
        stringData={"access_key": "FROMSTRINGDATA"},
    )
    sec = parse_document(doc)
    assert sec.credentials.access_key == "FROMSTRINGDATA"
    assert sec.credentials.secret_key == "s1"


def test_secret_session_token_is_optional_and_kept_when_given():
    sec = parse_document(
        secret_doc(
            stringData={"access_key": "ASIAX", "secret_key": SECRET_VALUE, "session_token": TOKEN_VALUE}
        )
    )
    assert sec.credentials.session_token == TOKEN_VALUE
    assert sec.keys == ("access_key", "secret_key", "session_token")
    sec2 = parse_document(
        secret_doc(stringData={"access_key": "ASIAX", "secret_key": SECRET_VALUE, "session_token": ""})
    )
    assert sec2.credentials.session_token is None


def test_secret_without_aws_keys_is_legal_but_has_no_credentials():
    sec = parse_document(secret_doc(stringData={"password": "x"}))
    assert sec.credentials is None
    assert sec.keys == ("password",)


def test_secret_api_version_may_be_omitted():
    doc = secret_doc()
    del doc["apiVersion"]
    assert isinstance(parse_document(doc), Secret)


def test_namespace_defaults_to_default_and_can_be_overridden():
    assert parse_document(upstream_doc()).namespace == "default"
    assert parse_document(upstream_doc(namespace="team-a")).namespace == "team-a"
    assert parse_document(upstream_doc(), default_namespace="other").namespace == "other"
    # A VirtualService's string upstream lives in the VirtualService's namespace.
    vs = parse_document(vs_doc(namespace="team-a"))
    assert all(r.destination.upstream_namespace == "team-a" for r in vs.routes)


def test_gloo_style_upstream_reference():
    vs = parse_document(
        vs_doc(
            namespace="web",
            routes=[
                {
                    "matcher": {"path": "/a"},
                    "destination": {"upstream": {"name": "u1", "namespace": "infra"}, "function": "f"},
                },
                {"matcher": {"path": "/b"}, "destination": {"upstream": {"name": "u2"}, "function": "f"}},
            ],
        )
    )
    d1, d2 = (r.destination for r in vs.routes)
    assert (d1.upstream, d1.upstream_namespace) == ("u1", "infra")
    assert (d2.upstream, d2.upstream_namespace) == ("u2", "web")


@pytest.mark.parametrize(
    "function_name, qualifier, expect_name, expect_qualifier",
    [
        ("PetsGet", None, "PetsGet", None),
        ("PetsGet", "live", "PetsGet", "live"),
        ("PetsGet:live", None, "PetsGet", "live"),
        ("PetsGet:7", "7", "PetsGet", "7"),
        ("PetsGet:$LATEST", None, "PetsGet", "$LATEST"),
        (
            "arn:aws:lambda:us-east-1:123456789012:function:PetsGet",
            None,
            "arn:aws:lambda:us-east-1:123456789012:function:PetsGet",
            None,
        ),
        (
            "arn:aws:lambda:us-east-1:123456789012:function:PetsGet:prod",
            None,
            "arn:aws:lambda:us-east-1:123456789012:function:PetsGet",
            "prod",
        ),
        ("123456789012:function:PetsGet", None, "123456789012:function:PetsGet", None),
        ("123456789012:function:PetsGet:3", None, "123456789012:function:PetsGet", "3"),
    ],
)
def test_function_name_forms(function_name, qualifier, expect_name, expect_qualifier):
    spec = {"function_name": function_name}
    if qualifier:
        spec["qualifier"] = qualifier
    up = parse_document(upstream_doc(functions=with_fn(("f", spec))))
    (fn,) = up.functions
    assert (fn.function_name, fn.qualifier) == (expect_name, expect_qualifier)
    assert fn.effective_qualifier == (expect_qualifier or "$LATEST")
    assert up.function("f") is fn and up.function("nope") is None


def test_upstream_defaults():
    up = parse_document(upstream_doc(type=_DROP, secret_ref=_DROP, functions=_DROP))
    assert up.secret_ref is None
    assert up.endpoint is None
    assert up.functions == ()
    assert up.default_endpoint() == Endpoint("https", "lambda.us-east-1.amazonaws.com", 443)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("http://127.0.0.1:9001", Endpoint("http", "127.0.0.1", 9001)),
        ("https://lambda.eu-west-1.amazonaws.com", Endpoint("https", "lambda.eu-west-1.amazonaws.com", 443)),
        ("https://lambda.eu-west-1.amazonaws.com/", Endpoint("https", "lambda.eu-west-1.amazonaws.com", 443)),
        ("http://moto:5000", Endpoint("http", "moto", 5000)),
        ("http://localhost", Endpoint("http", "localhost", 80)),
        ("local", LOCAL_ENDPOINT),
    ],
)
def test_endpoint_forms(raw, expected):
    assert parse_document(upstream_doc(endpoint=raw)).endpoint == expected


def test_endpoint_authority_omits_default_port():
    assert Endpoint("https", "h", 443).authority == "h"
    assert Endpoint("http", "h", 80).authority == "h"
    assert Endpoint("http", "h", 9001).authority == "h:9001"
    assert str(Endpoint("https", "h", 8443)) == "https://h:8443"


def test_virtual_service_defaults():
    vs = parse_document(vs_doc(domains=_DROP))
    assert vs.domains == ("*",)
    assert vs.stage == "$default"


def test_matcher_kinds():
    vs = parse_document(
        vs_doc(
            routes=[
                route({"path": "/pets"}),
                route({"path": "/pets/{petId}/toys/{toyId}"}),
                route({"path": "/files/{proxy+}"}),
                route({"prefix": "/api/"}),
                route({"regex": "^/v[0-9]+/(?P<item>[a-z]+)$"}),
            ]
        )
    )
    literal, template, greedy, prefix, regex = (r.matcher for r in vs.routes)
    assert literal.kind == "path" and not literal.is_template and literal.params == ()
    assert literal.resource == "/pets"
    assert template.is_template and template.params == ("petId", "toyId")
    assert template.resource == "/pets/{petId}/toys/{toyId}"
    import re

    m = re.match(template.template_regex, "/pets/12/toys/ball")
    assert m and m.groupdict() == {"petId": "12", "toyId": "ball"}
    assert re.match(template.template_regex, "/pets/12/x/toys/ball") is None
    assert re.match(greedy.template_regex, "/files/a/b/c").group("proxy") == "a/b/c"
    assert prefix.resource == "/api/{proxy+}"
    assert regex.kind == "regex" and regex.params == ("item",)
    assert all(m.methods == () for m in (literal, template, greedy, prefix, regex))


def test_parse_accepts_ourselves_round_trip_of_yaml_text():
    # The same document read from YAML text and as a dict parse to equal objects (frozen dataclasses compare).
    a = parse_document(vs_doc())
    b = parse_document(yaml.safe_load(yaml.safe_dump(vs_doc())))
    assert a == b


# ---------------------------------------------------------------------------------------------------------------
# Rejections: each names the object and the field path


def fn_spec(**spec):
    return upstream_doc(functions=with_fn(("f", spec)))


REJECTIONS = [
    # (id, document, expected field, words the message must hold)
    ("missing region", upstream_doc(region=_DROP), "spec.region", "missing"),
    ("bad region", upstream_doc(region="us-east"), "spec.region", "not an AWS region"),
    ("bad region upper", upstream_doc(region="US-EAST-1"), "spec.region", "not an AWS region"),
    ("region not a string", upstream_doc(region=5), "spec.region", "must be a string"),
    ("unknown upstream field", upstream_doc(regoin="us-east-1"), "spec.regoin", "unknown field"),
    ("unsupported type", upstream_doc(type="kubernetes"), "spec.type", "only 'aws'"),
    (
        "endpoint no scheme",
        upstream_doc(endpoint="lambda.us-east-1.amazonaws.com"),
        "spec.endpoint",
        "not a URL",
    ),
    ("endpoint ftp", upstream_doc(endpoint="ftp://host"), "spec.endpoint", "not a URL"),
    ("endpoint bad port", upstream_doc(endpoint="http://host:99999"), "spec.endpoint", "not a URL"),
    ("endpoint with path", upstream_doc(endpoint="https://host/2015-03-31"), "spec.endpoint", "no path"),
    ("endpoint with query", upstream_doc(endpoint="https://host?x=1"), "spec.endpoint", "no path"),
    ("functions not a list", upstream_doc(functions={"a": 1}), "spec.functions", "must be a list"),
    (
        "duplicate function names",
        upstream_doc(functions=with_fn(("f", {"function_name": "A"}), ("f", {"function_name": "B"}))),
        "spec.functions[1].name",
        "duplicate function name 'f'",
    ),
    ("function missing spec", upstream_doc(functions=[{"name": "f"}]), "spec.functions[0].spec", "missing"),
    (
        "function missing name",
        upstream_doc(functions=[{"spec": {"function_name": "A"}}]),
        "spec.functions[0].name",
        "missing",
    ),
    (
        "function bad logical name",
        upstream_doc(functions=with_fn(("has space", {"function_name": "A"}))),
        "spec.functions[0].name",
        "not a valid function name",
    ),
    ("function_name missing", fn_spec(qualifier="live"), "spec.functions[0].spec.function_name", "missing"),
    (
        "function_name bad",
        fn_spec(function_name="a/b"),
        "spec.functions[0].spec.function_name",
        "not a Lambda function name",
    ),
    (
        "function_name too many colons",
        fn_spec(function_name="a:b:c"),
        "spec.functions[0].spec.function_name",
        "not a Lambda",
    ),
    (
        "unknown function spec field",
        fn_spec(function_name="A", alias="x"),
        "spec.functions[0].spec.alias",
        "unknown field",
    ),
    (
        "bad qualifier",
        fn_spec(function_name="A", qualifier="a b"),
        "spec.functions[0].spec.qualifier",
        "not a version",
    ),
    (
        "qualifier conflict",
        fn_spec(function_name="A:prod", qualifier="dev"),
        "spec.functions[0].spec.qualifier",
        "carries qualifier 'prod' but qualifier is 'dev'",
    ),
    (
        "qualifier conflict in arn",
        fn_spec(function_name="arn:aws:lambda:us-east-1:123456789012:function:A:1", qualifier="2"),
        "spec.functions[0].spec.qualifier",
        "carries qualifier '1'",
    ),
    ("unknown kind", {**upstream_doc(), "kind": "ConfigMap"}, "kind", "unknown kind 'ConfigMap'"),
    ("missing kind", {k: v for k, v in upstream_doc().items() if k != "kind"}, "kind", "missing"),
    ("kind not a string", {**upstream_doc(), "kind": 3}, "kind", "must be a string"),
    (
        "wrong apiVersion group",
        {**upstream_doc(), "apiVersion": "gloo.solo.io/v1"},
        "apiVersion",
        "lambdagate.io/v1",
    ),
    (
        "wrong apiVersion version",
        {**vs_doc(), "apiVersion": "lambdagate.io/v2"},
        "apiVersion",
        "unsupported version",
    ),
    (
        "missing apiVersion",
        {k: v for k, v in upstream_doc().items() if k != "apiVersion"},
        "apiVersion",
        "lambdagate.io/v1",
    ),
    ("secret apiVersion", {**secret_doc(), "apiVersion": "lambdagate.io/v1"}, "apiVersion", "must be v1"),
    ("missing metadata", {k: v for k, v in upstream_doc().items() if k != "metadata"}, "metadata", "missing"),
    ("missing name", {**upstream_doc(), "metadata": {"namespace": "x"}}, "metadata.name", "missing"),
    ("bad name", {**upstream_doc(), "metadata": {"name": "Bad_Name"}}, "metadata.name", "not a valid name"),
    (
        "bad namespace",
        {**upstream_doc(), "metadata": {"name": "u", "namespace": "Team A"}},
        "metadata.namespace",
        "not a valid namespace",
    ),
    (
        "namespace with slash",
        {**upstream_doc(), "metadata": {"name": "u", "namespace": "a/b"}},
        "metadata.namespace",
        "not a valid namespace",
    ),
    ("missing spec", {k: v for k, v in upstream_doc().items() if k != "spec"}, "spec", "missing"),
    ("spec not mapping", {**upstream_doc(), "spec": ["a"]}, "spec", "must be a mapping"),
    ("bad base64", secret_doc(data={"secret_key": "not base64!!"}), "data.secret_key", "not valid base64"),
    (
        "stringData number",
        secret_doc(stringData={"secret_key": 12345}),
        "stringData.secret_key",
        "must be a string",
    ),
    ("unknown vs field", vs_doc(hosts=["a"]), "spec.hosts", "unknown field"),
    ("routes missing", vs_doc(routes=_DROP), "spec.routes", "non-empty list"),
    ("routes empty", vs_doc(routes=[]), "spec.routes", "non-empty list"),
    ("domains empty", vs_doc(domains=[]), "spec.domains", "non-empty list"),
    ("bad domain", vs_doc(domains=["exa mple.com"]), "spec.domains[0]", "not a host name"),
    ("duplicate domain", vs_doc(domains=["a.com", "A.com"]), "spec.domains[1]", "duplicate domain"),
    (
        "matcher two kinds",
        vs_doc(routes=[route({"path": "/a", "prefix": "/a"})]),
        "spec.routes[0].matcher",
        "exactly one of path, prefix or regex, got path, prefix",
    ),
    (
        "matcher no kind",
        vs_doc(routes=[route({"methods": ["GET"]})]),
        "spec.routes[0].matcher",
        "exactly one of",
    ),
    (
        "matcher missing",
        vs_doc(routes=[{"destination": {"upstream": "u", "function": "f"}}]),
        "spec.routes[0].matcher",
        "missing",
    ),
    (
        "unknown matcher field",
        vs_doc(routes=[route({"path": "/a", "header": "x"})]),
        "spec.routes[0].matcher.header",
        "unknown field",
    ),
    ("bad regex", vs_doc(routes=[route({"regex": "/pets/(["})]), "spec.routes[0].matcher.regex", "bad regex"),
    ("regex lookahead", vs_doc(routes=[route({"regex": "/a(?!b)"})]), "spec.routes[0].matcher.regex", "RE2"),
    (
        "regex backreference",
        vs_doc(routes=[route({"regex": r"/(a)\1"})]),
        "spec.routes[0].matcher.regex",
        "RE2",
    ),
    (
        "regex lookbehind",
        vs_doc(routes=[route({"regex": "/(?<=a)b"})]),
        "spec.routes[0].matcher.regex",
        "RE2",
    ),
    (
        "regex named backreference",
        vs_doc(routes=[route({"regex": "/(?P<x>a)(?P=x)"})]),
        "spec.routes[0].matcher.regex",
        "RE2",
    ),
    (
        "regex atomic group",
        vs_doc(routes=[route({"regex": "/(?>a+)b"})]),
        "spec.routes[0].matcher.regex",
        "RE2",
    ),
    (
        "regex conditional",
        vs_doc(routes=[route({"regex": "/(a)?(?(1)b|c)"})]),
        "spec.routes[0].matcher.regex",
        "RE2",
    ),
    (
        "path without slash",
        vs_doc(routes=[route({"path": "pets"})]),
        "spec.routes[0].matcher.path",
        "must start with '/'",
    ),
    (
        "path with query",
        vs_doc(routes=[route({"path": "/pets?x=1"})]),
        "spec.routes[0].matcher.path",
        "query",
    ),
    (
        "prefix with param",
        vs_doc(routes=[route({"prefix": "/pets/{id}"})]),
        "spec.routes[0].matcher.prefix",
        "use path",
    ),
    (
        "template bad braces",
        vs_doc(routes=[route({"path": "/pets/{pet-id}"})]),
        "spec.routes[0].matcher.path",
        "braces",
    ),
    (
        "template unclosed",
        vs_doc(routes=[route({"path": "/pets/{id}/{x"})]),
        "spec.routes[0].matcher.path",
        "braces",
    ),
    (
        "template dup param",
        vs_doc(routes=[route({"path": "/a/{x}/{x}"})]),
        "spec.routes[0].matcher.path",
        "twice",
    ),
    (
        "bad method",
        vs_doc(routes=[route({"path": "/a", "methods": ["FETCH"]})]),
        "spec.routes[0].matcher.methods[0]",
        "not an HTTP method",
    ),
    (
        "methods not list",
        vs_doc(routes=[route({"path": "/a", "methods": "GET"})]),
        "spec.routes[0].matcher.methods",
        "must be a list",
    ),
    (
        "destination missing",
        vs_doc(routes=[{"matcher": {"path": "/a"}}]),
        "spec.routes[0].destination",
        "missing",
    ),
    (
        "destination function missing",
        vs_doc(routes=[{"matcher": {"path": "/a"}, "destination": {"upstream": "u"}}]),
        "spec.routes[0].destination.function",
        "missing",
    ),
    (
        "destination unknown field",
        vs_doc(
            routes=[
                {"matcher": {"path": "/a"}, "destination": {"upstream": "u", "function": "f", "weight": 1}}
            ]
        ),
        "spec.routes[0].destination.weight",
        "unknown field",
    ),
    (
        "gloo upstream missing name",
        vs_doc(
            routes=[
                {"matcher": {"path": "/a"}, "destination": {"upstream": {"namespace": "x"}, "function": "f"}}
            ]
        ),
        "spec.routes[0].destination.upstream.name",
        "missing",
    ),
    (
        "second route bad",
        vs_doc(routes=[route({"path": "/ok"}), route({"path": "/x", "methods": ["GIT"]})]),
        "spec.routes[1].matcher.methods[0]",
        "not an HTTP method",
    ),
]


@pytest.mark.parametrize("doc, field, words", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_rejection_names_object_and_field(doc, field, words):
    err = rejected(copy.deepcopy(doc))
    assert err.field == field
    text = str(err)
    assert f"field {field}:" in text
    assert words in text
    # Past metadata and kind, the object is named too.
    if (
        field.split(".")[0].split("[")[0] in ("spec", "data", "stringData", "apiVersion")
        or "unknown kind" in words
    ):
        meta = doc["metadata"]
        obj = f"{doc['kind']} {meta.get('namespace', 'default')}/{meta['name']}"
        assert err.obj == obj
        assert text.startswith(f"{obj}: field {field}:")


def test_document_must_be_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping, got a list"):
        parse_document(["kind", "Upstream"])


def test_endpoint_with_credentials_is_rejected_without_echoing_them():
    for url in ("https://AKID:hunter2-secret@host", "https://AKID:hunter2-secret@host:99999/path"):
        err = rejected(upstream_doc(endpoint=url))
        assert err.field == "spec.endpoint"
        assert "hunter2-secret" not in str(err)


def test_secret_errors_never_echo_values():
    err = rejected(secret_doc(data={"access_key": "QUtJRA==", "secret_key": SECRET_VALUE + "!"}))
    assert err.field == "data.secret_key"
    assert SECRET_VALUE not in str(err) and SECRET_VALUE not in repr(err)


def test_config_error_context_and_str():
    err = ConfigError("is wrong", field="spec.x")
    assert str(err) == "field spec.x: is wrong"
    full = err.with_context(source="a.yaml", obj="Upstream default/u")
    assert str(full) == "a.yaml: Upstream default/u: field spec.x: is wrong"
    # Context already set is not overwritten.
    assert full.with_context(source="b.yaml").source == "a.yaml"
    assert str(ConfigError("plain")) == "plain"


def test_reprs_never_show_secret_values():
    sec = parse_document(
        secret_doc(
            stringData={
                "access_key": "AKIDEXAMPLE123",
                "secret_key": SECRET_VALUE,
                "session_token": TOKEN_VALUE,
            }
        )
    )
    for text in (repr(sec), str(sec), repr(sec.credentials), str(sec.credentials)):
        assert SECRET_VALUE not in text
        assert TOKEN_VALUE not in text
    assert "AKIDEXAMPLE123" not in repr(sec.credentials)


# ---------------------------------------------------------------------------------------------------------------
# resolve()


def parsed(*docs):
    return [parse_document(copy.deepcopy(d)) for d in docs]


UP_KEY = ObjectKey("Upstream", "default", "lambdas")
VS_KEY = ObjectKey("VirtualService", "default", "petstore")
SEC_KEY = ObjectKey("Secret", "default", "aws-creds")


def test_resolve_good_set():
    res = resolve(parsed(secret_doc(), upstream_doc(), vs_doc()))
    assert res.errors == {}
    assert res.kept_previous == set()
    cfg = res.config
    assert [u.key for u in cfg.upstreams] == [UP_KEY]
    assert [v.key for v in cfg.virtual_services] == [VS_KEY]
    assert [s.key for s in cfg.secrets] == [SEC_KEY]
    assert cfg.upstream("default", "lambdas").region == "us-east-1"
    assert cfg.secret("default", "aws-creds").credentials.secret_key == SECRET_VALUE
    assert cfg.upstream("default", "nope") is None


def test_resolve_only_keeps_used_secrets():
    res = resolve(parsed(secret_doc(), secret_doc(name="unused"), upstream_doc(), vs_doc()))
    assert [s.name for s in res.config.secrets] == ["aws-creds"]


def test_route_to_unknown_upstream():
    doc = vs_doc(routes=[route({"path": "/a"}, upstream="ghost")])
    res = resolve(parsed(secret_doc(), upstream_doc(), doc))
    err = res.errors[VS_KEY]
    assert err.field == "spec.routes[0].destination.upstream"
    assert "Upstream default/ghost does not exist" in str(err)
    assert err.obj == "VirtualService default/petstore"
    assert res.config.virtual_services == ()
    # The upstream itself is fine.
    assert [u.key for u in res.config.upstreams] == [UP_KEY]


def test_route_to_unknown_function_lists_known_ones():
    doc = vs_doc(routes=[route({"path": "/a"}), route({"path": "/b"}, function="fetch-pet")])
    res = resolve(parsed(secret_doc(), upstream_doc(), doc))
    err = res.errors[VS_KEY]
    assert err.field == "spec.routes[1].destination.function"
    assert "no function 'fetch-pet'" in err.message
    assert "list-pets" in err.message and "get-pet" in err.message


def test_gloo_reference_to_other_namespace_resolves():
    doc = vs_doc(
        namespace="web",
        routes=[
            {
                "matcher": {"path": "/a"},
                "destination": {
                    "upstream": {"name": "lambdas", "namespace": "default"},
                    "function": "list-pets",
                },
            }
        ],
    )
    res = resolve(parsed(secret_doc(), upstream_doc(), doc))
    assert res.errors == {}
    assert len(res.config.virtual_services) == 1


def test_missing_secret_ref_rejects_upstream_and_its_routes():
    res = resolve(parsed(upstream_doc(secret_ref="nope"), vs_doc()))
    err = res.errors[UP_KEY]
    assert err.field == "spec.secret_ref"
    assert "Secret default/nope does not exist" in str(err)
    assert res.config.upstreams == ()
    vs_err = res.errors[VS_KEY]
    assert "Upstream default/lambdas is rejected" in str(vs_err)
    assert res.config.virtual_services == ()


def test_secret_in_other_namespace_does_not_count():
    res = resolve(parsed(secret_doc(namespace="other"), upstream_doc(), vs_doc()))
    assert res.errors[UP_KEY].field == "spec.secret_ref"


def test_secret_without_keys_rejects_upstream_naming_keys_not_values():
    res = resolve(parsed(secret_doc(stringData={"secret_key": SECRET_VALUE}), upstream_doc(), vs_doc()))
    err = res.errors[UP_KEY]
    assert err.field == "spec.secret_ref"
    assert "lacks access_key and secret_key" in str(err)
    assert "secret_key" in str(err)  # the key name, for the user
    assert SECRET_VALUE not in str(err)


def test_upstream_without_secret_ref_uses_default_chain_and_is_accepted():
    res = resolve(parsed(upstream_doc(secret_ref=_DROP), vs_doc()))
    assert res.errors == {}
    assert res.config.secrets == ()


def test_local_endpoint_needs_a_running_local_endpoint():
    res = resolve(parsed(secret_doc(), upstream_doc(endpoint="local"), vs_doc()))
    assert res.errors[UP_KEY].field == "spec.endpoint"
    local = Endpoint("http", "127.0.0.1", 9001)
    res = resolve(parsed(secret_doc(), upstream_doc(endpoint="local"), vs_doc()), local_endpoint=local)
    assert res.errors == {}
    assert res.config.local_endpoint == local


def test_domain_claimed_by_two_virtual_services():
    a = vs_doc(name="a-site", domains=["api.example.com", "a.example.com"])
    b = vs_doc(name="b-site", domains=["b.example.com", "api.example.com"])
    res = resolve(parsed(secret_doc(), upstream_doc(), b, a))
    b_key = ObjectKey("VirtualService", "default", "b-site")
    assert set(res.errors) == {b_key}
    err = res.errors[b_key]
    assert err.field == "spec.domains[1]"
    assert "'api.example.com' is already served by VirtualService default/a-site" in str(err)
    assert [v.name for v in res.config.virtual_services] == ["a-site"]


def test_fallback_to_previous_good_version():
    good = resolve(parsed(secret_doc(), upstream_doc(), vs_doc()))
    assert good.errors == {}
    bad_vs = vs_doc(routes=[route({"path": "/new"}, function="missing-fn")])
    res = resolve(parsed(secret_doc(), upstream_doc(), bad_vs), previous=good.config)
    assert VS_KEY in res.errors
    assert res.kept_previous == {VS_KEY}
    (served,) = res.config.virtual_services
    assert served == good.config.virtual_services[0]
    assert [r.matcher.value for r in served.routes] == ["/pets", "/pets/{petId}"]


def test_fallback_for_upstream_with_bad_secret_ref():
    good = resolve(parsed(secret_doc(), upstream_doc(), vs_doc()))
    res = resolve(
        parsed(secret_doc(), upstream_doc(secret_ref="typo", region="eu-west-1"), vs_doc()),
        previous=good.config,
    )
    assert res.kept_previous == {UP_KEY}
    assert res.config.upstream("default", "lambdas").region == "us-east-1"
    # The routes still resolve against the kept upstream.
    assert VS_KEY not in res.errors
    assert len(res.config.virtual_services) == 1


def test_deleted_secret_rejects_upstream_even_with_a_previous_version():
    good = resolve(parsed(secret_doc(), upstream_doc(), vs_doc()))
    res = resolve(parsed(upstream_doc(), vs_doc()), previous=good.config)
    assert res.errors[UP_KEY].field == "spec.secret_ref"
    assert UP_KEY not in res.kept_previous
    assert res.config.upstreams == ()
    assert res.config.secrets == ()
    # Nothing can route to it any more, the previous VirtualService included.
    assert res.config.virtual_services == ()
    assert VS_KEY in res.errors


def test_previous_version_that_no_longer_resolves_is_not_kept():
    good = resolve(parsed(secret_doc(), upstream_doc(), vs_doc()))
    # Upstream lost get-pet; the new VS is bad and the old one routes to get-pet too.
    up = upstream_doc(functions=with_fn(("list-pets", {"function_name": "PetsGet"})))
    bad_vs = vs_doc(routes=[route({"path": "/x"}, upstream="ghost")])
    res = resolve(parsed(secret_doc(), up, bad_vs), previous=good.config)
    assert VS_KEY in res.errors and VS_KEY not in res.kept_previous
    assert res.config.virtual_services == ()


def test_one_bad_object_does_not_block_the_others():
    other = vs_doc(
        name="other", domains=["other.example.com"], routes=[route({"path": "/x"}, upstream="ghost")]
    )
    res = resolve(parsed(secret_doc(), upstream_doc(), vs_doc(), other))
    assert set(res.errors) == {ObjectKey("VirtualService", "default", "other")}
    assert [v.name for v in res.config.virtual_services] == ["petstore"]


def test_config_equality_is_value_based():
    a = resolve(parsed(secret_doc(), upstream_doc(), vs_doc())).config
    b = resolve(parsed(vs_doc(), upstream_doc(), secret_doc())).config
    assert a == b
    assert a != Config()


@pytest.mark.parametrize(
    "matcher, field, words",
    [
        ({"regex": "^/a*+$"}, "regex", "not valid RE2"),
        ({"regex": r"^/x\Z"}, "regex", "not valid RE2"),
        ({"regex": "^/a{2,1001}$"}, "regex", "not valid RE2"),
        ({"regex": "(?#comment)/x"}, "regex", "not valid RE2"),
        (
            {"path": "/" + "/".join(f"s{i}/{{p{i}}}" for i in range(12))},
            "path",
            "too complex for Envoy's RE2",
        ),
    ],
)
def test_regexes_envoy_would_refuse_are_rejected_per_route(matcher, field, words):
    doc = vs_doc(
        routes=[{"matcher": matcher, "destination": {"upstream": "lambdas", "function": "list-pets"}}]
    )
    with pytest.raises(ConfigError) as info:
        parse_document(doc)
    assert words in str(info.value) and f"spec.routes[0].matcher.{field}" in str(info.value)


@pytest.mark.parametrize(
    "spec_change, field",
    [
        ({"region": "us-east-1\n"}, "spec.region"),
        ({"region": "us-east-\u0661"}, "spec.region"),  # an Arabic-Indic digit is not a region digit
        ({"functions": [{"name": "f", "spec": {"function_name": "fn\n"}}]}, "function_name"),
        ({"functions": [{"name": "f", "spec": {"function_name": "fn", "qualifier": "live\n"}}]}, "qualifier"),
    ],
)
def test_trailing_newlines_and_unicode_digits_are_rejected(spec_change, field):
    with pytest.raises(ConfigError) as info:
        parse_document(upstream_doc(**spec_change))
    assert field in str(info.value)

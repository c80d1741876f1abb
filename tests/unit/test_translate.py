"""translate(): golden Envoy resources for examples/petstore, and the properties the gateway relies on.

Regenerate the golden files with LAMBDAGATE_UPDATE_GOLDEN=1 after an intended change, and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from controlplane.model import parse_document, resolve
from controlplane.model.resources import Endpoint
from controlplane.sources.files import FileSource
from controlplane.translate.envoy import (
    EXTPROC_CLUSTER,
    TranslateOptions,
    Translation,
    invoke_path,
    translate,
)

REPO = Path(__file__).resolve().parents[2]
PETSTORE = REPO / "examples" / "petstore"
GOLDEN = REPO / "tests" / "golden"
LOCAL = Endpoint("http", "127.0.0.1", 9001)
UPDATE = os.environ.get("LAMBDAGATE_UPDATE_GOLDEN") == "1"

SECRET_KEY = "translate-secret-key-value-XYZ123"
TOKEN = "translate-session-token-value-ABC987"


def petstore_config():
    result = FileSource(PETSTORE, local_endpoint=LOCAL).load()
    assert result.errors == [], [str(e) for e in result.errors]
    return result.config


def petstore_docs():
    return list(yaml.safe_load_all((PETSTORE / "petstore.yaml").read_text()))


def config_from(docs, local=None):
    res = resolve([parse_document(copy.deepcopy(d)) for d in docs], local_endpoint=local)
    assert res.errors == {}, {str(k): str(v) for k, v in res.errors.items()}
    return res.config


def aws_variant_docs(**upstream_spec):
    """The petstore pointed at AWS (no endpoint), with a session token in its Secret."""
    docs = petstore_docs()
    secret, upstream, _vs = docs
    secret["stringData"] = {"access_key": "ASIAPETSTORE", "secret_key": SECRET_KEY, "session_token": TOKEN}
    del upstream["spec"]["endpoint"]
    upstream["spec"].update(upstream_spec)
    return docs


def to_json(messages) -> str:
    items = [json.loads(json_format.MessageToJson(m, sort_keys=True)) for m in messages]
    return json.dumps(items, indent=2, sort_keys=True) + "\n"


def route_table_json(t: Translation) -> str:
    table = {
        name: {
            "virtual_service": rt.virtual_service,
            "upstream": rt.upstream,
            "function": rt.function,
            "function_name": rt.function_name,
            "qualifier": rt.qualifier,
            "invoke_path": rt.invoke_path,
            "scheme": rt.scheme,
            "authority": rt.authority,
            "region": rt.region,
            "has_credentials": rt.credentials is not None,
            "resource": rt.resource,
            "stage": rt.stage,
        }
        for name, rt in t.route_table.items()
    }
    return json.dumps(table, indent=2, sort_keys=True) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing; run with LAMBDAGATE_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text()
    assert text == expected, (
        f"{name} differs from the golden file; rerun with LAMBDAGATE_UPDATE_GOLDEN=1 if intended"
    )


# ---------------------------------------------------------------------------------------------------------------
# Golden files


@pytest.fixture(scope="module")
def petstore() -> Translation:
    return translate(petstore_config(), TranslateOptions())


@pytest.mark.parametrize("kind", ["clusters", "listeners", "routes"])
def test_petstore_golden(petstore: Translation, kind: str):
    check_golden(f"petstore_{kind}.json", to_json(getattr(petstore, kind)))


def test_petstore_route_table_golden(petstore: Translation):
    check_golden("petstore_route_table.json", route_table_json(petstore))


def test_petstore_aws_variant_golden():
    t = translate(
        config_from(aws_variant_docs()), TranslateOptions(listen_port=9090, ca_bundle="/etc/ca.pem")
    )
    check_golden("petstore_aws_clusters.json", to_json(t.clusters))
    check_golden("petstore_aws_routes.json", to_json(t.routes))


def test_translation_is_deterministic(petstore: Translation):
    again = translate(petstore_config(), TranslateOptions())
    assert to_json(again.clusters) == to_json(petstore.clusters)
    assert to_json(again.listeners) == to_json(petstore.listeners)
    assert [r.SerializeToString(deterministic=True) for r in again.routes] == [
        r.SerializeToString(deterministic=True) for r in petstore.routes
    ]
    assert again.route_table == petstore.route_table


# ---------------------------------------------------------------------------------------------------------------
# Properties


def test_petstore_shape(petstore: Translation):
    res = petstore.resources()
    assert set(res) == {
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    }
    assert sorted(c.name for c in petstore.clusters) == sorted(
        [EXTPROC_CLUSTER, "lambda_http_127.0.0.1_9001"]
    )
    local = next(c for c in petstore.clusters if c.name.startswith("lambda_"))
    assert local.type == cluster_pb2.Cluster.STATIC
    assert not local.HasField("transport_socket")  # plain http to the local endpoint
    sa = local.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("127.0.0.1", 9001)

    (rc,) = petstore.routes
    (vh,) = rc.virtual_hosts
    assert list(vh.domains) == ["*"]
    assert len(vh.routes) == 4
    list_pets, create_pet, get_pet, delete_pet = vh.routes
    assert list_pets.match.path == "/pets"
    assert get_pet.match.safe_regex.regex == "^/pets/(?P<petId>[^/]+)$"

    def method_regex(r):
        return r.match.headers[0].string_match.safe_regex.regex

    assert method_regex(list_pets) == "^(GET|HEAD)$"
    assert method_regex(create_pet) == "^(POST)$"
    assert method_regex(delete_pet) == "^(DELETE)$"
    assert all(r.route.cluster == "lambda_http_127.0.0.1_9001" for r in vh.routes)
    assert all(r.route.timeout.seconds == 30 for r in vh.routes)

    targets = [petstore.route_table[r.name] for r in vh.routes]
    assert [t.function for t in targets] == ["list-pets", "create-pet", "get-pet", "delete-pet"]
    get_target = targets[2]
    assert get_target.invoke_path == "/2015-03-31/functions/PetsPetIdGetFunction/invocations?Qualifier=live"
    assert get_target.authority == "127.0.0.1:9001"
    assert get_target.scheme == "http"
    assert get_target.stage == "v1"
    assert get_target.resource == "/pets/{petId}"
    assert get_target.credentials.access_key == "AKIDLOCALPETSTORE"


def test_no_secret_in_envoy_resources():
    t = translate(config_from(aws_variant_docs()), TranslateOptions())
    # The route table holds them (ext_proc signs with them) ...
    assert any(rt.credentials and rt.credentials.secret_key == SECRET_KEY for rt in t.route_table.values())
    # ... but nothing sent to Envoy does, in any encoding.
    for by_name in t.resources().values():
        for msg in by_name.values():
            blobs = [msg.SerializeToString(), json_format.MessageToJson(msg).encode(), str(msg).encode()]
            for blob in blobs:
                for secret in (SECRET_KEY, TOKEN, "ASIAPETSTORE"):
                    assert secret.encode() not in blob
    # Nor the route table's repr, which may reach a log.
    assert SECRET_KEY not in repr(t.route_table) and TOKEN not in repr(t.route_table)


def test_petstore_local_secret_not_in_envoy_resources(petstore: Translation):
    for by_name in petstore.resources().values():
        for msg in by_name.values():
            assert b"local-petstore-secret-not-for-aws" not in msg.SerializeToString()


def _tls_context(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(ctx)
    return ctx


def test_https_endpoint_gives_tls_cluster_with_sni():
    t = translate(
        config_from(aws_variant_docs(endpoint="https://lambda.example.internal:8443")),
        TranslateOptions(ca_bundle="/ca.pem"),
    )
    (cluster,) = [c for c in t.clusters if c.name != EXTPROC_CLUSTER]
    assert cluster.name == "lambda_https_lambda.example.internal_8443"
    assert cluster.type == cluster_pb2.Cluster.LOGICAL_DNS
    ctx = _tls_context(cluster)
    assert ctx.sni == "lambda.example.internal"
    vc = ctx.common_tls_context.validation_context
    assert vc.trusted_ca.filename == "/ca.pem"
    assert [m.matcher.exact for m in vc.match_typed_subject_alt_names] == ["lambda.example.internal"]
    sa = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == ("lambda.example.internal", 8443)
    assert {rt.authority for rt in t.route_table.values()} == {"lambda.example.internal:8443"}


def test_absent_endpoint_means_regional_lambda_over_tls():
    t = translate(config_from(aws_variant_docs(region="eu-central-1")), TranslateOptions())
    (cluster,) = [c for c in t.clusters if c.name != EXTPROC_CLUSTER]
    host = "lambda.eu-central-1.amazonaws.com"
    assert cluster.name == f"lambda_https_{host}_443"
    sa = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sa.address, sa.port_value) == (host, 443)
    assert _tls_context(cluster).sni == host
    for rt in t.route_table.values():
        assert (rt.scheme, rt.authority, rt.region) == ("https", host, "eu-central-1")


def test_http_endpoint_by_name_is_plain_dns_cluster():
    t = translate(config_from(aws_variant_docs(endpoint="http://moto:5000")), TranslateOptions())
    (cluster,) = [c for c in t.clusters if c.name != EXTPROC_CLUSTER]
    assert cluster.type == cluster_pb2.Cluster.LOGICAL_DNS
    assert not cluster.HasField("transport_socket")
    assert {rt.authority for rt in t.route_table.values()} == {"moto:5000"}


def _route_names(config) -> list[str]:
    t = translate(config, TranslateOptions())
    return [r.name for r in t.routes[0].virtual_hosts[0].routes]


def test_route_names_are_stable_across_processes(petstore: Translation):
    names = [r.name for r in petstore.routes[0].virtual_hosts[0].routes]
    assert all(n.startswith("default/petstore/") for n in names)
    assert len(set(names)) == 4
    code = (
        "from pathlib import Path\n"
        "from controlplane.sources.files import FileSource\n"
        "from controlplane.model.resources import Endpoint\n"
        "from controlplane.translate.envoy import translate, TranslateOptions\n"
        f"cfg = FileSource(Path({str(PETSTORE)!r}), local_endpoint=Endpoint('http', '127.0.0.1', 9001)).load().config\n"
        "print('\\n'.join(r.name for r in translate(cfg, TranslateOptions()).routes[0].virtual_hosts[0].routes))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    assert out.stdout.split() == names


def test_route_name_changes_when_destination_changes():
    base = petstore_docs()
    before = _route_names(config_from(base, LOCAL))

    changed_fn = copy.deepcopy(base)
    changed_fn[2]["spec"]["routes"][0]["destination"]["function"] = "create-pet"
    after = _route_names(config_from(changed_fn, LOCAL))
    assert after[0] != before[0]
    assert after[1:] == before[1:]

    changed_qualifier = copy.deepcopy(base)
    changed_qualifier[1]["spec"]["functions"][2]["spec"]["qualifier"] = "canary"
    after = _route_names(config_from(changed_qualifier, LOCAL))
    assert after[2] != before[2]
    assert [after[i] for i in (0, 1, 3)] == [before[i] for i in (0, 1, 3)]

    changed_target = copy.deepcopy(base)
    changed_target[1]["spec"]["functions"][0]["spec"]["function_name"] = "OtherFunction"
    after = _route_names(config_from(changed_target, LOCAL))
    assert after[0] != before[0]

    # A change elsewhere (another domain) leaves the names alone.
    other_domain = copy.deepcopy(base)
    other_domain[2]["spec"]["domains"] = ["api.example.com"]
    assert _route_names(config_from(other_domain, LOCAL)) == before


def _hcm(t: Translation) -> hcm_pb2.HttpConnectionManager:
    (listener,) = t.listeners
    (chain,) = listener.filter_chains
    (f,) = chain.filters
    hcm = hcm_pb2.HttpConnectionManager()
    assert f.typed_config.Unpack(hcm)
    return hcm


def test_ext_proc_filter_is_fail_closed_and_retains_route(petstore: Translation):
    hcm = _hcm(petstore)
    names = [f.name for f in hcm.http_filters]
    # CORS and the local rate limit answer before ext_proc (see test_translate_gateway_features.py).
    assert names == [
        "envoy.filters.http.cors",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    # ext_proc is wrapped in a matcher that skips it for the local rate limit's 429.
    wrapped = extension_matcher_pb2.ExtensionWithMatcher()
    assert hcm.http_filters[2].typed_config.Unpack(wrapped)
    assert wrapped.extension_config.name == "envoy.filters.http.ext_proc"
    ep = ext_proc_pb2.ExternalProcessor()
    assert wrapped.extension_config.typed_config.Unpack(ep)
    assert ep.failure_mode_allow is False
    assert ep.route_cache_action == ext_proc_pb2.ExternalProcessor.RETAIN
    assert ep.grpc_service.envoy_grpc.cluster_name == EXTPROC_CLUSTER
    mode = ep.processing_mode
    assert mode.request_body_mode == mode.BUFFERED
    assert mode.response_body_mode == mode.BUFFERED
    assert "xds.route_name" in ep.request_attributes
    assert ep.mutation_rules.disallow_is_error.value is True
    assert hcm.rds.route_config_name == petstore.routes[0].name


def test_listener_and_extproc_cluster_follow_options():
    t = translate(
        petstore_config(),
        TranslateOptions(
            listen_address="0.0.0.0",
            listen_port=9999,
            extproc_host="extproc",
            extproc_port=18001,
            route_timeout_s=12.5,
        ),
    )
    sa = t.listeners[0].address.socket_address
    assert (sa.address, sa.port_value) == ("0.0.0.0", 9999)
    ext = next(c for c in t.clusters if c.name == EXTPROC_CLUSTER)
    esa = ext.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (esa.address, esa.port_value) == ("extproc", 18001)
    assert ext.type == cluster_pb2.Cluster.STRICT_DNS
    r = t.routes[0].virtual_hosts[0].routes[0]
    assert (r.route.timeout.seconds, r.route.timeout.nanos) == (12, 500_000_000)


def test_empty_config_still_has_listener_and_extproc():
    from controlplane.model import Config

    t = translate(Config(), TranslateOptions())
    assert [c.name for c in t.clusters] == [EXTPROC_CLUSTER]
    assert len(t.listeners) == 1
    assert list(t.routes[0].virtual_hosts) == []
    assert t.route_table == {}


def test_invoke_path_encoding():
    assert invoke_path("f", None) == "/2015-03-31/functions/f/invocations"
    assert invoke_path("f", "$LATEST") == "/2015-03-31/functions/f/invocations?Qualifier=%24LATEST"
    assert (
        invoke_path("123456789012:function:f", "7")
        == "/2015-03-31/functions/123456789012%3Afunction%3Af/invocations?Qualifier=7"
    )

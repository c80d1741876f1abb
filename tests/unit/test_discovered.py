"""Discovered functions in the model: spec.discovery and role_arn, the stored record, and how routes see them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_model import rejected, secret_doc, upstream_doc, vs_doc

from controlplane.model import ConfigError, parse_document, resolve
from controlplane.model.discovered import (
    FAILED,
    LISTED,
    DiscoveryRecord,
    ListedFunction,
    parse_record,
    with_discovered,
)
from controlplane.model.resources import DiscoverySettings, Function, Upstream
from controlplane.sources.files import FileSource, state_path

RECORD = DiscoveryRecord(
    LISTED,
    functions=(
        ListedFunction("orders", ("1", "2"), (("live", "2"),)),
        ListedFunction("users"),
    ),
)


# --- spec.discovery and spec.role_arn --------------------------------------------------------------------


def test_discovery_settings_parse_with_defaults() -> None:
    up = parse_document(upstream_doc())
    assert isinstance(up, Upstream)
    assert up.discovery == DiscoverySettings(enabled=True, name_prefix=None, tags=())
    assert up.role_arn is None

    up = parse_document(
        upstream_doc(
            discovery={"enabled": False, "name_prefix": "Pets", "tags": {"team": "pets", "tier": 1}},
            role_arn="arn:aws:iam::123456789012:role/lambdagate-reader",
        )
    )
    assert isinstance(up, Upstream)
    assert up.discovery == DiscoverySettings(False, "Pets", (("team", "pets"), ("tier", "1")))
    assert up.role_arn == "arn:aws:iam::123456789012:role/lambdagate-reader"


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"discovery": {"enabled": "no"}}, "spec.discovery.enabled", "true or false"),
        ({"discovery": {"interval": "5m"}}, "spec.discovery.interval", "unknown field"),
        ({"discovery": {"name_prefix": "Pets/*"}}, "spec.discovery.name_prefix", "start of a Lambda"),
        ({"discovery": {"tags": {"team": ["a"]}}}, "spec.discovery.tags.team", "must be a string"),
        ({"discovery": {"tags": {"team": "x" * 257}}}, "spec.discovery.tags.team", "at most 256"),
        ({"discovery": ["on"]}, "spec.discovery", "mapping"),
        ({"role_arn": "arn:aws:iam::123:role/x"}, "spec.role_arn", "IAM role ARN"),
        ({"role_arn": "arn:aws:iam::123456789012:user/x"}, "spec.role_arn", "IAM role ARN"),
    ],
)
def test_bad_discovery_fields_name_the_field(spec: dict[str, object], field: str, words: str) -> None:
    err = rejected(upstream_doc(**spec))
    assert err.field == field
    assert words in err.message
    assert err.obj == "Upstream default/lambdas"


# --- the stored record ------------------------------------------------------------------------------------


def test_record_expands_into_logical_names() -> None:
    assert RECORD.routable() == (
        Function("orders", "orders"),
        Function("orders:1", "orders", "1"),
        Function("orders:2", "orders", "2"),
        Function("orders:live", "orders", "live"),
        Function("users", "users"),
    )
    assert RECORD.name_count() == 5


def test_record_round_trips_sorted_and_stable() -> None:
    shuffled = DiscoveryRecord(
        LISTED,
        functions=(ListedFunction("users"), ListedFunction("orders", ("2", "1"), (("live", "2"),))),
    )
    status = shuffled.to_status()
    assert status == {
        "discovery": {"state": "Listed", "functionCount": 2, "names": 5},
        "functions": [
            {"function_name": "orders", "versions": ["1", "2"], "aliases": {"live": "2"}},
            {"function_name": "users"},
        ],
    }
    record, problems = parse_record(json.loads(json.dumps(status)))
    assert problems == []
    assert record is not None and record.to_status() == status
    assert parse_record({"state": "Accepted"}) == (None, [])  # the control plane's fields only


def test_bad_entries_are_skipped_and_named() -> None:
    record, problems = parse_record(
        {
            "discovery": {"state": "Exploded", "message": "x"},
            "functions": [
                {"function_name": "ok", "versions": ["1", "v2"], "aliases": {"live": "1"}},
                {"function_name": "no such/name"},
                "just a string",
                {"function_name": "ok"},
            ],
        }
    )
    assert record is not None
    assert record.state == FAILED
    assert [f.function_name for f in record.functions] == ["ok"]
    assert record.functions[0].versions == ("1",)
    assert problems == [
        "status.discovery.state: 'Exploded' is not one of Listed, Failed, TooLarge",
        "status.functions[0].versions[1]: 'v2' is not a version number",
        "status.functions[1].function_name: 'no such/name' is not a Lambda function name",
        "status.functions[2]: must be a mapping",
        "status.functions[3].function_name: 'ok' appears twice; the first counts",
    ]


# --- routes and discovered functions ----------------------------------------------------------------------


def _objects(up_spec: dict[str, object], vs_function: str) -> list[object]:
    vs = vs_doc(
        routes=[{"matcher": {"prefix": "/"}, "destination": {"upstream": "lambdas", "function": vs_function}}]
    )
    return [parse_document(secret_doc()), parse_document(upstream_doc(**up_spec)), parse_document(vs)]


def test_routes_may_name_discovered_functions_and_user_entries_win() -> None:
    objects = _objects(
        {"functions": [{"name": "orders", "spec": {"function_name": "legacy"}}]}, "orders:live"
    )
    up = objects[1]
    assert isinstance(up, Upstream)
    objects[1] = with_discovered(up, RECORD)
    result = resolve(objects)  # type: ignore[arg-type]
    assert result.errors == {}
    served = result.config.upstreams[0]
    assert served.function("orders:live") == Function("orders:live", "orders", "live")
    # `orders` is the user's own entry, not the discovered $LATEST of the function `orders`.
    assert served.function("orders") == Function("orders", "legacy")
    assert served.function_names() == ["orders", "orders:1", "orders:2", "orders:live", "users"]


def test_opting_out_drops_what_was_discovered() -> None:
    up = parse_document(upstream_doc(discovery={"enabled": False}))
    assert isinstance(up, Upstream)
    assert with_discovered(up, RECORD).discovered == ()


def test_a_route_to_an_undiscovered_function_is_rejected_with_a_short_list() -> None:
    many = DiscoveryRecord(LISTED, functions=tuple(ListedFunction(f"fn{i:03d}") for i in range(50)))
    objects = _objects({"functions": []}, "missing")
    up = objects[1]
    assert isinstance(up, Upstream)
    objects[1] = with_discovered(up, many)
    result = resolve(objects)  # type: ignore[arg-type]
    (error,) = result.errors.values()
    assert isinstance(error, ConfigError)
    assert error.field == "spec.routes[0].destination.function"
    assert "has no function 'missing'" in error.message
    assert "fn019 and 30 more" in error.message


# --- the file source reads the state file -----------------------------------------------------------------

CONFIG = """
apiVersion: v1
kind: Secret
metadata: {name: aws-creds}
stringData: {access_key: AKIDSTATE, secret_key: state-file-secret}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: lambdas}
spec:
  region: us-east-1
  secret_ref: aws-creds
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  domains: ["*"]
  routes:
  - matcher: {prefix: /orders}
    destination: {upstream: lambdas, function: "orders:live"}
"""


def _write_state(folder: Path, text: str) -> None:
    path = state_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_file_source_merges_the_state_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "api.yaml").write_text(CONFIG, encoding="utf-8")
    source = FileSource(tmp_path)
    # Before discovery ran, the route names an unknown function.
    assert [e.field for e in source.load().errors] == ["spec.routes[0].destination.function"]

    _write_state(tmp_path, json.dumps({"upstreams": {"default/lambdas": RECORD.to_status()}}))
    result = source.load()
    assert result.errors == []
    assert result.config.upstreams[0].function("orders:live") == Function("orders:live", "orders", "live")
    assert [f.name for f in source.files()] == ["api.yaml"]  # the state folder is not config

    # A half-written or broken state file keeps what was read before, and says so once.
    caplog.set_level(logging.ERROR)
    _write_state(tmp_path, '{"upstreams": {"default/lambdas": ')
    result = source.load()
    assert result.errors == []
    assert result.config.upstreams[0].function("orders:live") is not None
    assert sum("cannot be read" in r.getMessage() for r in caplog.records) == 1

    # A removed state file means nothing is discovered.
    state_path(tmp_path).unlink()
    result = source.load()
    assert [e.field for e in result.errors] == ["spec.routes[0].destination.function"]

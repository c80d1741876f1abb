"""The local Lambda endpoint's read APIs (ListFunctions, ListVersionsByFunction, ListAliases, GetFunction,
ListTags), driven by a real boto3 client and its paginators, as function discovery will call them.

Servers run on an event loop in a background thread so the blocking client can be used directly.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from harness import LoopThread, serve_local_lambda

from controlplane.locallambda import LocalLambda

AKID = "AKIDLISTINGTEST"
SECRET = "listing-test-secret"
REGION = "us-east-1"
ARN = f"arn:aws:lambda:{REGION}:000000000000:function:"

PETS = """
def latest(event, context):
    return {"v": "latest", "version": context.function_version}


def v1(event, context):
    return {"v": "1"}


def v2(event, context):
    return {"v": "2"}
"""

# Seven functions, declared out of order; Echo has versions 1, 2 and 10 (numeric order, not string order).
FUNCTIONS_YAML = """
functions:
- name: Zeta
  handler: pets.latest
- name: Echo
  handler: pets.latest
  description: Echoes pets
  timeout: 0.5
  tags: {team: pets, tier: 1}
  versions:
    "10": pets.v2
    "1": pets.v1
    "2": {handler: pets.v2, description: second release}
  aliases:
    live: "1"
    beta: {version: "$LATEST", description: tracks the head}
    canary: "10"
    prev: "1"
- {name: Alpha, handler: other.handler, tags: {team: core}}
- {name: beta-fn, handler: pets.latest}
- {name: Delta, handler: pets.latest}
- {name: Gamma_2, handler: pets.latest}
- {name: Kappa, handler: pets.latest}
"""
NAMES = sorted(["Zeta", "Echo", "Alpha", "beta-fn", "Delta", "Gamma_2", "Kappa"])
LAST_MODIFIED_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000")


def _serve(runner: LoopThread, folder: Path, **kwargs: Any) -> Iterator[LocalLambda]:
    yield from serve_local_lambda(runner, folder, {AKID: SECRET}, **kwargs)


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def _make_folder(folder: Path) -> Path:
    _write(folder / "pets.py", PETS)
    _write(folder / "other.py", "def handler(event, context):\n    return 'other'\n")
    _write(folder / "functions.yaml", FUNCTIONS_YAML)
    return folder


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("listing_functions"))


@pytest.fixture(scope="module")
def server(loop_thread: LoopThread, yaml_dir: Path) -> Iterator[LocalLambda]:
    yield from _serve(loop_thread, yaml_dir, region=REGION)


@pytest.fixture(scope="module")
def synthetic_server(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalLambda]:
    folder = tmp_path_factory.mktemp("listing_synthetic")
    _write(folder / "hello.py", "def handler(event, context):\n    return 'hello'\n")
    yield from _serve(loop_thread, folder, synthetic=120)


def _client(server: LocalLambda, **kwargs: Any) -> Any:
    config = Config(
        retries={"total_max_attempts": 1},
        read_timeout=10,
        connect_timeout=5,
        parameter_validation=kwargs.pop("parameter_validation", True),
    )
    options: dict[str, Any] = {
        "region_name": REGION,
        "aws_access_key_id": AKID,
        "aws_secret_access_key": SECRET,
    }
    options.update(kwargs)
    return boto3.client("lambda", endpoint_url=server.url, config=config, **options)


@pytest.fixture(scope="module")
def client(server: LocalLambda) -> Any:
    return _client(server)


@pytest.fixture(scope="module")
def synthetic_client(synthetic_server: LocalLambda) -> Any:
    return _client(synthetic_server)


def _error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def _pages(client: Any, operation: str, **kwargs: Any) -> list[dict[str, Any]]:
    return list(client.get_paginator(operation).paginate(**kwargs))


def _sha256_b64(path: Path) -> str:
    return base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


# --- ListFunctions ---------------------------------------------------------------------------------


def test_list_functions_paginates_all_in_name_order(client: Any, yaml_dir: Path) -> None:
    pages = _pages(client, "list_functions", PaginationConfig={"PageSize": 3})
    assert [len(page["Functions"]) for page in pages] == [3, 3, 1]
    assert all("NextMarker" in page for page in pages[:-1])
    assert "NextMarker" not in pages[-1]
    names = [fn["FunctionName"] for page in pages for fn in page["Functions"]]
    assert names == NAMES
    # A marker is opaque, not the name it continues after.
    assert pages[0]["NextMarker"] not in NAMES

    echo = next(fn for page in pages for fn in page["Functions"] if fn["FunctionName"] == "Echo")
    assert echo["FunctionArn"] == ARN + "Echo"
    assert echo["Runtime"].startswith("python3.")
    assert echo["Handler"] == "pets.latest"
    assert echo["Version"] == "$LATEST"
    assert echo["Description"] == "Echoes pets"
    assert echo["Timeout"] == 1  # whole seconds, as Lambda reports them
    assert echo["MemorySize"] == 128
    assert echo["PackageType"] == "Zip"
    assert echo["CodeSha256"] == _sha256_b64(yaml_dir / "pets.py")
    assert echo["CodeSize"] == (yaml_dir / "pets.py").stat().st_size
    assert LAST_MODIFIED_RE.fullmatch(echo["LastModified"])
    assert echo["RevisionId"]
    # Tags come from ListTags/GetFunction only; State and LastUpdateStatus from GetFunction only.
    for absent in ("Tags", "State", "LastUpdateStatus"):
        assert absent not in echo

    alpha = next(fn for page in pages for fn in page["Functions"] if fn["FunctionName"] == "Alpha")
    assert alpha["CodeSha256"] == _sha256_b64(yaml_dir / "other.py")
    assert alpha["Description"] == ""


def test_list_functions_default_page_and_stable_markers(client: Any) -> None:
    whole = client.list_functions()
    assert [fn["FunctionName"] for fn in whole["Functions"]] == NAMES
    assert "NextMarker" not in whole
    first = client.list_functions(MaxItems=2)
    again = client.list_functions(MaxItems=2, Marker=first["NextMarker"])
    repeat = client.list_functions(MaxItems=2, Marker=first["NextMarker"])
    assert again["Functions"] == repeat["Functions"]
    assert [fn["FunctionName"] for fn in again["Functions"]] == NAMES[2:4]


def test_list_functions_all_versions(client: Any) -> None:
    pages = _pages(client, "list_functions", FunctionVersion="ALL", PaginationConfig={"PageSize": 4})
    entries = [(fn["FunctionName"], fn["Version"]) for page in pages for fn in page["Functions"]]
    expected = []
    for name in NAMES:
        expected.append((name, "$LATEST"))
        if name == "Echo":
            expected += [("Echo", "1"), ("Echo", "2"), ("Echo", "10")]
    assert entries == expected
    assert len(pages) == 3  # 10 entries, 4 per page
    by_key = {(fn["FunctionName"], fn["Version"]): fn for page in pages for fn in page["Functions"]}
    assert by_key["Echo", "$LATEST"]["FunctionArn"] == ARN + "Echo:$LATEST"
    assert by_key["Echo", "1"]["FunctionArn"] == ARN + "Echo:1"
    assert by_key["Echo", "1"]["Handler"] == "pets.v1"
    assert by_key["Echo", "2"]["Description"] == "second release"
    assert by_key["Echo", "10"]["Description"] == "Echoes pets"  # a version without one keeps the function's


def test_marker_continues_after_its_name_when_functions_change(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    folder = _make_folder(tmp_path)
    for server in _serve(loop_thread, folder, region=REGION):
        client = _client(server)
        first = client.list_functions(MaxItems=3)
        assert [fn["FunctionName"] for fn in first["Functions"]] == NAMES[:3]
        # A function sorting before the marker appears, and one of the next page goes away.
        yaml_text = FUNCTIONS_YAML.replace("- {name: Kappa, handler: pets.latest}\n", "")
        _write(folder / "functions.yaml", yaml_text + "- {name: AAA, handler: pets.latest}\n")
        server.reload()
        assert client.list_functions(MaxItems=1)["Functions"][0]["FunctionName"] == "AAA"
        second = client.list_functions(MaxItems=3, Marker=first["NextMarker"])
        assert [fn["FunctionName"] for fn in second["Functions"]] == [n for n in NAMES[3:] if n != "Kappa"][
            :3
        ]


# --- ListVersionsByFunction and ListAliases --------------------------------------------------------


def test_list_versions_by_function(client: Any) -> None:
    pages = _pages(client, "list_versions_by_function", FunctionName="Echo", PaginationConfig={"PageSize": 3})
    assert [len(page["Versions"]) for page in pages] == [3, 1]
    versions = [v for page in pages for v in page["Versions"]]
    assert [v["Version"] for v in versions] == ["$LATEST", "1", "2", "10"]
    assert [v["FunctionArn"] for v in versions] == [ARN + f"Echo:{q}" for q in ("$LATEST", "1", "2", "10")]
    assert [v["Handler"] for v in versions] == ["pets.latest", "pets.v1", "pets.v2", "pets.v2"]
    assert all(v["FunctionName"] == "Echo" and "State" not in v for v in versions)

    # By ARN too; a function without published versions has $LATEST only.
    only = client.list_versions_by_function(FunctionName=ARN + "Zeta")
    assert [v["Version"] for v in only["Versions"]] == ["$LATEST"]
    assert "NextMarker" not in only


def test_list_aliases(client: Any) -> None:
    pages = _pages(client, "list_aliases", FunctionName="Echo", PaginationConfig={"PageSize": 1})
    assert len(pages) == 4
    aliases = [a for page in pages for a in page["Aliases"]]
    assert [a["Name"] for a in aliases] == ["beta", "canary", "live", "prev"]
    beta = aliases[0]
    assert set(beta) == {"AliasArn", "Name", "FunctionVersion", "Description", "RevisionId"}
    assert beta["AliasArn"] == ARN + "Echo:beta"
    assert beta["FunctionVersion"] == "$LATEST"
    assert beta["Description"] == "tracks the head"
    assert aliases[2]["Description"] == ""

    filtered = client.list_aliases(FunctionName="Echo", FunctionVersion="1")
    assert [(a["Name"], a["FunctionVersion"]) for a in filtered["Aliases"]] == [("live", "1"), ("prev", "1")]
    assert client.list_aliases(FunctionName="Zeta")["Aliases"] == []


# --- GetFunction and ListTags ----------------------------------------------------------------------


def test_get_function(client: Any, yaml_dir: Path) -> None:
    response = client.get_function(FunctionName="Echo")
    config = response["Configuration"]
    assert config["FunctionArn"] == ARN + "Echo"
    assert config["Version"] == "$LATEST"
    assert config["Handler"] == "pets.latest"
    assert config["State"] == "Active"
    assert config["LastUpdateStatus"] == "Successful"
    assert response["Code"]["RepositoryType"] == "S3"
    assert response["Code"]["Location"]
    assert response["Tags"] == {"team": "pets", "tier": "1"}
    listed = next(fn for fn in client.list_functions()["Functions"] if fn["FunctionName"] == "Echo")
    assert {k: v for k, v in config.items() if k in listed} == listed

    # An alias resolves to its version's configuration, under the alias's ARN.
    live = client.get_function(FunctionName="Echo", Qualifier="live")["Configuration"]
    assert (live["Version"], live["Handler"], live["FunctionArn"]) == ("1", "pets.v1", ARN + "Echo:live")
    version = client.get_function(FunctionName="Echo:2")["Configuration"]
    assert (version["Version"], version["FunctionArn"]) == ("2", ARN + "Echo:2")
    latest = client.get_function(FunctionName=ARN + "Echo", Qualifier="$LATEST")["Configuration"]
    assert (latest["Version"], latest["FunctionArn"]) == ("$LATEST", ARN + "Echo:$LATEST")

    untagged = client.get_function(FunctionName="Zeta")
    assert "Tags" not in untagged  # as AWS: no Tags member for a function without tags


def test_list_tags(client: Any, synthetic_client: Any) -> None:
    assert client.list_tags(Resource=ARN + "Echo")["Tags"] == {"team": "pets", "tier": "1"}
    assert client.list_tags(Resource=ARN + "Alpha")["Tags"] == {"team": "core"}
    assert client.list_tags(Resource=ARN + "Zeta")["Tags"] == {}
    with pytest.raises(ClientError) as excinfo:
        client.list_tags(Resource=ARN + "Echo:live")
    assert _error_code(excinfo) == "InvalidParameterValueException"
    with pytest.raises(ClientError) as excinfo:
        client.list_tags(Resource=ARN + "Nope")
    assert _error_code(excinfo) == "ResourceNotFoundException"
    with pytest.raises(ClientError) as excinfo:
        client.list_tags(Resource="Echo")
    assert _error_code(excinfo) == "ValidationException"
    # Functions of a folder without functions.yaml have no tags.
    assert synthetic_client.list_tags(Resource=ARN + "hello")["Tags"] == {}


# --- errors ----------------------------------------------------------------------------------------


def test_max_items_out_of_range(server: LocalLambda, client: Any) -> None:
    unchecked = _client(server, parameter_validation=False)  # botocore itself refuses MaxItems < 1
    calls = [
        lambda: client.list_functions(MaxItems=10001),
        lambda: unchecked.list_functions(MaxItems=0),
        lambda: unchecked.list_functions(MaxItems="many"),
        lambda: client.list_versions_by_function(FunctionName="Echo", MaxItems=10001),
        lambda: unchecked.list_aliases(FunctionName="Echo", MaxItems=-1),
    ]
    for call in calls:
        with pytest.raises(ClientError) as excinfo:
            call()
        assert _error_code(excinfo) == "InvalidParameterValueException"
        assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_bad_marker_and_function_version(client: Any) -> None:
    first = client.list_functions(MaxItems=1)
    for marker in ("not-a-marker", first["NextMarker"] + "x"):
        with pytest.raises(ClientError) as excinfo:
            client.list_functions(Marker=marker)
        assert _error_code(excinfo) == "InvalidParameterValueException"
    # A ListFunctions marker is no ListAliases marker.
    with pytest.raises(ClientError) as excinfo:
        client.list_aliases(FunctionName="Echo", Marker=first["NextMarker"])
    assert _error_code(excinfo) == "InvalidParameterValueException"
    with pytest.raises(ClientError) as excinfo:
        client.list_functions(FunctionVersion="SOME")
    assert _error_code(excinfo) == "ValidationException"


def test_unknown_function(client: Any) -> None:
    calls = [
        lambda: client.list_versions_by_function(FunctionName="Nope"),
        lambda: client.list_aliases(FunctionName="Nope"),
        lambda: client.get_function(FunctionName="Nope"),
        lambda: client.get_function(FunctionName="Echo", Qualifier="7"),
        lambda: client.get_function(FunctionName="Echo", Qualifier="nosuchalias"),
        lambda: client.list_versions_by_function(
            FunctionName="arn:aws:lambda:eu-west-1:000000000000:function:Echo"
        ),
    ]
    for call in calls:
        with pytest.raises(ClientError) as excinfo:
            call()
        assert _error_code(excinfo) == "ResourceNotFoundException"
        assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        assert "Function not found: arn:aws:lambda:" in excinfo.value.response["Error"]["Message"]


def test_wrong_secret_is_invalid_signature(server: LocalLambda) -> None:
    client = _client(server, aws_secret_access_key="not-the-secret")
    calls = [
        lambda: client.list_functions(),
        lambda: client.list_functions(MaxItems=2, FunctionVersion="ALL"),
        lambda: client.get_function(FunctionName="Echo", Qualifier="live"),
        lambda: client.list_versions_by_function(FunctionName="Echo"),
        lambda: client.list_aliases(FunctionName="Echo"),
        lambda: client.list_tags(Resource=ARN + "Echo"),
    ]
    for call in calls:
        with pytest.raises(ClientError) as excinfo:
            call()
        assert _error_code(excinfo) == "InvalidSignatureException"
        assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unsigned_get_is_rejected(server: LocalLambda) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/2015-03-31/functions/?MaxItems=2")
        response = conn.getresponse()
        assert response.status == 403
        assert response.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
        response.read()
    finally:
        conn.close()


# --- the synthetic catalogue -----------------------------------------------------------------------


def test_synthetic_catalogue(synthetic_client: Any) -> None:
    client = synthetic_client
    pages = _pages(client, "list_functions")
    assert [len(page["Functions"]) for page in pages] == [50, 50, 21]  # 120 synthetic + hello.py
    names = [fn["FunctionName"] for page in pages for fn in page["Functions"]]
    assert names == ["hello", *(f"synth-{i:05d}" for i in range(1, 121))]

    # MaxItems above 50 is accepted and capped at 50, as on AWS.
    assert len(client.list_functions(MaxItems=500)["Functions"]) == 50

    versions = client.list_versions_by_function(FunctionName="synth-00042")["Versions"]
    assert [(v["Version"], v["FunctionArn"]) for v in versions] == [
        ("$LATEST", ARN + "synth-00042:$LATEST"),
        ("1", ARN + "synth-00042:1"),
        ("2", ARN + "synth-00042:2"),
        ("3", ARN + "synth-00042:3"),
    ]
    assert len({v["CodeSha256"] for v in versions}) == 1
    aliases = client.list_aliases(FunctionName="synth-00042")["Aliases"]
    assert [(a["Name"], a["FunctionVersion"], a["AliasArn"]) for a in aliases] == [
        ("live", "3", ARN + "synth-00042:live"),
        ("prev", "2", ARN + "synth-00042:prev"),
    ]
    everything = _pages(client, "list_functions", FunctionVersion="ALL")
    assert sum(len(page["Functions"]) for page in everything) == 1 + 120 * 4

    # Synthetic functions echo their event, through aliases too.
    response = client.invoke(FunctionName="synth-00042", Qualifier="live", Payload=b'{"ping": 1}')
    assert json.loads(response["Payload"].read()) == {"ping": 1}
    assert response["ExecutedVersion"] == "3"
    config = client.get_function(FunctionName="synth-00120:prev")["Configuration"]
    assert (config["Version"], config["FunctionArn"]) == ("2", ARN + "synth-00120:prev")


def test_synthetic_catalogue_of_ten_thousand_is_cheap_per_page(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    for server in _serve(loop_thread, tmp_path, synthetic=10_000):
        client = _client(server)
        started = time.perf_counter()
        first = client.list_functions()
        deep = client.list_functions(Marker=first["NextMarker"])
        tail = client.list_aliases(FunctionName="synth-10000")
        assert [fn["FunctionName"] for fn in deep["Functions"]][0] == "synth-00051"
        assert [a["Name"] for a in tail["Aliases"]] == ["live", "prev"]
        assert time.perf_counter() - started < 2


# --- latency ---------------------------------------------------------------------------------------


def test_latency_delays_read_calls_without_blocking_the_loop(loop_thread: LoopThread, yaml_dir: Path) -> None:
    for server in _serve(loop_thread, yaml_dir, region=REGION, latency_s=0.3):
        client = _client(server)
        client.list_functions(MaxItems=1)  # connection set up outside the timings
        started = time.perf_counter()
        client.list_tags(Resource=ARN + "Echo")
        assert time.perf_counter() - started >= 0.3

        # Invoke is not delayed, even while read calls are waiting.
        with ThreadPoolExecutor(4) as pool:
            started = time.perf_counter()
            waits = [pool.submit(_client(server).list_functions) for _ in range(3)]
            invoked = client.invoke(FunctionName="Echo")
            invoke_s = time.perf_counter() - started
            for wait in waits:
                wait.result()
            total_s = time.perf_counter() - started
        assert json.loads(invoked["Payload"].read())["v"] == "latest"
        assert invoke_s < 0.3
        assert total_s < 0.9  # the three delayed calls overlapped

        server.latency_s = 0
        started = time.perf_counter()
        client.list_functions()
        assert time.perf_counter() - started < 0.3


def test_constructor_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalLambda(tmp_path, {}, latency_s=-1)
    with pytest.raises(ValueError):
        LocalLambda(tmp_path, {}, synthetic=-5)

"""FileSource on temporary folders: what applies, what is rejected (with file, object and field), what is kept."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from controlplane.model import ObjectKey
from controlplane.model.resources import Endpoint
from controlplane.sources.files import FileSource, LoadResult

SECRET_VALUE = "file-source-secret-value-0123456789"

SECRET = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws-creds}}
stringData:
  access_key: AKIDFILES
  secret_key: {SECRET_VALUE}
"""

UPSTREAM = """
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: lambdas}
spec:
  region: us-east-1
  secret_ref: aws-creds
  functions:
  - name: list-pets
    spec: {function_name: PetsGet}
  - name: get-pet
    spec: {function_name: PetsPetIdGet}
"""

VS = """
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: petstore}
spec:
  domains: ["*"]
  routes:
  - matcher: {path: /pets, methods: [GET]}
    destination: {upstream: lambdas, function: list-pets}
"""

OTHER_VS = """
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: admin}
spec:
  domains: [admin.example.com]
  routes:
  - matcher: {path: "/admin/{id}"}
    destination: {upstream: lambdas, function: get-pet}
"""

UP_KEY = ObjectKey("Upstream", "default", "lambdas")
VS_KEY = ObjectKey("VirtualService", "default", "petstore")
ADMIN_KEY = ObjectKey("VirtualService", "default", "admin")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def keys(result: LoadResult) -> set[ObjectKey]:
    cfg = result.config
    return {o.key for o in (*cfg.upstreams, *cfg.virtual_services, *cfg.secrets)}


def error_texts(result: LoadResult) -> list[str]:
    return [str(e) for e in result.errors]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    return d


def test_good_folder(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yml", UPSTREAM)
    write(folder, "routes/petstore.yaml", VS)  # nested folders are read
    result = FileSource(folder).load()
    assert result.errors == []
    assert keys(result) == {UP_KEY, VS_KEY, ObjectKey("Secret", "default", "aws-creds")}
    assert [s.name for s in result.secrets] == ["aws-creds"]


def test_multi_document_file(folder: Path):
    write(folder, "all.yaml", SECRET + "---" + UPSTREAM + "---" + VS + "---\n")
    result = FileSource(folder).load()
    assert result.errors == []
    assert keys(result) >= {UP_KEY, VS_KEY}


def test_json_file_is_read(folder: Path):
    write(folder, "all.yaml", SECRET + "---" + UPSTREAM)
    write(
        folder,
        "vs.json",
        '{"apiVersion": "lambdagate.io/v1", "kind": "VirtualService", "metadata": {"name": "petstore"},'
        ' "spec": {"routes": [{"matcher": {"prefix": "/"}, "destination": {"upstream": "lambdas", "function": "list-pets"}}]}}',
    )
    result = FileSource(folder).load()
    assert result.errors == []
    assert VS_KEY in keys(result)


def test_broken_yaml_in_one_file_other_files_still_apply(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yaml", UPSTREAM)
    write(folder, "petstore.yaml", VS)
    write(folder, "admin.yaml", "kind: VirtualService\nmetadata: {name: admin\nspec: [\n")
    result = FileSource(folder).load()
    assert VS_KEY in keys(result) and UP_KEY in keys(result)
    (err,) = result.errors
    assert err.source == "admin.yaml"
    assert "invalid YAML" in str(err)
    assert str(err).startswith("admin.yaml: line ")


def test_bad_document_error_names_file_object_and_field(folder: Path):
    write(folder, "secret.yaml", SECRET)
    bad_upstream = UPSTREAM.replace("region: us-east-1", "region: mars-1")
    write(folder, "upstream.yaml", bad_upstream)
    write(folder, "petstore.yaml", VS)
    result = FileSource(folder).load()
    texts = error_texts(result)
    assert any(
        t.startswith("upstream.yaml: Upstream default/lambdas: field spec.region:") and "mars-1" in t
        for t in texts
    ), texts
    # The VirtualService depends on it, so it is rejected too, naming its own file.
    assert any(
        t.startswith(
            "petstore.yaml: VirtualService default/petstore: field spec.routes[0].destination.upstream:"
        )
        for t in texts
    ), texts
    assert keys(result) == set()


def test_multi_document_error_names_the_document(folder: Path):
    bad_vs = VS.replace("methods: [GET]", "methods: [FETCH]")
    write(folder, "all.yaml", SECRET + "---" + UPSTREAM + "---" + bad_vs)
    result = FileSource(folder).load()
    (err,) = result.parse_errors
    assert str(err).startswith(
        "all.yaml (document 3): VirtualService default/petstore: field spec.routes[0].matcher.methods[0]:"
    )
    # The good documents of that file apply.
    assert UP_KEY in keys(result)


def test_odd_documents(folder: Path):
    write(folder, "all.yaml", SECRET + "---" + UPSTREAM)
    write(folder, "empty.yaml", "")
    write(folder, "comments.yaml", "# nothing here yet\n---\n")
    write(folder, "scalar.yaml", "just a string\n")
    write(folder, "nometa.yaml", "apiVersion: lambdagate.io/v1\nkind: Upstream\nspec: {region: us-east-1}\n")
    result = FileSource(folder).load()
    texts = sorted(error_texts(result))
    assert len(texts) == 2, texts
    assert texts[0].startswith("nometa.yaml: field metadata: missing")
    assert texts[1].startswith("scalar.yaml: a document must be a mapping")
    assert UP_KEY in keys(result)


def test_broken_yaml_on_repeated_loads_keeps_serving(folder: Path):
    write(folder, "secret.yaml", SECRET)
    up = write(folder, "upstream.yaml", UPSTREAM)
    write(folder, "petstore.yaml", VS)
    source = FileSource(folder)
    good = source.load().config
    up.write_text("spec: [\n")
    for _ in range(3):
        result = source.load()
        assert result.config == good
        assert len(result.errors) == 1
    # Emptying the file is a deliberate removal, not an error: its objects go.
    up.write_text("")
    result = source.load()
    assert result.config.upstreams == ()
    assert any("petstore.yaml" in t and "destination.upstream" in t for t in error_texts(result))


def test_unknown_kind_is_rejected_with_file_and_field(folder: Path):
    write(folder, "cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n")
    result = FileSource(folder).load()
    (err,) = result.errors
    assert str(err).startswith("cm.yaml: ConfigMap default/cm: field kind:")


def test_bad_edit_keeps_last_good_object(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yaml", UPSTREAM)
    vs_path = write(folder, "petstore.yaml", VS)
    source = FileSource(folder)
    first = source.load()
    assert first.errors == []
    good_vs = first.config.virtual_services

    # A parse-level error (bad method).
    vs_path.write_text(VS.replace("methods: [GET]", "methods: [GIT]").replace("/pets", "/pets2"))
    second = source.load()
    assert any("petstore.yaml" in t and "spec.routes[0].matcher.methods[0]" in t for t in error_texts(second))
    assert second.config.virtual_services == good_vs

    # A reference error (unknown function): kept by resolve's fallback.
    vs_path.write_text(VS.replace("function: list-pets", "function: nope").replace("/pets", "/pets3"))
    third = source.load()
    assert any(
        "petstore.yaml" in t and "spec.routes[0].destination.function" in t for t in error_texts(third)
    )
    assert VS_KEY in third.resolved.kept_previous
    assert third.config.virtual_services == good_vs

    # Broken YAML: the file's objects keep serving.
    vs_path.write_text("kind: [unclosed\n")
    fourth = source.load()
    assert any(t.startswith("petstore.yaml: line") for t in error_texts(fourth))
    assert fourth.config.virtual_services == good_vs

    # Fixed: the new version applies and the errors clear.
    vs_path.write_text(VS.replace("/pets", "/animals"))
    fifth = source.load()
    assert fifth.errors == []
    assert fifth.config.virtual_services[0].routes[0].matcher.value == "/animals"


def test_bad_object_without_previous_is_just_rejected(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yaml", UPSTREAM)
    write(folder, "petstore.yaml", VS.replace("function: list-pets", "function: nope"))
    result = FileSource(folder).load()
    assert result.config.virtual_services == ()
    assert result.resolved.kept_previous == set()


def test_file_deletion_removes_its_objects(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yaml", UPSTREAM)
    write(folder, "petstore.yaml", VS)
    admin = write(folder, "admin.yaml", OTHER_VS)
    source = FileSource(folder)
    assert {VS_KEY, ADMIN_KEY} <= keys(source.load())
    admin.unlink()
    result = source.load()
    assert ADMIN_KEY not in keys(result)
    assert VS_KEY in keys(result)
    assert result.errors == []


def test_deleting_the_secret_file_rejects_the_upstream(folder: Path):
    sec = write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yaml", UPSTREAM)
    write(folder, "petstore.yaml", VS)
    source = FileSource(folder)
    assert source.load().errors == []
    sec.unlink()
    result = source.load()
    assert result.config.upstreams == ()
    assert result.config.virtual_services == ()
    assert any(
        t.startswith("upstream.yaml: Upstream default/lambdas: field spec.secret_ref:")
        for t in error_texts(result)
    )


def test_functions_and_hidden_folders_are_ignored(folder: Path):
    write(folder, "all.yaml", SECRET + "---" + UPSTREAM + "---" + VS)
    # The local endpoint's handler list: not a resource, must not be read as one.
    write(folder, "functions/functions.yaml", "functions:\n- name: PetsGet\n  handler: pets.list_pets\n")
    write(folder, "functions/deep/more.yaml", "not: [a resource\n")
    write(folder, ".lambdagate/state.json", "{broken")
    write(folder, ".hidden/x.yaml", "kind: [\n")
    write(folder, ".dotfile.yaml", "kind: [\n")
    write(folder, "README.md", "# not yaml: [\n")
    source = FileSource(folder)
    assert all("functions" not in p.parts for p in source.files())
    result = source.load()
    assert result.errors == []
    assert UP_KEY in keys(result)


def test_duplicates_across_files_first_wins(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "a-upstream.yaml", UPSTREAM)
    write(folder, "b-upstream.yaml", UPSTREAM.replace("us-east-1", "eu-west-1"))
    write(folder, "petstore.yaml", VS)
    result = FileSource(folder).load()
    (err,) = result.errors
    assert err.source == "b-upstream.yaml"
    assert err.obj == "Upstream default/lambdas"
    assert "also defined in a-upstream.yaml" in str(err)
    assert result.config.upstream("default", "lambdas").region == "us-east-1"


def test_duplicates_in_one_file_are_reported_first_wins(folder: Path):
    write(folder, "all.yaml", SECRET + "---" + UPSTREAM + "---" + UPSTREAM.replace("us-east-1", "eu-west-1"))
    result = FileSource(folder).load()
    (err,) = result.errors
    assert str(err).startswith("all.yaml (document 3): Upstream default/lambdas:")
    assert "also defined" in str(err)
    assert result.config.upstream("default", "lambdas").region == "us-east-1"


def test_missing_folder_is_an_error_not_a_crash(tmp_path: Path):
    result = FileSource(tmp_path / "nope").load()
    assert result.config.upstreams == ()
    assert any("does not exist" in t for t in error_texts(result))


def test_local_endpoint_is_passed_to_resolve(folder: Path):
    write(
        folder,
        "all.yaml",
        SECRET + "---" + UPSTREAM.replace("region: us-east-1", "region: us-east-1\n  endpoint: local"),
    )
    assert FileSource(folder).load().errors[0].field == "spec.endpoint"
    local = Endpoint("http", "127.0.0.1", 9001)
    result = FileSource(folder, local_endpoint=local).load()
    assert result.errors == []
    assert result.config.local_endpoint == local


def test_secret_values_never_logged_or_in_errors(folder: Path, caplog):
    write(folder, "secret.yaml", SECRET.replace("aws-creds", "Bad_Name"))
    write(folder, "secret2.yaml", SECRET.replace("aws-creds", "other").replace("stringData", "data"))
    write(folder, "upstream.yaml", UPSTREAM)
    with caplog.at_level(logging.DEBUG, logger="lambdagate"):
        result = FileSource(folder).load()
    assert result.errors  # there is something to report
    everything = caplog.text + "\n".join(error_texts(result)) + repr(result)
    assert SECRET_VALUE not in everything


# ---------------------------------------------------------------------------------------------------------------
# watch()


async def _wait_until(results: list[LoadResult], predicate, timeout: float = 10.0) -> LoadResult:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in reversed(results):
            if predicate(r):
                return r
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"no load matched within {timeout}s; last errors: {[error_texts(r) for r in results[-1:]]}"
    )


def test_watch_picks_up_add_edit_and_delete(folder: Path):
    write(folder, "secret.yaml", SECRET)
    write(folder, "upstream.yaml", UPSTREAM)

    async def main():
        results: list[LoadResult] = []

        async def on_change(result: LoadResult) -> None:
            results.append(result)

        stop = asyncio.Event()
        source = FileSource(folder)
        task = asyncio.create_task(source.watch(on_change, stop=stop, debounce_ms=20))
        try:
            first = await _wait_until(results, lambda r: True)
            assert UP_KEY in keys(first) and VS_KEY not in keys(first)
            # Wait until the watcher is live: touch an empty file until a reload shows up.
            deadline = time.monotonic() + 10
            while len(results) < 2:
                assert time.monotonic() < deadline, "the watcher never reported a change"
                write(folder, "probe.yaml", "# probe\n")
                await asyncio.sleep(0.1)

            vs_path = write(folder, "petstore.yaml", VS)
            added = await _wait_until(results, lambda r: VS_KEY in keys(r))
            assert added.config.virtual_services[0].routes[0].matcher.value == "/pets"

            vs_path.write_text(VS.replace("/pets", "/animals"))
            await _wait_until(
                results,
                lambda r: any(v.routes[0].matcher.value == "/animals" for v in r.config.virtual_services),
            )

            vs_path.unlink()
            await _wait_until(results, lambda r: VS_KEY not in keys(r) and UP_KEY in keys(r))
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())

"""The control plane's work on a change is proportional to the change (benchmarks/scale.py measures it), and gives
exactly what doing everything again would: FileSource keeps parsed files, resolve() remembers what passed,
Translator keeps translated VirtualServices, Snapshot.build reuses encodings."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from controlplane.model import parse_document, resolve
from controlplane.model.resolve import ResolveMemo
from controlplane.model.resources import Config, Endpoint, Upstream
from controlplane.sources.files import FileSource
from controlplane.translate.envoy import (
    ROUTE_CONFIG_NAME,
    ROUTE_TYPE,
    TranslateOptions,
    Translation,
    Translator,
    route_config_bytes,
    translate,
)
from controlplane.xds.cache import Snapshot

MODIFIED, ADDED, DELETED = 2, 1, 3  # watchfiles.Change

SECRET = """
apiVersion: v1
kind: Secret
metadata: {name: keys}
stringData: {access_key: AKIDINCREMENTAL, secret_key: incremental-secret}
"""


def upstream(name: str, functions: int = 3, qualifier: str | None = None, **spec: object) -> dict:
    fns = []
    for j in range(functions):
        fn_spec: dict[str, object] = {"function_name": f"{name}-fn{j}"}
        if j == 0 and qualifier:
            fn_spec["qualifier"] = qualifier
        fns.append({"name": f"f{j}", "spec": fn_spec})
    return {
        "apiVersion": "lambdagate.io/v1",
        "kind": "Upstream",
        "metadata": {"name": name},
        "spec": {
            "region": "us-east-1",
            "secret_ref": "keys",
            "endpoint": "http://127.0.0.1:9",
            "functions": fns,
            **spec,
        },
    }


def service(name: str, ups: list[str], functions: int = 3, **extra: object) -> dict:
    routes: list[dict[str, object]] = []
    for up in ups:
        for j in range(functions):
            base = f"/{name}/{up}/f{j}"
            matcher = {"path": base + "/{id}", "methods": ["GET"]} if j % 2 else {"prefix": base + "/"}
            routes.append({"matcher": matcher, "destination": {"upstream": up, "function": f"f{j}"}})
    routes.append({"matcher": {"path": f"/{name}/mock"}, "mock": {"status": 200, "body": "ok"}})
    routes.append(
        {
            "matcher": {"path": f"/{name}/by-name/{{fn}}"},
            "destination": {"upstream": ups[0], "function_param": "fn"},
            "options": {"cors": {"allow_origins": ["*"]}, "max_retries": 2},
        }
    )
    return {
        "apiVersion": "lambdagate.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"domains": [f"{name}.example.com"], "routes": routes, **extra},
    }


def write(folder: Path, rel: str, doc: dict | str) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    write(d, "secret.yaml", SECRET)
    for k in range(3):
        write(d, f"upstreams/up{k}.yaml", upstream(f"up{k}"))
    write(d, "vs/a.yaml", service("a", ["up0"]))
    write(d, "vs/b.yaml", service("b", ["up1", "up2"]))
    return d


def fresh(folder: Path) -> Config:
    result = FileSource(folder).load()
    assert result.errors == [], [str(e) for e in result.errors]
    return result.config


def same_translation(a: Translation, b: Translation) -> None:
    for kind in ("clusters", "listeners", "routes"):
        got = [m.SerializeToString(deterministic=True) for m in getattr(a, kind)]
        want = [m.SerializeToString(deterministic=True) for m in getattr(b, kind)]
        assert got == want, kind
    assert a.route_table == b.route_table
    assert list(a.route_table) == list(b.route_table)  # the same order too
    for name, target in a.route_table.items():
        assert target.param_functions == b.route_table[name].param_functions


# --- FileSource --------------------------------------------------------------------------------------


def test_unchanged_files_give_the_same_objects(folder: Path):
    source = FileSource(folder)
    first = source.load().config
    edited = write(folder, "upstreams/up1.yaml", upstream("up1", qualifier="v2"))
    second = source.load([(MODIFIED, str(edited))]).config
    assert second == fresh(folder)
    by_name = {u.name: u for u in first.upstreams}
    for up in second.upstreams:
        assert (up is by_name[up.name]) == (up.name != "up1")
    assert second.upstream("default", "up1").function("f0").qualifier == "v2"  # type: ignore[union-attr]
    assert all(a is b for a, b in zip(first.virtual_services, second.virtual_services, strict=True))


def test_only_reported_or_restamped_files_are_read(folder: Path, monkeypatch: pytest.MonkeyPatch):
    source = FileSource(folder)
    source.load()
    read: list[str] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        read.append(self.name)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    edited = write(folder, "vs/a.yaml", service("a", ["up0", "up1"]))
    assert source.load([(MODIFIED, str(edited))]).config == fresh(folder)
    assert read.count("a.yaml") == 2 and len(read) == 1 + 6  # ours, then fresh()'s six
    read.clear()
    # Not reported, but its stamp changed (a lost event): read anyway.
    write(folder, "vs/b.yaml", service("b", ["up2"]))
    assert source.load([(MODIFIED, str(edited))]).config == fresh(folder)
    assert sorted(read[:2]) == ["a.yaml", "b.yaml"]


def test_a_reported_file_is_read_even_with_the_same_stamp(folder: Path):
    source = FileSource(folder)
    path = folder / "vs" / "a.yaml"
    source.load()
    path.write_text(path.read_text().replace("/a/up0/f0/", "/a/up0/g0/"))  # same size
    # As if the rewrite had kept inode, size and times (within one clock tick): the stamp cannot tell.
    st = os.stat(path)
    source._parsed[path].stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    other = folder / "vs" / "b.yaml"
    unreported = source.load([(MODIFIED, str(other))]).config
    assert unreported.virtual_services[0].routes[0].matcher.value == "/a/up0/f0/"
    config = source.load([(MODIFIED, str(path))]).config
    assert config == fresh(folder)
    assert config.virtual_services[0].routes[0].matcher.value == "/a/up0/g0/"
    # Without a report, every file is read: load() alone never misses a change.
    source._parsed[path].stamp = None
    assert FileSource(folder).load().config == source.load().config


def test_added_and_deleted_files_list_the_folder_again(folder: Path):
    source = FileSource(folder)
    source.load()
    added = write(folder, "vs/c.yaml", service("c", ["up2"]))
    config = source.load([(ADDED, str(added))]).config
    assert [v.name for v in config.virtual_services] == ["a", "b", "c"]
    added.unlink()
    config = source.load([(DELETED, str(added))]).config
    assert [v.name for v in config.virtual_services] == ["a", "b"]
    assert source.load([(MODIFIED, str(folder / "vs"))]).config == fresh(folder)


def test_libyaml_refusal_keeps_pyyaml_wording(folder: Path):
    path = write(folder, "broken.yaml", "a: b\n c: d\n")
    result = FileSource(folder).load()
    assert [str(e) for e in result.errors] == [
        "broken.yaml: line 2, column 3: invalid YAML: mapping values are not allowed here"
    ]
    # A broken file fixed on the next load (with the watcher's report) is read again.
    path.write_text(SECRET.replace("keys", "other"))
    source = FileSource(folder)
    source.load()
    assert source.load([(MODIFIED, str(path))]).errors == []


def test_carriage_returns_read_as_before(folder: Path):
    write(folder, "vs/a.yaml", yaml.safe_dump(service("a", ["up0"]), sort_keys=False).replace("\n", "\r\n"))
    assert fresh(folder).virtual_services[0].name == "a"


def test_any_sequence_of_edits_matches_a_fresh_load(folder: Path):
    source = FileSource(folder)
    source.load()
    steps = [
        ("upstreams/up0.yaml", upstream("up0", qualifier="v1")),
        ("vs/a.yaml", service("a", ["up0", "up2"])),
        ("upstreams/up2.yaml", upstream("up2", functions=4)),
        ("vs/b.yaml", "not: [valid"),  # broken: b keeps its last good version
        ("upstreams/up1.yaml", upstream("up1", qualifier="v7")),
        ("vs/b.yaml", service("b", ["up1"])),
        ("secret.yaml", SECRET.replace("incremental-secret", "rotated")),
    ]
    for rel, doc in steps:
        path = write(folder, rel, doc)
        got = source.load([(MODIFIED, str(path))])
        want = FileSource(folder)
        want._good = copy.deepcopy(source._good)  # the same last good versions to fall back on
        assert got.config == want.load().config, rel


# --- resolve -----------------------------------------------------------------------------------------


def test_resolve_memo_gives_what_a_full_check_gives(folder: Path):
    memo = ResolveMemo()
    docs = [yaml.safe_load(p.read_text()) for p in sorted(folder.rglob("*.yaml"))]
    objects = [parse_document(d) for d in docs]
    first = resolve(objects, memo=memo)
    assert first.errors == {} and len(memo.services) == 2
    # Same objects again: both services come from the memo, with the same outcome.
    assert resolve(objects, memo=memo).config == first.config
    # An Upstream that loses the function a service uses: the memo must not hide it.
    broken = [
        dataclasses.replace(o, functions=o.functions[1:])
        if isinstance(o, Upstream) and o.name == "up0"
        else o
        for o in objects
    ]
    with_memo = resolve(broken, previous=first.config, memo=memo)
    without = resolve(broken, previous=first.config)
    assert set(with_memo.errors) == set(without.errors) and with_memo.errors
    assert str(next(iter(with_memo.errors.values()))) == str(next(iter(without.errors.values())))
    assert with_memo.config == without.config


def test_config_lookups_find_the_first_of_a_name():
    a = Upstream("u", "ns", "us-east-1", None, None, ())
    b = dataclasses.replace(a, region="eu-west-1")
    config = Config(upstreams=(a, b))
    assert config.upstream("ns", "u") is a
    assert config.upstream("ns", "v") is None and config.secret("ns", "u") is None


# --- Translator --------------------------------------------------------------------------------------


def test_translator_matches_translate_and_redoes_only_what_changed(folder: Path):
    options = TranslateOptions()
    translator = Translator()
    source = FileSource(folder)
    config = source.load().config
    same_translation(translator.translate(config, options), translate(config, options))
    assert translator.translated == 2

    def step(rel: str, doc: dict | str, redone: int) -> None:
        path = write(folder, rel, doc)
        config = source.load([(MODIFIED, str(path))]).config
        same_translation(translator.translate(config, options), translate(config, options))
        assert translator.translated == redone, rel

    step("upstreams/up1.yaml", upstream("up1", qualifier="v2"), 1)  # only b names up1
    step("upstreams/up0.yaml", upstream("up0", endpoint="http://127.0.0.1:10"), 1)  # a new cluster
    step("vs/a.yaml", service("a", ["up0"], stage_variables={"color": "blue"}), 1)
    step("secret.yaml", SECRET.replace("incremental-secret", "rotated"), 2)  # every Upstream uses it
    step("upstreams/up2.yaml", upstream("up2", options={"timeout": "3s"}), 1)
    step("upstreams/up0.yaml", upstream("up0", endpoint="http://127.0.0.1:10"), 0)  # rewritten, unchanged
    (folder / "vs" / "b.yaml").unlink()
    config = source.load([(DELETED, str(folder / "vs" / "b.yaml"))]).config
    same_translation(translator.translate(config, options), translate(config, options))
    # Other options redo everything, and the listener and ext_proc cluster follow them.
    other = dataclasses.replace(options, listen_port=9999, route_timeout_s=10)
    same_translation(translator.translate(config, other), translate(config, other))
    assert translator.translated == 1


def test_translator_follows_the_local_endpoint(folder: Path):
    write(folder, "upstreams/up0.yaml", upstream("up0", endpoint="local"))
    options = TranslateOptions()
    translator = Translator()
    for port in (9001, 9002):
        config = FileSource(folder, local_endpoint=Endpoint("http", "127.0.0.1", port)).load().config
        same_translation(translator.translate(config, options), translate(config, options))


def test_equal_objects_are_not_translated_again(folder: Path):
    """A source that parses everything anew (Kubernetes) gives equal, not identical, objects."""
    options = TranslateOptions()
    translator = Translator()
    translator.translate(fresh(folder), options)
    translator.translate(fresh(folder), options)
    assert translator.translated == 0


def test_route_configuration_bytes_are_its_deterministic_encoding(folder: Path):
    t = translate(fresh(folder), TranslateOptions())
    (rc,) = t.routes
    assert t.serialized[ROUTE_TYPE][ROUTE_CONFIG_NAME] == rc.SerializeToString(deterministic=True)
    assert route_config_bytes([]) == type(rc)(
        name=ROUTE_CONFIG_NAME, max_direct_response_body_size_bytes=rc.max_direct_response_body_size_bytes
    ).SerializeToString(deterministic=True)
    big = "x" * 70000  # a virtual host longer than two varint bytes
    vhost = rc.virtual_hosts[0].__class__(name=big)
    assert route_config_bytes([vhost.SerializeToString(deterministic=True)]) == type(rc)(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[vhost],
        max_direct_response_body_size_bytes=rc.max_direct_response_body_size_bytes,
    ).SerializeToString(deterministic=True)


# --- Snapshot ----------------------------------------------------------------------------------------


def test_snapshot_reuse_gives_the_same_versions_and_bytes(folder: Path):
    translator = Translator()
    source = FileSource(folder)
    options = TranslateOptions()
    t1 = translator.translate(source.load().config, options)
    s1 = Snapshot.build(t1.resources(), serialized=t1.serialized)
    assert s1.versions == Snapshot.build(t1.resources()).versions
    path = write(folder, "upstreams/up1.yaml", upstream("up1", qualifier="v3"))
    t2 = translator.translate(source.load([(MODIFIED, str(path))]).config, options)
    s2 = Snapshot.build(t2.resources(), serialized=t2.serialized, previous=s1)
    plain = Snapshot.build(t2.resources())
    assert s2.versions == plain.versions and s2.versions != s1.versions
    assert {k: dict(v) for k, v in s2.serialized.items()} == {k: dict(v) for k, v in plain.serialized.items()}
    # Clusters and listener are the same objects as before, so their encodings were reused, not redone.
    assert all(
        s2.serialized[k][n] is s1.serialized[k][n]
        for k in s1.resources
        if k != ROUTE_TYPE
        for n in s1.resources[k]
    )


# --- the collector -----------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", [True, False])
def test_first_configuration_is_built_without_collection_then_frozen(folder: Path, freeze: bool):
    import asyncio
    import gc

    from controlplane.app import ControlPlane, Settings

    seen: list[bool] = []

    async def main() -> None:
        cp = ControlPlane(Settings(config_dir=folder, grpc_port=0, freeze_gc=freeze))
        cp.on_config.append(lambda _result: seen.append(gc.isenabled()))
        await cp.start()
        stop = asyncio.Event()
        runner = asyncio.create_task(cp.run(stop))
        await asyncio.wait_for(cp.loaded.wait(), 10)
        stop.set()
        await runner

    gc.unfreeze()
    try:
        asyncio.run(main())
        assert seen == [not freeze]
        assert gc.isenabled()
        assert (gc.get_freeze_count() > 0) == freeze
    finally:
        gc.unfreeze()
        gc.enable()


def test_listing_matches_a_sorted_rglob(tmp_path: Path):
    """files() walks with os.walk; it lists what the rglob-based listing it replaced listed, in the same order."""
    root = tmp_path / "config"
    for rel in [
        "a.yaml", "a/b.yaml", "a-b.yaml", "A.yml", "z.json", "x.txt", ".hidden.yaml", "sub/.hidden/c.yaml",
        "sub/functions/d.yaml", "functions/e.yaml", ".lambdagate/f.yaml", "sub/deeper/g.yaml", "sub/h.yaml",
        "odd.", "two.tar.yaml",
    ]:  # fmt: skip
        write(root, rel, "# empty\n")
    (root / "dir.yaml").mkdir()
    os.symlink(root / "sub", root / "linked")  # a symlinked folder is not descended into
    os.symlink(root / "a.yaml", root / "alias.yaml")  # a symlinked file is read
    os.symlink(root / "missing.yaml", root / "dangling.yaml")

    def old_files() -> list[Path]:
        out = []
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if any(part in ("functions", ".lambdagate") or part.startswith(".") for part in rel.parts[:-1]):
                continue
            if path.suffix in (".yaml", ".yml", ".json") and path.is_file() and not path.name.startswith("."):
                out.append(path)
        return out

    assert FileSource(root).files() == old_files()

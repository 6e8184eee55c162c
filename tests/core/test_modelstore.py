import json
from dataclasses import asdict
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config

from modalign.core.config import ConfigError, validate
from modalign.core.modelstore import (
    MANIFEST,
    ChecksumMismatch,
    DirectoryStore,
    Manifest,
    ModelStore,
    OutsideStore,
    S3Config,
    S3Store,
    base_folder,
    fetch,
    fetch_published,
    open_store,
    sibling_uri,
    verify,
)


def write_model(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")


def crash(folder: Path) -> None:
    write_model(folder)
    raise RuntimeError("disk full")


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ModelStore, S3Config]:
    """The same tests against both backends, a folder and a bucket on a real S3 server: the store,
    and the settings its readers fetch with."""
    if request.param == "folder":
        return open_store(tmp_path / "store"), S3Config(cache_dir=tmp_path / "unused-cache")
    bucket, config = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_config")
    return open_store(f"s3://{bucket}/models", config), config


def s3_client(s3_config: S3Config) -> BaseClient:
    """A client of the test S3 server, to do behind the store's back what a crash or an attacker would."""
    return boto3.client("s3", endpoint_url=s3_config.endpoint_url, region_name="us-east-1",
                        config=Config(request_checksum_calculation="when_required"))


def s3_keys(store: S3Store, s3_config: S3Config) -> set[str]:
    listed = s3_client(s3_config).list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return {item["Key"] for item in listed if not item["Key"].endswith("/")}  # s3proxy lists folders too


def test_publish_then_fetch_gives_the_verified_version(backend: tuple[ModelStore, S3Config]) -> None:
    store, s3_config = backend
    published = store.publish(Manifest(version="v1", kind="policy", parent="v0"), write_model)
    folder = fetch(published.uri, s3_config, published.manifest_sha256)
    manifest = verify(folder, published.manifest_sha256)
    assert manifest.parent == "v0"
    assert set(manifest.files) == {"model.safetensors", "tokenizer/vocab.json"}
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert store.versions("policy") == ["v1"] and store.versions("reward") == []
    assert store.lookup("policy", "v1") == published and store.lookup("policy", "v2") is None
    with pytest.raises(LookupError, match="v2 was never published"):
        store.fetch("policy", "v2")


def write_adapter(folder: Path) -> None:
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"low rank")


def test_an_adapter_is_fetched_with_its_base_beside_it_and_another_base_is_refused(
    backend: tuple[ModelStore, S3Config],
) -> None:
    store, s3_config = backend
    base = store.publish(Manifest(version="base-1", kind="policy"), write_model)
    adapter = store.publish(Manifest(version="v1", kind="policy", base={
        "version": "base-1", "manifest_sha256": base.manifest_sha256}), write_adapter)
    folder = fetch(adapter.uri, s3_config, adapter.manifest_sha256)
    assert base_folder(folder) == folder.parent / "base-1"
    assert verify(folder.parent / "base-1", base.manifest_sha256).version == "base-1"
    # Another base with the same files is another version: an adapter naming it with base-1's sha256 is refused.
    store.publish(Manifest(version="base-2", kind="policy"), write_model)
    stray = store.publish(Manifest(version="v2", kind="policy", base={
        "version": "base-2", "manifest_sha256": base.manifest_sha256}), write_adapter)
    with pytest.raises(ChecksumMismatch, match="not the base it was trained on"):
        fetch(stray.uri, s3_config, stray.manifest_sha256)
    orphan = store.publish(Manifest(version="v3", kind="policy", base={
        "version": "base-9", "manifest_sha256": base.manifest_sha256}), write_adapter)
    with pytest.raises(LookupError, match="base-9 was never published"):
        fetch(orphan.uri, s3_config, orphan.manifest_sha256)


def test_versions_are_listed_oldest_first(backend: tuple[ModelStore, S3Config]) -> None:
    store, _ = backend
    for version in ("v9", "v10", "v11"):  # within one second on S3, whose times have whole seconds
        store.publish(Manifest(version=version, kind="policy"), write_model)
    assert store.versions("policy") == ["v9", "v10", "v11"]


def test_versions_are_never_rewritten(backend: tuple[ModelStore, S3Config]) -> None:
    store, s3_config = backend
    first = store.publish(Manifest(version="v1", kind="policy"), write_model)

    def other_model(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"other weights")

    with pytest.raises(FileExistsError, match="policy version v1 already exists"):
        store.publish(Manifest(version="v1", kind="policy"), other_model)
    assert (fetch(first.uri, s3_config, first.manifest_sha256) / "model.safetensors").read_bytes() == b"weights"


def test_a_failed_write_publishes_nothing_and_can_be_retried(backend: tuple[ModelStore, S3Config]) -> None:
    store, s3_config = backend
    with pytest.raises(RuntimeError):
        store.publish(Manifest(version="v1", kind="policy"), crash)
    assert store.versions("policy") == [] and store.lookup("policy", "v1") is None
    if isinstance(store, S3Store):
        assert s3_keys(store, s3_config) == set()
    else:
        assert list((store.root / "policy").iterdir()) == []  # type: ignore[attr-defined]
    store.publish(Manifest(version="v1", kind="policy"), write_model)
    assert store.versions("policy") == ["v1"]


def test_a_tampered_file_fails_verification(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    published = store.publish(Manifest(version="v1", kind="policy"), write_model)
    (store.folder("policy", "v1") / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ChecksumMismatch, match="model.safetensors"):
        fetch(published.uri, manifest_sha256=published.manifest_sha256)


def test_an_extra_file_or_another_manifest_fails_verification(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    published = store.publish(Manifest(version="v1", kind="policy"), write_model)
    with pytest.raises(ChecksumMismatch):
        fetch(published.uri, manifest_sha256="0" * 64)
    (store.folder("policy", "v1") / "extra.bin").write_bytes(b"?")
    with pytest.raises(ChecksumMismatch, match="extra.bin"):
        store.fetch("policy", "v1")


@pytest.mark.integration
def test_an_s3_version_without_its_manifest_does_not_exist(s3_bucket: str, s3_config: S3Config) -> None:
    store = open_store(f"s3://{s3_bucket}/models", s3_config)
    assert isinstance(store, S3Store)
    store.publish(Manifest(version="v1", kind="policy"), write_model)
    # What a publish that died before its last upload leaves: every file, no manifest.
    s3_client(s3_config).delete_object(Bucket=s3_bucket, Key=f"models/policy/v1/{MANIFEST}")
    assert s3_keys(store, s3_config) == {"models/policy/v1/model.safetensors", "models/policy/v1/tokenizer/vocab.json"}
    assert store.versions("policy") == [] and store.lookup("policy", "v1") is None
    with pytest.raises(LookupError, match=f"s3://{s3_bucket}/models/policy/v1/{MANIFEST} does not exist"):
        store.fetch("policy", "v1")
    published = store.publish(Manifest(version="v1", kind="policy"), write_model)  # the retry completes it
    assert store.versions("policy") == ["v1"]
    verify(store.fetch("policy", "v1", published.manifest_sha256), published.manifest_sha256)


@pytest.mark.integration
def test_a_tampered_s3_object_is_refused_and_nothing_is_cached(s3_bucket: str, s3_config: S3Config) -> None:
    store = open_store(f"s3://{s3_bucket}/models", s3_config)
    assert isinstance(store, S3Store)
    published = store.publish(Manifest(version="v1", kind="policy"), write_model)
    with pytest.raises(ChecksumMismatch, match="does not match its published sha256"):
        fetch(published.uri, s3_config, "0" * 64)
    s3_client(s3_config).put_object(Bucket=s3_bucket, Key="models/policy/v1/model.safetensors", Body=b"weightz")
    with pytest.raises(ChecksumMismatch, match="model.safetensors"):
        fetch(published.uri, s3_config, published.manifest_sha256)
    assert [p for p in s3_config.cache_dir.rglob("*") if p.is_file()] == []


@pytest.mark.integration
def test_a_manifest_naming_files_outside_its_version_is_refused(s3_bucket: str, s3_config: S3Config) -> None:
    store = open_store(f"s3://{s3_bucket}/models", s3_config)
    forged = json.dumps(asdict(Manifest(version="r1", kind="reward", files={"../../escaped": "0" * 64})))
    s3_client(s3_config).put_object(Bucket=s3_bucket, Key=f"models/reward/r1/{MANIFEST}", Body=forged.encode())
    with pytest.raises(ChecksumMismatch, match="names '../../escaped', outside the version"):
        store.fetch("reward", "r1")  # as the reward service does: no announced sha256 to check it against
    assert not list(s3_config.cache_dir.parent.rglob("escaped"))


@pytest.mark.integration
def test_a_verified_cached_copy_is_reused_and_a_damaged_one_fetched_again(s3_bucket: str, s3_config: S3Config) -> None:
    store = open_store(f"s3://{s3_bucket}/models", s3_config)
    assert isinstance(store, S3Store)
    published = store.publish(Manifest(version="v1", kind="policy"), write_model)
    folder = fetch(published.uri, s3_config, published.manifest_sha256)
    assert folder.is_relative_to(s3_config.cache_dir)
    (folder / "model.safetensors").write_bytes(b"rot")
    assert (fetch(published.uri, s3_config, published.manifest_sha256) / "model.safetensors").read_bytes() == b"weights"
    for key in s3_keys(store, s3_config):
        s3_client(s3_config).delete_object(Bucket=s3_bucket, Key=key)
    assert fetch(published.uri, s3_config, published.manifest_sha256) == folder  # from the cache alone


@pytest.mark.parametrize(("root", "message"), [
    ("gs://bucket/models", "unsupported scheme 'gs'"),
    ("s3:///models", "names no bucket"),
    ("s3://My_Bucket/models", "'My_Bucket' is not an S3 bucket name"),
    ("s3://bucket/a//b", "empty, '.' or '..' segment"),
    ("s3://bucket/../b", "empty, '.' or '..' segment"),
    ("s3://bucket/models?versionId=3", "without ?query"),
    ("file://server/models", "not host 'server'"),
    ("", "model store is empty"),
])
def test_a_bad_store_location_is_refused_naming_what_is_wrong(root: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        open_store(root)


def test_store_locations_name_their_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path), DirectoryStore)
    assert open_store(tmp_path.as_uri()).root == tmp_path  # type: ignore[attr-defined]
    s3 = open_store("s3://bucket/a/b/", S3Config(region="eu-west-1"))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "a/b")
    assert open_store("s3://bucket").prefix == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize("endpoint", ["http://minio.storage:9000", "http://10.0.0.7:9000", "http://[2001:db8::1]:9000",
                                      "http://localhost.example.com:9000"])
def test_a_plaintext_s3_endpoint_off_this_machine_is_refused_unless_allowed(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="plaintext HTTP.*--s3.allow-plaintext") as refused:
        validate(S3Config(endpoint_url=endpoint))
    assert refused.value.field == "endpoint_url"
    with pytest.raises(ValueError, match="plaintext HTTP"):
        open_store("s3://bucket/models", S3Config(endpoint_url=endpoint))
    # The same endpoint from the environment, where boto3 also looks, is refused as well.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(ValueError, match="plaintext HTTP"):
        open_store("s3://bucket/models", S3Config())
    allowed = S3Config(endpoint_url=endpoint, allow_plaintext=True)
    validate(allowed)
    assert isinstance(open_store("s3://bucket/models", allowed), S3Store)


@pytest.mark.parametrize("endpoint", ["https://minio.storage:9000", "http://127.0.0.1:9000", "http://127.8.0.1",
                                      "http://[::1]:9000", "http://localhost:9000", "http://LOCALHOST"])
def test_https_and_loopback_s3_endpoints_need_no_permission(endpoint: str) -> None:
    validate(S3Config(endpoint_url=endpoint))
    assert isinstance(open_store("s3://bucket/models", S3Config(endpoint_url=endpoint)), S3Store)


def test_a_version_uri_names_its_siblings_in_the_same_store() -> None:
    assert sibling_uri("s3://bucket/models/policy/v3", "reward", "r3") == "s3://bucket/models/reward/r3"
    assert sibling_uri("s3://bucket/policy/v3", "reward", "r3") == "s3://bucket/reward/r3"
    assert sibling_uri("file:///srv/my%20models/policy/v3", "reward", "r3") == "file:///srv/my%20models/reward/r3"
    for not_a_version in ("s3://bucket", "/srv/models/policy/v3", "s3://bucket/v3"):
        with pytest.raises(ValueError, match="is not a model-store version URI"):
            sibling_uri(not_a_version, "reward", "r3")


def test_a_published_version_is_fetched_only_from_inside_the_configured_store(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "models")
    store.publish(Manifest(version="v1", kind="policy"), lambda staging: (staging / "w.bin").write_bytes(b"w"))
    uri = store.folder("policy", "v1").resolve().as_uri()
    for configured in (str(tmp_path / "models"), (tmp_path / "models").as_uri(), f"{tmp_path}/./models/"):
        assert fetch_published(uri, configured) == store.folder("policy", "v1")
    elsewhere = DirectoryStore(tmp_path / "elsewhere")
    elsewhere.publish(Manifest(version="v1", kind="policy"), lambda staging: (staging / "w.bin").write_bytes(b"w"))
    for outside in (
        elsewhere.folder("policy", "v1").resolve().as_uri(),          # another folder
        f"{(tmp_path / 'models').as_uri()}/../elsewhere/policy/v1",   # climbing out
        f"{(tmp_path / 'models').as_uri()}/%2e%2e/policy/v1",        # climbing out, encoded
        f"{(tmp_path / 'models').as_uri()}/secrets/v1",              # not a kind of version
        "s3://bucket/models/policy/v1",                               # another backend
        "http://example.com/models/policy/v1",
        "/etc/passwd",
    ):
        with pytest.raises(OutsideStore):
            fetch_published(outside, str(tmp_path / "models"))
    with pytest.raises(OutsideStore):
        fetch_published("s3://other/models/policy/v1", "s3://bucket/models")
    with pytest.raises(OutsideStore):
        fetch_published("s3://bucket/models-2/policy/v1", "s3://bucket/models")

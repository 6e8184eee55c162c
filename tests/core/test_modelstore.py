from pathlib import Path

import pytest

from modalign.core.modelstore import ChecksumMismatch, Manifest, ModelStore


def write_model(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")


def test_publish_writes_a_verifiable_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    folder, manifest_sha = store.publish(Manifest(version="v1", kind="policy", parent="v0"), write_model)
    manifest = ModelStore.verify(folder, manifest_sha)
    assert manifest.parent == "v0"
    assert set(manifest.files) == {"model.safetensors", "tokenizer/vocab.json"}
    assert store.versions("policy") == ["v1"]
    assert not [p for p in (tmp_path / "policy").iterdir() if p.name.startswith(".")]


def test_a_tampered_file_fails_verification(tmp_path: Path) -> None:
    folder, manifest_sha = ModelStore(tmp_path).publish(Manifest(version="v1", kind="policy"), write_model)
    (folder / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ChecksumMismatch, match="model.safetensors"):
        ModelStore.verify(folder, manifest_sha)


def test_an_extra_file_or_another_manifest_fails_verification(tmp_path: Path) -> None:
    folder, manifest_sha = ModelStore(tmp_path).publish(Manifest(version="v1", kind="policy"), write_model)
    with pytest.raises(ChecksumMismatch):
        ModelStore.verify(folder, "0" * 64)
    (folder / "extra.bin").write_bytes(b"?")
    with pytest.raises(ChecksumMismatch, match="extra.bin"):
        ModelStore.verify(folder)


def test_a_failed_write_leaves_nothing_and_versions_are_never_rewritten(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def crash(folder: Path) -> None:
        write_model(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.publish(Manifest(version="v1", kind="policy"), crash)
    assert store.versions("policy") == []
    assert list((tmp_path / "policy").iterdir()) == []
    store.publish(Manifest(version="v1", kind="policy"), write_model)
    with pytest.raises(FileExistsError):
        store.publish(Manifest(version="v1", kind="policy"), write_model)

"""The model store: one folder per published version, committed atomically and verified before use.

Layout: <root>/<kind>/<version>/ holding the model's files and manifest.json, where kind is "policy" or
"reward" and the root is a folder or an S3 location (s3://bucket/prefix). The manifest, with the sha256
of every other file, is the commit marker: a version exists once its manifest does, so a reader never
sees half a version. A folder store writes a version under a temporary name and renames it into
place; an S3 store uploads every file first and the manifest last. Readers get a local folder whose
every file was checked against the manifest (fetch): a folder store's own, or a verified copy of an
S3 version in a local cache.

A policy version is a full checkpoint or a LoRA adapter: an adapter's manifest names its base (a full
version in the same store) and the sha256 of the base's manifest. Fetching an adapter fetches its base
too, verified against that sha256, so a base that was replaced or damaged is refused; every store keeps
the base's folder beside the adapter's (base_folder), where loaders find it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config as BotoConfig
from prometheus_client import Counter

from modalign.core.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_MODEL_STORE = str(Path.home() / ".local" / "share" / "modalign" / "models")
"""Where the trainer publishes, and the services load published versions from, unless told otherwise."""

# AWS's rules for bucket names (3-63 lowercase letters, digits, dots and hyphens), checked here so a
# typo is named at start-up rather than as a signature or routing error from the service.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A version name becomes a folder name: nothing that could step out of the model store."""


@dataclass
class Manifest:
    version: str
    kind: str
    """"policy" or "reward"."""
    parent: str = ""
    """The version this one was trained from; empty for the first."""
    algorithm: str = ""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every file in the folder (manifest.json aside), by path relative to the folder."""
    trained_through: list[dict] = field(default_factory=list)
    """Kafka positions [{"topic", "partition", "offset"}]: everything before each offset was trained on."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    base: dict[str, str] = field(default_factory=dict)
    """For a LoRA adapter version: {"version", "manifest_sha256"} of the full version it adapts; empty
    for a full checkpoint."""


@dataclass(frozen=True)
class Published:
    """Where a published version is, as the policy-versions events name it."""

    uri: str
    """file:///... or s3://bucket/prefix/<kind>/<version>."""
    manifest_sha256: str


@dataclass(frozen=True)
class S3Config:
    """How to reach an S3-compatible model store. Credentials come from the standard AWS sources
    (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or the pod's IAM role), never from flags."""

    endpoint_url: str = ""
    """http(s)://host:port of an S3-compatible service; empty: AWS_ENDPOINT_URL_S3 if set, else AWS S3."""
    region: str = ""
    """Empty: AWS_REGION or AWS_DEFAULT_REGION if set, else us-east-1."""
    cache_dir: Path = Path.home() / ".cache" / "modalign" / "models"
    """Where versions fetched from S3 are kept, verified, to be loaded from; a cached copy that still
    verifies is reused."""
    allow_plaintext: bool = False
    """Accept an http:// endpoint on another machine, over which request signatures and every model
    file cross the network unencrypted (an in-cluster object store without TLS). Off: such an endpoint
    is refused; http:// on loopback (127.0.0.0/8, ::1, localhost) is always accepted."""

    def validate(self) -> None:
        if self.endpoint_url and (refusal := plaintext_refusal(self.endpoint_url, self.allow_plaintext)):
            raise ConfigError("endpoint_url", refusal)


def plaintext_refusal(endpoint_url: str, allow_plaintext: bool) -> str | None:
    """Why an S3 endpoint may not be used, or None: an http:// one that leaves this machine needs
    allow_plaintext, as nothing else on the way protects what it carries."""
    parsed = urlparse(endpoint_url)
    if parsed.scheme != "http" or allow_plaintext or _is_loopback(parsed.hostname or ""):
        return None
    return (f"S3 endpoint {endpoint_url} is plaintext HTTP: request signatures and model files would cross the "
            "network unencrypted; use https://, or accept that with --s3.allow-plaintext (MODALIGN_S3_ALLOW_PLAINTEXT)")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name other than localhost: it may resolve anywhere
        return False


class ChecksumMismatch(RuntimeError):
    """A version's files differ from its manifest: it must not be loaded."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path | str) -> Manifest:
    """The manifest of a version's folder, without checking any file (see verify)."""
    return Manifest(**json.loads((Path(folder) / MANIFEST).read_text()))


def base_folder(folder: Path | str) -> Path | None:
    """The folder of the base an adapter version adapts (its sibling, where fetch put it, verified);
    None for a full checkpoint or a folder that is not a store version."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return None
    base = read_manifest(folder).base
    return folder.parent / base["version"] if base else None


def verify(folder: Path | str, manifest_sha256: str | None = None) -> Manifest:
    """Checks every file against the manifest (and the manifest against manifest_sha256 when given)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if manifest_sha256 is not None and file_sha256(manifest_path) != manifest_sha256:
        raise ChecksumMismatch(f"{manifest_path} does not match its published sha256")
    manifest = read_manifest(folder)
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(manifest.files):
        raise ChecksumMismatch(f"{folder}: files {sorted(present ^ set(manifest.files))} differ from the manifest")
    for relative, expected in manifest.files.items():
        if file_sha256(folder / relative) != expected:
            raise ChecksumMismatch(f"{folder / relative}: sha256 differs from the manifest")
    return manifest


def folder_digests(folder: Path | str) -> dict[str, str]:
    """sha256 of every file in folder but a manifest, by relative path: what a manifest's files would be."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): file_sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


class ModelStore(ABC):
    """Versions by kind: published once, never rewritten, fetched verified."""

    @abstractmethod
    def versions(self, kind: str) -> list[str]:
        """Published versions of kind, oldest first."""

    @abstractmethod
    def lookup(self, kind: str, version: str) -> Published | None:
        """The published version, or None if it was never published (completely)."""

    def fetch(self, kind: str, version: str, manifest_sha256: str | None = None) -> Path:
        """A local folder holding the version, every file verified against its manifest (and the
        manifest against manifest_sha256 when given); for an adapter, its base too, beside it (see
        base_folder). Raises LookupError if it (or its base) was never published, ChecksumMismatch if
        a file differs or the base is not the one the adapter names."""
        folder = self._fetch_version(kind, version, manifest_sha256)
        base = read_manifest(folder).base
        if base:
            if not VERSION_NAME.match(base.get("version", "")) or not base.get("manifest_sha256"):
                raise ChecksumMismatch(f"{kind} {version}: its manifest names base {base!r}, not a version and its sha256")
            try:
                self._fetch_version(kind, base["version"], base["manifest_sha256"])
            except ChecksumMismatch as error:
                raise ChecksumMismatch(f"{kind} {version} adapts {base['version']}, but {base['version']} in {self} "
                                       f"is not the base it was trained on: {error}") from error
        return folder

    @abstractmethod
    def _fetch_version(self, kind: str, version: str, manifest_sha256: str | None) -> Path:
        """fetch for one version, without its base."""

    def publish(self, manifest: Manifest, write: Callable[[Path], None]) -> Published:
        """Writes a version: write(folder) fills a temporary folder, the manifest is added with every
        file's sha256, then the version is committed.

        Raises FileExistsError if the version exists: versions are never rewritten. Only one writer
        (the trainer's rank 0) publishes into a store, so checking first is enough.
        """
        if self.lookup(manifest.kind, manifest.version) is not None:
            raise FileExistsError(f"{manifest.kind} version {manifest.version} already exists in {self}")
        with self._staging(manifest.kind) as staging:
            write(staging)
            manifest.files = folder_digests(staging)
            manifest.created_at = manifest.created_at or time.time()
            (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
            return self._commit(staging, manifest.kind, manifest.version)

    @abstractmethod
    def _staging(self, kind: str) -> AbstractContextManager[Path]:
        """A context manager giving an empty local folder, removed (if still there) on exit."""

    @abstractmethod
    def _commit(self, staging: Path, kind: str, version: str) -> Published:
        """Makes the staged folder (manifest included) the published version."""


class DirectoryStore(ModelStore):
    """A store in a local folder or a shared volume; versions are named by file:// URI."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def folder(self, kind: str, version: str) -> Path:
        return self.root / kind / version

    def versions(self, kind: str) -> list[str]:
        base = self.root / kind
        if not base.exists():
            return []
        published = [p for p in base.iterdir() if (p / MANIFEST).exists() and not p.name.startswith(".")]
        return [p.name for p in sorted(published, key=lambda p: (p / MANIFEST).stat().st_mtime)]

    def lookup(self, kind: str, version: str) -> Published | None:
        folder = self.folder(kind, version)
        if not (folder / MANIFEST).is_file():
            return None
        return Published(uri=folder.resolve().as_uri(), manifest_sha256=file_sha256(folder / MANIFEST))

    def _fetch_version(self, kind: str, version: str, manifest_sha256: str | None) -> Path:
        folder = self.folder(kind, version)
        if not (folder / MANIFEST).is_file():
            raise LookupError(f"{kind} version {version} was never published: {folder / MANIFEST} does not exist")
        verify(folder, manifest_sha256)
        return folder

    @contextmanager
    def _staging(self, kind: str) -> Iterator[Path]:
        # Beside the versions, so that the commit is a rename within one filesystem.
        staging = self.root / kind / f".incoming-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, staging: Path, kind: str, version: str) -> Published:
        _fsync_tree(staging)
        target = self.folder(kind, version)
        os.rename(staging, target)
        return Published(uri=target.resolve().as_uri(), manifest_sha256=file_sha256(target / MANIFEST))


class S3Store(ModelStore):
    """A store under s3://bucket/prefix on AWS S3 or any S3-compatible service."""

    def __init__(self, bucket: str, prefix: str, config: S3Config = S3Config()) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache_dir = config.cache_dir
        self._client = boto3.client(
            "s3", endpoint_url=config.endpoint_url or None, region_name=config.region or None,
            # boto3 sends CRC checksum headers by default, which S3-compatible services (s3proxy,
            # Ceph, older MinIO) refuse; every file is checked against its sha256 anyway.
            config=BotoConfig(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
        )
        # The endpoint boto3 resolved: the flag's, or one from the environment (AWS_ENDPOINT_URL_S3).
        if refusal := plaintext_refusal(self._client.meta.endpoint_url, config.allow_plaintext):
            raise ValueError(refusal)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, kind: str, version: str, relative: str = "") -> str:
        return "/".join(part for part in (self.prefix, kind, version, relative) if part)

    def versions(self, kind: str) -> list[str]:
        base = self._key(kind, "") + "/"
        published: list[tuple[datetime, str]] = []
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for item in page.get("Contents", []):
                name, _, rest = item["Key"][len(base):].partition("/")
                if rest == MANIFEST:
                    published.append((item["LastModified"], name))
        # S3 times have whole seconds: versions committed within one second go by their number (v9 before v10).
        return [name for _, name in sorted(published, key=lambda p: (p[0], len(p[1]), p[1]))]

    def lookup(self, kind: str, version: str) -> Published | None:
        manifest = self._manifest_bytes(kind, version)
        if manifest is None:
            return None
        return Published(uri=f"s3://{self.bucket}/{self._key(kind, version)}",
                         manifest_sha256=hashlib.sha256(manifest).hexdigest())

    def _fetch_version(self, kind: str, version: str, manifest_sha256: str | None) -> Path:
        target = self.cache_dir / self.bucket / self._key(kind, version)
        if target.exists():
            try:
                verify(target, manifest_sha256)
                return target
            except ChecksumMismatch:
                log.warning("the cached copy of %s is damaged; fetching it again", target, exc_info=True)
                shutil.rmtree(target)
        manifest = self._manifest_bytes(kind, version)
        if manifest is None:
            raise LookupError(f"{kind} version {version} was never published: "
                              f"s3://{self.bucket}/{self._key(kind, version, MANIFEST)} does not exist")
        # Before anything is downloaded: the manifest says what to download, and where to.
        if manifest_sha256 is not None and hashlib.sha256(manifest).hexdigest() != manifest_sha256:
            raise ChecksumMismatch(f"s3://{self.bucket}/{self._key(kind, version, MANIFEST)} does not match its published sha256")
        files = Manifest(**json.loads(manifest)).files
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".incoming-{version}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            (staging / MANIFEST).write_bytes(manifest)
            for relative in files:
                if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
                    raise ChecksumMismatch(f"the manifest of {kind} {version} names {relative!r}, outside the version")
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                self._client.download_file(self.bucket, self._key(kind, version, relative), str(staging / relative))
            verify(staging, manifest_sha256)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.exists():  # else another process fetched it first, as verified as ours
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _manifest_bytes(self, kind: str, version: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(kind, version, MANIFEST))
        except self._client.exceptions.NoSuchKey:
            return None
        return response["Body"].read()

    @contextmanager
    def _staging(self, kind: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix=f"modalign-{kind}-") as staging:
            yield Path(staging)

    def _commit(self, staging: Path, kind: str, version: str) -> Published:
        # Every file first, the manifest last: until it is there, the version does not exist, and
        # objects of a publish that died halfway are overwritten by the next attempt.
        for path in sorted(staging.rglob("*")):
            if path.is_file() and path.name != MANIFEST:
                self._client.upload_file(str(path), self.bucket, self._key(kind, version, str(path.relative_to(staging))))
        self._client.upload_file(str(staging / MANIFEST), self.bucket, self._key(kind, version, MANIFEST))
        return Published(uri=f"s3://{self.bucket}/{self._key(kind, version)}",
                         manifest_sha256=file_sha256(staging / MANIFEST))


def open_store(root: str | Path, s3: S3Config = S3Config()) -> ModelStore:
    """The store at root: a folder path, a file:// URI, or s3://bucket/prefix (reached as s3 says)."""
    text = str(root)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        bucket, prefix = _s3_location(text)
        return S3Store(bucket, prefix, s3)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"model store {text!r}: a file:// URI names a local path (file:///path), not host {parsed.netloc!r}")
        return DirectoryStore(unquote(parsed.path))
    if "://" in text:
        raise ValueError(f"model store {text!r}: unsupported scheme {parsed.scheme!r}; "
                         "use a folder path, file:///path or s3://bucket/prefix")
    if not text:
        raise ValueError("model store is empty: give a folder path or s3://bucket/prefix")
    return DirectoryStore(text)


def _s3_location(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.query or parsed.fragment or parsed.params:
        raise ValueError(f"model store {uri!r}: an s3:// location is s3://bucket/prefix, without ?query or #fragment")
    if not parsed.netloc:
        raise ValueError(f"model store {uri!r} names no bucket: use s3://bucket/prefix")
    if not _BUCKET_NAME.match(parsed.netloc) or ".." in parsed.netloc:
        raise ValueError(f"model store {uri!r}: {parsed.netloc!r} is not an S3 bucket name "
                         "(3-63 lowercase letters, digits, dots and hyphens)")
    prefix = parsed.path.strip("/")
    if "" in prefix.split("/")[1:] or any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"model store {uri!r}: the prefix {prefix!r} has an empty, '.' or '..' segment")
    return parsed.netloc, prefix


def _split_version_uri(uri: str) -> tuple[str, str, str]:
    """(store root, kind, version) of a version's URI, <root>/<kind>/<version>."""
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) != 3 or "://" not in parts[0] or not parts[1] or not parts[2]:
        raise ValueError(f"{uri!r} is not a model-store version URI: expected file:///<store>/<kind>/<version> "
                         "or s3://<bucket>/<prefix>/<kind>/<version>")
    return parts[0], parts[1], parts[2]


def fetch(uri: str, s3: S3Config = S3Config(), manifest_sha256: str | None = None) -> Path:
    """A verified local folder holding the version that uri (as a policy-versions event names it) points to."""
    root, kind, version = _split_version_uri(uri)
    return open_store(root, s3).fetch(kind, version, manifest_sha256)


class OutsideStore(ValueError):
    """A version URI that does not name a version inside the configured model store."""


REFUSED_VERSIONS = Counter(
    "modalign_model_versions_refused_total",
    "Published versions not loaded because their URI lies outside the configured model store.",
)


def _location(root: str) -> tuple[str, str]:
    """A store root as (scheme, canonical location): a bucket and prefix, or a resolved absolute path."""
    parsed = urlparse(root)
    if parsed.scheme == "s3":
        bucket, prefix = _s3_location(root)
        return "s3", f"{bucket}/{prefix}"
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise OutsideStore(f"{root!r}: a file:// URI names a local path, not host {parsed.netloc!r}")
        return "file", os.path.realpath(unquote(parsed.path))
    if "://" in root:
        raise OutsideStore(f"{root!r}: unsupported scheme {parsed.scheme!r}")
    return "file", os.path.realpath(root)


def fetch_published(uri: str, store: str, s3: S3Config = S3Config(), manifest_sha256: str | None = None) -> Path:
    """fetch, for a URI read from a topic: only a policy or reward version directly inside store (the
    configured model store, as the trainer's --model-store names it). Anything else, a `..` segment, a
    file:// path elsewhere, another bucket or prefix, raises OutsideStore before anything is read."""
    try:
        if any(part in (".", "..") for part in unquote(uri).split("/")):
            raise ValueError(f"{uri!r}: a '.' or '..' segment")
        root, kind, _ = _split_version_uri(uri)
        inside = kind in ("policy", "reward") and _location(root) == _location(store)
    except ValueError as error:
        REFUSED_VERSIONS.inc()
        raise OutsideStore(f"{error}; refused") from error
    if not inside:
        REFUSED_VERSIONS.inc()
        raise OutsideStore(f"{uri!r} is not a version in the model store {store!r}; refused")
    return fetch(uri, s3, manifest_sha256)


def sibling_uri(uri: str, kind: str, version: str) -> str:
    """The URI of another version in the store of the version at uri: <root>/<kind>/<version>."""
    root, _, _ = _split_version_uri(uri)
    return f"{root}/{kind}/{version}"


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
